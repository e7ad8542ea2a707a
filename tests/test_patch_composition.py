"""Li et al.'s patch composition: patches, exact k-NN, mixtures, the Table 5 indicator and chapter 09's claims."""

from __future__ import annotations

import pytest
import torch

from helpers.book import results
from helpers.data import paper
from helpers.experiments import patch_composition
from helpers.experiments import polytope as P


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


def test_retrieval_check_passes_and_fails() -> None:
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    bank = patch_composition.extract_patches(image, 8, 4)
    query = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    comp = patch_composition.build_composition(query, bank, k=3, size=8)
    assert patch_composition.retrieval_is_exact(query, bank, comp, 8, n_tiles=4)
    comp.distances = comp.distances.clone()
    comp.distances[0, 1] += 0.1  # a retrieval that missed a nearer patch
    assert not patch_composition.retrieval_is_exact(query, bank, comp, 8)


def test_patch_figure_rows_mark_the_changed_tiles() -> None:
    vertices = torch.zeros(2, 3, 3, 16, 16)
    vertices[:, 1, :, 8:, :8] = torch.rand(3, 8, 8)  # polytope 1: its vertices differ in tile (1, 0) only
    polys = P.Polytopes(
        vertices,
        vertices,
        torch.zeros(2, 3),
        torch.zeros(2, 4),
        torch.zeros(2, 3, 16, 16),
        torch.ones(1),
        1.0,
        P.SearchConfig(),
    )
    reports = [{"samples_kept": vertices[k][:1]} for k in range(2)]
    targets = torch.ones(2, 3, 16, 16)
    rows = patch_composition.figure_rows(polys, reports, targets, ["row 1", "row 2"], (2, 2), 8)
    assert [r["label"] for r in rows] == ["row 1", "row 2"] and len(rows[0]["boxes"]) == 3
    assert rows[1]["boxes"][0] == (8, 0, 8, 8)  # (top, left, height, width) of tile (1, 0)
    assert torch.equal(rows[1]["vertices"], vertices[1]) and torch.equal(rows[1]["target"], targets[1])
    assert len(P.polytope_figure(rows).axes) == 2 * 7  # target, start, 3 vertices, 1 sample, indicator


def table_row(**changes: float) -> dict:
    """A ``polytope.table_row`` of a polytope that reproduces Li et al.'s Table 4 (override fields to break it)."""
    row = {"same_class_pct": 100.0, "same_class_k": 2000, "n_samples": 2000, "target_prob": 0.99, "sample_prob": 0.99}
    row |= {"image_distance": 37000.0, "vertex_distance": 5000.0, "ratio_pct": 13.5, "vertex_eq_rel_max": 1e-3}
    row |= {"sample_act_rel_max": 1e-3, "png_same_class_k": 8, "png_n": 8, "png_act_rel_max": 2e-3}
    return row | changes


def statuses(claims: list[dict], trained: bool = True) -> dict[str, str]:
    return {c["id"]: results.judge(**c, trained=trained).status for c in claims}


def test_vgg_claims_reproduced_differs_below_budget_and_not_checkable() -> None:
    from helpers.book import verdict

    li = paper.get("li")
    good = patch_composition.vgg_claims(li, [table_row()] * 3, [table_row(), table_row()], 14, 1234, (500, 500))
    assert [c["id"] for c in good] == [
        "li.vgg16.same_class",
        "li.vgg16.confidence",
        "li.vgg16.distance_ratio",
        "li.vgg16.fc6_collision",
        "li.patches.same_class",
        "li.vgg16.png_round_trip",
    ]
    status = statuses(good)
    assert status.pop("li.vgg16.png_round_trip") == verdict.BEYOND_HOLDS
    assert set(status.values()) == {verdict.REPRODUCED}
    assert good[2]["reason"].startswith("image distance from 14 photos, not ImageNet") and good[2]["paper"] == "12-24"
    assert good[4]["reason"].startswith("1,234 patches from sample images, exact k-NN")
    # violating inputs: a sample of another class, a low probability of the target's class, a large polytope
    pixel = [table_row(same_class_k=1999, sample_prob=0.5, ratio_pct=30.0, sample_act_rel_max=0.5)]
    bad = statuses(patch_composition.vgg_claims(li, pixel, [table_row(same_class_k=1900)] * 2, 14, 10, (500, 500)))
    assert (
        set(bad.values()) == {verdict.DIFFERS, verdict.BEYOND_HOLDS} and bad["li.vgg16.same_class"] == verdict.DIFFERS
    )
    few = [table_row(n_samples=24, same_class_k=24)]
    small = statuses(patch_composition.vgg_claims(li, few, few * 2, 14, 10, (10, 6)))
    assert small.pop("li.vgg16.png_round_trip") == verdict.BEYOND_HOLDS
    assert set(small.values()) == {verdict.BELOW_BUDGET}
    random = statuses(patch_composition.vgg_claims(li, few, few * 2, 14, 10, (10, 6)), trained=False)
    assert random.pop("li.vgg16.fc6_collision") == verdict.BELOW_BUDGET  # decided for any weights
    assert set(random.values()) == {verdict.NOT_CHECKABLE}
