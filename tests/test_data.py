"""Data loaders: MNIST from COLLISIONS_DATA, sample and user images, preprocessing."""

from __future__ import annotations

import pytest
import torch

from helpers import runtime
from helpers.data import mnist_data, normalization, photos

from .conftest import needs_mnist


@needs_mnist
def test_mnist_loads_from_the_data_root() -> None:
    images, labels = mnist_data.load(train=False)
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.shape == (10_000,) and set(labels.unique().tolist()) == set(range(10))


def test_mnist_missing_root_offline_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("COLLISIONS_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("COLLISIONS_OFFLINE", "1")
    runtime.network_available.cache_clear()
    mnist_data.load.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="COLLISIONS_DATA"):
            mnist_data.load(train=False)
    finally:
        mnist_data.load.cache_clear()
        runtime.network_available.cache_clear()


def test_sample_image_and_preprocessing() -> None:
    image = photos.load_image("astronaut")
    pixels = photos.imagenet_pixels(image)
    assert pixels.shape == (1, 3, 224, 224) and 0.0 <= pixels.min() and pixels.max() <= 1.0
    normalised = normalization.imagenet_normalize(pixels)
    assert normalised.shape == pixels.shape and normalised.min() < 0


def test_missing_image_names_the_path(tmp_path) -> None:
    missing = tmp_path / "no_such.png"
    with pytest.raises(FileNotFoundError, match="no_such.png.*astronaut"):
        photos.load_image(missing)


def test_user_image_path(tmp_path) -> None:
    path = tmp_path / "cat.png"
    photos.load_image("cat").save(path)
    assert photos.load_image(path).size == photos.load_image("cat").size
