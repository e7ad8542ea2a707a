"""Data: MNIST through torchvision, sample natural images shipped with scikit-image, ImageNet preprocessing.

MNIST's root comes from the ``COLLISIONS_DATA`` environment variable (the folder holding ``MNIST/raw``);
offline builds set it to ``../shared/data``. Without it, ``~/.cache/collisions-book/data`` is used and
torchvision downloads MNIST there when a network is available.
"""
from __future__ import annotations

import functools
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import runtime

#: Natural images shipped inside scikit-image (no download needed), name -> skimage.data function.
SAMPLE_IMAGES: dict[str, str] = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "motorcycle": "stereo_motorcycle",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mnist_root() -> Path:
    """The folder that holds ``MNIST/raw`` (``COLLISIONS_DATA`` or the book's cache)."""
    env = os.environ.get("COLLISIONS_DATA")
    return Path(env).expanduser().resolve() if env else runtime.cache_dir() / "data"


@functools.cache
def mnist(train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as tensors: images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64.

    N is 60,000 (train) or 10,000 (test). Loaded once per process through ``torchvision.datasets.MNIST``.
    """
    from torchvision.datasets import MNIST

    root = mnist_root()
    have_files = (root / "MNIST" / "raw").is_dir()
    download = not have_files and runtime.network_available()
    if not have_files and not download:
        raise FileNotFoundError(
            f"MNIST not found under {root / 'MNIST' / 'raw'} and no network to download it. "
            "Set COLLISIONS_DATA to the folder that holds MNIST/raw (offline machines: ../shared/data).")
    dataset = MNIST(root=str(root), train=train, download=download)
    images = dataset.data.unsqueeze(1).float().div_(255.0)
    return images, dataset.targets.clone()


def load_image(name_or_path: str | Path) -> Image.Image:
    """An RGB PIL image: a sample name (see ``SAMPLE_IMAGES``), a local path, or an http(s) URL."""
    key = str(name_or_path)
    if key in SAMPLE_IMAGES:
        import skimage.data

        return Image.fromarray(np.asarray(getattr(skimage.data, SAMPLE_IMAGES[key])())).convert("RGB")
    if key.startswith(("http://", "https://")):
        target = runtime.cache_dir() / "images" / Path(key.split("?")[0]).name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(key, target)  # noqa: S310 (reader-supplied URL, by design)
        return Image.open(target).convert("RGB")
    path = Path(key).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found; give an existing file, an http(s) URL, "
                                f"or a sample name: {', '.join(SAMPLE_IMAGES)}")
    return Image.open(path).convert("RGB")


def imagenet_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    """Resize (shorter side to size*256/224), centre-crop to ``size``: (1, 3, size, size) float32 in [0, 1].

    Pixels stay unnormalised so that perturbations are measured in pixel units; see ``imagenet_normalize``.
    """
    from torchvision.transforms import v2

    pipeline = v2.Compose([v2.PILToTensor(), v2.Resize(int(size * 256 / 224), antialias=True),
                           v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])
    return pipeline(image).unsqueeze(0)


def imagenet_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Standard ImageNet normalisation of (B, 3, H, W) pixels in [0, 1]."""
    mean = pixels.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std
