"""Natural images: the scikit-image samples the book uses (offline), files and URLs, ImageNet-style resizing.

Every function returns pixels (unnormalised, in [0, 1] as float or 0..255 as uint8); normalisation for a
model lives in :mod:`helpers.data.normalization`.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import re
import struct
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
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


#: What an image argument may be, for error messages.
IMAGE_CHOICES = "an image file (PNG, JPEG, BMP, GIF, TIFF, WebP), an http(s) URL, or a sample name"
#: Seconds a download may stall before it is abandoned; the largest download accepted (bytes).
DOWNLOAD_TIMEOUT_S, DOWNLOAD_MAX_BYTES = 30.0, 200_000_000


def load_image(name_or_path: str | Path) -> Image.Image:
    """An RGB PIL image: a sample name (``SAMPLE_IMAGES``, ``ALIASES``), a local path, or an http(s) URL.

    A URL is downloaded once into ``<cache>/images`` (:func:`url_cache_path`). A missing file raises
    ``FileNotFoundError``; an empty, foreign, truncated or oversized file, or a URL that cannot be had, raises a
    one-line ``ValueError`` that says what is wrong and what is valid.
    """
    key = str(name_or_path)
    if key in ALL_NAMES:
        return Image.fromarray(sample_image(key)).convert("RGB")
    if key.startswith(("http://", "https://")):
        return _url_image(key)
    path = Path(key).expanduser()
    if path.is_dir():
        raise ValueError(f"image {str(path)!r} is a folder; valid: {IMAGE_CHOICES}")
    if not path.is_file():
        raise FileNotFoundError(
            f"image {str(path)!r} not found; give an existing file, an http(s) URL, "
            f"or a sample name: {', '.join(ALL_NAMES)}"
        )
    return decode_image(path.read_bytes(), str(path))


def decode_image(data: bytes, label: str) -> Image.Image:
    """Decode the bytes of an image file completely into an RGB PIL image.

    Raises a one-line ``ValueError`` naming ``label`` when ``data`` is empty, is not an image, is truncated or
    damaged, or is larger than PIL's decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS`` pixels).
    """
    if not data:
        raise ValueError(f"image {label!r} is empty (0 bytes); valid: {IMAGE_CHOICES}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError:
        width, height = _declared_size(data)
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise ValueError(
            f"image {label!r} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels), over PIL's "
            f"decompression-bomb limit of {limit:.0f} megapixels; valid: a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(
            f"image {label!r} is not an image PIL can read ({len(data)} bytes); valid: {IMAGE_CHOICES}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error) as err:
        why = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"image {label!r} is truncated or damaged ({why}); valid: a complete image file") from None


def _declared_size(data: bytes) -> tuple[int, int]:
    """The width and height an image file's header declares, read without the decompression-bomb check."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only to read the header of a file already refused
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def url_cache_path(url: str) -> Path:
    """Where the download of ``url`` is cached: named by the SHA-256 of the whole URL (two ``.../cat.png`` URLs
    never share a file), followed by the URL's file name for the reader."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:32]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlsplit(url).path).name)[-60:] or "image"
    return runtime.cache_dir() / "images" / f"{digest}-{name}"


def _url_image(url: str) -> Image.Image:
    """The image at ``url``: from the cache when the cached file decodes (else it is discarded), otherwise
    downloaded, checked whole (Content-Length) and decoded, and only then written to the cache atomically."""
    target = url_cache_path(url)
    if target.exists():
        try:
            return decode_image(target.read_bytes(), url)
        except ValueError as err:
            runtime.discard_cache(target, f"cached download does not decode ({str(err).split('; valid')[0]})")
    if runtime.offline_forced():
        raise ValueError(
            f"image URL {url!r} is not cached and the book is offline (--offline or COLLISIONS_OFFLINE=1); "
            f"valid: a local file or a sample name: {', '.join(ALL_NAMES)}"
        )
    data = _download(url)
    image = decode_image(data, url)
    runtime.write_atomically(target, lambda tmp: tmp.write_bytes(data))
    return image


def _download(url: str) -> bytes:
    """The body of ``url``; a one-line ``ValueError`` when it cannot be had or arrives cut short."""
    request = urllib.request.Request(url, headers={"User-Agent": "collisions-book"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 (by design)
            expected = response.headers.get("Content-Length")
            data = response.read(DOWNLOAD_MAX_BYTES + 1)
    except http.client.IncompleteRead as err:
        got, missing = len(err.partial), err.expected
        raise ValueError(
            f"download of {url!r} cut short ({got} bytes, {got + missing if missing else '?'} announced); try again"
        ) from None
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts, refused connections
        reason = f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else err
        reason = getattr(reason, "reason", None) or reason
        raise ValueError(
            f"cannot download image {url!r} ({' '.join(str(reason).split())}); offline? "
            f"valid: a reachable URL, a local file or a sample name: {', '.join(ALL_NAMES)}"
        ) from None
    if len(data) > DOWNLOAD_MAX_BYTES:
        raise ValueError(f"image {url!r} is larger than {DOWNLOAD_MAX_BYTES} bytes; valid: a smaller image")
    if expected is not None and expected.isdigit() and int(expected) != len(data):
        raise ValueError(f"download of {url!r} cut short ({len(data)} bytes, {expected} announced); try again")
    return data


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
