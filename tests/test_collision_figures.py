"""Views of a collision (helpers.experiments.collision_figures) and the kernel helpers the chapters call."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from helpers.experiments import collision_figures
from helpers.linalg import conv_operator, kernels


def test_residual_and_top_k_tables() -> None:
    rows = collision_figures.residual_table({"a": {"x": 1.0, "y": 2}, "b": {"x": 3.0, "y": 4}}, ("x",))
    assert rows == [{"case": "a", "x": 1.0}, {"case": "b", "x": 3.0}]
    top = collision_figures.top_k_table({"clean": [("cat", 0.9), ("dog", 0.1)], "twin": [("cat", 0.8), ("fox", 0.2)]})
    assert top == [
        {"rank": 1, "clean": "cat (0.9)", "twin": "cat (0.8)"},
        {"rank": 2, "clean": "dog (0.1)", "twin": "fox (0.2)"},
    ]


def test_figures_have_one_panel_per_input() -> None:
    fig = collision_figures.mask_comparison_figure(torch.zeros(3, 8, 8, dtype=torch.long), ["a", "b", "c"])
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c"]
    plt.close(fig)
    fig = collision_figures.window_leak_figure(torch.rand(5, 6))
    assert len(fig.axes) == 2  # the map and its colour bar
    plt.close(fig)


def test_kernel_or_near_null_basis_says_which_it_returned() -> None:
    wide = nn.Linear(6, 2)
    basis, exact = kernels.kernel_or_near_null_basis(wide, 3)
    assert exact and basis.nullity == 4
    square = nn.Linear(4, 4)
    basis, exact = kernels.kernel_or_near_null_basis(square, 3)
    assert not exact and basis.near_null and basis.vectors.shape == (3, 4)


def test_random_vectors_are_unit_kernel_vectors() -> None:
    conv = nn.Conv2d(3, 5, 2, stride=2)
    basis = kernels.kernel_basis(conv)
    v = basis.random_vectors(7, torch.Generator().manual_seed(0))
    assert v.shape == (7, 3, 2, 2)
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.ones(7, dtype=torch.float64))
    w = kernels.weight_matrix(conv)
    assert float((w @ v.flatten(1).T).abs().max()) < 1e-6


def test_conv_geometry_rejects_string_padding() -> None:
    assert conv_operator.geometry(nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding=(1, 2))) == ((3, 5), (1, 2), (1, 2))
    with pytest.raises(kernels.UnsupportedLayerError, match="padding='same'"):
        conv_operator.geometry(nn.Conv2d(1, 1, 3, padding="same"))


def test_layer_rtol_uses_the_stored_precision() -> None:
    layer = nn.Linear(5, 3)
    assert kernels.layer_rtol(layer) == 5 * torch.finfo(torch.float32).eps
    assert kernels.layer_rtol(layer.double()) == 5 * torch.finfo(torch.float64).eps
