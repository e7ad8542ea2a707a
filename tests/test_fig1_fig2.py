"""The checks and measurements of the Fig. 1 / Fig. 2 chapters: each check passes on a valid input and fails on a
violating one (helpers.linalg.conv_operator, helpers.experiments.collision_figures)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from helpers.experiments import collision_figures, collisions
from helpers.linalg import conv_operator, kernels


def _linear_with_singular_values(sigmas: list[float], cols: int) -> nn.Linear:
    """A float64 Linear layer (len(sigmas) x cols) with the given singular values."""
    gen = torch.Generator().manual_seed(0)
    rows = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    layer = nn.Linear(cols, rows, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v[:, :rows].T)
    return layer


def test_null_residual_check_accepts_a_near_null_direction_and_rejects_a_visible_one() -> None:
    layer = _linear_with_singular_values([1.0, 0.5, 1e-5], 3)  # square: only a near-null direction
    basis = kernels.kernel_basis(layer, rtol=1e-4)  # the rule counts sigma = 1e-5 <= 1e-4 as null
    assert basis.vectors.shape[0] == 1 and float(basis.residual_norms.max()) > 1e-6  # not an exact zero
    ok, worst = conv_operator.null_residuals_within_rule(layer, basis.vectors, basis.tol)
    assert ok and worst <= basis.tol
    visible = kernels.near_null_basis(layer, 2).vectors[:1]  # sigma = 0.5: not null
    ok, worst = conv_operator.null_residuals_within_rule(layer, visible, basis.tol)
    assert not ok and abs(worst - 0.5) < 1e-9


def test_perturbation_check_passes_for_patch_kernel_tiles_and_fails_for_overlapping_windows() -> None:
    torch.manual_seed(0)
    patch = nn.Conv2d(3, 4, 2, stride=2)  # non-overlapping windows: tiled kernel vectors are invisible
    basis = kernels.kernel_basis(patch)
    p = collisions.null_space_perturbation(patch, (3, 8, 8), basis.vectors[0], 3.0)
    assert conv_operator.perturbation_within_rule(patch, p, basis.tol)[0]
    overlap = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 3x3 stride 2: tiling leaks
    obasis = kernels.kernel_basis(overlap)
    q = collisions.null_space_perturbation(overlap, (3, 9, 9), obasis.vectors[0], 3.0)
    ok, ratio = conv_operator.perturbation_within_rule(overlap, q, obasis.tol)
    assert not ok and ratio > 100 * obasis.tol


def test_spectrum_check_fails_for_another_layer() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 5, stride=2, padding=2)
    spectrum = conv_operator.polyphase_spectrum(conv, (3, 12, 12))
    assert conv_operator.spectrum_matches_direct(conv, spectrum)[0]
    other = nn.Conv2d(3, 8, 5, stride=2, padding=2)
    ok, gap = conv_operator.spectrum_matches_direct(other, spectrum)
    assert not ok and gap > 1e-3


def test_sigma_min_dense_and_lanczos_agree_and_evidence_check_catches_violations() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
    exact = conv_operator.sigma_min_dense(conv, (3, 12, 12))
    a = conv_operator.dense_operator(conv, (3, 12, 12))
    assert abs(exact - float(torch.linalg.svdvals(a).min())) < 1e-10
    sigma, residual = conv_operator.sigma_min_iterative(conv, (3, 12, 12), shift=float(torch.linalg.svdvals(a)[0]))
    assert abs(sigma - exact) < 1e-6 * exact and residual < 1e-6
    gains, _ = conv_operator.boundary_near_null(conv, (3, 12, 12), k=1, crop=6)
    evidence = conv_operator.injectivity_evidence(conv, (3, 12, 12), (6, 8), shift=1.0, corner=float(gains[0]))
    assert evidence.consistent()[0]
    too_low_corner = dataclasses.replace(evidence, corner_at={n: 0.5 * v for n, v in evidence.exact.items()})
    assert not too_low_corner.consistent()[0]
    not_converged = dataclasses.replace(evidence, iterative=2 * evidence.corner)
    assert not not_converged.consistent()[0]
    big_residual = dataclasses.replace(evidence, residual=1e-2)
    assert not big_residual.consistent()[0]


class _Tiny(nn.Module):
    """A pixel classifier with a patch-embedding first conv (stride = kernel), for collide_set."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.head = nn.Linear(4 * 4 * 4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x)).flatten(1))


def test_collide_set_measures_an_exact_collision_per_image_and_the_float_paths_check() -> None:
    torch.manual_seed(0)
    model = _Tiny().eval()
    basis = kernels.kernel_basis(model.embed)
    pixels = 0.25 + 0.5 * torch.rand(5, 3, 16, 16)
    p = collisions.null_space_perturbation(model.embed, (3, 16, 16), basis.vectors[0], 0.05)
    s = collision_figures.collide_set(model, model.embed, pixels, p, [f"im{i}" for i in range(5)])
    assert s.first_layer_rel.shape == (5,) and float(s.first_layer_rel.max()) < 1e-5
    assert float(s.first_layer_rel64.max()) < 1e-12
    assert s.rate("same_top5").k == 5 and s.rate("inside").k == 5
    assert bool((s.scale_hi >= 1).all())  # the perturbation fits: a multiple >= 1 keeps every pixel inside
    assert s.float_paths_agree()[0]
    broken = dataclasses.replace(s, first_layer_rel=s.first_layer_rel + 0.1)  # the two paths disagree
    assert not broken.float_paths_agree()[0]
    rows = collision_figures.validity_rows({"tiny": s})
    assert rows[0]["inside [0, 1]"].startswith("5/5")


def test_collide_set_reports_pixels_outside_the_unit_range() -> None:
    torch.manual_seed(0)
    model = _Tiny().eval()
    basis = kernels.kernel_basis(model.embed)
    pixels = torch.ones(2, 3, 16, 16)  # saturated: any perturbation pushes some pixel out
    p = collisions.null_space_perturbation(model.embed, (3, 16, 16), basis.vectors[0], 1.0)
    s = collision_figures.collide_set(model, model.embed, pixels, p, ["a", "b"])
    assert s.rate("inside").k == 0 and float(s.outside.min()) > 0 and float(s.scale_hi.max()) == 0.0
    assert float(s.png_first_layer_rel.min()) > 1e-3  # clipping breaks the exact collision


def test_conclusions_follow_the_numbers() -> None:
    assert "trivial kernel" in collision_figures.periodic_conclusion(12, 12)
    assert "kernel of dimension 2" in collision_figures.periodic_conclusion(10, 12)
    ev = conv_operator.InjectivityEvidence((3, 8, 8), {8: 0.3}, {8: 0.31}, 0.3, 1e-9, 0.31)
    assert "far above" in collision_figures.operator_conclusion(ev, 1.0, 1e-5)
    tiny = dataclasses.replace(ev, exact={8: 1e-7}, iterative=1e-7)
    assert "reaches" in collision_figures.operator_conclusion(tiny, 1.0, 1e-5)
