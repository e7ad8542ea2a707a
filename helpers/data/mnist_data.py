"""MNIST through torchvision, read from ``COLLISIONS_DATA`` (the folder holding ``MNIST/raw``).

Offline builds set it to ``../shared/data``; without it ``~/.cache/collisions-book/data`` is used and
torchvision downloads MNIST there when a network is available.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from helpers import runtime


def root() -> Path:
    """The folder that holds ``MNIST/raw`` (``COLLISIONS_DATA`` or the book's cache)."""
    env = os.environ.get("COLLISIONS_DATA")
    return Path(env).expanduser().resolve() if env else runtime.cache_dir() / "data"


@functools.cache
def load(train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as tensors: images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64.

    N is 60,000 (train) or 10,000 (test). Loaded once per process through ``torchvision.datasets.MNIST``.
    """
    from torchvision.datasets import MNIST

    folder = root()
    have_files = (folder / "MNIST" / "raw").is_dir()
    download = not have_files and runtime.network_available()
    if not have_files and not download:
        raise FileNotFoundError(
            f"MNIST not found under {folder / 'MNIST' / 'raw'} and no network to download it. "
            "Set COLLISIONS_DATA to the folder that holds MNIST/raw (offline machines: ../shared/data)."
        )
    dataset = MNIST(root=str(folder), train=train, download=download)
    images = dataset.data.unsqueeze(1).float().div_(255.0)
    return images, dataset.targets.clone()
