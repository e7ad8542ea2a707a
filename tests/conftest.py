"""Shared test setup: offline mode, scratch output/cache folders, MNIST from the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
#: The real MNIST folder (``COLLISIONS_DATA`` as the run was started, else the shared folder next to the checkout),
#: read once: tests that point ``COLLISIONS_DATA`` at a scratch folder copy their files from here.
MNIST_DATA = Path(os.environ.get("COLLISIONS_DATA") or SHARED_DATA)


@pytest.fixture(autouse=True, scope="session")
def _book_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("COLLISIONS_OUT", str(tmp_path_factory.mktemp("out")))
    os.environ.setdefault("MPLBACKEND", "Agg")
    if "COLLISIONS_DATA" not in os.environ and (SHARED_DATA / "MNIST" / "raw").is_dir():
        os.environ["COLLISIONS_DATA"] = str(SHARED_DATA)


def mnist_available() -> bool:
    root = os.environ.get("COLLISIONS_DATA")
    return bool(root) and (Path(root) / "MNIST" / "raw").is_dir()


needs_mnist = pytest.mark.skipif(
    not mnist_available() and not (MNIST_DATA / "MNIST" / "raw").is_dir(),
    reason="MNIST not available (set COLLISIONS_DATA)",
)
