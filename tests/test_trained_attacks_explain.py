"""The trained-substitute study of the Fig. 3 chapter (attacks.stem_report, pgd_eps_sweep, near_null_twins,
substitute_claims, substitute_checks), on tiny models; each check is fed an input that violates it."""

from __future__ import annotations

import torch
from torch import nn

from helpers.data.normalization import PixelSpace
from helpers.experiments import attacks


def _strided_model(seed: int = 0, filters: int = 16) -> PixelSpace:
    torch.manual_seed(seed)
    inner = nn.Sequential(
        nn.Conv2d(3, filters, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    inner.append(nn.Linear(filters, 4))
    return PixelSpace(inner, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()


def _images(n: int = 4, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1


def test_stem_report_no_exact_twins_for_overlapping_windows() -> None:
    report = attacks.stem_report(_strided_model(), (3, 8, 8))
    assert report.matrix_shape == (16, 27)
    assert report.exact_reason  # overlapping windows: no exact patch-by-patch twin
    assert report.nullity == 27 - 16  # a wide random W1: full row rank
    assert report.operator_nullity == 0 and 0 < report.operator_ratio <= 1  # 12 new pixels, 16 filters
    assert report.direction.shape == (3, 8, 8)
    assert abs(float(report.direction.norm()) - 1) < 1e-9
    assert report.direction_gain < report.random_gain


def test_stem_report_counts_whole_image_kernel_of_few_filters() -> None:
    report = attacks.stem_report(_strided_model(filters=8), (3, 8, 8))
    assert report.operator_nullity == (12 - 8) * 4 * 4 and report.operator_ratio == 0


def test_pgd_eps_sweep_rates_are_monotone_and_within_eps() -> None:
    model, x = _strided_model(), _images()
    sweep = attacks.pgd_eps_sweep(model, x, [0.01, 0.5], steps=2)
    small, large = sweep.rate(0.01), sweep.rate(0.5)
    assert small.k <= large.k and large.n == len(x)
    excess = (sweep.adversarial - sweep.clean).abs().amax((1, 2, 3)) - sweep.eps_of()
    assert float(excess.max()) <= attacks.PIXEL_SLACK
    assert len(sweep.rows()) == 2


def test_pgd_eps_sweep_rejects_unsorted_grid() -> None:
    import pytest

    with pytest.raises(ValueError, match="increasing"):
        attacks.pgd_eps_sweep(_strided_model(), _images(), [0.5, 0.1], steps=1)


def _study() -> tuple[attacks.StemReport, attacks.EpsSweep, attacks.NearNullTwins]:
    model, x = _strided_model(), _images()
    report = attacks.stem_report(model, (3, 8, 8))
    sweep = attacks.pgd_eps_sweep(model, x, [0.05, 0.5], steps=2)
    hit = sweep.fooled
    twins = attacks.near_null_twins(
        model, sweep.clean[hit], sweep.adversarial[hit], sweep.eps_of()[hit], report.direction, batch=3
    )
    return report, sweep, twins


def test_near_null_twins_batched_and_claims() -> None:
    report, sweep, twins = _study()
    n = int(sweep.fooled.sum())
    assert n > 0 and twins.stem_rel.shape == (n,) and len(twins.kept) == n
    claims = attacks.substitute_claims(report, sweep, twins, "paper", "tiny")
    assert all(c["id"].endswith(".trained_substitute") for c in claims)
    assert all("trained substitute: tiny" in c["description"] for c in claims)
    assert [c["id"] for c in claims] == ["fig3.pgd_fools.trained_substitute", "fig3.near_null_twins.trained_substitute"]
    assert all(ok for ok, _, _ in attacks.substitute_checks(report, sweep, twins))


def test_substitute_checks_fail_on_violating_inputs() -> None:
    report, sweep, twins = _study()
    beyond = attacks.EpsSweep(sweep.eps, sweep.first, (sweep.clean + 0.9).clamp(0, 1), sweep.clean, sweep.labels)
    checks = attacks.substitute_checks(report, beyond, twins)
    assert not checks[0][0]  # adversarial examples beyond their eps
    visible = attacks.StemReport(**{**report.__dict__, "direction_gain": 2 * report.random_gain})
    assert not attacks.substitute_checks(visible, sweep, twins)[1][0]
    swapped = attacks.NearNullTwins(
        twins.control_stem_rel,
        twins.stem_rel,
        twins.logit_rel,
        twins.control_logit_rel,
        twins.kept,
        twins.control_kept,
        twins.linf_to_clean,
    )
    assert not attacks.substitute_checks(report, sweep, swapped)[1][0]
