"""The Sec. 6 and MNIST chapters' measurements and claims (helpers.experiments.collisions): each criterion is fed a
measurement that satisfies it and one that violates it, and the statuses come out of ``results.judge``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import stats
from helpers.book import results, verdict
from helpers.experiments import collisions
from helpers.linalg import kernels


def _statuses(claims: list[dict]) -> dict[str, str]:
    return {c["id"]: results.judge(**c).status for c in claims}


# --- Sec. 6 -------------------------------------------------------------------------------------------------------


def test_most_null_direction_prefers_an_exact_kernel_vector_over_a_near_null_one() -> None:
    """Trained weights can have near-null directions that the rank rule counts as kernel vectors: the search must
    use the exact one, or the round-off check would fail for reasons that are not round-off."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    with torch.no_grad():
        w = torch.randn(3, 6)
        w[2] = w[0] + w[1] + 1e-7 * torch.randn(6)  # sigma_min ~ 1e-7 < rtol * sigma_max (float32 rule)
        layer.weight.copy_(w)
    basis = kernels.kernel_basis(layer)
    assert basis.vectors.shape[0] == 4  # 3 exact + 1 near-null
    w64 = layer.weight.detach().double()
    assert float((w64 @ basis.vectors[0]).abs().max()) > 1e-9  # the near-null one comes first
    assert float((w64 @ collisions.most_null_direction(layer)).abs().max()) < 1e-12
    square = nn.Linear(3, 3).double()
    phi = collisions.most_null_direction(square)  # trivial kernel: the smallest singular direction
    assert float((square.weight.detach() @ phi).norm()) == pytest.approx(
        float(torch.linalg.svdvals(square.weight.detach())[-1])
    )


def test_exact_construction() -> None:
    assert collisions.exact_construction(nn.Linear(6, 2), (1, 2, 3))
    assert not collisions.exact_construction(nn.Linear(3, 3), (1, 3))  # trivial kernel
    patch = nn.Conv2d(3, 4, 2, stride=2)
    assert collisions.exact_construction(patch, (3, 8, 8))
    assert not collisions.exact_construction(patch, (3, 9, 9))  # not a whole number of patches
    assert not collisions.exact_construction(nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 8, 8))  # overlapping
    assert not collisions.exact_construction(nn.Conv2d(1, 4, 2, stride=2), (1, 4, 4))  # 4 x 4: no kernel
    square = nn.Linear(8, 8)  # a numerical kernel (sigma_min far below the rank rule's tolerance, but not 0)
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(square.weight)
        square.weight.copy_(u @ torch.diag(torch.cat([s[:-1], s[-1:] * 1e-7])) @ vh)
    assert not collisions.exact_construction(square, (1, 8))


def _curves(ratio_b: float = 1.0) -> dict[tuple[str, str], list[float]]:
    return {
        ("a", "float32"): [1e-7, 1e-6],
        ("a", "float64"): [1e-16, 1e-15],
        ("b", "float32"): [0.1, 10.0],
        ("b", "float64"): [0.1 * ratio_b, 10.0 * ratio_b],
    }


def test_precision_limited_and_ratios() -> None:
    assert collisions.precision_limited(_curves()) == {"a": True, "b": False}
    assert collisions.precision_limited(_curves(ratio_b=1e-9)) == {"a": True, "b": True}
    one_beta_off = {**_curves(ratio_b=1e-9), ("a", "float64"): [1e-16, 1e-8]}  # ratio 0.01 at one beta
    assert collisions.precision_limited(one_beta_off)["a"] is False
    ratios = collisions.precision_ratios(_curves())
    assert ratios["b"] == pytest.approx(1.0) and ratios["a"] == pytest.approx(1e-9)
    zero = {("z", "float32"): [0.0], ("z", "float64"): [0.0]}
    assert collisions.precision_ratios(zero)["z"] == math.inf and collisions.precision_limited(zero)["z"]


def _rows(e32: float = 5e-8, e64: float = 2e-16) -> list[dict]:
    return [
        {"layer": "x", "W1": "(2, 6)", "kernel vectors": 4, "max abs W1 phi, float32": e32, "float64": 1e-17},
        {"layer": "y", "W1": "(2, 6)", "kernel vectors": 4, "max abs W1 phi, float32": 1e-9, "float64": e64},
        {"layer": "z", "W1": "trivial kernel", "kernel vectors": 0, "max abs W1 phi, float32": None, "float64": None},
    ]


def test_precision_bounds() -> None:
    b = collisions.precision_bounds(_rows())
    assert (b.float32, b.layer32, b.float64, b.layer64, b.n_layers) == (5e-8, "x", 2e-16, "y", 2)
    assert "worst over 2 layers" in b.text()
    with pytest.raises(ValueError, match="no layer has a kernel"):
        collisions.precision_bounds(_rows()[2:])


@pytest.mark.parametrize(
    ("rows", "curves", "expected"),
    [
        (_rows(), _curves(ratio_b=1e-9), (verdict.REPRODUCED, verdict.REPRODUCED)),
        (_rows(e32=2e-7), _curves(), (verdict.DIFFERS, verdict.DIFFERS)),  # float32 bound broken; b geometric
        (_rows(e64=3e-15), _curves(ratio_b=1e-9), (verdict.DIFFERS, verdict.REPRODUCED)),  # float64 bound broken
    ],
)
def test_sec6_claims_are_judged_by_their_criteria(rows: list, curves: dict, expected: tuple[str, str]) -> None:
    claims = collisions.sec6_claims(
        rows, curves, bound32=1e-7, bound64=1e-15, paper_claim="precision", weights="random", trained=False
    )
    statuses = _statuses(claims)
    assert (statuses["sec6.precision_bounds"], statuses["sec6.precision_limits"]) == expected
    assert all("status" not in c for c in claims)


def test_sec6_glue() -> None:
    glued = collisions.sec6_glue(_rows(), _curves(), exact=["a"], bound32=1e-7, bound64=1e-15)
    assert glued["sec6_bounds_verdict"] == "within Sec. 6's bounds"
    assert glued["sec6_exact_max32"] == 1e-6 and glued["sec6_exact_max64"] == 1e-15
    assert "**b**" in glued["sec6_limits"] and "not limited by precision" in glued["sec6_limits"]
    broken = collisions.sec6_glue(_rows(e32=1.0), _curves(), exact=[], bound32=1e-7, bound64=1e-15)
    assert broken["sec6_bounds_verdict"] == "not within Sec. 6's bounds" and math.isnan(broken["sec6_exact_max32"])


# --- MNIST ----------------------------------------------------------------------------------------------------------


def _classifier(seed: int = 0, stride: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    conv = nn.Conv2d(1, 2, 2, stride=stride)
    n = 2 * ((4 - 2) // stride + 1) ** 2
    return nn.Sequential(conv, nn.Flatten(), nn.Linear(n, 3)).eval()


def _digits(n: int = 8) -> torch.Tensor:
    x = torch.rand((n, 1, 4, 4), generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    return (x * 255).round() / 255  # 8-bit values: a PNG round trip of x itself is exact


def test_collision_outcome_of_exact_collisions() -> None:
    model, x = _classifier(), _digits()
    exact = collisions.exact_collisions({"m": model}, x, size=2.0, generator=torch.Generator().manual_seed(0))
    o = collisions.collision_outcome(model, x, exact.collided["m"])
    assert (o.same_prediction.k, o.same_prediction.n) == (8, 8)
    assert o.confidence_change.worst < 1e-5 and o.first_layer_rel.worst < 1e-5
    assert o.outside.worst > 0  # twice the digit's norm: the colliding images leave [0, 1]
    assert o.beta_room.worst > 0 and not o.beta_room.larger_is_worse  # no pixel at 0 or 1: some room
    assert o.png_first_layer_rel.worst > 1e-3  # clipping and quantising break the collision
    same = collisions.collision_outcome(model, x, x.clone())  # x itself survives the PNG round trip
    assert same.png_same_prediction.k == 8 and same.png_first_layer_rel.worst == 0.0 and same.outside.worst == 0.0
    assert same.beta_room.worst == math.inf  # no direction: any beta
    with pytest.raises(ValueError, match="same shape"):
        collisions.collision_outcome(model, x, x[:2])


def test_collision_outcome_sees_a_broken_collision() -> None:
    """A violating input: noise outside the null space changes the first layer and (some) predictions."""
    model, x = _classifier(), _digits(64)
    noise = 5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    o = collisions.collision_outcome(model, x, x + noise)
    assert o.first_layer_rel.worst > 1.0 and o.same_prediction.k < o.same_prediction.n
    pinned = x.clone()
    pinned[:, :, 0, 0] = 0.0  # a pixel at 0: any direction pointing down there leaves no room
    d = torch.zeros_like(x)
    d[:, :, 0, 0] = -1.0
    assert collisions.collision_outcome(model, pinned, pinned + d).beta_room.worst == 0.0


def _outcome(k: int, n: int, gap: float, outside: float, png_k: int) -> collisions.CollisionOutcome:
    return collisions.CollisionOutcome(
        same_prediction=stats.Rate(k, n),
        confidence_change=stats.Spread.of([gap] * n),
        first_layer_rel=stats.Spread.of([1e-7] * n),
        outside=stats.Spread.of([outside] * n),
        beta_room=stats.Spread.of([0.0] * n, larger_is_worse=False),
        png_same_prediction=stats.Rate(png_k, n),
        png_first_layer_rel=stats.Spread.of([0.5] * n),
    )


def test_pooled_and_rows() -> None:
    outcomes = {"a": _outcome(100, 100, 1e-7, 2.0, 30), "b": _outcome(99, 100, 1e-6, 3.0, 40)}
    assert collisions.pooled(outcomes, "same_prediction") == stats.Rate(199, 200)
    assert collisions.pooled(outcomes, "outside").worst == 3.0 and collisions.pooled(outcomes, "outside").n == 200
    assert not collisions.pooled(outcomes, "beta_room").larger_is_worse
    rows = collisions.outcome_rows(outcomes)
    assert [r["model"] for r in rows] == ["a", "b"] and rows[1]["same prediction"].startswith("99/100")


def test_mnist_claims_are_judged_by_their_criteria() -> None:
    good = {"a": _outcome(100, 100, 1e-7, 0.0, 100)}
    leak = stats.Spread.of([0.5, 1.0], larger_is_worse=False)
    statuses = _statuses(collisions.mnist_claims(good, leak, paper_claim="same", weights="trained by the book"))
    assert statuses == {
        "mnist.exact_collisions": verdict.REPRODUCED,
        "mnist.same_confidence": verdict.REPRODUCED,
        "mnist.valid_images": verdict.BEYOND_HOLDS,
        "mnist.png_round_trip": verdict.BEYOND_HOLDS,
        "mnist.tiled_cnn_leaks": verdict.BEYOND_HOLDS,
    }
    bad = {"a": _outcome(100, 100, 1e-7, 0.0, 100), "b": _outcome(99, 100, 1e-2, 2.5, 30)}  # one digit flips
    no_leak = stats.Spread.of([0.5, 1e-6], larger_is_worse=False)
    claims = collisions.mnist_claims(bad, no_leak, paper_claim="same", weights="trained by the book")
    assert set(_statuses(claims).values()) == {verdict.DIFFERS, verdict.BEYOND_FAILS}
    assert "2 models × 100 test digits" in claims[0]["reason"]


def test_tiled_leak_tells_overlapping_from_tiling_windows() -> None:
    x = _digits()
    assert collisions.tiled_leak(_classifier(stride=2), x, 3.0).worst < 1e-5  # windows tile the image: exact
    overlapping = _classifier(stride=1)  # 2x2 windows, stride 1: the tiled phi is shifted in most windows
    assert collisions.tiled_leak(overlapping, x, 3.0).worst > collisions.MIN_LEAK
