"""Li et al.'s patch composition (their Sec. 4): images made of real image patches, searched over mixing weights.

A patch bank (``patch_bank``: every size x size window of some sample images, uint8 (P, 3, s, s)) is searched
exactly for the k nearest patches of each tile of a starting image (``nearest_patches``, ``build_composition``).
A ``PatchComposition`` maps softmax logits θ (B, L, k, s, s) to images: at every pixel of every tile a convex
mixture of the tile's k candidates. ``helpers.experiments.polytope.find_polytopes`` searches over θ with
``decode=composition.decode``; ``changed_boxes`` marks where a polytope's vertices differ (Li et al.'s Table 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from helpers.book import verdict
from helpers.data.photos import resized_pixels, sample_image
from helpers.experiments import polytope, polytope_study


def extract_patches(image: Tensor, size: int, stride: int) -> Tensor:
    """All size x size patches of an image (C, H, W) on a sliding window with ``stride``: (P, C, size, size)."""
    if image.dim() != 3 or image.shape[1] < size or image.shape[2] < size:
        raise ValueError(f"image must be (C, H, W) with H, W >= patch size {size}, got {tuple(image.shape)}")
    if size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be >= 1, got {size}, {stride}")
    p = image.unfold(1, size, stride).unfold(2, size, stride)  # (C, nH, nW, size, size)
    return p.permute(1, 2, 0, 3, 4).reshape(-1, image.shape[0], size, size)


def patch_bank(names: Sequence[str], size: int = 32, stride: int = 8, shorter: int = 256) -> Tensor:
    """Patches of the named sample images (each resized to a shorter side of ``shorter`` px), uint8 (P, 3, s, s)."""
    return torch.cat([extract_patches(resized_pixels(sample_image(n), shorter), size, stride) for n in names])


def grid_patches(image: Tensor, size: int) -> Tensor:
    """Non-overlapping size x size tiles of an image (C, H, W) (H, W multiples of size), row-major: (L, C, s, s)."""
    if image.shape[1] % size or image.shape[2] % size:
        raise ValueError(f"image sides {tuple(image.shape[1:])} must be multiples of the patch size {size}")
    return extract_patches(image, size, size)


@torch.no_grad()
def nearest_patches(queries: Tensor, bank: Tensor, k: int, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours (l2 on [0, 1] pixels) of each query patch (L, C, s, s) in bank (P, C, s, s) (uint8
    or float in [0, 1]), by ``torch.cdist`` over chunks of the bank. Returns (indices (L, k), distances (L, k))."""
    if queries.shape[1:] != bank.shape[1:]:
        raise ValueError(f"query patches {tuple(queries.shape[1:])} and bank patches {tuple(bank.shape[1:])} differ")
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be between 1 and the bank size {len(bank)}, got {k}")
    q = _unit_float(queries).flatten(1)
    best_d = torch.full((len(q), 0), math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for start in range(0, len(bank), chunk):
        d = torch.cdist(q, _unit_float(bank[start : start + chunk]).flatten(1))
        cand_d = torch.cat([best_d, d], 1)
        cand_i = torch.cat([best_i, torch.arange(start, start + d.shape[1]).expand(len(q), -1)], 1)
        best_d, order = cand_d.topk(min(k, cand_d.shape[1]), dim=1, largest=False)
        best_i = cand_i.gather(1, order)
    return best_i, best_d


def _unit_float(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@dataclass
class PatchComposition:
    """Images as per-pixel softmax mixtures of k retrieved patches at each of L grid locations.

    candidates (L, k, C, s, s) float pixels in [0, 1]; grid (rows, cols) with rows * cols = L. Parameters θ have
    shape (B, L, k, s, s): at every pixel of every location the k coefficients softmax(θ) lie in (0, 1), sum to 1.
    """

    candidates: Tensor
    grid: tuple[int, int]
    distances: Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def param_shape(self) -> tuple[int, ...]:
        L, k, _, s, _ = self.candidates.shape
        return (L, k, s, s)

    def decode(self, theta: Tensor) -> Tensor:
        """θ (B, L, k, s, s) -> images (B, C, rows*s, cols*s) in [0, 1]."""
        if theta.dim() != 5 or tuple(theta.shape[1:]) != self.param_shape:
            raise ValueError(
                f"patch coefficients must be (B, {', '.join(map(str, self.param_shape))}), got {tuple(theta.shape)}"
            )
        weights = torch.softmax(theta, dim=2).unsqueeze(3)  # (B, L, k, 1, s, s)
        tiles = (weights * self.candidates.to(theta.device)).sum(2)  # (B, L, C, s, s)
        B, (rows, cols), (C, s) = len(theta), self.grid, tiles.shape[2:4]
        return tiles.view(B, rows, cols, C, s, s).permute(0, 3, 1, 4, 2, 5).reshape(B, C, rows * s, cols * s)

    def coefficients(self, theta: Tensor) -> Tensor:
        """The mixing coefficients softmax(θ) over the k patches: (B, L, k, s, s)."""
        return torch.softmax(theta, dim=2)


def build_composition(image: Tensor, bank: Tensor, k: int, size: int = 32) -> PatchComposition:
    """Tile ``image`` (C, H, W) in [0, 1] into size x size patches and retrieve each tile's k nearest bank patches."""
    tiles = grid_patches(image, size)
    idx, dist = nearest_patches(tiles, bank, k)
    candidates = _unit_float(bank[idx.flatten()]).view(len(tiles), k, *bank.shape[1:])
    return PatchComposition(candidates, (image.shape[1] // size, image.shape[2] // size), dist)


def changed_boxes(vertices: Tensor, grid: tuple[int, int], size: int, top: int = 3) -> list[tuple[int, int, int, int]]:
    """The ``top`` grid locations where the vertices (V, C, H, W) differ most (``location_change``), as
    (top, left, height, width) pixel boxes (Li et al.'s Table 5 indicator)."""
    change = location_change(vertices, grid, size).flatten()
    return [
        (int(i) // grid[1] * size, int(i) % grid[1] * size, size, size)
        for i in change.topk(min(top, len(change))).indices
    ]


def location_change(vertices: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """Per grid location, the mean l2 distance of the vertices (V, C, H, W) from their mean there: (rows, cols)."""
    centred = vertices - vertices.mean(0, keepdim=True)
    V, C, H, W = centred.shape
    tiles = centred.view(V, C, grid[0], size, grid[1], size).permute(0, 2, 4, 1, 3, 5).flatten(3)
    return tiles.norm(dim=3).mean(0)


@torch.no_grad()
def retrieval_is_exact(
    image: Tensor, bank: Tensor, composition: PatchComposition, size: int, n_tiles: int = 1, atol: float = 1e-3
) -> bool:
    """Check ``composition``'s chunked k-NN against a brute-force search over the whole bank.

    image (C, H, W) in [0, 1], the image ``composition`` was built from; bank (P, C, s, s) uint8 or float in
    [0, 1]. For the first ``n_tiles`` tiles, the k smallest distances over all of the bank (one ``torch.cdist``)
    must equal ``composition.distances`` within ``atol`` ([0, 1] pixel units, l2).
    """
    tiles = grid_patches(image, size)[:n_tiles].flatten(1)
    k = composition.candidates.shape[1]
    brute = torch.cdist(tiles, _unit_float(bank).flatten(1)).topk(k, largest=False).values
    return bool(torch.allclose(brute, composition.distances[:n_tiles], atol=atol))


def figure_rows(
    polys: polytope.Polytopes,
    reports: Sequence[dict[str, Any]],
    targets: Tensor,
    labels: Sequence[str],
    grid: tuple[int, int],
    size: int,
) -> list[dict[str, Any]]:
    """``polytope.polytope_figure`` rows for the first ``len(labels)`` patch-composed polytopes, each with the
    ``boxes`` of the 3 tiles where its vertices differ most (Li et al.'s Table 5 indicator).

    targets (T, C, H, W): polytope k's target is ``targets[k % T]``; ``polys.starts`` are the decoded starting
    images (the even mix); grid (rows, cols) of tiles of ``size`` pixels.
    """
    rows = polytope_study.figure_rows(polys, reports, targets, range(len(labels)), labels)
    return [dict(row, boxes=changed_boxes(row["vertices"], grid, size)) for row in rows]


def vgg_claims(
    theirs: dict[str, Any],
    pixel_rows: Sequence[dict[str, Any]],
    patch_rows: Sequence[dict[str, Any]],
    n_images: int,
    n_patches: int,
    steps: tuple[int, int],
    act_tol: float = 0.01,
) -> list[dict[str, Any]]:
    """Chapter 09's claims, as keyword arguments of ``Chapter.claim`` (criterion, measured, budget, ...).

    theirs: ``helpers.data.paper.get("li")`` (sections method, table4, table6, imagenet); pixel_rows:
    ``polytope.table_row`` of the pixel polytopes (Tables 3-4, one per target image); patch_rows: those of the
    patch-composed polytopes (Table 6); n_images: images behind our image distance; n_patches: size of the patch
    bank; steps: our optimiser steps (pixels, patches); act_tol: the largest relative fc6 mismatch that counts as a
    collision. Every claim about classes and probabilities needs trained weights; every claim is compared with
    the paper's 2000 samples per polytope (``polytope_study.samples_budget``).
    """
    lo, hi = theirs["imagenet"]["sample_prob_range"]
    rlo, rhi = theirs["imagenet"]["vertex_to_image_distance_ratio_pct"]
    t4 = theirs["table4"]["rows"]["1"]
    budget = polytope_study.samples_budget(min(int(r["n_samples"]) for r in [*pixel_rows, *patch_rows]), theirs)
    steps_note = f"{steps[0]} / {steps[1]} optimiser steps (pixels / patches; the paper's are in its appendix)"
    both = [*pixel_rows, *patch_rows]
    pixel_kept = polytope_study.sample_rate(pixel_rows)
    patch_kept = polytope_study.sample_rate(patch_rows)
    png = polytope_study.png_rate(both)
    return [
        {
            "id": "li.vgg16.same_class",
            "description": f"fc6 polytopes (Tables 3-4), {len(pixel_rows)} target images: samples classified as "
            "the target's class",
            "criterion": verdict.every("a sample keeps the target's class").trained(),
            "paper": f"{t4['success_pct']}% of {theirs['method']['n_samples']}",
            "ours": f"{pixel_kept.text()}; polytopes with all samples kept: "
            f"{polytope_study.polytope_rate(pixel_rows).text()}",
            "measured": pixel_kept,
            "reason": steps_note,
            "budget": budget,
        },
        {
            "id": "li.vgg16.confidence",
            "description": "fc6 polytopes: samples' mean probability of the target's class, worst polytope",
            "criterion": verdict.at_least(
                lo, "samples' mean probability of the target's class, worst polytope"
            ).trained(),
            "paper": f"{t4['sample_prob']} (range {lo}-{hi})",
            "ours": polytope_study.spread(pixel_rows, "sample_prob", larger_is_worse=False),
            "reason": steps_note,
            "budget": budget,
        },
        {
            "id": "li.vgg16.distance_ratio",
            "description": "fc6 polytopes: vertex distance / image distance (%), mean over polytopes",
            "criterion": verdict.between(rlo, rhi, "mean vertex / image distance (%)").trained(),
            "paper": f"{rlo}-{rhi}",
            "ours": polytope_study.spread(pixel_rows, "ratio_pct", unit="%"),
            "reason": f"image distance from {n_images} photos, not ImageNet; {steps_note}",
            "budget": budget,
        },
        {
            "id": "li.vgg16.fc6_collision",
            "description": "pixel and patch polytopes: samples' fc6 activations match the target's (rel. l2), worst",
            "criterion": verdict.at_most(act_tol, "fc6 mismatch of the samples, worst polytope"),
            "paper": "'all examples within the polytopes collide with the target image' (Table 3)",
            "ours": polytope_study.spread(both, "sample_act_rel_max"),
            "reason": f"the search mechanics hold for any weights; {steps_note}",
            "budget": budget,
        },
        {
            "id": "li.patches.same_class",
            "description": f"patch-composed polytopes (Table 6), {len(patch_rows)} rows: samples classified as the "
            "target's class",
            "criterion": verdict.every("a sample keeps the target's class").trained(),
            "paper": f"{min(theirs['table6']['rows'][k]['success_pct'] for k in ('1', '2'))}% of "
            f"{theirs['method']['n_samples']}",
            "ours": patch_kept.text(),
            "measured": patch_kept,
            "reason": f"{n_patches:,} patches from sample images, exact k-NN; {steps_note}",
            "budget": budget,
        },
        {
            "id": "li.vgg16.png_round_trip",
            "description": "vertices and kept samples saved as 8-bit PNGs and read back keep the target's class",
            "criterion": verdict.every(
                "an image keeps the target's class after the PNG round trip", kind="beyond"
            ).trained(),
            "paper": "—",
            "ours": f"{png.text()}; worst fc6 mismatch after the round trip "
            f"{max(r['png_act_rel_max'] for r in both):.2g}",
            "measured": png,
        },
    ]
