"""The one status rule, rates and spreads, and what makes an image an image: each check fed a violating input."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import stats
from helpers.book import results, verdict
from helpers.data import image_validity, photos


@pytest.mark.parametrize(
    "criterion, good, bad",
    [
        (verdict.at_most(1e-7, "residual"), 1e-8, 1e-6),
        (verdict.at_least(0.9, "IoU"), 0.95, 0.5),
        (verdict.within(96.64, "accuracy", abs=1.0), 97.1, 95.0),
        (verdict.between(12, 13, "ratio"), 12.5, 53.7),
        (verdict.same_order_of_magnitude(1e-7, "bound"), 3e-8, 1e-9),
        (verdict.equals(84, "nullity"), 84, 83),
        (verdict.every("same top-1"), stats.Rate(20, 20), stats.Rate(19, 20)),
        (verdict.rate_at_least(0.9, "same class"), stats.Rate(100, 100), stats.Rate(20, 20)),
        (verdict.holds_when("the map changes", lambda d: d > 0.1), 1.7, 0.0),
    ],
)
def test_each_criterion_can_fail(criterion: verdict.Criterion, good: object, bad: object) -> None:
    assert verdict.status_of(criterion, good) == verdict.REPRODUCED
    assert verdict.status_of(criterion, bad) == verdict.DIFFERS


def test_spreads_are_judged_by_their_worst_case() -> None:
    assert verdict.at_most(1.0, "x").holds(stats.Spread.of([0.1, 0.2])) is True
    assert verdict.at_most(1.0, "x").holds(stats.Spread.of([0.1, 2.0])) is False
    assert verdict.at_least(0.5, "IoU").holds(stats.Spread.of([0.9, 0.4], larger_is_worse=False)) is False


@pytest.mark.parametrize(
    "kind, yes, no",
    [
        ("paper", verdict.REPRODUCED, verdict.DIFFERS),
        ("identification", verdict.IDENTIFIED, verdict.DIFFERS),
        ("open question", verdict.SUPPORTED, verdict.NOT_SUPPORTED),
        ("beyond", verdict.BEYOND_HOLDS, verdict.BEYOND_FAILS),
    ],
)
def test_kind_picks_the_pair_of_statuses(kind: verdict.Kind, yes: str, no: str) -> None:
    c = verdict.at_most(1.0, "x").as_(kind)
    assert (verdict.status_of(c, 0.5), verdict.status_of(c, 2.0)) == (yes, no)


def test_trained_claims_are_not_checkable_with_random_weights_whatever_the_value() -> None:
    c = verdict.at_most(1.0, "x").trained()
    assert verdict.status_of(c, 0.5, trained=False) == verdict.NOT_CHECKABLE
    assert verdict.status_of(c, 2.0, trained=False) == verdict.NOT_CHECKABLE
    assert verdict.status_of(c, 2.0, trained=True) == verdict.DIFFERS
    assert verdict.status_of(verdict.at_most(1.0, "x"), 0.5, trained=False) == verdict.REPRODUCED


def test_budget_below_the_fraction_is_below_budget() -> None:
    c = verdict.at_most(1.0, "x")
    assert verdict.status_of(c, 0.5, budget=verdict.Budget(10, 1000, "steps")) == verdict.BELOW_BUDGET
    assert verdict.status_of(c, 0.5, budget=verdict.Budget(1000, 1000, "steps")) == verdict.REPRODUCED
    with pytest.raises(ValueError, match="no measurement"):
        verdict.status_of(c, None)
    with pytest.raises(ValueError, match="unknown criterion kind"):
        verdict.Criterion("x", bool, "guess")  # type: ignore[arg-type]


def test_judge_records_criterion_and_shows_text_of_rates() -> None:
    claim = results.judge("a", "b", verdict.every("same top-1"), paper="same", ours=stats.Rate(19, 20))
    assert claim.status == verdict.DIFFERS
    assert claim.criterion == "same top-1 for every input (k = n)"
    assert claim.ours.startswith("19/20 (95%, 95% CI [")


def test_wilson_interval_matches_reference_values() -> None:
    lo, hi = stats.Rate(20, 20).interval
    assert lo == pytest.approx(0.8389, abs=1e-4) and hi == 1.0
    lo, hi = stats.Rate(0, 10).interval
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.Rate(3, 2)


def test_spread_interval_contains_the_mean_and_worst_is_extreme() -> None:
    s = stats.Spread.of([1.0, 2.0, 3.0, 10.0])
    lo, hi = s.interval
    assert lo <= s.mean <= hi and s.worst == 10.0
    assert stats.Spread.of([0.9, 0.2], larger_is_worse=False).worst == 0.2
    with pytest.raises(ValueError, match="at least one"):
        stats.Spread.of([])


def test_natural_image_set_is_every_offline_photo_in_unit_range() -> None:
    names, x = photos.natural_image_set(32)
    assert len(names) >= 15 and "colorwheel" not in names and {"china", "flower", "grace_hopper"} <= set(names)
    assert x.shape == (len(names), 3, 32, 32) and image_validity.outside_unit_range(x) == 0.0


def test_beta_interval_is_tight() -> None:
    x = torch.full((3, 4, 4), 0.5)
    d = torch.zeros(3, 4, 4)
    d[0, 0, 0], d[1, 1, 1] = 0.25, -1.0
    lo, hi = image_validity.beta_interval(x, d)
    assert (lo, hi) == (-0.5, 0.5)
    assert image_validity.outside_unit_range(x + hi * d) == 0.0
    assert image_validity.outside_unit_range(x + 1.01 * hi * d) > 0.0
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        image_validity.beta_interval(x + 1, d)


def test_png_round_trip_is_8bit_quantisation() -> None:
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 1.2 - 0.1
    y = image_validity.png_round_trip(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y, image_validity.quantize_8bit(x))
    assert float((y * 255 - (y * 255).round()).abs().max()) < 1e-9
    assert image_validity.outside_unit_range(x) > 0.0 and image_validity.outside_unit_range(y) == 0.0
    grey = image_validity.png_round_trip(torch.rand(1, 5, 5))
    assert grey.shape == (1, 5, 5)
    assert math.isclose(float((grey * 255).round().sub(grey * 255).abs().max()), 0.0, abs_tol=1e-5)
