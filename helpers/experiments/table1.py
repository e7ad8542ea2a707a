"""The Table 1 study of Ozbulak et al.: which constructor each row is, the audit of every row, its figures.

The numbers come from :mod:`helpers.experiments.audit` (the matrix rule and the rank rule); this module decides
which constructor each Table 1 row names (:func:`candidates`, :func:`check_row`, :class:`RowCheck`), audits the
chosen ones (:func:`audit_rows`), turns the audits into the chapter's tables, claims and checks, and draws its
figures (each ``plot_*`` returns a ``matplotlib`` figure; the chapter shows it).

All counts are numbers of weight matrices (``n``, ``nu``, ``mu``) or of input dimensions (nullities); every
matrix is ``rows x cols = outputs x inputs``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from helpers import stats
from helpers.book import results, verdict
from helpers.experiments.audit import (
    ConvTransposeRule,
    GroupedReading,
    ModelAudit,
    WeightMatrix,
    audit_model,
    block_null_vector,
    build_on_meta,
    first_executed,
    independent_rank_check,
    naive_with_spectra,
    patch_response_change,
    sample_matrices,
    spectra,
    structural_audit,
    sweep,
    weight_matrices,
)
from helpers.linalg import rank_rule
from helpers.progress import progress_bar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from helpers.models.registry import LoadedModel


def implied_n(count: int, percent: int) -> set[int]:
    """Every ``n`` for which ``count / n``, truncated to a whole percent, prints as ``percent``.

    Table 1 truncates (AlexNet's mu/n = 7/8 = 87.5% is printed 87%; ResNet-50's 36/54 = 66.7% as 66%).
    An empty set means no ``n`` prints so. ``count`` must be at least 1: 0 of any ``n`` prints 0%, so a zero
    count says nothing about ``n``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1 (0 matrices are 0% of every n), got {count}")
    return {n for n in range(count, 100 * count + 2) if math.floor(100 * count / n + 1e-9) == percent}


@dataclass
class RowCheck:
    """One Table 1 row against one constructor's shapes (random or any full-rank weights)."""

    row: str
    model: str
    n: int
    n_implied: list[int]
    mu: int
    mu_paper: int
    structural_nu: int
    nu_paper: int
    structural_sum: int
    sum_paper: int
    structural_w1: int
    w1_paper: int
    w1_cols: int

    @property
    def n_fits(self) -> bool:
        """The constructor's ``n`` is one the printed percentages allow."""
        return self.n in self.n_implied

    @property
    def mu_fits(self) -> bool:
        """The constructor's ``mu`` (wide matrices, a shape fact) equals the paper's."""
        return self.mu == self.mu_paper

    @property
    def impossible(self) -> list[str]:
        """Paper numbers no weights of these shapes can give (nullity >= cols - rows, <= cols)."""
        bad = []
        if self.nu_paper < self.structural_nu or self.nu_paper > self.n:
            bad.append(f"nu {self.nu_paper} outside [{self.structural_nu}, {self.n}]")
        if self.sum_paper < self.structural_sum:
            bad.append(f"sum of nullities {self.sum_paper} < {self.structural_sum} forced by the shapes")
        if not self.structural_w1 <= self.w1_paper <= self.w1_cols:
            bad.append(f"nullity(W1) {self.w1_paper} outside [{self.structural_w1}, {self.w1_cols}]")
        return bad

    @property
    def fits(self) -> bool:
        """``n`` and ``mu`` fit and no paper number is impossible for these shapes."""
        return self.n_fits and self.mu_fits and not self.impossible

    @property
    def trained_excess(self) -> dict[str, int]:
        """What training (or the tolerance) must add to the shapes' numbers to reach the paper's."""
        return {
            "nu": self.nu_paper - self.structural_nu,
            "sum_nullity": self.sum_paper - self.structural_sum,
            "nullity_w1": self.w1_paper - self.structural_w1,
        }


def check_row(row: str, model_name: str, audit: ModelAudit, paper_row: dict[str, Any]) -> RowCheck:
    """Compare a structural audit of ``model_name`` with Table 1's ``row`` (``paper_row`` from paper_numbers)."""
    implied = implied_n(paper_row["nu"], paper_row["nu_over_n_pct"]) & implied_n(
        paper_row["mu"], paper_row["mu_over_n_pct"]
    )
    return RowCheck(
        row,
        model_name,
        audit.n,
        sorted(implied),
        audit.mu,
        paper_row["mu"],
        audit.structural_nu,
        paper_row["nu"],
        audit.structural_sum_nullity,
        paper_row["sum_nullity"],
        audit.structural_nullity_w1,
        paper_row["nullity_W1"],
        audit.rows[0].cols,
    )


#: The constructors the chapter tests for each Table 1 row: the registry's choice (``table1=`` label) first,
#: then the alternatives a reader might assume.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "Squeezenet": ("squeezenet1_1", "squeezenet1_0"),
    "ViT-Base": ("vit_base_patch16_224", "vit_b_16"),
    "ViT-Large": ("vit_large_patch16_224", "vit_l_16"),
    "Fcn": ("fcn_resnet50_aux", "fcn_resnet50"),
    "PSPNet": ("pspnet_resnet34_voc", "pspnet_resnet34"),
    "MobileNet-V3": (
        "deeplabv3_resnet50_aux",
        "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
        "deeplabv3_resnet50",
    ),
    "Faster R-CNN": (
        "fasterrcnn_mobilenet_v3_large_fpn",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "fasterrcnn_resnet50_fpn",
    ),
}


def candidates(row: str) -> tuple[str, ...]:
    """Registry names to test for a Table 1 row, the registry's choice first."""
    from helpers.models import registry

    chosen = registry.TABLE1_ROWS[row]
    return (chosen,) + tuple(c for c in CANDIDATES.get(row, ()) if c != chosen)


def check_all_rows(rules: Sequence[ConvTransposeRule] = ("skip",), progress: bool = False) -> dict[str, list[RowCheck]]:
    """Every Table 1 row against every candidate constructor under each conv-transpose rule, from shapes alone
    (each candidate built once on the meta device: seconds for all of them)."""
    from helpers.data import paper

    rows = paper.get("ozbulak", "table1", "rows")
    out: dict[str, list[RowCheck]] = {rule: [] for rule in rules}
    names = [(row, name) for row in rows for name in candidates(row)]
    built: dict[str, nn.Module] = {}
    for row, name in progress_bar(names, desc="shapes", leave=False, disable=not progress):
        model = built.setdefault(name, build_on_meta(name))
        for rule in rules:
            out[rule].append(check_row(row, name, structural_audit(model, conv_transpose=rule), rows[row]))
    return out


def table_row(
    row: str, paper_row: dict[str, Any], ours: ModelAudit, check: RowCheck, pretrained: bool
) -> dict[str, Any]:
    """Paper vs ours for one Table 1 row, with the difference and its explanation (for the chapter's table)."""

    def explain(col: str, paper_value: int, ours_value: int, structural: int) -> str:
        if paper_value == ours_value:
            return "same"
        if paper_value < structural:
            return "impossible: below what the shapes force"
        if not pretrained:
            return f"trained weights / tolerance (shapes force {structural}; random weights give the shapes' value)"
        return "trained weights: differs (see tolerance sweep)"

    out = {
        "row": row,
        "model": ours.model,
        "n (implied)": "/".join(map(str, check.n_implied)),
        "n": ours.n,
        "mu paper": paper_row["mu"],
        "mu": ours.mu,
    }
    for col, key, struct in (
        ("nu", "nu", ours.structural_nu),
        ("sum", "sum_nullity", ours.structural_sum_nullity),
        ("W1", "nullity_W1", ours.structural_nullity_w1),
    ):
        value = getattr(ours, {"nu": "nu", "sum": "sum_nullity", "W1": "nullity_w1"}[col])
        out[f"{col} paper"] = paper_row[key]
        out[col] = value
        out[f"{col} diff"] = value - paper_row[key]
        out[f"{col} why"] = explain(col, paper_row[key], value, struct)
    if not check.n_fits:
        out["n why"] = f"percentages imply n = {check.n_implied}; constructor has {check.n} (unexplained)"
    return out


def page_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``table_row`` records (plus the float32 keys ``nu f32``, ``sum f32``, ``W1 f32``) as the page shows them:
    one "ours / paper" cell per quantity and the explanations joined into one ``why`` note."""
    out = []
    for r in rows:
        why = "; ".join(
            f"{c}: {r[f'{c} why']}" for c in ("n", "nu", "sum", "W1") if r.get(f"{c} why") not in (None, "same")
        )
        pair = "{} / {}".replace(" ", "\u00a0")  # short pairs never wrap at the slash
        out.append(
            {
                "row": r["row"],
                "model": r["model"],
                "n": pair.format(r["n"], r["n (implied)"]),
                "μ": pair.format(r["mu"], r["mu paper"]),
                "ν": pair.format(r["nu"], r["nu paper"]),
                "Σ nullity": f"{r['sum']} / {r['sum paper']}",
                "nullity(W1)": pair.format(r["W1"], r["W1 paper"]),
                "float32 ν / Σ / W1": f"{r['nu f32']} / {r['sum f32']} / {r['W1 f32']}",
                "weights": r["weights"],
                "why": why,
            }
        )
    return out


#: The Table 1 models a quick build audits (one per task family, all small); the first two are the test set.
QUICK_MODELS: tuple[str, ...] = (
    "squeezenet1_1",
    "deit_tiny_patch16_224",
    "lraspp_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_fpn",
)


#: The models of the full build's naive-vs-fast test set beyond the quick ones.
EXTRA_TEST_MODELS: tuple[str, ...] = ("resnet50", "densenet121")


#: The tasks of Table 1, in the order the paper lists them.
TASKS: tuple[str, ...] = ("classification", "segmentation", "localization")


def constructors(rows: Mapping[str, Any]) -> dict[str, str]:
    """The constructor audited for each Table 1 row (the registry's choice, ``candidates(row)[0]``)."""
    return {row: candidates(row)[0] for row in rows}


def rows_to_audit(rows: Mapping[str, Any], quick: bool) -> list[str]:
    """Table 1 rows the chapter audits: every row, or (``quick``) those whose constructor is in QUICK_MODELS."""
    chosen = constructors(rows)
    return [r for r in rows if chosen[r] in QUICK_MODELS] if quick else list(rows)


def naive_test_models(quick: bool) -> list[str]:
    """Models of the naive-vs-fast comparison and the tolerance sweep: two small ones (quick) or six."""
    return list(QUICK_MODELS[:2]) if quick else [*QUICK_MODELS, *EXTRA_TEST_MODELS]


def matrix_rule_example() -> nn.Sequential:
    """A tiny model with one layer of each kind the matrix rule treats differently: a grouped conv
    (8 -> 6 channels, 2 groups, 3x3), a transposed conv (6 -> 4, 2x2, stride 2) and a linear layer (10 -> 3)."""
    return nn.Sequential(
        nn.Conv2d(8, 6, 3, groups=2),
        nn.ConvTranspose2d(6, 4, 2, stride=2),
        nn.Flatten(),
        nn.Linear(10, 3),
    )


def matrix_rule_table(model: nn.Module) -> list[dict[str, Any]]:
    """One record per weight matrix of ``model`` under the default rule (``skip``), then the transposed
    convolutions again under ``operator``: stored shape, matrix shape (rows x cols), kind, structural nullity."""
    return [
        {
            "rule": rule,
            "name": m.name,
            "stored": m.stored_shape,
            "matrix": m.shape,
            "kind": m.kind,
            "structural nullity": m.structural_nullity,
        }
        for rule in ("skip", "operator")
        for m in weight_matrices(model, conv_transpose=rule)
        if rule == "skip" or m.kind == "conv_transpose"
    ]


def w1_order_row(name: str, model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """W1 of ``model`` (the first matrix in registration order) against the first weight layer that
    ``model(example)`` runs; ``same`` when they are one layer."""
    first = first_executed(model, example)
    w1 = weight_matrices(model)[0]
    return {
        "model": name,
        "W1 (registration order)": w1.name,
        "first executed": first,
        "same": w1.name.rsplit(".", 1)[0] == first,
    }


def w1_order_evidence(names: Sequence[str], input_size: int = 224) -> list[dict[str, Any]]:
    """:func:`w1_order_row` for registry models on a zero image (1, 3, ``input_size``, ``input_size``).

    The models are built with uninitialised weights (shapes and the forward order are all that matter)."""
    example = torch.zeros(1, 3, input_size, input_size)
    return [w1_order_row(n, build_on_meta(n).to_empty(device="cpu").eval(), example) for n in names]


def skipped_table(audit: ModelAudit) -> list[dict[str, Any]]:
    """The parameters the audit did not count as weight matrices: name, shape, why."""
    return [{"parameter": n, "shape": s, "why not a weight matrix": why} for n, s, why in audit.skipped]


def fit_table(checks: Sequence[RowCheck]) -> list[dict[str, Any]]:
    """One record per (row, constructor) check: n, the n the percentages allow, mu ours/paper, whether the
    constructor fits and which paper numbers these shapes make impossible."""
    return [
        {
            "row": c.row,
            "constructor": c.model,
            "n": c.n,
            "n implied": c.n_implied,
            "mu (ours/paper)": f"{c.mu}/{c.mu_paper}",
            "fits": "yes" if c.fits else "no",
            "impossible paper numbers": "; ".join(c.impossible),
        }
        for c in checks
    ]


#: The constructors the chapter's prose compares with Table 1 rows (besides each row's chosen one).
PROSE_MODELS: tuple[str, ...] = (
    "alexnet",
    "squeezenet1_0",
    "fcn_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "pspnet_resnet34",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "retinanet_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
)


def _pct(count: int, n: int) -> float:
    return 100 * count / n


def prose_numbers(paper_rows: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number the chapter's prose about the constructors quotes, computed from the shapes
    (:data:`PROSE_MODELS` built on the meta device) and the paper's rows, keyed by glue name."""
    a = {name: structural_audit(build_on_meta(name)) for name in PROSE_MODELS}
    alex, vitl, ret = paper_rows["AlexNet"], paper_rows["ViT-Large"], paper_rows["RetinaNet"]
    w1 = {name: audit.w1_shape or (0, 0) for name, audit in a.items()}

    def shape(name: str) -> str:
        return f"{w1[name][0]}x{w1[name][1]}"

    vitb = paper_rows["ViT-Base"]
    return {
        "alex_mu": alex["mu"],
        "alex_n": a["alexnet"].n,
        "alex_mu_pct": _pct(alex["mu"], a["alexnet"].n),
        "alex_mu_printed": alex["mu_over_n_pct"],
        "sq10_w1": shape("squeezenet1_0"),
        "fcn_noaux_n": a["fcn_resnet50"].n,
        "fcn_noaux_mu": a["fcn_resnet50"].mu,
        "fcn_paper_mu": paper_rows["Fcn"]["mu"],
        "mnv3_w1": shape("deeplabv3_mobilenet_v3_large"),
        "mnv3_w1_cols": w1["deeplabv3_mobilenet_v3_large"][1],
        "mnv3_paper_w1": paper_rows["MobileNet-V3"]["nullity_W1"],
        "psp1_sum": a["pspnet_resnet34"].structural_sum_nullity,
        "psp_paper_sum": paper_rows["PSPNet"]["sum_nullity"],
        "vitb_n": a["vit_base_patch16_224"].n,
        "vitb_implied": " or ".join(
            map(
                str, sorted(implied_n(vitb["nu"], vitb["nu_over_n_pct"]) & implied_n(vitb["mu"], vitb["mu_over_n_pct"]))
            )
        ),
        "vitl_n": a["vit_large_patch16_224"].n,
        "vitl_nu": vitl["nu"],
        "vitl_mu": vitl["mu"],
        "vitl_nu_pct": _pct(vitl["nu"], a["vit_large_patch16_224"].n),
        "vitl_mu_pct": _pct(vitl["mu"], a["vit_large_patch16_224"].n),
        "vitl_nu_printed": vitl["nu_over_n_pct"],
        "vitl_mu_printed": vitl["mu_over_n_pct"],
        "vitl_implied": " or ".join(
            map(
                str, sorted(implied_n(vitl["nu"], vitl["nu_over_n_pct"]) & implied_n(vitl["mu"], vitl["mu_over_n_pct"]))
            )
        )
        or "no n",
        "ret_paper_w1": ret["nullity_W1"],
        "ret_w1": shape("retinanet_resnet50_fpn"),
        "ret_w1_rows": w1["retinanet_resnet50_fpn"][0],
        "ret_w1_cols": w1["retinanet_resnet50_fpn"][1],
        "ret_w1_min": a["retinanet_resnet50_fpn"].structural_nullity_w1,
        "mask_n": a["maskrcnn_resnet50_fpn"].n,
        "mask_w1_min": a["maskrcnn_resnet50_fpn"].structural_nullity_w1,
        "mask_w1_rows": w1["maskrcnn_resnet50_fpn"][0],
        "mask_w1_cols": w1["maskrcnn_resnet50_fpn"][1],
        "tol32_4096": rank_rule.default_rtol((4096, 4096), torch.float32),
    }


#: The only Table 1 rows whose models have a transposed convolution.
CONV_TRANSPOSE_ROWS: tuple[str, ...] = ("Mask R-CNN", "Keypoint R-CNN")


def conv_transpose_table(
    row_checks: Mapping[str, Sequence[RowCheck]],
    chosen: Mapping[str, str],
    rows: Collection[str] = CONV_TRANSPOSE_ROWS,
) -> list[dict[str, Any]]:
    """How each conv-transpose rule (keys of ``row_checks``, from :func:`check_all_rows`) fits ``rows``, for the
    chosen constructor of each row (``chosen``: row -> registry name)."""
    return [
        {
            "conv-transpose rule": rule,
            "row": c.row,
            "n": c.n,
            "n implied": c.n_implied,
            "mu (ours/paper)": f"{c.mu}/{c.mu_paper}",
            "fits": c.fits,
            "impossible": "; ".join(c.impossible),
        }
        for rule, checks in row_checks.items()
        for c in checks
        if c.row in rows and c.model == chosen[c.row]
    ]


def frozen_layers_table(
    model: nn.Module, trainable: tuple[str, ...] = ("layer2", "layer3", "layer4"), body: str = "backbone.body"
) -> list[dict[str, Any]]:
    """Structural audits of a detection model whose backbone is frozen as torchvision freezes it when built with
    pretrained weights: every parameter of the submodule ``body`` outside the ``trainable`` prefixes gets
    ``requires_grad=False`` (``model`` is changed in place). One record counting every matrix
    (``trainable_only=False``), one counting only the trainable ones (``True``): n, mu, W1 and its shape."""
    for pname, p in model.get_submodule(body).named_parameters():
        if not pname.startswith(trainable):
            p.requires_grad_(False)
    out = []
    for only in (False, True):
        a = structural_audit(model, trainable_only=only)
        out.append(
            {
                "trainable_only": only,
                "n": a.n,
                "mu": a.mu,
                "W1": a.w1_name,
                "W1 shape": a.w1_shape,
                "structural nullity(W1)": a.structural_nullity_w1,
            }
        )
    return out


@dataclass
class Table1Audits:
    """The audits of the chapter's rows (keyed by Table 1 row): float64 and float32 ``ModelAudit``s, the loaded
    models (``LoadedModel``, whose ``model`` is dropped for the big ones), the seconds both audits took (wall
    clock) and W1 of each model (a copy of the matrix, rows x cols)."""

    audits64: dict[str, ModelAudit] = field(default_factory=dict)
    audits32: dict[str, ModelAudit] = field(default_factory=dict)
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    w1s: dict[str, WeightMatrix] = field(default_factory=dict)
    independent: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def rows(self) -> list[str]:
        """The audited Table 1 rows, in audit order."""
        return list(self.audits64)

    @property
    def pretrained(self) -> dict[str, bool]:
        """Row -> whether its model runs with pretrained weights."""
        return {row: loaded.is_pretrained for row, loaded in self.loaded.items()}

    @property
    def weights_caption(self) -> str:
        """The weights phrase of a figure caption: every model's, or the first one's when they are many."""
        caps = sorted({loaded.caption() for loaded in self.loaded.values()})
        return "; ".join(caps) if len(caps) < 3 else caps[0] + " (and the others alike)"


def audit_rows(
    load: Callable[[str], LoadedModel],
    rows: Sequence[str],
    chosen: Mapping[str, str],
    device: torch.device | str | None = None,
    keep: Collection[str] = QUICK_MODELS,
    sample: int = 3,
    seed: int = 0,
) -> Table1Audits:
    """Load (``load``: registry name -> LoadedModel, the chapter's weights policy) and audit the constructor of
    every row at float64 and float32 precision (``audit_model``'s default rule, ranks on ``device``, cached by
    weights); then check W1 and ``sample`` random other matrices (``seed``) of each model against an
    independent numpy SVD at both precisions (``independent``: row -> records of
    :func:`helpers.experiments.audit.independent_rank_check`, each with its ``row``).

    Models not in ``keep`` are dropped after the audit (their ``LoadedModel.model`` set to None) to keep memory
    low; W1 is copied first."""
    out = Table1Audits()
    for row in rows:
        name = chosen[row]
        loaded = load(name)
        out.loaded[row] = loaded
        start = time.perf_counter()
        out.audits64[row] = audit_model(loaded.model, dtype=torch.float64, device=device)
        out.audits32[row] = audit_model(loaded.model, dtype=torch.float32, device=device)
        out.seconds[row] = time.perf_counter() - start
        for a in (out.audits64[row], out.audits32[row]):
            a.model, a.weights = name, loaded.weights
        matrices = weight_matrices(loaded.model)
        picked = sample_matrices(matrices, sample, seed)
        sigmas: dict[int, Any] = {}  # one numpy SVD per sampled matrix, shared by both precisions
        out.independent[row] = [
            {"row": row, **rec}
            for a in (out.audits32[row], out.audits64[row])
            for rec in independent_rank_check(matrices, a, picked, sigmas)
        ]
        out.w1s[row] = weight_matrices(loaded.model)[0]
        out.w1s[row].matrix = out.w1s[row].matrix.clone()
        if name not in keep:
            loaded.model = None  # type: ignore[assignment]
    return out


def chosen_checks(checks: Sequence[RowCheck], chosen: Mapping[str, str]) -> dict[str, RowCheck]:
    """Row -> the check of the row's chosen constructor (``chosen``: row -> registry name)."""
    return {c.row: c for c in checks if c.model == chosen[c.row]}


def results_table(
    audits: Table1Audits, paper_rows: Mapping[str, dict[str, Any]], checks: Mapping[str, RowCheck]
) -> list[dict[str, Any]]:
    """Paper vs ours for every audited row (:func:`table_row` in float64) with the float32 ``nu``, sum and W1
    nullity (``nu f32``, ``sum f32``, ``W1 f32``) and the weights used."""
    pretrained = audits.pretrained
    return [
        {
            **table_row(row, paper_rows[row], audits.audits64[row], checks[row], pretrained[row]),
            "nu f32": audits.audits32[row].nu,
            "sum f32": audits.audits32[row].sum_nullity,
            "W1 f32": audits.audits32[row].nullity_w1,
            "weights": audits.loaded[row].weights,
        }
        for row in audits.rows
    ]


def plot_w1_spectra(audits: Table1Audits) -> Figure:
    """One panel per audited row: W1's singular values divided by the largest (log scale), with the float64 and
    float32 default rank tolerances ``max(rows, cols) * eps`` (dashed); titles give W1's shape and nullity."""
    import matplotlib.pyplot as plt

    rows = audits.rows
    n_plots = len(rows)
    cols = 4 if n_plots > 4 else n_plots
    n_lines = (n_plots + cols - 1) // cols
    fig, axes = plt.subplots(n_lines, cols, figsize=(2.8 * cols, 2.4 * n_lines), squeeze=False)
    for ax in axes.flat[n_plots:]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        w1 = audits.w1s[row]
        sigma = rank_rule.reference_rank(w1.matrix)[1].cpu().numpy()
        ax.semilogy(sigma / sigma[0], ".", ms=2)
        for dt, color in ((torch.float64, "C3"), (torch.float32, "C1")):
            ax.axhline(rank_rule.default_rtol(w1.shape, dt), color=color, lw=0.8, ls="--", label=f"tol {str(dt)[6:]}")
        ax.set_title(f"{row}: {w1.shape[0]}x{w1.shape[1]}, nullity {audits.audits64[row].nullity_w1}", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_ylabel("sigma_i / sigma_max")
    fig.tight_layout()
    return fig


def plot_by_task(audits: Table1Audits, paper_rows: Mapping[str, dict[str, Any]]) -> Figure:
    """nullity(W1) (top) and nu/n (bottom) per audited row, grouped by task: the paper's (trained weights) next
    to ours in float64 and float32."""
    import matplotlib.pyplot as plt

    rows = audits.rows
    tasks = [paper_rows[r]["task"] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (TASKS.index(tasks[i]), i))
    labels = [rows[i] for i in order]
    x = np.arange(len(labels))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.55 * len(labels) + 2), 6.2), sharex=True)
    for ax, key, paper_key, title in (
        (ax1, "nullity_w1", "nullity_W1", "nullity(W1)"),
        (ax2, "nu_over_n", None, "nu / n"),
    ):
        paper_vals = [paper_rows[r][paper_key] if paper_key else paper_rows[r]["nu_over_n_pct"] / 100 for r in labels]
        ax.bar(x - 0.27, paper_vals, 0.27, label="paper (trained)", color="0.6")
        ax.bar(x, [getattr(audits.audits64[r], key) for r in labels], 0.27, label="ours, float64", color="C0")
        ax.bar(x + 0.27, [getattr(audits.audits32[r], key) for r in labels], 0.27, label="ours, float32", color="C1")
        ax.set_ylabel(title)
    for t in sorted(set(tasks), key=TASKS.index):
        span = [k for k, r in enumerate(labels) if paper_rows[r]["task"] == t]
        ax1.annotate(t, (np.mean(span), 1.02), xycoords=("data", "axes fraction"), ha="center", fontsize=8)
        if span[0] > 0:
            for ax in (ax1, ax2):
                ax.axvline(span[0] - 0.5, color="k", lw=0.6)
    ax2.set_xticks(x, labels, rotation=60, ha="right")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


#: Relative tolerances of the tolerance sweep: 61 values from 1e-16 to 1e-1, evenly spaced in log.
SWEEP_RTOLS = np.logspace(-16, -1, 61)


def naive_vs_fast(
    load: Callable[[str], LoadedModel],
    names: Sequence[str],
    rtols: Sequence[float] | np.ndarray = SWEEP_RTOLS,
    device: torch.device | str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[int]]]]:
    """For each model (``load``: registry name -> LoadedModel): the naive audit (``svdvals`` one by one) against
    the fast one (uncached), and, from the naive audit's singular values, ``nu`` and the sum of nullities at each
    relative tolerance in ``rtols``.

    Returns (one benchmark record per model: matrices, seconds of each path, their ratio, SVDs the fast path
    still ran, rank disagreements; model -> {"nu": [...], "sum_nullity": [...]}, one entry per tolerance)."""
    bench, sweeps = [], {}
    for name in names:
        loaded = load(name)
        naive_ranks, sig, naive_s = naive_with_spectra(loaded.model, device=device)
        start = time.perf_counter()
        fast = audit_model(loaded.model, device=device, cache=False)
        fast_s = time.perf_counter() - start
        disagree = [r.name for r in fast.rows if r.rank != naive_ranks[r.name]]
        bench.append(
            {
                "model": name,
                "matrices": fast.n,
                "naive s": round(naive_s, 2),
                "fast s": round(fast_s, 2),
                "ratio": round(naive_s / fast_s, 1),
                "SVDs left to the fast path": fast.summary()["svds"],
                "rank disagreements": len(disagree),
            }
        )
        sweeps[name] = sweep(sig, {r.name: (r.rows, r.cols) for r in fast.rows}, list(rtols))
    return bench, sweeps


def bench_totals(bench: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals of :func:`naive_vs_fast`'s records: seconds of each path, their ratio, matrices, disagreements."""
    naive, fast = sum(b["naive s"] for b in bench), sum(b["fast s"] for b in bench)
    return {
        "naive s": naive,
        "fast s": fast,
        "ratio": naive / fast,
        "matrices": sum(b["matrices"] for b in bench),
        "disagreements": sum(b["rank disagreements"] for b in bench),
    }


def plot_tolerance_sweep(rtols: Sequence[float] | np.ndarray, sweeps: Mapping[str, dict[str, list[int]]]) -> Figure:
    """``nu`` (left) and the sum of nullities (right) against the relative tolerance, one line per model; the
    shaded bands are 100 to 5000 times eps of float64 (red) and float32 (orange), where the defaults
    ``max(rows, cols) * eps`` of the audited layers lie."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, s in sweeps.items():
        ax1.semilogx(rtols, s["nu"], label=name)
        ax2.loglog(rtols, s["sum_nullity"], label=name)
    for ax, what in ((ax1, "nu"), (ax2, "sum of nullities")):
        ax.axvspan(2e-16 * 100, 2e-16 * 5000, color="C3", alpha=0.1)
        ax.axvspan(1.2e-7 * 100, 1.2e-7 * 5000, color="C1", alpha=0.1)
        ax.set_xlabel("rtol")
        ax.set_ylabel(what)
    ax1.legend(fontsize=7)
    ax1.set_title("shaded: default rtol = max(m,n) eps, float64 (red) / float32 (orange)", fontsize=8)
    fig.tight_layout()
    return fig


def with_spectrum(rows: int, cols: int, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A float64 ``rows x cols`` matrix whose singular values are exactly ``sigma`` (``min(rows, cols)`` values):
    ``U diag(sigma) V^T`` with random orthogonal factors drawn from ``generator`` (two draws, U first)."""
    p = min(rows, cols)
    if sigma.shape != (p,):
        raise ValueError(f"sigma must have min(rows, cols) = {p} values, got shape {tuple(sigma.shape)}")
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    return u[:, :p] @ torch.diag(sigma.to(torch.float64)) @ v[:, :p].T


def near_threshold_check(
    seed: int = 0,
    shapes: Sequence[tuple[int, int]] = ((32, 75), (128, 32), (96, 96)),
    factors: Sequence[float] = (0.1, 0.5, 1.0, 2.0, 10.0, 1e4),
) -> list[dict[str, Any]]:
    """The fast rank path against the reference on matrices built to be hard: for float64 then float32, each shape
    and each factor, singular values from 1 down to 0.1 with the smallest three set to ``factor`` times the
    default relative tolerance. One record per dtype: matrices, how many the fast path certified, disagreements."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for dt in (torch.float64, torch.float32):
        mats = []
        for rows, cols in shapes:
            for factor in factors:
                sigma = torch.linspace(1.0, 0.1, min(rows, cols), dtype=torch.float64)
                sigma[-3:] = factor * rank_rule.default_rtol((rows, cols), dt)
                mats.append(with_spectrum(rows, cols, sigma, gen).to(dt))
        fast = rank_rule.matrix_ranks(mats, dtype=dt, method="fast")
        ref = rank_rule.matrix_ranks(mats, dtype=dt, method="reference")
        out.append(
            {
                "dtype": str(dt)[6:],
                "matrices": len(mats),
                "certified": sum(f.method != "svd" for f in fast),
                "disagreements": sum(f.rank != r.rank for f, r in zip(fast, ref)),
            }
        )
    return out


def fitted_rows(checks: Sequence[RowCheck], chosen: Mapping[str, str]) -> dict[str, str]:
    """Rows whose constructor (or counting rule) the book chose *by fitting the paper's own numbers*, with how.

    A row is fitted when its candidate constructors (``checks``: every candidate of every row, from
    :func:`check_all_rows`) disagree on whether they fit, so the paper's numbers picked one; and the rows with a
    transposed convolution (:data:`CONV_TRANSPOSE_ROWS`), whose counting rule was picked by fitting them.
    Agreement on such a row confirms the identification, not the paper ("identified", not "reproduced").
    """
    by_row: dict[str, list[RowCheck]] = {}
    for c in checks:
        by_row.setdefault(c.row, []).append(c)
    out = {}
    for row, cands in by_row.items():
        misfits = [c.model for c in cands if not c.fits]
        if misfits and len(misfits) < len(cands):
            out[row] = f"{chosen.get(row, cands[0].model)} chosen because {', '.join(misfits)} does not fit"
    for row in CONV_TRANSPOSE_ROWS:
        if row in by_row:
            out[row] = (out.get(row, "") + "; " if row in out else "") + (
                "transposed convolutions left out because that reading fits this row"
            )
    return out


def shape_criterion(check: RowCheck, paper_row: Mapping[str, Any], fitted: bool) -> verdict.Criterion:
    """What makes a row's shape claim hold, from the paper alone: the constructor's ``(n, mu)`` has an ``n``
    that Table 1's truncated percentages allow and the printed ``mu``. ``fitted``: the constructor was chosen
    by fitting these numbers, so the claim is an identification."""
    implied, mu = set(check.n_implied), int(paper_row["mu"])
    text = (
        f"n ∈ {sorted(implied) or '∅'} (the n for which ν/n and μ/n truncate to {paper_row['nu_over_n_pct']}% "
        f"and {paper_row['mu_over_n_pct']}%) and μ = {mu}"
    )
    return verdict.holds_when(
        text, lambda m: m[0] in implied and m[1] == mu, kind="identification" if fitted else "paper"
    )


#: The precision at which the nullity claims are judged: how the weights are stored (float32), the precision
#: the kernel bases of :mod:`helpers.linalg.kernels` use.
CLAIM_PRECISION = "float32"


def nullity_criterion(paper_row: Mapping[str, Any]) -> verdict.Criterion:
    """What makes a row's nullity claim hold: our (nu, sum of nullities, nullity(W1)) at the stored precision
    equal the paper's. Only trained weights can decide it."""
    target = (int(paper_row["nu"]), int(paper_row["sum_nullity"]), int(paper_row["nullity_W1"]))
    return verdict.equals(
        target, f"(ν, Σ nullity, nullity(W1)) at the rank rule's {CLAIM_PRECISION} precision"
    ).trained()


def row_claims(
    audits: Table1Audits,
    paper_rows: Mapping[str, dict[str, Any]],
    checks: Mapping[str, RowCheck],
    fitted: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Two claims per audited row, as keyword arguments of ``Chapter.claim`` (criterion objects, no status):
    ``01.<row>.shape`` (:func:`shape_criterion`; "identification" when the row is in ``fitted``, from
    :func:`fitted_rows`) and ``01.<row>.nullities`` (:func:`nullity_criterion`, needs trained weights)."""
    claims = []
    for row in audits.rows:
        a, a32, c, p = audits.audits64[row], audits.audits32[row], checks[row], paper_rows[row]
        shape_reason = "" if c.n_fits else f"percentages imply n in {c.n_implied}; {a.model} has {a.n}"
        if c.n_fits and not c.mu_fits:
            shape_reason = f"mu {c.mu} vs {c.mu_paper}"
        claims.append(
            {
                "id": f"01.{row}.shape",
                "description": f"{row}: n and mu ({a.model})",
                "criterion": shape_criterion(c, p, row in fitted),
                "paper": f"n={c.n_implied}, mu={c.mu_paper}",
                "ours": f"n={a.n}, mu={a.mu}",
                "measured": (a.n, a.mu),
                "models": (a.model,),
                "reason": "; ".join(x for x in (fitted.get(row, ""), shape_reason) if x),
            }
        )
        claims.append(
            {
                "id": f"01.{row}.nullities",
                "description": f"{row}: nu, sum of nullities, nullity(W1)",
                "criterion": nullity_criterion(p),
                "paper": f"nu={p['nu']}, sum={p['sum_nullity']}, W1={p['nullity_W1']}",
                "ours": f"nu={a32.nu}, sum={a32.sum_nullity}, W1={a32.nullity_w1} "
                f"(float64 precision: {a.nu}/{a.sum_nullity}/{a.nullity_w1})",
                "measured": (a32.nu, a32.sum_nullity, a32.nullity_w1),
                "models": (a.model,),
                "reason": f"shapes force nu>={c.structural_nu}, sum>={c.structural_sum}, W1>={c.structural_w1}",
            }
        )
    return claims


def attainable_claim(audits: Table1Audits, checks: Mapping[str, RowCheck]) -> dict[str, Any]:
    """One claim over every audited row (keyword arguments of ``Chapter.claim``): the printed nu, sum of
    nullities and nullity(W1) are attainable by *some* weights of the row's shapes (a nullity is at least
    ``cols - rows`` and at most ``cols``). Shapes decide it, so random weights can."""
    ok = [not checks[r].impossible for r in audits.rows]
    bad = [f"{r}: {'; '.join(checks[r].impossible)}" for r in audits.rows if checks[r].impossible]
    return {
        "id": "01.attainable",
        "description": "Table 1's nullities are possible for the audited architectures",
        "criterion": verdict.every("printed ν, Σ nullity and nullity(W1) within the bounds the row's shapes allow"),
        "paper": "Table 1",
        "ours": stats.Rate.of(ok),
        "models": tuple(audits.audits64[r].model for r in audits.rows),
        "reason": "; ".join(bad),
    }


def claims_table(claims: Sequence[results.Claim]) -> list[dict[str, Any]]:
    """The chapter's recorded claims as page rows: id, result (the status), criterion, paper, ours, reason."""
    return [
        {
            "claim": c.id,
            "result": c.status,
            "criterion": c.criterion,
            "paper": c.paper,
            "ours": c.ours,
            "reason": c.reason,
        }
        for c in claims
    ]


def independent_checks(audits: Table1Audits) -> list[tuple[bool, str, Any]]:
    """The must-hold checks on the sampled matrices of :attr:`Table1Audits.independent` as ``(ok, what,
    measured)``, one pair per precision: (1) the audit's rank equals numpy's independent float64 SVD rank on
    every sample whose rank is robust (no singular value within the SVD's rounding allowance of the threshold);
    (2) at the stored precision (float32), every sample is robust, the certificate that the ranks the claims use
    cannot depend on rounding. At float64 precision the threshold ``k eps64`` lies inside the rounding band, so
    an exactly null direction (trained weights) is reported as ambiguous there, not failed."""
    records = [r for recs in audits.independent.values() for r in recs]
    out: list[tuple[bool, str, Any]] = []
    for precision in ("float32", "float64"):
        recs = [r for r in records if r["precision"] == precision]
        robust = [r for r in recs if r["robust"]]
        wrong = [f"{r['row']}/{r['matrix']}: {r['audit rank']} vs {r['numpy rank']}" for r in robust if not r["agree"]]
        out.append(
            (
                bool(recs) and not wrong,
                f"{precision}: audit rank = numpy float64 SVD rank (W1 + a random sample per model)",
                "; ".join(wrong) or f"{len(robust)} of {len(recs)} agree; {len(recs) - len(robust)} ambiguous",
            )
        )
        if precision == CLAIM_PRECISION:
            shaky = [f"{r['row']}/{r['matrix']} (margin {r['margin']:.2g})" for r in recs if not r["robust"]]
            out.append(
                (
                    bool(recs) and not shaky,
                    f"{precision}: every sampled rank robust (margin from the threshold > the SVD's rounding)",
                    "; ".join(shaky) or f"{len(recs)} of {len(recs)}",
                )
            )
    return out


def w1_order_checks(order_rows: Sequence[Mapping[str, Any]]) -> list[tuple[bool, str, Any]]:
    """One must-hold check per :func:`w1_order_row` record: W1 (registration order) is the first weight layer a
    forward pass runs."""
    return [
        (
            bool(r["same"]),
            f"{r['model']}: W1 is the first layer the input meets",
            f"{r['W1 (registration order)']} / {r['first executed']}",
        )
        for r in order_rows
    ]


def rank_path_checks(
    totals: Mapping[str, Any], near_threshold: Sequence[Mapping[str, Any]]
) -> list[tuple[bool, str, Any]]:
    """The must-hold checks of the two rank paths as ``(ok, what, measured)``: no rank disagreement on the test
    set (``totals`` from :func:`bench_totals`) nor on the near-threshold matrices (:func:`near_threshold_check`)."""
    edge = sum(r["disagreements"] for r in near_threshold)
    return [
        (
            totals["disagreements"] == 0,
            "fast == reference rank on every test-set matrix",
            f"{totals['disagreements']} disagreements over {totals['matrices']} matrices",
        ),
        (edge == 0, "fast == reference on the near-threshold matrices (float64 and float32)", edge),
    ]


def classifier_models(paper_rows: Mapping[str, dict[str, Any]]) -> list[str]:
    """Registry names of the Table 1 classification rows (``paper_rows``: row -> paper numbers), in table order."""
    from helpers.models import registry

    return [
        registry.TABLE1_ROWS[r]
        for r, v in paper_rows.items()
        if v["task"] == "classification" and r in registry.TABLE1_ROWS
    ]


# --- trained substitutes: EfficientNet-Lite0/1/2 trained against the same architectures at random initialisation ---

#: The ImageNet-trained models every build has (registry packages): trained substitutes for Table 1's models.
SUBSTITUTES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

#: The two weight sets compared, trained first, and the two precisions of the rank rule.
WEIGHT_SETS: tuple[str, ...] = ("trained", "random")
PRECISIONS: tuple[str, ...] = ("float32", "float64")


@dataclass
class SubstituteAudit:
    """One architecture audited with its trained weights and at random initialisation.

    ``audits``: (weight set, precision) -> :class:`ModelAudit` (weight set in :data:`WEIGHT_SETS`, precision in
    :data:`PRECISIONS`); ``spectra``: weight set -> matrix name -> singular values (descending, float64);
    ``w1``: weight set -> W1 (a copy); ``pretrained``: whether the trained weights were really had."""

    name: str
    audits: dict[tuple[str, str], ModelAudit]
    spectra: dict[str, dict[str, torch.Tensor]]
    w1: dict[str, WeightMatrix]
    pretrained: bool

    def nullity_gain(self, precision: str) -> dict[str, int]:
        """Matrix name -> nullity(trained) - nullity(random) at ``precision``, for every matrix (same order)."""
        trained, rand = self.audits["trained", precision], self.audits["random", precision]
        return {t.name: t.nullity - r.nullity for t, r in zip(trained.rows, rand.rows)}


def audit_substitutes(
    load: Callable[[str], LoadedModel],
    load_random: Callable[[str], LoadedModel],
    names: Sequence[str] = SUBSTITUTES,
    device: torch.device | str | None = None,
) -> dict[str, SubstituteAudit]:
    """Audit each of ``names`` with trained weights (``load``: the chapter's loader) and at random initialisation
    (``load_random``), at float32 and float64 precision (cached audits), and keep every matrix's singular values
    (for the tolerance sweep and the conditioning). The models are not kept."""
    out = {}
    for name in names:
        models = {"trained": load(name), "random": load_random(name)}
        audits = {
            (w, p): audit_model(models[w].model, dtype=getattr(torch, p), device=device)
            for w in WEIGHT_SETS
            for p in PRECISIONS
        }
        for (w, _), a in audits.items():
            a.model, a.weights = name, models[w].weights
        w1 = {w: weight_matrices(models[w].model)[0] for w in WEIGHT_SETS}
        for m in w1.values():
            m.matrix = m.matrix.clone()
        sig = {w: spectra(models[w].model, device=device) for w in WEIGHT_SETS}
        out[name] = SubstituteAudit(name, audits, sig, w1, models["trained"].is_pretrained)
    return out


def _conditioning(sigmas: Mapping[str, torch.Tensor]) -> float:
    """Median over the matrices of sigma_min / sigma_max."""
    return float(np.median([float(s[-1] / s[0]) for s in sigmas.values()]))


def substitute_table(subs: Mapping[str, SubstituteAudit]) -> list[dict[str, Any]]:
    """One record per (model, weight set, precision): n, nu, mu, nu - mu, sum of nullities, its excess over the
    shapes' value, nullity(W1), and the median sigma_min/sigma_max of the matrices."""
    return [
        {
            "model": s.name,
            "weights": w if w == "random" or s.pretrained else "trained (unavailable: random)",
            "precision": p,
            "n": a.n,
            "ν": a.nu,
            "μ": a.mu,
            "ν − μ": a.nu - a.mu,
            "Σ nullity": a.sum_nullity,
            "Σ − shapes'": a.sum_nullity - a.structural_sum_nullity,
            "nullity(W1)": a.nullity_w1,
            "median σmin/σmax": round(_conditioning(s.spectra[w]), 3),
        }
        for s in subs.values()
        for w in WEIGHT_SETS
        for p in PRECISIONS
        for a in (s.audits[w, p],)
    ]


def rank_loss_table(subs: Mapping[str, SubstituteAudit]) -> list[dict[str, Any]]:
    """The matrices whose nullity differs between trained and random weights, at each precision: model, precision,
    matrix, shape, both nullities, the gain, and sigma_min/sigma_max under both weight sets."""
    out = []
    for s in subs.values():
        for p in PRECISIONS:
            trained = {r.name: r for r in s.audits["trained", p].rows}
            rand = {r.name: r for r in s.audits["random", p].rows}
            for name, gain in s.nullity_gain(p).items():
                if gain:
                    st, sr = s.spectra["trained"][name], s.spectra["random"][name]
                    out.append(
                        {
                            "model": s.name,
                            "precision": p,
                            "matrix": name,
                            "shape": f"{trained[name].rows}x{trained[name].cols}",
                            "nullity random": rand[name].nullity,
                            "nullity trained": trained[name].nullity,
                            "gain": gain,
                            "σmin/σmax trained": f"{float(st[-1] / st[0]):.1e}",
                            "σmin/σmax random": f"{float(sr[-1] / sr[0]):.1e}",
                        }
                    )
    return out


def twin_columns(w: WeightMatrix, rel: float = 4.0) -> list[dict[str, Any]]:
    """Pairs of columns of a convolution's matrix that are equal to within ``rel`` float32 ulps of the largest
    weight: one record per pair, each column named by its stored index ``(in channel, row, col)``, with the largest
    difference relative to the largest weight. Each pair is a null direction of the matrix: +d at one input pixel,
    -d at the other."""
    m = w.matrix.detach().to("cpu", torch.float64)
    scale = float(m.abs().max())
    tol = rel * float(torch.finfo(torch.float32).eps) * scale
    spatial = w.stored_shape[1:]
    out = []
    for i in range(m.shape[1]):
        for j in range(i + 1, m.shape[1]):
            diff = float((m[:, i] - m[:, j]).abs().max())
            if diff <= tol:
                out.append(
                    {
                        "column a": tuple(int(x) for x in np.unravel_index(i, spatial)),
                        "column b": tuple(int(x) for x in np.unravel_index(j, spatial)),
                        "max |a − b| / max |W|": f"{diff / scale:.1e}",
                    }
                )
    return out


def substitute_sweeps(
    subs: Mapping[str, SubstituteAudit], rtols: Sequence[float] | np.ndarray = SWEEP_RTOLS
) -> dict[str, dict[str, list[int]]]:
    """``"<model> <weight set>"`` -> nu and sum of nullities at each tolerance (:func:`sweep`), for
    :func:`plot_tolerance_sweep`."""
    out = {}
    for s in subs.values():
        shapes = {r.name: (r.rows, r.cols) for r in s.audits["trained", "float64"].rows}
        for w in WEIGHT_SETS:
            out[f"{s.name.removeprefix('efficientnet_')} {w}"] = sweep(s.spectra[w], shapes, list(rtols))
    return out


def first_departure(values: Sequence[int], rtols: Sequence[float] | np.ndarray) -> float:
    """The smallest tolerance at which ``values`` (one per ``rtols``, nondecreasing) leave their first value;
    ``nan`` if they never do."""
    for v, r in zip(values, rtols):
        if v != values[0]:
            return float(r)
    return math.nan


def substitute_numbers(subs: Mapping[str, SubstituteAudit], paper_rows: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The measured values the trained-substitute claims judge and the prose quotes (glue name -> value): the
    smallest gain over the models of the float32 sum of nullities, of nu - mu and of the number of matrices
    other than W1 whose nullity grows (the largest); the float64 sum's largest gain; the gain in W1; Table 1's rows
    with nu > mu and with nu - mu >= 2 (some matrix besides W1 lost rank)."""

    def gains(p: str) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"sum": [], "nu_mu": [], "past_w1": [], "w1": []}
        for s in subs.values():
            g = list(s.nullity_gain(p).values())
            t, r = s.audits["trained", p], s.audits["random", p]
            out["sum"].append(sum(g))
            out["nu_mu"].append((t.nu - t.mu) - (r.nu - r.mu))
            out["past_w1"].append(sum(x > 0 for x in g[1:]))
            out["w1"].append(g[0])
        return out

    g32, g64 = gains("float32"), gains("float64")
    return {
        "sub_models": len(subs),
        "sub_sum_gain32": min(g32["sum"]),
        "sub_sum_gain32_max": max(g32["sum"]),
        "sub_nu_mu32": min(g32["nu_mu"]),
        "sub_past_w1_32": max(g32["past_w1"]),
        "sub_w1_gain32": max(g32["w1"]),
        "sub_w1_gain32_min": min(g32["w1"]),
        "sub_sum_gain64": max(g64["sum"]),
        "paper_nu_gt_mu": sum(r["nu"] > r["mu"] for r in paper_rows.values()),
        "paper_rows": len(paper_rows),
        "paper_past_w1": sum(r["nu"] - r["mu"] >= 2 for r in paper_rows.values()),
        "paper_max_nu_mu": max(int(r["nu"]) - int(r["mu"]) for r in paper_rows.values()),
    }


def substitute_claims(subs: Mapping[str, SubstituteAudit], numbers: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The trained-substitute claims (keyword arguments of ``Chapter.claim``), all our own additions ("beyond"),
    judged only with trained weights, each measured as the worst case over the EfficientNet-Lite models:
    training adds nullity (float32 sum of nullities above random initialisation's), it makes nu exceed mu (what
    Table 1 shows in most rows), and it adds nullity past W1 (the book's explanation of the paper's excess)."""
    models = tuple(subs)
    label = "/".join(n.removeprefix("efficientnet_lite") for n in models)
    who = f"trained substitutes: EfficientNet-Lite{label}"
    per_model = {
        s.name.removeprefix("efficientnet_"): {p: sum(s.nullity_gain(p).values()) for p in PRECISIONS}
        for s in subs.values()
    }
    gains = "; ".join(f"{n}: +{g['float32']} (float64: +{g['float64']})" for n, g in per_model.items())
    return [
        {
            "id": "01.training_adds_nullity.trained_substitute",
            "description": f"{who}: training adds nullity (trained vs random initialisation, same architecture)",
            "criterion": verdict.at_least(
                1, "Σ nullity(trained) − Σ nullity(random), float32, worst model", kind="beyond"
            ).trained(),
            "paper": "explains Table 1's Σ nullity above the shapes' (not claimed)",
            "ours": numbers["sub_sum_gain32"],
            "models": models,
            "reason": f"gain per model: {gains}",
        },
        {
            "id": "01.training_makes_nu_exceed_mu.trained_substitute",
            "description": f"{who}: training makes ν exceed μ (a matrix that is not wide loses rank)",
            "criterion": verdict.at_least(
                1, "(ν − μ)(trained) − (ν − μ)(random), float32, worst model", kind="beyond"
            ).trained(),
            "paper": f"ν > μ in {numbers['paper_nu_gt_mu']} of {numbers['paper_rows']} Table 1 rows",
            "ours": numbers["sub_nu_mu32"],
            "models": models,
        },
        {
            "id": "01.training_nullity_past_w1.trained_substitute",
            "description": f"{who}: training adds nullity to matrices other than W1",
            "criterion": verdict.at_least(
                1, "matrices other than W1 whose float32 nullity grows in training, best model", kind="beyond"
            ).trained(),
            "paper": f"ν − μ ≥ 2 (a matrix besides W1 lost rank) in {numbers['paper_past_w1']} of "
            f"{numbers['paper_rows']} Table 1 rows",
            "ours": numbers["sub_past_w1_32"],
            "models": models,
        },
    ]


def depthwise_table(reading: GroupedReading) -> list[dict[str, Any]]:
    """One grouped (e.g. depthwise) convolution read three ways: the matrix rule's stacked matrix (what the audit
    counts), the layer's block-diagonal map of a whole input patch, and one group's own block."""
    g_rows, g_cols = reading.block_shape[0] // reading.groups, reading.block_shape[1] // reading.groups
    nulls = sorted(set(reading.group_nullities))
    return [
        {
            "reading": "matrix rule: groups stacked over shared columns (audited)",
            "matrix": f"{reading.stacked_shape[0]}x{reading.stacked_shape[1]}",
            "rank": reading.stacked_rank,
            "nullity": reading.stacked_nullity,
        },
        {
            "reading": "the layer on one input patch: block-diagonal, one block per group",
            "matrix": f"{reading.block_shape[0]}x{reading.block_shape[1]}",
            "rank": reading.block_rank,
            "nullity": reading.block_nullity,
        },
        {
            "reading": f"one group's block (each of the {reading.groups})",
            "matrix": f"{g_rows}x{g_cols}",
            "rank": "/".join(str(g_cols - n) for n in nulls),
            "nullity": "/".join(map(str, nulls)),
        },
    ]


def grouped_totals(audit: ModelAudit, readings: Sequence[GroupedReading]) -> dict[str, dict[str, int]]:
    """nu, mu and the sum of nullities of ``audit`` as audited (grouped convolutions stacked) and with every
    grouped convolution of ``readings`` replaced by its block-diagonal patch map (same precision)."""
    by_name = {r.name: r for r in readings}
    block_rows = [
        (by_name[r.name].block_shape, by_name[r.name].block_nullity)
        if r.name in by_name
        else ((r.rows, r.cols), r.nullity)
        for r in audit.rows
    ]
    return {
        "stacked": {"nu": audit.nu, "mu": audit.mu, "sum": audit.sum_nullity},
        "block-diagonal": {
            "nu": sum(n >= 1 for _, n in block_rows),
            "mu": sum(s[0] < s[1] for s, _ in block_rows),
            "sum": sum(n for _, n in block_rows),
        },
    }


def depthwise_null_test(weight: torch.Tensor, groups: int, seed: int = 0) -> dict[str, float]:
    """A patch drawn from the kernel of the layer's block-diagonal matrix and a random patch of the same norm, both
    pushed through the convolution itself (``torch.nn.functional``, not the matrix): how much each moves the
    output at that patch (``null``, ``random``) and their ratio."""
    gen = torch.Generator().manual_seed(seed)
    null = block_null_vector(weight, groups, gen)
    rand = torch.randn(null.shape, generator=gen, dtype=torch.float64)
    moved = {
        "null": patch_response_change(weight, groups, null),
        "random": patch_response_change(weight, groups, rand / rand.norm()),
    }
    return {**moved, "ratio": moved["null"] / moved["random"]}


#: The largest ``null / random`` output change :func:`depthwise_null_check` accepts (float64 arithmetic).
DEPTHWISE_NULL_RATIO = 1e-9


def depthwise_null_check(test: Mapping[str, float]) -> tuple[bool, str, Any]:
    """Must hold: a patch from the block-diagonal kernel moves the convolution's output at that patch by at most
    :data:`DEPTHWISE_NULL_RATIO` of what a random patch of the same norm moves it (``test`` from
    :func:`depthwise_null_test`); fails if the block-diagonal matrix's columns do not follow the patch's layout."""
    return (
        test["random"] > 0 and test["ratio"] <= DEPTHWISE_NULL_RATIO,
        f"depthwise layer: a block-diagonal null patch is invisible to the convolution "
        f"(ratio ≤ {DEPTHWISE_NULL_RATIO:g})",
        f"null {test['null']:.2e} vs random {test['random']:.2e} (ratio {test['ratio']:.1e})",
    )


def substitute_models(quick: bool) -> list[str]:
    """The trained substitutes a build audits: EfficientNet-Lite0 (quick) or all three."""
    return list(SUBSTITUTES[:1]) if quick else list(SUBSTITUTES)


def random_loader(device: torch.device | str = "cpu") -> Callable[[str], LoadedModel]:
    """A loader of registry models at random initialisation on ``device`` (the chapter's loader keeps one model
    per name, so the random twin of a trained model is loaded outside it)."""
    from helpers.models import registry

    return lambda name: registry.load(name, "random", device)


def substitute_prose(
    subs: Mapping[str, SubstituteAudit], numbers: Mapping[str, Any], rtols: Sequence[float] | np.ndarray = SWEEP_RTOLS
) -> dict[str, Any]:
    """The further numbers and the computed conclusions the prose about the substitutes quotes (glue name ->
    value): median sigma_min/sigma_max trained and random (median over models), the tolerances at which the sum
    of nullities first leaves the shapes' value (trained: largest over models; random: smallest), the twin column
    pairs of each trained W1 (count, and whether every model has the same pairs), and where the added nullity
    lies (text)."""
    sweeps = substitute_sweeps(subs, rtols)
    depart = {k: first_departure(v["sum_nullity"], rtols) for k, v in sweeps.items()}
    twins = {s.name: [(t["column a"], t["column b"]) for t in twin_columns(s.w1["trained"])] for s in subs.values()}
    past = int(numbers["sub_past_w1_32"])
    where = "all of it in W1, the stem convolution" if past == 0 else f"in W1 and {past} other matrices"
    return {
        "sub_cond_trained": float(np.median([_conditioning(s.spectra["trained"]) for s in subs.values()])),
        "sub_cond_random": float(np.median([_conditioning(s.spectra["random"]) for s in subs.values()])),
        "sub_depart_trained": max(v for k, v in depart.items() if k.endswith("trained")),
        "sub_depart_random": min(v for k, v in depart.items() if k.endswith("random")),
        "sub_twins": len(next(iter(twins.values()))),
        "sub_twins_same": "the same pairs in every model audited"
        if len({tuple(t) for t in twins.values()}) == 1
        else "different pairs in different models",
        "sub_where": where,
        "sub_summary": (
            f"training adds {numbers['sub_nu_mu32']} matrix to ν and {numbers['sub_sum_gain32']} dimensions to the "
            "sum of nullities (worst model), all at the input layer: it does not account for the paper's rows where "
            "ν exceeds μ by two matrices or more"
            if past == 0
            else f"training adds nullity to W1 and to {past} other matrices, as the paper's rows with ν − μ ≥ 2 need"
        ),
        "sub_past_conclusion": "nothing past W1: every other matrix keeps full rank"
        if past == 0
        else f"{past} matrices past W1 lose rank too",
    }


def pick_depthwise(readings: Sequence[GroupedReading]) -> GroupedReading:
    """The first depthwise convolution (one input channel per group) whose stacked matrix is tall (channels >=
    k*k), the case where the matrix rule and the layer disagree most."""
    for r in readings:
        if r.stored_shape[1] == 1 and r.stacked_shape[0] >= r.stacked_shape[1]:
            return r
    raise ValueError("no depthwise convolution with at least k*k channels")


def depthwise_numbers(
    reading: GroupedReading, readings: Sequence[GroupedReading], totals: Mapping[str, Mapping[str, int]]
) -> dict[str, Any]:
    """Glue name -> value for the depthwise prose: the example layer (name, channels C, k*k, both nullities, its
    dead channels: blocks of nullity k*k), every grouped layer's dead channels, and the model's sum of nullities
    under both readings (``totals`` from :func:`grouped_totals`)."""
    k2 = reading.stacked_shape[1]
    return {
        "dw_name": reading.name.removesuffix(".weight"),
        "dw_c": reading.groups,
        "dw_k2": k2,
        "dw_k2m1": k2 - 1,
        "dw_stacked_nullity": reading.stacked_nullity,
        "dw_block_nullity": reading.block_nullity,
        "dw_expected": reading.groups * (k2 - 1),
        "dw_layers": sum(r.stored_shape[1] == 1 for r in readings),
        "dw_dead": sum(
            n == r.block_shape[1] // r.groups for r in readings if r.stored_shape[1] == 1 for n in r.group_nullities
        ),
        "dw_sum_stacked": totals["stacked"]["sum"],
        "dw_sum_block": totals["block-diagonal"]["sum"],
        "dw_nu_stacked": totals["stacked"]["nu"],
        "dw_nu_block": totals["block-diagonal"]["nu"],
    }
