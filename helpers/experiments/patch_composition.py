"""TODO docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    pass

from helpers.data.photos import resized_pixels, sample_image


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
