"""Trained substitutes and grouped convolutions in the Table 1 study: the readings, the check, the claims."""

from __future__ import annotations

import torch
from torch import nn

from helpers.book import verdict
from helpers.experiments import audit, table1
from helpers.models import registry


def test_group_blocks_and_block_diagonal_follow_the_patch_layout() -> None:
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=False)
    blocks = audit.group_blocks(conv.weight, 2)
    assert blocks.shape == (2, 3, 18)
    m = audit.block_diagonal_matrix(conv.weight, 2)
    patch = torch.randn(4, 3, 3)
    direct = nn.functional.conv2d(patch[None], conv.weight, groups=2).flatten()
    assert torch.allclose(m @ patch.flatten(), direct, atol=1e-5)
    try:
        audit.group_blocks(conv.weight, 4)
    except ValueError as err:
        assert "divide" in str(err)
    else:
        raise AssertionError("groups that do not divide the outputs must fail")


def test_depthwise_reading_stacked_vs_block_diagonal() -> None:
    torch.manual_seed(0)
    dw = nn.Conv2d(12, 12, 3, groups=12, bias=False)
    with torch.no_grad():
        dw.weight[5].zero_()  # one dead channel
    r = audit.grouped_reading("dw.weight", dw.weight, 12)
    assert r.stacked_shape == (12, 9) and r.stacked_nullity == 0  # 12 generic filters span all 9 pixels
    assert r.block_shape == (12, 108) and r.block_rank == 11 and r.block_nullity == 108 - 11
    assert sorted(set(r.group_nullities)) == [8, 9] and r.group_nullities[5] == 9
    rows = table1.depthwise_table(r)
    assert [x["nullity"] for x in rows] == [0, 97, "8/9"]
    readings = audit.grouped_readings(nn.Sequential(nn.Conv2d(3, 12, 1), dw))
    assert [x.name for x in readings] == ["1.weight"] and table1.pick_depthwise(readings).name == "1.weight"
    nums = table1.depthwise_numbers(
        r, readings, {"stacked": {"sum": 0, "nu": 0}, "block-diagonal": {"sum": 1, "nu": 1}}
    )
    assert nums["dw_dead"] == 1 and nums["dw_expected"] == 96


def test_grouped_totals_swap_in_the_block_diagonal_nullity() -> None:
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.Conv2d(12, 12, 3, groups=12))
    a = audit.audit_model(model, dtype=torch.float32, cache=False)
    totals = table1.grouped_totals(a, audit.grouped_readings(model))
    assert totals["stacked"] == {"nu": 1, "mu": 1, "sum": 27 - 12}
    assert totals["block-diagonal"] == {"nu": 2, "mu": 2, "sum": 15 + 12 * 8}


def test_depthwise_null_check_passes_on_a_null_patch_and_fails_otherwise() -> None:
    dw = nn.Conv2d(16, 16, 3, groups=16, bias=False)
    ok, what, measured = table1.depthwise_null_check(table1.depthwise_null_test(dw.weight, 16, seed=1))
    assert ok, measured
    gen = torch.Generator().manual_seed(0)
    wrong = torch.randn(16, 3, 3, generator=gen, dtype=torch.float64)  # not in the kernel
    moved = audit.patch_response_change(dw.weight, 16, wrong / wrong.norm())
    violating = {"null": moved, "random": moved, "ratio": 1.0}
    assert not table1.depthwise_null_check(violating)[0]
    assert not table1.depthwise_null_check({"null": 0.0, "random": 0.0, "ratio": 0.0})[0]  # no power: fails


def _substitute(stem_twins: bool) -> table1.SubstituteAudit:
    """A fake substitute: a tiny model 'trained' (two twin stem columns if ``stem_twins``) and 'random'."""
    torch.manual_seed(0)
    models = {w: nn.Sequential(nn.Conv2d(3, 32, 3), nn.Flatten(), nn.Linear(8, 8)) for w in table1.WEIGHT_SETS}
    if stem_twins:
        with torch.no_grad():
            w = models["trained"][0].weight
            w[:, 1, 1, 2] = w[:, 1, 1, 1]
    audits = {
        (w, p): audit.audit_model(models[w], dtype=getattr(torch, p), cache=False)
        for w in table1.WEIGHT_SETS
        for p in table1.PRECISIONS
    }
    return table1.SubstituteAudit(
        "efficientnet_lite0",
        audits,
        {w: audit.spectra(models[w]) for w in table1.WEIGHT_SETS},
        {w: audit.weight_matrices(models[w])[0] for w in table1.WEIGHT_SETS},
        True,
    )


def test_substitute_numbers_claims_and_tables() -> None:
    subs = {"efficientnet_lite0": _substitute(True)}
    paper_rows = {"A": {"nu": 5, "mu": 2}, "B": {"nu": 3, "mu": 3}}
    nums = table1.substitute_numbers(subs, paper_rows)
    assert nums["sub_sum_gain32"] == 1 and nums["sub_nu_mu32"] == 1  # the 32x27 stem is tall: nu grows, mu not
    assert nums["sub_sum_gain64"] == 1  # exact twins: null at float64 too
    assert nums["sub_past_w1_32"] == 0 and nums["paper_nu_gt_mu"] == 1 and nums["paper_past_w1"] == 1
    assert nums["paper_max_nu_mu"] == 3
    claims = {c["id"]: c for c in table1.substitute_claims(subs, nums)}
    judged = {k: verdict.status_of(c["criterion"], c["ours"]) for k, c in claims.items()}
    assert judged["01.training_adds_nullity.trained_substitute"] == verdict.OUTCOMES["beyond"][0]
    assert judged["01.training_nullity_past_w1.trained_substitute"] == verdict.OUTCOMES["beyond"][1]
    assert all(c["criterion"].needs_trained and c["models"] == ("efficientnet_lite0",) for c in claims.values())
    assert all("trained substitute" in c["description"] for c in claims.values())
    loss = table1.rank_loss_table(subs)
    assert [(r["matrix"], r["precision"], r["gain"]) for r in loss] == [
        ("0.weight", "float32", 1),
        ("0.weight", "float64", 1),
    ]
    assert table1.twin_columns(subs["efficientnet_lite0"].w1["trained"])[0]["column a"] == (1, 1, 1)
    assert table1.twin_columns(subs["efficientnet_lite0"].w1["random"]) == []
    assert len(table1.substitute_table(subs)) == 4
    prose = table1.substitute_prose(subs, nums)
    assert prose["sub_twins"] == 1 and "W1" in prose["sub_where"]


def test_no_gain_without_twins() -> None:
    subs = {"efficientnet_lite0": _substitute(False)}
    nums = table1.substitute_numbers(subs, {"A": {"nu": 1, "mu": 1}})
    assert nums["sub_sum_gain32"] == 0 and nums["sub_sum_gain64"] == 0


def test_first_departure_and_models() -> None:
    assert table1.first_departure([3, 3, 4, 5], [1e-9, 1e-8, 1e-7, 1e-6]) == 1e-7
    assert table1.first_departure([3, 3], [1e-9, 1e-8]) != table1.first_departure([3, 3], [1e-9, 1e-8])  # nan
    assert table1.substitute_models(True) == ["efficientnet_lite0"] and len(table1.substitute_models(False)) == 3
    assert all(name in registry.REGISTRY for name in table1.SUBSTITUTES)
