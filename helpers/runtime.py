"""Where the book runs: device choice, seeding, network detection, output folders.

Everything that depends on the machine (GPU or not, online or not, where files go) is decided here once,
so that chapters and the command line behave the same way.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

#: Hosts the pretrained-weight loaders need; if none answers, the book is offline.
_WEIGHT_HOSTS = (("download.pytorch.org", 443), ("huggingface.co", 443))


VALID_DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(device: str = "auto") -> torch.device:
    """Turn the chapters' ``device`` parameter into a torch device.

    ``"auto"`` picks CUDA when available, else CPU. Anything else must be a device torch accepts.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(VALID_DEVICES)}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use 'auto' or 'cpu'")
    return resolved


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@functools.cache
def network_available(timeout_s: float = 1.5) -> bool:
    """True when one of the weight hosts accepts a TCP connection (checked once per process).

    ``COLLISIONS_OFFLINE=1`` forces offline mode without probing.
    """
    if os.environ.get("COLLISIONS_OFFLINE") == "1":
        return False
    for host, port in _WEIGHT_HOSTS:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return True
        except OSError:
            continue
    return False


def ensure_hub_mode() -> None:
    """Put the Hugging Face hub (used by timm and smp) offline when there is no network.

    Without this, timm retries the hub for about a minute before giving up on each model.
    """
    if not network_available():
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:  # huggingface_hub reads the variable at import time; refresh it if already imported
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass


def repo_root() -> Path:
    """The repository root (parent of the ``helpers`` package) when installed in develop mode."""
    return Path(__file__).resolve().parent.parent


def output_root() -> Path:
    """Where chapters write ``figures/`` and ``results/``.

    ``COLLISIONS_OUT`` overrides it (``make test`` sends its quick runs to a scratch folder so that the
    book's real figures are never overwritten by quick ones); otherwise the repository root, or the
    current folder when ``helpers`` was installed from a wheel (Colab).
    """
    env = os.environ.get("COLLISIONS_OUT")
    if env:
        return Path(env).resolve()
    root = repo_root()
    return root if (root / "_toc.yml").exists() else Path.cwd()


def figures_dir() -> Path:
    path = output_root() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir() -> Path:
    path = output_root() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Cache for expensive, deterministic work (trained MNIST models, audits); ``COLLISIONS_CACHE`` overrides."""
    env = os.environ.get("COLLISIONS_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "collisions-book"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Write a file so that readers see either the old file or the complete new one, never half of it.

    ``write(tmp)`` writes to a unique temporary file in the same folder (so concurrent writers do not share one),
    which is flushed to disk and then renamed over ``path``. On any error the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
