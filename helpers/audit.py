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

Rank rule: ``rank = #{sigma_i > rtol * sigma_max}`` of the singular values computed in ``dtype`` (the rule of
``torch.linalg.matrix_rank`` and ``numpy.linalg.matrix_rank``); ``rtol=None`` means their default
``max(rows, cols) * eps(dtype)``.

Two ways to get the same ranks: ``method="reference"`` runs ``svdvals`` on every matrix one by one;
``method="fast"`` (default) batches equal shapes, forms the Gram matrix of the smaller side in float64 and
*certifies* full rank with two Cholesky factorisations (rigorous rounding-error bounds, see
:func:`certify_full_rank`); only matrices it cannot certify go to the reference SVD. Both give identical ranks.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

from . import page, runtime

#: Bump when the matrix rule or the rank rule changes: cached audits with another version are ignored.
RULE_VERSION = 1
#: Above this many bytes of float64 per batch, equal-shape matrices are processed in several batches.
BATCH_BYTES = 256 * 2**20
ConvTransposeRule = Literal["skip", "operator", "as_stored"]
CONV_TRANSPOSE_RULES: tuple[str, ...] = ("skip", "operator", "as_stored")
Method = Literal["fast", "reference"]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# --- the matrix rule ----------------------------------------------------------------------------------

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
    return any("attention" in type(parents.get(".".join(parts[:i]), nn.Module())).__name__.lower()
               for i in range(len(parts)))


def weight_matrices(model: nn.Module, *, conv_transpose: ConvTransposeRule = "skip",
                    trainable_only: bool = False) -> list[WeightMatrix]:
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
            found.append(WeightMatrix(prefix + pname, matrix.detach(), kind, tuple(param.shape),
                                      bool(param.requires_grad), type(module).__name__))
    return found


def _as_matrix(module: nn.Module, pname: str, param: torch.Tensor,
               conv_transpose: ConvTransposeRule) -> tuple[torch.Tensor | None, str]:
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
    owner = {f"{mn}.{pn}" if mn else pn: mod for mn, mod in model.named_modules()
             for pn, _ in mod.named_parameters(recurse=False)}
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
    names = {id(m): n for n, m in model.named_modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention))}
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, _inp: order.append(names[id(mod)]))
               for m in model.modules() if id(m) in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order[0] if order else None


# --- ranks ----------------------------------------------------------------------------------------------

def default_rtol(shape: tuple[int, int], dtype: torch.dtype) -> float:
    """``torch.linalg.matrix_rank``'s default relative tolerance: ``max(rows, cols) * eps(dtype)``."""
    return max(shape) * torch.finfo(dtype).eps


def reference_rank(matrix: torch.Tensor, dtype: torch.dtype = torch.float64, rtol: float | None = None,
                   device: torch.device | str | None = None) -> tuple[int, torch.Tensor]:
    """(rank, singular values in descending order) of one 2-D matrix: ``svdvals`` in ``dtype``, then the rule."""
    w = matrix.to(device=device or matrix.device, dtype=dtype)
    sigma = torch.linalg.svdvals(w)
    return rank_from_singular_values(sigma, tuple(matrix.shape), dtype, rtol), sigma


def rank_from_singular_values(sigma: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                              rtol: float | None = None) -> int:
    """``#{sigma_i > rtol * sigma_max}`` with ``rtol`` defaulting to :func:`default_rtol`."""
    if sigma.numel() == 0:
        return 0
    tol = (default_rtol(shape, dtype) if rtol is None else rtol) * sigma.max()
    return int((sigma > tol).sum())


def _gram(w: torch.Tensor, subset: int | None = None) -> torch.Tensor:
    """Gram matrix of the smaller side of a batch ``(B, m, n)``: ``(B, p, p)`` with ``p = min(m, n)``, summed over
    the first ``subset`` of the ``k = max(m, n)`` products only (all when None). Dropping terms of
    ``sum_j w_j w_j^T`` can only lower its eigenvalues, so a subset Gram's ``lambda_min`` bounds the full one's."""
    wide = w.shape[-2] <= w.shape[-1]
    if subset is not None:
        w = w[..., :subset] if wide else w[..., :subset, :]
    w = w.to(torch.float64)
    return w @ w.mT if wide else w.mT @ w


def _gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u)


def certify_full_rank(w: torch.Tensor, dtype: torch.dtype, rtol: float | None = None, *,
                      subset: int | None = None, power_iterations: int = 0) -> torch.Tensor:
    """For a batch ``(B, m, n)`` of matrices: True where the reference rule provably gives ``min(m, n)``.

    The proof: with ``G`` the float64 Gram matrix of the smaller side (``p x p``) over ``s`` of the
    ``k = max(m, n)`` products (``subset``; all by default), ``||fl(G) - G||_2 <= gamma_s ||W_s||_F^2``
    (Higham, *Accuracy and Stability*, Thm 3.5), and a Cholesky factorisation of ``A`` that completes proves
    ``A + dA`` positive definite with ``||dA||_2 <= gamma_{p+1} trace(A)`` (Thm 10.3). So a Cholesky of
    ``G - t I`` that completes proves ``sigma_min(W)^2 >= lambda_min(G_s) >= t - errors``. The threshold is
    ``t = (margin * sigma_max_upper)^2`` with ``margin = rtol + 10 k eps(dtype)``: the extra term covers the
    reference SVD's own rounding (``|sigma_hat - sigma| <= k eps sigma_max``, with a factor 10 to spare), so
    the reference ``svdvals`` in ``dtype`` cannot put a singular value below its threshold either.
    ``sigma_max_upper^2`` is ``||W||_F^2``, or with ``power_iterations > 0`` (full Gram only) a power-iteration
    estimate proven by a Cholesky of ``c I - G``. A matrix not certified is not declared deficient: the caller
    sends it to the reference SVD.
    """
    m, n = w.shape[-2:]
    p, k = min(m, n), max(m, n)
    s = k if subset is None else min(subset, k)
    u = torch.finfo(torch.float64).eps / 2
    g = _gram(w, None if s == k else s)
    trace = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1) * (1 + 4 * _gamma(s, u))
    fro2 = trace if s == k else w.to(torch.float64).square().sum((-2, -1)) * (1 + 4 * _gamma(k, u))
    err = 2 * (_gamma(s, u) + 2 * _gamma(p + 1, u) + 2 * u) * trace  # gram + cholesky + shift, x2 spare
    eye = torch.eye(p, dtype=g.dtype, device=g.device)
    margin = (default_rtol((m, n), dtype) if rtol is None else rtol) + 10 * k * torch.finfo(dtype).eps
    _, info = torch.linalg.cholesky_ex(g - (margin ** 2 * fro2 + err)[:, None, None] * eye)
    ok = (info == 0) & (fro2 > 0)
    retry = (~ok & (fro2 > 0)).nonzero().flatten()
    if power_iterations and s == k and len(retry):  # a tighter sigma_max bound than ||W||_F for the rest
        gr, fr, er = g[retry], fro2[retry], err[retry]
        upper = _certified_lambda_max(gr, fr, er, eye, power_iterations)
        _, info = torch.linalg.cholesky_ex(gr - (margin ** 2 * upper + er)[:, None, None] * eye)
        ok[retry] = info == 0
    return ok


def _certified_lambda_max(g: torch.Tensor, fro2: torch.Tensor, err: torch.Tensor, eye: torch.Tensor,
                          iterations: int) -> torch.Tensor:
    """An upper bound on ``lambda_max`` of the exact Gram matrix: power-iteration estimate, proven by Cholesky
    of ``c I - G``; where that fails, the trace (``||W||_F^2``), always an upper bound."""
    v = torch.ones(g.shape[:-1] + (1,), dtype=g.dtype, device=g.device)
    est = torch.zeros_like(fro2)
    for _ in range(iterations):
        v = g @ v
        est = v.norm(dim=(-2, -1))
        v = v / est.clamp_min(torch.finfo(g.dtype).tiny)[:, None, None]
    c = 1.05 * est + 2 * err
    _, info = torch.linalg.cholesky_ex(c[:, None, None] * eye - g)
    return torch.where(info == 0, torch.minimum(c, fro2), fro2) + err


@dataclass
class RankResult:
    """Rank of one matrix and how it was obtained (``certifiedN``: Cholesky proof, tier N; ``svd``: svdvals)."""

    rank: int
    method: str
    sigma_ratio: float | None = None  # sigma_min / sigma_max where an SVD ran


def matrix_ranks(matrices: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float64,
                 rtol: float | None = None, device: torch.device | str | None = None,
                 method: Method = "fast", progress: bool = False) -> list[RankResult]:
    """Ranks of 2-D matrices by the rank rule; ``fast`` and ``reference`` return identical ranks."""
    if method not in ("fast", "reference"):
        raise ValueError(f"unknown method {method!r}; valid: fast, reference")
    dev = runtime.resolve_device(device) if isinstance(device, str) else device
    results: list[RankResult | None] = [None] * len(matrices)
    todo = list(range(len(matrices)))
    if method == "fast":
        todo = _certify_groups(matrices, dtype, rtol, dev, results)
    for i in page.progress(todo, desc="SVD", leave=False, disable=not progress):
        rank, sigma = reference_rank(matrices[i], dtype, rtol, dev)
        ratio = float(sigma[-1] / sigma[0]) if sigma.numel() and sigma[0] > 0 else None
        results[i] = RankResult(rank, "svd", ratio)
    return results  # type: ignore[return-value]


#: Certification tiers: (products summed in the Gram matrix as a function of p = min(m, n), power iterations).
#: Tier 1 is cheap (a subset of the products, sigma_max bounded by the Frobenius norm); tier 2 takes them all.
TIERS: tuple[tuple[float | None, int], ...] = ((1.25, 0), (None, 12))


def _certify_groups(matrices: Sequence[torch.Tensor], dtype: torch.dtype, rtol: float | None,
                    device: torch.device | None, results: list[RankResult | None]) -> list[int]:
    """Fill ``results`` for every certified matrix; return the indices left for the reference SVD."""
    left = list(range(len(matrices)))
    for tier, (factor, iterations) in enumerate(TIERS, start=1):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in left:
            groups.setdefault(tuple(matrices[i].shape), []).append(i)
        left = []
        for shape, idx in groups.items():
            p, k = min(shape), max(shape)
            subset = None if factor is None or int(factor * p) + 16 >= k else int(factor * p) + 16
            if subset is None and factor is not None:
                left.extend(idx)  # tier 1 would take every product anyway: leave it to the full tier
                continue
            per_batch = max(1, BATCH_BYTES // (8 * shape[0] * shape[1] + 8 * p * p))
            for start in range(0, len(idx), per_batch):
                chunk = idx[start:start + per_batch]
                w = torch.stack([matrices[i].to(device=device or matrices[i].device) for i in chunk])
                ok = certify_full_rank(w, dtype, rtol, subset=subset, power_iterations=iterations).tolist()
                for i, good in zip(chunk, ok):
                    if good:
                        results[i] = RankResult(p, f"certified{tier}")
                    else:
                        left.append(i)
    return sorted(left)


# --- the audit of a model -------------------------------------------------------------------------------

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
        return {"model": self.model, "weights": self.weights, "n": self.n, "nu": self.nu, "mu": self.mu,
                "nu_over_n": self.nu_over_n, "mu_over_n": self.mu_over_n, "sum_nullity": self.sum_nullity,
                "nullity_w1": self.nullity_w1, "w1_name": self.w1_name, "w1_shape": list(self.w1_shape or ()),
                "structural_nu": self.structural_nu, "structural_sum_nullity": self.structural_sum_nullity,
                "structural_nullity_w1": self.structural_nullity_w1, "rule": self.rule,
                "svds": sum(r.method == "svd" for r in self.rows), "seconds": round(self.seconds, 3)}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelAudit":
        data = dict(data)
        data["rows"] = [MatrixAudit(**{**r, "stored_shape": tuple(r["stored_shape"])}) for r in data["rows"]]
        data["skipped"] = [(n, tuple(s), why) for n, s, why in data.get("skipped", [])]
        return cls(**data)


def describe_rule(dtype: torch.dtype, rtol: float | None, conv_transpose: ConvTransposeRule,
                  trainable_only: bool = False) -> str:
    """One line naming every choice behind the numbers."""
    dname = str(dtype).replace("torch.", "")
    tol = f"rtol={rtol:g}" if rtol is not None else f"rtol=max(rows,cols)*eps({dname}) (matrix_rank default)"
    return (f"rank = #{{sigma > rtol*sigma_max}}, svdvals in {dname}, {tol}; conv: out x in/groups*k; "
            f"conv-transpose: {conv_transpose}; linear/attention as stored; "
            f"{'requires_grad only' if trainable_only else 'all weight matrices (frozen ones too)'}")


def fingerprint(model: nn.Module) -> str:
    """BLAKE2b of every parameter's name, shape, dtype, requires_grad and bytes (identical weights, same id)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.requires_grad}|".encode())
        data = p.detach().contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def audit_model(model: nn.Module, *, dtype: torch.dtype = torch.float64, rtol: float | None = None,
                device: torch.device | str | None = None, method: Method = "fast",
                conv_transpose: ConvTransposeRule = "skip", trainable_only: bool = False,
                cache: bool = True, progress: bool = False) -> ModelAudit:
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
    ranks = matrix_ranks([m.matrix for m in matrices], dtype=dtype, rtol=rtol, device=device, method=method,
                         progress=progress)
    rows = [MatrixAudit(m.name, m.kind, *m.shape, m.stored_shape, m.trainable, r.rank, r.method, r.sigma_ratio)
            for m, r in zip(matrices, ranks)]
    audit = ModelAudit(rule, str(dtype).replace("torch.", ""), rtol, conv_transpose, rows,
                       skipped_parameters(model, matrices), key, time.perf_counter() - start, method)
    if cache:
        _write_cache(key, audit)
    return audit


def _cache_path(key: str) -> Path:
    folder = runtime.cache_dir() / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


def _read_cache(key: str) -> ModelAudit | None:
    path = _cache_path(key)
    if not path.exists():
        return None
    try:
        return ModelAudit.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError):
        return None


def _write_cache(key: str, audit: ModelAudit) -> None:
    path = _cache_path(key)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(audit.to_json()))
    tmp.replace(path)


def audit_registry_model(name: str, weights: str = "auto", device: str = "auto", *,
                         dtype: torch.dtype = torch.float64, rtol: float | None = None,
                         method: Method = "fast", **kwargs: Any) -> ModelAudit:
    """Load a registry model (``helpers.models``) and audit it; the audit records the weights used."""
    from . import models

    loaded = models.load(name, weights, device)  # type: ignore[arg-type]
    audit = audit_model(loaded.model, dtype=dtype, rtol=rtol, device=device, method=method, **kwargs)
    audit.model = name
    audit.weights = loaded.weights if loaded.is_pretrained else f"random ({loaded.detail})"
    return audit


# --- command line ------------------------------------------------------------------------------------

def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """``python -m helpers audit MODEL [--weights] [--device] [--json] [--dtype] [--rtol]``."""
    from .__main__ import add_common

    p = subparsers.add_parser("audit", help="Table 1 numbers of a model: n, nu, mu, nullities, W1")
    p.add_argument("model", help="a registry name (see `python -m helpers models`)")
    add_common(p)
    p.add_argument("--dtype", default="float64", choices=tuple(DTYPES), help="dtype of the SVD (default float64)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative rank tolerance (default: max(rows, cols) * eps(dtype), as matrix_rank)")
    p.add_argument("--method", default="fast", choices=("fast", "reference"))
    p.add_argument("--conv-transpose", default="skip", choices=CONV_TRANSPOSE_RULES,
                   help="transposed convolutions: skip (Table 1's count), operator, as_stored")
    p.add_argument("--rows", action="store_true", help="also print every matrix")
    p.set_defaults(func=_audit_command)


def _audit_command(args: argparse.Namespace) -> int:
    audit = audit_registry_model(args.model, args.weights, args.device, dtype=DTYPES[args.dtype], rtol=args.rtol,
                                 method=args.method, conv_transpose=args.conv_transpose)
    info = audit.summary()
    if args.json:
        if args.rows:
            info["rows"] = [{**dataclasses.asdict(r), "nullity": r.nullity} for r in audit.rows]
        print(json.dumps(info, indent=1))
        return 0
    for key in ("model", "weights", "n", "nu", "mu", "sum_nullity", "nullity_w1", "w1_name", "w1_shape",
                "structural_nu", "structural_sum_nullity", "structural_nullity_w1", "rule", "svds", "seconds"):
        print(f"{key}: {info[key]}")
    if args.rows:
        for r in audit.rows:
            print(f"  {r.name:<48} {r.kind:<14} {r.rows:>6} x {r.cols:<6} rank {r.rank:>5} nullity {r.nullity}")
    return 0


# --- Table 1: shapes, the paper's numbers, verdicts ----------------------------------------------------

def structural_audit(model: nn.Module, *, conv_transpose: ConvTransposeRule = "skip",
                     trainable_only: bool = False) -> ModelAudit:
    """The audit every full-rank set of weights gives: rank = min(rows, cols) for every matrix.

    Needs the shapes only, so ``model`` may live on the ``meta`` device (see :func:`build_on_meta`).
    """
    matrices = weight_matrices(model, conv_transpose=conv_transpose, trainable_only=trainable_only)
    rows = [MatrixAudit(m.name, m.kind, *m.shape, m.stored_shape, m.trainable, min(m.shape), "shape")
            for m in matrices]
    rule = "structural: rank = min(rows, cols); " + describe_rule(torch.float64, None, conv_transpose,
                                                                    trainable_only).split("; ", 1)[1]
    return ModelAudit(rule, "n/a", None, conv_transpose, rows, skipped_parameters(model, matrices))


def build_on_meta(name: str) -> nn.Module:
    """A registry model with its parameters on the ``meta`` device: shapes without memory or init time."""
    from . import models

    with torch.device("meta"):
        return models.load(name, "random", "meta").model


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
        return {"nu": self.nu_paper - self.structural_nu, "sum_nullity": self.sum_paper - self.structural_sum,
                "nullity_w1": self.w1_paper - self.structural_w1}


def check_row(row: str, model_name: str, audit: ModelAudit, paper_row: dict[str, Any]) -> RowCheck:
    """Compare a structural audit of ``model_name`` with Table 1's ``row`` (``paper_row`` from paper_numbers)."""
    implied = implied_n(paper_row["nu"], paper_row["nu_over_n_pct"]) & \
        implied_n(paper_row["mu"], paper_row["mu_over_n_pct"])
    return RowCheck(row, model_name, audit.n, sorted(implied), audit.mu, paper_row["mu"], audit.structural_nu,
                    paper_row["nu"], audit.structural_sum_nullity, paper_row["sum_nullity"],
                    audit.structural_nullity_w1, paper_row["nullity_W1"], audit.rows[0].cols)


# --- spectra and the tolerance sweep ----------------------------------------------------------------

def spectra(model: nn.Module, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
            conv_transpose: ConvTransposeRule = "skip", progress: bool = False) -> dict[str, torch.Tensor]:
    """Singular values (descending, CPU, ``dtype``) of every weight matrix: the reference SVDs."""
    out = {}
    mats = weight_matrices(model, conv_transpose=conv_transpose)
    for m in page.progress(mats, desc="spectra", leave=False, disable=not progress):
        out[m.name] = reference_rank(m.matrix, dtype, None, device)[1].cpu()
    return out


def sweep(spectra_by_name: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
          rtols: Sequence[float]) -> dict[str, list[int]]:
    """nu and the sum of nullities of one model for each relative tolerance (``rank = #{s > rtol s_max}``)."""
    nu, total = [], []
    for rtol in rtols:
        nullities = [shapes[n][1] - rank_from_singular_values(s, shapes[n], torch.float64, rtol)
                     for n, s in spectra_by_name.items()]
        nu.append(sum(x >= 1 for x in nullities))
        total.append(sum(nullities))
    return {"nu": nu, "sum_nullity": total}


# --- naive vs fast ------------------------------------------------------------------------------------

def compare_methods(model: nn.Module, *, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> dict[str, Any]:
    """Audit ``model`` both ways, uncached: seconds of each, and whether every rank agrees."""
    timings, audits = {}, {}
    for method in ("reference", "fast"):
        start = time.perf_counter()
        audits[method] = audit_model(model, dtype=dtype, device=device, method=method, cache=False)
        timings[method] = time.perf_counter() - start
    ref, fast = audits["reference"].rows, audits["fast"].rows
    disagree = [r.name for r, f in zip(ref, fast) if r.rank != f.rank]
    return {"reference_s": timings["reference"], "fast_s": timings["fast"], "matrices": len(ref),
            "disagree": disagree, "svds_fast": sum(f.method == "svd" for f in fast),
            "reference": audits["reference"], "fast": audits["fast"]}


#: The constructors the chapter tests for each Table 1 row: the registry's choice (``table1=`` label) first,
#: then the alternatives a reader might assume.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "Squeezenet": ("squeezenet1_1", "squeezenet1_0"),
    "ViT-Base": ("vit_base_patch16_224", "vit_b_16"),
    "ViT-Large": ("vit_large_patch16_224", "vit_l_16"),
    "Fcn": ("fcn_resnet50_aux", "fcn_resnet50"),
    "PSPNet": ("pspnet_resnet34_voc", "pspnet_resnet34"),
    "MobileNet-V3": ("deeplabv3_resnet50_aux", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
                     "deeplabv3_resnet50"),
    "Faster R-CNN": ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
                     "fasterrcnn_resnet50_fpn"),
}


def candidates(row: str) -> tuple[str, ...]:
    """Registry names to test for a Table 1 row, the registry's choice first."""
    from . import models

    chosen = models.TABLE1_ROWS[row]
    return (chosen,) + tuple(c for c in CANDIDATES.get(row, ()) if c != chosen)


def check_all_rows(rules: Sequence[ConvTransposeRule] = ("skip",),
                   progress: bool = False) -> dict[str, list[RowCheck]]:
    """Every Table 1 row against every candidate constructor under each conv-transpose rule, from shapes alone
    (each candidate built once on the meta device: seconds for all of them)."""
    from . import paper

    rows = paper.get("ozbulak", "table1", "rows")
    out: dict[str, list[RowCheck]] = {rule: [] for rule in rules}
    names = [(row, name) for row in rows for name in candidates(row)]
    built: dict[str, nn.Module] = {}
    for row, name in page.progress(names, desc="shapes", leave=False, disable=not progress):
        model = built.setdefault(name, build_on_meta(name))
        for rule in rules:
            out[rule].append(check_row(row, name, structural_audit(model, conv_transpose=rule), rows[row]))
    return out


def naive_with_spectra(model: nn.Module, *, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None) -> tuple[dict[str, int], dict[str, torch.Tensor], float]:
    """The naive audit: ``svdvals`` of every matrix one by one -> (rank by name, spectra by name, seconds)."""
    start = time.perf_counter()
    sig = spectra(model, dtype=dtype, device=device)
    shapes = {m.name: m.shape for m in weight_matrices(model)}
    ranks = {n: rank_from_singular_values(s, shapes[n], dtype) for n, s in sig.items()}
    return ranks, sig, time.perf_counter() - start


def table_row(row: str, paper_row: dict[str, Any], ours: ModelAudit, check: RowCheck,
              pretrained: bool) -> dict[str, Any]:
    """Paper vs ours for one Table 1 row, with the difference and its explanation (for the chapter's table)."""
    def explain(col: str, paper_value: int, ours_value: int, structural: int) -> str:
        if paper_value == ours_value:
            return "same"
        if paper_value < structural:
            return "impossible: below what the shapes force"
        if not pretrained:
            return f"trained weights / tolerance (shapes force {structural}; random weights give the shapes' value)"
        return "trained weights: differs (see tolerance sweep)"

    out = {"row": row, "model": ours.model, "n (implied)": "/".join(map(str, check.n_implied)), "n": ours.n,
           "mu paper": paper_row["mu"], "mu": ours.mu}
    for col, key, struct in (("nu", "nu", ours.structural_nu), ("sum", "sum_nullity", ours.structural_sum_nullity),
                             ("W1", "nullity_W1", ours.structural_nullity_w1)):
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
        why = "; ".join(f"{c}: {r[f'{c} why']}" for c in ("n", "nu", "sum", "W1") if r.get(f"{c} why") not in (None, "same"))
        pair = "{} / {}".replace(" ", "\u00a0")  # short pairs never wrap at the slash
        out.append({"row": r["row"], "model": r["model"], "n": pair.format(r["n"], r["n (implied)"]),
                    "μ": pair.format(r["mu"], r["mu paper"]), "ν": pair.format(r["nu"], r["nu paper"]),
                    "Σ nullity": f"{r['sum']} / {r['sum paper']}", "nullity(W1)": pair.format(r["W1"], r["W1 paper"]),
                    "float32 ν / Σ / W1": f"{r['nu f32']} / {r['sum f32']} / {r['W1 f32']}",
                    "weights": r["weights"], "why": why})
    return out
