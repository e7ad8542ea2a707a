"""The book's figure style, and showing a figure on the page (with its caption) while saving it to ``figures/``."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from helpers import runtime
from helpers.book import page

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


#: The widest figure (inches) that the book's output column (about 660 px at a 1280-px window) shows at half its
#: 130-dpi pixel width or more, so that 7-pt text stays about 6 px high or more (the reader's test checks this).
MAX_WIDTH_IN = 9.5


def use_book_style() -> None:
    plt.rcParams.update(STYLE)  # type: ignore[arg-type]


def savefig(fig: plt.Figure, name: str) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` (130 dpi, tight box) and return the path."""
    path = runtime.figures_dir() / f"{name}.png"
    return runtime.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


def figure_html(png: bytes, name: str, caption: str) -> str:
    """An HTML ``<figure id="fig-<name>">`` with the PNG inline and ``caption`` as its ``<figcaption>``.

    Inline, so the page needs no file beside it (Colab, the rendered book, an exported notebook alike).
    """
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure class="collisions-figure" id="fig-{html.escape(name)}">'
        f'<img src="data:image/png;base64,{data}" alt="{html.escape(caption or name)}" '
        'style="max-width:100%;height:auto"/>'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def show_figure(fig: plt.Figure, name: str, caption: str) -> Path:
    """Save ``fig`` to ``figures/<name>.png``, show it on the page with ``caption`` under it, and close it.

    A figure wider than ``MAX_WIDTH_IN`` is narrowed to it first (so its text stays readable in the column).
    Closing keeps an inline backend (Colab) from drawing the same figure a second time.
    """
    width, height = fig.get_size_inches()
    if width > MAX_WIDTH_IN:  # shrink the canvas, not the text: fonts keep their size in points
        fig.set_size_inches(MAX_WIDTH_IN, height * MAX_WIDTH_IN / width)
        fig.tight_layout()
    path = savefig(fig, name)
    plt.close(fig)
    page.show_html(figure_html(path.read_bytes(), name, caption), f"{name}.png: {caption}")
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


def image_grid(
    images: Sequence[torch.Tensor | np.ndarray],
    titles: Sequence[str] = (),
    ncols: int = 4,
    size: float = 2.4,
    rescale_each: bool = False,
    cmap: str = "gray",
) -> plt.Figure:
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
