"""The interactive null-space explorer (ipywidgets): move beta, the kernel vector and the region, watch the
first layer's output stay put. Inputs are in model space (see :mod:`helpers.data.normalization`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from helpers.book import page
from helpers.experiments import collisions
from helpers.experiments.collision_figures import collision_figure, top_k_table
from helpers.linalg import kernels
from helpers.models.forward import top_k, top_k_labels


def interactive(
    model: nn.Module,
    x: torch.Tensor,
    layer: nn.Module,
    basis: kernels.KernelBasis,
    names: Sequence[str],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_beta: float = 20.0,
) -> Any:
    """An ipywidgets explorer (beta, basis vector, region box in tiles); returns the widget (Jupyter/Colab)."""
    import ipywidgets as widgets
    from IPython.display import clear_output

    grid = collisions.patch_grid(layer, x.shape[1:]) if isinstance(layer, nn.Conv2d) else None
    beta = widgets.FloatSlider(value=2.0, min=-max_beta, max=max_beta, step=0.5, description="beta")
    index = widgets.IntSlider(value=0, min=0, max=basis.vectors.shape[0] - 1, description="phi index")
    rows = widgets.IntRangeSlider(
        value=(0, grid[0]) if grid else (0, 1),
        min=0,
        max=grid[0] if grid else 1,
        description="tile rows",
        disabled=grid is None,
    )
    cols = widgets.IntRangeSlider(
        value=(0, grid[1]) if grid else (0, 1),
        min=0,
        max=grid[1] if grid else 1,
        description="tile cols",
        disabled=grid is None,
    )
    out = widgets.Output()

    def redraw(*_: Any) -> None:
        region = (rows.value[0], cols.value[0], rows.value[1], cols.value[1]) if grid else None
        x_hat = collisions.null_space_search(x, layer, basis.vectors[index.value], beta.value, region)
        res = collisions.collision_residuals(model, x, x_hat, layer)
        top = top_k_labels(*top_k(model, torch.cat([x, x_hat])), names)
        with out:
            clear_output(wait=True)
            fig = collision_figure(x, x_hat, ["original", "perturbation", "colliding"], mean=mean, std=std)
            plt.show()
            print(f"first-layer rel change {res['first_layer_rel']:.2e}, output rel change {res['output_rel']:.2e}")
            page.table(top_k_table({"original": top[0], "colliding": top[1]}))
            plt.close(fig)

    for w in (beta, index, rows, cols):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([beta, index]), widgets.HBox([rows, cols]), out])
