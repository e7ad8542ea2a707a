"""The null-space search helpers on hand-built layers (no downloads, small sizes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.data import normalization
from helpers.experiments import collisions
from helpers.linalg import conv_operator, kernels


def _seeded(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    layer.reset_parameters()
    return layer.double()


def test_linear_kernel_basis_is_orthonormal_and_null() -> None:
    layer = _seeded(nn.Linear(20, 6))
    basis = kernels.kernel_basis(layer)
    assert basis.vectors.shape == (14, 20) and basis.nullity == 14 and basis.rank == 6
    flat = basis.flat()
    assert torch.allclose(flat @ flat.T, torch.eye(14, dtype=torch.float64), atol=1e-12)
    assert float((layer.weight.detach() @ flat.T).abs().max()) < 1e-13


def test_conv_and_grouped_conv_basis_shapes() -> None:
    conv = _seeded(nn.Conv2d(3, 8, 3))
    assert kernels.kernel_basis(conv).vectors.shape == (27 - 8, 3, 3, 3)
    grouped = _seeded(nn.Conv2d(4, 6, 3, groups=2))  # W1 is 6 x (2*3*3) = 6 x 18
    basis = kernels.kernel_basis(grouped)
    assert basis.vectors.shape == (12, 2, 3, 3)
    p = collisions.null_space_perturbation(grouped, (4, 9, 9), basis.vectors[0], 3.0)  # non-overlapping: stride 1 no
    assert p.shape == (4, 9, 9)


def test_patch_embedding_search_is_exact_and_regional() -> None:
    embed = _seeded(nn.Conv2d(3, 16, 4, stride=4))  # 16 x 48: nullity 32, like a tiny DeiT
    basis = kernels.kernel_basis(embed)
    assert basis.nullity == 32
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    grid = collisions.patch_grid(embed, x.shape[1:])
    assert grid == (4, 4)
    betas = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    per_tile = basis.vectors[torch.arange(16) % basis.nullity]
    x_hat = collisions.null_space_search(x, embed, per_tile, betas, region=(0, 0, 2, 4))
    assert float((x_hat - x)[:, :, 8:].abs().max()) == 0.0  # tiles outside the box untouched
    assert float((x_hat - x).abs().max()) > 1.0
    res = collisions.collision_residuals(nn.Sequential(embed, nn.Flatten(), nn.Linear(256, 5).double()), x, x_hat)
    assert res["first_layer_rel"] < 1e-13 and res["output_rel"] < 1e-13 and res["same_argmax"] == 1.0


def test_resnet_like_tiling_leaks_and_polyphase_matches_direct_convolution() -> None:
    conv = _seeded(nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False))
    basis = kernels.kernel_basis(conv)
    p = collisions.null_space_perturbation(conv, (3, 16, 16), basis.vectors[0], 1.0)
    assert conv_operator.operator_gain(conv, p) > 0.05  # overlapping windows: the tiled phi is not invisible
    stats = conv_operator.window_stats(conv, p, basis.vectors[0])
    assert stats["exact_fraction"] < 0.5
    spectrum = conv_operator.polyphase_spectrum(conv, (3, 12, 12))
    dense = conv_operator.circular_conv_apply(conv, torch.eye(432, dtype=torch.float64).reshape(432, 3, 12, 12))
    dense = dense.reshape(432, -1).T
    direct = torch.sort(torch.linalg.svdvals(dense)).values
    assert torch.allclose(torch.sort(spectrum.singular.flatten()).values, direct, atol=1e-10)
    sigmas, images = spectrum.near_null_vectors(2)
    measured = conv_operator.circular_conv_apply(conv, images).flatten(1).norm(dim=1)
    assert torch.allclose(measured, sigmas.double(), rtol=1e-6)


def test_operator_null_space_exact_when_channels_below_stride_area() -> None:
    conv = _seeded(nn.Conv2d(1, 6, 4, stride=3, bias=False))  # 6 outputs < 9 pixels per stride cell
    sv, vectors = conv_operator.operator_null_space(conv, (1, 13, 13))
    assert vectors.shape[0] >= 169 - 6 * 16
    assert float(conv_operator.conv_apply(conv, vectors).abs().max()) < 1e-12
    assert conv_operator.polyphase_spectrum(conv, (1, 12, 12)).per_frequency_nullity == 3


def test_boundary_modes_bound_sigma_min() -> None:
    conv = _seeded(nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False))
    gains, images = conv_operator.boundary_near_null(conv, (3, 16, 16), k=2, crop=6)
    exact, _ = conv_operator.operator_null_space(conv, (3, 16, 16), k=1)
    assert float(gains[0]) >= float(exact[0]) - 1e-9
    assert images.shape == (2, 3, 16, 16)


def test_trivial_kernel_error_names_the_layer() -> None:
    vgg_first = _seeded(nn.Conv2d(3, 64, 3, padding=1))  # 64 x 27: nullity 0
    with pytest.raises(kernels.TrivialKernelError, match=r"64 x 27.*nullity\(W1\) = 0.*near_null_basis"):
        kernels.kernel_basis(vgg_first, name="features.0")
    near = kernels.near_null_basis(vgg_first, k=3)
    assert near.near_null and near.vectors.shape == (3, 3, 3, 3)


def test_bad_inputs_are_explained() -> None:
    conv = _seeded(nn.Conv2d(3, 4, 2, stride=2))
    phi = kernels.kernel_basis(conv).vectors[0]
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        collisions.null_space_search(torch.zeros(3, 8, 8), conv, phi)
    with pytest.raises(ValueError, match="expected \\(C, H, W\\)"):
        collisions.null_space_perturbation(conv, (1, 8, 8), phi)
    with pytest.raises(ValueError, match="phi has shape"):
        collisions.null_space_perturbation(conv, (3, 8, 8), torch.zeros(5))
    with pytest.raises(ValueError, match="restricted_kernel_basis"):
        collisions.null_space_perturbation(nn.Linear(4, 2), (4,), torch.zeros(4), region=(0, 0, 1, 1))
    with pytest.raises(kernels.UnsupportedLayerError, match="supports"):
        kernels.first_layer(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)))


def test_restricted_kernel_and_pixel_space() -> None:
    layer = _seeded(nn.Linear(16, 5))
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:8] = True
    basis = kernels.restricted_kernel_basis(layer, mask)
    assert basis.nullity == 3 and float(basis.flat()[:, 8:].abs().max()) == 0.0
    assert float(basis.residual_norms.max()) < 1e-13
    p = torch.ones(3, 2, 2)
    std = (0.5, 0.25, 2.0)
    assert torch.allclose(normalization.to_model_space(normalization.to_pixel_space(p, std), std), p)
    x = torch.full((3, 2, 2), 0.5)
    assert collisions.feasible_beta(x, torch.ones_like(x)) == pytest.approx(0.5)
