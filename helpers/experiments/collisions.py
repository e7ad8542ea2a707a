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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from helpers.data.normalization import (
    PixelInputError,
    PixelSpace,
    check_pixels,
    model_input,
)
from helpers.linalg.conv_operator import _conv_input_shape
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
    ph, pw = layer.padding  # type: ignore[misc]
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


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model itself for its own dtype, else a deep copy converted to ``dtype`` (e.g. float64 checks)."""
    current = next(model.parameters()).dtype
    return model if current == dtype else copy.deepcopy(model).to(dtype)


def feasible_beta(x: torch.Tensor, direction: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> float:
    """The largest beta >= 0 with ``lo <= x + beta * direction <= hi`` everywhere (both in the same space)."""
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
    """
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
    round-off when x' + P is stored."""
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
    between adversarial and twin, plus "beta" and "linf_to_clean")."""
    from helpers.data import normalization
    from helpers.linalg import kernels

    inner = model.model if isinstance(model, PixelSpace) else model
    _, layer = kernels.first_layer(inner)
    phi = kernels.kernel_basis(layer).random_vector(torch.Generator().manual_seed(seed))
    p = null_space_perturbation(layer, tuple(clean.shape[1:]), phi, 1.0)
    if isinstance(model, PixelSpace) and model.std is not None:
        p = normalization.to_pixel_space(p, model.std.view(-1).tolist())
    lo, hi = headroom(clean.cpu(), adversarial.cpu(), eps)
    beta = float(_max_scale(p.reshape(1, -1), lo.reshape(1, -1), hi.reshape(1, -1)))
    twin = (adversarial.double().cpu() + beta * p).to(adversarial.dtype).to(adversarial.device)
    residuals = collision_residuals(model, adversarial, twin)
    residuals.update(beta=beta, linf_to_clean=float((twin - clean).abs().max()))
    return twin, residuals


def random_kernel_perturbation(kernel: PixelKernel, image_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A pixel perturbation (1, C, H, W), float32, with an independent random kernel direction in every patch,
    scaled to l_inf 1 (no range constraint: add beta times it to get a twin at l_inf distance beta)."""
    c, h, w = image_shape
    grid = 1 if kernel.patch is None else (h // kernel.patch[0]) * (w // kernel.patch[1])
    free = torch.zeros(grid, kernel.dim, dtype=torch.bool)
    p = _from_patches(kernel_directions(kernel, free, 1, torch.Generator().manual_seed(seed)), kernel.patch, (c, h, w))
    return (p / p.abs().max()).float()
