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

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from helpers.data.normalization import (
    PixelInputError,
    PixelSpace,
    check_pixels,
    model_input,
)
from helpers.linalg.conv_operator import _conv_input_shape, operator_gain
from helpers.linalg.kernels import (
    PixelKernel,
    TrivialKernelError,
    _check_layer,
    _from_patches,
    _patch_shape,
    _to_patches,
    first_layer,
    kernel_basis,
    pixel_kernel,
)
from helpers.models.forward import batched, output_tensor

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


def patch_grid(layer: nn.Conv2d, input_shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the tiles of the paper's construction: kernel-sized tiles from the first window on."""
    _, h, w = _conv_input_shape(layer, input_shape)
    kh, kw = layer.kernel_size
    ph, pw = _padding(layer)
    return math.ceil((h + ph) / kh), math.ceil((w + pw) / kw)


def _padding(layer: nn.Conv2d) -> tuple[int, int]:
    """The conv's (top, left) padding; string paddings ("same", "valid") are refused."""
    if isinstance(layer.padding, str):
        raise ValueError(f"padding={layer.padding!r} is not supported; give the padding in pixels")
    ph, pw = layer.padding
    return ph, pw


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
        raise ValueError(
            f"region mask has shape {tuple(mask.shape)}; valid: the tile grid {tuple(grid)}, "
            "a box (r0, c0, r1, c1) in tile units, or None"
        )
    return mask


def null_space_perturbation(
    layer: nn.Module,
    input_shape: Sequence[int],
    phi: torch.Tensor,
    beta: float | torch.Tensor = 1.0,
    region: Any = None,
) -> torch.Tensor:
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
            raise ValueError(
                "region is not supported for a Linear first layer (masking breaks W1 phi = 0); "
                "use restricted_kernel_basis(layer, mask) to get kernel vectors inside a region"
            )
        if phi.numel() != layer.in_features or math.prod(input_shape) != layer.in_features:
            raise ValueError(
                f"phi has {phi.numel()} elements and input_shape {tuple(input_shape)} has "
                f"{math.prod(input_shape)}; the Linear layer takes {layer.in_features}"
            )
        return (torch.as_tensor(beta, dtype=torch.float64) * phi).reshape(tuple(input_shape))
    assert isinstance(layer, nn.Conv2d)  # _check_layer: Linear or Conv2d
    c, h, w = _conv_input_shape(layer, input_shape)
    rows, cols = patch_grid(layer, (c, h, w))
    patch = _patch_shape(layer)
    if tuple(phi.shape) == patch:
        tiles = phi.expand(rows, cols, *patch)
    elif tuple(phi.shape[-3:]) == patch and phi.shape[:-3].numel() == rows * cols:
        tiles = phi.reshape(rows, cols, *patch)
    else:
        raise ValueError(
            f"phi has shape {tuple(phi.shape)}; valid: {patch} or (rows, cols, *{patch}) with "
            f"(rows, cols) = {(rows, cols)} tiles"
        )
    scale = torch.as_tensor(beta, dtype=torch.float64).cpu()
    if scale.ndim not in (0, 2) or (scale.ndim == 2 and tuple(scale.shape) != (rows, cols)):
        raise ValueError(f"beta has shape {tuple(scale.shape)}; valid: a scalar or {(rows, cols)} per tile")
    scale = scale.expand(rows, cols) * region_mask((rows, cols), region)
    tiles = tiles * scale[:, :, None, None, None]
    tiles = tiles.repeat(1, 1, layer.groups, 1, 1)  # the same phi for every channel group
    kh, kw = patch[1:]
    canvas = tiles.permute(2, 0, 3, 1, 4).reshape(c, rows * kh, cols * kw)
    ph, pw = _padding(layer)
    return canvas[:, ph : ph + h, pw : pw + w].reshape(tuple(input_shape)).contiguous()


def null_space_search(
    x: torch.Tensor, layer: nn.Module, phi: torch.Tensor, beta: float | torch.Tensor = 1.0, region: Any = None
) -> torch.Tensor:
    """psi(x, phi) = x + P for a batch x (B, ...) in model space; returns x's dtype and device."""
    if isinstance(layer, nn.Conv2d) and x.dim() != 4:
        raise ValueError(f"x must be a batch (B, C, H, W) for a Conv2d first layer, got shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (B, ...), got shape {tuple(x.shape)}")
    p = null_space_perturbation(layer, tuple(x.shape[1:]), phi, beta, region)
    return x + p.to(x.dtype).to(x.device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm().clamp_min(1e-300))


@torch.no_grad()
def collision_residuals(
    model: nn.Module, x: torch.Tensor, x_hat: torch.Tensor, layer: nn.Module | None = None
) -> dict[str, Any]:
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


def directions_at_equal_size(
    model: nn.Module,
    x: torch.Tensor,
    layer: nn.Conv2d,
    directions: dict[str, torch.Tensor],
    size: float,
    sigma_max: float,
) -> dict[str, dict[str, Any]]:
    """Add each direction (C, H, W), rescaled to l2 norm ``size`` (model-space units), to x (1, C, H, W).

    Per direction: the residuals of ``collision_residuals`` at ``layer`` and ``gain/sigma_max``, the layer's
    operator gain ||A d|| / ||d|| (float64, zero padding) relative to the largest singular value ``sigma_max``.
    """
    rows = {}
    for label, direction in directions.items():
        d = direction / direction.norm() * size
        x_hat = x + d.to(x.dtype).to(x.device).unsqueeze(0)
        rows[label] = {
            **collision_residuals(model, x, x_hat, layer),
            "gain/sigma_max": operator_gain(layer, d) / sigma_max,
        }
    return rows


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model itself for its own dtype, else a deep copy converted to ``dtype`` (e.g. float64 checks)."""
    current = next(model.parameters()).dtype
    return model if current == dtype else copy.deepcopy(model).to(dtype)


def feasible_beta(x: torch.Tensor, direction: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> float:
    """The largest beta >= 0 with ``lo <= x + beta * direction <= hi`` everywhere (both in the same space).

    ``inf`` when direction is zero; 0 when x is already outside [lo, hi] where direction pushes it further.
    Raises ValueError when lo >= hi or direction does not broadcast to x's shape.
    """
    if not lo < hi:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    try:
        fits = torch.broadcast_shapes(x.shape, direction.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"direction {tuple(direction.shape)} does not broadcast to x {tuple(x.shape)}")
    d = direction.to(x.dtype)
    up = torch.where(d > 0, (hi - x) / d, torch.full_like(x, math.inf))
    down = torch.where(d < 0, (lo - x) / d, torch.full_like(x, math.inf))
    return float(torch.minimum(up, down).min().clamp_min(0.0))


def collide(
    model_name: str,
    image: str = "astronaut",
    beta: float = 2.0,
    weights: str = "auto",
    device: str = "auto",
    seed: int = 0,
    size: int = 224,
) -> dict[str, Any]:
    """Run the paper's null-space search on a registry model and one image; return residuals and predictions."""
    from helpers import runtime
    from helpers.data import mnist_data, photos
    from helpers.models import registry

    loaded = registry.load(model_name, weights, device)  # type: ignore[arg-type]
    name, layer = first_layer(loaded.model)
    dev = runtime.resolve_device(device)
    if loaded.spec.task == "mnist":
        digits, _ = mnist_data.load(train=False)
        x = digits[:1]
    else:
        x = model_input(loaded, photos.imagenet_pixels(photos.load_image(image), size))
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
    return {
        "model": model_name,
        "weights": loaded.weights,
        "first_layer": name,
        "W1": list(basis.matrix_shape),
        "nullity": basis.nullity,
        "beta": beta,
        "perturbation_l2": float(p.norm()),
        "perturbation_linf": float(p.abs().max()),
        "space": "model input (normalised for ImageNet models)",
        "top5_original": preds[0],
        "top5_colliding": preds[1],
        **res,
    }


def random_collision(
    x: torch.Tensor, directions: torch.Tensor, size: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x + d per image, d a random combination of ``directions`` (k, ...) with ||d|| = size * ||x_i||."""
    if directions.shape[0] == 0:
        raise TrivialKernelError("no exact null directions for this layer and input size")
    coeff = torch.randn(x.shape[0], directions.shape[0], generator=generator, dtype=torch.float64)
    d = (coeff @ directions.reshape(directions.shape[0], -1)).reshape(x.shape[0], *directions.shape[1:])
    scale = size * x.double().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    d = d * scale.view(-1, *[1] * (d.dim() - 1))
    return x + d.to(x.dtype).to(x.device)


def _max_scale(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Largest s >= 0 per patch with lo <= s * p <= hi (lo <= 0 <= hi); p (..., d) -> (..., 1); 0 for p = 0."""
    big = torch.full_like(p, float("inf"))
    up = torch.where(p > 0, hi / p.clamp_min(1e-300), big)
    down = torch.where(p < 0, lo / p.clamp_max(-1e-300), big)
    scale = torch.minimum(up, down).amin(-1, keepdim=True)
    return torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))


def _vanish_on(basis: torch.Tensor, pinned: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Kernel vectors ``a @ basis`` that vanish on the ``pinned`` coordinates, for random coefficients ``coeffs``
    (n, k): each row is projected onto null(A), A = basis[:, pinned].T (m, k), through the m x m Gram matrix
    (cheap: m, the pinned pixels of one patch, is small). Returns (n, d), all zero when null(A) = {0}."""
    a_mat = basis[:, pinned].T  # (m, k)
    gram = a_mat @ a_mat.T
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > 1e-12 * max(1.0, float(evals.max()))
    if int(keep.sum()) >= basis.shape[0]:  # the pinned pixels use up every kernel direction
        return coeffs.new_zeros(coeffs.shape[0], basis.shape[1])
    row_space = (evecs[:, keep] / evals[keep].sqrt()).T @ a_mat  # orthonormal rows spanning row(A), (r, k)
    coeffs = coeffs - (coeffs @ row_space.T) @ row_space
    out = coeffs @ basis
    out[:, pinned] = 0.0  # exact zeros (they are ~1e-16 already)
    return out


def kernel_directions(kernel: PixelKernel, pinned: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random unit directions per patch in the kernel, zero on pinned pixels: (n, L, d) float64.

    pinned: (L, d) bool, the pixels that have no room on one side (at the budget or at 0 / 1). Patches whose
    pinned pixels leave no kernel direction get zeros (that part of the image stays as the attack left it).
    Raises ValueError when pinned is not (L, kernel.dim).
    """
    if pinned.dim() != 2 or pinned.shape[1] != kernel.dim:
        raise ValueError(f"pinned must be (L, {kernel.dim}) (patches x pixels per patch), got {tuple(pinned.shape)}")
    L, d = pinned.shape
    out = torch.zeros(n, L, d, dtype=torch.float64)
    free = ~pinned.any(1)
    if free.any():
        c = torch.randn(n, int(free.sum()), kernel.nullity, generator=generator, dtype=torch.float64)
        out[:, free] = c @ kernel.basis
    for patch in torch.nonzero(~free).flatten().tolist():
        coeffs = torch.randn(n, kernel.nullity, generator=generator, dtype=torch.float64)
        out[:, patch] = _vanish_on(kernel.basis, pinned[patch], coeffs)
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-300)


@dataclass
class CollidingSet:
    """Colliding adversarial examples: ``images`` (N, C, H, W) in [0, 1], each x' + P_i with P_i in the first
    layer's pixel-space kernel and ||images_i - clean||_inf <= eps. ``perturbations`` = images - adversarial."""

    clean: torch.Tensor
    adversarial: torch.Tensor
    images: torch.Tensor
    perturbations: torch.Tensor
    eps: float
    kernel: PixelKernel
    seconds: float


def headroom(
    clean: torch.Tensor, adversarial: torch.Tensor, eps: float, margin: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel room (lo <= 0 <= hi, float64, same shape) for a perturbation P of the adversarial image x'
    such that ||x' + P - x||_inf <= eps and x' + P stays in [0, 1]; shrunk by ``margin`` to absorb float32
    round-off when x' + P is stored. Raises ValueError for different shapes or eps <= 0."""
    if clean.shape != adversarial.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and adversarial {tuple(adversarial.shape)} differ in shape")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    delta = (adversarial - clean).double()
    x_adv = adversarial.double()
    lo = torch.maximum(-eps - delta, -x_adv) + margin
    hi = torch.minimum(eps - delta, 1 - x_adv) - margin
    return lo.clamp_max(0), hi.clamp_min(0)


def colliding_adversarials(
    model: nn.Module,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    *,
    eps: float,
    n: int = 100,
    kernel: PixelKernel | None = None,
    margin: float = 1e-6,
    seed: int = 0,
) -> CollidingSet:
    """``n`` distinct images x_hat = x' + P_i (Eq. 7 of the paper) within ``eps`` (l_inf, pixels) of the
    clean image and inside [0, 1], with every patch of P_i in the kernel of the first layer.

    model: pixel-space model (``PixelSpace``); clean, adversarial: (1, C, H, W) in [0, 1]. Per patch, P_i is a
    random (seeded) kernel direction that vanishes on the pixels with no two-sided room (``headroom``), scaled
    by the largest multiplier that keeps every pixel inside its room (the paper's individual multipliers
    beta_i). Nothing is clipped afterwards, so the collision stays exact up to float round-off. A pixel has
    two-sided room only if the attack left some budget (|x' - x| < eps) and x' is not 0 or 1: an attack that
    uses the whole budget everywhere leaves no colliding twin (that is measured, not hidden).
    """
    check_pixels(clean, "clean")
    check_pixels(adversarial, "adversarial")
    if clean.shape != adversarial.shape or clean.shape[0] != 1:
        raise PixelInputError(
            f"clean and adversarial must both be (1, C, H, W), got {tuple(clean.shape)} and {tuple(adversarial.shape)}"
        )
    if n < 1:
        raise PixelInputError(f"n must be >= 1, got {n}")
    start_time = time.perf_counter()
    kernel = kernel or pixel_kernel(model, clean.shape[1:])
    lo, hi = headroom(clean.cpu(), adversarial.cpu(), eps, margin)
    lo_p, hi_p = _to_patches(lo, kernel.patch)[0], _to_patches(hi, kernel.patch)[0]  # (L, d)
    pinned = (lo_p >= 0) | (hi_p <= 0)
    directions = kernel_directions(kernel, pinned, n, torch.Generator().manual_seed(seed))
    p = directions * _max_scale(directions, lo_p, hi_p)
    perturbations = _from_patches(p, kernel.patch, clean.shape[1:])
    images = (adversarial.double().cpu() + perturbations).to(adversarial.dtype).to(adversarial.device)
    return CollidingSet(clean, adversarial, images, images - adversarial, eps, kernel, time.perf_counter() - start_time)


@torch.no_grad()
def describe_colliding(model: nn.Module, colliding: CollidingSet, batch: int = 32) -> dict[str, Any]:
    """What the claims need: how many twins keep the adversarial prediction, their l_inf to the clean image,
    pixel range, pairwise distances, perturbation size and the relative change of the model's output.

    Works for classifiers (logits (N, K)) and segmentation models (logits (N, K, H, W): "keeps" = same mask).
    """
    out_adv = batched(model, colliding.adversarial, batch)
    out_clean = batched(model, colliding.clean, batch)
    out = batched(model, colliding.images, batch)
    pred_adv, pred = out_adv.argmax(1), out.argmax(1)
    same = (pred == pred_adv).reshape(len(pred), -1).all(1)
    flat = colliding.images.reshape(len(colliding.images), -1).double().cpu()
    n = len(flat)
    pair_linf = torch.cdist(flat, flat, p=float("inf")) if n > 1 else torch.zeros(1, 1)
    pair_l2 = torch.cdist(flat, flat) if n > 1 else torch.zeros(1, 1)
    off = ~torch.eye(n, dtype=torch.bool) if n > 1 else torch.ones(1, 1, dtype=torch.bool)
    pert = colliding.perturbations.reshape(n, -1).cpu()
    scale = out_adv.abs().max().clamp_min(1e-30)
    return {
        "n": n,
        "distinct": int(torch.unique(flat, dim=0).shape[0]),
        "keep_adversarial_prediction": int(same.sum()),
        "adversarial_differs_from_clean": bool((pred_adv != out_clean.argmax(1)).any()),
        "max_rel_output_change": ((out - out_adv).abs().amax(tuple(range(1, out.dim()))) / scale).max().item(),
        "max_linf_to_clean": (colliding.images - colliding.clean).abs().max().item(),
        "eps": colliding.eps,
        "within_eps": bool((colliding.images - colliding.clean).abs().max() <= colliding.eps + 1e-6),
        "in_range": bool(colliding.images.min() >= 0 and colliding.images.max() <= 1),
        "perturbation_linf_median": pert.abs().amax(1).median().item(),
        "perturbation_l2_median": pert.norm(dim=1).median().item(),
        "pairwise_linf_min": pair_linf[off].min().item(),
        "pairwise_linf_median": pair_linf[off].median().item(),
        "pairwise_l2_min": pair_l2[off].min().item(),
        "pairwise_l2_median": pair_l2[off].median().item(),
        "seconds": colliding.seconds,
    }


def tiled_twin(
    model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, *, eps: float, seed: int = 0
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The paper's construction P = beta [phi ... phi] (``null_space_perturbation``, phi a random
    kernel vector of the first layer, mapped to pixels by the model's std) added to ``adversarial`` with the
    largest beta that keeps the image within ``eps`` of ``clean`` and inside [0, 1]; for first layers where
    exact twins do not exist (overlapping windows). Returns (twin (1, C, H, W), collision_residuals
    between adversarial and twin, plus "beta" and "linf_to_clean"). Raises ``PixelInputError`` unless clean
    and adversarial are (1, C, H, W) pixels in [0, 1]."""
    check_pixels(clean, "clean")
    check_pixels(adversarial, "adversarial")
    if clean.shape != adversarial.shape or clean.shape[0] != 1:
        raise PixelInputError(
            f"clean and adversarial must both be (1, C, H, W), got {tuple(clean.shape)} and {tuple(adversarial.shape)}"
        )
    from helpers.data import normalization
    from helpers.linalg import kernels

    inner = model.model if isinstance(model, PixelSpace) else model
    _, layer = kernels.first_layer(inner)
    phi = kernels.kernel_basis(layer).random_vector(torch.Generator().manual_seed(seed))
    p = null_space_perturbation(layer, tuple(clean.shape[1:]), phi, 1.0)
    if isinstance(model, PixelSpace) and model.std is not None:
        p = normalization.to_pixel_space(p, torch.as_tensor(model.std).view(-1).tolist())
    lo, hi = headroom(clean.cpu(), adversarial.cpu(), eps)
    beta = float(_max_scale(p.reshape(1, -1), lo.reshape(1, -1), hi.reshape(1, -1)))
    twin = (adversarial.double().cpu() + beta * p).to(adversarial.dtype).to(adversarial.device)
    residuals = collision_residuals(model, adversarial, twin)
    residuals.update(beta=beta, linf_to_clean=float((twin - clean).abs().max()))
    return twin, residuals


def random_kernel_perturbation(kernel: PixelKernel, image_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A pixel perturbation (1, C, H, W), float32, with an independent random kernel direction in every patch,
    scaled to l_inf 1 (no range constraint: add beta times it to get a twin at l_inf distance beta).

    image_shape: (C, H, W); raises ValueError when it does not match the kernel's patches (C*kh*kw, or C*H*W
    for a Linear first layer, must equal ``kernel.dim``; H, W multiples of the patch).
    """
    c, h, w = image_shape
    per_patch = c * h * w if kernel.patch is None else c * kernel.patch[0] * kernel.patch[1]
    if per_patch != kernel.dim or (kernel.patch is not None and (h % kernel.patch[0] or w % kernel.patch[1])):
        raise ValueError(
            f"image shape {tuple(image_shape)} does not fit the kernel's patches ({kernel.patch}, {kernel.dim} pixels)"
        )
    grid = 1 if kernel.patch is None else (h // kernel.patch[0]) * (w // kernel.patch[1])
    free = torch.zeros(grid, kernel.dim, dtype=torch.bool)
    p = _from_patches(kernel_directions(kernel, free, 1, torch.Generator().manual_seed(seed)), kernel.patch, (c, h, w))
    return (p / p.abs().max()).float()


def colliding_report(
    model: nn.Module,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    *,
    eps: float,
    n: int = 100,
    kernel: PixelKernel | None = None,
    seed: int = 0,
) -> tuple[CollidingSet, dict[str, Any]]:
    """``colliding_adversarials`` then ``describe_colliding``: (the ``n`` twins, their report).

    model: pixel-space model; clean, adversarial: (1, C, H, W) pixels in [0, 1]; eps: l_inf budget around
    ``clean`` in pixel units; kernel: a precomputed ``pixel_kernel`` (one SVD per model) or None. Raises
    ``PixelInputError`` for non-pixel inputs or n < 1 (as ``colliding_adversarials``).
    """
    twins = colliding_adversarials(model, clean, adversarial, eps=eps, n=n, kernel=kernel, seed=seed)
    return twins, describe_colliding(model, twins)


@dataclass
class ExactModel:
    """The first of several registry models whose first layer admits exact colliding twins.

    ``loaded``: the registry ``LoadedModel``; ``model``: it as a function of pixels (``PixelSpace``);
    ``kernel``: its first layer's pixel-space kernel; ``skipped``: {name: why} for the models tried before.
    """

    name: str
    loaded: Any
    model: PixelSpace
    kernel: PixelKernel
    skipped: dict[str, str]


def first_exact_model(load: Callable[[str], Any], names: Sequence[str], image_shape: Sequence[int]) -> ExactModel:
    """Load ``names`` in order with ``load`` (e.g. ``Chapter.load``) until one has a non-trivial, non-overlapping
    first-layer kernel on (C, H, W) ``image_shape`` images. Raises ``TrivialKernelError`` if none has."""
    from helpers.data.normalization import pixel_space
    from helpers.linalg.kernels import first_layer_kernel_or_reason

    skipped: dict[str, str] = {}
    for name in names:
        loaded = load(name)
        model = pixel_space(loaded)
        kernel, why = first_layer_kernel_or_reason(model, tuple(image_shape))
        if kernel is not None:
            return ExactModel(name, loaded, model, kernel, skipped)
        skipped[name] = why
    raise TrivialKernelError(
        "no exact colliding twins for any of " + ", ".join(f"{n} ({why})" for n, why in skipped.items())
    )


class Requirement(NamedTuple):
    """One must-hold check of a claims cell: ``Checks.require(*requirement)`` records it."""

    ok: bool
    what: str
    measured: str


# --- Sec. 6: first-layer residual against beta, in float32 and float64 ---------------------------------------


def first_layers(load: Callable[[str], Any], names: Sequence[str]) -> dict[str, nn.Module]:
    """{name: first Linear/Conv2d layer} of the models ``load(name)`` returns (``LoadedModel`` or an object
    with a ``.model``); only the layers are kept, the rest of each model is dropped."""
    layers = {}
    for name in names:
        loaded = load(name)
        layers[name] = first_layer(loaded.model)[1]
        del loaded
    return layers


def search_direction(layer: nn.Module) -> torch.Tensor:
    """A unit direction for the null-space search, in patch shape (float64): the first vector of ker W1, or, when
    the kernel is trivial, the right singular vector of W1's smallest singular value (``near_null_basis``)."""
    from helpers.linalg.kernels import near_null_basis

    try:
        return kernel_basis(layer).vectors[0]
    except TrivialKernelError:
        return near_null_basis(layer, k=1).vectors[0]


def layer_batch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The batch (B, ...) as ``layer`` takes it: flattened to (B, in_features) for a Linear layer, else as is."""
    return x.flatten(1) if isinstance(layer, nn.Linear) else x


@torch.no_grad()
def residual_vs_beta(
    layer: nn.Module, x: torch.Tensor, phi: torch.Tensor, betas: Sequence[float], dtype: torch.dtype
) -> list[float]:
    """First-layer relative change ||f1(x + P) - f1(x)|| / ||f1(x)|| of the paper's construction
    (``null_space_search``, multiplier beta), one float per beta, with layer and input in ``dtype``.

    x: (B, ...) in the layer's input space (``layer_batch``); phi: a direction in patch shape.
    """
    lay = in_dtype(layer, dtype)
    xd = x.to(dtype)
    f = lay(xd)
    return [float((lay(null_space_search(xd, lay, phi, b)) - f).double().norm() / f.double().norm()) for b in betas]


def residual_curves(
    layers: dict[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    betas: Sequence[float],
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
) -> dict[tuple[str, str], list[float]]:
    """``residual_vs_beta`` for every layer and dtype: {(layer name, "float32" | "float64"): [one per beta]}.

    inputs: {layer name: a batch (B, C, H, W) in model space}, flattened for Linear layers; the direction is
    ``search_direction(layer)``.
    """
    curves = {}
    for name, layer in layers.items():
        phi = search_direction(layer)
        for dtype in dtypes:
            curves[(name, str(dtype).removeprefix("torch."))] = residual_vs_beta(
                layer, layer_batch(layer, inputs[name]), phi, betas, dtype
            )
    return curves


def kernel_precision_rows(layers: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """One row per layer: the largest entry of W1 phi for the first unit kernel vector phi, computed in float32
    and in float64 (columns "layer", "W1" (shape), "max abs W1 phi, float32", "float64"); layers with a trivial
    kernel get "trivial kernel" and no numbers."""
    from helpers.linalg.kernels import weight_matrix

    rows: list[dict[str, Any]] = []
    for name, layer in layers.items():
        try:
            phi = kernel_basis(layer).flat()[0]
        except TrivialKernelError:
            rows.append({"layer": name, "W1": "trivial kernel", "max abs W1 phi, float32": None, "float64": None})
            continue
        w = weight_matrix(layer)
        e32 = float((w.float() @ phi.float()).abs().max())
        e64 = float((w @ phi).abs().max())
        rows.append({"layer": name, "W1": str(tuple(w.shape)), "max abs W1 phi, float32": e32, "float64": e64})
    return rows


def curve_rows(curves: dict[tuple[str, str], list[float]], betas: Sequence[float]) -> list[dict[str, Any]]:
    """``residual_curves`` as table rows: layer, dtype, then one column "beta=<b>" per multiplier."""
    return [
        {"layer": n, "dtype": dt, **{f"beta={b:g}": y for b, y in zip(betas, ys)}} for (n, dt), ys in curves.items()
    ]


def residual_curves_figure(curves: dict[tuple[str, str], list[float]], betas: Sequence[float]) -> plt.Figure:
    """Log-log plot of ``residual_curves`` against beta: float32 solid with dots, float64 dashed with squares
    (values below 1e-18 drawn at 1e-18)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (n, dt), ys in curves.items():
        ax.loglog(betas, [max(y, 1e-18) for y in ys], "-o" if dt == "float32" else "--s", ms=3, label=f"{n} {dt}")
    ax.set_xlabel("beta")
    ax.set_ylabel("first-layer relative change")
    ax.legend(fontsize=6, ncol=2)
    return fig


def sec6_requirements(
    curves: dict[tuple[str, str], list[float]],
    *,
    exact: Sequence[str],
    geometric: Sequence[str],
    tol32: float = 1e-4,
    tol64: float = 1e-12,
) -> list[Requirement]:
    """Sec. 6's decision rules on ``residual_curves``.

    ``exact`` layers (non-overlapping, exact kernel) must stay at round-off: every float32 residual < tol32 and
    every float64 one < tol64. ``geometric`` layers (overlapping windows) must leak in any precision: float64
    residuals all > 1e-6, and float32 and float64 agree to 1e-3 (relative) at the largest beta.
    """
    out = []
    for n in exact:
        c32, c64 = curves[(n, "float32")], curves[(n, "float64")]
        out.append(
            Requirement(
                max(c32) < tol32 and max(c64) < tol64,
                f"{n}: exact construction at round-off",
                f"float32 max {max(c32):.1e}, float64 max {max(c64):.1e}",
            )
        )
    for n in geometric:
        c32, c64 = curves[(n, "float32")], curves[(n, "float64")]
        out.append(
            Requirement(
                min(c64) > 1e-6 and abs(c32[-1] - c64[-1]) < 1e-3 * c64[-1],
                f"{n}: residual is geometric (same in float64)",
                f"{c32[-1]:.3g} vs {c64[-1]:.3g}",
            )
        )
    return out


# --- Trained MNIST models: exact collisions from the operator's null space ---------------------------------------


def zoo_rows(trained: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ``train.TrainedModel``: model, first layer, test accuracy (0..1), training seconds, cached."""
    return [
        {
            "model": k,
            "first layer": str(first_layer(t.model)[1]),
            "test accuracy": t.test_accuracy,
            "train s": t.train_seconds,
            "cached": t.from_cache,
        }
        for k, t in trained.items()
    ]


@dataclass
class ExactCollisions:
    """Per model: ``directions`` (k, C, H, W) float64, an orthonormal basis of the first layer's null space as an
    operator on the images; ``collided`` (B, C, H, W) float32 colliding images; ``residuals`` keyed
    "<model>, float32" and "<model>, float64" (``collision_residuals``)."""

    directions: dict[str, torch.Tensor]
    collided: dict[str, torch.Tensor]
    residuals: dict[str, dict[str, Any]]


def exact_collisions(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    *,
    size: float = 3.0,
    generator: torch.Generator | None = None,
) -> ExactCollisions:
    """For each model: its first layer's exact null directions on images shaped like ``x`` (B, C, H, W)
    (``exact_null_directions``, dense operator: small images only), and ``random_collision`` images at
    l2 distance ``size * ||x_i||``, built in float64 and checked in float32 (stored) and float64.

    The generator is shared across models, in the dict's order. Raises ``TrivialKernelError`` for a model whose
    first layer has no exact null direction at this size.
    """
    from helpers.linalg.conv_operator import exact_null_directions

    out = ExactCollisions({}, {}, {})
    for k, model in models.items():
        layer = first_layer(model)[1]
        out.directions[k] = exact_null_directions(layer, tuple(x.shape[1:]))
        collided64 = random_collision(x.double(), out.directions[k], size=size, generator=generator)
        out.collided[k] = collided64.float()
        out.residuals[f"{k}, float32"] = collision_residuals(model, x, out.collided[k], layer)
        out.residuals[f"{k}, float64"] = collision_residuals(in_dtype(model, torch.float64), x.double(), collided64)
    return out


@torch.no_grad()
def confidence(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 softmax probability (N,), top-1 class (N,)) of a classifier on a batch (N, ...)."""
    return model(images).softmax(-1).max(-1)


def confidence_gap(model: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Largest change of the top-1 probability between x and its colliding images x_hat (same shape (N, ...))."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    return float((confidence(model, x_hat)[0] - confidence(model, x)[0]).abs().max())


def confidence_figure(
    models: dict[str, nn.Module], x: torch.Tensor, collided: dict[str, torch.Tensor], n_show: int = 6
) -> plt.Figure:
    """Four columns: for each model and each of the first ``n_show`` images, the image and its colliding image,
    titled with the predicted class and its probability; every image stretched to [0, 1] for display."""
    from helpers.book import plotting

    images, titles = [], []
    for k, model in models.items():
        c0, y0 = confidence(model, x)
        c1, y1 = confidence(model, collided[k])
        for i in range(n_show):
            images += [x[i].cpu(), collided[k][i].cpu()]
            titles += [f"{k}: '{int(y0[i])}' p={float(c0[i]):.3f}", f"collided: '{int(y1[i])}' p={float(c1[i]):.3f}"]
    return plotting.image_grid([(r - r.min()) / (r.max() - r.min()) for r in images], titles, ncols=4, size=2.0)


def exact_collision_requirements(
    residuals: dict[str, dict[str, Any]],
    confidence_gaps: dict[str, float],
    tiled: dict[str, Any],
    *,
    tol32: float = 1e-5,
    tol64: float = 1e-12,
    max_gap: float = 1e-4,
) -> list[Requirement]:
    """The MNIST chapter's decision rules. For each model of ``confidence_gaps``: the first-layer residual
    (``residuals["<model>, float32"]`` / ``", float64"``) below tol32 / tol64, every prediction kept (float32),
    top-1 probability changed by less than ``max_gap``. ``tiled`` (the paper's tiled phi on an overlapping conv)
    must leak: first-layer relative change > 1e-3."""
    out = []
    for k, gap in confidence_gaps.items():
        r32, r64 = residuals[f"{k}, float32"], residuals[f"{k}, float64"]
        out += [
            Requirement(
                r32["first_layer_rel"] < tol32 and r64["first_layer_rel"] < tol64,
                f"{k}: first-layer residual at round-off (float32 < {tol32:g}, float64 < {tol64:g})",
                f"{r32['first_layer_rel']:.1e} / {r64['first_layer_rel']:.1e}",
            ),
            Requirement(
                r32["same_argmax"] == 1.0, f"{k}: every colliding image keeps the prediction", str(r32["same_argmax"])
            ),
            Requirement(gap < max_gap, f"{k}: same confidence", f"{gap:.1e}"),
        ]
    out.append(
        Requirement(
            tiled["first_layer_rel"] > 1e-3,
            "cnn: the tiled phi leaks (overlapping windows)",
            f"{tiled['first_layer_rel']:.3g}",
        )
    )
    return out
