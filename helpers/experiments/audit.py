"""Table 1 of Ozbulak et al.: the weight matrices of a model, their ranks and nullities, and the row metrics.

The matrix rule (what "a trainable weight matrix" is):

* ``nn.Conv{1,2,3}d`` weight ``(out, in/groups, *k)`` -> ``out x (in/groups * prod(k))``: the matrix that maps
  one unfolded input patch (of one group) to the output channels; its kernel gives the paper's collisions.
* ``nn.ConvTranspose{1,2,3}d`` weight ``(in, out/groups, *k)``: left out by default (``conv_transpose="skip"``),
  because Table 1's percentages imply exactly that (Mask R-CNN n = 73, Keypoint R-CNN n = 76: the chapter shows
  the arithmetic; ``nn.ConvTranspose2d`` is not a subclass of ``nn.Conv2d``, so an ``isinstance(m, nn.Conv2d)``
  scan skips it). ``"operator"``: ``(out/groups * prod(k)) x in``, the map from one input pixel's channels to the
  output patch it writes (the reading that matters for collisions); ``"as_stored"``: the stored tensor flattened as
  if it were a convolution, ``in x (out/groups * prod(k))``.
* ``nn.Linear`` (and its subclasses, e.g. the ``out_proj`` of ``nn.MultiheadAttention``) weight ``(out, in)`` as is.
* ``nn.MultiheadAttention`` ``in_proj_weight`` ``(3E, E)`` as stored (one matrix), or ``q/k/v_proj_weight``.
* Everything else is not a weight matrix: biases, normalisation scales (1-D), and position embeddings or class
  tokens (parameters added to activations, not matrices applied to them) are listed in ``ModelAudit.skipped``.

Orientation: every matrix is ``rows x cols = outputs x inputs`` (PyTorch's ``y = W x``), so
``nullity(W) = cols - rank(W)`` is the dimension of the input directions the layer cannot see, and
``mu`` counts ``rows < cols`` (the paper's Lemma 3, where ``nullity >= cols - rows > 0`` is forced by the shape).

Trainable: every weight matrix the model *has*, whether or not ``requires_grad`` is set (torchvision's detection
models freeze ``conv1`` and ``layer1`` when built with pretrained weights; the paper's ``nullity(W1)`` of 83/84 for
them is the frozen ``conv1``). ``audit_model(..., trainable_only=True)`` drops frozen ones instead.

Rank rule (:mod:`helpers.linalg.rank_rule`, the book's one rule, shared with the kernel bases of
:mod:`helpers.linalg.kernels`): ``rank = #{sigma_i > rtol * sigma_max}`` of the singular values computed in
float64; ``rtol=None`` means ``max(rows, cols) * eps(dtype)`` (the default of ``torch.linalg.matrix_rank`` and
``numpy.linalg.matrix_rank``), where ``dtype`` is the *precision* the matrices are judged at: float32 (how the
weights are stored; the kernel bases use it) or float64.

Two ways to get the same ranks: ``method="reference"`` runs ``svdvals`` on every matrix one by one;
``method="fast"`` (default) batches equal shapes, forms the Gram matrix of the smaller side in float64 and
*certifies* full rank with two Cholesky factorisations (rigorous rounding-error bounds, see
:func:`certify_full_rank`); only matrices it cannot certify go to the reference SVD. Both give identical ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from helpers import runtime
from helpers.linalg.rank_rule import (
    Method,
    default_rtol,
    matrix_ranks,
    rank_from_singular_values,
    rank_margin,
    reference_rank,
    rounding_allowance,
)
from helpers.progress import progress_bar

#: Bump when the matrix rule or the rank rule changes: cached audits with another version are ignored.
#: Version 2: singular values always in float64 (the float32 precision only sets the tolerance).
RULE_VERSION = 2


ConvTransposeRule = Literal["skip", "operator", "as_stored"]


CONV_TRANSPOSE_RULES: tuple[str, ...] = ("skip", "operator", "as_stored")


@dataclass
class WeightMatrix:
    """One weight matrix of a model: ``matrix`` is 2-D ``(rows, cols) = (outputs, inputs)``, a view of the
    parameter (no copy); ``kind`` is ``conv``, ``conv_transpose``, ``linear`` or ``attention``;
    ``stored_shape`` the parameter's own shape; ``trainable`` its ``requires_grad``."""

    name: str
    matrix: torch.Tensor
    kind: str
    stored_shape: tuple[int, ...]
    trainable: bool
    module_type: str

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.matrix.shape[0]), int(self.matrix.shape[1]))

    @property
    def structural_nullity(self) -> int:
        """The nullity every matrix of this shape has at least: ``cols - min(rows, cols)``."""
        rows, cols = self.shape
        return cols - min(rows, cols)


def _conv_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def _conv_transpose_matrix(weight: torch.Tensor, rule: ConvTransposeRule) -> torch.Tensor:
    if rule == "as_stored":
        return weight.reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1).T


def _inside_attention(name: str, parents: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    return any(
        "attention" in type(parents.get(".".join(parts[:i]), nn.Module())).__name__.lower() for i in range(len(parts))
    )


def weight_matrices(
    model: nn.Module, *, conv_transpose: ConvTransposeRule = "skip", trainable_only: bool = False
) -> list[WeightMatrix]:
    """Every weight matrix of ``model`` by the matrix rule (module docstring), in registration order.

    Registration order is the order ``named_modules`` yields; for all Table 1 models its first entry (W1) is
    the first layer the input meets (the chapter checks this with forward hooks, see :func:`first_executed`).
    """
    if conv_transpose not in CONV_TRANSPOSE_RULES:
        raise ValueError(f"unknown conv_transpose rule {conv_transpose!r}; valid: {', '.join(CONV_TRANSPOSE_RULES)}")
    modules = dict(model.named_modules())
    found: list[WeightMatrix] = []
    for mod_name, module in modules.items():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, param in module.named_parameters(recurse=False):
            matrix, kind = _as_matrix(module, pname, param, conv_transpose)
            if matrix is None:
                continue
            if kind == "linear" and _inside_attention(mod_name, modules):
                kind = "attention"
            if trainable_only and not param.requires_grad:
                continue
            found.append(
                WeightMatrix(
                    prefix + pname,
                    matrix.detach(),
                    kind,
                    tuple(param.shape),
                    bool(param.requires_grad),
                    type(module).__name__,
                )
            )
    return found


def _as_matrix(
    module: nn.Module, pname: str, param: torch.Tensor, conv_transpose: ConvTransposeRule
) -> tuple[torch.Tensor | None, str]:
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and pname == "weight":
        if conv_transpose == "skip":
            return None, ""
        return _conv_transpose_matrix(param, conv_transpose), "conv_transpose"
    if isinstance(module, nn.modules.conv._ConvNd) and pname == "weight":
        return _conv_matrix(param), "conv"
    if isinstance(module, nn.Linear) and pname == "weight":
        return param, "linear"
    if isinstance(module, nn.MultiheadAttention) and pname.endswith("proj_weight"):
        return param, "attention"
    return None, ""


def skipped_parameters(model: nn.Module, matrices: Sequence[WeightMatrix]) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, why)`` of every parameter with 2 or more dimensions that is not among ``matrices``."""
    taken = {m.name for m in matrices}
    owner = {
        f"{mn}.{pn}" if mn else pn: mod
        for mn, mod in model.named_modules()
        for pn, _ in mod.named_parameters(recurse=False)
    }
    skipped = []
    for name, p in model.named_parameters():
        if p.ndim < 2 or name in taken:
            continue
        module = owner.get(name)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            why = "transposed convolution (conv_transpose='skip')"
        elif not p.requires_grad:
            why = "frozen (trainable_only=True)"
        else:
            why = f"not a weight matrix ({type(module).__name__ if module is not None else '?'} parameter)"
        skipped.append((name, tuple(p.shape), why))
    return skipped


def first_executed(model: nn.Module, example: Any) -> str | None:
    """The name of the first weight-matrix module that runs in ``model(example)`` (forward pre-hooks)."""
    names = {
        id(m): n
        for n, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention))
    }
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, _inp: order.append(names[id(mod)]))
        for m in model.modules()
        if id(m) in names
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order[0] if order else None


@dataclass
class MatrixAudit:
    """One row of a model audit: a weight matrix, its shape ``(rows, cols)``, rank and nullity."""

    name: str
    kind: str
    rows: int
    cols: int
    stored_shape: tuple[int, ...]
    trainable: bool
    rank: int
    method: str
    sigma_ratio: float | None = None

    @property
    def nullity(self) -> int:
        return self.cols - self.rank

    @property
    def structural_nullity(self) -> int:
        return self.cols - min(self.rows, self.cols)

    @property
    def wide(self) -> bool:
        """``rows < cols``: the paper's mu condition (nullity forced by the shape)."""
        return self.rows < self.cols


@dataclass
class ModelAudit:
    """Table 1's numbers for one model under one rule, with the per-matrix rows.

    ``n``: weight matrices; ``nu``: those with nullity >= 1; ``mu``: those with rows < cols; ``sum_nullity``;
    ``nullity_w1`` of the first matrix ``w1_name`` of shape ``w1_shape``; ``structural_*``: the same numbers
    forced by the shapes alone (what every full-rank set of weights, e.g. random ones, gives).
    """

    rule: str
    dtype: str
    rtol: float | None
    conv_transpose: str
    rows: list[MatrixAudit]
    skipped: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    fingerprint: str = ""
    seconds: float = 0.0
    method: str = "fast"
    model: str = ""
    weights: str = ""

    n = property(lambda self: len(self.rows))
    nu = property(lambda self: sum(r.nullity >= 1 for r in self.rows))
    mu = property(lambda self: sum(r.wide for r in self.rows))
    sum_nullity = property(lambda self: sum(r.nullity for r in self.rows))
    nullity_w1 = property(lambda self: self.rows[0].nullity if self.rows else None)
    w1_name = property(lambda self: self.rows[0].name if self.rows else None)
    w1_shape = property(lambda self: (self.rows[0].rows, self.rows[0].cols) if self.rows else None)
    structural_nu = property(lambda self: sum(r.structural_nullity >= 1 for r in self.rows))
    structural_sum_nullity = property(lambda self: sum(r.structural_nullity for r in self.rows))
    structural_nullity_w1 = property(lambda self: self.rows[0].structural_nullity if self.rows else None)

    @property
    def nu_over_n(self) -> float:
        return self.nu / self.n if self.n else math.nan

    @property
    def mu_over_n(self) -> float:
        return self.mu / self.n if self.n else math.nan

    def summary(self) -> dict[str, Any]:
        """The Table 1 columns plus the structural ones, the W1 identity and the rule (JSON-ready)."""
        return {
            "model": self.model,
            "weights": self.weights,
            "n": self.n,
            "nu": self.nu,
            "mu": self.mu,
            "nu_over_n": self.nu_over_n,
            "mu_over_n": self.mu_over_n,
            "sum_nullity": self.sum_nullity,
            "nullity_w1": self.nullity_w1,
            "w1_name": self.w1_name,
            "w1_shape": list(self.w1_shape or ()),
            "structural_nu": self.structural_nu,
            "structural_sum_nullity": self.structural_sum_nullity,
            "structural_nullity_w1": self.structural_nullity_w1,
            "rule": self.rule,
            "svds": sum(r.method == "svd" for r in self.rows),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelAudit:
        data = dict(data)
        data["rows"] = [MatrixAudit(**{**r, "stored_shape": tuple(r["stored_shape"])}) for r in data["rows"]]
        data["skipped"] = [(n, tuple(s), why) for n, s, why in data.get("skipped", [])]
        return cls(**data)


def describe_rule(
    dtype: torch.dtype, rtol: float | None, conv_transpose: ConvTransposeRule, trainable_only: bool = False
) -> str:
    """One line naming every choice behind the numbers."""
    dname = str(dtype).replace("torch.", "")
    tol = f"rtol={rtol:g}" if rtol is not None else f"rtol=max(rows,cols)*eps({dname}) (matrix_rank default)"
    return (
        f"rank = #{{sigma > rtol*sigma_max}}, svdvals in float64, {tol}; conv: out x in/groups*k; "
        f"conv-transpose: {conv_transpose}; linear/attention as stored; "
        f"{'requires_grad only' if trainable_only else 'all weight matrices (frozen ones too)'}"
    )


def fingerprint(model: nn.Module) -> str:
    """BLAKE2b of every parameter's name, shape, dtype, requires_grad and bytes (identical weights, same id)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad}|".encode())
        data = p.detach().contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def audit_model(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    device: torch.device | str | None = None,
    method: Method = "fast",
    conv_transpose: ConvTransposeRule = "skip",
    trainable_only: bool = False,
    cache: bool = True,
    progress: bool = False,
) -> ModelAudit:
    """Audit every weight matrix of ``model`` (rule: module docstring) -> :class:`ModelAudit`.

    ``device``: where the ranks are computed (default: where the weights are). ``cache``: reuse a previous
    audit of bit-identical weights under the same rule (``runtime.cache_dir()/audit``).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"unknown dtype {dtype}; valid: torch.float32, torch.float64")
    if rtol is not None and not (0 <= rtol < 1):
        raise ValueError(f"rtol must be in [0, 1) or None (matrix_rank default), got {rtol}")
    start = time.perf_counter()
    matrices = weight_matrices(model, conv_transpose=conv_transpose, trainable_only=trainable_only)
    if not matrices:
        raise ValueError(f"{type(model).__name__} has no weight matrices (conv, linear or attention layers)")
    rule = describe_rule(dtype, rtol, conv_transpose, trainable_only)
    key = ""
    if cache:
        fp = fingerprint(model)
        key = hashlib.sha256(f"{fp}|{rule}|{method}|v{RULE_VERSION}".encode()).hexdigest()[:32]
        cached = _read_cache(key)
        if cached is not None:
            return cached
    ranks = matrix_ranks(
        [m.matrix for m in matrices], dtype=dtype, rtol=rtol, device=device, method=method, progress=progress
    )
    rows = [
        MatrixAudit(m.name, m.kind, *m.shape, m.stored_shape, m.trainable, r.rank, r.method, r.sigma_ratio)
        for m, r in zip(matrices, ranks)
    ]
    audit = ModelAudit(
        rule,
        str(dtype).replace("torch.", ""),
        rtol,
        conv_transpose,
        rows,
        skipped_parameters(model, matrices),
        key,
        time.perf_counter() - start,
        method,
    )
    if cache:
        _write_cache(key, audit)
    return audit


def _cache_path(key: str) -> Path:
    """The cache file of audit ``key`` (the weight fingerprint, rule and method, hashed): a content key."""
    folder = runtime.cache_dir() / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


def _read_cache(key: str) -> ModelAudit | None:
    """The cached audit ``key``, verified (``runtime.read_json_cache``: hash envelope), or None to recompute.

    A file that fails verification (random bytes, truncated, an edited rank) or does not describe an audit is
    discarded with one line; a file removed meanwhile by another process is simply absent, and one in the
    unhashed format of earlier versions is replaced without a word (it cannot be verified, only recomputed).
    """
    path = _cache_path(key)
    try:
        if path.exists() and path.read_bytes()[:9] == b'{"rule": ':  # unhashed, by an older version: recompute
            path.unlink(missing_ok=True)
            return None
        data = runtime.read_json_cache(path)
    except OSError:  # removed (discarded, replaced) by another process between the check and the read
        return None
    if data is None:
        return None
    try:
        cached = ModelAudit.from_json(data)
    except (TypeError, KeyError, ValueError, AttributeError):
        runtime.discard_cache(path, "not an audit of this version")
        return None
    return cached if cached.fingerprint == key else None


def _write_cache(key: str, audit: ModelAudit) -> None:
    """Store ``audit`` under ``key`` (atomic, hashed); a failed write (full disk) costs only the cache: one line."""
    path = _cache_path(key)
    runtime.write_cache_or_warn(path, lambda: runtime.write_json_cache(path, audit.to_json()))


def audit_registry_model(
    name: str,
    weights: str = "auto",
    device: str = "auto",
    *,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    method: Method = "fast",
    **kwargs: Any,
) -> ModelAudit:
    """Load a registry model (``helpers.models``) and audit it; the audit records the weights used."""
    from helpers.models import registry

    loaded = registry.load(name, weights, device)  # type: ignore[arg-type]
    audit = audit_model(loaded.model, dtype=dtype, rtol=rtol, device=device, method=method, **kwargs)
    audit.model = name
    audit.weights = loaded.weights if loaded.is_pretrained else f"random ({loaded.detail})"
    return audit


def structural_audit(
    model: nn.Module, *, conv_transpose: ConvTransposeRule = "skip", trainable_only: bool = False
) -> ModelAudit:
    """The audit every full-rank set of weights gives: rank = min(rows, cols) for every matrix.

    Needs the shapes only, so ``model`` may live on the ``meta`` device (see :func:`build_on_meta`).
    """
    matrices = weight_matrices(model, conv_transpose=conv_transpose, trainable_only=trainable_only)
    rows = [MatrixAudit(m.name, m.kind, *m.shape, m.stored_shape, m.trainable, min(m.shape), "shape") for m in matrices]
    rule = (
        "structural: rank = min(rows, cols); "
        + describe_rule(torch.float64, None, conv_transpose, trainable_only).split("; ", 1)[1]
    )
    return ModelAudit(rule, "n/a", None, conv_transpose, rows, skipped_parameters(model, matrices))


def build_on_meta(name: str) -> nn.Module:
    """A registry model with its parameters on the ``meta`` device: shapes without memory or init time."""
    from helpers.models import registry

    with torch.device("meta"):
        return registry.load(name, "random", "meta").model


def spectra(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    conv_transpose: ConvTransposeRule = "skip",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Singular values (descending, CPU, float64) of every weight matrix: the reference SVDs (``dtype``, the
    precision, does not change them)."""
    out = {}
    mats = weight_matrices(model, conv_transpose=conv_transpose)
    for m in progress_bar(mats, desc="spectra", leave=False, disable=not progress):
        out[m.name] = reference_rank(m.matrix, dtype, None, device)[1].cpu()
    return out


def sweep(
    spectra_by_name: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], rtols: Sequence[float]
) -> dict[str, list[int]]:
    """nu and the sum of nullities of one model for each relative tolerance (``rank = #{s > rtol s_max}``)."""
    nu, total = [], []
    for rtol in rtols:
        nullities = [
            shapes[n][1] - rank_from_singular_values(s, shapes[n], torch.float64, rtol)
            for n, s in spectra_by_name.items()
        ]
        nu.append(sum(x >= 1 for x in nullities))
        total.append(sum(nullities))
    return {"nu": nu, "sum_nullity": total}


#: Matrices with more entries than this are left out of :func:`independent_rank_check`'s random sample (their
#: numpy SVD would cost seconds each); W1 is always checked.
INDEPENDENT_MAX_ENTRIES = 2**21


def numpy_singular_values(matrix: torch.Tensor) -> Any:
    """Singular values of a 2-D matrix by ``numpy.linalg.svd`` in float64 (LAPACK through numpy, not torch)."""
    import numpy as np

    return np.linalg.svd(matrix.detach().to("cpu", torch.float64).numpy(), compute_uv=False)


def numpy_rank(
    matrix: torch.Tensor, precision: torch.dtype, rtol: float | None = None, *, sigma: Any = None
) -> tuple[int, float]:
    """(rank, margin) of a 2-D matrix by an SVD independent of the audit's code path
    (:func:`numpy_singular_values`, or ``sigma`` when already computed for this matrix) and the rule's threshold
    at ``precision``; the margin is :func:`helpers.linalg.rank_rule.rank_margin` of numpy's singular values."""
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    sigma = numpy_singular_values(matrix) if sigma is None else sigma
    if sigma.size == 0 or sigma.max() == 0:
        return 0, math.inf
    r = default_rtol(shape, precision) if rtol is None else rtol
    return int((sigma > r * sigma.max()).sum()), rank_margin(torch.from_numpy(sigma), shape, precision, rtol)


def sample_matrices(
    matrices: Sequence[WeightMatrix], k: int, seed: int = 0, max_entries: int = INDEPENDENT_MAX_ENTRIES
) -> list[int]:
    """Indices of W1 (index 0) and ``k`` other matrices drawn at random (``seed``) among those with at most
    ``max_entries`` entries, in registration order."""
    gen = torch.Generator().manual_seed(seed)
    pool = [i for i, m in enumerate(matrices) if i > 0 and m.matrix.numel() <= max_entries]
    picked = [pool[int(j)] for j in torch.randperm(len(pool), generator=gen)[:k]] if pool else []
    return [0, *sorted(picked)] if matrices else []


def independent_rank_check(
    matrices: Sequence[WeightMatrix],
    audit: ModelAudit,
    indices: Sequence[int],
    sigmas: dict[int, Any] | None = None,
) -> list[dict[str, Any]]:
    """The audit's rank of each matrix in ``indices`` (``matrices`` in the audit's order) against
    :func:`numpy_rank` at the audit's precision. One record per matrix: name, shape, precision, both ranks,
    ``agree``, the margin of numpy's singular values from the threshold and the rounding allowance it must
    exceed (``robust``: the rank cannot depend on the SVD's rounding). ``sigmas``: index -> numpy singular values,
    filled as they are computed, so that audits of the same matrices at other precisions reuse the SVDs."""
    precision = getattr(torch, audit.dtype)
    sigmas = {} if sigmas is None else sigmas
    out = []
    for i in indices:
        m, row = matrices[i], audit.rows[i]
        if m.name != row.name:
            raise ValueError(f"matrix {i} is {m.name!r} but the audit's row {i} is {row.name!r}: not the same model")
        if i not in sigmas:
            sigmas[i] = numpy_singular_values(m.matrix)
        rank, margin = numpy_rank(m.matrix, precision, audit.rtol, sigma=sigmas[i])
        allowance = rounding_allowance(m.shape)
        out.append(
            {
                "matrix": m.name,
                "shape": f"{m.shape[0]}x{m.shape[1]}",
                "precision": audit.dtype,
                "audit rank": row.rank,
                "numpy rank": rank,
                "agree": rank == row.rank,
                "margin": margin,
                "allowance": allowance,
                "robust": margin > allowance,
            }
        )
    return out


def compare_methods(
    model: nn.Module, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Audit ``model`` both ways, uncached: seconds of each, and whether every rank agrees."""
    timings, audits = {}, {}
    for method in ("reference", "fast"):
        start = time.perf_counter()
        audits[method] = audit_model(model, dtype=dtype, device=device, method=method, cache=False)
        timings[method] = time.perf_counter() - start
    ref, fast = audits["reference"].rows, audits["fast"].rows
    disagree = [r.name for r, f in zip(ref, fast) if r.rank != f.rank]
    return {
        "reference_s": timings["reference"],
        "fast_s": timings["fast"],
        "matrices": len(ref),
        "disagree": disagree,
        "svds_fast": sum(f.method == "svd" for f in fast),
        "reference": audits["reference"],
        "fast": audits["fast"],
    }


def naive_with_spectra(
    model: nn.Module, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> tuple[dict[str, int], dict[str, torch.Tensor], float]:
    """The naive audit: ``svdvals`` of every matrix one by one -> (rank by name, spectra by name, seconds)."""
    start = time.perf_counter()
    sig = spectra(model, dtype=dtype, device=device)
    shapes = {m.name: m.shape for m in weight_matrices(model)}
    ranks = {n: rank_from_singular_values(s, shapes[n], dtype) for n, s in sig.items()}
    return ranks, sig, time.perf_counter() - start


# --- grouped and depthwise convolutions: the matrix rule's reading against the layer's own map of a patch ---


def group_blocks(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The matrix of each group of a grouped convolution weight ``(out, in/groups, *k)``:
    ``(groups, out/groups, in/groups * prod(k))``; block ``g`` maps group ``g``'s input channels (of one patch)
    to its output channels. A depthwise weight ``(C, 1, k, k)`` with ``groups = C`` gives ``C`` blocks ``1 x k*k``."""
    out = int(weight.shape[0])
    if groups < 1 or out % groups:
        raise ValueError(f"groups must divide the {out} output channels, got {groups}")
    return weight.reshape(groups, out // groups, -1)


def block_diagonal_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The layer's own map of one input patch: ``out x (in * prod(k))``, block-diagonal in the groups, columns in
    the order of a ``(in, *k)`` patch flattened (channel-major), rows = output channels. Dense: for small layers."""
    return torch.block_diag(*group_blocks(weight.detach(), groups).unbind(0))


@dataclass
class GroupedReading:
    """One grouped convolution read two ways. ``stacked``: the matrix rule's ``out x (in/groups * prod(k))``, every
    group's rows stacked over shared columns (what :func:`weight_matrices` audits). ``block``: the layer's map of a
    whole input patch, ``out x (in * prod(k))``, block-diagonal (its kernel: the patch perturbations the layer
    cannot see). ``group_nullities``: the nullity of each group's own block (``in/groups * prod(k) - rank``)."""

    name: str
    stored_shape: tuple[int, ...]
    groups: int
    stacked_shape: tuple[int, int]
    stacked_rank: int
    block_shape: tuple[int, int]
    block_rank: int
    group_nullities: list[int]

    @property
    def stacked_nullity(self) -> int:
        return self.stacked_shape[1] - self.stacked_rank

    @property
    def block_nullity(self) -> int:
        return self.block_shape[1] - self.block_rank


def grouped_reading(
    name: str, weight: torch.Tensor, groups: int, *, dtype: torch.dtype = torch.float32, rtol: float | None = None
) -> GroupedReading:
    """Ranks of a grouped convolution ``weight`` under both readings (:class:`GroupedReading`), by the book's rank
    rule at precision ``dtype``. The block-diagonal matrix's singular values are the union of its blocks' (one
    batched ``svdvals`` in float64), so it is never formed."""
    w = weight.detach().to("cpu", torch.float64)
    blocks = group_blocks(w, groups)
    stacked = w.reshape(w.shape[0], -1)
    stacked_shape = (int(stacked.shape[0]), int(stacked.shape[1]))
    block_shape = (int(w.shape[0]), groups * int(blocks.shape[2]))
    sigma = torch.linalg.svdvals(blocks)  # (groups, min(out/groups, cols/group))
    block_rank = rank_from_singular_values(sigma.flatten(), block_shape, dtype, rtol)
    g_shape = (int(blocks.shape[1]), int(blocks.shape[2]))
    tol = (default_rtol(block_shape, dtype) if rtol is None else rtol) * float(sigma.max())
    group_nullities = [g_shape[1] - int((s > tol).sum()) for s in sigma]
    return GroupedReading(
        name,
        tuple(weight.shape),
        groups,
        stacked_shape,
        rank_from_singular_values(torch.linalg.svdvals(stacked), stacked_shape, dtype, rtol),
        block_shape,
        block_rank,
        group_nullities,
    )


def grouped_readings(
    model: nn.Module, *, dtype: torch.dtype = torch.float32, rtol: float | None = None
) -> list[GroupedReading]:
    """:func:`grouped_reading` of every convolution of ``model`` with ``groups > 1``, in registration order."""
    return [
        grouped_reading(f"{name}.weight", m.weight, m.groups, dtype=dtype, rtol=rtol)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
        and not isinstance(m, nn.modules.conv._ConvTransposeNd)
        and m.groups > 1
    ]


def block_null_vector(weight: torch.Tensor, groups: int, generator: torch.Generator) -> torch.Tensor:
    """A unit-norm patch ``(in, *k)`` (float64) drawn at random from the kernel of :func:`block_diagonal_matrix`:
    a perturbation of one input patch that the layer's output at that patch cannot see."""
    m = block_diagonal_matrix(weight.to(torch.float64), groups)
    _, s, vh = torch.linalg.svd(m)
    rank = rank_from_singular_values(s, (int(m.shape[0]), int(m.shape[1])), torch.float64)
    basis = vh[rank:]
    if basis.shape[0] == 0:
        raise ValueError("the block-diagonal matrix has full column rank: no null patch")
    v = torch.randn(basis.shape[0], generator=generator, dtype=torch.float64) @ basis
    in_channels = int(weight.shape[1]) * groups
    return (v / v.norm()).reshape(in_channels, *weight.shape[2:])


def patch_response_change(weight: torch.Tensor, groups: int, delta: torch.Tensor) -> float:
    """``||conv(delta)||`` at one output position: the grouped convolution (``torch.nn.functional.conv``, not the
    matrices) of a single patch ``delta`` ``(in, *k)``, no padding, stride 1, in float64. By linearity this is how
    much the layer's output at that patch moves when ``delta`` is added to any input patch."""
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
    w = weight.detach().to("cpu", torch.float64)
    out = conv[w.ndim - 2](delta.to(torch.float64)[None], w, groups=groups)
    return float(out.norm())
