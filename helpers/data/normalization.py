"""Pixels and model inputs: the one place where images are normalised and un-normalised.

Two spaces
----------
* **pixel space**: images (B, C, H, W) with values in [0, 1], what a reader sees and what attack budgets
  (eps) are measured in;
* **model space**: what the first layer multiplies, ``(pixels - mean) / std`` per channel for ImageNet models
  (the identity for the book's MNIST models). A perturbation P in model space is ``P * std`` in pixels (the
  mean cancels in a difference): ``to_pixel_space`` / ``to_model_space``.

``input_normalization(loaded)`` says which (mean, std) a registry model expects; ``model_input`` /
``pixels_of`` convert images; ``PixelSpace`` / ``pixel_space`` wrap a model so that it takes pixels, and
``check_pixels`` rejects anything that is not a (B, C, H, W) tensor in [0, 1] with ``PixelInputError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _std(std: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(std, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def to_pixel_space(p: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """Model-space perturbation (..., C, H, W) -> pixel-space perturbation ``p * std`` (per channel)."""
    return p * _std(std, p)


def to_model_space(p: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """Pixel-space perturbation (..., C, H, W) -> model space ``p / std`` (per channel)."""
    return p / _std(std, p)


def imagenet_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Standard ImageNet normalisation of (B, 3, H, W) pixels in [0, 1]."""
    mean = pixels.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


class PixelInputError(ValueError):
    """Images given where pixels are expected have the wrong shape, range or type."""


def check_pixels(x: torch.Tensor, name: str = "images") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise PixelInputError(
            f"{name} must be a (B, C, H, W) tensor of pixels in [0, 1], "
            f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise PixelInputError(
            f"{name} must hold pixels in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]; "
            "pass unnormalised pixels and wrap the model with pixel_space()"
        )


def input_normalization(loaded: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) per channel that a registry model's input is normalised with; None for pixel-input models.

    ``loaded`` is a ``registry.LoadedModel``. The book's MNIST models (source "book") take pixels: None.
    Otherwise the normalisation step of the model's own preprocessing ``transform`` (timm's data config:
    (0.5, 0.5, 0.5) for ViT-B, ImageNet's for DeiT), else ImageNet's (torchvision, smp encoders).
    """
    if getattr(getattr(loaded, "spec", None), "source", None) == "book":
        return None
    transform = getattr(loaded, "transform", None)
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean = torch.as_tensor(step.mean, dtype=torch.float64).flatten().tolist()
            std = torch.as_tensor(step.std, dtype=torch.float64).flatten().tolist()
            return tuple(mean), tuple(std)
    return IMAGENET_MEAN, IMAGENET_STD


def model_input(loaded: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, C, H, W) in [0, 1] -> the model's input (normalised with ``input_normalization``)."""
    norm = input_normalization(loaded)
    if norm is None:
        return pixels
    mean, std = norm
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return to_model_space(pixels - m, std)


def pixels_of(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Model-space images (B, C, H, W) -> pixel space (unclipped); identity when mean/std are None."""
    if mean is None or std is None:
        return x
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return to_pixel_space(x, std) + m


class PixelSpace(nn.Module):
    """``model((x - mean) / std)`` for pixels x in [0, 1]; dict outputs (torchvision segmentation) and
    ``.logits`` outputs (Hugging Face style) unwrapped.

    ``mean``/``std`` are per-channel tuples or None (the model already takes pixels, e.g. the MNIST models).
    Output: logits (B, classes) or segmentation logits (B, classes, H, W).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        output_key: str = "out",
    ) -> None:
        super().__init__()
        self.model = model
        self.output_key = output_key
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.register_buffer(
            "mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) -> model input ``(pixels - mean) / std`` (unchanged without mean/std)."""
        mean, std = self.mean, self.std
        if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
            return pixels
        return (pixels - mean.to(pixels.dtype)) / std.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(self.normalize(pixels))
        if isinstance(out, dict):
            return out[self.output_key]
        return out.logits if hasattr(out, "logits") else out


def pixel_space(loaded: Any) -> PixelSpace:
    """Wrap a ``registry.LoadedModel`` (or a bare MNIST model) so that it takes pixels in [0, 1]."""
    if isinstance(loaded, nn.Module):
        return PixelSpace(loaded).eval()
    norm = input_normalization(loaded)
    device = next(loaded.model.parameters()).device
    wrapped = PixelSpace(loaded.model, *(norm or (None, None)))
    return wrapped.to(device).eval()
