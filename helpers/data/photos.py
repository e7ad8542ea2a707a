"""Natural images: the scikit-image samples the book uses (offline), files and URLs, ImageNet-style resizing.

Every function returns pixels (unnormalised, in [0, 1] as float or 0..255 as uint8); normalisation for a
model lives in :mod:`helpers.data.normalization`.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from helpers import runtime

#: The natural images the book uses, all shipped inside scikit-image (no download), by scikit-image's names.
SAMPLE_IMAGES: tuple[str, ...] = (
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
#: Friendlier names accepted wherever a sample name is.
ALIASES: dict[str, str] = {"cat": "chelsea", "motorcycle": "motorcycle_left"}
#: Li et al.'s patch "dataset" for the VGG16 study: every sample image.
PATCH_SOURCES: tuple[str, ...] = SAMPLE_IMAGES


def sample_image(name: str) -> np.ndarray:
    """A scikit-image sample image (``SAMPLE_IMAGES`` or ``ALIASES``) as (H, W, 3) uint8 (grey repeated to 3)."""
    import skimage.data

    name = ALIASES.get(name, name)
    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    elif name in SAMPLE_IMAGES:
        arr = getattr(skimage.data, name)()
    else:
        raise ValueError(f"unknown sample image {name!r}; valid: {', '.join((*SAMPLE_IMAGES, *ALIASES))}")
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


def load_image(name_or_path: str | Path) -> Image.Image:
    """An RGB PIL image: a sample name (``SAMPLE_IMAGES``, ``ALIASES``), a local path, or an http(s) URL."""
    key = str(name_or_path)
    if key in SAMPLE_IMAGES or key in ALIASES:
        return Image.fromarray(sample_image(key)).convert("RGB")
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
            f"or a sample name: {', '.join((*SAMPLE_IMAGES, *ALIASES))}"
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
