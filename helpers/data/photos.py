"""Data: MNIST through torchvision, sample natural images shipped with scikit-image, ImageNet preprocessing.

MNIST's root comes from the ``COLLISIONS_DATA`` environment variable (the folder holding ``MNIST/raw``);
offline builds set it to ``../shared/data``. Without it, ``~/.cache/collisions-book/data`` is used and
torchvision downloads MNIST there when a network is available.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    pass
import urllib.request
from pathlib import Path

from PIL import Image

from helpers import runtime

#: scikit-image sample images used as the patch "dataset" and for the image-to-image distance (no download).
PATCH_SOURCES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "clock",
    "coins",
    "motorcycle_left",
    "motorcycle_right",
)


def sample_image(name: str) -> np.ndarray:
    """A scikit-image sample image as (H, W, 3) uint8 (grey images repeated to 3 channels)."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    elif name in PATCH_SOURCES:
        arr = getattr(skimage.data, name)()
    else:
        raise ValueError(f"unknown sample image {name!r}; valid: {', '.join(PATCH_SOURCES)}")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def resized_pixels(arr: np.ndarray, shorter: int) -> Tensor:
    """(H, W, 3) uint8 -> (3, H', W') uint8 with the shorter side resized to ``shorter`` (antialiased)."""
    from torchvision.transforms import v2

    return v2.Resize(shorter, antialias=True)(torch.from_numpy(arr).permute(2, 0, 1).contiguous())


def sample_pixels(name: str, size: int = 224) -> Tensor:
    """A scikit-image sample image (see ``PATCH_SOURCES``) preprocessed like ImageNet: (3, size, size) in [0, 1]."""
    from PIL import Image

    return imagenet_pixels(Image.fromarray(sample_image(name)), size)[0]


#: Natural images shipped inside scikit-image (no download needed), name -> skimage.data function.
SAMPLE_IMAGES: dict[str, str] = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "motorcycle": "stereo_motorcycle",
}


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
        raise FileNotFoundError(
            f"image {str(path)!r} not found; give an existing file, an http(s) URL, "
            f"or a sample name: {', '.join(SAMPLE_IMAGES)}"
        )
    return Image.open(path).convert("RGB")


def imagenet_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    """Resize (shorter side to size*256/224), centre-crop to ``size``: (1, 3, size, size) float32 in [0, 1].

    Pixels stay unnormalised so that perturbations are measured in pixel units; see ``imagenet_normalize``.
    """
    from torchvision.transforms import v2

    pipeline = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(int(size * 256 / 224), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    return pipeline(image).unsqueeze(0)
