"""Li et al.'s MNIST study (chapter 08) and the paper-vs-ours side of chapters 08-09.

Built on :mod:`helpers.experiments.polytope` (the method): two polytopes per target (searched from the target and
from another digit), their table rows, the optimiser sweep and its figure, the comparison with the paper's numbers,
and the claims' criteria (stated before measuring; the status is decided by ``helpers.book.verdict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

from helpers import stats
from helpers.book import verdict
from helpers.experiments.polytope import Polytopes, ReluSplit, SearchConfig, find_polytopes, table_row
from helpers.models import train

# ---------------------------------------------------------------------------------------------------------------
# Li et al.'s MNIST study (chapter 08): two polytopes per target, their table rows, the optimiser sweep, figures
# ---------------------------------------------------------------------------------------------------------------

#: Li et al.'s search settings when a caller gives none.
DEFAULT_SEARCH = SearchConfig()

#: Labels of the two searches per target (Li et al.'s Table 1/2 rows 1 and 2), as the rows' ``init`` column says.
INITS = ("target", "other image")

#: The per-polytope columns of the chapter's tables (``two_start_rows`` / ``summarise``).
ROW_COLUMNS = [
    "target",
    "init",
    "same_class_pct",
    "sample_prob",
    "vertex_distance",
    "ratio_pct",
    "vertex_eq_rel_max",
    "vertex_ineq_max",
    "sample_act_rel_max",
    "sample_pattern_min",
]

#: The columns of the optimiser sweep's table (``annotate_sweep``).
SWEEP_COLUMNS = [
    "lr",
    "steps",
    "vertex_distance",
    "ratio_pct",
    "act_rel_max",
    "other_to_start",
    "other_to_target",
    "seconds",
]


@dataclass
class TwoStartPolytopes:
    """Li et al.'s two polytopes per target (their Table 1/2, rows 1 and 2), found by ``search_two_starts``.

    target_ids, other_ids: dataset indices of the T targets and of the T other images; targets (T, *input_shape);
    polys: 2T polytopes, numbers 0..T-1 searched from the targets themselves, T..2T-1 from the other images
    (``polys.starts`` (2T, *input_shape) holds where each search began).
    """

    target_ids: list[int]
    other_ids: list[int]
    targets: Tensor
    polys: Polytopes

    @property
    def n_targets(self) -> int:
        """T, the number of targets (half the number of polytopes)."""
        return len(self.targets)

    @property
    def paired_targets(self) -> Tensor:
        """(2T, *input_shape): the target of every polytope, in the polytopes' order (for ``measure_polytopes``)."""
        return torch.cat([self.targets, self.targets])

    def from_other(self) -> dict[str, Tensor]:
        """Where the vertices of the polytopes searched from another image lie; each value (T,), input units (l2).

        to_target / to_start: mean distance of a polytope's vertices from its target / from its start;
        start_to_target: distance between the start and the target; nearer_target: to_target < to_start (bool).
        """
        T = self.n_targets
        to_start = self.polys.distances_to(self.polys.starts)[T:]
        to_target = self.polys.distances_to(self.paired_targets)[T:]
        return {
            "to_target": to_target,
            "to_start": to_start,
            "start_to_target": (self.polys.starts[T:] - self.targets).flatten(1).norm(dim=1),
            "nearer_target": to_target < to_start,
        }


def search_two_starts(
    split: ReluSplit,
    images: Tensor,
    target_ids: Sequence[int],
    other_ids: Sequence[int],
    n_vertices: int = 5,
    config: SearchConfig = DEFAULT_SEARCH,
    progress: bool = True,
) -> TwoStartPolytopes:
    """Two polytopes per target, all vertices in one batch: one searched from the target, one from another image.

    images (M, *input_shape) pixels in [0, 1]; target_ids, other_ids: T dataset indices each (e.g. from
    ``other_class_indices``). The pushed units are the first ``n_vertices`` inactive ones of each target.
    """
    if len(target_ids) != len(other_ids) or not len(target_ids):
        raise ValueError(
            f"need one other image per target and at least one target, got {len(target_ids)} targets and "
            f"{len(other_ids)} other images"
        )
    targets = images[list(target_ids)]
    starts = torch.cat([targets, images[list(other_ids)]])  # first all "from the target", then all "from other"
    polys = find_polytopes(split, torch.cat([targets, targets]), starts, n_vertices, config, progress=progress)
    return TwoStartPolytopes(list(target_ids), list(other_ids), targets, polys)


def two_start_rows(
    reports: Sequence[dict[str, Any]], image_distance: float, target_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """One table row per polytope of a ``TwoStartPolytopes`` (2T reports from ``measure_polytopes``, same order).

    Each row: ``table_row``'s numbers (distances in input units, ``ratio_pct`` of ``image_distance``), then
    ``init`` ("target" for the first T, "other image" for the rest) and ``target`` (its dataset index).
    """
    T = len(target_ids)
    if len(reports) != 2 * T:
        raise ValueError(f"need 2 reports per target (2 x {T}), got {len(reports)}")
    return [
        dict(table_row(r, image_distance), init=INITS[0] if k < T else INITS[1], target=target_ids[k % T])
        for k, r in enumerate(reports)
    ]


def summarise(rows: Sequence[dict[str, Any]], init: str) -> dict[str, Any]:
    """The worst case over the rows (from ``two_start_rows``) with the given ``init``, in ``ROW_COLUMNS``' terms.

    Minimum of success (%), sample probability and pattern agreement; mean of vertex distance and ratio (%);
    maximum of the Proposition 1 residuals.
    """
    chosen = [r for r in rows if r["init"] == init]
    if not chosen:
        raise ValueError(f"no rows with init {init!r}; valid: {sorted({r['init'] for r in rows})}")
    return {
        "target": f"{len(chosen)} targets",
        "init": init,
        "same_class_pct": min(r["same_class_pct"] for r in chosen),
        "sample_prob": min(r["sample_prob"] for r in chosen),
        "vertex_distance": sum(r["vertex_distance"] for r in chosen) / len(chosen),
        "ratio_pct": sum(r["ratio_pct"] for r in chosen) / len(chosen),
        **{c: max(r[c] for r in chosen) for c in ("vertex_eq_rel_max", "vertex_ineq_max", "sample_act_rel_max")},
        "sample_pattern_min": min(r["sample_pattern_min"] for r in chosen),
    }


def worst_case(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The worst polytope of all rows (``table_row`` dicts), per measurement.

    same_class_pct: lowest (%); vertex_eq_rel_max, vertex_ineq_max, sample_act_rel_max: highest residuals;
    act_rel_max: the larger of the vertices' equality residual and the samples' activation mismatch (relative l2);
    prob_gap: largest |mean sample probability - target probability|.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    worst = {
        "same_class_pct": min(r["same_class_pct"] for r in rows),
        **{c: max(r[c] for r in rows) for c in ("vertex_eq_rel_max", "vertex_ineq_max", "sample_act_rel_max")},
        "prob_gap": max(abs(r["sample_prob"] - r["target_prob"]) for r in rows),
    }
    worst["act_rel_max"] = max(worst["sample_act_rel_max"], worst["vertex_eq_rel_max"])
    return worst


def figure_rows(
    polys: Polytopes, reports: Sequence[dict[str, Any]], targets: Tensor, ks: Sequence[int], labels: Sequence[str]
) -> list[dict[str, Any]]:
    """The rows of ``polytope_figure`` for polytopes number ``ks`` of ``polys``, one label each.

    targets (T', *input_shape): polytope k's target is ``targets[k % T']`` (so the targets of a two-start search
    may be given once); reports: ``measure_polytope`` dicts with ``samples_kept``, one per polytope.
    """
    if len(ks) != len(labels):
        raise ValueError(f"one label per polytope: {len(ks)} polytopes, {len(labels)} labels")
    return [
        {
            "label": label,
            "target": targets[k % len(targets)],
            "start": polys.starts[k],
            "vertices": polys.vertices[k],
            "samples": reports[k]["samples_kept"],
        }
        for k, label in zip(ks, labels)
    ]


def annotate_sweep(
    sweep: Sequence[dict[str, Any]], image_distance: float, start: Tensor, target: Tensor, polytope: int = 1
) -> list[dict[str, Any]]:
    """``distance_sweep`` rows with ``ratio_pct`` (mean vertex distance as a % of ``image_distance``) and, for
    polytope number ``polytope`` (the one searched from ``start`` (*input_shape) towards ``target``), the mean l2
    distance of its vertices from its start (``other_to_start``) and from its target (``other_to_target``).

    Returns new dicts (the input rows are left as they are).
    """
    rows = []
    for row in sweep:
        other = row["vertices"][polytope]
        rows.append(
            dict(
                row,
                ratio_pct=100 * row["vertex_distance"] / image_distance,
                other_to_start=float((other - start).flatten(1).norm(dim=1).mean()),
                other_to_target=float((other - target).flatten(1).norm(dim=1).mean()),
            )
        )
    return rows


def sweep_summary(sweep: Sequence[dict[str, Any]], act_tol: float) -> dict[str, Any]:
    """What the sweep (``annotate_sweep`` rows) says: ratio_min / ratio_max (%) over all settings; tight: the
    setting with the smallest ratio among those whose worst vertex mismatch ``act_rel_max`` is <= ``act_tol``
    (None if none is); nearer_target: in how many settings the vertices of the polytope from another image lie
    nearer the target than their start."""
    if not sweep:
        raise ValueError("empty sweep")
    tight = [r for r in sweep if r["act_rel_max"] <= act_tol]
    return {
        "ratio_min": min(r["ratio_pct"] for r in sweep),
        "ratio_max": max(r["ratio_pct"] for r in sweep),
        "tight": min(tight, key=lambda r: r["ratio_pct"]) if tight else None,
        "nearer_target": sum(r["other_to_target"] < r["other_to_start"] for r in sweep),
    }


def sweep_vertex_rows(
    sweep: Sequence[dict[str, Any]], target: Tensor, start: Tensor, polytope: int = 1
) -> list[dict[str, Any]]:
    """``polytope_figure`` rows showing polytope number ``polytope``'s vertices for each setting of the sweep
    (no samples); target, start (*input_shape)."""
    return [
        {
            "label": f"lr {r['lr']}, {r['steps']} steps",
            "target": target,
            "start": start,
            "vertices": r["vertices"][polytope],
            "samples": r["vertices"][polytope][:0],
        }
        for r in sweep
    ]


def sweep_figure(sweep: Sequence[dict[str, Any]], paper_band: Sequence[float], act_tol: float) -> plt.Figure:
    """Polytope size (left: vertex / image distance, %) and collision tightness (right: worst first-layer mismatch
    of the vertices, relative l2) against the Adam steps, one line per learning rate.

    sweep: ``annotate_sweep`` rows; paper_band: the paper's (low, high) ratio in %; act_tol: our tolerance.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for lr in dict.fromkeys(r["lr"] for r in sweep):
        chosen = [r for r in sweep if r["lr"] == lr]
        axes[0].plot([r["steps"] for r in chosen], [r["ratio_pct"] for r in chosen], "o-", label=f"lr {lr}")
        axes[1].plot([r["steps"] for r in chosen], [r["act_rel_max"] for r in chosen], "o-", label=f"lr {lr}")
    lo, hi = paper_band
    axes[0].axhspan(lo, hi, color="tab:orange", alpha=0.3, label="paper (Table 2)")
    axes[0].set(xscale="log", xlabel="Adam steps", ylabel="vertex distance / image distance (%)")
    axes[1].axhline(act_tol, color="k", ls="--", lw=1, label="our tolerance")
    axes[1].set(xscale="log", yscale="log", xlabel="Adam steps", ylabel="worst first-layer mismatch (rel. l2)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def lenet_recipe(quick: bool, weights: str) -> train.TrainConfig:
    """The LeNet-5 training recipe for chapter 08: the canonical one (``train.CANONICAL["lenet5"]``),
    except in quick mode with trained weights asked for and no cached checkpoint, where a 1-epoch model on 10,000
    digits keeps the run short (the chapter says so in its output)."""
    config = train.CANONICAL["lenet5"]
    if quick and weights != "random" and train.cached_checkpoint("lenet5") is None:
        return replace(config, epochs=1, train_size=10_000)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Paper vs ours: comparison tables (the paper's numbers come in as arguments, from ``helpers.data.paper``)
# ---------------------------------------------------------------------------------------------------------------


def paper_vs_ours(
    row_key: str, theirs: dict[str, Any], their_image_distance: float, ours: dict[str, Any]
) -> dict[str, Any]:
    """One row of Li et al.'s Table 2 (MNIST), each cell "paper / ours".

    theirs: the paper's row (init, success_pct, target_prob, sample_prob, vertex_distance); their_image_distance:
    the paper's mean distance between MNIST images; ours: a ``table_row`` dict. Distances in [0, 1] pixel units.
    """
    return {
        "row": row_key,
        "init": theirs["init"],
        "success %": f"{theirs['success_pct']} / {ours['same_class_pct']:.2f}",
        "target prob.": f"{theirs['target_prob']} / {ours['target_prob']:.4f}",
        "sample prob.": f"{theirs['sample_prob']} / {ours['sample_prob']:.4f}",
        "image distance": f"{their_image_distance} / {ours['image_distance']:.2f}",
        "vertex distance": f"{theirs['vertex_distance']} / {ours['vertex_distance']:.2f}",
        "ratio %": f"{100 * theirs['vertex_distance'] / their_image_distance:.1f} / {ours['ratio_pct']:.1f}",
    }


def side_by_side(label: str, theirs: dict[str, Any], ours: dict[str, Any], their_distance: float) -> dict[str, Any]:
    """One row of Li et al.'s Table 4 or 6 (ImageNet), each cell "paper / ours", plus our Proposition 1 residuals.

    theirs: the paper's row (success_pct, target_prob, sample_prob, vertex_distance); ours: a ``table_row`` dict;
    their_distance: the paper's mean distance between ImageNet images. Distances in 0-255 pixel units.
    """
    return {
        "table": label,
        "success %": f"{theirs['success_pct']} / {ours['same_class_pct']:.1f}",
        "target prob.": f"{theirs['target_prob']} / {ours['target_prob']:.3f}",
        "sample prob.": f"{theirs['sample_prob']} / {ours['sample_prob']:.3f}",
        "image distance": f"{their_distance} / {ours['image_distance']:.0f}",
        "vertex distance": f"{theirs['vertex_distance']} / {ours['vertex_distance']:.0f}",
        "ratio %": f"{100 * theirs['vertex_distance'] / their_distance:.1f} / {ours['ratio_pct']:.1f}",
        "vertex eq. residual": f"— / {ours['vertex_eq_rel_max']:.2g}",
        "sample fc6 mismatch": f"— / {ours['sample_act_rel_max']:.2g}",
    }


def mnist_comparison(
    theirs: dict[str, Any],
    mlp_rows: Sequence[dict[str, Any]],
    lenet_rows: Sequence[dict[str, Any]],
    mlp_accuracy: float,
    lenet_accuracy: float,
    image_distance: float,
) -> list[dict[str, Any]]:
    """Chapter 08's "paper vs ours" table: one {"quantity", "paper", "ours"} row per number.

    theirs: the paper's numbers for Li et al. (``helpers.data.paper.get("li")``: sections mnist, table2);
    mlp_rows, lenet_rows: ``two_start_rows`` (2T rows: the first T searched from the targets, row T is the paper's
    row 2); accuracies as fractions; image_distance: our mean distance between MNIST images ([0, 1] pixels, l2).
    """
    mnist, t2 = theirs["mnist"], theirs["table2"]
    r1, r2 = t2["rows"]["1"], t2["rows"]["2"]
    ours1, ours2 = mlp_rows[0], mlp_rows[len(mlp_rows) // 2]
    lo, hi = mnist["vertex_to_image_distance_ratio_pct"]
    appendix = "appendix (not in our copy)"
    return [
        {"quantity": "MLP test accuracy (%)", "paper": mnist["test_accuracy_pct"], "ours": 100 * mlp_accuracy},
        {
            "quantity": "samples in the target class (%), worst polytope",
            "paper": mnist["success_pct"],
            "ours": min(r["same_class_pct"] for r in mlp_rows),
        },
        {
            "quantity": "probability of the target's class, target / samples (rows 1, 2)",
            "paper": f"{r1['target_prob']} / {r1['sample_prob']}, {r2['target_prob']} / {r2['sample_prob']}",
            "ours": f"{ours1['target_prob']:.4f} / {ours1['sample_prob']:.4f}, "
            f"{ours2['target_prob']:.4f} / {ours2['sample_prob']:.4f}",
        },
        {
            "quantity": "largest |samples' mean prob. of the target's class - target's|, all polytopes",
            "paper": "—",
            "ours": max(abs(r["sample_prob"] - r["target_prob"]) for r in mlp_rows),
        },
        {"quantity": "mean distance between MNIST images", "paper": t2["image_distance"], "ours": image_distance},
        {
            "quantity": "vertex distance, rows 1 / 2",
            "paper": f"{r1['vertex_distance']} / {r2['vertex_distance']}",
            "ours": f"{ours1['vertex_distance']:.2f} / {ours2['vertex_distance']:.2f}",
        },
        {
            "quantity": "vertex / image distance (%), rows 1 / 2",
            "paper": f"{lo}-{hi}",
            "ours": f"{ours1['ratio_pct']:.1f} / {ours2['ratio_pct']:.1f}",
        },
        {
            "quantity": "first-layer activation mismatch of samples (rel. l2), worst",
            "paper": "'similar'",
            "ours": max(r["sample_act_rel_max"] for r in mlp_rows),
        },
        {"quantity": "LeNet-5 test accuracy (%)", "paper": appendix, "ours": 100 * lenet_accuracy},
        {
            "quantity": "LeNet-5 samples in the target class (%), worst",
            "paper": appendix,
            "ours": min(r["same_class_pct"] for r in lenet_rows),
        },
        {
            "quantity": "LeNet-5 fc1 activation mismatch of samples, worst",
            "paper": appendix,
            "ours": max(r["sample_act_rel_max"] for r in lenet_rows),
        },
    ]


def sample_rate(rows: Sequence[dict[str, Any]]) -> stats.Rate:
    """Samples classified as their polytope's target class, pooled over all polytopes (``table_row`` dicts)."""
    return stats.Rate(sum(int(r["same_class_k"]) for r in rows), sum(int(r["n_samples"]) for r in rows))


def polytope_rate(rows: Sequence[dict[str, Any]]) -> stats.Rate:
    """Polytopes all of whose samples keep the target's class (the paper's "100% of the 2000 examples")."""
    return stats.Rate.of(int(r["same_class_k"]) == int(r["n_samples"]) for r in rows)


def png_rate(rows: Sequence[dict[str, Any]]) -> stats.Rate:
    """Vertices and kept samples still classified as the target's class after an 8-bit PNG round trip."""
    return stats.Rate(sum(int(r["png_same_class_k"]) for r in rows), sum(int(r["png_n"]) for r in rows))


def confidence_gaps(rows: Sequence[dict[str, Any]]) -> stats.Spread:
    """Per polytope, |samples' mean probability of the target's class - the target's own probability|."""
    return stats.Spread.of(abs(r["sample_prob"] - r["target_prob"]) for r in rows)


def spread(
    rows: Sequence[dict[str, Any]], column: str, *, larger_is_worse: bool = True, unit: str = ""
) -> stats.Spread:
    """One column of ``table_row`` dicts over the polytopes, with its mean, 95% interval and worst case."""
    return stats.Spread.of((r[column] for r in rows), larger_is_worse=larger_is_worse, unit=unit)


def samples_budget(samples: int, theirs: dict[str, Any]) -> verdict.Budget:
    """Our samples per polytope against the paper's (``theirs``: ``helpers.data.paper.get("li")``)."""
    return verdict.Budget(samples, theirs["method"]["n_samples"], "samples per polytope")


@dataclass(frozen=True)
class MnistCriteria:
    """The pass rules of chapter 08's checks and claims, fixed before the run.

    accuracy_slack_pct: how many percentage points below the paper's test accuracy still reproduce it; act_tol:
    largest relative l2 mismatch of first-layer (pre-)activations that still counts as a collision;
    ratio_slack_pct: percentage points allowed outside the paper's band of vertex / image distance;
    confidence_tol: largest |samples' mean probability of the target's class - the target's| (the paper prints
    one decimal: 1.0 and 1.0); majority: the share of polytopes searched from another image whose vertices must
    lie nearer their start than the target (lower 95% bound) for "clearly not 7s"; converged: the share of
    polytopes the search must reach (lower 95% bound; an internal check of the search).
    """

    accuracy_slack_pct: float = 1.0
    act_tol: float = 0.01
    ratio_slack_pct: float = 0.5
    confidence_tol: float = 0.05
    majority: float = 0.5
    converged: float = 0.9


def mnist_checks(
    rows: Sequence[dict[str, Any]], ineq_limit: float, criteria: MnistCriteria
) -> list[tuple[bool, str, str]]:
    """Chapter 08's internal checks (our search and sampler work) as ``(ok, what, measured)``; any weights.

    rows: ``two_start_rows`` of the MLP (an affine cut); ineq_limit: the largest pre-activation an inactive unit may
    keep at a vertex (pre-activation units). The checks: the search reaches the polytope (vertices' equality
    residual <= ``act_tol`` and inactive units <= ``ineq_limit``) for a share of polytopes whose lower 95% bound
    is at least ``criteria.converged`` (a broken loss or optimiser converges for none; a hard start may take longer
    than the budget, and the claims report it); and the sampler draws convex combinations (for an affine cut no
    sample can be further from the polytope than its polytope's worst vertex, ``viol_rel``).
    """
    if not rows:
        raise ValueError("no rows to check")
    reached = stats.Rate.of(
        r["vertex_eq_rel_max"] <= criteria.act_tol and r["vertex_ineq_max"] <= ineq_limit for r in rows
    )
    excess = max(r["sample_viol_rel_max"] - r["vertex_viol_rel_max"] * (1 + 1e-3) - 1e-6 for r in rows)
    return [
        (
            reached.interval[0] >= criteria.converged,
            f"MLP search reaches the polytope (equality residual <= {criteria.act_tol}, inactive units <= "
            f"{ineq_limit:.2g}) for >= {criteria.converged:.0%} of polytopes (lower 95% bound)",
            reached.text(),
        ),
        (
            excess <= 0,
            "MLP sampler draws convex combinations: no sample is further from the polytope than its worst vertex",
            f"largest excess {max(excess, 0.0):.1e} (relative l2)",
        ),
    ]


def mnist_claims(
    theirs: dict[str, Any],
    mlp_rows: Sequence[dict[str, Any]],
    lenet_rows: Sequence[dict[str, Any]],
    mlp_accuracy: float,
    row2: dict[str, Tensor],
    sweep_facts: dict[str, Any],
    config: SearchConfig,
    criteria: MnistCriteria,
    models: tuple[str, str] = ("mnist_mlp_2x256", "lenet5"),
) -> list[dict[str, Any]]:
    """Chapter 08's claims, as keyword arguments of ``Chapter.claim`` (criterion, measured, models, budget, ...).

    theirs: ``helpers.data.paper.get("li")``; mlp_rows, lenet_rows: ``two_start_rows`` (2T rows each);
    mlp_accuracy: fraction; row2: ``TwoStartPolytopes.from_other()`` of the MLP search; sweep_facts:
    ``sweep_summary``; config: the MLP search settings (for the text); criteria: the pass rules; models: the
    registry names of the MLP and of LeNet-5 (a claim about a model needs that model trained). Criteria are fixed
    here from ``criteria`` and the paper's numbers, before any measurement is looked at.
    """
    mlp, lenet = models
    mnist = theirs["mnist"]
    lo, hi = mnist["vertex_to_image_distance_ratio_pct"]
    tight = sweep_facts["tight"]
    tight_text = f"{tight['ratio_pct']:.0f}%" if tight else "none"
    samples = int(mlp_rows[0]["n_samples"])
    far = stats.Rate.of(~row2["nearer_target"])
    png = png_rate(mlp_rows)
    worst_png = max(r["png_act_rel_max"] for r in mlp_rows)
    n = len(mlp_rows)
    return [
        {
            "id": "li.mnist.accuracy",
            "description": "MLP 2x256 test accuracy (%) on the 10,000 test digits",
            "criterion": verdict.at_least(
                mnist["test_accuracy_pct"] - criteria.accuracy_slack_pct, "test accuracy (%)"
            ).trained(),
            "paper": mnist["test_accuracy_pct"],
            "ours": round(100 * mlp_accuracy, 2),
            "models": (mlp,),
        },
        {
            "id": "li.mnist.same_class",
            "description": f"samples classified as their polytope's target class, {n} polytopes x {samples} samples",
            "criterion": verdict.every("a sample keeps the target's class").trained(),
            "paper": f"{mnist['success_pct']}% of {theirs['method']['n_samples']} per polytope",
            "ours": f"{sample_rate(mlp_rows).text()}; polytopes with all samples kept: "
            f"{polytope_rate(mlp_rows).text()}",
            "measured": sample_rate(mlp_rows),
            "models": (mlp,),
            "budget": samples_budget(samples, theirs),
        },
        {
            "id": "li.mnist.confidence",
            "description": "samples' mean probability of the target's class vs the target's own, per polytope",
            "criterion": verdict.at_most(
                criteria.confidence_tol, "|samples' mean probability - target's|, worst polytope"
            ).trained(),
            "paper": f"target {mnist['confidence']}, samples {mnist['confidence']} (Table 2)",
            "ours": confidence_gaps(mlp_rows),
            "models": (mlp,),
        },
        {
            "id": "li.mnist.activation_match",
            "description": "samples' first-layer activations match the target's (relative l2), worst polytope",
            "criterion": verdict.at_most(criteria.act_tol, "first-layer mismatch of the samples, worst polytope"),
            "paper": "similar",
            "ours": spread(mlp_rows, "sample_act_rel_max"),
            "models": (mlp,),
            "reason": "the search mechanics hold for any weights",
        },
        {
            "id": "li.mnist.distance_ratio",
            "description": "vertex distance / image distance (%), mean over polytopes",
            "criterion": verdict.between(
                lo - criteria.ratio_slack_pct, hi + criteria.ratio_slack_pct, "mean vertex / image distance (%)"
            ).trained(),
            "paper": f"{lo}-{hi}",
            "ours": spread(mlp_rows, "ratio_pct", unit="%"),
            "models": (mlp,),
            "reason": f"the distance is set by the optimiser (lr {config.lr}, {config.steps} steps here; sweep: "
            f"{sweep_facts['ratio_min']:.0f}-{sweep_facts['ratio_max']:.0f}%, the smallest with a tight collision "
            f"{tight_text}); the paper's settings are in its appendix, not in our copy",
        },
        {
            "id": "li.mnist.row2_appearance",
            "description": "polytopes searched from another digit: vertices nearer their start than the target",
            "criterion": verdict.rate_at_least(
                criteria.majority, "polytopes whose vertices lie nearer their start than the target"
            ).trained(),
            "paper": "'clearly not 7s' (Table 1, row 2)",
            "ours": f"{far.text()}; mean distance to target {float(row2['to_target'].mean()):.2f}, to start "
            f"{float(row2['to_start'].mean()):.2f}",
            "measured": far,
            "models": (mlp,),
            "reason": "the paper's optimiser settings are not in our copy",
        },
        {
            "id": "li.mnist.png_round_trip",
            "description": "vertices and kept samples saved as 8-bit PNGs and read back keep the target's class",
            "criterion": verdict.every(
                "an image keeps the target's class after the PNG round trip", kind="beyond"
            ).trained(),
            "paper": "—",
            "ours": f"{png.text()}; worst first-layer mismatch after the round trip {worst_png:.1e}",
            "measured": png,
            "models": (mlp,),
        },
        {
            "id": "li.lenet5.same_class",
            "description": "LeNet-5 (fc1): samples classified as their polytope's target class",
            "criterion": verdict.every("a sample keeps the target's class", kind="beyond").trained(),
            "paper": "appendix (not in our copy)",
            "ours": f"{sample_rate(lenet_rows).text()}; polytopes with all samples kept: "
            f"{polytope_rate(lenet_rows).text()}",
            "measured": sample_rate(lenet_rows),
            "models": (lenet,),
            "reason": "our own measurement (the paper's LeNet-5 numbers are in its appendix, not in our copy); the "
            "conv layers make the map to fc1 non-affine, so convexity is not guaranteed",
        },
    ]


# ---------------------------------------------------------------------------------------------------------------
# Conclusions in chapter 08's prose, chosen by the numbers (glued into the Markdown)
# ---------------------------------------------------------------------------------------------------------------


def compared_text(value: float, lo: float, hi: float) -> str:
    """Where ``value`` lies relative to the band [lo, hi]: "above", "below" or "inside"."""
    return "above" if value > hi else "below" if value < lo else "inside"


def row2_text(nearer_target: stats.Rate, majority: float) -> str:
    """The conclusion about the polytopes searched from another image, from the rate of those whose vertices lie
    nearer the target than their start: the paper's "clearly not the target" holds when the rate of the opposite
    (nearer their start) has a lower 95% bound of at least ``majority``."""
    far_low = 1 - nearer_target.interval[1]
    if far_low >= majority:
        return "most of them stay away from the target, as the paper's 'clearly not 7s' says"
    return "they look like noisy versions of the target: the paper's 'clearly not 7s' is not what we see"


def overdetermined_text(row: dict[str, Any]) -> str:
    """Whether a layer's mean active units (an ``active_counts`` row) exceed the input dimension d, in words."""
    if row["active_mean"] > row["d"]:
        return (
            f"more than the {row['d']} input dimensions, so its equalities alone overdetermine the pixels and the "
            "polytope collapses to a point"
        )
    rest = row["d"] - row["active_max"]
    return f"fewer than the {row['d']} input dimensions, so a polytope of at least {rest} dimensions remains"


# ---------------------------------------------------------------------------------------------------------------
# Chapter 09's trained substitute (EfficientNet-Lite0 next to VGG-16): its own claims, stated before measuring
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubstituteCriteria:
    """The pass rules of chapter 09's trained-substitute claims, fixed before the run.

    act_tol: largest relative l2 mismatch of the cut layer's activations that counts as a collision (the VGG
    claims' 1%); confidence_tol: largest |samples' mean probability of the target's class - the target's own| per
    polytope (the paper's Table 4: 0.993 vs 0.995, within 0.05); the distance ratio is judged against the paper's
    ImageNet band (``theirs["imagenet"]["vertex_to_image_distance_ratio_pct"]``).
    """

    act_tol: float = 0.01
    confidence_tol: float = 0.05


def substitute_claims(
    theirs: dict[str, Any],
    pixel_rows: Sequence[dict[str, Any]],
    patch_rows: Sequence[dict[str, Any]],
    model: str,
    layer: str,
    steps: tuple[int, int],
    criteria: SubstituteCriteria = SubstituteCriteria(),
) -> list[dict[str, Any]]:
    """Chapter 09's claims about the trained substitute, as keyword arguments of ``Chapter.claim``.

    theirs: ``helpers.data.paper.get("li")``; pixel_rows / patch_rows: ``polytope.table_row`` dicts of the
    substitute's pixel polytopes (one per target photo, searched from the next photo as in Table 3) and of its
    patch-composed polytopes (Table 6's two rows); model: the registry name of the substitute (its claims rest on
    it alone, so the class and probability claims are judged when it is trained); layer: where it is cut (for the
    text); steps: optimiser steps (pixels, patches). Every claim is compared with the paper's 2000 samples per
    polytope (``samples_budget``): under half of it, the status is "below the paper's budget".
    """
    if not pixel_rows or not patch_rows:
        raise ValueError("need the substitute's pixel and patch polytopes (one table row each at least)")
    rlo, rhi = theirs["imagenet"]["vertex_to_image_distance_ratio_pct"]
    t4 = theirs["table4"]["rows"]["1"]
    n_paper = theirs["method"]["n_samples"]
    budget = samples_budget(min(int(r["n_samples"]) for r in [*pixel_rows, *patch_rows]), theirs)
    what = f"trained substitute: {model}, cut at {layer}"
    note = f"{steps[0]} / {steps[1]} optimiser steps (pixels / patches; the paper's are in its appendix)"
    both = [*pixel_rows, *patch_rows]
    common = {"models": (model,), "budget": budget}
    return [
        {
            "id": "li.vgg16.same_class.trained_substitute",
            "description": f"{what}: samples of {len(pixel_rows)} pixel polytopes classified as the target's class",
            "criterion": verdict.every("a sample keeps the target's class").trained(),
            "paper": f"{t4['success_pct']}% of {n_paper} (VGG-16 fc6)",
            "ours": f"{sample_rate(pixel_rows).text()}; polytopes with all samples kept: "
            f"{polytope_rate(pixel_rows).text()}",
            "measured": sample_rate(pixel_rows),
            "reason": note,
            **common,
        },
        {
            "id": "li.vgg16.confidence.trained_substitute",
            "description": f"{what}: |samples' mean probability of the target's class - the target's own|, per "
            "pixel polytope",
            "criterion": verdict.at_most(
                criteria.confidence_tol, "|samples' mean probability - target's|, worst polytope"
            ).trained(),
            "paper": f"target {t4['target_prob']}, samples {t4['sample_prob']} (Table 4)",
            "ours": confidence_gaps(pixel_rows),
            "reason": note,
            **common,
        },
        {
            "id": "li.vgg16.distance_ratio.trained_substitute",
            "description": f"{what}: vertex distance / image distance (%), mean over pixel polytopes",
            "criterion": verdict.between(rlo, rhi, "mean vertex / image distance (%)").trained(),
            "paper": f"{rlo}-{rhi} (VGG-16)",
            "ours": spread(pixel_rows, "ratio_pct", unit="%"),
            "reason": f"image distance from the offline photos, not ImageNet; {note}",
            **common,
        },
        {
            "id": "li.vgg16.fc6_collision.trained_substitute",
            "description": f"{what}: samples' activations at the cut match the target's (rel. l2), worst of the "
            "pixel and patch polytopes",
            "criterion": verdict.at_most(criteria.act_tol, "activation mismatch of the samples, worst polytope"),
            "paper": "'all examples within the polytopes collide with the target image' (Table 3)",
            "ours": spread(both, "sample_act_rel_max"),
            "reason": note,
            **common,
        },
        {
            "id": "li.patches.same_class.trained_substitute",
            "description": f"{what}: samples of the {len(patch_rows)} patch-composed polytopes (Table 6) classified "
            "as the target's class",
            "criterion": verdict.every("a sample keeps the target's class").trained(),
            "paper": f"{min(theirs['table6']['rows'][k]['success_pct'] for k in ('1', '2'))}% of {n_paper}",
            "ours": sample_rate(patch_rows).text(),
            "measured": sample_rate(patch_rows),
            "reason": note,
            **common,
        },
        {
            "id": "li.vgg16.png_round_trip.trained_substitute",
            "description": f"{what}: vertices and kept samples saved as 8-bit PNGs and read back keep the target's "
            "class",
            "criterion": verdict.every(
                "an image keeps the target's class after the PNG round trip", kind="beyond"
            ).trained(),
            "paper": "—",
            "ours": f"{png_rate(both).text()}; worst mismatch at the cut after the round trip "
            f"{max(r['png_act_rel_max'] for r in both):.2g}",
            "measured": png_rate(both),
            **common,
        },
    ]


def substitute_text(rows: Sequence[dict[str, Any]], criteria: SubstituteCriteria = SubstituteCriteria()) -> str:
    """What the substitute's pixel polytopes (``table_row`` dicts) show, in words chosen by the numbers: whether
    every sample kept the target's class and whether the samples collide at the cut (``criteria.act_tol``)."""
    if not rows:
        raise ValueError("no rows to describe")
    kept = sample_rate(rows)
    worst = max(r["sample_act_rel_max"] for r in rows)
    classes = (
        "every sample keeps its target's class"
        if kept.k == kept.n
        else f"only {kept.k} of {kept.n} samples keep their target's class"
    )
    collide = (
        "and every sample collides with its target at the cut"
        if worst <= criteria.act_tol
        else f"and the samples do not collide at the cut yet (worst mismatch {worst:.2g} against our "
        f"{criteria.act_tol:g}): the search has not reached the polytope within this budget"
    )
    return f"{classes}, {collide}"
