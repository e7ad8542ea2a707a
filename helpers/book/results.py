"""Results files (``results/<chapter>.json``), the claims check, the random-weights banner, the scoreboard.

Each chapter records its claims: what the paper says, what we measured, the weights used and a status.
The build turns all results files into the Reproduction scoreboard page.

Under the build (:mod:`helpers.book.pipeline`) a chapter writes into a pending folder and ``Checks.finish``
records the checks' outcome beside it; the pipeline keeps the results (:func:`finalize`: the checks' outcome,
the content hash of the sources, the figures' hashes) only when the notebook ran to the end with every check
passed, and :func:`record_problem` says why a results file cannot be rendered.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from helpers import runtime
from helpers.book import page
from helpers.book.verdict import (  # noqa: F401  (re-exported for the scoreboard and the tests)
    NOT_CHECKABLE,
    STATUSES,
    Budget,
    Criterion,
    status_of,
)


@dataclass
class Claim:
    """One claim of a paper as the book checked it; built only by :func:`judge`.

    ``criterion`` is the text of what would make it hold, fixed before measuring; ``paper`` and ``ours`` are
    shown as given (numbers or short text); ``reason`` explains any difference; ``budget`` says how much of the
    paper's compute the run spent, when that matters.
    """

    id: str
    description: str
    criterion: str
    paper: Any
    ours: Any
    status: str
    weights: str = "n/a"
    reason: str = ""
    budget: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r} for claim {self.id!r}; valid: {', '.join(STATUSES)}")


#: ``measured`` left out: judge ``ours`` itself.
SAME_AS_OURS: Any = object()


def judge(
    id: str,
    description: str,
    criterion: Criterion,
    *,
    paper: Any,
    ours: Any,
    measured: Any = SAME_AS_OURS,
    trained: bool = True,
    weights: str = "n/a",
    reason: str = "",
    budget: Budget | None = None,
) -> Claim:
    """A claim whose status is ``criterion`` applied to ``measured`` (default: ``ours``) by
    :func:`helpers.book.verdict.status_of`; ``ours`` is what the scoreboard shows."""
    value = ours if measured is SAME_AS_OURS else measured
    status = status_of(criterion, value, trained=trained, budget=budget)
    shown = ours.text() if hasattr(ours, "text") and callable(ours.text) else ours
    return Claim(
        id,
        description,
        criterion.text,
        paper,
        shown,
        status,
        weights,
        reason,
        budget.text() if budget is not None else "",
    )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def save(
    chapter: str,
    claims: Iterable[Claim],
    *,
    quick: bool,
    device: str,
    extra: dict[str, Any] | None = None,
    figures: Iterable[str] = (),
) -> Path:
    """Write ``results/<chapter>.json`` atomically and return its path (``figures``: names the chapter showed)."""
    payload = {
        "chapter": chapter,
        "quick": quick,
        "device": device,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "claims": [_jsonable(asdict(c)) for c in claims],
        "figures": list(figures),
        "extra": _jsonable(extra or {}),
    }
    path = runtime.results_dir() / f"{chapter}.json"
    return runtime.write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


#: Set by the pipeline while a chapter runs: the JSON file where ``Checks.finish`` records the checks' outcome.
CHECKS_FILE_ENV = "COLLISIONS_CHECKS_FILE"


def merge_checks(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two checks outcomes (``{"passed": n, "failed": [what, ...], "skipped": n}``) as one; ``a`` may be None."""
    if a is None:
        return dict(b)
    return {
        "passed": a["passed"] + b["passed"],
        "failed": a["failed"] + b["failed"],
        "skipped": a["skipped"] + b["skipped"],
    }


def read_checks(path: Path) -> dict[str, Any] | None:
    """The checks outcome recorded in ``path`` (see :data:`CHECKS_FILE_ENV`), or None if no check finished."""
    if not path.exists():
        return None
    outcome = json.loads(path.read_text())
    if not (isinstance(outcome, dict) and {"passed", "failed", "skipped"} <= set(outcome)):
        raise ValueError(f"{path} is not a checks outcome")
    return outcome


def figure_digests(folder: Path) -> dict[str, str]:
    """Figure name -> SHA-256 of ``folder/<name>.png``, for every PNG in ``folder``."""
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def finalize(
    record: dict[str, Any], *, checks: dict[str, Any], source_hash: str, figures: dict[str, str]
) -> dict[str, Any]:
    """A chapter's record as the book keeps it: with its checks' outcome, the content hash of the sources it ran
    from (``pipeline.content_hash``) and the SHA-256 of each figure it wrote (``figure_digests``)."""
    return {**record, "checks": checks, "source_hash": source_hash, "figure_sha256": figures}


def record_problem(record: Any, *, chapter: str, source_hash: str, quick: bool, figures: Path | None = None) -> str:
    """Why ``record`` (a loaded results file) cannot be rendered in a book built with ``quick`` from the sources
    whose content hash is ``source_hash``; "" when it can. ``figures``: the folder its figures must be in,
    byte-identical to the run that wrote the record."""
    if not isinstance(record, dict) or record.get("chapter") != chapter:
        return f"is not the results file of chapter {chapter!r}"
    if bool(record.get("quick")) != quick:
        wrote, needs = ("quick", "full") if record.get("quick") else ("full", "quick")
        return f"was written by a {wrote} run; this book needs a {needs} run"
    if "source_hash" not in record:
        return "records no source hash (not written by `python -m helpers.book execute`)"
    if record["source_hash"] != source_hash:
        return "is not from the current sources (content hash differs)"
    checks = record.get("checks")
    if not isinstance(checks, dict):
        return "records no checks outcome"
    if checks.get("failed"):
        return "records failed checks: " + "; ".join(map(str, checks["failed"]))
    for name, digest in (record.get("figure_sha256") or {}).items():
        if figures is None:
            break
        png = figures / f"{name}.png"
        if not png.exists():
            return f"lists figures/{name}.png, which is missing"
        if hashlib.sha256(png.read_bytes()).hexdigest() != digest:
            return f"lists figures/{name}.png, which changed since the run"
    return ""


def load_all(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every results file in ``folder`` (default: the current results folder), sorted by chapter."""
    folder = folder or runtime.results_dir()
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


class ClaimFailed(AssertionError):
    """A claims cell found a claim that must hold but does not; the build fails."""


#: How a check's outcome reads on the page: a word (and a symbol that needs no emoji font).
CHECK_OUTCOMES = {"passed": "✓ passed", "failed": "✗ failed", "skipped": "– skipped"}


class Checks:
    """Collects the must-hold checks of a claims cell and fails the build (raises) if any is false."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []  # (what, outcome, measured)

    def require(self, ok: bool, what: str, measured: Any = "") -> None:
        self.items.append((what, "passed" if ok else "failed", str(measured)))

    def skip(self, what: str, why: str) -> None:
        """Record a check that cannot be made here (e.g. it needs trained weights)."""
        self.items.append((what, "skipped", why))

    def html(self) -> str:
        rows = "".join(
            f'<tr class="check-{o}"><td class="check-outcome">{CHECK_OUTCOMES[o]}</td>'
            f"<td>{html.escape(w)}</td><td>{html.escape(m)}</td></tr>"
            for w, o, m in self.items
        )
        return (
            f'<div class="collisions-table checks"><table><thead><tr><th>check</th><th>must hold</th>'
            f"<th>measured</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )

    def outcome(self) -> dict[str, Any]:
        """``{"passed": n, "failed": [what, ...], "skipped": n}``: what a results file carries."""
        count = {o: sum(1 for _, outcome, _ in self.items if outcome == o) for o in CHECK_OUTCOMES}
        return {
            "passed": count["passed"],
            "failed": [w for w, o, _ in self.items if o == "failed"],
            "skipped": count["skipped"],
        }

    def finish(self) -> None:
        """Show the checks; under the build, record their outcome (:data:`CHECKS_FILE_ENV`); raise if one failed."""
        text = "\n".join(f"{CHECK_OUTCOMES[o]:<10} {w}: {m}" for w, o, m in self.items)
        page.show_html(self.html(), text)
        target = os.environ.get(CHECKS_FILE_ENV)
        if target:
            path = Path(target)
            merged = merge_checks(read_checks(path), self.outcome())
            runtime.write_atomically(path, lambda tmp: tmp.write_text(json.dumps(merged, indent=1)))
        failed = self.outcome()["failed"]
        if failed:
            raise ClaimFailed("claims that do not hold: " + "; ".join(failed))


#: A banner lists up to this many models openly; more are folded into a <details> block.
BANNER_OPEN_UP_TO = 4


def banner_html(random_ones: Iterable[Any]) -> str:
    """The random-weights warning for the given ``LoadedModel``s, each with the whole reason it fell back."""
    random_ones = list(random_ones)
    lines = "".join(f"<li><code>{html.escape(m.spec.name)}</code>: {html.escape(m.detail)}</li>" for m in random_ones)
    if len(random_ones) > BANNER_OPEN_UP_TO:  # a long list folds; every reason is one click away
        lines = (
            f"<details><summary>{len(random_ones)} models, each with the reason it fell back</summary>"
            f"<ul>{lines}</ul></details>"
        )
    else:
        lines = f"<ul>{lines}</ul>"
    return (
        '<div class="admonition warning random-weights">'
        "<p class='admonition-title'>Random weights</p>"
        "<p>Pretrained weights could not be loaded here, so the models below run with random initialisation. "
        "Everything that follows from the <i>shapes</i> of the weights still holds; claims that need trained "
        "weights are reported as <i>not checkable with random weights</i>. Run on Colab, or with the "
        f"checkpoints in the torch/timm cache, for the trained numbers.</p>{lines}</div>"
    )


def _fmt(value: Any) -> str:
    """A scoreboard cell: floats to 4 digits, None as an em dash; snake_case names may break after an underscore
    (a zero-width space) rather than widen the table."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    return str(value).replace("|", "\\|").replace("\n", " ").replace("_", "_\u200b")


def _notes(claim: dict[str, Any]) -> str:
    """The scoreboard's last column: the weights the claim rests on, the reason for a difference, the budget."""
    parts = [f"Weights: {claim['weights']}." if claim.get("weights") not in (None, "", "n/a") else ""]
    parts += [claim.get("reason", ""), f"Budget: {claim['budget']}." if claim.get("budget") else ""]
    return " ".join(p for p in parts if p)


def markdown_table(
    rows: Iterable[dict[str, Any]],
    columns: Iterable[str] | None = None,
    labels: dict[str, str] | None = None,
    digits: int = 4,
) -> str:
    """A markdown table of dict rows: floats to ``digits`` significant digits, None as an em dash, objects with a
    ``text()`` method (e.g. ``gauge.Correlation``) by that text, string cells and headers renamed by ``labels``."""
    rows = list(rows)
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0])
    labels = labels or {}

    def cell(v: Any) -> str:
        return page.cell_text(labels.get(v, v) if isinstance(v, str) else v, digits).replace("|", "\\|")

    lines = ["| " + " | ".join(labels.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows])


def status_badge(status: str) -> str:
    """A status as inline HTML whose class gives it a colour on the page; the word is always there."""
    slug = "-".join("".join(ch if ch.isalnum() else " " for ch in status).split())
    return f'<span class="status status-{slug}">{html.escape(status)}</span>'


def _checks_line(record: dict[str, Any]) -> list[str]:
    """The line under a chapter's heading that says how its internal checks went (none if not recorded)."""
    checks = record.get("checks")
    if not isinstance(checks, dict):
        return []
    skipped = f" ({checks['skipped']} skipped)" if checks.get("skipped") else ""
    failed = f", {len(checks['failed'])} failed" if checks.get("failed") else ""
    return [f"Internal checks: {checks['passed']} passed{failed}{skipped}.", ""]


def scoreboard_markdown(records: list[dict[str, Any]], chapter_titles: dict[str, str]) -> str:
    """The Reproduction scoreboard page (MyST markdown) from all results records: a table per chapter."""
    counts = {s: 0 for s in STATUSES}
    sections = []
    for record in records:
        title = chapter_titles.get(record["chapter"], record["chapter"])
        rows = [
            "| status | claim | criterion | paper | ours | notes |",
            "|---|---|---|---|---|---|",
        ]
        for c in record["claims"]:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
            rows.append(
                "| "
                + " | ".join(
                    [
                        status_badge(c["status"]),
                        _fmt(c["description"]),
                        _fmt(c.get("criterion", "")),
                        _fmt(c["paper"]),
                        _fmt(c["ours"]),
                        _fmt(_notes(c)),
                    ]
                )
                + " |"
            )
        mode = " (quick mode)" if record.get("quick") else ""
        sections += [f"## [{title}](chapters/{record['chapter']}.ipynb){mode}", "", *_checks_line(record), *rows, ""]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    head = [
        "# Reproduction scoreboard",
        "",
        "Generated by `make build` from `results/*.json`: every number below was recomputed by the chapter it "
        "links to; the paper's value is shown only beside it. Each claim states its *criterion* (what would make "
        "it hold) before anything is measured, and one rule (`helpers/book/verdict.py`) turns the measurement "
        "into the status: *reproduced* or *differs* against the paper; *identified* when our model was chosen by "
        "fitting the paper's own numbers, so agreement confirms the identification, not the paper; *open "
        "question* for what the paper asks but does not answer; *beyond the paper* for our own additions; "
        "*below the paper's budget* when the run spent too little of the paper's compute for agreement to mean "
        "much; *not checkable with random weights* when the claim needs trained weights this build could not load.",
        "",
        f"**{summary or 'no claims recorded yet'}.**",
        "",
    ]
    return "\n".join(head + sections) + "\n"
