"""The vulnerability-gauge helpers: sweep construction, nullity by construction, attacks, rank statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from helpers import cli
from helpers.book import results
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
    pytest.importorskip("helpers.audit")
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    settings = gauge.AttackSettings(eval_size=32, pgd_eps=(0.1,), pgd_steps=3, fab_steps=3)
    config = gauge.family_config("patch", 8, epochs=1, train_size=512)
    (row,) = gauge.run_sweep([config], "cpu", settings, progress=False)
    assert row["nullity_w1"] == row["expected_nullity_w1"] == row["svd_nullity_w1"] == 41
    assert row["w1_shape"] in ([8, 49], [49, 8])
    assert 0 <= row["pgd_acc@0.1"] <= row["eval_clean_acc"] <= 1
    assert row["eval_clean_acc"] == 0 or row["median_l2"] > 0  # the median runs over correctly classified digits
    assert 0 < row["nu_over_n"] <= 1 and 0 <= row["mu_over_n"] <= 1


def test_cli_registers_the_gauge_command() -> None:
    from helpers.cli import build_parser

    args = build_parser().parse_args(["gauge", "--quick", "--seeds", "1"])
    assert args.quick and args.seeds == 1 and args.func is cli._gauge_command


def test_imagenet_path_normalises_pixels_and_keeps_clean_predictions_at_zero_budget() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
    pixels = torch.rand(3, 3, 32, 32)
    assert gauge.imagenet_robust_agreement(net, pixels, 0.0) == 1.0
    assert 0 <= gauge.imagenet_robust_agreement(net, pixels, 0.05, steps=3) <= 1
    assert gauge.imagenet_input_size(net, "inception_v3") == 299 and gauge.imagenet_input_size(net, "alexnet") == 224
