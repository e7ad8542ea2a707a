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

    loaded = registry.load(model_name, weights, device, seed=seed)  # type: ignore[arg-type]
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


def max_patch_scale(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
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
    p = directions * max_patch_scale(directions, lo_p, hi_p)
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
    beta = float(max_patch_scale(p.reshape(1, -1), lo.reshape(1, -1), hi.reshape(1, -1)))
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
    ``most_null_direction(layer)`` (an exact kernel vector whenever W1 has one, also with trained weights whose
    numerical kernel holds near-null directions).
    """
    curves = {}
    for name, layer in layers.items():
        phi = most_null_direction(layer)
        for dtype in dtypes:
            curves[(name, str(dtype).removeprefix("torch."))] = residual_vs_beta(
                layer, layer_batch(layer, inputs[name]), phi, betas, dtype
            )
    return curves


def kernel_precision_rows(layers: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """One row per layer: the largest entry of W1 phi over *every* unit vector phi of ker W1 (the book's rank rule,
    so near-null directions of trained weights count), W1 and phi rounded to float32 and multiplied in float32,
    and in float64. Columns "layer", "W1" (shape), "kernel vectors", "max abs W1 phi, float32", "float64"; a
    layer with a trivial kernel gets "trivial kernel", 0 vectors and no numbers."""
    from helpers.linalg.kernels import weight_matrix

    rows: list[dict[str, Any]] = []
    for name, layer in layers.items():
        try:
            phis = kernel_basis(layer).flat()
        except TrivialKernelError:
            rows.append({"layer": name, "W1": "trivial kernel", "kernel vectors": 0,
                         "max abs W1 phi, float32": None, "float64": None})  # fmt: skip
            continue
        w = weight_matrix(layer)
        e32 = float((w.float() @ phis.float().T).abs().max())
        e64 = float((w @ phis.T).abs().max())
        rows.append({"layer": name, "W1": str(tuple(w.shape)), "kernel vectors": int(phis.shape[0]),
                     "max abs W1 phi, float32": e32, "float64": e64})  # fmt: skip
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
    tol32: float = 1e-4,
    tol64: float = 1e-12,
) -> list[Requirement]:
    """The internal check of the Sec. 6 study (our construction is right): ``exact`` layers (those for which
    ``exact_construction`` holds) must stay at round-off, every float32 residual < tol32 and every float64 one
    < tol64. What the other layers do is a finding (``sec6_claims``), not a check.
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
    models: Sequence[str],
    *,
    tol32: float = 1e-5,
    tol64: float = 1e-12,
) -> list[Requirement]:
    """The MNIST chapter's internal check (our null directions are exact): for each of ``models``, the first-layer
    residual (``residuals["<model>, float32"]`` / ``", float64"``, from ``exact_collisions``) below tol32 / tol64.
    Whether predictions and confidences survive is a claim (``mnist_claims``), not a check."""
    out = []
    for k in models:
        r32, r64 = residuals[f"{k}, float32"], residuals[f"{k}, float64"]
        out.append(
            Requirement(
                r32["first_layer_rel"] < tol32 and r64["first_layer_rel"] < tol64,
                f"{k}: first-layer residual at round-off (float32 < {tol32:g}, float64 < {tol64:g})",
                f"{r32['first_layer_rel']:.1e} / {r64['first_layer_rel']:.1e}",
            )
        )
    return out


# --- Claims of the Sec. 6 and MNIST chapters: measurements and criteria stated before measuring --------------------

#: A layer's residual is "limited by precision" when float64 shrinks it to at most this fraction of float32's.
PRECISION_RATIO = 1e-3


def most_null_direction(layer: nn.Module) -> torch.Tensor:
    """The unit direction (patch shape, float64) that W1 maps closest to zero: the last vector of ker W1 under the
    rank rule (an exact kernel vector whenever W1 is wide, the smallest near-null one otherwise), or, for a trivial
    kernel, the right singular vector of W1's smallest singular value (``near_null_basis``)."""
    from helpers.linalg.kernels import near_null_basis

    try:
        return kernel_basis(layer).vectors[-1]
    except TrivialKernelError:
        return near_null_basis(layer, k=1).vectors[0]


def exact_construction(layer: nn.Module, input_shape: Sequence[int]) -> bool:
    """Whether the paper's construction is exactly invisible to ``layer`` on inputs of ``input_shape`` (C, H, W):
    ker W1 is forced by the shape (fewer outputs than patch entries: a kernel found on a square or tall W1 is
    numerical, singular values below the rank rule's tolerance but not zero, so its residual is not round-off) and
    the layer is Linear, or a conv whose windows tile the image (stride = kernel, no padding, dilation 1, groups 1,
    a whole number of patches)."""
    from helpers.linalg.conv_operator import geometry

    weight = getattr(layer, "weight", None)
    if weight is None or weight.shape[0] >= weight[0].numel():
        return False
    try:
        kernel_basis(layer)
    except TrivialKernelError:
        return False
    if isinstance(layer, nn.Linear):
        return True
    if not isinstance(layer, nn.Conv2d):
        return False
    _, h, w = _conv_input_shape(layer, input_shape)
    k, s, p = geometry(layer)
    tiles = h % k[0] == 0 and w % k[1] == 0
    return k == s and p == (0, 0) and tuple(layer.dilation) == (1, 1) and layer.groups == 1 and tiles


def precision_limited(curves: dict[tuple[str, str], list[float]], ratio: float = PRECISION_RATIO) -> dict[str, bool]:
    """Per layer of ``residual_curves``: whether float64 shrinks the residual to at most ``ratio`` times the float32
    one at every beta, as a residual made of round-off does (one made by geometry or by the weights stays put)."""
    names = dict.fromkeys(n for n, _ in curves)
    return {
        n: all(r64 <= ratio * r32 for r32, r64 in zip(curves[(n, "float32")], curves[(n, "float64")])) for n in names
    }


def precision_ratios(curves: dict[tuple[str, str], list[float]]) -> dict[str, float]:
    """Per layer: float64 residual / float32 residual at the largest beta (``inf`` when float32's is 0)."""
    names = dict.fromkeys(n for n, _ in curves)
    out = {}
    for n in names:
        r32, r64 = curves[(n, "float32")][-1], curves[(n, "float64")][-1]
        out[n] = r64 / r32 if r32 > 0 else math.inf
    return out


@dataclass(frozen=True)
class PrecisionBounds:
    """The largest |W1 phi| entry over every unit kernel vector of every layer with a kernel, in float32 and in
    float64, with the layer where each occurs and how many layers had a kernel (``kernel_precision_rows``)."""

    float32: float
    float64: float
    layer32: str
    layer64: str
    n_layers: int

    def text(self) -> str:
        return (
            f"{self.float32:.1e} ({self.layer32}) / {self.float64:.1e} ({self.layer64}): "
            f"worst over {self.n_layers} layers"
        )


def precision_bounds(rows: Sequence[dict[str, Any]]) -> PrecisionBounds:
    """The worst rows of ``kernel_precision_rows``; raises ValueError when no layer has a kernel."""
    kept = [r for r in rows if r["float64"] is not None]
    if not kept:
        raise ValueError("no layer has a kernel: nothing to compare with Sec. 6's bounds")
    w32 = max(kept, key=lambda r: r["max abs W1 phi, float32"])
    w64 = max(kept, key=lambda r: r["float64"])
    return PrecisionBounds(w32["max abs W1 phi, float32"], w64["float64"], w32["layer"], w64["layer"], len(kept))


def sec6_claims(
    rows: Sequence[dict[str, Any]],
    curves: dict[tuple[str, str], list[float]],
    *,
    bound32: float,
    bound64: float,
    paper_claim: str,
    weights: str,
    trained: bool,
) -> list[dict[str, Any]]:
    """The two claims of Sec. 6, as keyword arguments of ``results.judge``.

    ``sec6.precision_bounds``: the largest |W1 phi| (``precision_bounds`` of ``rows``) within the paper's bounds
    ``bound32`` / ``bound64``. ``sec6.precision_limits``: every layer of ``curves`` limited by precision
    (``precision_limited``), as the paper's explanation of imperfect collisions says.
    """
    from helpers import stats
    from helpers.book import verdict

    bounds = precision_bounds(rows)
    limited = precision_limited(curves)
    ratios = precision_ratios(curves)
    rate = stats.Rate.of(limited.values())
    others = ", ".join(f"{n} ({ratios[n]:.2g})" for n, ok in limited.items() if not ok)
    return [
        {
            "id": "sec6.precision_bounds",
            "description": "phi^T W1 within 1e-7 (float32) / 1e-15 (float64)",
            "criterion": verdict.holds_when(
                f"largest |W1 phi| over every unit kernel vector of every first layer with a kernel "
                f"≤ {bound32:g} in float32 and ≤ {bound64:g} in float64",
                lambda m: m.float32 <= bound32 and m.float64 <= bound64,
            ),
            "paper": f"{bound32:g} / {bound64:g}",
            "ours": bounds.text(),
            "measured": bounds,
            "trained": trained,
            "weights": weights,
            "reason": "W1 phi table; the rank rule counts near-null directions of trained weights as kernel vectors",
        },
        {
            "id": "sec6.precision_limits",
            "description": "imperfect collisions come from numerical precision",
            "criterion": verdict.holds_when(
                f"every first layer's residual is limited by precision: float64 shrinks it to ≤ "
                f"{PRECISION_RATIO:g} × the float32 residual at every beta",
                lambda r: r.n > 0 and r.k == r.n,
            ),
            "paper": paper_claim,
            "ours": f"{rate.text()} layers limited by precision"
            + (f"; not: {others} (float64/float32 at the largest beta)" if others else ""),
            "measured": rate,
            "trained": trained,
            "weights": weights,
            "reason": "residual vs beta in float32 and float64 (figure sec6_residual_vs_beta)",
        },
    ]


def sec6_glue(
    rows: Sequence[dict[str, Any]],
    curves: dict[tuple[str, str], list[float]],
    *,
    exact: Sequence[str],
    bound32: float,
    bound64: float,
) -> dict[str, Any]:
    """The numbers and conclusions of the Sec. 6 chapter's prose: worst |W1 phi| per precision and whether it is
    within the paper's bounds, the exact layers' largest residuals, and one line per layer saying what limits it."""
    bounds = precision_bounds(rows)
    limited, ratios = precision_limited(curves), precision_ratios(curves)
    within = bounds.float32 <= bound32 and bounds.float64 <= bound64
    lines = [
        f"* **{n}**: float64/float32 residual at the largest beta {ratios[n]:.2g}: "
        + ("limited by precision" if ok else "not limited by precision")
        + (" (exact construction)" if n in exact else "")
        for n, ok in limited.items()
    ]
    return {
        "sec6_w1phi_32": bounds.float32,
        "sec6_w1phi_64": bounds.float64,
        "sec6_bounds_verdict": "within Sec. 6's bounds" if within else "not within Sec. 6's bounds",
        "sec6_exact_max32": max((max(curves[(n, "float32")]) for n in exact), default=math.nan),
        "sec6_exact_max64": max((max(curves[(n, "float64")]) for n in exact), default=math.nan),
        "sec6_limits": "\n".join(lines),
    }


@dataclass(frozen=True)
class CollisionOutcome:
    """One model's colliding images, measured image by image (n images).

    ``same_prediction``: top-1 kept; ``confidence_change``: |change of the top-1 probability|; ``first_layer_rel``:
    ||f1(x_hat) - f1(x)|| / ||f1(x)||; ``outside``: how far each colliding image strays from [0, 1];
    ``beta_room``: the largest beta >= 0 keeping x + beta * d / ||d|| in [0, 1] (0 when a saturated pixel pins it);
    ``png_*``: the same after saving the colliding image as an 8-bit PNG (clipped to [0, 1], quantised).
    """

    same_prediction: Any
    confidence_change: Any
    first_layer_rel: Any
    outside: Any
    beta_room: Any
    png_same_prediction: Any
    png_first_layer_rel: Any


@torch.no_grad()
def _first_layer_and_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer = first_layer(model)[1]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        out = output_tensor(model(x))
    finally:
        handle.remove()
    return captured[0], out


def _per_image_rel(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    num = (a - b).double().flatten(1).norm(dim=1)
    return (num / b.double().flatten(1).norm(dim=1).clamp_min(1e-300)).tolist()


def collision_outcome(model: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> CollisionOutcome:
    """Measure the colliding images ``x_hat`` of the pixel-space classifier ``model`` against ``x`` (both
    (N, C, H, W), x in [0, 1]) image by image: rates (``stats.Rate``) and spreads (``stats.Spread``) of
    ``CollisionOutcome``. Raises ValueError when the shapes differ or x is not in [0, 1]."""
    from helpers import stats
    from helpers.data import image_validity

    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    f1, y = _first_layer_and_output(model, x)
    f1_hat, y_hat = _first_layer_and_output(model, x_hat)
    png = image_validity.png_round_trip(x_hat)
    f1_png, y_png = _first_layer_and_output(model, png)
    p, p_hat = y.softmax(-1), y_hat.softmax(-1)
    top = p.argmax(-1)
    d = (x_hat.double() - x.double()).cpu()
    rooms = []
    for xi, di in zip(x.double().cpu(), d):
        norm = float(di.norm())
        rooms.append(image_validity.beta_interval(xi, di / norm)[1] if norm > 0 else math.inf)
    return CollisionOutcome(
        same_prediction=stats.Rate.of((y_hat.argmax(-1) == top).tolist()),
        confidence_change=stats.Spread.of((p_hat.max(-1).values - p.max(-1).values).abs().tolist()),
        first_layer_rel=stats.Spread.of(_per_image_rel(f1_hat, f1)),
        outside=stats.Spread.of(image_validity.outside_unit_range(xi) for xi in x_hat),
        beta_room=stats.Spread.of(rooms, larger_is_worse=False),
        png_same_prediction=stats.Rate.of((y_png.argmax(-1) == top).tolist()),
        png_first_layer_rel=stats.Spread.of(_per_image_rel(f1_png, f1)),
    )


def pooled(outcomes: dict[str, CollisionOutcome], field: str) -> Any:
    """One ``CollisionOutcome`` field over every model: a Rate with the ks and ns summed, or a Spread of all values."""
    from helpers import stats

    parts = [getattr(o, field) for o in outcomes.values()]
    if isinstance(parts[0], stats.Rate):
        return stats.Rate(sum(r.k for r in parts), sum(r.n for r in parts))
    return stats.Spread.of([v for s in parts for v in s.values], larger_is_worse=parts[0].larger_is_worse)


def outcome_rows(outcomes: dict[str, CollisionOutcome]) -> list[dict[str, Any]]:
    """One table row per model: same prediction, largest confidence change, worst first-layer change, worst distance
    outside [0, 1], smallest room for beta, and the prediction and first-layer change after a PNG round trip."""
    return [
        {
            "model": k,
            "same prediction": o.same_prediction.text(),
            "max |Δ top-1 p|": o.confidence_change.worst,
            "max first-layer rel.": o.first_layer_rel.worst,
            "max outside [0, 1]": o.outside.worst,
            "min beta room": o.beta_room.worst,
            "same prediction after PNG": o.png_same_prediction.text(),
            "max first-layer rel. after PNG": o.png_first_layer_rel.worst,
        }
        for k, o in outcomes.items()
    ]


#: Largest change of the top-1 probability that still counts as "the same confidence" (float32 round-off is ~1e-6).
MAX_CONFIDENCE_CHANGE = 1e-4

#: Smallest first-layer relative change that counts as "not a collision" for the paper's tiled phi.
MIN_LEAK = 1e-3


def mnist_claims(
    outcomes: dict[str, CollisionOutcome], tiled_rel: Any, *, paper_claim: str, weights: str
) -> list[dict[str, Any]]:
    """The MNIST chapter's claims as keyword arguments of ``results.judge`` (trained weights: the book's own).

    ``outcomes``: ``collision_outcome`` per trained model; ``tiled_rel``: a ``stats.Spread`` (larger_is_worse=False)
    of the first-layer relative change of the paper's tiled phi on the overlapping CNN, image by image.
    """
    from helpers.book import verdict

    n = min(o.same_prediction.n for o in outcomes.values())
    common = {"trained": True, "weights": weights}
    room = pooled(outcomes, "beta_room")
    pinned = sum(v == 0 for v in room.values)
    return [
        {
            "id": "mnist.exact_collisions",
            "description": "null-space search keeps the prediction of trained models",
            "criterion": verdict.every("colliding digit keeps the trained model's top-1 prediction"),
            "paper": paper_claim,
            "ours": pooled(outcomes, "same_prediction"),
            "reason": f"{len(outcomes)} models × {n} test digits",
            **common,
        },
        {
            "id": "mnist.same_confidence",
            "description": "null-space search keeps the confidence of trained models",
            "criterion": verdict.at_most(MAX_CONFIDENCE_CHANGE, "largest |change of the top-1 probability|"),
            "paper": paper_claim,
            "ours": pooled(outcomes, "confidence_change"),
            **common,
        },
        {
            "id": "mnist.valid_images",
            "description": "the colliding digits are images: every pixel in [0, 1]",
            "criterion": verdict.at_most(0.0, "largest distance of a pixel from [0, 1]", kind="beyond"),
            "paper": "not discussed",
            "ours": pooled(outcomes, "outside"),
            "reason": f"largest beta keeping digit + beta * d/||d|| in [0, 1]: {room.text()}; "
            f"0 for {pinned}/{room.n} digits (a pixel at 0 or 1 where d points out)",
            **common,
        },
        {
            "id": "mnist.png_round_trip",
            "description": "the colliding digits still collide once saved as 8-bit PNGs",
            "criterion": verdict.every("colliding digit saved as an 8-bit PNG keeps the prediction", kind="beyond"),
            "paper": "not discussed",
            "ours": pooled(outcomes, "png_same_prediction"),
            "reason": "first-layer relative change after the round trip: "
            + pooled(outcomes, "png_first_layer_rel").text(),
            **common,
        },
        {
            "id": "mnist.tiled_cnn_leaks",
            "description": "the paper's tiled phi is no collision for the overlapping CNN",
            "criterion": verdict.at_least(MIN_LEAK, "first-layer relative change of the tiled phi", kind="beyond"),
            "paper": "tiled phi (Sec. 4.2)",
            "ours": tiled_rel,
            **common,
        },
    ]


def tiled_leak(model: nn.Module, x: torch.Tensor, beta: float) -> Any:
    """The paper's tiled construction on ``model``'s first layer (the first kernel vector of W1, tiled, multiplier
    ``beta``) applied to every image of ``x``: a ``stats.Spread`` (worst = smallest) of the first-layer relative
    change, image by image."""
    from helpers import stats

    layer = first_layer(model)[1]
    x_tiled = null_space_search(x, layer, kernel_basis(layer).vectors[0], beta)
    f1, _ = _first_layer_and_output(model, x)
    f1_t, _ = _first_layer_and_output(model, x_tiled)
    return stats.Spread.of(_per_image_rel(f1_t, f1), larger_is_worse=False)


# --- Trained substitutes: an ImageNet-trained first layer beside the paper's models ------------------------------


def random_first_layers(name: str, seeds: Sequence[int]) -> list[nn.Module]:
    """The first layer of registry model ``name`` at random initialisation (its library's own init), one per seed
    (``registry.load(..., seed=)``: seeded construction, the global random state left as it was)."""
    from helpers.models import registry

    return [first_layer(registry.load(name, "random", seed=seed).model)[1] for seed in seeds]


def sec6_substitute_claims(
    rows: Sequence[dict[str, Any]],
    curves: dict[tuple[str, str], list[float]],
    *,
    bound32: float,
    bound64: float,
    paper_claim: str,
    model: str,
    label: str,
) -> list[dict[str, Any]]:
    """Sec. 6's two claims (``sec6_claims``) judged on a trained substitute's first layer alone, as keyword arguments
    of ``Chapter.claim``: ids end in ``.trained_substitute``, descriptions say "trained substitute: <label>", the
    criteria need trained weights and rest on ``model`` (the registry name the chapter loaded)."""
    claims = sec6_claims(
        rows, curves, bound32=bound32, bound64=bound64, paper_claim=paper_claim, weights="", trained=True
    )
    out = []
    for c in claims:
        kept = {k: v for k, v in c.items() if k not in ("trained", "weights")}
        kept.update(
            id=f"{c['id']}.trained_substitute",
            description=f"{c['description']} (trained substitute: {label})",
            criterion=c["criterion"].trained(),
            models=(model,),
        )
        out.append(kept)
    return out
