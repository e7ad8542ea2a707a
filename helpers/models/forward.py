"""Running a model: its device, batched forward passes, the output tensor, the top-k classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def output_tensor(out: Any) -> torch.Tensor:
    """The main output tensor of a model: a tensor, ``out['out']`` (torchvision segmentation) or the first."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"] if "out" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0])
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


@torch.no_grad()
def batched(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """``model`` applied to ``images`` (N, ...) in batches of ``batch`` on the model's device; the main output
    tensors (see ``output_tensor``) concatenated on the CPU."""
    device = device_of(model)
    return torch.cat(
        [output_tensor(model(images[i : i + batch].to(device))).cpu() for i in range(0, len(images), batch)]
    )


@torch.no_grad()
def top_k(model: nn.Module, images: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (float64) and class indices of the top ``k`` classes of each image: (N, k) each.

    ``images`` (N, ...) are the model's inputs; the forward pass runs in batches on the model's device.
    """
    return batched(model, images).double().softmax(-1).topk(k, dim=-1)


def top_k_labels(probs: torch.Tensor, indices: torch.Tensor, names: Sequence[str]) -> list[list[tuple[str, float]]]:
    """``top_k``'s (N, k) output as (class name, probability) pairs per image (index as text past ``names``)."""
    return [
        [(names[i] if i < len(names) else str(i), float(p)) for p, i in zip(ps.tolist(), idx.tolist())]
        for ps, idx in zip(probs, indices)
    ]


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (the book's models live on one device)."""
    return next(module.parameters()).device


def labelled_accuracy(loaded: Any, k: int = 5, size: int = 224) -> dict[str, Any]:
    """Top-1 and top-``k`` hits of a registry ImageNet classifier on the hand-labelled offline photos
    (``photos.photo_labels``): {"top1": Rate, f"top{k}": Rate, "predictions": {photo: top-1 class name}}."""
    from helpers import stats
    from helpers.data import normalization, photos

    labels = photos.photo_labels()
    names, pixels = photos.natural_image_set(size, tuple(labels))
    with torch.no_grad():
        logits = output_tensor(loaded.model(normalization.model_input(loaded, pixels.to(device_of(loaded.model)))))
    top = logits.topk(k, dim=1).indices.cpu()
    hits1 = [int(t[0]) in labels[n] for n, t in zip(names, top)]
    hitsk = [bool(labels[n] & set(t.tolist())) for n, t in zip(names, top)]
    classes = loaded.class_names
    return {
        "top1": stats.Rate.of(hits1),
        f"top{k}": stats.Rate.of(hitsk),
        "predictions": {n: classes[int(t[0])] if classes else int(t[0]) for n, t in zip(names, top)},
    }
