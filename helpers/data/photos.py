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
#: Photographs shipped by other installed packages (no download): name -> (package, path inside it).
PACKAGED_PHOTOS: dict[str, tuple[str, str]] = {
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
#: Every natural photograph available offline: the image set per-image claims run over (``colorwheel`` is
#: synthetic and left out).
NATURAL_IMAGES: tuple[str, ...] = (*(n for n in SAMPLE_IMAGES if n != "colorwheel"), *PACKAGED_PHOTOS)
#: Friendlier names accepted wherever a sample name is.
ALIASES: dict[str, str] = {"cat": "chelsea", "motorcycle": "motorcycle_left"}
#: Every name ``sample_image``/``load_image`` accept.
ALL_NAMES: tuple[str, ...] = (*SAMPLE_IMAGES, *PACKAGED_PHOTOS, *ALIASES)
#: Li et al.'s patch "dataset" for the VGG16 study: every sample image.
PATCH_SOURCES: tuple[str, ...] = SAMPLE_IMAGES


def sample_image(name: str) -> np.ndarray:
    """A scikit-image sample image (``SAMPLE_IMAGES`` or ``ALIASES``) as (H, W, 3) uint8 (grey repeated to 3)."""
    import skimage.data

    name = ALIASES.get(name, name)
    if name in PACKAGED_PHOTOS:
        return np.asarray(Image.open(packaged_photo_path(name)).convert("RGB"), dtype=np.uint8)
    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    elif name in SAMPLE_IMAGES:
        arr = getattr(skimage.data, name)()
    else:
        raise ValueError(f"unknown sample image {name!r}; valid: {', '.join(ALL_NAMES)}")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def packaged_photo_path(name: str) -> Path:
    """Where an installed package keeps the photograph ``name`` (see ``PACKAGED_PHOTOS``); nothing is imported."""
    import importlib.util

    package, inside = PACKAGED_PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"photo {name!r} needs the package {package!r}; install it (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))) / inside


def natural_image_set(size: int = 224, names: tuple[str, ...] = NATURAL_IMAGES) -> tuple[list[str], Tensor]:
    """The offline photographs as one batch: (names, (N, 3, size, size) float32 in [0, 1]), ImageNet-cropped."""
    return list(names), torch.cat([imagenet_pixels(load_image(n), size) for n in names])


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
    if key in ALL_NAMES:
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
            f"or a sample name: {', '.join(ALL_NAMES)}"
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


def photo_labels() -> dict[str, set[int]]:
    """Hand labels (``photo_labels.json``): photo name -> the ImageNet-1k class ids that count as correct."""
    import json
    from importlib import resources

    data = json.loads(resources.files("helpers.data").joinpath("photo_labels.json").read_text())
    return {name: {int(k) for k in classes} for name, classes in data["labels"].items()}
