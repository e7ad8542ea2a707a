"""The book's one rank rule, and a fast way to apply it to every weight matrix of a model.

``rank = #{sigma_i > rtol * sigma_max}`` with ``rtol = max(rows, cols) * eps(precision)`` by default
(``torch.linalg.matrix_rank``'s convention; ``default_rtol``). The singular values are always computed in
float64 (:data:`SVD_DTYPE`); the *precision* (``dtype`` below: float32 for weights stored in float32, float64
for the exact-arithmetic reading) only sets the tolerance. The audit (:mod:`helpers.experiments.audit`) and the
kernel bases (:mod:`helpers.linalg.kernels`) apply this same rule, so the nullity the audit reports for a layer
at the weights' stored precision is the dimension of the kernel basis built for it.

``reference_rank`` applies the rule with one SVD; ``matrix_ranks`` batches same-shape matrices and skips the SVD
of a wide/tall matrix when a Gram-matrix eigenvalue bound certifies full rank (``certify_full_rank``), which the
tests check against the reference. ``rank_margin`` / ``rank_is_robust`` say whether a rank decided from computed
singular values is beyond the reach of the SVD's own rounding (no singular value inside the rounding band
around the threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from helpers import runtime
from helpers.progress import progress_bar

#: Above this many bytes of float64 per batch, equal-shape matrices are processed in several batches.
BATCH_BYTES = 256 * 2**20


#: "fast": batched SVDs and a certificate of full rank; "reference": one SVD per matrix.
Method = Literal["fast", "reference"]


DTYPES = {"float64": torch.float64, "float32": torch.float32}


#: The dtype every singular value of the rule is computed in, whatever the precision of the tolerance.
SVD_DTYPE = torch.float64

#: How many float64 ulps (times ``max(rows, cols)``) a computed singular value may be off from the exact one,
#: relative to ``sigma_max``: backward-stable SVDs give ``|sigma_hat - sigma| <= c k eps sigma_max`` with a small
#: ``c``; 10 leaves room to spare. Used by the certificate and by :func:`rank_is_robust`.
ROUNDING_ULPS = 10


def default_rtol(shape: tuple[int, int], dtype: torch.dtype) -> float:
    """``torch.linalg.matrix_rank``'s default relative tolerance: ``max(rows, cols) * eps(dtype)``."""
    return max(shape) * torch.finfo(dtype).eps


def rounding_allowance(shape: tuple[int, int]) -> float:
    """The relative error (in units of ``sigma_max``) a float64 SVD of a ``rows x cols`` matrix may make on any
    singular value: ``ROUNDING_ULPS * max(rows, cols) * eps(float64)``."""
    return ROUNDING_ULPS * max(shape) * torch.finfo(SVD_DTYPE).eps


def rank_margin(sigma: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, rtol: float | None = None) -> float:
    """How far the singular values stay from the rule's threshold: ``min_i |sigma_i / sigma_max - rtol|``
    (``inf`` for an empty or zero matrix, whose rank is 0 whatever the rounding)."""
    if sigma.numel() == 0 or float(sigma.max()) == 0.0:
        return float("inf")
    r = default_rtol(shape, dtype) if rtol is None else rtol
    return float((sigma.to(SVD_DTYPE) / sigma.max() - r).abs().min())


def rank_is_robust(sigma: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, rtol: float | None = None) -> bool:
    """True when no singular value lies within the SVD's rounding allowance of the threshold, so the rank the
    rule gives cannot depend on how the SVD rounded (the certificate of a rank decided by an SVD)."""
    return rank_margin(sigma, shape, dtype, rtol) > rounding_allowance(shape)


def reference_rank(
    matrix: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[int, torch.Tensor]:
    """(rank, singular values in descending order) of one 2-D matrix: ``svdvals`` in float64 (:data:`SVD_DTYPE`),
    then the rule with the tolerance of the precision ``dtype``."""
    w = matrix.to(device=device or matrix.device, dtype=SVD_DTYPE)
    sigma = torch.linalg.svdvals(w)
    return rank_from_singular_values(sigma, (matrix.shape[0], matrix.shape[1]), dtype, rtol), sigma


def rank_from_singular_values(
    sigma: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, rtol: float | None = None
) -> int:
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


def certify_full_rank(
    w: torch.Tensor,
    dtype: torch.dtype,
    rtol: float | None = None,
    *,
    subset: int | None = None,
    power_iterations: int = 0,
) -> torch.Tensor:
    """For a batch ``(B, m, n)`` of matrices: True where the reference rule provably gives ``min(m, n)``.

    The proof: with ``G`` the float64 Gram matrix of the smaller side (``p x p``) over ``s`` of the
    ``k = max(m, n)`` products (``subset``; all by default), ``||fl(G) - G||_2 <= gamma_s ||W_s||_F^2``
    (Higham, *Accuracy and Stability*, Thm 3.5), and a Cholesky factorisation of ``A`` that completes proves
    ``A + dA`` positive definite with ``||dA||_2 <= gamma_{p+1} trace(A)`` (Thm 10.3). So a Cholesky of
    ``G - t I`` that completes proves ``sigma_min(W)^2 >= lambda_min(G_s) >= t - errors``. The threshold is
    ``t = (margin * sigma_max_upper)^2`` with ``margin = rtol + rounding_allowance``: the extra term covers the
    reference SVD's own rounding (``|sigma_hat - sigma| <= k eps64 sigma_max``, with a factor 10 to spare), so
    the reference ``svdvals`` (float64) cannot put a singular value below its threshold either.
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
    margin = (default_rtol((m, n), dtype) if rtol is None else rtol) + rounding_allowance((m, n))
    _, info = torch.linalg.cholesky_ex(g - (margin**2 * fro2 + err)[:, None, None] * eye)
    ok = (info == 0) & (fro2 > 0)
    retry = (~ok & (fro2 > 0)).nonzero().flatten()
    if power_iterations and s == k and len(retry):  # a tighter sigma_max bound than ||W||_F for the rest
        gr, fr, er = g[retry], fro2[retry], err[retry]
        upper = _certified_lambda_max(gr, fr, er, eye, power_iterations)
        _, info = torch.linalg.cholesky_ex(gr - (margin**2 * upper + er)[:, None, None] * eye)
        ok[retry] = info == 0
    return ok


def _certified_lambda_max(
    g: torch.Tensor, fro2: torch.Tensor, err: torch.Tensor, eye: torch.Tensor, iterations: int
) -> torch.Tensor:
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


def matrix_ranks(
    matrices: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    device: torch.device | str | None = None,
    method: Method = "fast",
    progress: bool = False,
) -> list[RankResult]:
    """Ranks of 2-D matrices by the rank rule; ``fast`` and ``reference`` return identical ranks."""
    if method not in ("fast", "reference"):
        raise ValueError(f"unknown method {method!r}; valid: fast, reference")
    dev = runtime.resolve_device(device) if isinstance(device, str) else device
    results: list[RankResult | None] = [None] * len(matrices)
    todo = list(range(len(matrices)))
    if method == "fast":
        todo = _certify_groups(matrices, dtype, rtol, dev, results)
    for i in progress_bar(todo, desc="SVD", leave=False, disable=not progress):
        rank, sigma = reference_rank(matrices[i], dtype, rtol, dev)
        ratio = float(sigma[-1] / sigma[0]) if sigma.numel() and sigma[0] > 0 else None
        results[i] = RankResult(rank, "svd", ratio)
    return results  # type: ignore[return-value]


#: Certification tiers: (products summed in the Gram matrix as a function of p = min(m, n), power iterations).
#: Tier 1 is cheap (a subset of the products, sigma_max bounded by the Frobenius norm); tier 2 takes them all.
TIERS: tuple[tuple[float | None, int], ...] = ((1.25, 0), (None, 12))


def _certify_groups(
    matrices: Sequence[torch.Tensor],
    dtype: torch.dtype,
    rtol: float | None,
    device: torch.device | None,
    results: list[RankResult | None],
) -> list[int]:
    """Fill ``results`` for every certified matrix; return the indices left for the reference SVD."""
    left = list(range(len(matrices)))
    for tier, (factor, iterations) in enumerate(TIERS, start=1):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in left:
            groups.setdefault((matrices[i].shape[0], matrices[i].shape[1]), []).append(i)
        left = []
        for shape, idx in groups.items():
            p, k = min(shape), max(shape)
            subset = None if factor is None or int(factor * p) + 16 >= k else int(factor * p) + 16
            if subset is None and factor is not None:
                left.extend(idx)  # tier 1 would take every product anyway: leave it to the full tier
                continue
            per_batch = max(1, BATCH_BYTES // (8 * shape[0] * shape[1] + 8 * p * p))
            for start in range(0, len(idx), per_batch):
                chunk = idx[start : start + per_batch]
                w = torch.stack([matrices[i].to(device=device or matrices[i].device) for i in chunk])
                ok = certify_full_rank(w, dtype, rtol, subset=subset, power_iterations=iterations).tolist()
                for i, good in zip(chunk, ok):
                    if good:
                        results[i] = RankResult(p, f"certified{tier}")
                    else:
                        left.append(i)
    return sorted(left)
