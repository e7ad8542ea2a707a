"""How a collision is shown: figures (images side by side, spectra, beta grids) and the rows of its tables.

Inputs are in model space (see :mod:`helpers.data.normalization`); ``mean``/``std`` convert to pixels for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from helpers.book import plotting
from helpers.data.normalization import pixels_of
from helpers.experiments import collisions
from helpers.linalg import conv_operator
from helpers.models.forward import top_k
from helpers.models.segmentation import mask_iou


def classification_figure(
    images: Sequence[torch.Tensor],
    titles: Sequence[str],
    model: nn.Module,
    class_names: Sequence[str],
    k: int = 6,
    gain: float = 10.0,
    reference: torch.Tensor | None = None,
) -> Any:
    """Fig. 3 (classification) style: each image with its top-``k`` predictions below, and (if ``reference``)
    a row of the perturbations image - reference amplified by ``gain`` around gray."""
    import matplotlib.pyplot as plt

    from helpers.book import plotting

    rows = 3 if reference is not None else 2
    fig, axes = plt.subplots(rows, len(images), figsize=(2.2 * len(images), 2.2 * rows), squeeze=False)
    probs, idx = top_k(model, torch.cat(list(images)), k)
    for j, (img, title) in enumerate(zip(images, titles)):
        axes[0, j].imshow(plotting.to_image(img).clip(0, 1), cmap="gray" if img.shape[1] == 1 else None)
        axes[0, j].set_title(title, fontsize=8)
        axes[0, j].axis("off")
        names = [str(class_names[i])[:18] if class_names else str(int(i)) for i in idx[j]]
        axes[1, j].barh(range(k)[::-1], probs[j].numpy(), color="#9ecae1")
        for y, name in zip(range(k)[::-1], names):  # names inside the panel: tick labels would squeeze the images
            axes[1, j].text(0.02, y, name, transform=axes[1, j].get_yaxis_transform(), va="center", fontsize=7)
        axes[1, j].set_yticks([])
        axes[1, j].set_xlim(0, max(1e-3, 1.1 * float(probs.max())))  # random weights: near-uniform
        axes[1, j].tick_params(axis="x", labelsize=7)
        if reference is not None:
            diff = (img - reference).cpu() * gain + 0.5
            axes[2, j].imshow(plotting.to_image(diff).clip(0, 1), cmap="gray" if img.shape[1] == 1 else None)
            axes[2, j].set_title(f"(image - clean) x {gain:g} + 0.5", fontsize=7)
            axes[2, j].axis("off")
    fig.tight_layout()
    return fig


def segmentation_figure(
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    titles: Sequence[str],
    target: torch.Tensor | None = None,
) -> Any:
    """Fig. 3 (segmentation) style: images on top, predicted masks below (IoU with ``target`` in the titles)."""
    import matplotlib.pyplot as plt

    from helpers.book import plotting

    cols = len(images) + (target is not None)
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols, 4.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (img, mask, title) in enumerate(zip(images, masks, titles)):
        axes[0, j].imshow(plotting.to_image(img).clip(0, 1), cmap="gray" if img.shape[1] == 1 else None)
        axes[0, j].set_title(title, fontsize=8)
        axes[1, j].imshow(mask.cpu().numpy(), cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        if target is not None:
            axes[1, j].set_title(f"IoU with target {mask_iou(mask.cpu(), target.cpu()):.3f}", fontsize=8)
    if target is not None:
        axes[1, -1].imshow(target.cpu().numpy(), cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        axes[1, -1].set_title("target mask", fontsize=8)
    fig.tight_layout()
    return fig


def collision_figure(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    titles: Sequence[str],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> plt.Figure:
    """Original | perturbation (stretched) | colliding image (clipped to [0, 1] for display only)."""
    px, px_hat = pixels_of(x, mean, std)[0].cpu(), pixels_of(x_hat, mean, std)[0].cpu()
    p = px_hat - px
    stretched = (p - p.min()) / (p.max() - p.min()).clamp_min(1e-30)
    return plotting.image_grid([px, stretched, px_hat], titles, ncols=3, size=3.0)


def residual_table(
    results: dict[str, dict[str, Any]],
    keys: Sequence[str] = ("first_layer_rel", "output_rel", "same_argmax", "input_rel"),
) -> list[dict[str, Any]]:
    """Rows for ``page.table``: one per construction/model (``case``), one column per residual key."""
    return [{"case": name, **{k: res[k] for k in keys}} for name, res in results.items()]


def top_k_table(columns: dict[str, list[tuple[str, float]]]) -> list[dict[str, Any]]:
    """Rows for ``page.table``: one per rank, one column per image with 'class (probability)'."""
    depth = len(next(iter(columns.values())))
    return [
        {"rank": r + 1, **{h: f"{top[r][0]} ({top[r][1]:.3g})" for h, top in columns.items()}} for r in range(depth)
    ]


def spectrum_figure(
    spectrum: conv_operator.PolyphaseSpectrum, boundary_gains: torch.Tensor | None = None
) -> plt.Figure:
    """Left: smallest singular value per output-grid frequency; right: histogram of all singular values."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    smin = torch.fft.fftshift(spectrum.smallest()).numpy() / spectrum.sigma_max
    im = a.imshow(smin, cmap="viridis", extent=(-np.pi, np.pi, np.pi, -np.pi))
    a.set_title("sigma_min(M(omega)) / sigma_max, per frequency")
    a.set_xlabel("omega_2 (output grid)")
    a.set_ylabel("omega_1")
    a.grid(False)
    fig.colorbar(im, ax=a, fraction=0.046)
    b.hist(spectrum.singular.flatten().numpy() / spectrum.sigma_max, bins=80, color="0.4")
    if boundary_gains is not None:
        for g in boundary_gains.tolist():
            b.axvline(g / spectrum.sigma_max, color="tab:red", lw=0.8)
    b.set_xlabel("singular value / sigma_max (red: corner modes, zero padding)")
    b.set_ylabel("count")
    b.set_title("whole-image operator: bulk spectrum")
    fig.tight_layout()
    return fig


def beta_grid(
    x: torch.Tensor,
    layer: nn.Module,
    vectors: torch.Tensor,
    betas: Sequence[float],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    region: Any = None,
    cmap: str = "gray",
) -> plt.Figure:
    """The static stand-in for the explorer: rows = basis vectors, columns = betas (pixels clipped)."""
    images, titles = [], []
    for i, phi in enumerate(vectors):
        for beta in betas:
            x_hat = collisions.null_space_search(x, layer, phi, beta, region)
            images.append(pixels_of(x_hat, mean, std)[0].cpu())
            titles.append(f"phi_{i}, beta={beta:g}")
    return plotting.image_grid(images, titles, ncols=len(betas), size=2.0, cmap=cmap)


def window_leak_figure(window_residual: torch.Tensor) -> plt.Figure:
    """Heat map of ``||W1 window|| / (||W1|| ||window||)`` per output position, (H', W') -> one panel."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(window_residual.numpy(), cmap="magma")
    ax.set_title("||W1 window|| / (||W1|| ||window||) per output position")
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def mask_comparison_figure(masks: torch.Tensor, titles: Sequence[str]) -> plt.Figure:
    """Predicted segmentation masks (N, H, W) class indices (< 20 shown distinctly), side by side with titles."""
    fig, axes = plt.subplots(1, len(masks), figsize=(3 * len(masks), 3.2))
    for ax, m, t in zip(np.atleast_1d(axes), masks, titles):
        ax.imshow(np.asarray(m), cmap="tab20", vmin=0, vmax=20)
        ax.set_title(t)
        ax.axis("off")
    return fig
