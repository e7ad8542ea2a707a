"""The trained-substitute study of the implications chapter (similarity.near_null_pairs, pair_metrics,
explain.gradients_and_cam, substitute_study, substitute_claims, substitute_requirements) on a tiny model; each
check is fed an input that violates it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from helpers.data.normalization import PixelSpace
from helpers.experiments import attacks, explain, similarity


def _model(seed: int = 0) -> PixelSpace:
    torch.manual_seed(seed)
    inner = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
        nn.ReLU6(),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return PixelSpace(inner, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()


def _layers(model: PixelSpace) -> dict[str, nn.Module]:
    inner = model.model
    return {"stem": inner[0], "cam": inner[3], "pool": inner[5]}


def _photos(n: int = 4, size: int = 8) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    return torch.round(x * 255) / 255


def _study() -> explain.SubstituteStudy:
    model, x = _model(), _photos()
    stem = attacks.stem_report(model, tuple(x.shape[1:]))
    pairs = similarity.near_null_pairs(x, stem.direction)
    return explain.substitute_study(model, pairs, _layers(model), n_steps=2, batch=3)


def test_near_null_pairs_sized_valid_and_same_l2() -> None:
    x = _photos()
    direction = torch.randn(3, 8, 8, dtype=torch.float64)
    pairs = similarity.near_null_pairs(x, direction, psnr_db=25.0)
    assert pairs.twins.shape == x.shape and pairs.control.shape == x.shape
    for images in (pairs.twins, pairs.control):
        assert float(images.min()) >= 0 and float(images.max()) <= 1
        assert torch.equal(images, torch.round(images * 255) / 255)  # saved as 8-bit
    twin_l2 = (pairs.twins - x).flatten(1).norm(dim=1)
    control_l2 = (pairs.control - x).flatten(1).norm(dim=1)
    assert torch.allclose(twin_l2, control_l2, rtol=0.2)
    psnr = similarity.psnr(pairs.twins, x)
    assert float(psnr.max()) < 30  # clipping and saving keep it heavily altered
    assert abs(float(psnr.median()) - 25.0) < 2.0


def test_near_null_pairs_rejects_bad_inputs() -> None:
    x = _photos()
    with pytest.raises(ValueError, match="direction"):
        similarity.near_null_pairs(x, torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="direction"):
        similarity.near_null_pairs(x, torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="clean"):
        similarity.near_null_pairs(x * 2, torch.ones(3, 8, 8))


def test_pair_metrics_shapes_and_bad_features() -> None:
    x = _photos()
    pairs = similarity.near_null_pairs(x, torch.randn(3, 8, 8))
    feats = torch.randn(12, 6)
    m = similarity.pair_metrics(pairs, feats)
    assert set(m) == {"twin", "control"} and m["twin"]["feature_distance"].shape == (4,)
    expected = (feats[4:8] - feats[:4]).double().norm(dim=1) / feats[:4].double().norm(dim=1)
    assert torch.allclose(m["twin"]["feature_distance"], expected)
    with pytest.raises(ValueError, match="3N"):
        similarity.pair_metrics(pairs, feats[:8])


def test_path_gradient_batched_equals_whole() -> None:
    model, x = _model(), _photos()
    whole = explain.path_gradient(model, x, 1, n_steps=3)
    assert torch.allclose(explain.path_gradient(model, x, 1, n_steps=3, batch=5), whole, atol=1e-6)


def test_gradients_and_cam_match_captum() -> None:
    model, x = _model(), _photos()
    targets = torch.tensor([0, 1, 2, 3])
    one = explain.gradients_and_cam(model, x, targets, _layers(model), batch=3)
    layer = _layers(model)["cam"]
    assert float(explain.relative_l2(one["gradcam"], explain.gradcam(model, x, targets, layer)).max()) < 1e-5
    assert float(explain.relative_l2(one["gradient"], explain.saliency(model, x, targets)).max()) < 1e-5
    assert one["pool"].shape == (4, 8) and one["logits"].shape == (4, 5)


def test_substitute_study_claims_and_checks() -> None:
    study = _study()
    assert set(study.differences) == {"twin", "control"}
    assert all(study.differences["twin"][m].shape == (4,) for m in explain.METHODS)
    assert study.maps["gradcam"].shape == (3, 8, 8)
    claims = explain.substitute_claims(study, "tiny")
    assert [c["id"] for c in claims] == [
        "implications.gradcam.trained_substitute",
        "implications.gradient.trained_substitute",
        "implications.integrated_gradients.trained_substitute",
        "implications.similarity.trained_substitute",
    ]
    assert all("trained substitute: tiny" in c["description"] for c in claims)
    assert all(c["criterion"].needs_trained and c["criterion"].kind == "beyond" for c in claims)
    assert all(ok for ok, _, _ in explain.substitute_requirements(study))
    values = explain.substitute_values(study)
    assert all(k.startswith("lite_") for k in values) and values["lite_n"] == 4
    assert len(explain.substitute_rows(study)) == 2


def test_substitute_requirements_fail_on_violating_inputs() -> None:
    study = _study()
    off = dataclasses.replace(study, captum_gap=0.5)
    assert not explain.substitute_requirements(off)[0].ok
    swapped = dataclasses.replace(study, stem={"twin": study.stem["control"], "control": study.stem["twin"]})
    assert not explain.substitute_requirements(swapped)[1].ok


def test_substitute_similarity_claim_needs_flagged_twins() -> None:
    study = _study()
    metrics = {v: dict(m) for v, m in study.metrics.items()}
    metrics["twin"]["psnr_db"] = torch.full((4,), 40.0, dtype=torch.float64)  # nothing flagged: no premise
    claim = explain.substitute_claims(dataclasses.replace(study, metrics=metrics), "tiny")[-1]
    assert claim["measured"].n == 0 and not claim["criterion"].holds(claim["measured"])
