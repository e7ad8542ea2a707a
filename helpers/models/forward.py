"""TODO docstring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    pass


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
    """``model`` applied to ``images`` in batches (to bound memory), outputs concatenated."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


@torch.no_grad()
def top_k(model: nn.Module, images: torch.Tensor, k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and class indices of the top ``k`` for each image, (N, k) each."""
    return batched(model, images).softmax(1).topk(k, dim=1)


@torch.no_grad()
def topk(model: nn.Module, x: torch.Tensor, names: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, softmax probability) for each image of a batch x (B, ...) in model space."""
    probs = output_tensor(model(x)).double().softmax(-1)
    top = probs.topk(k, dim=-1)
    return [
        [(names[i] if i < len(names) else str(i), float(p)) for p, i in zip(ps.tolist(), idx.tolist())]
        for ps, idx in zip(top.values, top.indices)
    ]


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
