"""The book's figure style and savers."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import runtime

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "savefig.bbox": "tight",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 10,
    "axes.titlesize": 10,
}


def use_book_style() -> None:
    plt.rcParams.update(STYLE)


def savefig(fig: plt.Figure, name: str, caption: str = "") -> Path:
    """Save ``fig`` as ``figures/<name>.png`` (the caption, if any, is set as the figure's suptitle footer)."""
    if caption:
        fig.text(0.5, -0.02, caption, ha="center", va="top", fontsize=8, wrap=True, style="italic")
    path = runtime.figures_dir() / f"{name}.png"
    fig.savefig(path)
    return path


def to_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) or (1, C, H, W) or (H, W) tensor -> (H, W, C) or (H, W) float array for imshow."""
    arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)
    arr = arr.squeeze(0) if arr.ndim == 4 else arr
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
        arr = arr.squeeze(-1) if arr.shape[-1] == 1 else arr
    return arr


def rescale(arr: np.ndarray) -> np.ndarray:
    """Map an array linearly to [0, 1] (for showing perturbations, whose range is arbitrary)."""
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def image_grid(images: Sequence[torch.Tensor | np.ndarray], titles: Sequence[str] = (), ncols: int = 4,
               size: float = 2.4, rescale_each: bool = False, cmap: str = "gray") -> plt.Figure:
    """A grid of images; pixel images in [0, 1] are clipped, ``rescale_each`` stretches each to [0, 1]."""
    nrows = (len(images) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, list(titles) + [""] * len(images)):
        arr = to_image(img)
        arr = rescale(arr) if rescale_each else np.clip(arr, 0, 1)
        ax.imshow(arr, cmap=cmap if arr.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
