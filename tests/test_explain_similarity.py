"""helpers.explain and helpers.similarity on a seeded patch model and an exact colliding pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers.experiments import collisions, explain, similarity
from helpers.linalg import kernels


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 4, stride=4), nn.ReLU(), nn.Conv2d(6, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)
    ).eval()
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    layer = model[0]
    phi = kernels.kernel_basis(layer).random_vector(torch.Generator().manual_seed(2))
    x_hat = collisions.null_space_search(x, layer, phi, beta=3.0)
    return model, x, x_hat


def test_gradcam_and_gradients_collide_ig_does_not(pair) -> None:
    model, x, x_hat = pair
    target = int(model(x).argmax(1))
    out = explain.explain_pair(model, x, x_hat, target, layer=model[2], n_steps=16)
    diffs = out["differences"]
    assert diffs["gradcam"]["max_rel"] < 1e-5
    assert diffs["saliency"]["max_rel"] < 1e-5
    assert diffs["ig"]["max_rel"] > 1e-2  # IG multiplies by (x - baseline): it sees the perturbation
    ig = out["maps"]["ig"].double()
    assert ig[0].sum().item() == pytest.approx(ig[1].sum().item(), rel=2e-2)  # completeness: same total
    assert out["maps"]["gradcam"].shape == (2, 16, 16)


def test_pixel_metrics_flag_what_features_miss(pair) -> None:
    model, x, x_hat = pair
    table = similarity.similarity_table(model, x, x_hat)
    assert table["feature_distance"].item() < 1e-10
    assert table["psnr_db"].item() < 20 and table["ssim"].item() < 0.9
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert similarity.feature_distance(model, x, noisy).item() > 1e-6


def test_identical_images_and_errors(pair) -> None:
    model, x, _ = pair
    assert torch.isinf(similarity.psnr(x, x)).all()
    assert similarity.ssim(x, x).item() == pytest.approx(1.0)
    assert similarity.feature_distance(model, x, x).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        similarity.psnr(x, x[..., :8])
    with pytest.raises(KeyError, match="no layers"):
        similarity.feature_distance(model, x, x, layers=["nope"])
    with pytest.raises(ValueError, match="same shape"):
        explain.map_difference(torch.zeros(2), torch.zeros(3))


def test_gauss_legendre_matches_captums_quadrature() -> None:
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    nodes, weights = explain.gauss_legendre(16)
    assert np.array_equal(nodes, np.array(alphas(16))) and np.array_equal(weights, np.array(step_sizes(16)))
    assert abs(weights.sum() - 1) < 1e-12 and ((nodes > 0) & (nodes < 1)).all()
