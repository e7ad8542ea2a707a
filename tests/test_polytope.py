"""Li et al.'s losses, the vertex search, convex sampling and the patch composition (helpers.polytope)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers.data import photos
from helpers.experiments import polytope as P
from helpers.experiments import polytope_study

from .conftest import needs_mnist


def tiny_relu_net() -> nn.Sequential:
    """6 inputs -> 4 ReLU units -> 2 logits, weights set by hand.

    For the target x_t below, units 0 and 1 are active (pre 0.5 and 0.3) and units 2 and 3 inactive (-0.7, -0.7).
    Pushing unit 2 (= x2 - x3 - 0.5) down over the box [0, 1]^6 ends at x2 = 0, x3 = 1: pre-activation -1.5.
    """
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(
            torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, -1, 0, 0], [0, 0, 0, 0, 1, -1]])
        )
        net[1].bias.copy_(torch.tensor([0.0, 0, -0.5, -0.2]))
        net[3].weight.copy_(torch.tensor([[1.0, -1, 0.5, 0.5], [-1.0, 1, 0.2, 0.1]]))
        net[3].bias.zero_()
    return net.eval()


TARGET = torch.tensor([0.5, 0.3, 0.2, 0.4, 0.1, 0.6]).view(1, 1, 2, 3)
CONFIG = P.SearchConfig(alpha=100.0, steps=600, lr=0.05)


@pytest.fixture(scope="module")
def split() -> P.ReluSplit:
    return P.split_sequential(tiny_relu_net(), 2, (1, 2, 3))


@pytest.fixture(scope="module")
def polytope(split: P.ReluSplit) -> P.Polytopes:
    return P.find_polytopes(split, TARGET, TARGET, n_vertices=2, config=CONFIG, progress=False)


def test_split_reproduces_the_model(split: P.ReluSplit) -> None:
    x = torch.rand(7, 1, 2, 3)
    assert torch.allclose(split.logits(x), tiny_relu_net()(x))
    assert split.n_units == 4
    assert torch.allclose(P.pre_activations(split, TARGET), torch.tensor([[0.5, 0.3, -0.7, -0.7]]))


def test_losses_by_hand() -> None:
    target = torch.tensor([[1.0, 2.0, -1.0, -3.0]])
    pre_u = torch.tensor([[1.5, 1.0, 0.4, -2.0]])
    l_plus, l_i = P.li_losses(pre_u, target, torch.tensor([3]))
    assert l_plus.item() == pytest.approx(0.5**2 + 1.0**2)  # active units 0, 1
    assert l_i.item() == pytest.approx(-2.0 + 0.4)  # pushed unit 3, hinge on the other inactive unit 2
    _, l_i2 = P.li_losses(pre_u, target, torch.tensor([2]))
    assert l_i2.item() == pytest.approx(0.4 + 0.0)  # unit 3 is negative: no hinge cost


def test_vertices_satisfy_proposition_1(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    assert polytope.units.tolist() == [[2, 3]]
    vertices = polytope.vertices[0]
    assert vertices.min() >= 0 and vertices.max() <= 1
    pre = P.pre_activations(split, vertices)
    res = P.prop1_residuals(pre, polytope.target_pre.expand_as(pre))
    assert res["eq_max_abs"].max() < 1e-2  # equalities on the active units
    assert res["ineq_max"].max() < 1e-3  # inequalities on the inactive units
    assert res["pattern"].min() == 1.0
    assert pre[0, 2].item() == pytest.approx(-1.5, abs=2e-2)  # the box-constrained minimum of unit 2
    assert pre[1, 3].item() == pytest.approx(-1.2, abs=2e-2)  # unit 3: x4 = 0, x5 = 1


def test_search_from_another_start_reaches_the_polytope(split: P.ReluSplit) -> None:
    start = torch.full_like(TARGET, 0.9)
    polys = P.find_polytopes(split, TARGET, start, n_vertices=2, config=CONFIG, progress=False)
    pre = P.pre_activations(split, polys.vertices[0])
    res = P.prop1_residuals(pre, polys.target_pre.expand_as(pre))
    assert res["eq_rel"].max() < 2e-2 and res["ineq_max"].max() < 1e-3
    assert polys.seconds_per_vertex() == pytest.approx(polys.seconds / 2)
    assert polys.distances_to(start).item() == pytest.approx((polys.vertices[0] - start).flatten(1).norm(dim=1).mean())
    with pytest.raises(ValueError, match="points must be"):
        polys.distances_to(start[0])


def test_convex_combinations_keep_the_activation_pattern(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    vertices = polytope.vertices[0]
    samples, weights = P.convex_samples(vertices, 500, torch.Generator().manual_seed(0))
    assert samples.shape == (500, 1, 2, 3) and torch.allclose(weights.sum(1), torch.ones(500))
    assert weights.min() >= 0
    pre_s = P.pre_activations(split, samples)
    pre_v = P.pre_activations(split, vertices)
    target = polytope.target_pre.expand_as(pre_s)
    res_s = P.prop1_residuals(pre_s, target)
    res_v = P.prop1_residuals(pre_v, target[: len(pre_v)])
    # the cut is affine in the input: samples are never worse than the worst vertex
    assert res_s["act_rel"].max() <= res_v["act_rel"].max() + 1e-6
    assert res_s["ineq_max"].max() <= res_v["ineq_max"].max() + 1e-6
    assert res_s["pattern"].min() == 1.0
    report = P.measure_polytope(split, TARGET[0], vertices, 300, torch.Generator().manual_seed(1))
    assert report["same_class_pct"] == 100.0 and report["samples"]["act_rel"]["max"] < 2e-2


def test_bad_inputs_raise_clear_errors(split: P.ReluSplit) -> None:
    target = torch.tensor([[1.0, -1.0]])
    with pytest.raises(ValueError, match="inactive"):
        P.li_losses(torch.zeros(1, 2), target, torch.tensor([0]))
    with pytest.raises(ValueError, match="match the pre-activations' shape"):
        P.li_losses(torch.zeros(2, 2), target, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="long tensor"):
        P.li_losses(torch.zeros(1, 2), target, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 2, 3\)"):
        P.find_polytopes(split, torch.zeros(1, 6), torch.zeros(1, 6), progress=False)
    with pytest.raises(ValueError, match="give the starting inputs"):
        P.find_polytopes(split, TARGET, None, progress=False)
    with pytest.raises(ValueError, match="one start per target"):
        P.find_polytopes(split, TARGET, TARGET.repeat(2, 1, 1, 1), n_vertices=1, progress=False)
    with pytest.raises(ValueError, match="n_vertices must be between 1 and .* \\(2\\)"):
        P.find_polytopes(split, TARGET, TARGET, n_vertices=3, progress=False)
    with pytest.raises(ValueError, match="vertices must be"):
        P.convex_samples(torch.zeros(3), 10)
    with pytest.raises(ValueError, match=">= 1"):
        P.convex_samples(torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="valid ReLU positions: \\[2\\]"):
        P.split_sequential(tiny_relu_net(), 1, (1, 2, 3))
    with pytest.raises(ValueError, match="eval mode"):
        P.split_sequential(tiny_relu_net().train(), 2, (1, 2, 3))
    with pytest.raises(ValueError, match="alpha > 0"):
        P.SearchConfig(alpha=0)
    with pytest.raises(ValueError, match="at least two"):
        P.mean_pairwise_distance(torch.zeros(1, 3))


def test_mean_pairwise_distance() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert P.mean_pairwise_distance(x) == pytest.approx(10 / 3)
    assert P.mean_pairwise_distance(x, scale=255) == pytest.approx(850)


def test_active_counts() -> None:
    rows = P.active_counts(tiny_relu_net(), TARGET)
    assert rows == [
        {
            "relu_index": 2,
            "layer": "Linear",
            "units": 4,
            "active_mean": 2.0,
            "active_max": 2,
            "d": 6,
            "n_plus_below_d": True,
        }
    ]


class TinyVGG(nn.Module):
    """features / avgpool / classifier like torchvision's VGG, small."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(16, 8),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(8, 8),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_vgg_fc6_split_and_search() -> None:
    torch.manual_seed(0)
    model = TinyVGG().eval()
    split = P.split_vgg_fc6(model, lambda u: u - 0.5, size=8)
    x = torch.rand(3, 3, 8, 8)
    assert torch.allclose(split.logits(x), model(x - 0.5), atol=1e-6)
    polys = P.find_polytopes(split, x[:1], x[1:2], n_vertices=2, config=P.SearchConfig(steps=5), progress=False)
    assert polys.vertices.shape == (1, 2, 3, 8, 8)
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the search
    with pytest.raises(ValueError, match="no 'features'"):
        P.split_vgg_fc6(nn.Linear(2, 2), lambda u: u)


def test_sample_images() -> None:
    arr = photos.sample_image("camera")
    assert arr.shape == (512, 512, 3) and arr.dtype.name == "uint8"
    pixels = photos.sample_pixels("motorcycle_left", 64)
    assert pixels.shape == (3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1
    with pytest.raises(ValueError, match="valid: astronaut"):
        photos.sample_image("nonexistent")


@needs_mnist
def test_cli_random_weights(capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.cli import main

    rc = main(
        [
            "polytope",
            "mnist_mlp_2x256",
            "--weights",
            "random",
            "--device",
            "cpu",
            "--steps",
            "30",
            "--samples",
            "50",
            "--vertices",
            "2",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["weights"] == "random" and report["report"]["n_samples"] == 50
    assert report["steps"] == 30 and 0 <= report["same_class_pct"] <= 100
    assert main(["polytope", "lenet5", "--weights", "random", "--device", "cpu", "--target", "99999"]) == 2


def test_figure_and_sweep(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    configs = [P.SearchConfig(steps=n, lr=0.05) for n in (5, 50)]
    start = torch.full_like(TARGET, 0.9)  # another start: distances from it and from the target must differ
    sweep = P.distance_sweep(split, TARGET, start, configs, 2, progress=False)
    assert [r["steps"] for r in sweep] == [5, 50] and sweep[1]["vertex_distance"] >= sweep[0]["vertex_distance"]
    for r in sweep:
        assert r["to_start"] == pytest.approx(float((r["vertices"][0] - start).flatten(1).norm(dim=1).mean()))
        assert r["to_target"] == pytest.approx(float((r["vertices"][0] - TARGET).flatten(1).norm(dim=1).mean()))
        assert abs(r["to_start"] - r["to_target"]) > 0.1  # a swap or a mix-up of the two would fail here
    # 5 Adam steps of lr 0.05 (about 0.05 per pixel and step) leave the vertices nearer their start (0.9 everywhere)
    # than the target (1.41 away from it)
    assert sweep[0]["to_start"] < sweep[0]["to_target"]
    row = {
        "label": "x",
        "target": TARGET[0],
        "start": TARGET[0],
        "vertices": polytope.vertices[0],
        "samples": polytope.vertices[0][:1],
        "boxes": [(0, 0, 1, 1)],
    }
    for difference in (False, True):
        fig = P.polytope_figure([row, dict(row, start=None)], difference=difference)
        assert len(fig.axes) == 2 * 6


def test_measure_polytopes_rows(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    reports = P.measure_polytopes(split, TARGET, polytope, 50, torch.Generator().manual_seed(0), progress=False)
    row = P.table_row(reports[0], image_distance=2.0)
    assert row["ratio_pct"] == pytest.approx(50 * reports[0]["vertex_distance"])
    assert P.timing_row("tiny", polytope, "cpu")["vertices"] == 2
    with pytest.raises(ValueError, match="one target per polytope"):
        P.measure_polytopes(split, TARGET.repeat(2, 1, 1, 1), polytope, 10)


# ---- chapter 08's study: two polytopes per target, rows, summaries, sweep, claims --------------------------------

START = torch.full_like(TARGET, 0.9)
IMAGES = torch.cat([START, TARGET, 1 - TARGET])  # dataset indices: 0 = another image, 1 = the target


@pytest.fixture(scope="module")
def two(split: P.ReluSplit) -> polytope_study.TwoStartPolytopes:
    return polytope_study.search_two_starts(split, IMAGES, [1], [0], n_vertices=2, config=CONFIG, progress=False)


def fake_row(**changes: object) -> dict:
    """A ``two_start_rows`` row of a polytope that reproduces the paper (override fields to break it)."""
    row = {
        "same_class_pct": 100.0,
        "target_prob": 1.0,
        "sample_prob": 0.99999,
        "image_distance": 10.0,
        "vertex_distance": 1.25,
        "ratio_pct": 12.5,
        "vertex_eq_rel_max": 1e-4,
        "vertex_ineq_max": -0.1,
        "sample_act_rel_max": 1e-3,
        "sample_pattern_min": 1.0,
        "vertex_viol_rel_max": 1e-3,
        "sample_viol_rel_max": 1e-3,
        "init": "target",
        "target": 0,
    }
    return row | changes


def test_two_start_search_rows_and_figure_rows(split: P.ReluSplit, two: polytope_study.TwoStartPolytopes) -> None:
    assert two.n_targets == 1 and two.polys.n_polytopes == 2 and two.polys.vertices.shape == (2, 2, 1, 2, 3)
    assert torch.equal(two.polys.starts, torch.cat([TARGET, START])) and torch.equal(two.paired_targets[1], TARGET[0])
    # both searches reach the target's polytope: Proposition 1 holds at every vertex
    pre = P.pre_activations(split, two.polys.vertices.flatten(0, 1))
    res = P.prop1_residuals(pre, two.polys.target_pre.repeat_interleave(2, 0))
    assert res["eq_rel"].max() < 2e-2 and res["ineq_max"].max() < 1e-3
    far = two.from_other()
    assert far["start_to_target"].item() == pytest.approx(float((START - TARGET).norm()))
    assert far["to_start"].item() == pytest.approx(two.polys.distances_to(two.polys.starts)[1].item())
    assert far["to_target"].item() == pytest.approx(two.polys.distances_to(two.paired_targets)[1].item())
    assert bool(far["nearer_target"]) == (far["to_target"] < far["to_start"]).item()
    reports = P.measure_polytopes(
        split, two.paired_targets, two.polys, 20, torch.Generator().manual_seed(0), keep_samples=1, progress=False
    )
    rows = polytope_study.two_start_rows(reports, 2.0, two.target_ids)
    assert [(r["init"], r["target"]) for r in rows] == [("target", 1), ("other image", 1)]
    assert rows[1]["ratio_pct"] == pytest.approx(50 * reports[1]["vertex_distance"])
    fig_rows = polytope_study.figure_rows(two.polys, reports, two.targets, [0, 1], ["a", "b"])
    assert [r["label"] for r in fig_rows] == ["a", "b"] and torch.equal(fig_rows[1]["start"], START[0])
    assert torch.equal(fig_rows[1]["target"], TARGET[0]) and fig_rows[1]["samples"].shape == (1, 1, 2, 3)
    with pytest.raises(ValueError, match="one other image per target"):
        polytope_study.search_two_starts(split, IMAGES, [1, 2], [0], progress=False)
    with pytest.raises(ValueError, match="2 reports per target"):
        polytope_study.two_start_rows(reports[:1], 2.0, [1])
    with pytest.raises(ValueError, match="one label per polytope"):
        polytope_study.figure_rows(two.polys, reports, two.targets, [0, 1], ["a"])


def test_summarise_and_worst_case() -> None:
    rows = [
        fake_row(same_class_pct=100.0, vertex_distance=1.0, ratio_pct=10.0),
        fake_row(same_class_pct=95.0, vertex_distance=3.0, ratio_pct=30.0, sample_act_rel_max=0.2, target=1),
        fake_row(init="other image", sample_prob=0.5, target_prob=0.9, vertex_ineq_max=0.3),
    ]
    summary = polytope_study.summarise(rows, "target")
    assert summary["target"] == "2 targets" and summary["init"] == "target"
    assert summary["same_class_pct"] == 95.0 and summary["vertex_distance"] == 2.0 and summary["ratio_pct"] == 20.0
    assert summary["sample_act_rel_max"] == 0.2 and summary["vertex_ineq_max"] == -0.1  # the other init left out
    assert list(summary) == polytope_study.ROW_COLUMNS
    worst = polytope_study.worst_case(rows)
    assert worst["same_class_pct"] == 95.0 and worst["vertex_ineq_max"] == 0.3
    assert worst["act_rel_max"] == 0.2 and worst["prob_gap"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no rows with init 'nowhere'"):
        polytope_study.summarise(rows, "nowhere")
    with pytest.raises(ValueError, match="no rows"):
        polytope_study.worst_case([])


def test_annotated_sweep_summary_and_figures() -> None:
    start, target = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    near_target = torch.full((2, 1, 2, 2), 0.75)  # 2 vertices, each 0.5 from the target and 1.5 from the start
    near_start = torch.full((2, 1, 2, 2), 0.25)
    sweep = [
        {"lr": 0.1, "steps": 10, "vertex_distance": 1.0, "act_rel_max": 0.5, "vertices": torch.stack([near_start] * 2)},
        {
            "lr": 0.1,
            "steps": 30,
            "vertex_distance": 2.0,
            "act_rel_max": 0.001,
            "vertices": torch.stack([near_target] * 2),
        },
        {
            "lr": 0.5,
            "steps": 10,
            "vertex_distance": 3.0,
            "act_rel_max": 0.002,
            "vertices": torch.stack([near_target] * 2),
        },
    ]
    rows = polytope_study.annotate_sweep(sweep, 10.0, start, target)
    assert "ratio_pct" not in sweep[0]  # the input rows are left alone
    assert [r["ratio_pct"] for r in rows] == [10.0, 20.0, 30.0]
    assert rows[0]["other_to_start"] == pytest.approx(0.5) and rows[0]["other_to_target"] == pytest.approx(1.5)
    assert rows[1]["other_to_start"] == pytest.approx(1.5) and rows[1]["other_to_target"] == pytest.approx(0.5)
    facts = polytope_study.sweep_summary(rows, act_tol=0.01)
    assert facts["ratio_min"] == 10.0 and facts["ratio_max"] == 30.0 and facts["nearer_target"] == 2
    assert facts["tight"]["steps"] == 30 and facts["tight"]["lr"] == 0.1  # the smallest ratio among the tight ones
    assert polytope_study.sweep_summary(rows, act_tol=1e-4)["tight"] is None
    with pytest.raises(ValueError, match="empty sweep"):
        polytope_study.sweep_summary([], 0.01)
    fig = polytope_study.sweep_figure(rows, (12, 13), 0.01)
    assert len(fig.axes) == 2 and [len(ax.get_lines()) for ax in fig.axes] == [2, 3]  # 2 lrs (+ the tolerance line)
    vertex_rows = polytope_study.sweep_vertex_rows(rows, target, start)
    assert [r["label"] for r in vertex_rows] == ["lr 0.1, 10 steps", "lr 0.1, 30 steps", "lr 0.5, 10 steps"]
    assert vertex_rows[0]["samples"].shape == (0, 1, 2, 2) and torch.equal(vertex_rows[1]["vertices"], near_target)


def test_lenet_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.models import train

    canonical = train.CANONICAL["lenet5"]
    monkeypatch.setattr(train, "cached_checkpoint", lambda name: None)
    quick = polytope_study.lenet_recipe(True, "auto")
    assert quick is not canonical and (quick.epochs, quick.train_size) == (1, 10_000) and quick.kind == "lenet5"
    assert (
        polytope_study.lenet_recipe(False, "auto") is canonical
        and polytope_study.lenet_recipe(True, "random") is canonical
    )
    monkeypatch.setattr(train, "cached_checkpoint", lambda name: "cached.pt")
    assert polytope_study.lenet_recipe(True, "auto") is canonical


def test_paper_vs_ours_tables() -> None:
    from helpers.data import paper

    t2 = paper.get("li", "table2")
    row = polytope_study.paper_vs_ours("1", t2["rows"]["1"], t2["image_distance"], fake_row())
    assert row["row"] == "1" and row["init"] == "target" and row["success %"] == "100 / 100.00"
    assert row["image distance"] == "10.21 / 10.00" and row["ratio %"] == f"{100 * 1.33 / 10.21:.1f} / 12.5"
    cell = polytope_study.side_by_side(
        "4", {"success_pct": 100, "target_prob": 0.9, "sample_prob": 0.8, "vertex_distance": 50}, fake_row(), 500
    )
    assert cell["table"] == "4" and cell["ratio %"] == "10.0 / 12.5" and cell["vertex eq. residual"] == "— / 0.0001"
    assert cell["target prob."] == "0.9 / 1.000" and cell["image distance"] == "500 / 10"
    comparison = polytope_study.mnist_comparison(
        paper.get("li"), [fake_row(), fake_row(same_class_pct=97.0)], [fake_row()], 0.98, 0.99, 10.0
    )
    by = {r["quantity"]: r for r in comparison}
    assert by["samples in the target class (%), worst polytope"]["ours"] == 97.0
    assert by["MLP test accuracy (%)"]["ours"] == pytest.approx(98.0) and by["MLP test accuracy (%)"]["paper"] == 96.64
    assert by["vertex / image distance (%), rows 1 / 2"] == {
        "quantity": "vertex / image distance (%), rows 1 / 2",
        "paper": "12-13",
        "ours": "12.5 / 12.5",
    }


def test_mnist_checks_pass_and_fail() -> None:
    criteria = polytope_study.MnistCriteria()
    good = [fake_row() for _ in range(40)]
    checks = polytope_study.mnist_checks(good, ineq_limit=0.05, criteria=criteria)
    assert [ok for ok, _, _ in checks] == [True, True]
    # violating inputs: a search that reaches the polytope for half the polytopes; a sample outside its vertices
    half = [fake_row(vertex_eq_rel_max=0.5 if k % 2 else 1e-4) for k in range(40)]
    assert [ok for ok, _, _ in polytope_study.mnist_checks(half, 0.05, criteria)] == [False, True]
    inactive = [fake_row(vertex_ineq_max=0.2) for _ in range(40)]
    assert not polytope_study.mnist_checks(inactive, 0.05, criteria)[0][0]
    outside = [fake_row(sample_viol_rel_max=0.01, vertex_viol_rel_max=0.001)] + good
    assert [ok for ok, _, _ in polytope_study.mnist_checks(outside, 0.05, criteria)] == [True, False]
    with pytest.raises(ValueError, match="no rows"):
        polytope_study.mnist_checks([], 0.05, criteria)


def test_search_checks_and_cut_error(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    start = torch.full_like(TARGET, 0.9)
    polys = P.find_polytopes(split, TARGET, start, n_vertices=2, config=CONFIG, progress=False)
    reports = P.measure_polytopes(split, TARGET, polys, 20, torch.Generator().manual_seed(0), progress=False)
    rows = [P.table_row(r, 1.0) for r in reports]
    assert [ok for ok, _, _ in P.search_checks(split, polys, rows, "tiny")] == [True, True]
    # violating inputs: an objective that rose; a vertex further from the polytope than its start
    rose = P.Polytopes(**{**polys.__dict__, "loss_curve": torch.tensor([1.0, 2.0])})
    assert [ok for ok, _, _ in P.search_checks(split, rose, rows, "tiny")] == [False, True]
    assert not P.search_checks(split, polys, [dict(rows[0], vertex_viol_rel_max=1e9)], "tiny")[1][0]
    with pytest.raises(ValueError, match="one row per polytope"):
        P.search_checks(split, polys, rows * 2, "tiny")
    x = torch.rand(4, 1, 2, 3)
    assert P.cut_error(split, tiny_relu_net(), x) < 1e-6
    wrong = tiny_relu_net()
    with torch.no_grad():
        wrong[3].bias.fill_(1.0)
    assert P.cut_error(split, wrong, x) > 1e-2  # a cut that does not reproduce the model


def test_measure_polytope_counts_wrong_classes_and_png(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    report = P.measure_polytope(split, TARGET[0], polytope.vertices[0], 30, torch.Generator().manual_seed(0))
    assert report["same_class_k"] == 30 and report["png_n"] == 2 and report["outside_unit_range"] == 0.0
    assert 0 <= report["sample_target_prob_min"] <= report["sample_target_prob"] + 1e-6 <= 1 + 1e-6
    # vertices of another class: samples count as failures, with the (low) probability of the target's class
    other = torch.zeros(2, 1, 2, 3)
    other[:, 0, 0, 1] = 1.0  # unit 1 only: the second logit wins
    bad = P.measure_polytope(split, TARGET[0], other, 30, torch.Generator().manual_seed(0))
    assert bad["same_class_k"] == 0 and bad["sample_target_prob"] < 0.5 and bad["sample_prob"] > 0.5
    assert bad["png_same_class_k"] == 0


def mnist_claims(rows: list[dict], lenet_rows: list[dict], nearer_start: bool = False) -> dict:
    from helpers.data import paper

    row2 = {
        "to_target": torch.tensor([8.0] * 20),
        "to_start": torch.tensor([4.0 if nearer_start else 10.0] * 20),
        "nearer_target": torch.tensor([not nearer_start] * 20),
    }
    facts = {"ratio_min": 4.0, "ratio_max": 18.0, "tight": {"ratio_pct": 18.0}, "nearer_target": 1}
    claims = polytope_study.mnist_claims(
        paper.get("li"), rows, lenet_rows, 0.975, row2, facts, P.MNIST_CONFIG, polytope_study.MnistCriteria()
    )
    return {c["id"]: c for c in claims}


def judged(claims: dict, trained: bool = True) -> dict:
    from helpers.book import results

    return {
        k: results.judge(**{n: v for n, v in c.items() if n != "models"}, trained=trained).status
        for k, c in claims.items()
    }


def full_row(**changes: object) -> dict:
    return fake_row(same_class_k=2000, n_samples=2000, png_same_class_k=8, png_n=8, png_act_rel_max=1e-3) | changes


def test_mnist_claims_reproduced_differs_and_not_checkable() -> None:
    from helpers.book import verdict

    rows = [full_row() for _ in range(20)] + [full_row(init="other image") for _ in range(20)]
    good = mnist_claims(rows, [full_row()] * 4, nearer_start=True)
    assert len(good) == 8 and all("status" not in c for c in good.values())
    status = judged(good)
    assert status.pop("li.mnist.png_round_trip") == status.pop("li.lenet5.same_class") == verdict.BEYOND_HOLDS
    assert set(status.values()) == {verdict.REPRODUCED}, status
    assert good["li.mnist.accuracy"]["ours"] == 97.5 and good["li.mnist.accuracy"]["paper"] == 96.64
    bad_rows = [full_row(same_class_k=1990, ratio_pct=53.9, sample_prob=0.8), full_row(sample_act_rel_max=0.02)]
    bad = judged(mnist_claims(bad_rows, [full_row(same_class_k=1000)] * 2))
    assert bad["li.lenet5.same_class"] == verdict.BEYOND_FAILS
    assert {
        bad[k] for k in bad if k not in ("li.mnist.accuracy", "li.lenet5.same_class", "li.mnist.png_round_trip")
    } == {verdict.DIFFERS}
    random = judged(mnist_claims(bad_rows, [full_row()] * 2), trained=False)
    assert random.pop("li.mnist.activation_match") == verdict.DIFFERS  # decided for any weights
    assert set(random.values()) == {verdict.NOT_CHECKABLE}
    few = mnist_claims([full_row(n_samples=100, same_class_k=100)] * 2, [full_row()] * 2)
    assert judged(few)["li.mnist.same_class"] == verdict.BELOW_BUDGET
