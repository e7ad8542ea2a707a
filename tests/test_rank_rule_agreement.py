"""One rank rule for the audit and the kernel bases: same nullity, a residual bound every basis vector meets,
and the robustness certificate of a rank decided by an SVD, each fed a violating input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.experiments import audit, table1
from helpers.linalg import kernels, rank_rule


def _trained_like(dtype: torch.dtype) -> nn.Linear:
    """A 12 x 30 Linear layer (stored in ``dtype``) whose singular values straddle the float32 threshold: 9 well
    above it, one at 3x, one at 0.3x and one at 1e-3x the threshold ``rtol * sigma_max`` (near-null directions
    as trained weights have them), so its nullity at float32 precision is 18 + 2 and at float64 18 + 0."""
    rtol32 = rank_rule.default_rtol((12, 30), torch.float32)
    sigma = torch.cat([torch.linspace(1.0, 0.2, 9), torch.tensor([3.0, 0.3, 1e-3]) * rtol32]).double()
    w = table1.with_spectrum(12, 30, sigma, torch.Generator().manual_seed(0))
    layer = nn.Linear(30, 12, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w.to(dtype))
    return layer


def test_audit_nullity_equals_the_kernel_basis_dimension_near_the_threshold(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    layer = _trained_like(torch.float32)
    basis = kernels.kernel_basis(layer)
    a32 = audit.audit_model(layer, dtype=torch.float32, cache=False)  # the stored precision
    assert a32.nullity_w1 == basis.nullity == basis.vectors.shape[0] == 30 - 12 + 2
    a64 = audit.audit_model(layer, dtype=torch.float64, cache=False)
    exact = kernels.kernel_basis(layer, rtol=rank_rule.default_rtol((12, 30), torch.float64))
    assert a64.nullity_w1 == exact.nullity  # the same rule at float64 precision
    assert kernels.near_null_basis(layer, k=3).rank == a32.rows[0].rank  # the near-null basis uses the rule too


def test_every_basis_direction_is_within_the_residual_bound() -> None:
    layer = _trained_like(torch.float32)
    basis = kernels.kernel_basis(layer)
    bound = kernels.null_residual_bound(basis)
    smax = float(basis.singular_values.max())
    assert bound == basis.residual_bound
    assert basis.tol <= bound <= basis.tol + rank_rule.rounding_allowance((12, 30)) * smax
    w = kernels.weight_matrix(layer)
    assert float((w @ basis.flat().T).norm(dim=0).max()) <= bound
    phi = basis.random_vectors(16, torch.Generator().manual_seed(1)).reshape(16, -1)
    assert float((w @ phi.T).norm(dim=0).max()) <= bound  # any unit vector of the span
    # violating input: a direction outside the kernel (the 3x-threshold singular vector) exceeds the bound
    _, s, vh = torch.linalg.svd(w)
    outside = vh[8]  # singular value 3 * rtol * sigma_max
    assert float((w @ outside).norm()) > bound


def test_near_null_bound_is_the_largest_chosen_singular_value() -> None:
    layer = nn.Linear(8, 8, bias=False)  # square: no exact null direction
    near = kernels.near_null_basis(layer, k=2)
    s = near.singular_values
    assert near.residual_bound == pytest.approx(float(s[-2]) + rank_rule.rounding_allowance((8, 8)) * float(s[0]))
    assert float(near.residual_norms.max()) <= near.residual_bound


def test_rank_is_robust_fails_at_the_threshold() -> None:
    shape = (12, 30)
    rtol = rank_rule.default_rtol(shape, torch.float32)
    far = torch.tensor([1.0, 0.5, 0.3 * rtol], dtype=torch.float64)
    assert rank_rule.rank_is_robust(far, shape, torch.float32)
    at = torch.tensor([1.0, 0.5, rtol * (1 + 1e-14)], dtype=torch.float64)  # within the SVD's rounding
    assert rank_rule.rank_margin(at, shape, torch.float32) < rank_rule.rounding_allowance(shape)
    assert not rank_rule.rank_is_robust(at, shape, torch.float32)
    # at float64 precision an exactly null direction is inside the rounding band: ambiguous, not robust
    assert not rank_rule.rank_is_robust(torch.tensor([1.0, 0.0], dtype=torch.float64), shape, torch.float64)
    assert rank_rule.rank_margin(torch.zeros(3, dtype=torch.float64), shape, torch.float32) == float("inf")


def test_independent_rank_check_catches_a_wrong_audit_rank(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    model = nn.Sequential(_trained_like(torch.float32), nn.Linear(12, 5))
    mats = audit.weight_matrices(model)
    a32 = audit.audit_model(model, dtype=torch.float32, cache=False)
    recs = audit.independent_rank_check(mats, a32, [0, 1])
    assert [(r["audit rank"], r["numpy rank"], r["agree"], r["robust"]) for r in recs] == [
        (10, 10, True, True),
        (5, 5, True, True),
    ]
    a32.rows[0].rank = 11  # violating input: a rank the independent SVD does not confirm
    assert not audit.independent_rank_check(mats, a32, [0])[0]["agree"]
    with pytest.raises(ValueError, match="not the same model"):
        audit.independent_rank_check(mats[::-1], a32, [0])


def test_sample_matrices_always_takes_w1_and_respects_the_size_cap() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(100, 100), nn.Linear(4, 4))
    mats = audit.weight_matrices(model)
    picked = audit.sample_matrices(mats, 5, seed=0, max_entries=16)
    assert picked == [0, 1, 3]  # W1 first; the 100 x 100 matrix is above the cap
    assert audit.sample_matrices(mats, 1, seed=3, max_entries=16)[0] == 0
