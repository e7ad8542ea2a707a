"""Kernel bases of a first layer: ker(W1) by the paper's matrix rule, its near-null space, and in pixel space.

The matrix rule
---------------
``nn.Linear``: ``W1`` is ``out x in``. ``nn.Conv2d`` (also timm/torchvision patch embeddings): ``W1`` is
``out x (in/groups * kh * kw)``, the weight reshaped, acting on one unfolded patch. ``ker(W1)`` is computed by an
SVD in float64 with the book's one rank rule (:mod:`helpers.linalg.rank_rule`) at the precision the weights are
stored in (``layer_precision``), exactly as the audit applies it: the audit's nullity of a layer at that
precision is the number of basis vectors. Its vectors are returned in patch shape ``(in/groups, kh, kw)``
(``KernelBasis``); every unit vector phi in their span satisfies ``||W1 phi|| <= null_residual_bound(basis)``.
``PixelKernel`` / ``pixel_kernel`` give the same kernel for a model that takes pixels (``PixelSpace``).
The convolution as an operator on whole images is :mod:`helpers.linalg.conv_operator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from helpers.data.normalization import PixelInputError, PixelSpace
from helpers.linalg import rank_rule


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
    tol: the rank rule's threshold ``rtol * sigma_max`` below which a singular value counts as zero (absolute,
      same units as W1), for a near-null basis too (its vectors may lie above it).
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

    @property
    def residual_bound(self) -> float:
        """:func:`null_residual_bound` of this basis."""
        return null_residual_bound(self)

    def flat(self) -> torch.Tensor:
        """The vectors as rows of a (k, n) matrix."""
        return self.vectors.reshape(self.vectors.shape[0], -1)

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Linear combinations: coefficients (..., k) -> vectors (..., *patch_shape), still in the kernel."""
        coefficients = coefficients.to(self.vectors.dtype)
        return (coefficients @ self.flat()).reshape(*coefficients.shape[:-1], *self.patch_shape)

    def random_vectors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n unit-norm random combinations of the basis: (n, *patch_shape) float64, e.g. one per patch."""
        vectors = self.combine(torch.randn(n, self.vectors.shape[0], generator=generator, dtype=torch.float64))
        return vectors / vectors.flatten(1).norm(dim=1).view(-1, *([1] * len(self.patch_shape)))

    def random_vector(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A unit-norm random combination of the basis (patch_shape)."""
        c = torch.randn(self.vectors.shape[0], generator=generator, dtype=torch.float64)
        return self.combine(c / c.norm())


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
            raise UnsupportedLayerError(
                f"first layer with weights is {name!r} ({type(module).__name__}); the null-space "
                f"search supports {', '.join(c.__name__ for c in SUPPORTED)}"
            )
    raise UnsupportedLayerError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer")


def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, SUPPORTED):
        raise UnsupportedLayerError(f"unsupported layer {type(layer).__name__}; valid: nn.Linear, nn.Conv2d")
    if isinstance(layer, nn.Conv2d) and tuple(layer.dilation) != (1, 1):
        raise UnsupportedLayerError(
            f"dilated convolutions (dilation={layer.dilation}) are not supported; valid: dilation 1"
        )


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """The ``weight`` parameter of a Linear/Conv2d layer, as stored (a tensor, shape and dtype unchanged)."""
    _check_layer(layer)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def weight_matrix(layer: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W1 by the matrix rule: Linear (out, in); Conv2d (out, in/groups * kh * kw)."""
    w = layer_weight(layer).detach().to(dtype)
    return w.reshape(w.shape[0], -1)


def _patch_shape(layer: nn.Module) -> tuple[int, ...]:
    return tuple(layer_weight(layer).shape[1:])


def _svd(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = weight_matrix(layer, dtype)
    _, s, vh = torch.linalg.svd(w.cpu(), full_matrices=True)
    return w.cpu(), s, vh


def layer_precision(layer: nn.Module) -> torch.dtype:
    """The precision the rank rule uses for ``layer``: the dtype its weights are stored in."""
    return layer_weight(layer).dtype


def layer_rtol(layer: nn.Module) -> float:
    """The book's rank rule (:func:`rank_rule.default_rtol`) at the precision the weights are *stored* in."""
    w = layer_weight(layer)
    return rank_rule.default_rtol((w.shape[0], int(math.prod(w.shape[1:]))), layer_precision(layer))


def null_residual_bound(basis: KernelBasis) -> float:
    """An upper bound on ``||W1 phi||`` for every unit vector ``phi`` in the span of ``basis`` (absolute, the
    units of W1).

    Exact kernel: the rank rule's threshold ``tol = rtol * sigma_max`` (every basis vector's singular value is at
    most that), plus the float64 SVD's rounding allowance ``rank_rule.rounding_allowance(shape) * sigma_max``.
    Near-null basis: the largest singular value among the chosen vectors (0 for those beyond ``min(rows, cols)``),
    plus the same allowance. A combination ``sum c_i v_i`` of orthonormal right singular vectors with ``|c| = 1``
    has ``||W1 sum c_i v_i||^2 = sum c_i^2 sigma_i^2``, so the largest ``sigma_i`` bounds every direction.
    """
    s = basis.singular_values
    smax = float(s.max()) if s.numel() else 0.0
    slack = rank_rule.rounding_allowance(basis.matrix_shape) * smax
    if not basis.near_null:
        return basis.tol + slack
    cols = basis.matrix_shape[1]
    exact = cols - s.numel()  # right singular vectors with no singular value: exactly null
    k = basis.vectors.shape[0]
    chosen = s[s.numel() - (k - exact) :] if k > exact else s[:0]
    return (float(chosen.max()) if chosen.numel() else 0.0) + slack


def kernel_basis(
    layer: nn.Module, *, rtol: float | None = None, dtype: torch.dtype = torch.float64, name: str = ""
) -> KernelBasis:
    """An orthonormal basis of ker(W1): vectors (k, *patch_shape).

    A singular value counts as zero when it is below ``rtol * sigma_max`` (default ``layer_rtol``: the
    numerical rank at the precision the weights are stored in, the audit's rule). Right singular vectors of a
    wide matrix beyond its row count are exact kernel vectors whatever the tolerance. Raises
    ``TrivialKernelError`` when the nullity is 0.
    """
    w, s, vh = _svd(layer, dtype)
    rtol = layer_rtol(layer) if rtol is None else float(rtol)
    tol = rtol * float(s.max()) if s.numel() else 0.0
    rank = rank_rule.rank_from_singular_values(s, (w.shape[0], w.shape[1]), layer_precision(layer), rtol)
    vectors = vh[rank:]
    label = name or type(layer).__name__
    if vectors.shape[0] == 0:
        m, n = w.shape
        raise TrivialKernelError(
            f"layer {label!r} has a trivial kernel: W1 is {m} x {n} (weight {tuple(layer_weight(layer).shape)}) with "
            f"rank {rank} = its column count, so nullity(W1) = 0 at rtol={rtol:.2g} (sigma_min/sigma_max = "
            f"{float(s.min() / s.max()):.3g}). No exact null-space search exists there. Instead: use the "
            f"near-null space (near_null_basis: the smallest right singular vectors; the output then changes by "
            f"sigma_min * beta), a larger rtol, the conv operator's near-null space on the whole image "
            f"(polyphase_spectrum), or a later layer (a non-linear system, Sec. 4.2)."
        )
    return KernelBasis(
        vectors.reshape(-1, *_patch_shape(layer)),
        s,
        tol,
        label,
        tuple(layer_weight(layer).shape),
        False,
        (w @ vectors.T).norm(dim=0),
    )


def near_null_basis(layer: nn.Module, k: int = 8, *, dtype: torch.dtype = torch.float64, name: str = "") -> KernelBasis:
    """The k right singular vectors of W1 with the smallest singular values (exact kernel vectors first).

    For layers with a trivial kernel (ViT-B with random weights, a square 768 x 768 W1) this is the best a
    first-layer perturbation can do: ``||W1 phi|| = sigma`` for each unit vector. ``tol`` is the rank rule's
    threshold (as in :func:`kernel_basis`), so ``rank`` is the audit's rank of the layer.
    """
    w, s, vh = _svd(layer, dtype)
    n = vh.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the patch dimension), got {k}")
    vectors = vh[n - k :]
    return KernelBasis(
        vectors.reshape(-1, *_patch_shape(layer)),
        s,
        layer_rtol(layer) * float(s.max()) if s.numel() else 0.0,
        name or type(layer).__name__,
        tuple(layer_weight(layer).shape),
        True,
        (w @ vectors.T).norm(dim=0),
    )


def kernel_or_near_null_basis(layer: nn.Module, k: int, *, name: str = "") -> tuple[KernelBasis, bool]:
    """``(kernel_basis(layer), True)`` when ker(W1) is non-trivial, else ``(near_null_basis(layer, k), False)``.

    The flag says whether the vectors are an exact kernel (the perturbation collides exactly) or only the k
    smallest right singular vectors (the first layer's output then changes by sigma * beta).
    """
    try:
        return kernel_basis(layer, name=name), True
    except TrivialKernelError as err:
        print(err)
        return near_null_basis(layer, k, name=name), False


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
    return KernelBasis(
        full, basis.singular_values, basis.tol, "restricted", tuple(layer.weight.shape), False, (w @ full.T).norm(dim=0)
    )


class NotExactError(ValueError):
    """The first layer does not allow an exact null-space perturbation by patches (e.g. overlapping conv windows)."""


@dataclass
class PixelKernel:
    """An orthonormal basis of the first layer's kernel *in pixel space*, arranged by patches.

    ``basis``: (k, d) float64, orthonormal rows; d = C*kh*kw for a patch-embedding conv (stride = kernel, no
    padding), d = C*H*W for a Linear first layer. A pixel perturbation whose every patch (flattened C, kh, kw)
    lies in span(basis) leaves the first layer's output unchanged. ``patch``: (kh, kw), or None for Linear.
    When the model normalises its input by ``std`` per channel, the layer's kernel vector v becomes the pixel
    vector std * v (the mean cancels in differences), which is what ``basis`` spans.
    """

    basis: torch.Tensor
    patch: tuple[int, int] | None
    layer_name: str
    rtol: float | None

    @property
    def nullity(self) -> int:
        return self.basis.shape[0]

    @property
    def dim(self) -> int:
        return self.basis.shape[1]


def _patch_geometry(layer: nn.Module) -> tuple[int, int] | None:
    """(kh, kw) for a non-overlapping conv (stride = kernel, padding 0, dilation 1, groups 1); None for Linear."""
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, nn.Conv2d):
        k, s = tuple(layer.kernel_size), tuple(layer.stride)
        padding = layer.padding if isinstance(layer.padding, tuple) else (layer.padding,)
        if k == s and all(p == 0 for p in padding) and tuple(layer.dilation) == (1, 1) and layer.groups == 1:
            return k[0], k[1]
        raise NotExactError(
            f"first layer {layer} has overlapping or padded windows (kernel {k}, stride {s}, padding "
            f"{layer.padding}): a kernel vector added to each patch is not in the null space of the layer as an "
            "operator on the whole image, so collisions would not be exact. Valid: Linear, or Conv2d with "
            "stride = kernel_size, no padding, dilation 1, groups 1 (patch embeddings). See the Fig. 1 chapter."
        )
    raise NotExactError(f"first layer must be nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def pixel_kernel(model: nn.Module, image_shape: Sequence[int], rtol: float | None = None) -> PixelKernel:
    """The first layer's kernel in pixel space for a ``PixelSpace`` model (or a bare pixel-input model).

    image_shape: (C, H, W). Raises ``TrivialKernelError`` when the kernel is {0} at this tolerance and
    ``NotExactError`` when patches overlap.
    """

    inner = model.model if isinstance(model, PixelSpace) else model
    assert isinstance(inner, nn.Module)
    name, layer = first_layer(inner)
    patch = _patch_geometry(layer)
    vectors = kernel_basis(layer, rtol=rtol, dtype=torch.float64).vectors  # (k, *patch_shape)
    c, h, w = image_shape
    std = model.std if isinstance(model, PixelSpace) else None
    if isinstance(std, torch.Tensor):
        std = std.detach().double().cpu().view(-1)
        if std.numel() != c:
            raise PixelInputError(f"model normalises {std.numel()} channels but images have {c}")
        if patch is None:  # Linear on the flattened image: channel-major (C, H, W) order
            vectors = vectors * std.repeat_interleave(h * w).view(1, -1)
        else:
            vectors = vectors * std.view(1, -1, 1, 1)
    flat = vectors.reshape(vectors.shape[0], -1)
    q, _ = torch.linalg.qr(flat.T)  # orthonormal basis of the same subspace, (d, k)
    return PixelKernel(q.T.contiguous(), patch, name, rtol)


def _to_patches(x: torch.Tensor, patch: tuple[int, int] | None) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, d): the first layer's patches (L = 1, d = C*H*W for a Linear layer)."""
    if patch is None:
        return x.reshape(x.shape[0], 1, -1)
    return F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)


def _from_patches(p: torch.Tensor, patch: tuple[int, int] | None, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``_to_patches``; pixels outside the patch grid get zero."""
    if patch is None:
        return p.reshape(p.shape[0], *shape)
    return F.fold(p.transpose(1, 2), output_size=tuple(shape[-2:]), kernel_size=patch, stride=patch)


def first_layer_kernel_or_reason(model: nn.Module, image_shape: Sequence[int]) -> tuple[PixelKernel | None, str]:
    """``(pixel_kernel, "")`` when exact colliding twins exist for this model, else ``(None, reason)``."""

    try:
        return pixel_kernel(model, image_shape), ""
    except (TrivialKernelError, NotExactError) as err:
        return None, str(err).split(". ")[0]
