"""Rates and spreads over sets of inputs, with 95% intervals and the worst case.

Claims about many inputs are measured on many inputs: a :class:`Rate` (k of n, Wilson interval) for
yes/no outcomes, a :class:`Spread` (mean with a bootstrap interval, worst case) for numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: z for a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``k/n`` at ``z`` standard errors ((0, 1) when ``n`` is 0)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    """``k`` successes out of ``n`` trials; ``interval`` is the 95% Wilson score interval of k/n."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if not 0 <= self.k <= self.n:
            raise ValueError(f"a rate needs 0 <= k <= n, got k={self.k}, n={self.n}")

    @classmethod
    def of(cls, outcomes: Iterable[bool]) -> Rate:
        flags = [bool(o) for o in outcomes]
        return cls(sum(flags), len(flags))

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def text(self) -> str:
        lo, hi = self.interval
        return f"{self.k}/{self.n} ({self.value:.0%}, 95% CI [{lo:.0%}, {hi:.0%}])"

    def __str__(self) -> str:
        return self.text()


@dataclass(frozen=True)
class Spread:
    """Numbers measured over a set of inputs: mean with a 95% bootstrap interval, and the worst case.

    ``worst`` is the maximum when ``larger_is_worse`` (errors, leaks), else the minimum (agreement, IoU).
    """

    values: tuple[float, ...]
    larger_is_worse: bool = True
    unit: str = ""

    @classmethod
    def of(cls, values: Iterable[float], *, larger_is_worse: bool = True, unit: str = "") -> Spread:
        vals = tuple(float(v) for v in values)
        if not vals:
            raise ValueError("a spread needs at least one value")
        return cls(vals, larger_is_worse, unit)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def value(self) -> float:
        return self.mean

    @property
    def worst(self) -> float:
        return max(self.values) if self.larger_is_worse else min(self.values)

    @property
    def interval(self) -> tuple[float, float]:
        return bootstrap_mean_interval(self.values)

    def text(self, fmt: str = ".3g") -> str:
        lo, hi = self.interval
        u = f" {self.unit}" if self.unit else ""
        return f"mean {self.mean:{fmt}}{u} (95% CI [{lo:{fmt}}, {hi:{fmt}}]), worst {self.worst:{fmt}}{u}, n = {self.n}"

    def __str__(self) -> str:
        return self.text()


def bootstrap_mean_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (a single value gives a zero-width interval)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return (float(x.mean()), float(x.mean()))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return (float(lo), float(hi))
