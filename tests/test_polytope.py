"""Li et al.'s losses, the vertex search, convex sampling and the patch composition (helpers.polytope)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers.data import photos
from helpers.experiments import patch_composition
from helpers.experiments import polytope as P

from .conftest import needs_mnist


def tiny_relu_net() -> nn.Sequential:
    """6 inputs -> 4 ReLU units -> 2 logits, weights set by hand.

    For the target x_t below, units 0 and 1 are active (pre 0.5 and 0.3) and units 2 and 3 inactive (-0.7, -0.7).
    Pushing unit 2 (= x2 - x3 - 0.5) down over the box [0, 1]^6 ends at x2 = 0, x3 = 1: pre-activation -1.5.
    """
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(
            torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, -1, 0, 0], [0, 0, 0, 0, 1, -1]])
        )
        net[1].bias.copy_(torch.tensor([0.0, 0, -0.5, -0.2]))
        net[3].weight.copy_(torch.tensor([[1.0, -1, 0.5, 0.5], [-1.0, 1, 0.2, 0.1]]))
        net[3].bias.zero_()
    return net.eval()


TARGET = torch.tensor([0.5, 0.3, 0.2, 0.4, 0.1, 0.6]).view(1, 1, 2, 3)
CONFIG = P.SearchConfig(alpha=100.0, steps=600, lr=0.05)


@pytest.fixture(scope="module")
def split() -> P.ReluSplit:
    return P.split_sequential(tiny_relu_net(), 2, (1, 2, 3))


@pytest.fixture(scope="module")
def polytope(split: P.ReluSplit) -> P.Polytopes:
    return P.find_polytopes(split, TARGET, TARGET, n_vertices=2, config=CONFIG, progress=False)


def test_split_reproduces_the_model(split: P.ReluSplit) -> None:
    x = torch.rand(7, 1, 2, 3)
    assert torch.allclose(split.logits(x), tiny_relu_net()(x))
    assert split.n_units == 4
    assert torch.allclose(P.pre_activations(split, TARGET), torch.tensor([[0.5, 0.3, -0.7, -0.7]]))


def test_losses_by_hand() -> None:
    target = torch.tensor([[1.0, 2.0, -1.0, -3.0]])
    pre_u = torch.tensor([[1.5, 1.0, 0.4, -2.0]])
    l_plus, l_i = P.li_losses(pre_u, target, torch.tensor([3]))
    assert l_plus.item() == pytest.approx(0.5**2 + 1.0**2)  # active units 0, 1
    assert l_i.item() == pytest.approx(-2.0 + 0.4)  # pushed unit 3, hinge on the other inactive unit 2
    _, l_i2 = P.li_losses(pre_u, target, torch.tensor([2]))
    assert l_i2.item() == pytest.approx(0.4 + 0.0)  # unit 3 is negative: no hinge cost


def test_vertices_satisfy_proposition_1(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    assert polytope.units.tolist() == [[2, 3]]
    vertices = polytope.vertices[0]
    assert vertices.min() >= 0 and vertices.max() <= 1
    pre = P.pre_activations(split, vertices)
    res = P.prop1_residuals(pre, polytope.target_pre.expand_as(pre))
    assert res["eq_max_abs"].max() < 1e-2  # equalities on the active units
    assert res["ineq_max"].max() < 1e-3  # inequalities on the inactive units
    assert res["pattern"].min() == 1.0
    assert pre[0, 2].item() == pytest.approx(-1.5, abs=2e-2)  # the box-constrained minimum of unit 2
    assert pre[1, 3].item() == pytest.approx(-1.2, abs=2e-2)  # unit 3: x4 = 0, x5 = 1


def test_search_from_another_start_reaches_the_polytope(split: P.ReluSplit) -> None:
    start = torch.full_like(TARGET, 0.9)
    polys = P.find_polytopes(split, TARGET, start, n_vertices=2, config=CONFIG, progress=False)
    pre = P.pre_activations(split, polys.vertices[0])
    res = P.prop1_residuals(pre, polys.target_pre.expand_as(pre))
    assert res["eq_rel"].max() < 2e-2 and res["ineq_max"].max() < 1e-3
    assert polys.seconds_per_vertex() == pytest.approx(polys.seconds / 2)
    assert polys.distances_to(start).item() == pytest.approx((polys.vertices[0] - start).flatten(1).norm(dim=1).mean())
    with pytest.raises(ValueError, match="points must be"):
        polys.distances_to(start[0])


def test_convex_combinations_keep_the_activation_pattern(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    vertices = polytope.vertices[0]
    samples, weights = P.convex_samples(vertices, 500, torch.Generator().manual_seed(0))
    assert samples.shape == (500, 1, 2, 3) and torch.allclose(weights.sum(1), torch.ones(500))
    assert weights.min() >= 0
    pre_s = P.pre_activations(split, samples)
    pre_v = P.pre_activations(split, vertices)
    target = polytope.target_pre.expand_as(pre_s)
    res_s = P.prop1_residuals(pre_s, target)
    res_v = P.prop1_residuals(pre_v, target[: len(pre_v)])
    # the cut is affine in the input: samples are never worse than the worst vertex
    assert res_s["act_rel"].max() <= res_v["act_rel"].max() + 1e-6
    assert res_s["ineq_max"].max() <= res_v["ineq_max"].max() + 1e-6
    assert res_s["pattern"].min() == 1.0
    report = P.measure_polytope(split, TARGET[0], vertices, 300, torch.Generator().manual_seed(1))
    assert report["same_class_pct"] == 100.0 and report["samples"]["act_rel"]["max"] < 2e-2


def test_bad_inputs_raise_clear_errors(split: P.ReluSplit) -> None:
    target = torch.tensor([[1.0, -1.0]])
    with pytest.raises(ValueError, match="inactive"):
        P.li_losses(torch.zeros(1, 2), target, torch.tensor([0]))
    with pytest.raises(ValueError, match="match the pre-activations' shape"):
        P.li_losses(torch.zeros(2, 2), target, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="long tensor"):
        P.li_losses(torch.zeros(1, 2), target, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 2, 3\)"):
        P.find_polytopes(split, torch.zeros(1, 6), torch.zeros(1, 6), progress=False)
    with pytest.raises(ValueError, match="give the starting inputs"):
        P.find_polytopes(split, TARGET, None, progress=False)
    with pytest.raises(ValueError, match="one start per target"):
        P.find_polytopes(split, TARGET, TARGET.repeat(2, 1, 1, 1), n_vertices=1, progress=False)
    with pytest.raises(ValueError, match="n_vertices must be between 1 and .* \\(2\\)"):
        P.find_polytopes(split, TARGET, TARGET, n_vertices=3, progress=False)
    with pytest.raises(ValueError, match="vertices must be"):
        P.convex_samples(torch.zeros(3), 10)
    with pytest.raises(ValueError, match=">= 1"):
        P.convex_samples(torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="valid ReLU positions: \\[2\\]"):
        P.split_sequential(tiny_relu_net(), 1, (1, 2, 3))
    with pytest.raises(ValueError, match="eval mode"):
        P.split_sequential(tiny_relu_net().train(), 2, (1, 2, 3))
    with pytest.raises(ValueError, match="alpha > 0"):
        P.SearchConfig(alpha=0)
    with pytest.raises(ValueError, match="at least two"):
        P.mean_pairwise_distance(torch.zeros(1, 3))


def test_mean_pairwise_distance() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert P.mean_pairwise_distance(x) == pytest.approx(10 / 3)
    assert P.mean_pairwise_distance(x, scale=255) == pytest.approx(850)


def test_active_counts() -> None:
    rows = P.active_counts(tiny_relu_net(), TARGET)
    assert rows == [
        {
            "relu_index": 2,
            "layer": "Linear",
            "units": 4,
            "active_mean": 2.0,
            "active_max": 2,
            "d": 6,
            "n_plus_below_d": True,
        }
    ]


class TinyVGG(nn.Module):
    """features / avgpool / classifier like torchvision's VGG, small."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(16, 8),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(8, 8),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_vgg_fc6_split_and_search() -> None:
    torch.manual_seed(0)
    model = TinyVGG().eval()
    split = P.split_vgg_fc6(model, lambda u: u - 0.5, size=8)
    x = torch.rand(3, 3, 8, 8)
    assert torch.allclose(split.logits(x), model(x - 0.5), atol=1e-6)
    polys = P.find_polytopes(split, x[:1], x[1:2], n_vertices=2, config=P.SearchConfig(steps=5), progress=False)
    assert polys.vertices.shape == (1, 2, 3, 8, 8)
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the search
    with pytest.raises(ValueError, match="no 'features'"):
        P.split_vgg_fc6(nn.Linear(2, 2), lambda u: u)


def test_patches_nearest_neighbours_and_composition() -> None:
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bank = patch_composition.extract_patches(image, 8, 4)
    assert bank.shape == (3 * 5, 3, 8, 8)
    tiles = patch_composition.grid_patches(image.float() / 255, 8)
    assert tiles.shape == (6, 3, 8, 8)
    idx, dist = patch_composition.nearest_patches(
        tiles, bank, k=3, chunk=4
    )  # chunks smaller than the bank: merging is exercised
    brute = torch.cdist(tiles.flatten(1), bank.float().flatten(1) / 255)
    assert torch.allclose(dist, brute.topk(3, largest=False).values, atol=1e-4)
    assert dist[:, 0].max() < 1e-4  # every tile is itself a bank patch
    comp = patch_composition.build_composition(image.float() / 255, bank, k=3, size=8)
    theta = torch.zeros(2, *comp.param_shape)
    theta[:, :, 0] = 50.0  # all weight on the nearest patch: the image itself
    assert torch.allclose(comp.decode(theta)[0], image.float() / 255, atol=1e-4)
    assert torch.allclose(comp.coefficients(theta).sum(2), torch.ones(2, 6, 8, 8))
    with pytest.raises(ValueError, match="patch coefficients must be"):
        comp.decode(torch.zeros(2, 6, 3, 8))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        patch_composition.grid_patches(torch.zeros(3, 10, 8), 8)
    with pytest.raises(ValueError, match="k must be between"):
        patch_composition.nearest_patches(tiles, bank, k=100)
    vertices = comp.decode(torch.randn(3, *comp.param_shape))
    change = patch_composition.location_change(vertices, comp.grid, 8)
    assert change.shape == (2, 3)
    boxes = patch_composition.changed_boxes(vertices, comp.grid, 8, top=2)
    i = int(change.flatten().argmax())
    assert boxes[0] == (i // 3 * 8, i % 3 * 8, 8, 8) and len(boxes) == 2


def test_sample_images() -> None:
    arr = photos.sample_image("camera")
    assert arr.shape == (512, 512, 3) and arr.dtype.name == "uint8"
    pixels = photos.sample_pixels("motorcycle_left", 64)
    assert pixels.shape == (3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1
    with pytest.raises(ValueError, match="valid: astronaut"):
        photos.sample_image("nonexistent")


@needs_mnist
def test_cli_random_weights(capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.cli import main

    rc = main(
        [
            "polytope",
            "mnist_mlp_2x256",
            "--weights",
            "random",
            "--device",
            "cpu",
            "--steps",
            "30",
            "--samples",
            "50",
            "--vertices",
            "2",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["weights"] == "random" and report["report"]["n_samples"] == 50
    assert report["steps"] == 30 and 0 <= report["same_class_pct"] <= 100
    assert main(["polytope", "lenet5", "--weights", "random", "--device", "cpu", "--target", "99999"]) == 2


def test_figure_and_sweep(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    configs = [P.SearchConfig(steps=n, lr=0.05) for n in (5, 50)]
    sweep = P.distance_sweep(split, TARGET, TARGET, configs, 2, progress=False)
    assert [r["steps"] for r in sweep] == [5, 50] and sweep[1]["vertex_distance"] >= sweep[0]["vertex_distance"]
    assert sweep[0]["to_start"] == pytest.approx(sweep[0]["to_target"])
    row = {
        "label": "x",
        "target": TARGET[0],
        "start": TARGET[0],
        "vertices": polytope.vertices[0],
        "samples": polytope.vertices[0][:1],
        "boxes": [(0, 0, 1, 1)],
    }
    for difference in (False, True):
        fig = P.polytope_figure([row, dict(row, start=None)], difference=difference)
        assert len(fig.axes) == 2 * 6


def test_measure_polytopes_rows(split: P.ReluSplit, polytope: P.Polytopes) -> None:
    reports = P.measure_polytopes(split, TARGET, polytope, 50, torch.Generator().manual_seed(0), progress=False)
    row = P.table_row(reports[0], image_distance=2.0)
    assert row["ratio_pct"] == pytest.approx(50 * reports[0]["vertex_distance"])
    assert P.timing_row("tiny", polytope, "cpu")["vertices"] == 2
    with pytest.raises(ValueError, match="one target per polytope"):
        P.measure_polytopes(split, TARGET.repeat(2, 1, 1, 1), polytope, 10)
