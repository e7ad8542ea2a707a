"""helpers.experiments.collisions on tiny hand-built layers: the null-space builders, the colliding-twin builders,
the Sec. 6 and MNIST studies and their decision rules (exact at the first layer, inside the promised box, and a
violating input raises the documented error)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from helpers.data import normalization
from helpers.experiments import collisions
from helpers.linalg import conv_operator, kernels


def _seeded(layer: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer.reset_parameters()
    return layer.double()


def _pixels(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _rel(layer: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> float:
    with torch.no_grad():
        f, f_hat = layer(x), layer(x_hat)
    return float((f_hat - f).norm() / f.norm())


def _patch_model(std: tuple[float, ...] | None = (0.25, 0.5, 0.3)) -> normalization.PixelSpace:
    """3-channel 8x8 pixels -> 2x2 patches of 4x4 (48 pixels, 6 filters: nullity 42) -> 4 classes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(24, 4)).eval()
    return normalization.PixelSpace(net, mean=(0.5,) * 3 if std else None, std=std)


# --- null-space builders -----------------------------------------------------------------------------------------


def test_linear_perturbation_is_exact_and_checks_sizes() -> None:
    layer = _seeded(nn.Linear(12, 4))
    phi = kernels.kernel_basis(layer).vectors[0]
    p = collisions.null_space_perturbation(layer, (3, 2, 2), phi, beta=5.0)
    assert p.shape == (3, 2, 2) and p.dtype == torch.float64
    assert float(p.norm()) == pytest.approx(5.0)
    x = torch.randn(2, 12, dtype=torch.float64)
    x_hat = collisions.null_space_search(x, layer, phi, 5.0)
    assert _rel(layer, x, x_hat) < 1e-13 and float((x_hat - x).abs().max()) > 0.1
    with pytest.raises(ValueError, match="phi has 5 elements"):
        collisions.null_space_perturbation(layer, (12,), torch.zeros(5))
    with pytest.raises(ValueError, match="restricted_kernel_basis"):
        collisions.null_space_perturbation(layer, (12,), phi, region=(0, 0, 1, 1))
    with pytest.raises(ValueError, match=r"batch \(B, \.\.\.\)"):
        collisions.null_space_search(torch.zeros(12, dtype=torch.float64), layer, phi)


def test_patch_conv_search_is_exact_per_tile_and_regional() -> None:
    conv = _seeded(nn.Conv2d(2, 3, 2, stride=2))  # W1 3 x 8: nullity 5 per 2x2 patch
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    assert collisions.patch_grid(conv, x.shape[1:]) == (3, 3)
    basis = kernels.kernel_basis(conv).vectors
    per_tile = basis[torch.arange(9) % basis.shape[0]]  # a different kernel vector in each tile
    betas = torch.arange(1, 10, dtype=torch.float64).reshape(3, 3)
    x_hat = collisions.null_space_search(x, conv, per_tile, betas, region=(0, 0, 2, 3))
    assert _rel(conv, x, x_hat) < 1e-13
    assert float((x_hat - x)[..., 4:, :].abs().max()) == 0.0  # the third tile row is outside the box
    assert float((x_hat - x)[..., :4, :].abs().max()) > 0.5
    with pytest.raises(ValueError, match="beta has shape"):
        collisions.null_space_search(x, conv, basis[0], torch.ones(2, 2))
    with pytest.raises(ValueError, match="phi has shape"):
        collisions.null_space_perturbation(conv, (2, 6, 6), torch.zeros(7))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        collisions.null_space_search(x[0], conv, basis[0])


def test_patch_grid_counts_partial_and_padded_tiles() -> None:
    assert collisions.patch_grid(nn.Conv2d(1, 2, 3, stride=3), (1, 7, 9)) == (3, 3)
    assert collisions.patch_grid(nn.Conv2d(1, 2, 3, stride=2, padding=1), (1, 6, 6)) == (3, 3)


def test_region_mask_forms_and_bad_shape() -> None:
    assert collisions.region_mask((2, 3)).all() and collisions.region_mask((2, 3)).shape == (2, 3)
    box = collisions.region_mask((3, 3), (1, 0, 3, 2))
    assert box.sum() == 4 and box[1:, :2].all() and not box[0].any()
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.equal(collisions.region_mask((2, 2), mask), mask)
    with pytest.raises(ValueError, match="region mask has shape"):
        collisions.region_mask((3, 3), mask)


def test_random_collision_is_exact_at_the_requested_size() -> None:
    conv = _seeded(nn.Conv2d(1, 2, 3, stride=2, bias=False))  # overlapping: the dense operator's null space
    directions = conv_operator.exact_null_directions(conv, (1, 7, 7))
    assert directions.shape[0] >= 49 - 2 * 9
    x = torch.rand(3, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_hat = collisions.random_collision(x, directions, size=2.0, generator=torch.Generator().manual_seed(1))
    dist = (x_hat - x).flatten(1).norm(dim=1)
    assert torch.allclose(dist, 2.0 * x.flatten(1).norm(dim=1))
    with torch.no_grad():
        assert float((conv(x_hat) - conv(x)).abs().max()) < 1e-12
    with pytest.raises(kernels.TrivialKernelError, match="no exact null directions"):
        collisions.random_collision(x, directions[:0], size=1.0)


def test_feasible_beta_stays_in_the_box() -> None:
    x = _pixels((1, 2, 3, 3)).double()
    d = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    beta = collisions.feasible_beta(x, d)
    moved = x + beta * d
    assert 0 < beta < float("inf")
    assert float(moved.min()) >= -1e-12 and float(moved.max()) <= 1 + 1e-12
    assert min(float(moved.min()), 1 - float(moved.max())) < 1e-9  # it touches the box: largest such beta
    assert collisions.feasible_beta(x, torch.zeros_like(x)) == float("inf")
    assert collisions.feasible_beta(x + 2, torch.ones_like(x)) == 0.0  # already outside, pushed further
    with pytest.raises(ValueError, match="lo < hi"):
        collisions.feasible_beta(x, d, lo=1.0, hi=0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        collisions.feasible_beta(x, d[..., :2])


# --- colliding twins -----------------------------------------------------------------------------------------------


def test_headroom_keeps_twins_in_the_eps_box_and_in_range() -> None:
    clean = _pixels((1, 1, 4, 4))
    clean[0, 0, 0, 0] = 0.0
    adversarial = clean + 0.05
    adversarial[0, 0, 1, 1] = clean[0, 0, 1, 1] + 0.1  # at the budget: room below only
    lo, hi = collisions.headroom(clean, adversarial, eps=0.1, margin=0.0)
    assert (lo <= 0).all() and (hi >= 0).all() and lo.dtype == torch.float64
    for bound in (lo, hi):
        moved = adversarial.double() + bound
        assert float((moved - clean.double()).abs().max()) <= 0.1 + 1e-7
        assert float(moved.min()) >= 0 and float(moved.max()) <= 1
    assert float(hi[0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ in shape"):
        collisions.headroom(clean, adversarial[..., :2], eps=0.1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        collisions.headroom(clean, adversarial, eps=0.0)


def test_kernel_directions_are_unit_kernel_vectors_zero_on_pinned_pixels() -> None:
    model = _patch_model()
    kernel = kernels.pixel_kernel(model, (3, 8, 8))
    pinned = torch.zeros(4, kernel.dim, dtype=torch.bool)
    pinned[1, :10] = True  # patch 1: ten pixels without two-sided room
    pinned[2, :] = True  # patch 2: no room at all
    dirs = collisions.kernel_directions(kernel, pinned, 5, torch.Generator().manual_seed(0))
    assert dirs.shape == (5, 4, kernel.dim)
    assert torch.allclose(dirs[:, [0, 1, 3]].norm(dim=-1), torch.ones(5, 3, dtype=torch.float64))
    assert float(dirs[:, 1, :10].abs().max()) == 0.0 and float(dirs[:, 2].abs().max()) == 0.0
    outside = dirs - (dirs @ kernel.basis.T) @ kernel.basis  # the part outside span(basis)
    assert float(outside.abs().max()) < 1e-12
    with pytest.raises(ValueError, match=r"pinned must be \(L, 48\)"):
        collisions.kernel_directions(kernel, pinned[:, :5], 1, torch.Generator())


def test_colliding_adversarials_exact_within_eps_in_range() -> None:
    model = _patch_model()
    clean = _pixels((1, 3, 8, 8))
    adversarial = clean + 0.01 * torch.sign(torch.randn(clean.shape, generator=torch.Generator().manual_seed(3)))
    eps = 0.04
    twins = collisions.colliding_adversarials(model, clean, adversarial.clamp(0, 1), eps=eps, n=6, seed=0)
    assert twins.images.shape == (6, 3, 8, 8) and twins.images.dtype == torch.float32
    assert float((twins.images - clean).abs().max()) <= eps + 1e-6
    assert float(twins.images.min()) >= 0 and float(twins.images.max()) <= 1
    assert (twins.perturbations.flatten(1).abs().amax(1) > 1e-3).all()
    conv = model.model[0]
    z = (twins.images - model.mean.view(1, 3, 1, 1)) / model.std.view(1, 3, 1, 1)
    z_adv = (twins.adversarial - model.mean.view(1, 3, 1, 1)) / model.std.view(1, 3, 1, 1)
    assert _rel(conv, z_adv.expand(6, -1, -1, -1), z) < 1e-5  # float32 round-off: exact at the first layer
    with pytest.raises(normalization.PixelInputError, match=r"pixels in \[0, 1\]"):
        collisions.colliding_adversarials(model, clean * 3, adversarial, eps=eps)
    with pytest.raises(normalization.PixelInputError, match="n must be >= 1"):
        collisions.colliding_adversarials(model, clean, adversarial.clamp(0, 1), eps=eps, n=0)
    with pytest.raises(normalization.PixelInputError, match=r"both be \(1, C, H, W\)"):
        collisions.colliding_adversarials(model, clean.expand(2, -1, -1, -1), clean.expand(2, -1, -1, -1), eps=eps)


def test_describe_colliding_reports_and_flags_a_twin_outside_eps() -> None:
    model = _patch_model()
    clean = _pixels((1, 3, 8, 8))
    twins, report = collisions.colliding_report(model, clean, clean.clone(), eps=0.05, n=4, seed=1)
    assert report == {**collisions.describe_colliding(model, twins), "seconds": report["seconds"]}
    assert report["n"] == report["distinct"] == report["keep_adversarial_prediction"] == 4
    assert report["within_eps"] and report["in_range"] and report["max_rel_output_change"] < 1e-5
    assert not report["adversarial_differs_from_clean"]
    far = collisions.CollidingSet(
        clean, clean, (clean + 0.2).clamp(0, 1), torch.zeros(1), 0.05, twins.kernel, seconds=0.0
    )
    bad = collisions.describe_colliding(model, far)
    assert not bad["within_eps"] and bad["max_linf_to_clean"] > 0.05


def test_tiled_twin_exact_on_patches_leaks_on_overlaps() -> None:
    clean = _pixels((1, 3, 8, 8))
    adversarial = (clean + 0.01).clamp(0, 1)
    twin, res = collisions.tiled_twin(_patch_model(), clean, adversarial, eps=0.03, seed=0)
    assert res["first_layer_rel"] < 1e-5 and res["beta"] > 0
    assert res["linf_to_clean"] <= 0.03 + 1e-6 and float(twin.min()) >= 0 and float(twin.max()) <= 1
    torch.manual_seed(0)
    overlapping = normalization.PixelSpace(nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Flatten()))
    _, leak = collisions.tiled_twin(overlapping, clean, adversarial, eps=0.03, seed=0)
    assert leak["first_layer_rel"] > 1e-4
    with pytest.raises(normalization.PixelInputError, match=r"pixels in \[0, 1\]"):
        collisions.tiled_twin(overlapping, clean - 1, adversarial, eps=0.03)


def test_random_kernel_perturbation_is_invisible_and_unit_linf() -> None:
    model = _patch_model(std=None)
    kernel = kernels.pixel_kernel(model, (3, 8, 8))
    p = collisions.random_kernel_perturbation(kernel, (3, 8, 8), seed=0)
    assert p.shape == (1, 3, 8, 8) and float(p.abs().max()) == pytest.approx(1.0)
    x = _pixels((1, 3, 8, 8))
    assert _rel(model.model[0], x, x + 0.05 * p) < 1e-5
    with pytest.raises(ValueError, match="does not fit the kernel"):
        collisions.random_kernel_perturbation(kernel, (1, 8, 8))
    with pytest.raises(ValueError, match="does not fit the kernel"):
        collisions.random_kernel_perturbation(kernel, (3, 6, 8))


def test_first_exact_model_skips_trivial_kernels() -> None:
    torch.manual_seed(0)
    square = nn.Sequential(nn.Conv2d(1, 4, 2, stride=2), nn.Flatten())  # 4 x 4: trivial kernel
    patch = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.Flatten())  # 2 x 4: nullity 2
    models = {"square": square, "patch": patch}
    chosen = collisions.first_exact_model(models.__getitem__, ["square", "patch"], (1, 4, 4))
    assert chosen.name == "patch" and chosen.kernel.nullity == 2 and list(chosen.skipped) == ["square"]
    with pytest.raises(kernels.TrivialKernelError, match="square"):
        collisions.first_exact_model(models.__getitem__, ["square"], (1, 4, 4))


# --- Sec. 6 -------------------------------------------------------------------------------------------------------


def test_first_layers_search_direction_and_layer_batch() -> None:
    torch.manual_seed(0)
    loaded = {"a": SimpleNamespace(model=nn.Sequential(nn.Flatten(), nn.Linear(8, 3)))}
    layers = collisions.first_layers(loaded.__getitem__, ["a"])
    assert isinstance(layers["a"], nn.Linear)
    assert collisions.layer_batch(layers["a"], torch.zeros(2, 2, 2, 2)).shape == (2, 8)
    assert collisions.layer_batch(nn.Conv2d(2, 1, 1), torch.zeros(2, 2, 2, 2)).shape == (2, 2, 2, 2)
    wide = _seeded(nn.Linear(6, 2))
    assert float((wide.weight.detach() @ collisions.search_direction(wide)).abs().max()) < 1e-12
    square = _seeded(nn.Linear(4, 4))
    phi = collisions.search_direction(square)  # trivial kernel: the smallest singular direction instead
    assert float((square.weight.detach() @ phi).norm()) == pytest.approx(
        float(torch.linalg.svdvals(square.weight.detach())[-1])
    )


def test_residual_curves_round_off_on_patches_geometric_on_overlaps() -> None:
    layers = {"patch": nn.Conv2d(3, 4, 2, stride=2), "overlap": nn.Conv2d(3, 4, 3, stride=2, padding=1)}
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    betas = [0.1, 10.0]
    curves = collisions.residual_curves(layers, {"patch": x, "overlap": x}, betas)
    assert set(curves) == {(n, dt) for n in layers for dt in ("float32", "float64")}
    assert max(curves[("patch", "float32")]) < 1e-4 and max(curves[("patch", "float64")]) < 1e-12
    c32, c64 = curves[("overlap", "float32")], curves[("overlap", "float64")]
    assert min(c64) > 1e-6 and c32[-1] == pytest.approx(c64[-1], rel=1e-3) and c64[1] > c64[0]
    requirements = collisions.sec6_requirements(curves, exact=["patch"])
    assert all(r.ok for r in requirements) and len(requirements) == 1
    swapped = collisions.sec6_requirements(curves, exact=["overlap"])
    assert not any(r.ok for r in swapped)  # an overlapping conv is not at round-off: the check fails
    rows = collisions.curve_rows(curves, betas)
    assert rows[0] == {"layer": "patch", "dtype": "float32", "beta=0.1": curves[("patch", "float32")][0],
                       "beta=10": curves[("patch", "float32")][1]}  # fmt: skip
    fig = collisions.residual_curves_figure(curves, betas)
    assert isinstance(fig, plt.Figure) and len(fig.axes[0].lines) == 4
    plt.close(fig)


def test_kernel_precision_rows() -> None:
    layers = {"wide": _seeded(nn.Linear(6, 2)), "square": _seeded(nn.Linear(3, 3))}
    wide, square = collisions.kernel_precision_rows(layers)
    assert wide["W1"] == "(2, 6)" and wide["float64"] < 1e-14 and wide["max abs W1 phi, float32"] < 1e-5
    assert wide["kernel vectors"] == 4
    assert square == {"layer": "square", "W1": "trivial kernel", "kernel vectors": 0,
                      "max abs W1 phi, float32": None, "float64": None}  # fmt: skip


# --- MNIST: exact collisions of trained models ----------------------------------------------------------------------


def _tiny_classifier(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_exact_collisions_confidence_and_rules() -> None:
    models = {"a": _tiny_classifier(0), "b": _tiny_classifier(1)}
    x = _pixels((3, 1, 4, 4))
    exact = collisions.exact_collisions(models, x, size=2.0, generator=torch.Generator().manual_seed(0))
    assert exact.directions["a"].shape == (8, 1, 4, 4)  # nullity 2 per patch, 4 patches
    assert exact.collided["a"].dtype == torch.float32 and exact.collided["a"].shape == x.shape
    for k in models:
        assert exact.residuals[f"{k}, float32"]["first_layer_rel"] < 1e-5
        assert exact.residuals[f"{k}, float64"]["first_layer_rel"] < 1e-12
        assert exact.residuals[f"{k}, float32"]["same_argmax"] == 1.0
    gaps = {k: collisions.confidence_gap(m, x, exact.collided[k]) for k, m in models.items()}
    assert max(gaps.values()) < 1e-5
    p, y = collisions.confidence(models["a"], x)
    assert p.shape == y.shape == (3,) and ((p > 1 / 3) & (p <= 1)).all()
    assert all(r.ok for r in collisions.exact_collision_requirements(exact.residuals, list(models)))
    broken = {**exact.residuals, "b, float64": {**exact.residuals["b, float64"], "first_layer_rel": 1e-9}}
    failed = [r.what for r in collisions.exact_collision_requirements(broken, list(models)) if not r.ok]
    assert failed == ["b: first-layer residual at round-off (float32 < 1e-05, float64 < 1e-12)"]
    with pytest.raises(ValueError, match="same shape"):
        collisions.confidence_gap(models["a"], x, x[:2])
    injective = {"c": nn.Sequential(nn.Conv2d(1, 4, 2, stride=2), nn.Flatten()).eval()}  # 4 x 4: no null direction
    with pytest.raises(kernels.TrivialKernelError):
        collisions.exact_collisions(injective, x)
    fig = collisions.confidence_figure(models, x, exact.collided, n_show=2)
    assert isinstance(fig, plt.Figure) and sum(bool(ax.get_title()) for ax in fig.axes) == 8
    plt.close(fig)


def test_zoo_rows() -> None:
    trained = {"mlp": SimpleNamespace(model=nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), test_accuracy=0.9,
                                      train_seconds=1.5, from_cache=True)}  # fmt: skip
    (row,) = collisions.zoo_rows(trained)
    assert row["model"] == "mlp" and row["first layer"].startswith("Linear(in_features=4")
    assert row["test accuracy"] == 0.9 and row["cached"] is True
