"""The vulnerability-gauge helpers: sweep construction, nullity by construction, attacks, rank statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from helpers import cli
from helpers.book import results, verdict
from helpers.data import photos
from helpers.experiments import gauge
from helpers.models import train
from tests.conftest import needs_mnist


@pytest.mark.parametrize("family,width,shape", [("mlp", 32, (32, 784)), ("patch", 64, (64, 49)), ("cnn", 4, (4, 16))])
def test_first_layer_shape_matches_the_built_model(family: str, width: int, shape: tuple[int, int]) -> None:
    config = gauge.family_config(family, width)
    assert gauge.first_layer_shape(config) == shape
    first = next(m for m in config.build().modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert tuple(first.weight.reshape(first.weight.shape[0], -1).shape) == shape


def test_nullity_w1_sweeps_from_large_to_zero_by_construction() -> None:
    for family, widths in gauge.SWEEP_FULL.items():
        nullities = [gauge.expected_nullity_w1(gauge.family_config(family, w)) for w in widths]
        assert nullities == sorted(nullities, reverse=True) and nullities[0] > 0 and nullities[-1] == 0
        torch.manual_seed(0)
        for w in widths[:3]:
            config = gauge.family_config(family, w)
            assert gauge.first_weight_nullity(config.build()) == gauge.expected_nullity_w1(config)


def test_bad_sweep_inputs_name_what_is_valid() -> None:
    with pytest.raises(ValueError, match="valid: mlp, patch, cnn"):
        gauge.family_config("resnet", 8)
    with pytest.raises(ValueError, match="width must be >= 1"):
        gauge.family_config("mlp", 0)
    configs = gauge.sweep_configs({"mlp": (8, 16)}, seeds=(0, 1), epochs=1, train_size=100)
    assert [(c.kwargs["hidden"][0], c.seed) for c in configs] == [(8, 0), (8, 1), (16, 0), (16, 1)]
    assert len({c.key() for c in configs}) == 4  # distinct cache entries


def test_rank_correlation_matches_scipy_and_bootstraps_whole_groups() -> None:
    rng = np.random.default_rng(0)
    x = np.repeat(np.arange(8.0), 3)
    y = x + rng.normal(0, 2, size=x.size)
    groups = np.repeat(np.arange(8), 3)
    c = gauge.rank_correlation(x, y, groups, n_boot=500)
    assert c.rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert c.lo <= c.rho <= c.hi and c.n == 24 and c.groups == 8
    perfect = gauge.rank_correlation(x, -x, groups, n_boot=200)
    assert perfect.rho == pytest.approx(-1) and perfect.hi == pytest.approx(-1)
    assert math.isnan(gauge.rank_correlation(np.ones(24), y, groups, n_boot=50).rho)
    idx = gauge.cluster_bootstrap_indices(groups, 10, rng)
    assert idx.shape == (10, 24) and all(len(set(groups[row[i : i + 3]])) == 1 for row in idx for i in (0, 3))
    with pytest.raises(ValueError, match="equal size"):
        gauge.cluster_bootstrap_indices([0, 0, 1], 5, rng)


def test_partial_correlation_removes_a_shared_driver() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=300)
    x, y = z + 0.1 * rng.normal(size=300), z + 0.1 * rng.normal(size=300)
    groups = np.arange(300)
    assert gauge.rank_correlation(x, y, groups, n_boot=100).rho > 0.9
    assert abs(gauge.rank_correlation(x, y, groups, control=z, n_boot=100).rho) < 0.2


def test_correlation_table_has_pooled_partial_and_family_cells() -> None:
    rows = [
        {
            "family": f,
            "width": w,
            "seed": s,
            "nullity_w1": max(0, 49 - w),
            "clean_acc": 0.9 + w / 1e3,
            "log10_params": math.log10(100 * w),
            "median_l2": 1.0 + 0.01 * w + 0.001 * s,
        }
        for f in ("mlp", "patch")
        for w in (4, 16, 64)
        for s in (0, 1)
    ]
    table = gauge.correlation_table(rows, ["nullity_w1"], ["median_l2"], n_boot=50)
    assert len(table) == 1 and table[0]["pooled"].rho < 0
    assert set(table[0]) >= {"pooled", "given clean_acc", "given log10_params", "mlp", "patch"}
    assert results.markdown_table(table).count("\n") == 2
    with pytest.raises(KeyError, match="no column 'nope'"):
        gauge.correlation_table(rows, ["nope"], ["median_l2"], n_boot=10)


def _linear_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    nn.init.normal_(model[1].weight, std=0.5)
    return model.eval()


def test_fab_finds_the_analytic_minimal_l2_distance_of_a_linear_model() -> None:
    model = _linear_model()
    images = 0.5 + 0.02 * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images)
    labels = logits.argmax(1)
    w = model[1].weight.detach()
    margins = logits.gather(1, labels[:, None]) - logits  # (8, 10)
    norms = (w[labels][:, None, :] - w[None]).norm(dim=2)  # (8, 10)
    analytic = (
        (margins / norms)
        .where(norms > 0, torch.tensor(math.inf))
        .masked_fill(torch.nn.functional.one_hot(labels, 10).bool(), math.inf)
        .min(1)
        .values
    )
    found = gauge.minimal_l2_distances(model, images, labels, steps=20)
    assert torch.all(found >= analytic * (1 - 1e-4)) and torch.all(found <= analytic * 1.1)
    assert gauge.median_minimal_l2(found) == pytest.approx(float(found.median()))


def test_pgd_budget_zero_is_clean_accuracy_and_robustness_decreases() -> None:
    model = _linear_model()
    images = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(3))
    clean = train.accuracy(model, images, labels)
    assert gauge.pgd_robust_accuracy(model, images, labels, 0.0) == clean
    accs = [gauge.pgd_robust_accuracy(model, images, labels, e, steps=10) for e in (0.01, 0.1, 0.5)]
    assert accs == sorted(accs, reverse=True) and accs[-1] <= clean
    with pytest.raises(ValueError, match="eps must be >= 0"):
        gauge.pgd_robust_accuracy(model, images, labels, -0.1)


def test_misclassified_count_zero_and_median_ignores_them() -> None:
    d = torch.tensor([0.0, 1.0, 2.0, 3.0, math.inf])
    assert gauge.median_minimal_l2(d) == 2.0
    assert math.isnan(gauge.median_minimal_l2(torch.zeros(3)))


@needs_mnist
def test_one_tiny_sweep_point_end_to_end(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    settings = gauge.AttackSettings(eval_size=32, pgd_eps=(0.1,), pgd_steps=3, fab_steps=3)
    config = gauge.family_config("patch", 8, epochs=1, train_size=512)
    (row,) = gauge.run_sweep([config], "cpu", settings, progress=False)
    assert row["nullity_w1"] == row["expected_nullity_w1"] == row["svd_nullity_w1"] == 41
    assert row["w1_shape"] in ([8, 49], [49, 8])
    assert 0 <= row["pgd_acc@0.1"] <= row["eval_clean_acc"] <= 1
    assert row["eval_clean_acc"] == 0 or row["median_l2"] > 0  # the median runs over correctly classified digits
    assert 0 < row["nu_over_n"] <= 1 and 0 <= row["mu_over_n"] <= 1
    must_hold = gauge.sweep_invariants([row], ["patch"], epochs=1, train_size=512)
    assert must_hold[0][0] and must_hold[1][0]  # the audit agrees with the SVD and with rank-nullity
    assert not must_hold[2][0]  # one width does not sweep nullity(W1) to 0
    assert must_hold[3][0] and "reloaded" in must_hold[3][1]  # a fresh audit of the cached model agrees
    fab = gauge.fab_step_check([row], settings, 1, 512, family="patch")  # the model comes back from the cache
    assert (fab["width"], fab["steps"]) == (8, 3)
    if math.isnan(row["median_l2"]):  # no correctly classified digit: the reloaded model has none either
        assert math.isnan(fab["longer"])
    else:
        assert fab["median_l2"] == row["median_l2"] and fab["longer"] > 0
        assert fab["change_pct"] == pytest.approx(100 * (fab["longer"] / row["median_l2"] - 1))


def test_cli_registers_the_gauge_command() -> None:
    from helpers.cli import build_parser

    args = build_parser().parse_args(["gauge", "--quick", "--seeds", "1"])
    assert args.quick and args.seeds == 1 and args.func is cli._gauge_command


def test_minimal_linf_distances_flip_and_are_upper_bounds() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()  # linear: DeepFool lands in one step
    pixels = torch.rand(4, 3, 8, 8) * 0.5 + 0.25
    labels = net(pixels).argmax(1)
    d = gauge.minimal_linf_distances(net, pixels, labels, steps=3)
    assert d.shape == (4,) and torch.isfinite(d).all() and (d > 0).all()
    # the distance is at least the exact l_inf distance to the runner-up's boundary of a linear model
    with torch.no_grad():
        out = net(pixels)
        top2 = out.topk(2, 1)
        w = net[1].weight
        exact = [
            (top2.values[i, 0] - top2.values[i, 1]) / (w[top2.indices[i, 0]] - w[top2.indices[i, 1]]).abs().sum()
            for i in range(4)
        ]
    assert all(float(d[i]) >= float(exact[i]) * 0.999 for i in range(4))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        gauge.minimal_linf_distances(net, pixels, labels, steps=0)


def _loaded(net: nn.Module, pretrained: bool = True) -> SimpleNamespace:
    spec = SimpleNamespace(source="test", name="tiny")
    return SimpleNamespace(is_pretrained=pretrained, model=net, transform=None, spec=spec)


def test_imagenet_row_runs_over_the_natural_photo_set_with_intervals() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).eval()
    _, pixels = photos.natural_image_set(224, photos.NATURAL_IMAGES[:3])
    row = gauge.imagenet_row("tiny", _loaded(net), pixels, (0.0, 1.0), 3, with_audit=False)
    assert row["images"] == 3 and len(row["distances"]) == 3 and row[gauge.IMAGENET_RISK] > 0
    unflipped = sum(not math.isfinite(v) for v in row["distances"])  # only these can keep their class at eps = 1
    assert row[gauge.kept_column(1.0)].startswith(f"{unflipped}/3 (") and row["found"].startswith(f"{3 - unflipped}/3")
    assert gauge.imagenet_columns((0.0,))[-1] == gauge.kept_column(0.0)
    assert gauge.imagenet_labels((1 / 255,))[gauge.kept_column(1 / 255)] == "can keep class at ε=1/255"
    assert gauge.imagenet_input_size(net, "inception_v3") == 299 and gauge.imagenet_input_size(net, "alexnet") == 224


def _substitute(name: str, sum_nullity: int, median: float, **extra) -> dict:
    return {
        "model": name,
        "nullity_w1": 0,
        "structural_nullity_w1": 0,
        "sum_nullity": sum_nullity,
        "structural_sum_nullity": sum_nullity,
        "nu_over_n": 0.34,
        "mu_over_n": 0.34,
        gauge.IMAGENET_RISK: median,
        "distances": [median, 2 * median],
        gauge.kept_column(1 / 255): "0/2",
        **extra,
    }


def test_substitute_claims_never_decide_on_three_models() -> None:
    rows = [
        _substitute("efficientnet_lite0", 7432, 0.05),
        _substitute("efficientnet_lite1", 9672, 0.04),
        _substitute("efficientnet_lite2", 10480, 0.03),
    ]
    corr = gauge.substitute_correlations(rows)
    assert corr["sum_nullity"] == pytest.approx(-1) and math.isnan(corr["nullity_w1"])
    assert gauge.substitutes_support_h(corr) and not gauge.substitutes_support_h({"a": math.nan})
    assert not gauge.substitutes_support_h({"a": -1.0, "b": 0.5}) and not gauge.substitutes_support_h(None)
    assert gauge.smallest_permutation_p(3) == pytest.approx(1 / 6)
    shape, gauge_claim = gauge.substitute_claims(rows, gauge.SUBSTITUTES, 10, trained=True, weights="pretrained")
    assert shape.status == verdict.BEYOND_HOLDS and shape.id.endswith(".trained_substitute")
    assert gauge_claim.status == verdict.BELOW_BUDGET and "trained substitute: EfficientNet-Lite0/1/2" in (
        gauge_claim.description
    )
    assert gauge_claim.reason.endswith("= 0.167")
    # H's direction on enough models is judged by the criterion, not by the budget
    assert (
        gauge.substitute_claims(rows, gauge.SUBSTITUTES, 6, trained=True, weights="p")[1].status
        == (verdict.OUTCOMES["open question"][0])
    )
    deficient = [{**rows[0], "sum_nullity": 7433}, *rows[1:]]
    assert gauge.substitute_claims(deficient, gauge.SUBSTITUTES, 10, trained=True, weights="p")[0].status == (
        verdict.BEYOND_FAILS
    )
    none = gauge.substitute_claims([], gauge.SUBSTITUTES, 10, trained=False, weights="random")
    assert [c.status for c in none] == [verdict.NOT_CHECKABLE] * 2
    assert "no ordering" in gauge.substitute_text(rows, 1 / 255)
    assert gauge.substitute_text([], 1 / 255).startswith("Not measured")
    pvo = gauge.paper_vs_ours([_sweep_row("mlp", 8, 776)], [], None, None, rows)
    assert pvo[-1]["ours"].startswith("3 points, too few to decide")


def test_substitute_invariants_pass_and_fail() -> None:
    good = [_substitute("a", 1, 0.05)]
    assert all(ok for ok, _, _ in gauge.substitute_invariants(good))
    no_flip = [_substitute("a", 1, math.inf)]
    assert [ok for ok, _, _ in gauge.substitute_invariants(no_flip)] == [False, True]
    zero = [{**good[0], "distances": [0.0, 0.1]}]
    assert [ok for ok, _, _ in gauge.substitute_invariants(zero)] == [True, False]


def _corr(rho: float, lo: float, hi: float) -> gauge.Correlation:
    return gauge.Correlation(rho, lo, hi, n=12, groups=6)


BELOW, ACROSS, ABOVE = _corr(-0.8, -0.95, -0.4), _corr(-0.5, -0.9, 0.1), _corr(0.7, 0.4, 0.9)
UNDEFINED = _corr(math.nan, math.nan, math.nan)


def test_supports_h_needs_both_intervals_below_zero() -> None:
    assert gauge.supports_h(BELOW, BELOW)
    assert not gauge.supports_h(BELOW, ACROSS)  # the parameter count explains it
    assert not gauge.supports_h(ACROSS, BELOW)
    assert not gauge.supports_h(ABOVE, BELOW)  # the opposite direction
    assert not gauge.supports_h(BELOW, None)  # no partial correlation (the metric is the control)
    assert not gauge.supports_h(UNDEFINED, BELOW)  # a constant metric gauges nothing
    assert not gauge.supports_h(_corr(-0.5, -0.9, 0.0), BELOW)  # an interval touching 0 is not below it
    assert [gauge.trend(c) for c in (BELOW, ACROSS, ABOVE, UNDEFINED, None)] == [
        "below",
        "across",
        "above",
        "undefined",
        "undefined",
    ]


def _table(pooled: gauge.Correlation, partial: gauge.Correlation | None, metric: str = "nullity_w1") -> list[dict]:
    return [
        {
            "risk": "median_l2",
            "metric": metric,
            "pooled": pooled,
            "given clean_acc": pooled,
            "given log10_params": partial,
            "mlp": _corr(-1, -1, -1),
            "cnn": UNDEFINED,
        }
    ]


def test_evidence_reads_the_table_and_names_missing_metrics() -> None:
    e = gauge.evidence(_table(BELOW, BELOW), "nullity_w1", ["mlp", "cnn"])
    assert e.metrics == ("nullity_w1",) and e.pooled is BELOW and e.partial is BELOW and e.given_accuracy is BELOW
    assert e.text() == (
        "ρ(median ℓ2) = -0.80 [-0.95, -0.40], given log #params -0.80 [-0.95, -0.40]; "
        "mlp: -1.00 [-1.00, -1.00]; cnn: undefined (constant)"
    )
    assert "given log #params —" in gauge.evidence(_table(BELOW, None), "nullity_w1", ["mlp"]).text()
    with pytest.raises(KeyError, match="no correlation of 'sum_nullity'.*valid: nullity_w1"):
        gauge.evidence(_table(BELOW, BELOW), "sum_nullity", [])
    table = _table(BELOW, BELOW) + _table(ACROSS, None, "nu_over_n")
    both = gauge.evidences(table, [("nullity_w1",), ("nu_over_n", "mu_over_n")], ["mlp"])
    assert [x.label for x in both] == ["nullity(W1)", "ν/n = μ/n"]
    assert gauge.pooled_correlations(_table(BELOW, None), "median_l2", ["nullity_w1"]) == {"nullity_w1": BELOW}


def test_metric_groups_merge_only_metrics_equal_in_every_model() -> None:
    rows = [
        _sweep_row("mlp", 8, 776, nu_over_n=1.0, mu_over_n=1.0),
        _sweep_row("mlp", 1024, 0, nu_over_n=0.5, mu_over_n=0.5),
    ]
    rows = [{**r, "sum_nullity": 774 + i} for i, r in enumerate(rows)]
    assert gauge.metric_groups(rows) == [("nullity_w1",), ("sum_nullity",), ("nu_over_n", "mu_over_n")]
    one_differs = [rows[0], {**rows[1], "mu_over_n": 1.0}]
    assert gauge.metric_groups(one_differs) == [("nullity_w1",), ("sum_nullity",), ("nu_over_n",), ("mu_over_n",)]
    assert gauge.identity_text(rows).startswith("ν/n and μ/n are equal in all 2 models")
    assert (
        gauge.identity_text(one_differs)
        == "ν/n and μ/n differ in 1 of 2 models, so they are judged as separate metrics"
    )


def _evidence(pooled, partial, accuracy=None, metrics=("nullity_w1",)) -> gauge.Evidence:
    return gauge.Evidence(tuple(metrics), "median_l2", pooled, partial, accuracy, {"mlp": pooled})


def test_claims_carry_criteria_and_the_rule_decides_them() -> None:
    rows = [_sweep_row("mlp", 8, 776), _sweep_row("mlp", 1024, 0)]
    full = [_sweep_row(f, w, 0) for f, ws in gauge.SWEEP_FULL.items() for w in ws]
    meets, misses = _evidence(BELOW, BELOW), _evidence(BELOW, ACROSS, metrics=("nu_over_n", "mu_over_n"))
    claims = gauge.gauge_claims(full, [meets, misses], None, imagenet_trained=False, imagenet_weights="random")
    assert [c.id for c in claims] == [
        "10.w1_full_rank",
        "10.gauge.nullity_w1",
        "10.gauge.nu_over_n+mu_over_n",
        "10.gauge.imagenet",
    ]
    ok, no = verdict.OUTCOMES["open question"]
    assert [c.status for c in claims] == [verdict.BEYOND_HOLDS, ok, no, verdict.NOT_CHECKABLE]
    assert claims[1].criterion == gauge.H_RULE and claims[3].ours is None and claims[1].budget.startswith("18 of")
    assert "judged once" in claims[2].description and claims[2].reason.endswith("given log #params: contains 0")
    small = gauge.gauge_claims(rows, [meets], None, imagenet_trained=False, imagenet_weights="random")
    assert small[1].status == verdict.BELOW_BUDGET  # 1 width configuration of the full sweep's 18
    measured = gauge.gauge_claims(full, [], {"nu_over_n": ABOVE}, imagenet_trained=True, imagenet_weights="pretrained")
    assert measured[-1].status == no and measured[-1].ours.startswith("nu_over_n: +0.70")
    assert (
        gauge.gauge_claims(full, [], {"nu_over_n": BELOW}, imagenet_trained=True, imagenet_weights="p")[-1].status == ok
    )
    rank_deficient = [{**full[0], "nullity_w1": 777}, *full[1:]]
    assert gauge.gauge_claims(rank_deficient, [], None, imagenet_trained=False, imagenet_weights="r")[0].status == (
        verdict.BEYOND_FAILS
    )
    assert gauge.full_rank_rate(rank_deficient).k == len(full) - 1


def test_imagenet_rule() -> None:
    assert gauge.imagenet_supports_h({"nu_over_n": BELOW, "mu_over_n": BELOW})
    assert not gauge.imagenet_supports_h({"nu_over_n": BELOW, "mu_over_n": ACROSS})
    assert not gauge.imagenet_supports_h({"nu_over_n": BELOW, "mu_over_n": UNDEFINED})
    assert not gauge.imagenet_supports_h({})  # nothing measured supports nothing
    assert not gauge.imagenet_supports_h(None)


def test_prose_follows_the_measurement_both_ways() -> None:
    meets, misses = _evidence(BELOW, BELOW, ACROSS), _evidence(ABOVE, ABOVE, ABOVE, metrics=("sum_nullity",))
    assert gauge.headline([meets, misses]) == "In this run nullity(W1) meets the rule; Σ nullity(W_i) does not."
    assert gauge.headline([misses]) == "In this run none of the Sec. 7 metrics meets the rule (Σ nullity(W_i) do not)."
    assert gauge.headline([meets]) == "In this run every Sec. 7 metric meets the rule (nullity(W1))."
    small = gauge.headline([meets], verdict.Budget(6, 18, "configurations"))
    assert small.startswith("This sweep has 6 of the full sweep's 18 width configurations, too few")
    reading = gauge.reading_markdown([meets, misses]).splitlines()
    assert "**Meets the rule.**" in reading[0] and "accuracy can account for it" in reading[0]
    assert "H's direction" in reading[0] and "against H" in reading[1] and "**Does not meet the rule.**" in reading[1]
    accuracy_too = gauge.reading_markdown([_evidence(BELOW, BELOW, BELOW)])
    assert "**Meets the rule.**" in accuracy_too and "accuracy can account" not in accuracy_too
    across = gauge.reading_markdown([_evidence(ACROSS, None, None)])
    assert "no clear correlation" in across and "— (the metric is the control)" in across
    assert gauge.imagenet_text(None, 0).startswith("Not measured in this build")
    assert "does not meet the rule" in gauge.imagenet_text({"nu_over_n": ACROSS}, 5)
    assert "The set meets the rule" in gauge.imagenet_text({"nu_over_n": BELOW}, 5)
    assert gauge.yardsticks_markdown(
        [
            {"risk": "median_l2", "metric": m, "pooled": c}
            for m, c in (("width", ABOVE), ("log10_params", BELOW), ("clean_acc", ACROSS))
        ]
    ).splitlines() == [
        "* first-layer width q: ρ = +0.70 [+0.40, +0.90]: more of it goes with more robustness",
        "* log10(#parameters): ρ = -0.80 [-0.95, -0.40]: more of it goes with less robustness",
        "* clean accuracy: ρ = -0.50 [-0.90, +0.10]: no clear correlation (the interval contains 0)",
    ]


def test_fab_text_says_whether_the_steps_are_enough() -> None:
    fab = {"family": "mlp", "width": 128, "steps": 10, "median_l2": 1.0, "longer": 1.01, "change_pct": 1.0}
    assert gauge.fab_text(fab).endswith("within ±5%: 10 steps are enough there")
    assert "have not converged" in gauge.fab_text({**fab, "longer": 0.8, "change_pct": -20.0})
    assert gauge.fab_text({**fab, "change_pct": math.nan}).startswith("could not be made")


def _sweep_row(family: str, width: int, nullity: int, **extra) -> dict:
    return {
        "family": family,
        "width": width,
        "seed": 0,
        "n": 2,
        "nullity_w1": nullity,
        "expected_nullity_w1": nullity,
        "svd_nullity_w1": nullity,
        "nu": 1 + (nullity > 0),
        "mu": 1 + (nullity > 0),
        "nu_over_n": (1 + (nullity > 0)) / 2,
        "mu_over_n": (1 + (nullity > 0)) / 2,
        "sum_nullity": 774,
        "median_l2": 1.0 + width / 1e3,
        "fab_failures": 0,
        **extra,
    }


def test_sweep_invariants_pass_and_fail() -> None:
    good = [_sweep_row("mlp", 8, 776), _sweep_row("mlp", 128, 656), _sweep_row("mlp", 1024, 0)]
    must_hold = gauge.sweep_invariants(good, ["mlp"], reload=False)
    assert [ok for ok, _, _ in must_hold] == [True, True, True, True] and must_hold[2][2] == "776 → 0"
    assert not gauge.sweep_invariants(good[:2], ["mlp"], reload=False)[2][0]  # does not reach 0
    rising = [good[2], _sweep_row("mlp", 16, 900), good[0]]  # not decreasing with the width
    assert not gauge.sweep_invariants(rising, ["mlp"], reload=False)[2][0]
    svd_off = [{**good[0], "svd_nullity_w1": 775}, *good[1:]]  # the audit and the SVD disagree
    assert [ok for ok, _, _ in gauge.sweep_invariants(svd_off, ["mlp"], reload=False)] == [False, True, True, True]
    assert gauge.svd_mismatches(svd_off) == [svd_off[0]]
    transposed = [{**good[0], "nullity_w1": 0, "svd_nullity_w1": 0}, *good[1:]]  # W1 read as (p, q): nullity q - q
    oks = [ok for ok, _, _ in gauge.sweep_invariants(transposed, ["mlp"], reload=False)]
    assert oks[1] is False and gauge.rank_nullity_violations(transposed) == [transposed[0]]
    no_fab = [*good[:2], {**good[2], "median_l2": math.inf, "fab_failures": 3}]
    assert [ok for ok, _, _ in gauge.sweep_invariants(no_fab, ["mlp"], reload=False)][-1] is False
    empty = gauge.sweep_invariants(good, ["cnn"], reload=False)[2]
    assert not empty[0] and empty[2] == "no models"


def test_reload_check_fails_when_the_table_and_a_fresh_audit_disagree(monkeypatch) -> None:
    torch.manual_seed(0)
    model = gauge.family_config("mlp", 8).build()
    monkeypatch.setattr(gauge.train, "train_mnist", lambda *a, **k: SimpleNamespace(model=model))
    row = {**_sweep_row("mlp", 8, 776), **gauge.audit_metrics(model), "median_l2": 1.0}
    (ok,) = [ok for ok, what, _ in gauge.sweep_invariants([row], ["mlp"]) if "reloaded" in what]
    assert ok
    (ok,) = [
        ok for ok, what, _ in gauge.sweep_invariants([{**row, "nu": row["nu"] + 1}], ["mlp"]) if "reloaded" in what
    ]
    assert not ok


def test_tables_and_texts_of_the_chapter() -> None:
    plan = gauge.plan_table({"mlp": (8, 1024), "cnn": (4, 32)})
    assert plan == [
        {"family": "mlp", "widths q": "8, 1024", "inputs p": 784, "nullity(W1) expected": "776, 0"},
        {"family": "cnn", "widths q": "4, 32", "inputs p": 16, "nullity(W1) expected": "12, 0"},
    ]
    settings = gauge.QUICK_ATTACKS
    configs = gauge.sweep_configs({"mlp": (8,)}, seeds=(0, 1), epochs=1, train_size=300)
    text = gauge.describe_sweep(configs, (0, 1), 1, 300, settings)
    assert text.startswith("2 models: 2 seed(s) each, 1 epoch(s) on 300 training digits")
    labels = gauge.column_labels(settings)
    assert labels[gauge.pgd_column(0.05)] == "PGD acc ε=0.05" and labels["nullity_w1"] == "nullity(W1)"
    run = [_sweep_row("mlp", 8, 776, from_cache=True, attack_seconds=2.0)] * 2
    assert gauge.describe_run(run) == "trained now: 0 of 2 models; attack time 4 s; FAB failures: 0"
    rows = [_sweep_row("mlp", 8, 776), _sweep_row("mlp", 1024, 0), _sweep_row("cnn", 4, 12)]
    pvo = gauge.paper_vs_ours(rows, [_evidence(ACROSS, ACROSS)], None)
    assert [r["ours"][:22] for r in pvo] == [
        "3/3 (100%, 95% CI [44%",
        "does not meet H's rule",
        "needs pretrained Image",
    ]
    small = gauge.paper_vs_ours(rows, [_evidence(BELOW, BELOW)], None, gauge.sweep_budget(rows))
    assert small[1]["ours"].startswith("sweep too small to decide; as measured, meets H's rule: ")
    assert gauge.correlation_records({"mu_over_n": _corr(0.1, -0.2, 0.4)})[0]["metric"] == "μ/n"
    numbers = gauge.sweep_numbers(rows, 1, None, settings)
    assert numbers == {
        "models": 3,
        "configurations": 3,
        "seeds": 1,
        "epochs": 1,
        "train_digits": 60000,
        "eval_digits": settings.eval_size,
        "clusters_min": 1,
        "clusters_max": 2,
    }
    book = gauge.bookkeeping_markdown(rows).splitlines()
    assert book[0] == (
        "* `mlp` (q = 8 → 1024): nullity(W1) 776 → 0, Σ nullity 774 → 774; 2 weight matrices; ν/n takes 2 value(s): "
        "0.50, 1.00"
    )
    extra = gauge.results_extra(rows, [], settings, [], 1, None, (0,))
    assert extra["rows"] == rows and extra["settings"]["eval_size"] == settings.eval_size and extra["seeds"] == [0]
    assert extra["metric_groups"][0] == ["nullity_w1"]
    with pytest.raises(ValueError, match="no 'cnn' rows"):
        gauge.fab_step_check(rows[:2], settings, 1, 300, family="cnn")
    assert (
        gauge.sweep_budget(rows).below
        and not gauge.sweep_budget([_sweep_row(f, w, 0) for f, ws in gauge.SWEEP_FULL.items() for w in ws]).below
    )


def test_imagenet_rows_keep_pretrained_models_and_forget_each() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Linear(4 * 28 * 28, 10)).eval()
    loaded = {"a": _loaded(net), "b": _loaded(net, pretrained=False)}
    forgotten: list[str] = []
    calls: list[str] = []

    def fake_row(name, model, pixels, eps, steps):
        calls.append(name)
        assert pixels.shape == (1, 3, 32, 32)
        return {"model": name, **{m: 1.0 for m in gauge.PAPER_METRICS}, gauge.IMAGENET_RISK: 0.5}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gauge, "imagenet_row", fake_row)
        got = gauge.imagenet_rows(loaded.__getitem__, ["a", "b"], ["cat"], (0.01,), 2, forgotten.append, size=32)
    assert calls == ["a"] and [r["model"] for r in got] == ["a"] and forgotten == ["a", "b"]
    rows = [
        {"model": m, **{k: float(i) for k in gauge.PAPER_METRICS}, gauge.IMAGENET_RISK: -i}
        for i, m in enumerate("abcd")
    ]
    corr = gauge.imagenet_correlations(rows, n_boot=50)
    assert set(corr) == set(gauge.PAPER_METRICS) and all(c.rho == pytest.approx(-1) for c in corr.values())


def test_figures_return_figures() -> None:
    import matplotlib.pyplot as plt

    rows = [
        {**_sweep_row(f, w, max(0, 49 - w)), "clean_acc": 0.9, "sum_nullity": 10, "nu_over_n": 0.5, "mu_over_n": 0.5}
        for f in ("patch", "cnn")
        for w in (4, 64)
    ]
    fig = gauge.plot_risk_vs_metrics(rows, gauge.PAPER_METRICS, "median_l2", None, "l2")
    assert len(fig.axes) == 4
    plt.close(fig)
    fig = gauge.plot_confounders(rows, "median_l2")
    assert len(fig.axes) == 3
    plt.close(fig)
    fig = gauge.plot_substitutes([_substitute("a", 1, 0.05), _substitute("b", 2, math.inf)], (1 / 255,))
    assert len(fig.axes) == 1
    plt.close(fig)
