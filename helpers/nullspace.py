"""The null-space search of Ozbulak et al. (Sec. 4.2) and what a first layer really lets through.

Input space (one convention for the whole module)
-------------------------------------------------
Every perturbation here lives in the space of the tensor the *model receives* ("model space"): for the
ImageNet models of the registry that is the **normalised** input ``(pixels - mean) / std``, because that is
what the first layer multiplies by ``W1``. A model-space perturbation ``P`` is the pixel-space perturbation
``P * std`` (per channel; the mean cancels in a difference): see ``to_pixel_space`` / ``to_model_space``.
Pixel-space kernel vectors are ``std * phi`` (still exactly invisible, no longer orthonormal). Clipping a
colliding image to the pixel range [0, 1] breaks the collision; ``feasible_beta`` gives the largest multiplier
that needs no clipping. For the MNIST models the model space *is* the pixel space.

The matrix rule
---------------
``nn.Linear``: ``W1`` is ``out x in``. ``nn.Conv2d`` (also timm/torchvision patch embeddings): ``W1`` is
``out x (in/groups * kh * kw)``, the weight reshaped, acting on one unfolded patch. ``ker(W1)`` is computed by
an SVD in float64; its vectors are returned in patch shape ``(in/groups, kh, kw)``.

Two constructions for a conv
----------------------------
* ``null_space_perturbation``: the paper's ``P = beta [phi ... phi]``, phi tiled over the image with the
  kernel's period, aligned with the first window. Exact when the windows do not overlap (stride == kernel,
  no padding, the image a whole number of patches: ViT, DeiT). With overlapping windows (ResNet-50's 7x7
  stride 2) most windows see a *shifted* phi and the layer's output changes.
* ``polyphase_spectrum`` / ``operator_null_space``: the null or near-null space of the convolution as a
  linear operator on the whole image (size, stride, padding included), from the 2-D DFT of its polyphase
  components (circular boundary) or exactly from the dense operator on small images.
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TrivialKernelError", "UnsupportedLayerError", "KernelBasis", "first_layer", "weight_matrix", "kernel_basis", "near_null_basis",
    "restricted_kernel_basis", "patch_grid", "region_mask", "null_space_perturbation", "null_space_search",
    "collision_residuals", "to_pixel_space", "to_model_space", "feasible_beta", "conv_apply",
    "conv_adjoint", "dense_operator", "operator_null_space", "PolyphaseSpectrum", "polyphase_spectrum",
    "plane_wave", "window_stats", "periodic_patch_matrix", "in_dtype", "output_tensor",
    "boundary_near_null", "operator_gain", "input_normalization", "model_input",
]


class TrivialKernelError(ValueError):
    """The first layer's weight matrix has nullity 0: the exact null-space search is impossible there."""


class UnsupportedLayerError(ValueError):
    """The layer is not an nn.Linear or nn.Conv2d (or uses a feature the search does not handle)."""


@dataclass
class KernelBasis:
    """An orthonormal basis of ``ker(W1)`` (or of its near-null space) of one layer.

    vectors: (k, *patch_shape) float64, orthonormal when flattened; Linear: (k, in_features),
      Conv2d: (k, in_channels // groups, kh, kw).
    singular_values: all singular values of ``W1`` (min(out, in)), descending, float64.
    tol: the threshold below which a singular value counts as zero (absolute, same units as W1).
    near_null: True when the vectors are the smallest right singular vectors rather than an exact kernel.
    residual_norms: ``||W1 phi||`` for each vector (float64), the measure of how null each one is.
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    tol: float
    layer_name: str
    weight_shape: tuple[int, ...]
    near_null: bool = False
    residual_norms: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def nullity(self) -> int:
        return 0 if self.near_null else self.vectors.shape[0]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        out = self.weight_shape[0]
        return out, int(math.prod(self.weight_shape[1:]))

    @property
    def rank(self) -> int:
        return int((self.singular_values > self.tol).sum())

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return tuple(self.vectors.shape[1:])

    def flat(self) -> torch.Tensor:
        """The vectors as rows of a (k, n) matrix."""
        return self.vectors.reshape(self.vectors.shape[0], -1)

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Linear combinations: coefficients (..., k) -> vectors (..., *patch_shape), still in the kernel."""
        coefficients = coefficients.to(self.vectors.dtype)
        return (coefficients @ self.flat()).reshape(*coefficients.shape[:-1], *self.patch_shape)

    def random_vector(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A unit-norm random combination of the basis (patch_shape)."""
        c = torch.randn(self.vectors.shape[0], generator=generator, dtype=torch.float64)
        return self.combine(c / c.norm())


# --- the first layer and its weight matrix ----------------------------------------------------------

SUPPORTED = (nn.Linear, nn.Conv2d)


def first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The first trainable layer (definition order): its qualified name and module.

    Supported: ``nn.Linear`` and ``nn.Conv2d`` (which is what timm's and torchvision's patch embeddings use).
    Raises ``TypeError`` naming the module when the first layer with weights is of another kind.
    """
    for name, module in model.named_modules():
        if name == "" or not list(module.parameters(recurse=False)):
            continue
        if isinstance(module, SUPPORTED):
            return name, module
        if len(list(module.children())) == 0:
            raise UnsupportedLayerError(f"first layer with weights is {name!r} ({type(module).__name__}); the null-space "
                            f"search supports {', '.join(c.__name__ for c in SUPPORTED)}")
    raise UnsupportedLayerError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer")


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, SUPPORTED):
        raise UnsupportedLayerError(f"unsupported layer {type(layer).__name__}; valid: nn.Linear, nn.Conv2d")
    if isinstance(layer, nn.Conv2d) and tuple(layer.dilation) != (1, 1):
        raise UnsupportedLayerError(f"dilated convolutions (dilation={layer.dilation}) are not supported; valid: dilation 1")


def weight_matrix(layer: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W1 by the matrix rule: Linear (out, in); Conv2d (out, in/groups * kh * kw)."""
    _check_layer(layer)
    w = layer.weight.detach().to(dtype)
    return w.reshape(w.shape[0], -1)


def _patch_shape(layer: nn.Module) -> tuple[int, ...]:
    return tuple(layer.weight.shape[1:])


def _svd(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = weight_matrix(layer, dtype)
    _, s, vh = torch.linalg.svd(w.cpu(), full_matrices=True)
    return w.cpu(), s, vh


def default_rtol(layer: nn.Module) -> float:
    """numpy's ``matrix_rank`` convention: max(out, in) * eps of the dtype the weights are stored in."""
    w = layer.weight
    m = w.shape[0]
    n = int(math.prod(w.shape[1:]))
    return max(m, n) * torch.finfo(w.dtype).eps


def kernel_basis(layer: nn.Module, *, rtol: float | None = None, dtype: torch.dtype = torch.float64,
                 name: str = "") -> KernelBasis:
    """An orthonormal basis of ker(W1): vectors (k, *patch_shape).

    A singular value counts as zero when it is below ``rtol * sigma_max`` (default ``default_rtol``: the
    numerical rank at the precision the weights are stored in). Right singular vectors of a wide matrix
    beyond its row count are exact kernel vectors whatever the tolerance. Raises ``TrivialKernelError``
    when the nullity is 0.
    """
    w, s, vh = _svd(layer, dtype)
    rtol = default_rtol(layer) if rtol is None else float(rtol)
    tol = rtol * float(s.max()) if s.numel() else 0.0
    rank = int((s > tol).sum())
    vectors = vh[rank:]
    label = name or type(layer).__name__
    if vectors.shape[0] == 0:
        m, n = w.shape
        raise TrivialKernelError(
            f"layer {label!r} has a trivial kernel: W1 is {m} x {n} (weight {tuple(layer.weight.shape)}) with "
            f"rank {rank} = its column count, so nullity(W1) = 0 at rtol={rtol:.2g} (sigma_min/sigma_max = "
            f"{float(s.min() / s.max()):.3g}). No exact null-space search exists there. Instead: use the "
            f"near-null space (near_null_basis: the smallest right singular vectors; the output then changes by "
            f"sigma_min * beta), a larger rtol, the conv operator's near-null space on the whole image "
            f"(polyphase_spectrum), or a later layer (a non-linear system, Sec. 4.2).")
    return KernelBasis(vectors.reshape(-1, *_patch_shape(layer)), s, tol, label, tuple(layer.weight.shape),
                       False, (w @ vectors.T).norm(dim=0))


def near_null_basis(layer: nn.Module, k: int = 8, *, dtype: torch.dtype = torch.float64,
                    name: str = "") -> KernelBasis:
    """The k right singular vectors of W1 with the smallest singular values (exact kernel vectors first).

    For layers with a trivial kernel (ViT-B with random weights, a square 768 x 768 W1) this is the best a
    first-layer perturbation can do: ``||W1 phi|| = sigma`` for each unit vector.
    """
    w, s, vh = _svd(layer, dtype)
    n = vh.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the patch dimension), got {k}")
    vectors = vh[n - k:]
    return KernelBasis(vectors.reshape(-1, *_patch_shape(layer)), s, 0.0, name or type(layer).__name__,
                       tuple(layer.weight.shape), True, (w @ vectors.T).norm(dim=0))


def restricted_kernel_basis(layer: nn.Linear, mask: torch.Tensor, *, rtol: float | None = None) -> KernelBasis:
    """Kernel vectors of a Linear W1 that are zero outside ``mask`` (bool, in_features elements, any shape).

    ``ker(W1) ∩ {supported on mask} = ker(W1[:, mask])``; non-trivial when the mask has more elements than
    the rank. This is how a Linear first layer lets one region be perturbed and the rest stay intact.
    """
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"restricted_kernel_basis needs an nn.Linear, got {type(layer).__name__}")
    mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
    if mask.numel() != layer.in_features:
        raise ValueError(f"mask has {mask.numel()} elements; the layer takes {layer.in_features}")
    sub = nn.Linear(int(mask.sum()), layer.out_features, bias=False)
    with torch.no_grad():
        sub.weight.copy_(layer.weight.detach()[:, mask])
    basis = kernel_basis(sub, rtol=rtol, name="restricted")
    full = torch.zeros(basis.vectors.shape[0], layer.in_features, dtype=torch.float64)
    full[:, mask] = basis.vectors
    w = weight_matrix(layer).cpu()
    return KernelBasis(full, basis.singular_values, basis.tol, "restricted", tuple(layer.weight.shape), False,
                       (w @ full.T).norm(dim=0))


# --- the paper's construction -----------------------------------------------------------------------

def _conv_input_shape(layer: nn.Conv2d, input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[0] != layer.in_channels:
        raise ValueError(f"input_shape {tuple(input_shape)} does not fit {layer}: expected (C, H, W) or "
                         f"(1, C, H, W) with C = {layer.in_channels}")
    return shape  # type: ignore[return-value]


def patch_grid(layer: nn.Conv2d, input_shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the tiles of the paper's construction: kernel-sized tiles from the first window on."""
    _, h, w = _conv_input_shape(layer, input_shape)
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding  # type: ignore[misc]
    return math.ceil((h + ph) / kh), math.ceil((w + pw) / kw)


def region_mask(grid: tuple[int, int], region: Any = None) -> torch.Tensor:
    """A bool (rows, cols) tile mask from None (all), a (rows, cols) mask, or a box (r0, c0, r1, c1) in tiles."""
    if region is None:
        return torch.ones(grid, dtype=torch.bool)
    if isinstance(region, (tuple, list)) and len(region) == 4 and all(isinstance(v, int) for v in region):
        r0, c0, r1, c1 = region
        mask = torch.zeros(grid, dtype=torch.bool)
        mask[r0:r1, c0:c1] = True
        return mask
    mask = torch.as_tensor(region).to(torch.bool)
    if tuple(mask.shape) != tuple(grid):
        raise ValueError(f"region mask has shape {tuple(mask.shape)}; valid: the tile grid {tuple(grid)}, "
                         "a box (r0, c0, r1, c1) in tile units, or None")
    return mask


def null_space_perturbation(layer: nn.Module, input_shape: Sequence[int], phi: torch.Tensor,
                            beta: float | torch.Tensor = 1.0, region: Any = None) -> torch.Tensor:
    """The paper's perturbation P (model space, float64, shape ``input_shape``).

    Linear: ``P = beta * phi`` (phi: in_features elements, reshaped to input_shape); ``region`` is not
    allowed (a masked kernel vector is no longer a kernel vector: use ``restricted_kernel_basis``).
    Conv2d: ``P = beta * [phi ... phi]``: phi (in/groups, kh, kw) tiled with period (kh, kw) starting at the
    first window (offset -padding), repeated over the channel groups. ``phi`` may also be per tile,
    (rows, cols, in/groups, kh, kw) or (rows*cols, ...); ``beta`` a scalar or a (rows, cols) tensor of
    per-tile multipliers; ``region`` a (rows, cols) bool mask or a box (r0, c0, r1, c1) of tiles (see
    ``patch_grid``). Tiles outside the region are zero.
    """
    _check_layer(layer)
    phi = torch.as_tensor(phi, dtype=torch.float64).cpu()
    if isinstance(layer, nn.Linear):
        if region is not None:
            raise ValueError("region is not supported for a Linear first layer (masking breaks W1 phi = 0); "
                             "use restricted_kernel_basis(layer, mask) to get kernel vectors inside a region")
        if phi.numel() != layer.in_features or math.prod(input_shape) != layer.in_features:
            raise ValueError(f"phi has {phi.numel()} elements and input_shape {tuple(input_shape)} has "
                             f"{math.prod(input_shape)}; the Linear layer takes {layer.in_features}")
        return (torch.as_tensor(beta, dtype=torch.float64) * phi).reshape(tuple(input_shape))
    c, h, w = _conv_input_shape(layer, input_shape)
    rows, cols = patch_grid(layer, (c, h, w))
    patch = _patch_shape(layer)
    if tuple(phi.shape) == patch:
        tiles = phi.expand(rows, cols, *patch)
    elif tuple(phi.shape[-3:]) == patch and phi.shape[:-3].numel() == rows * cols:
        tiles = phi.reshape(rows, cols, *patch)
    else:
        raise ValueError(f"phi has shape {tuple(phi.shape)}; valid: {patch} or (rows, cols, *{patch}) with "
                         f"(rows, cols) = {(rows, cols)} tiles")
    scale = torch.as_tensor(beta, dtype=torch.float64).cpu()
    if scale.ndim not in (0, 2) or (scale.ndim == 2 and tuple(scale.shape) != (rows, cols)):
        raise ValueError(f"beta has shape {tuple(scale.shape)}; valid: a scalar or {(rows, cols)} per tile")
    scale = scale.expand(rows, cols) * region_mask((rows, cols), region)
    tiles = tiles * scale[:, :, None, None, None]
    tiles = tiles.repeat(1, 1, layer.groups, 1, 1)  # the same phi for every channel group
    kh, kw = patch[1:]
    canvas = tiles.permute(2, 0, 3, 1, 4).reshape(c, rows * kh, cols * kw)
    ph, pw = layer.padding  # type: ignore[misc]
    return canvas[:, ph:ph + h, pw:pw + w].reshape(tuple(input_shape)).contiguous()


def null_space_search(x: torch.Tensor, layer: nn.Module, phi: torch.Tensor, beta: float | torch.Tensor = 1.0,
                      region: Any = None) -> torch.Tensor:
    """psi(x, phi) = x + P for a batch x (B, ...) in model space; returns x's dtype and device."""
    if isinstance(layer, nn.Conv2d) and x.dim() != 4:
        raise ValueError(f"x must be a batch (B, C, H, W) for a Conv2d first layer, got shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (B, ...), got shape {tuple(x.shape)}")
    p = null_space_perturbation(layer, tuple(x.shape[1:]), phi, beta, region)
    return x + p.to(x.dtype).to(x.device)


# --- measuring a collision --------------------------------------------------------------------------

def output_tensor(out: Any) -> torch.Tensor:
    """The main output tensor of a model: a tensor, ``out['out']`` (torchvision segmentation) or the first."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"] if "out" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0])
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm().clamp_min(1e-300))


@torch.no_grad()
def collision_residuals(model: nn.Module, x: torch.Tensor, x_hat: torch.Tensor,
                        layer: nn.Module | None = None) -> dict[str, Any]:
    """How exact a collision is (both inputs in model space, same batch shape).

    Returns floats: ``first_layer_rel`` = ||f1(x_hat) - f1(x)|| / ||f1(x)||, ``first_layer_max_abs``,
    ``output_rel`` and ``output_max_abs`` (logits or segmentation logits), ``input_rel`` = ||x_hat - x|| / ||x||;
    and ``same_argmax`` (fraction of argmax positions that agree: top-1 for classifiers, pixels for
    segmentation).
    """
    layer = layer if layer is not None else first_layer(model)[1]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        out = output_tensor(model(torch.cat([x, x_hat])))
    finally:
        handle.remove()
    f1, f1_hat = captured[0].chunk(2)
    y, y_hat = out.chunk(2)
    return {
        "first_layer_rel": _rel(f1_hat, f1),
        "first_layer_max_abs": float((f1_hat - f1).abs().max()),
        "output_rel": _rel(y_hat, y),
        "output_max_abs": float((y_hat - y).abs().max()),
        "input_rel": _rel(x_hat, x),
        "same_argmax": float((y_hat.argmax(1) == y.argmax(1)).double().mean()),
    }


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model itself for its own dtype, else a deep copy converted to ``dtype`` (e.g. float64 checks)."""
    current = next(model.parameters()).dtype
    return model if current == dtype else copy.deepcopy(model).to(dtype)


# --- pixel space <-> model space (ImageNet normalisation) ------------------------------------------

def _std(std: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(std, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def to_pixel_space(p: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """Model-space perturbation (..., C, H, W) -> pixel-space perturbation ``p * std`` (per channel)."""
    return p * _std(std, p)


def to_model_space(p: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """Pixel-space perturbation (..., C, H, W) -> model space ``p / std`` (per channel)."""
    return p / _std(std, p)


def feasible_beta(x: torch.Tensor, direction: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> float:
    """The largest beta >= 0 with ``lo <= x + beta * direction <= hi`` everywhere (both in the same space)."""
    d = direction.to(x.dtype)
    up = torch.where(d > 0, (hi - x) / d, torch.full_like(x, math.inf))
    down = torch.where(d < 0, (lo - x) / d, torch.full_like(x, math.inf))
    return float(torch.minimum(up, down).min().clamp_min(0.0))


# --- the convolution as an operator on the whole image --------------------------------------------

def conv_apply(layer: nn.Conv2d, delta: torch.Tensor) -> torch.Tensor:
    """The linear part of the conv (no bias) on (B, C, H, W) in delta's dtype: A delta."""
    w = layer.weight.detach().to(delta.dtype).to(delta.device)
    return F.conv2d(delta, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def conv_adjoint(layer: nn.Conv2d, y: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """A^T y for y (B, O, H', W'): (B, C, H, W) (the conv's input gradient)."""
    c, h, w = _conv_input_shape(layer, input_shape)
    weight = layer.weight.detach().to(y.dtype).to(y.device)
    return torch.nn.grad.conv2d_input((y.shape[0], c, h, w), weight, y, layer.stride, layer.padding,
                                      layer.dilation, layer.groups)


def dense_operator(layer: nn.Conv2d, input_shape: Sequence[int], dtype: torch.dtype = torch.float64,
                   max_inputs: int = 6000, region: tuple[slice, slice] | None = None) -> torch.Tensor:
    """The conv's matrix A (out_numel, n) on one image of ``input_shape``, built column by column.

    ``region`` (rows, cols slices) restricts the columns to the pixels inside it (n = C * region pixels);
    default: all pixels. Only for small column counts (n <= max_inputs): the whole-image operator of a
    224x224 ResNet-50 conv1 has 150,528 columns: use ``polyphase_spectrum`` and ``boundary_near_null``.
    """
    c, h, w = _conv_input_shape(layer, input_shape)
    rows, cols = region or (slice(0, h), slice(0, w))
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[rows, cols] = True
    pixels = inside.nonzero()
    n = c * len(pixels)
    if n > max_inputs:
        raise ValueError(f"operator has {n} columns > max_inputs={max_inputs}; use a smaller image or region, "
                         "or polyphase_spectrum for the whole-image spectrum")
    index = torch.arange(n)
    basis = torch.zeros(n, c, h, w, dtype=dtype)
    basis[index, index // len(pixels), pixels[index % len(pixels), 0], pixels[index % len(pixels), 1]] = 1.0
    return torch.cat([conv_apply(layer, chunk).reshape(chunk.shape[0], -1) for chunk in basis.split(512)]).T


def _smallest_right_singular(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All n singular values of A (m, n) ascending (zeros for a wide A) and the matching right vectors."""
    m, n = a.shape
    _, s, vh = torch.linalg.svd(a, full_matrices=m < n)
    sv = torch.zeros(n, dtype=s.dtype)
    sv[:s.numel()] = s
    order = torch.argsort(sv)
    return sv[order], vh[order]


def operator_null_space(layer: nn.Conv2d, input_shape: Sequence[int], *, rtol: float | None = None,
                        k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact null (or k smallest) right singular vectors of the whole-image conv operator (small images).

    Returns (singular_values ascending, vectors (m, C, H, W) float64, unit norm). With ``k`` None: the exact
    null space (singular values <= rtol * sigma_max; default rtol = max(A.shape) * eps64); else the k
    smallest, null or not.
    """
    c, h, w = _conv_input_shape(layer, input_shape)
    a = dense_operator(layer, (c, h, w))
    sv, vh = _smallest_right_singular(a)
    if k is None:
        tol = (max(a.shape) * torch.finfo(a.dtype).eps if rtol is None else rtol) * float(sv.max())
        keep = sv <= tol
        sv, vh = sv[keep], vh[keep]
    else:
        sv, vh = sv[:k], vh[:k]
    return sv, vh.reshape(-1, c, h, w)


@dataclass
class PolyphaseSpectrum:
    """Singular values of the conv as an operator on the whole image, circular boundary (2-D DFT).

    With stride (sh, sw) the image splits into sh*sw polyphase components on the output grid; the conv is a
    sum of ordinary (stride-1) convolutions of them, so in the DFT of the output grid it becomes one small
    matrix ``M(omega)`` of shape (out, in/groups... here in * sh * sw) per frequency. Its singular values
    over all frequencies are exactly those of the circular operator.

    matrices: (H', W', O, C*sh*sw) complex128; singular: (H', W', min(O, C*sh*sw)) descending.
    """

    layer_stride: tuple[int, int]
    grid: tuple[int, int]
    input_shape: tuple[int, int, int]
    matrices: torch.Tensor
    singular: torch.Tensor
    padding: tuple[int, int]

    @property
    def sigma_max(self) -> float:
        return float(self.singular.max())

    @property
    def per_frequency_nullity(self) -> int:
        """max(0, C*sh*sw - O): exact null directions per frequency (whatever the weights)."""
        o, n = self.matrices.shape[-2:]
        return max(0, n - o)

    def smallest(self) -> torch.Tensor:
        """(H', W') the smallest singular value at each frequency (0 where a null direction exists)."""
        if self.per_frequency_nullity:
            return torch.zeros(self.grid, dtype=torch.float64)
        return self.singular[..., -1]

    def sigma_min(self) -> float:
        return float(self.smallest().min())

    def near_null_vectors(self, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most invisible real images: (sigmas (k,), images (k, C, H, W) unit norm), circular boundary."""
        sigmas = self.smallest().flatten()
        order = torch.argsort(sigmas)
        out_s, out_v, seen = [], [], set()
        gh, gw = self.grid
        for idx in order.tolist():
            i, j = divmod(idx, gw)
            if (i, j) in seen:
                continue
            seen.update({(i, j), ((-i) % gh, (-j) % gw)})  # omega and -omega give the same real image
            _, _, vh = torch.linalg.svd(self.matrices[i, j], full_matrices=True)
            v = vh[-1].conj()
            out_s.append(float(sigmas[idx]))
            out_v.append(plane_wave(v, (i, j), self))
            if len(out_s) == k:
                break
        return torch.tensor(out_s), torch.stack(out_v)


def _phase_index(kernel: int, stride: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each kernel tap u: its polyphase component a = (u - pad) mod stride and shift q = floor(...)."""
    u = torch.arange(kernel) - pad
    return torch.remainder(u, stride), torch.div(u, stride, rounding_mode="floor")


def polyphase_spectrum(layer: nn.Conv2d, input_shape: Sequence[int]) -> PolyphaseSpectrum:
    """The conv's whole-image spectrum under circular boundary conditions (see ``PolyphaseSpectrum``).

    Needs groups == 1 and H, W divisible by the stride. Cost: one (O x C*sh*sw) SVD per output frequency.
    """
    _check_layer(layer)
    c, h, w = _conv_input_shape(layer, input_shape)
    (sh, sw), (kh, kw), (ph, pw) = layer.stride, layer.kernel_size, layer.padding  # type: ignore[misc]
    if layer.groups != 1 or h % sh or w % sw:
        raise ValueError(f"polyphase_spectrum needs groups=1 and H, W divisible by the stride {(sh, sw)}; "
                         f"got groups={layer.groups}, input {(c, h, w)}")
    gh, gw = h // sh, w // sw
    a_u, q_u = _phase_index(kh, sh, ph)
    b_v, r_v = _phase_index(kw, sw, pw)
    w1 = 2 * math.pi * torch.arange(gh, dtype=torch.float64) / gh
    w2 = 2 * math.pi * torch.arange(gw, dtype=torch.float64) / gw
    e1 = torch.exp(1j * w1[:, None] * q_u[None].double())  # (gh, kh)
    e2 = torch.exp(1j * w2[:, None] * r_v[None].double())  # (gw, kw)
    onehot_a = F.one_hot(a_u, sh).to(torch.complex128)  # (kh, sh)
    onehot_b = F.one_hot(b_v, sw).to(torch.complex128)  # (kw, sw)
    weight = layer.weight.detach().cpu().to(torch.complex128)
    t = torch.einsum("ocuv,yv,vb->ocuyb", weight, e2, onehot_b)  # contract the columns first (cheap)
    m = torch.einsum("ocuyb,xu,ua->xyocab", t, e1, onehot_a).reshape(gh, gw, weight.shape[0], c * sh * sw)
    return PolyphaseSpectrum((sh, sw), (gh, gw), (c, h, w), m, torch.linalg.svdvals(m), (ph, pw))


def plane_wave(v: torch.Tensor, freq: tuple[int, int], spectrum: PolyphaseSpectrum) -> torch.Tensor:
    """The real image whose polyphase components are Re(v e^{i omega . n}) at output-grid frequency freq.

    v: (C*sh*sw,) complex; returns (C, H, W) float64 of unit norm.
    """
    c, h, w = spectrum.input_shape
    sh, sw = spectrum.layer_stride
    gh, gw = spectrum.grid
    i = torch.arange(gh, dtype=torch.float64)[:, None]
    j = torch.arange(gw, dtype=torch.float64)[None, :]
    wave = torch.exp(1j * 2 * math.pi * (freq[0] * i / gh + freq[1] * j / gw))  # (gh, gw)
    phases = (v.reshape(c, sh, sw)[:, :, :, None, None] * wave).real  # (c, a, b, gh, gw)
    image = phases.permute(0, 3, 1, 4, 2).reshape(c, h, w)  # pixel (sh*i + a, sw*j + b)
    return image / image.norm()


def circular_conv_apply(layer: nn.Conv2d, delta: torch.Tensor) -> torch.Tensor:
    """The conv with circular (wrap-around) padding, the boundary condition of ``polyphase_spectrum``."""
    ph, pw = layer.padding  # type: ignore[misc]
    padded = F.pad(delta, (pw, pw, ph, ph), mode="circular") if (ph or pw) else delta
    w = layer.weight.detach().to(delta.dtype).to(delta.device)
    return F.conv2d(padded, w, None, layer.stride, 0, layer.dilation, layer.groups)


def taper(shape: tuple[int, int], width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (H, W) window that rises from 0 to 1 over ``width`` pixels at each border (raised cosine)."""
    def ramp(n: int) -> torch.Tensor:
        t = torch.ones(n, dtype=dtype)
        if width > 0:
            edge = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(width, dtype=dtype) + 0.5) / width)
            t[:width] = edge
            t[n - width:] = torch.minimum(t[n - width:], edge.flip(0))
        return t
    return ramp(shape[0])[:, None] * ramp(shape[1])[None, :]


def operator_gain(layer: nn.Conv2d, delta: torch.Tensor) -> float:
    """||A delta|| / ||delta|| with the layer's real (zero-padded) conv, in float64 (delta (C, H, W))."""
    d = delta.double().unsqueeze(0)
    return float(conv_apply(layer, d).norm() / d.norm())


def boundary_near_null(layer: nn.Conv2d, input_shape: Sequence[int], k: int = 4,
                       crop: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most invisible perturbations supported in a crop x crop corner of the image, on the full image.

    Zero padding makes border pixels less visible than interior ones (fewer windows see them), so the
    whole-image operator's smallest singular vectors can sit at the corners, outside what
    ``polyphase_spectrum`` (circular boundary) describes. Restricted to a corner, the operator is small and
    exact: its columns are the corner's pixels, its rows every window that sees them (on a canvas with the
    image's alignment to the stride). Returns (gains (k,) = ||A v|| measured by a direct convolution on the
    full image, ascending; images (k, C, H, W) unit norm). Each gain bounds sigma_min of the full operator.
    """
    c, h, w = _conv_input_shape(layer, input_shape)
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride  # type: ignore[misc]
    m_h, m_w = min(crop, h), min(crop, w)
    canvas_h = min(h, m_h + kh + (h - m_h - kh) % sh) if h > m_h + kh else h
    canvas_w = min(w, m_w + kw + (w - m_w - kw) % sw) if w > m_w + kw else w
    found: list[tuple[float, torch.Tensor]] = []
    for top in (True, False):
        for left in (True, False):
            rows = slice(0, m_h) if top else slice(canvas_h - m_h, canvas_h)
            cols = slice(0, m_w) if left else slice(canvas_w - m_w, canvas_w)
            a = dense_operator(layer, (c, canvas_h, canvas_w), region=(rows, cols), max_inputs=10_000)
            _, vh = _smallest_right_singular(a)
            for v in vh[:k]:
                full = torch.zeros(c, h, w, dtype=torch.float64)
                full[:, rows if top else slice(h - m_h, h), cols if left else slice(w - m_w, w)] = \
                    v.reshape(c, m_h, m_w)
                found.append((operator_gain(layer, full), full / full.norm()))
    found.sort(key=lambda t: t[0])
    return torch.tensor([g for g, _ in found[:k]]), torch.stack([v for _, v in found[:k]])


# --- why tiling fails for overlapping windows ------------------------------------------------------

def window_stats(layer: nn.Conv2d, p: torch.Tensor, phi: torch.Tensor) -> dict[str, Any]:
    """What the conv's windows see of a tiled perturbation p (C, H, W): how many windows equal phi exactly.

    Returns ``exact_fraction`` (windows whose content is beta*phi for some beta, incl. 0), and
    ``window_residual`` (H', W') = ||W1 window|| / (||W1||_2 ||window||), the per-window leak.
    """
    cols = F.unfold(p.double().unsqueeze(0), layer.kernel_size, layer.dilation, layer.padding, layer.stride)[0]
    cols = cols.T  # (L, C*kh*kw)
    w = weight_matrix(layer).cpu()
    u = phi.double().flatten() / phi.double().norm()
    along = cols @ u
    off = (cols - along[:, None] * u[None]).norm(dim=1)
    exact = off <= 1e-9 * cols.norm(dim=1).clamp_min(1e-300)
    leak = (cols @ w.T).norm(dim=1) / (torch.linalg.matrix_norm(w, 2) * cols.norm(dim=1).clamp_min(1e-300))
    hh, ww = _out_hw(layer, p.shape)
    return {"exact_fraction": float(exact.double().mean()), "window_residual": leak.reshape(hh, ww)}


def _out_hw(layer: nn.Conv2d, shape: Sequence[int]) -> tuple[int, int]:
    h, w = shape[-2:]
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding  # type: ignore[misc]
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def periodic_patch_matrix(layer: nn.Conv2d) -> torch.Tensor:
    """W1 restricted to stride-periodic patches: (out, C*sh*sw) float64.

    A tiled perturbation is realisable by an image, with every window showing the same phi (Remark 3),
    only if phi repeats with the stride inside the kernel; such phi live in a C*sh*sw dimensional space, and
    ``W1 phi = 0`` there iff this matrix has a kernel (it is M(omega = 0) of the polyphase spectrum).
    """
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride  # type: ignore[misc]
    a = F.one_hot(torch.arange(kh) % sh, sh).double()
    b = F.one_hot(torch.arange(kw) % sw, sw).double()
    w = layer.weight.detach().cpu().double()
    return torch.einsum("ocuv,ua,vb->ocab", w, a, b).reshape(w.shape[0], -1)


# --- command line -----------------------------------------------------------------------------------

def collide(model_name: str, image: str = "astronaut", beta: float = 2.0, weights: str = "auto",
            device: str = "auto", seed: int = 0, size: int = 224) -> dict[str, Any]:
    """Run the paper's null-space search on a registry model and one image; return residuals and predictions."""
    from . import data, models, runtime

    loaded = models.load(model_name, weights, device)  # type: ignore[arg-type]
    name, layer = first_layer(loaded.model)
    dev = runtime.resolve_device(device)
    if loaded.spec.task == "mnist":
        digits, _ = data.mnist(train=False)
        x = digits[:1]
    else:
        x = model_input(loaded, data.imagenet_pixels(data.load_image(image), size))
    basis = kernel_basis(layer, name=name)
    gen = torch.Generator().manual_seed(seed)
    phi = basis.vectors[int(torch.randint(basis.vectors.shape[0], (1,), generator=gen))]
    x = x.to(dev)
    x_hat = null_space_search(x, layer, phi, beta)
    res = collision_residuals(loaded.model, x, x_hat, layer)
    with torch.no_grad():
        logits = output_tensor(loaded.model(torch.cat([x, x_hat])))
    top = logits.flatten(2).mean(-1) if logits.dim() > 2 else logits
    names = loaded.class_names
    preds = [[names[i] if i < len(names) else str(i) for i in t.topk(5).indices.tolist()] for t in top]
    p = (x_hat - x).cpu()
    return {"model": model_name, "weights": loaded.weights, "first_layer": name,
            "W1": list(basis.matrix_shape), "nullity": basis.nullity, "beta": beta,
            "perturbation_l2": float(p.norm()), "perturbation_linf": float(p.abs().max()),
            "space": "model input (normalised for ImageNet models)",
            "top5_original": preds[0], "top5_colliding": preds[1], **res}


def _collide_command(args: argparse.Namespace) -> int:
    out = collide(args.model, args.image, args.beta, args.weights, args.device, args.seed)
    from .__main__ import print_report

    print_report(out, args.json)
    return 0


def add_cli(subparsers: Any) -> None:
    """``python -m helpers collide MODEL --image astronaut --beta 2 --json``."""
    from .__main__ import add_common

    p = subparsers.add_parser("collide", help="null-space search on a model's first layer: residuals, top-5")
    p.add_argument("model", help="a registry name (see `models`)")
    p.add_argument("--image", default="astronaut", help="sample name, path or URL (ImageNet models)")
    p.add_argument("--beta", type=float, default=2.0, help="perturbation multiplier (model-space units)")
    p.add_argument("--seed", type=int, default=0, help="which basis vector (random choice)")
    add_common(p)
    p.set_defaults(func=_collide_command)


def input_normalization(loaded: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that a registry model's input is normalised with (ImageNet's by default).

    timm ViT-B uses (0.5, 0.5, 0.5) for both; torchvision models and DeiT use ImageNet's. The model-space
    perturbation P of this module is ``P * std`` in pixels.
    """
    from . import data

    transform = getattr(loaded, "transform", None)
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean = torch.as_tensor(step.mean, dtype=torch.float64).flatten().tolist()
            std = torch.as_tensor(step.std, dtype=torch.float64).flatten().tolist()
            return tuple(mean), tuple(std)
    return data.IMAGENET_MEAN, data.IMAGENET_STD


def model_input(loaded: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, C, H, W) in [0, 1] -> the model's (normalised) input, with ``input_normalization``."""
    mean, std = input_normalization(loaded)
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return to_model_space(pixels - m, std)


def exact_null_directions(layer: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """An orthonormal basis (k, *input_shape) of the first layer's exact null space on whole inputs.

    Linear: ker(W1). Conv2d with non-overlapping windows (stride == kernel, no padding, whole patches):
    ker(W1) in each patch independently. Other convs: the null space of the dense whole-image operator
    (small images only; may be empty, e.g. ResNet-50's conv1). Model space, float64.
    """
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return kernel_basis(layer).vectors.reshape(-1, *input_shape)
    c, h, w = _conv_input_shape(layer, input_shape)
    k, s, p = tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.padding)
    if k == s and p == (0, 0) and h % k[0] == 0 and w % k[1] == 0 and layer.groups == 1:
        basis = kernel_basis(layer).vectors
        rows, cols = h // k[0], w // k[1]
        out = torch.zeros(rows * cols * basis.shape[0], c, h, w, dtype=torch.float64)
        i = 0
        for r in range(rows):
            for q in range(cols):
                out[i:i + basis.shape[0], :, r * k[0]:(r + 1) * k[0], q * k[1]:(q + 1) * k[1]] = basis
                i += basis.shape[0]
        return out
    _, vectors = operator_null_space(layer, (c, h, w))
    return vectors


def random_collision(x: torch.Tensor, directions: torch.Tensor, size: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """x + d per image, d a random combination of ``directions`` (k, ...) with ||d|| = size * ||x_i||."""
    if directions.shape[0] == 0:
        raise TrivialKernelError("no exact null directions for this layer and input size")
    coeff = torch.randn(x.shape[0], directions.shape[0], generator=generator, dtype=torch.float64)
    d = (coeff @ directions.reshape(directions.shape[0], -1)).reshape(x.shape[0], *directions.shape[1:])
    scale = size * x.double().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    d = d * scale.view(-1, *[1] * (d.dim() - 1))
    return x + d.to(x.dtype).to(x.device)
