"""Chapter 09's trained substitute: the EfficientNet head cut, the search on it, and the substitute's claims."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from helpers.book import results, verdict
from helpers.data import paper
from helpers.experiments import polytope as P
from helpers.experiments import polytope_study


def normalize(u: torch.Tensor) -> torch.Tensor:
    return (u - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():  # large head activations, so some units pass ReLU6's cap of 6
        model.get_submodule("bn2").weight.mul_(50.0)
    return model


def test_head_split_reproduces_the_model_and_caps_at_six(lite: nn.Module) -> None:
    split = P.split_efficientnet_head(lite, normalize, size=64)
    assert split.n_units == 1280 * 2 * 2 and split.input_shape == (3, 64, 64) and "ReLU6" in split.name
    x = torch.rand(3, 3, 64, 64)
    assert P.cut_error(split, lambda u: lite(normalize(u)), x) < 1e-5
    assert (P.pre_activations(split, x) > 6).any()  # the cap matters on these inputs
    # violating input: a head without ReLU6's cap does not reproduce the model, and the check sees it
    forward_head = lite.forward_head
    uncapped = P.ReluSplit(
        split.pre, lambda y: forward_head(y.view(len(y), 1280, 2, 2)), split.input_shape, split.n_units, lite, "x"
    )
    assert P.cut_error(uncapped, lambda u: lite(normalize(u)), x) > 1e-3


def test_head_split_rejects_other_models(lite: nn.Module) -> None:
    with pytest.raises(ValueError, match="needs a timm EfficientNet"):
        P.split_efficientnet_head(nn.Linear(2, 2), normalize)
    lite.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            P.split_efficientnet_head(lite, normalize, size=64)
    finally:
        lite.eval()
    swish = timm.create_model("efficientnet_b0", pretrained=False).eval()  # SiLU head: not a ReLU-type layer
    with pytest.raises(ValueError, match="ReLU or ReLU6"):
        P.split_efficientnet_head(swish, normalize, size=64)


def test_search_on_the_head_cut(lite: nn.Module) -> None:
    split = P.split_efficientnet_head(lite, normalize, size=32)
    x = torch.rand(2, 3, 32, 32)
    polys = P.find_polytopes(split, x[:1], x[1:], n_vertices=2, config=P.SearchConfig(steps=3), progress=False)
    assert polys.vertices.shape == (1, 2, 3, 32, 32) and float(polys.vertices.min()) >= 0
    reports = P.measure_polytopes(split, x[:1], polys, 4, torch.Generator().manual_seed(0), progress=False)
    row = P.table_row(reports[0], 10.0)
    assert row["n_samples"] == 4 and 0 <= row["same_class_k"] <= 4
    assert all(p.requires_grad for p in lite.parameters())  # frozen only during the search


def table_row(**changes: float) -> dict:
    """A ``polytope.table_row`` of a polytope that reproduces Li et al.'s Table 4 (override fields to break it)."""
    row = {"same_class_pct": 100.0, "same_class_k": 2000, "n_samples": 2000, "target_prob": 0.6, "sample_prob": 0.58}
    row |= {"image_distance": 37000.0, "vertex_distance": 5000.0, "ratio_pct": 13.5, "vertex_eq_rel_max": 1e-3}
    row |= {"sample_act_rel_max": 1e-3, "png_same_class_k": 8, "png_n": 8, "png_act_rel_max": 2e-3}
    return row | changes


def statuses(claims: list[dict], trained: bool = True) -> dict[str, str]:
    return {
        c["id"]: results.judge(**{k: v for k, v in c.items() if k != "models"}, trained=trained).status for c in claims
    }


def claims(pixel: list[dict], patches: list[dict]) -> list[dict]:
    return polytope_study.substitute_claims(paper.get("li"), pixel, patches, "efficientnet_lite0", "head", (500, 500))


def test_substitute_claims_reproduced_differs_below_budget_and_not_checkable() -> None:
    good = claims([table_row()] * 3, [table_row()] * 2)
    assert all(c["id"].endswith(".trained_substitute") for c in good)
    assert all(c["models"] == ("efficientnet_lite0",) for c in good)
    assert all("trained substitute: efficientnet_lite0" in c["description"] for c in good)
    status = statuses(good)
    assert status.pop("li.vgg16.png_round_trip.trained_substitute") == verdict.BEYOND_HOLDS
    assert set(status.values()) == {verdict.REPRODUCED}
    # violating inputs: a sample of another class, a confidence gap, a large polytope, no collision at the cut
    pixel = [table_row(same_class_k=1999, sample_prob=0.3, ratio_pct=30.0, sample_act_rel_max=0.5)]
    bad = statuses(claims(pixel, [table_row(same_class_k=1900, png_same_class_k=7)] * 2))
    assert set(bad.values()) == {verdict.DIFFERS, verdict.BEYOND_FAILS}
    few = [table_row(n_samples=24, same_class_k=24)]
    small = statuses(claims(few, few * 2))
    assert set(small.values()) == {verdict.BELOW_BUDGET}
    random = statuses(claims(few, few * 2), trained=False)
    assert random.pop("li.vgg16.fc6_collision.trained_substitute") == verdict.BELOW_BUDGET  # any weights
    assert set(random.values()) == {verdict.NOT_CHECKABLE}
    with pytest.raises(ValueError, match="pixel and patch polytopes"):
        claims([], few)


def test_substitute_text_follows_the_numbers() -> None:
    assert polytope_study.substitute_text([table_row()]).startswith("every sample keeps")
    assert "collides with its target" in polytope_study.substitute_text([table_row()])
    text = polytope_study.substitute_text([table_row(same_class_k=3, n_samples=4, sample_act_rel_max=0.5)])
    assert text.startswith("only 3 of 4 samples") and "not collide at the cut yet" in text
    with pytest.raises(ValueError, match="no rows"):
        polytope_study.substitute_text([])
