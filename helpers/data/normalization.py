"""TODO docstring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _std(std: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(std, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def to_pixel_space(p: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """Model-space perturbation (..., C, H, W) -> pixel-space perturbation ``p * std`` (per channel)."""
    return p * _std(std, p)


def to_model_space(p: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """Pixel-space perturbation (..., C, H, W) -> model space ``p / std`` (per channel)."""
    return p / _std(std, p)


def input_normalization(loaded: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that a registry model's input is normalised with (ImageNet's by default).

    timm ViT-B uses (0.5, 0.5, 0.5) for both; torchvision models and DeiT use ImageNet's. The model-space
    perturbation P of this module is ``P * std`` in pixels.
    """

    transform = getattr(loaded, "transform", None)
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean = torch.as_tensor(step.mean, dtype=torch.float64).flatten().tolist()
            std = torch.as_tensor(step.std, dtype=torch.float64).flatten().tolist()
            return tuple(mean), tuple(std)
    return IMAGENET_MEAN, IMAGENET_STD


def model_input(loaded: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, C, H, W) in [0, 1] -> the model's (normalised) input, with ``input_normalization``."""
    mean, std = input_normalization(loaded)
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return to_model_space(pixels - m, std)


class PixelSpace(nn.Module):
    """``model((x - mean) / std)`` for pixels x in [0, 1]; dict outputs (torchvision segmentation) unwrapped.

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
        if self.mean is None:
            return pixels
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(self.normalize(pixels))
        return out[self.output_key] if isinstance(out, dict) else out


def normalization_of(loaded: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a registry model expects its inputs normalised with; None for pixel-input models."""

    source = loaded.spec.source
    if source == "book":
        return None
    if source == "timm":
        cfg = getattr(loaded.model, "pretrained_cfg", {}) or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return IMAGENET_MEAN, IMAGENET_STD  # torchvision and smp ImageNet encoders


def pixel_space(loaded: Any) -> PixelSpace:
    """Wrap a ``models.LoadedModel`` (or a bare MNIST model) so that it takes pixels in [0, 1]."""
    if isinstance(loaded, nn.Module):
        return PixelSpace(loaded).eval()
    norm = normalization_of(loaded)
    device = next(loaded.model.parameters()).device
    wrapped = PixelSpace(loaded.model, *(norm or (None, None)))
    return wrapped.to(device).eval()


def pixels_of(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Model-space images (B, C, H, W) -> pixel space (unclipped); identity when mean/std are None."""
    if mean is None or std is None:
        return x
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return to_pixel_space(x, std) + m


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


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
