"""MNIST through torchvision, read from ``COLLISIONS_DATA`` (the folder holding ``MNIST/raw``).

Offline builds set it to ``../shared/data``; without it ``~/.cache/collisions-book/data`` is used and
torchvision downloads MNIST there when a network is available. The idx files are checked (present, magic
number, shape, size) before torchvision reads them, so a missing or truncated file is named in one line.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch

from helpers import runtime

#: The uncompressed idx files torchvision's ``MNIST`` reads: name, magic number, shape; per split (train?).
IDX_FILES: dict[bool, tuple[tuple[str, int, tuple[int, ...]], ...]] = {
    True: (("train-images-idx3-ubyte", 0x803, (60_000, 28, 28)), ("train-labels-idx1-ubyte", 0x801, (60_000,))),
    False: (("t10k-images-idx3-ubyte", 0x803, (10_000, 28, 28)), ("t10k-labels-idx1-ubyte", 0x801, (10_000,))),
}


def root() -> Path:
    """The folder that holds ``MNIST/raw`` (``COLLISIONS_DATA`` or the book's cache)."""
    env = os.environ.get("COLLISIONS_DATA")
    return Path(env).expanduser().resolve() if env else runtime.cache_dir() / "data"


def raw_folder() -> Path:
    return root() / "MNIST" / "raw"


def _check_idx(path: Path, magic: int, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a complete idx file of ``shape`` (uint8 values)."""
    header = 4 + 4 * len(shape)
    expected = header + math.prod(shape)
    size = path.stat().st_size
    what = f"an MNIST idx file of shape {shape} has {expected} bytes"
    fix = "replace it with a complete copy (or point COLLISIONS_DATA to a folder with good MNIST/raw files)"
    if size < header:
        raise ValueError(f"{path}: truncated idx file ({size} bytes; {what}); {fix}")
    with open(path, "rb") as f:
        head = f.read(header)
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not an MNIST idx file (magic number {found:#010x}, expected {magic:#010x}); {fix}")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(shape)))
    if dims != shape:
        raise ValueError(f"{path}: its header says shape {dims}, expected {shape}; {fix}")
    if size != expected:
        state = "truncated idx file" if size < expected else "idx file with trailing bytes"
        raise ValueError(f"{path}: {state} ({size} bytes; {what}); {fix}")


def check_files(train: bool) -> None:
    """Check the MNIST files under :func:`raw_folder` before torchvision reads them.

    Raises ``FileNotFoundError`` naming the missing files (torchvision wants all four), or ``ValueError`` naming
    the file of split ``train`` that is truncated, has trailing bytes, or is not an MNIST idx file.
    """
    raw = raw_folder()
    missing = [name for split in (True, False) for name, _, _ in IDX_FILES[split] if not (raw / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST file(s) {', '.join(missing)} missing under {raw} (expected the four uncompressed idx files). "
            "Set COLLISIONS_DATA to the folder that holds MNIST/raw (offline machines: ../shared/data)."
        )
    for name, magic, shape in IDX_FILES[train]:
        _check_idx(raw / name, magic, shape)


@functools.cache
def load(train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as tensors: images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64.

    N is 60,000 (train) or 10,000 (test). Loaded once per process through ``torchvision.datasets.MNIST``, after
    :func:`check_files` (a missing file: ``FileNotFoundError``; a truncated or foreign one: ``ValueError``).
    """
    from torchvision.datasets import MNIST

    folder = root()
    try:
        check_files(train)
    except FileNotFoundError:
        if not runtime.network_available():
            raise
        MNIST(root=str(folder), train=train, download=True)  # fetches the missing files, then checked again
        check_files(train)
    dataset = MNIST(root=str(folder), train=train, download=False)
    images = dataset.data.unsqueeze(1).float().div_(255.0)
    return images, dataset.targets.clone()
