"""The one rule that turns a measurement into a claim's status.

A claim states *before* anything is measured what would make it hold: a :class:`Criterion`, which carries
its text (shown on the scoreboard) and a test of the measured value. :func:`status_of` is the only place a
status is decided; chapters and experiment modules never name a status.

========================  =============================================================================
status                    when
========================  =============================================================================
reproduced                a paper claim whose criterion holds
differs                   a paper (or identification) claim whose criterion fails; the numbers show why
identified                a constructor chosen *by fitting* the paper's numbers matches them (that is
                          identification, not an independent reproduction)
open question: ...        a question the paper asks but does not answer (supported / not supported)
beyond the paper: ...     our own addition, with its own criterion (holds / does not hold)
below the paper's budget  the run was scaled down so far (``Budget``) that agreement means little
not checkable ...         the claim needs trained weights and this build ran with random ones
========================  =============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

REPRODUCED = "reproduced"
DIFFERS = "differs"
IDENTIFIED = "identified"
SUPPORTED = "open question: supported"
NOT_SUPPORTED = "open question: not supported"
BEYOND_HOLDS = "beyond the paper: holds"
BEYOND_FAILS = "beyond the paper: does not hold"
BELOW_BUDGET = "below the paper's budget"
NOT_CHECKABLE = "not checkable with random weights"

STATUSES = (
    REPRODUCED,
    IDENTIFIED,
    DIFFERS,
    SUPPORTED,
    NOT_SUPPORTED,
    BEYOND_HOLDS,
    BEYOND_FAILS,
    BELOW_BUDGET,
    NOT_CHECKABLE,
)

Kind = Literal["paper", "identification", "open question", "beyond"]

#: (status when the criterion holds, status when it does not), by the kind of claim.
OUTCOMES: dict[str, tuple[str, str]] = {
    "paper": (REPRODUCED, DIFFERS),
    "identification": (IDENTIFIED, DIFFERS),
    "open question": (SUPPORTED, NOT_SUPPORTED),
    "beyond": (BEYOND_HOLDS, BEYOND_FAILS),
}

#: A run that spends less than this fraction of the paper's budget (steps, samples, models) is "below budget".
BUDGET_FRACTION = 0.5


@dataclass(frozen=True)
class Criterion:
    """What would make a claim hold, fixed before measuring.

    ``text`` is shown beside the claim; ``test`` takes the measured value and says whether the claim holds;
    ``kind`` picks the pair of statuses (:data:`OUTCOMES`); ``needs_trained`` marks claims that only trained
    weights can decide.
    """

    text: str
    test: Callable[[Any], bool]
    kind: Kind = "paper"
    needs_trained: bool = False

    def __post_init__(self) -> None:
        if self.kind not in OUTCOMES:
            raise ValueError(f"unknown criterion kind {self.kind!r}; valid: {', '.join(OUTCOMES)}")

    def holds(self, measured: Any) -> bool:
        return bool(self.test(measured))

    def as_(self, kind: Kind, *, needs_trained: bool | None = None) -> Criterion:
        """The same test for another kind of claim (e.g. ``"beyond"``)."""
        trained = self.needs_trained if needs_trained is None else needs_trained
        return Criterion(self.text, self.test, kind, trained)

    def trained(self) -> Criterion:
        """The same criterion, for a claim only trained weights can decide."""
        return Criterion(self.text, self.test, self.kind, True)


@dataclass(frozen=True)
class Budget:
    """How much of the paper's compute a run spent: ``ours`` and ``paper`` in the same ``unit``.

    ``reference`` names whose budget ``paper`` is, when the paper states none (e.g. this chapter's full run).
    """

    ours: float
    paper: float
    unit: str
    reference: str = "the paper's"

    @property
    def below(self) -> bool:
        return self.ours < BUDGET_FRACTION * self.paper

    def text(self) -> str:
        return f"{self.ours:g} of {self.reference} {self.paper:g} {self.unit}"


def status_of(criterion: Criterion, measured: Any, *, trained: bool = True, budget: Budget | None = None) -> str:
    """The status of a claim: its criterion applied to ``measured``, given the weights and the budget.

    Not checkable (needs trained weights, ran with random ones) comes first, then below budget; otherwise
    the criterion decides between the two statuses of its kind.
    """
    if criterion.needs_trained and not trained:
        return NOT_CHECKABLE
    if budget is not None and budget.below:
        return BELOW_BUDGET
    if measured is None:
        raise ValueError(f"claim {criterion.text!r} has no measurement; mark it needs_trained or measure it")
    yes, no = OUTCOMES[criterion.kind]
    return yes if criterion.holds(measured) else no


def _number(x: Any) -> float:
    value = float(getattr(x, "value", x))
    if not math.isfinite(value):
        raise ValueError(f"criterion needs a finite number, got {x!r}")
    return value


def _g(x: float) -> str:
    return f"{x:.3g}"


def at_most(bound: float, what: str, *, kind: Kind = "paper") -> Criterion:
    """``what`` ≤ ``bound`` (numbers, or objects with a ``.value``; a Rate/Summary is judged by its worst case
    when it has ``worst``)."""
    return Criterion(f"{what} ≤ {_g(bound)}", lambda m: _number(getattr(m, "worst", m)) <= bound, kind)


def at_least(bound: float, what: str, *, kind: Kind = "paper") -> Criterion:
    """``what`` ≥ ``bound`` (a Spread is judged by its worst case)."""
    return Criterion(f"{what} ≥ {_g(bound)}", lambda m: _number(getattr(m, "worst", m)) >= bound, kind)


def within(target: float, what: str, *, rel: float = 0.0, abs: float = 0.0, kind: Kind = "paper") -> Criterion:
    """|``what`` − ``target``| ≤ ``abs`` + ``rel``·|target|."""
    tol = abs + rel * math.fabs(target)
    text = f"{what} = {_g(target)} ± {_g(tol)}" if tol else f"{what} = {_g(target)}"
    return Criterion(text, lambda m: math.fabs(_number(m) - target) <= tol, kind)


def between(lo: float, hi: float, what: str, *, kind: Kind = "paper") -> Criterion:
    """``lo`` ≤ ``what`` ≤ ``hi``."""
    return Criterion(f"{_g(lo)} ≤ {what} ≤ {_g(hi)}", lambda m: lo <= _number(m) <= hi, kind)


def same_order_of_magnitude(target: float, what: str, *, kind: Kind = "paper") -> Criterion:
    """``what`` within a factor 10 of ``target`` (both positive)."""
    return Criterion(
        f"{what} within a factor 10 of {_g(target)}",
        lambda m: target / 10 <= _number(m) <= target * 10,
        kind,
    )


def equals(target: Any, what: str, *, kind: Kind = "paper") -> Criterion:
    """``what`` == ``target`` exactly (integers, tuples, labels)."""
    return Criterion(f"{what} = {target}", lambda m: m == target, kind)


def rate_at_least(share: float, what: str, *, kind: Kind = "paper") -> Criterion:
    """A :class:`helpers.stats.Rate` whose *lower 95% bound* is at least ``share`` (so n matters)."""
    return Criterion(
        f"{what}: lower 95% bound of the rate ≥ {share:.0%}", lambda r: float(r.interval[0]) >= share, kind
    )


def holds_when(text: str, test: Callable[[Any], bool], *, kind: Kind = "paper") -> Criterion:
    """A qualitative claim: ``text`` says in words what ``test`` measures."""
    return Criterion(text, test, kind)


def every(what: str, *, kind: Kind = "paper") -> Criterion:
    """A :class:`helpers.stats.Rate` with no failure: ``what`` holds for every input measured."""
    return Criterion(f"{what} for every input (k = n)", lambda r: r.n > 0 and r.k == r.n, kind)
