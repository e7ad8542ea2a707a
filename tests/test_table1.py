"""The Table 1 study: the verdict logic (implied n, row checks, claims), the tables and figures, on tiny models."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from helpers.book import results, verdict
from helpers.experiments import audit, table1
from helpers.models import registry


def _tiny() -> nn.Sequential:
    """W1 = conv 4 x 27 (wide, nullity >= 23), then linear 20 x 10 (tall, 0), linear 5 x 20 (wide, 15)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 20), nn.Linear(20, 5))


#: Paper numbers that fit _tiny() exactly: n = 3 (2/3 = 66.7% printed 66%), mu = nu = 2, sum 38, nullity(W1) 23.
FITTING_ROW: dict[str, Any] = {
    "task": "classification",
    "nu": 2,
    "nu_over_n_pct": 66,
    "mu": 2,
    "mu_over_n_pct": 66,
    "sum_nullity": 38,
    "nullity_W1": 23,
}


def _check(**paper: Any) -> table1.RowCheck:
    return table1.check_row("Tiny", "tiny", audit.structural_audit(_tiny()), {**FITTING_ROW, **paper})


def test_implied_n_truncates_and_rejects_rounding_up() -> None:
    assert 8 in table1.implied_n(7, 87)  # 87.5% printed 87%
    assert 8 not in table1.implied_n(7, 88)  # rounding would print 88%: Table 1 does not round
    assert table1.implied_n(2, 66) == {3}
    assert table1.implied_n(36, 66) & table1.implied_n(33, 61) == {54}
    assert table1.implied_n(46, 47) & table1.implied_n(25, 25) == {97}  # ViT-Large: 98 is not allowed
    assert table1.implied_n(3, 101) == set() and table1.implied_n(3, 100) == {3}
    with pytest.raises(ValueError, match="count must be >= 1"):
        table1.implied_n(0, 0)  # 0 matrices are 0% of every n: no n implied


def test_check_row_reads_the_audit_and_the_paper() -> None:
    c = _check()
    assert (c.row, c.model, c.n, c.n_implied, c.mu, c.mu_paper) == ("Tiny", "tiny", 3, [3], 2, 2)
    assert (c.structural_nu, c.structural_sum, c.structural_w1, c.w1_cols) == (2, 38, 23, 27)
    assert c.n_fits and c.mu_fits and c.impossible == [] and c.fits
    assert c.trained_excess == {"nu": 0, "sum_nullity": 0, "nullity_w1": 0}
    trained = _check(nu=3, nu_over_n_pct=100, sum_nullity=45, nullity_W1=25)  # training can only add nullity
    assert trained.fits and trained.trained_excess == {"nu": 1, "sum_nullity": 7, "nullity_w1": 2}


def test_row_check_fails_on_each_violation() -> None:
    wrong_n = _check(nu_over_n_pct=50, mu_over_n_pct=50)  # 2/4: the percentages imply n = 4
    assert wrong_n.n_implied == [4] and not wrong_n.n_fits and wrong_n.mu_fits and not wrong_n.fits
    wrong_mu = _check(mu=1, mu_over_n_pct=33)
    assert wrong_mu.n_fits and not wrong_mu.mu_fits and not wrong_mu.fits
    low_nu = _check(nu=1, nu_over_n_pct=33)  # two wide matrices force nu >= 2
    assert low_nu.impossible == ["nu 1 outside [2, 3]"] and not low_nu.fits
    low_sum = _check(sum_nullity=30)
    assert low_sum.impossible == ["sum of nullities 30 < 38 forced by the shapes"] and not low_sum.fits
    for w1 in (22, 28):  # below cols - rows = 23, or above cols = 27
        assert _check(nullity_W1=w1).impossible == [f"nullity(W1) {w1} outside [23, 27]"]
    assert len(_check(nu=1, nu_over_n_pct=33, sum_nullity=30, nullity_W1=30).impossible) == 3


def test_candidates_put_the_registry_choice_first() -> None:
    squeeze = table1.candidates("Squeezenet")
    assert squeeze[0] == registry.TABLE1_ROWS["Squeezenet"] and "squeezenet1_0" in squeeze
    assert len(set(squeeze)) == len(squeeze)
    mobilenet = table1.candidates("MobileNet-V3")
    assert mobilenet[0] == registry.TABLE1_ROWS["MobileNet-V3"] and len(mobilenet) == 4
    assert table1.candidates("AlexNet") == (registry.TABLE1_ROWS["AlexNet"],)  # no alternatives listed
    assert all(name in registry.REGISTRY for row in table1.CANDIDATES for name in table1.candidates(row))
    with pytest.raises(KeyError):
        table1.candidates("LeNet")


def test_constructors_quick_rows_and_classifiers() -> None:
    rows = {"Squeezenet": FITTING_ROW, "AlexNet": FITTING_ROW, "VGG-16": {**FITTING_ROW, "task": "segmentation"}}
    assert table1.constructors(rows) == {r: registry.TABLE1_ROWS[r] for r in rows}
    assert table1.rows_to_audit(rows, quick=True) == ["Squeezenet"]  # squeezenet1_1 is a quick model
    assert table1.rows_to_audit(rows, quick=False) == list(rows)
    assert table1.classifier_models(rows) == [registry.TABLE1_ROWS["Squeezenet"], registry.TABLE1_ROWS["AlexNet"]]
    assert table1.naive_test_models(True) == list(table1.QUICK_MODELS[:2])
    assert len(table1.naive_test_models(False)) == len(table1.QUICK_MODELS) + len(table1.EXTRA_TEST_MODELS)


def test_matrix_rule_table_of_the_example() -> None:
    records = table1.matrix_rule_table(table1.matrix_rule_example())
    got = [(r["rule"], r["name"], r["matrix"], r["kind"], r["structural nullity"]) for r in records]
    assert got == [
        ("skip", "0.weight", (6, 36), "conv", 30),  # grouped conv: out x (in/groups * 3 * 3)
        ("skip", "3.weight", (3, 10), "linear", 7),
        ("operator", "1.weight", (16, 6), "conv_transpose", 0),  # (out * 2 * 2) x in
    ]


def test_w1_order_row_sees_registration_and_execution_disagree() -> None:
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, runs last
            self.stem = nn.Conv2d(1, 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.stem(x).mean((2, 3)))

    example = torch.zeros(1, 1, 3, 3)
    straight = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 2))
    assert table1.w1_order_row("straight", straight, torch.zeros(1, 3, 5, 5))["same"]
    bad = table1.w1_order_row("backwards", Backwards(), example)
    assert bad["W1 (registration order)"] == "head.weight" and bad["first executed"] == "stem" and not bad["same"]


def test_frozen_layers_table_counts_frozen_matrices_only_when_asked() -> None:
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.body = nn.Sequential()
    model.backbone.body.add_module("conv1", nn.Conv2d(3, 4, 3))
    model.backbone.body.add_module("layer2", nn.Conv2d(4, 8, 1))
    every, trainable = table1.frozen_layers_table(model, trainable=("layer2",))
    assert (every["n"], every["W1"], every["W1 shape"], every["structural nullity(W1)"]) == (
        2,
        "backbone.body.conv1.weight",
        (4, 27),
        23,
    )
    assert (trainable["n"], trainable["W1"], trainable["mu"]) == (1, "backbone.body.layer2.weight", 0)
    assert not model.backbone.body.conv1.weight.requires_grad and model.backbone.body.layer2.weight.requires_grad


def test_fit_and_conv_transpose_tables() -> None:
    good, bad = _check(), _check(sum_nullity=30)
    fit = table1.fit_table([good, bad])
    assert [r["fits"] for r in fit] == ["yes", "no"] and fit[1]["impossible paper numbers"].startswith("sum")
    assert fit[0]["mu (ours/paper)"] == "2/2"
    other = table1.check_row("Tiny", "other", audit.structural_audit(_tiny()), FITTING_ROW)
    by_rule = {"skip": [good, other], "operator": [bad]}
    ct = table1.conv_transpose_table(by_rule, {"Tiny": "tiny"}, rows=("Tiny",))
    assert [(r["conv-transpose rule"], r["fits"]) for r in ct] == [("skip", True), ("operator", False)]
    assert table1.conv_transpose_table(by_rule, {"Tiny": "tiny"}, rows=("Mask R-CNN",)) == []
    assert table1.chosen_checks([good, other], {"Tiny": "other"}) == {"Tiny": other}


def _loaded(weights: str = "random") -> SimpleNamespace:
    return SimpleNamespace(
        weights=weights,
        is_pretrained=weights == "pretrained",
        model=_tiny(),
        caption=lambda: f"tiny, {weights} weights",
    )


def _audits(model: nn.Module | None = None, weights: str = "random", rows: tuple[str, ...] = ("Tiny",)) -> Any:
    """Table1Audits of ``rows`` (every row the same tiny model) as audit_rows builds them."""
    model = model or _tiny()
    load = lambda name: SimpleNamespace(**{**vars(_loaded(weights)), "model": model})  # a fresh LoadedModel each time
    return table1.audit_rows(load, rows, {r: "tiny" for r in rows}, keep=())


def test_audit_rows_audits_both_dtypes_and_drops_big_models(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    audits = _audits(rows=("Tiny", "Tiny2"))
    assert audits.rows == ["Tiny", "Tiny2"] and audits.pretrained == {"Tiny": False, "Tiny2": False}
    a64, a32 = audits.audits64["Tiny"], audits.audits32["Tiny"]
    assert (a64.dtype, a32.dtype, a64.model, a64.weights) == ("float64", "float32", "tiny", "random")
    assert (a64.n, a64.nu, a64.mu, a64.sum_nullity, a64.nullity_w1) == (3, 2, 2, 38, 23)
    assert audits.w1s["Tiny"].shape == (4, 27) and audits.loaded["Tiny"].model is None  # not in keep
    assert audits.weights_caption == "tiny, random weights"
    table = table1.results_table(
        audits, {"Tiny": FITTING_ROW, "Tiny2": FITTING_ROW}, {"Tiny": _check(), "Tiny2": _check()}
    )
    assert [(r["nu"], r["nu f32"], r["W1 f32"], r["weights"]) for r in table] == [(2, 2, 23, "random")] * 2
    assert table1.page_rows(table)[0]["float32 ν / Σ / W1"] == "2 / 38 / 23"


def _rank_deficient_tiny() -> nn.Sequential:
    model = _tiny()
    with torch.no_grad():
        model[2].weight[:, 5:] = 0  # linear 20 x 10 now has rank 5: nullity 5
    return model


def _judge(claim: dict[str, Any], trained: bool) -> results.Claim:
    """A claim dict of table1 judged as ``Chapter.claim`` judges it."""
    return results.judge(**{k: v for k, v in claim.items() if k != "models"}, trained=trained)


@pytest.mark.parametrize(
    "weights,model,paper,status",
    [
        ("random", _tiny, {}, verdict.NOT_CHECKABLE),
        ("pretrained", _tiny, {}, verdict.REPRODUCED),
        ("pretrained", _rank_deficient_tiny, {"nu": 3, "nu_over_n_pct": 100, "sum_nullity": 43}, verdict.REPRODUCED),
        ("pretrained", _tiny, {"sum_nullity": 40}, verdict.DIFFERS),
        ("random", _tiny, {"sum_nullity": 40}, verdict.NOT_CHECKABLE),
    ],
)
def test_nullity_claim_goes_through_its_criterion(tmp_path, monkeypatch, weights, model, paper, status) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    audits = _audits(model(), weights)
    row = {**FITTING_ROW, **paper}
    claims = table1.row_claims(audits, {"Tiny": row}, {"Tiny": _check(**paper)}, {})
    nullities = _judge(claims[1], weights == "pretrained")
    assert nullities.status == status and "float32 precision" in nullities.criterion
    assert "status" not in claims[1] and claims[1]["models"] == ("tiny",)


def test_shape_claim_is_an_identification_when_the_constructor_was_fitted(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    audits = _audits()

    def shape(fitted: dict[str, str], **paper: Any) -> results.Claim:
        claims = table1.row_claims(audits, {"Tiny": {**FITTING_ROW, **paper}}, {"Tiny": _check(**paper)}, fitted)
        return _judge(claims[0], False)  # shapes decide: random weights suffice

    assert shape({}).status == verdict.REPRODUCED and shape({}).criterion.startswith("n ∈ [3]")
    fitted = shape({"Tiny": "tiny chosen because other does not fit"})
    assert fitted.status == verdict.IDENTIFIED and fitted.reason.startswith("tiny chosen")
    wrong_n = shape({}, nu_over_n_pct=50, mu_over_n_pct=50)
    assert wrong_n.status == verdict.DIFFERS and "percentages imply n in [4]; tiny has 3" in wrong_n.reason
    wrong_mu = shape({"Tiny": "fitted"}, mu=1, mu_over_n_pct=33)
    assert wrong_mu.status == verdict.DIFFERS and "mu 2 vs 1" in wrong_mu.reason


def test_attainable_claim_differs_on_an_impossible_paper_number(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    audits = _audits(rows=("A", "B"))
    ok = _judge(table1.attainable_claim(audits, {"A": _check(), "B": _check()}), False)
    assert ok.status == verdict.REPRODUCED and ok.ours.startswith("2/2") and ok.reason == ""
    bad = _judge(table1.attainable_claim(audits, {"A": _check(), "B": _check(nullity_W1=20)}), False)
    assert bad.status == verdict.DIFFERS and bad.reason == "B: nullity(W1) 20 outside [23, 27]"


def test_fitted_rows_names_rows_whose_candidates_disagree() -> None:
    good, bad = _check(), table1.check_row("Tiny", "other", audit.structural_audit(nn.Linear(4, 2)), FITTING_ROW)
    assert table1.fitted_rows([good, bad], {"Tiny": "tiny"}) == {"Tiny": "tiny chosen because other does not fit"}
    assert table1.fitted_rows([good, good], {"Tiny": "tiny"}) == {}  # candidates agree: nothing was fitted
    assert table1.fitted_rows([bad], {"Tiny": "other"}) == {}  # a single candidate that does not fit differs
    mask = table1.check_row("Mask R-CNN", "tiny", audit.structural_audit(_tiny()), FITTING_ROW)
    assert "transposed convolutions" in table1.fitted_rows([mask], {"Mask R-CNN": "tiny"})["Mask R-CNN"]


def test_claims_table_reads_the_recorded_claims(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    claims = [_judge(c, False) for c in table1.row_claims(_audits(), {"Tiny": FITTING_ROW}, {"Tiny": _check()}, {})]
    rows = table1.claims_table(claims)
    assert [(r["claim"], r["result"]) for r in rows] == [
        ("01.Tiny.shape", verdict.REPRODUCED),
        ("01.Tiny.nullities", verdict.NOT_CHECKABLE),
    ]


def test_independent_checks_pass_and_fail(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    audits = _audits(_rank_deficient_tiny())
    recs = audits.independent["Tiny"]
    assert {r["precision"] for r in recs} == {"float32", "float64"} and all(r["agree"] for r in recs)
    assert [r["matrix"] for r in recs if r["precision"] == "float32"] == ["0.weight", "2.weight", "3.weight"]
    assert all(ok for ok, _, _ in table1.independent_checks(audits))
    # violating inputs: an audit rank numpy does not confirm; a float32 rank at the threshold (not robust)
    audits.independent["Tiny"] = [{**recs[0], "audit rank": recs[0]["audit rank"] - 1, "agree": False}, *recs[1:]]
    assert [ok for ok, _, _ in table1.independent_checks(audits)] == [False, True, True]
    audits.independent["Tiny"] = [{**recs[0], "robust": False, "margin": 1e-14}, *recs[1:]]
    got = table1.independent_checks(audits)
    assert [ok for ok, _, _ in got] == [True, False, True] and "margin 1e-14" in got[1][2]
    audits.independent["Tiny"] = []
    assert not any(ok for ok, _, _ in table1.independent_checks(audits))  # nothing sampled is a failure


class _Reordered(nn.Module):
    """A model whose first registered layer is not the first one the input meets."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.stem = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


def test_w1_order_checks_fail_on_a_reordered_model() -> None:
    rows = [table1.w1_order_row("tiny", nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)), torch.zeros(1, 6))]
    rows.append(table1.w1_order_row("reordered", _Reordered(), torch.zeros(1, 6)))
    assert [ok for ok, _, _ in table1.w1_order_checks(rows)] == [True, False]
    assert table1.w1_order_checks(rows)[1][2] == "head.weight / stem"


def test_prose_numbers_come_from_the_shapes() -> None:
    from helpers.data import paper

    numbers = table1.prose_numbers(paper.get("ozbulak", "table1", "rows"))
    assert (numbers["alex_mu"], numbers["alex_n"], numbers["alex_mu_printed"]) == (7, 8, 87)
    assert numbers["ret_w1_min"] == numbers["ret_w1_cols"] - numbers["ret_w1_rows"] > numbers["ret_paper_w1"]
    assert numbers["vitl_implied"] == "97" and numbers["vitl_n"] == 98
    assert numbers["psp1_sum"] > numbers["psp_paper_sum"]


def test_with_spectrum_has_exactly_the_given_singular_values() -> None:
    sigma = torch.tensor([3.0, 2.0, 1e-9], dtype=torch.float64)
    m = table1.with_spectrum(3, 7, sigma, torch.Generator().manual_seed(0))
    assert m.shape == (3, 7) and m.dtype == torch.float64
    assert torch.allclose(torch.linalg.svdvals(m), sigma, atol=1e-12)
    again = table1.with_spectrum(3, 7, sigma, torch.Generator().manual_seed(0))
    assert torch.equal(m, again)
    with pytest.raises(ValueError, match="min\\(rows, cols\\) = 3"):
        table1.with_spectrum(3, 7, torch.ones(7), torch.Generator())


def test_near_threshold_check_and_rank_path_checks() -> None:
    near = table1.near_threshold_check(0, shapes=((12, 30), (30, 12), (20, 20)), factors=(0.1, 1.0, 10.0, 1e4))
    assert [(r["dtype"], r["matrices"], r["disagreements"]) for r in near] == [("float64", 12, 0), ("float32", 12, 0)]
    assert any(r["certified"] for r in near)
    bench = [
        {"naive s": 3.0, "fast s": 1.0, "matrices": 5, "rank disagreements": 0},
        {"naive s": 1.0, "fast s": 1.0, "matrices": 7, "rank disagreements": 0},
    ]
    totals = table1.bench_totals(bench)
    assert totals == {"naive s": 4.0, "fast s": 2.0, "ratio": 2.0, "matrices": 12, "disagreements": 0}
    assert all(ok for ok, _, _ in table1.rank_path_checks(totals, near))
    bad = table1.rank_path_checks({**totals, "disagreements": 1}, [{**near[0], "disagreements": 2}])
    assert [ok for ok, _, _ in bad] == [False, False] and bad[1][2] == 2


def test_figures_have_one_panel_per_row(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    audits = _audits(rows=("A", "B", "C", "D", "E"))
    fig = table1.plot_w1_spectra(audits)
    assert len(fig.axes) == 8 and sum(ax.axison for ax in fig.axes) == 5  # 2 lines of 4, 3 switched off
    plt.close(fig)
    paper = {r: {**FITTING_ROW, "task": t} for r, t in zip("ABCDE", ("localization", *["classification"] * 4))}
    fig = table1.plot_by_task(audits, paper)
    assert len(fig.axes) == 2 and [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["B", "C", "D", "E", "A"]
    plt.close(fig)
    rtols = [1e-16, 1e-8, 1e-1]
    fig = table1.plot_tolerance_sweep(rtols, {"tiny": {"nu": [2, 2, 3], "sum_nullity": [38, 38, 40]}})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 1
    plt.close(fig)
