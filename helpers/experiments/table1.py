"""TODO docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from helpers.experiments.audit import (
    ConvTransposeRule,
    ModelAudit,
    build_on_meta,
    structural_audit,
)
from helpers.progress import progress_bar


def implied_n(count: int, percent: int) -> set[int]:
    """Every ``n`` for which ``count / n``, truncated to a whole percent, prints as ``percent``.

    Table 1 truncates (AlexNet's mu/n = 7/8 = 87.5% is printed 87%; ResNet-50's 36/54 = 66.7% as 66%).
    """
    return {n for n in range(max(count, 1), 100 * count + 2) if math.floor(100 * count / n + 1e-9) == percent}


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
        return self.n in self.n_implied

    @property
    def mu_fits(self) -> bool:
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
