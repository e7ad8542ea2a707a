"""Explanation maps through captum (Grad-CAM, Integrated Gradients, plain gradients) and how far two differ.

Ozbulak et al. (Sec. 5) argue that images with colliding features get the same explanation. What the
maths says, and what the chapter measures:

* gradients of the output with respect to the input, and Grad-CAM at any layer, only depend on the
  activations, which collide exactly: the maps agree to float round-off;
* Integrated Gradients multiplies the path-integrated gradient by (x - baseline). Along the path
  baseline + a (x_hat - baseline) the activations still collide (the kernel is a linear subspace), so the
  integrated gradient is the same, but the attribution differs by ``P * integrated gradient``; only its
  total (completeness: f(x) - f(baseline)) is the same.

All maps here: images (N, C, H, W) in the model's input space, targets (N,) class indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def _targets(target: int | torch.Tensor, n: int) -> torch.Tensor:
    t = torch.as_tensor(target).long().flatten()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target must be one class index or one per image ({n}), got {t.numel()}")
    return t


def gradcam(
    model: nn.Module, images: torch.Tensor, target: int | torch.Tensor, layer: nn.Module, upsample: bool = True
) -> torch.Tensor:
    """Grad-CAM (captum ``LayerGradCam``) at ``layer``, ReLU'd as in Selvaraju et al.

    Returns (N, H, W) (upsampled bilinearly to the input size when ``upsample``), else (N, h, w) at the
    layer's resolution. ``layer`` must output (N, channels, h, w).
    """
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, layer).attribute(
        images, target=_targets(target, len(images)).to(images.device), relu_attributions=True
    )
    if upsample:
        cam = LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode="bilinear")
    return cam[:, 0].detach()


def integrated_gradients(
    model: nn.Module,
    images: torch.Tensor,
    target: int | torch.Tensor,
    baseline: torch.Tensor | float = 0.0,
    n_steps: int = 32,
) -> torch.Tensor:
    """Integrated Gradients (captum), (N, C, H, W), with a constant or tensor baseline (default black)."""
    from captum.attr import IntegratedGradients

    return (
        IntegratedGradients(model)
        .attribute(images, baselines=baseline, n_steps=n_steps, target=_targets(target, len(images)).to(images.device))
        .detach()
    )


def saliency(model: nn.Module, images: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """The plain input gradient of the target logit (captum ``Saliency``, signed), (N, C, H, W)."""
    from captum.attr import Saliency

    images = images.detach().clone().requires_grad_(True)
    return Saliency(model).attribute(images, target=_targets(target, len(images)).to(images.device), abs=False).detach()


def map_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far two explanation maps are: max |a - b|, that relative to max |a|, and the relative l2 distance."""
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a - b).double()
    scale = a.double().abs().max().clamp_min(1e-300)
    return {
        "max_abs": float(diff.abs().max()),
        "max_rel": float(diff.abs().max() / scale),
        "l2_rel": float(diff.norm() / a.double().norm().clamp_min(1e-300)),
    }


def explain_pair(
    model: nn.Module,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    target: int,
    layer: nn.Module | None = None,
    n_steps: int = 32,
) -> dict[str, Any]:
    """Grad-CAM (if ``layer``), Integrated Gradients and gradients for a pair (1, C, H, W) each; returns the
    maps {"gradcam": (2, H, W), "ig": (2, C, H, W), "saliency": (2, C, H, W)} and their differences."""
    both = torch.cat([x, x_hat])
    maps = {"ig": integrated_gradients(model, both, target, n_steps=n_steps), "saliency": saliency(model, both, target)}
    if layer is not None:
        maps["gradcam"] = gradcam(model, both, target, layer)
    return {"maps": maps, "differences": {k: map_difference(v[0], v[1]) for k, v in maps.items()}}


def pair_figure(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    titles: tuple[str, str] = ("clean", "colliding"),
    differences: dict[str, dict[str, float]] | None = None,
) -> Any:
    """Rows: the two images (rescaled for display if outside [0, 1]) and their maps (Grad-CAM, IG, gradients;
    channel-summed), each map pair on a shared colour scale; titles carry max |difference| when given."""
    import matplotlib.pyplot as plt

    from helpers.book import plotting

    kinds = [k for k in ("gradcam", "ig", "saliency") if k in maps]
    names = {"gradcam": "Grad-CAM", "ig": "Integrated Gradients", "saliency": "gradient"}
    fig, axes = plt.subplots(2, 1 + len(kinds), figsize=(2.6 * (1 + len(kinds)), 5.4), squeeze=False)
    for row in range(2):
        img = plotting.to_image(images[row])
        outside = img.min() < 0 or img.max() > 1
        axes[row, 0].imshow(plotting.rescale(img) if outside else img, cmap="gray")
        axes[row, 0].set_title(titles[row] + (" (rescaled)" if outside else ""), fontsize=8)
        for col, kind in enumerate(kinds, start=1):
            m = maps[kind]
            m = m.sum(1) if m.dim() == 4 else m
            scale = float(m.abs().max()) or 1.0
            cmap = "jet" if kind == "gradcam" else "bwr"
            vmin = 0 if kind == "gradcam" else -scale
            axes[row, col].imshow(m[row].cpu().numpy(), cmap=cmap, vmin=vmin, vmax=scale)
            title = names[kind]
            if row == 1 and differences is not None:
                title += f"\nmax |diff| / max = {differences[kind]['max_rel']:.1e}"
            axes[row, col].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes (alphas in (0, 1)) and weights (summing to 1) of an n-point rule on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (1 + x), 0.5 * w


def path_gradient(
    model: nn.Module, image: torch.Tensor, target: int, baseline: float = 0.0, n_steps: int = 32
) -> torch.Tensor:
    """The path-integrated gradient G with IG = (x - baseline) * G, image (1, C, H, W) -> (1, C, H, W).

    The quadrature is Gauss-Legendre on [0, 1] with ``n_steps`` nodes: the nodes and weights captum's
    ``IntegratedGradients`` uses by default (``method="gausslegendre"``), computed with numpy here because
    captum keeps them in a private module (tests/test_explain_similarity.py checks the two agree).
    """
    nodes, weights = gauss_legendre(n_steps)
    a = torch.tensor(nodes, dtype=image.dtype, device=image.device).view(-1, 1, 1, 1)
    w = torch.tensor(weights, dtype=image.dtype, device=image.device).view(-1, 1, 1, 1)
    path = baseline + a * (image - baseline)
    return (saliency(model, path, target) * w).sum(0, keepdim=True)
