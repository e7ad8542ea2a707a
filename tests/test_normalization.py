"""Pixels <-> model input (helpers.data.normalization) and the sample images (helpers.data.photos)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from helpers.data import normalization, photos


def _loaded(source: str, transform: object = None) -> SimpleNamespace:
    return SimpleNamespace(spec=SimpleNamespace(source=source), transform=transform, model=nn.Conv2d(3, 2, 1))


def test_book_models_take_pixels() -> None:
    loaded = _loaded("book")
    pixels = torch.rand(2, 3, 4, 4)
    assert normalization.input_normalization(loaded) is None
    assert torch.equal(normalization.model_input(loaded, pixels), pixels)
    assert normalization.pixel_space(loaded).mean is None


def test_normalisation_comes_from_the_models_transform() -> None:
    step = SimpleNamespace(mean=torch.tensor([0.5, 0.5, 0.5]), std=torch.tensor([0.5, 0.5, 0.5]))
    loaded = _loaded("timm", SimpleNamespace(transforms=[object(), step]))
    assert normalization.input_normalization(loaded) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalization.input_normalization(_loaded("torchvision")) == (
        normalization.IMAGENET_MEAN,
        normalization.IMAGENET_STD,
    )
    pixels = torch.rand(1, 3, 4, 4)
    x = normalization.model_input(loaded, pixels)
    assert torch.allclose(x, (pixels - 0.5) / 0.5)
    assert torch.allclose(normalization.pixels_of(x, (0.5,) * 3, (0.5,) * 3), pixels)
    wrapped = normalization.pixel_space(loaded)
    assert torch.allclose(wrapped.normalize(pixels), x)


def test_pixel_and_model_space_perturbations_are_inverse() -> None:
    p = torch.randn(3, 5, 5, dtype=torch.float64)
    std = (0.2, 0.3, 0.4)
    assert torch.allclose(normalization.to_model_space(normalization.to_pixel_space(p, std), std), p)


@pytest.mark.parametrize(
    "bad, message",
    [(torch.rand(3, 4, 4), "(B, C, H, W)"), (torch.rand(1, 3, 4, 4) + 1.5, "[0, 1]"), ([[0.5]], "(B, C, H, W)")],
)
def test_check_pixels_rejects_what_is_not_an_image(bad: object, message: str) -> None:
    with pytest.raises(
        normalization.PixelInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        normalization.check_pixels(bad)  # type: ignore[arg-type]


def test_pixel_space_rejects_half_a_normalisation() -> None:
    with pytest.raises(ValueError, match="both mean and std"):
        normalization.PixelSpace(nn.Identity(), mean=(0.5,))


def test_sample_images_and_aliases_are_one_table() -> None:
    cat = photos.sample_image("cat")
    assert cat.dtype == np.uint8 and cat.shape[-1] == 3
    assert np.array_equal(cat, photos.sample_image("chelsea"))
    assert np.array_equal(np.asarray(photos.load_image("cat")), cat)
    assert photos.sample_image("motorcycle").shape[-1] == 3
    with pytest.raises(ValueError, match="valid: astronaut"):
        photos.sample_image("dog")
