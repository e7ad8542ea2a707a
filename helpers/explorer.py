"""Figures, tables and the interactive explorer of the null-space chapters (02-05).

Inputs are in model space (see ``helpers.nullspace``); ``std`` converts to pixel space for display.
"""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from . import nullspace as ns
from . import plotting


@torch.no_grad()
def topk(model: nn.Module, x: torch.Tensor, names: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, softmax probability) for each image of a batch x (B, ...) in model space."""
    probs = ns.output_tensor(model(x)).double().softmax(-1)
    top = probs.topk(k, dim=-1)
    return [[(names[i] if i < len(names) else str(i), float(p)) for p, i in zip(ps.tolist(), idx.tolist())]
            for ps, idx in zip(top.values, top.indices)]


def topk_markdown(rows: dict[str, list[tuple[str, float]]]) -> str:
    """A markdown table with one column per image: 'class (p)' for each rank."""
    heads = list(rows)
    lines = ["| rank | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for r in range(len(next(iter(rows.values())))):
        lines.append(f"| {r + 1} | " + " | ".join(f"{rows[h][r][0]} ({rows[h][r][1]:.3g})" for h in heads) + " |")
    return "\n".join(lines)


def pixels_of(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Model-space images (B, C, H, W) -> pixel space (unclipped); identity when mean/std are None."""
    if mean is None or std is None:
        return x
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ns.to_pixel_space(x, std) + m


def collision_figure(x: torch.Tensor, x_hat: torch.Tensor, titles: Sequence[str], *,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> plt.Figure:
    """Original | perturbation (stretched) | colliding image (clipped to [0, 1] for display only)."""
    px, px_hat = pixels_of(x, mean, std)[0].cpu(), pixels_of(x_hat, mean, std)[0].cpu()
    p = px_hat - px
    stretched = (p - p.min()) / (p.max() - p.min()).clamp_min(1e-30)
    return plotting.image_grid([px, stretched, px_hat], titles, ncols=3, size=3.0)


def residual_rows(results: dict[str, dict[str, Any]], keys: Sequence[str] = (
        "first_layer_rel", "output_rel", "same_argmax", "input_rel")) -> str:
    """A markdown table: one row per construction/model, one column per residual key."""
    lines = ["| case | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, res in results.items():
        cells = [f"{res[k]:.3g}" if isinstance(res[k], float) else str(res[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spectrum_figure(spectrum: ns.PolyphaseSpectrum, boundary_gains: torch.Tensor | None = None) -> plt.Figure:
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


def beta_grid(x: torch.Tensor, layer: nn.Module, vectors: torch.Tensor, betas: Sequence[float], *,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              region: Any = None, cmap: str = "gray") -> plt.Figure:
    """The static stand-in for the explorer: rows = basis vectors, columns = betas (pixels clipped)."""
    images, titles = [], []
    for i, phi in enumerate(vectors):
        for beta in betas:
            x_hat = ns.null_space_search(x, layer, phi, beta, region)
            images.append(pixels_of(x_hat, mean, std)[0].cpu())
            titles.append(f"phi_{i}, beta={beta:g}")
    return plotting.image_grid(images, titles, ncols=len(betas), size=2.0, cmap=cmap)


def interactive(model: nn.Module, x: torch.Tensor, layer: nn.Module, basis: ns.KernelBasis,
                names: Sequence[str], *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, max_beta: float = 20.0) -> Any:
    """An ipywidgets explorer (beta, basis vector, region box in tiles); returns the widget (Jupyter/Colab)."""
    import ipywidgets as widgets
    from IPython.display import clear_output

    grid = ns.patch_grid(layer, x.shape[1:]) if isinstance(layer, nn.Conv2d) else None
    beta = widgets.FloatSlider(value=2.0, min=-max_beta, max=max_beta, step=0.5, description="beta")
    index = widgets.IntSlider(value=0, min=0, max=basis.vectors.shape[0] - 1, description="phi index")
    rows = widgets.IntRangeSlider(value=(0, grid[0]) if grid else (0, 1), min=0, max=grid[0] if grid else 1,
                                  description="tile rows", disabled=grid is None)
    cols = widgets.IntRangeSlider(value=(0, grid[1]) if grid else (0, 1), min=0, max=grid[1] if grid else 1,
                                  description="tile cols", disabled=grid is None)
    out = widgets.Output()

    def redraw(*_: Any) -> None:
        region = (rows.value[0], cols.value[0], rows.value[1], cols.value[1]) if grid else None
        x_hat = ns.null_space_search(x, layer, basis.vectors[index.value], beta.value, region)
        res = ns.collision_residuals(model, x, x_hat, layer)
        top = topk(model, torch.cat([x, x_hat]), names)
        with out:
            clear_output(wait=True)
            fig = collision_figure(x, x_hat, ["original", "perturbation", "colliding"], mean=mean, std=std)
            plt.show()
            print(f"first-layer rel change {res['first_layer_rel']:.2e}, output rel change {res['output_rel']:.2e}")
            print(topk_markdown({"original": top[0], "colliding": top[1]}))
            plt.close(fig)

    for w in (beta, index, rows, cols):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([beta, index]), widgets.HBox([rows, cols]), out])
