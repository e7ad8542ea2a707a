"""helpers.explain and helpers.similarity on a seeded patch model: valid colliding twins, the explanation and
similarity studies, and every check of the implications chapter fed a violating input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from helpers.book import verdict
from helpers.data import image_validity
from helpers.experiments import explain, similarity
from helpers.linalg import kernels


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 4, stride=4), nn.ReLU(), nn.Conv2d(6, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)
    ).eval()


@pytest.fixture(scope="module")
def twins(model: nn.Module) -> similarity.ValidTwins:
    clean = image_validity.quantize_8bit(torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    clean[0, 0, :4, :4] = 0.0  # a fully saturated patch: no room, it must stay as it is
    return similarity.valid_twins(kernels.pixel_kernel(model, (1, 16, 16)), clean, seed=2)


@pytest.fixture(scope="module")
def study(model: nn.Module, twins: similarity.ValidTwins) -> explain.SetStudy:
    return explain.study_set(model, model[0], twins, n_steps=64)


def test_valid_twins_are_images_and_collide(model: nn.Module, twins: similarity.ValidTwins) -> None:
    assert image_validity.outside_unit_range(twins.twins) == 0 and image_validity.outside_unit_range(twins.control) == 0
    assert (twins.beta_hi >= 1).all()
    assert twins.perturbation[0, 0, :4, :4].abs().max() == 0  # the saturated patch did not move
    assert twins.moved.all() and (twins.patches_moved < 1).any()
    exact = similarity.first_layer_residual(model, twins.clean, twins.twins)
    saved = similarity.first_layer_residual(model, twins.clean, twins.saved)
    assert exact.max() < 1e-5 and saved.median() > 1e-4  # the PNG round trip breaks the exact collision
    size, control = twins.perturbation.flatten(1).norm(dim=1), twins.control_perturbation.flatten(1).norm(dim=1)
    assert (control <= size * (1 + 1e-5)).all() and (control > 0.5 * size).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        similarity.valid_twins(kernels.pixel_kernel(model, (1, 16, 16)), twins.clean + 2)


def test_explanation_study(study: explain.SetStudy) -> None:
    d = study.explanation.differences
    assert d["exact"]["gradcam"].max() < 1e-5 and d["exact"]["saliency"].max() < 1e-5
    assert d["exact"]["ig"].median() > 1e-2  # IG multiplies by x - baseline: it sees the perturbation
    assert study.explanation.ig_decomposition.max() < 1e-4
    assert study.explanation.completeness.max() < 0.05
    totals = study.explanation.ig_totals
    assert torch.allclose(totals[:, 0], totals[:, 1], rtol=0.05, atol=1e-3)
    assert study.explanation.maps["gradcam"].shape == (3, 16, 16)
    assert all(r.ok for r in explain.implications_requirements({"set": study}, control_set="set"))


def test_relative_l2() -> None:
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert explain.relative_l2(a, b).tolist() == [0.0, 0.0]
    assert explain.relative_l2(a, -a)[0].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same shape"):
        explain.relative_l2(torch.zeros(2, 2), torch.zeros(2, 3))


def _failing(study: explain.SetStudy, **changes: object) -> list[str]:
    """The checks that fail once the study's parts are replaced by ``changes`` (twins=..., explanation=...)."""
    broken = dataclasses.replace(study, **changes)
    return [r.what for r in explain.implications_requirements({"set": broken}, control_set="set") if not r.ok]


def test_each_check_fails_on_a_violating_input(study: explain.SetStudy) -> None:
    t, ex, sim = study.twins, study.explanation, study.similarity
    # an image outside [0, 1]
    bad = _failing(study, twins=dataclasses.replace(t, twins=t.twins + 1.5))
    assert any("[0, 1]" in w for w in bad)
    # a perturbation that does not fit: beta_hi < 1
    assert any("[0, 1]" in w for w in _failing(study, twins=dataclasses.replace(t, beta_hi=t.beta_hi * 0.5)))
    # an exact twin that does not collide, and a saved twin that still collides exactly
    for residual in (
        {"exact": sim.residual["saved"], "saved": sim.residual["saved"]},
        {**sim.residual, "saved": sim.residual["exact"]},
    ):
        assert any("collide" in w for w in _failing(study, similarity=dataclasses.replace(sim, residual=residual)))
    # IG that does not integrate, and an IG difference that is not P * G
    assert any(
        "IG" in w for w in _failing(study, explanation=dataclasses.replace(ex, completeness=ex.completeness + 0.1))
    )
    assert any(
        "IG" in w
        for w in _failing(study, explanation=dataclasses.replace(ex, ig_decomposition=ex.ig_decomposition + 1e-2))
    )
    # a blind measure (the control changes nothing) and a measure that sees the twin as much as the control
    for method in ("gradcam", "saliency"):
        blind = {v: dict(m) for v, m in ex.differences.items()}
        blind["control"][method] = torch.zeros_like(blind["control"][method])
        bad = _failing(study, explanation=dataclasses.replace(ex, differences=blind))
        assert any(explain.METHOD_NAMES[method] in w and "detects" in w for w in bad)
    metrics = {v: dict(m) for v, m in sim.metrics.items()}
    metrics["saved"]["feature_distance"] = metrics["control"]["feature_distance"]
    bad = _failing(study, similarity=dataclasses.replace(sim, metrics=metrics))
    assert any("feature distance detects" in w for w in bad)


def test_control_detects() -> None:
    assert explain.control_detects(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.05]))
    assert not explain.control_detects(torch.zeros(3), torch.zeros(3))  # a blind measure
    assert not explain.control_detects(torch.tensor([1.0]), torch.tensor([0.5]))  # twins seen almost as much


def test_claims_follow_the_measurements(study: explain.SetStudy) -> None:
    claims = {c["id"]: c for c in explain.implications_claims({"set": study}, heavy="set", weights="w")}
    assert set(claims) == {f"implications.{k}" for k in ("gradcam", "gradient", "integrated_gradients", "similarity")}
    status = {k: verdict.status_of(c["criterion"], c["measured"]) for k, c in claims.items()}
    assert status["implications.gradcam"] == verdict.OUTCOMES["paper"][0]
    assert status["implications.integrated_gradients"] == verdict.OUTCOMES["paper"][1]
    # the same criteria on a study where Grad-CAM of the saved twins moved: the claim turns
    moved = {v: dict(m) for v, m in study.explanation.differences.items()}
    moved["saved"]["gradcam"] = moved["saved"]["gradcam"] + 2 * explain.SAME_MAP_REL_L2
    other = dataclasses.replace(study, explanation=dataclasses.replace(study.explanation, differences=moved))
    c = {c["id"]: c for c in explain.implications_claims({"set": other}, heavy="set", weights="w")}[
        "implications.gradcam"
    ]
    assert verdict.status_of(c["criterion"], c["measured"]) == verdict.OUTCOMES["paper"][1]
    # a feature metric that sees the twin as much as the control is not fooled
    metrics = {v: dict(m) for v, m in study.similarity.metrics.items()}
    metrics["saved"]["feature_distance"] = metrics["control"]["feature_distance"]
    metrics["saved"]["psnr_db"] = torch.full_like(metrics["saved"]["psnr_db"], 10.0)
    other = dataclasses.replace(study, similarity=dataclasses.replace(study.similarity, metrics=metrics))
    c = {c["id"]: c for c in explain.implications_claims({"set": other}, heavy="set", weights="w")}[
        "implications.similarity"
    ]
    assert verdict.status_of(c["criterion"], c["measured"]) == verdict.OUTCOMES["paper"][1]
    values = explain.prose_values({"set": other}, heavy="set")
    assert values["fooled_k"] == 0 and values["flagged_k"] == values["set_n"]
    assert "does not" in values["similarity_conclusion"]


def test_strength_sweep_stays_valid(model: nn.Module, twins: similarity.ValidTwins) -> None:
    rows = similarity.strength_sweep(model, twins, [0.2, 1.0])
    assert rows[0]["PSNR dB"] > rows[1]["PSNR dB"] and rows[1]["median l_inf"] > rows[0]["median l_inf"]
    assert all(r["control feature distance"] > 10 * r["feature distance"] for r in rows)
    with pytest.raises(ValueError, match="fractions"):
        similarity.strength_sweep(model, twins, [1.5])


def test_identical_images_and_errors(model: nn.Module, twins: similarity.ValidTwins) -> None:
    x = twins.clean[:1]
    assert torch.isinf(similarity.psnr(x, x)).all()
    assert similarity.ssim(x, x).item() == pytest.approx(1.0)
    assert similarity.feature_distance(model, x, x).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        similarity.psnr(x, x[..., :8])
    with pytest.raises(KeyError, match="no layers"):
        similarity.feature_distance(model, x, x, layers=["nope"])


def test_path_gradient_matches_captum(model: nn.Module, twins: similarity.ValidTwins) -> None:
    x = twins.clean[:2]
    target = model(x).argmax(1)
    ig = explain.integrated_gradients(model, x, target, n_steps=8).double()
    g = explain.path_gradient(model, x, target, n_steps=8).double()
    assert torch.allclose(ig, x.double() * g, atol=1e-6)


def test_gauss_legendre_matches_captums_quadrature() -> None:
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    nodes, weights = explain.gauss_legendre(16)
    assert np.array_equal(nodes, np.array(alphas(16))) and np.array_equal(weights, np.array(step_sizes(16)))
    assert abs(weights.sum() - 1) < 1e-12 and ((nodes > 0) & (nodes < 1)).all()
