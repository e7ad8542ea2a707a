"""Adversarial attacks and colliding adversarial examples (Ozbulak et al., Sec. 4.2 and 5, Fig. 3).

* ``pixel_space(loaded)``: the model as a function of pixels in [0, 1] (normalisation folded in), so that every
  budget below is an l_inf distance in pixel units.
* ``pgd``: PGD (Madry et al.) through torchattacks.
* ``asma``: the Adaptive Segmentation Mask Attack (Ozbulak, Van Messem, De Neve, MICCAI 2019), which no library
  ships; written here after the paper and its authors' reference implementation.
* ``colliding_adversarials``: many images x_hat = x' + P with P in the kernel of the first layer (in pixel space),
  each within the attack's l_inf budget around the clean image and inside [0, 1], so that the model's output
  for every x_hat equals its output for the adversarial example x' (up to float round-off).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import page

#: ASMA's parameters as the authors' reference implementation sets them (src/main.py of
#: github.com/utkuozbulak/adaptive-segmentation-mask-attack): multiplier = beta * IoU + tau, 2501 iterations.
ASMA_TAU = 1e-7
ASMA_BETA = 1e-6
ASMA_ITERATIONS = 2501

EPS_8_255 = 8 / 255


class AttackInputError(ValueError):
    """An attack was given inputs of the wrong shape, range or type."""


# --- the model as a function of pixels ------------------------------------------------------------------

class PixelSpace(nn.Module):
    """``model((x - mean) / std)`` for pixels x in [0, 1]; dict outputs (torchvision segmentation) unwrapped.

    ``mean``/``std`` are per-channel tuples or None (the model already takes pixels, e.g. the MNIST models).
    Output: logits (B, classes) or segmentation logits (B, classes, H, W).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 output_key: str = "out") -> None:
        super().__init__()
        self.model = model
        self.output_key = output_key
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return pixels
        return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(self.normalize(pixels))
        return out[self.output_key] if isinstance(out, dict) else out


def normalization_of(loaded: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a registry model expects its inputs normalised with; None for pixel-input models."""
    from . import data

    source = loaded.spec.source
    if source == "book":
        return None
    if source == "timm":
        cfg = getattr(loaded.model, "pretrained_cfg", {}) or {}
        return tuple(cfg.get("mean", data.IMAGENET_MEAN)), tuple(cfg.get("std", data.IMAGENET_STD))
    return data.IMAGENET_MEAN, data.IMAGENET_STD  # torchvision and smp ImageNet encoders


def pixel_space(loaded: Any) -> PixelSpace:
    """Wrap a ``models.LoadedModel`` (or a bare MNIST model) so that it takes pixels in [0, 1]."""
    if isinstance(loaded, nn.Module):
        return PixelSpace(loaded).eval()
    norm = normalization_of(loaded)
    device = next(loaded.model.parameters()).device
    wrapped = PixelSpace(loaded.model, *(norm or (None, None)))
    return wrapped.to(device).eval()


def _check_pixels(x: torch.Tensor, name: str = "images") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise AttackInputError(f"{name} must be a (B, C, H, W) tensor of pixels in [0, 1], "
                               f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise AttackInputError(f"{name} must hold pixels in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]; "
                               "pass unnormalised pixels and wrap the model with pixel_space()")


# --- PGD (torchattacks) ---------------------------------------------------------------------------------

def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = EPS_8_255,
        alpha: float = 2 / 255, steps: int = 10, random_start: bool = True, seed: int | None = 0) -> torch.Tensor:
    """Untargeted l_inf PGD (torchattacks.PGD) on a pixel-space classifier.

    images: (B, C, H, W) in [0, 1]; labels: (B,) class indices; eps, alpha in pixel units.
    Returns the adversarial images (B, C, H, W) in [0, 1] with ||x' - x||_inf <= eps.
    """
    import torchattacks

    _check_pixels(images)
    if labels.shape != images.shape[:1]:
        raise AttackInputError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if not 0 < eps <= 1 or steps < 1:
        raise AttackInputError(f"need 0 < eps <= 1 and steps >= 1, got eps={eps}, steps={steps}")
    if seed is not None:
        torch.manual_seed(seed)  # torchattacks draws the random start from the global generator
    attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    return attack(images, labels).detach()


@torch.no_grad()
def saturation(clean: torch.Tensor, adversarial: torch.Tensor, eps: float, tol: float = 1e-6) -> float:
    """Fraction (0..1) of pixels whose perturbation sits at the budget, |x' - x| >= eps - tol."""
    return ((adversarial - clean).abs() >= eps - tol).float().mean().item()


# --- ASMA -------------------------------------------------------------------------------------------------

def mask_iou(pred: torch.Tensor, target: torch.Tensor, background: int = 0) -> float:
    """Foreground IoU with class agreement: |pred == target on foreground| / |foreground of either|.

    For binary masks this is ASMA's IoU (intersection / union of the foreground); (H, W) integer masks.
    """
    if pred.shape != target.shape:
        raise AttackInputError(f"masks must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    union = (pred != background) | (target != background)
    inter = (pred == target) & (target != background)
    total = union.sum().item()
    return inter.sum().item() / total if total else 1.0


def asma_loss(logits: torch.Tensor, target: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Eq. 2 of the ASMA paper: sum over classes c of g(x)_c on pixels where the target is c but the
    prediction is not. logits (1, K, H, W); target (H, W) long."""
    pred = logits.argmax(1)[0]
    loss = logits.new_zeros(())
    for c in classes:
        where = (target == c) & (pred != c)
        loss = loss + (logits[0, c] * where).sum()
    return loss


@dataclass
class ASMAResult:
    """ASMA's output: the adversarial image (1, C, H, W) in [0, 1], its predicted mask (H, W), and per-iteration
    IoU with the target mask, loss, and l2 / l_inf distance (pixel units) to the clean image."""

    adversarial: torch.Tensor
    mask: torch.Tensor
    iou: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    l2: list[float] = field(default_factory=list)
    linf: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_iou(self) -> float:
        return self.iou[-1]


def asma(model: nn.Module, image: torch.Tensor, target: torch.Tensor, *, iterations: int = ASMA_ITERATIONS,
         tau: float = ASMA_TAU, beta: float = ASMA_BETA, eps: float | None = None,
         classes: Sequence[int] | None = None, stop_iou: float | None = 1.0,
         progress: bool = False) -> ASMAResult:
    """The Adaptive Segmentation Mask Attack: a targeted attack toward the mask ``target``.

    Each iteration ascends ``asma_loss(g(x), target) - ||x - x0||_2^2`` with a raw-gradient step scaled by
    the adaptive multiplier ``beta * IoU(prediction, target) + tau`` and clamps x to [0, 1] (the paper's
    Algorithm 1; defaults are the authors' parameters). ``eps`` optionally also projects x onto the l_inf
    ball of radius eps around x0 (not part of ASMA; used when a fixed budget is wanted, as in Fig. 3).

    model: pixel-space segmentation model, (1, C, H, W) -> (1, K, H, W) logits; image: (1, C, H, W) in [0, 1];
    target: (H, W) integer mask; classes: those the loss pushes toward (default: those in the target).
    Stops early when the IoU reaches ``stop_iou`` (1.0: only on a perfect match; None: never).
    """

    _check_pixels(image, "image")
    if image.shape[0] != 1:
        raise AttackInputError(f"asma attacks one image at a time, got a batch of {image.shape[0]}")
    if target.dim() != 2 or target.shape != image.shape[-2:] or target.is_floating_point():
        raise AttackInputError(f"target must be an integer (H, W) = {tuple(image.shape[-2:])} mask, "
                               f"got {target.dtype} {tuple(target.shape)}")
    if iterations < 1:
        raise AttackInputError(f"iterations must be >= 1, got {iterations}")
    target = target.to(image.device).long()
    classes = sorted(int(c) for c in target.unique()) if classes is None else list(classes)
    start = time.perf_counter()
    x0 = image.detach()
    x = x0.clone()
    result = ASMAResult(x0, target)
    def record(x: torch.Tensor, logits: torch.Tensor, pred_loss: float) -> float:
        iou = mask_iou(logits.argmax(1)[0], target)
        diff = (x - x0).detach()
        result.iou.append(iou)
        result.loss.append(pred_loss)
        result.l2.append(diff.norm().item())
        result.linf.append(diff.abs().max().item())
        return iou

    stopped = False
    for step in page.progress(range(iterations), desc="ASMA", disable=not progress, leave=False):
        x.requires_grad_(True)
        logits = model(x)
        pred_loss = asma_loss(logits, target, classes)
        (grad,) = torch.autograd.grad(pred_loss - ((x - x0) ** 2).sum(), x)
        iou = record(x, logits.detach(), pred_loss.item())
        if stop_iou is not None and iou >= stop_iou:
            stopped = True
            break
        multiplier = beta * (iou if step else 0.0) + tau  # the authors assume no overlap at the first step
        x = (x.detach() + multiplier * grad).clamp_(0, 1)
        if eps is not None:
            x = torch.max(torch.min(x, x0 + eps), x0 - eps)
    x = x.detach()
    with torch.no_grad():
        logits = model(x)
    if not stopped:
        record(x, logits, asma_loss(logits, target, classes).item())
    mask = logits.argmax(1)[0]
    result.adversarial, result.mask, result.seconds = x, mask, time.perf_counter() - start
    return result


# --- colliding adversarial examples ------------------------------------------------------------------------

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
            return k  # type: ignore[return-value]
        raise NotExactError(
            f"first layer {layer} has overlapping or padded windows (kernel {k}, stride {s}, padding "
            f"{layer.padding}): a kernel vector added to each patch is not in the null space of the layer as an "
            "operator on the whole image, so collisions would not be exact. Valid: Linear, or Conv2d with "
            "stride = kernel_size, no padding, dilation 1, groups 1 (patch embeddings). See the Fig. 1 chapter.")
    raise NotExactError(f"first layer must be nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def pixel_kernel(model: nn.Module, image_shape: Sequence[int], rtol: float | None = None) -> PixelKernel:
    """The first layer's kernel in pixel space for a ``PixelSpace`` model (or a bare pixel-input model).

    image_shape: (C, H, W). Raises ``nullspace.TrivialKernelError`` when the kernel is {0} at this tolerance and
    ``NotExactError`` when patches overlap.
    """
    from . import nullspace

    inner = model.model if isinstance(model, PixelSpace) else model
    name, layer = nullspace.first_layer(inner)
    patch = _patch_geometry(layer)
    vectors = nullspace.kernel_basis(layer, rtol=rtol, dtype=torch.float64).vectors  # (k, *patch_shape)
    c, h, w = image_shape
    std = model.std if isinstance(model, PixelSpace) else None
    if std is not None:
        std = std.detach().double().cpu().view(-1)
        if std.numel() != c:
            raise AttackInputError(f"model normalises {std.numel()} channels but images have {c}")
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


def kernel_directions(kernel: PixelKernel, pinned: torch.Tensor, n: int,
                      generator: torch.Generator) -> torch.Tensor:
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


def headroom(clean: torch.Tensor, adversarial: torch.Tensor, eps: float,
             margin: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel room (lo <= 0 <= hi, float64, same shape) for a perturbation P of the adversarial image x'
    such that ||x' + P - x||_inf <= eps and x' + P stays in [0, 1]; shrunk by ``margin`` to absorb float32
    round-off when x' + P is stored."""
    delta = (adversarial - clean).double()
    x_adv = adversarial.double()
    lo = torch.maximum(-eps - delta, -x_adv) + margin
    hi = torch.minimum(eps - delta, 1 - x_adv) - margin
    return lo.clamp_max(0), hi.clamp_min(0)


def colliding_adversarials(model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, *, eps: float,
                           n: int = 100, kernel: PixelKernel | None = None, margin: float = 1e-6,
                           seed: int = 0) -> CollidingSet:
    """``n`` distinct images x_hat = x' + P_i (Eq. 7 of the paper) within ``eps`` (l_inf, pixels) of the
    clean image and inside [0, 1], with every patch of P_i in the kernel of the first layer.

    model: pixel-space model (``PixelSpace``); clean, adversarial: (1, C, H, W) in [0, 1]. Per patch, P_i is a
    random (seeded) kernel direction that vanishes on the pixels with no two-sided room (``headroom``), scaled
    by the largest multiplier that keeps every pixel inside its room (the paper's individual multipliers
    beta_i). Nothing is clipped afterwards, so the collision stays exact up to float round-off. A pixel has
    two-sided room only if the attack left some budget (|x' - x| < eps) and x' is not 0 or 1: an attack that
    uses the whole budget everywhere leaves no colliding twin (that is measured, not hidden).
    """
    _check_pixels(clean, "clean")
    _check_pixels(adversarial, "adversarial")
    if clean.shape != adversarial.shape or clean.shape[0] != 1:
        raise AttackInputError(f"clean and adversarial must both be (1, C, H, W), got {tuple(clean.shape)} "
                               f"and {tuple(adversarial.shape)}")
    if n < 1:
        raise AttackInputError(f"n must be >= 1, got {n}")
    start_time = time.perf_counter()
    kernel = kernel or pixel_kernel(model, clean.shape[1:])
    lo, hi = headroom(clean.cpu(), adversarial.cpu(), eps, margin)
    lo_p, hi_p = _to_patches(lo, kernel.patch)[0], _to_patches(hi, kernel.patch)[0]  # (L, d)
    pinned = (lo_p >= 0) | (hi_p <= 0)
    directions = kernel_directions(kernel, pinned, n, torch.Generator().manual_seed(seed))
    p = directions * _max_scale(directions, lo_p, hi_p)
    perturbations = _from_patches(p, kernel.patch, clean.shape[1:])
    images = (adversarial.double().cpu() + perturbations).to(adversarial.dtype).to(adversarial.device)
    return CollidingSet(clean, adversarial, images, images - adversarial, eps, kernel,
                        time.perf_counter() - start_time)


@torch.no_grad()
def batched(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """``model`` applied to ``images`` in batches (to bound memory), outputs concatenated."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


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


# --- a small segmentation model for the offline track (MNIST digit segmentation) ----------------------------

SEGMENTER_CLASSES = 2  # 0: background, 1: digit (binary, like ASMA's medical masks)


def patch_segmenter(patch: int = 4, embed: int = 8, width: int = 32, classes: int = SEGMENTER_CLASSES) -> nn.Sequential:
    """A fully convolutional segmenter whose first layer is a patch embedding (stride = kernel = ``patch``):
    ``embed`` < patch**2 gives a kernel of dimension patch**2 - embed per patch, so exact colliding
    segmentations exist. (B, 1, H, W) pixels -> (B, classes, H, W) logits; H, W divisible by ``patch``."""
    return nn.Sequential(
        nn.Conv2d(1, embed, patch, stride=patch), nn.ReLU(),
        nn.Conv2d(embed, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, classes, 1),
        nn.Upsample(scale_factor=patch, mode="bilinear", align_corners=False),
    )


def digit_masks(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary segmentation targets for MNIST: (N, 1, H, W) pixels -> (N, H, W) long, 1 where the pixel is
    above ``threshold`` (the digit), 0 elsewhere."""
    return (images[:, 0] > threshold).long()


def train_mnist_segmenter(device: str | torch.device = "cpu", *, train_size: int = 12800, epochs: int = 1,
                          seed: int = 0, progress: bool = True) -> tuple[nn.Sequential, float]:
    """Train ``patch_segmenter`` on binary MNIST digit masks (cached by its settings); returns (model in eval
    mode, foreground IoU on 2,000 test digits, 0..1)."""
    import hashlib


    from . import data, runtime

    key = hashlib.sha256(json.dumps([train_size, epochs, seed, "patch_segmenter-binary-v1"]).encode()).hexdigest()[:12]
    path = runtime.cache_dir() / "mnist-models" / f"segmenter-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if isinstance(device, str) else device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = patch_segmenter()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        images, _ = data.mnist(train=True)
        images, masks = images[:train_size], digit_masks(images[:train_size])
        model = model.to(device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        steps = epochs * (train_size // 128)
        bar = page.progress(total=steps, desc="train MNIST segmenter", disable=not progress, leave=False)
        for _ in range(epochs):
            for batch in torch.randperm(train_size, generator=generator).split(128)[:train_size // 128]:
                optimiser.zero_grad(set_to_none=True)
                F.cross_entropy(model(images[batch].to(device)), masks[batch].to(device)).backward()
                optimiser.step()
                bar.update()
        bar.close()
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(path)
    model = model.to(device).eval()
    test_images, _ = data.mnist(train=False)
    with torch.no_grad():
        pred = model(test_images[:2000].to(device)).argmax(1).cpu()
    return model, mask_iou(pred, digit_masks(test_images[:2000]))


# --- what the chapters need around the attacks ---------------------------------------------------------------

def first_layer_kernel_or_reason(model: nn.Module, image_shape: Sequence[int]) -> tuple[PixelKernel | None, str]:
    """``(pixel_kernel, "")`` when exact colliding twins exist for this model, else ``(None, reason)``."""
    from . import nullspace

    try:
        return pixel_kernel(model, image_shape), ""
    except (nullspace.TrivialKernelError, NotExactError) as err:
        return None, str(err).split(". ")[0]


def benchmark(model: nn.Module, clean: torch.Tensor, label: torch.Tensor, *, eps: float, pgd_eps: float,
              n: int = 100, pgd_runs: int | None = None, steps: int = 10, alpha: float | None = None,
              kernel: PixelKernel | None = None) -> dict[str, float]:
    """Seconds for ``n`` colliding adversarial examples from one PGD run (the run included) vs running PGD ``n``
    times (``pgd_runs`` < n: that many runs timed and scaled to n, reported as extrapolated)."""
    alpha = alpha if alpha is not None else pgd_eps / 4
    kernel = kernel or pixel_kernel(model, clean.shape[1:])
    start = time.perf_counter()
    adversarial = pgd(model, clean, label, eps=pgd_eps, alpha=alpha, steps=steps, seed=0)
    colliding_adversarials(model, clean, adversarial, eps=eps, n=n, kernel=kernel)
    twins = time.perf_counter() - start
    runs = min(n, pgd_runs or n)
    start = time.perf_counter()
    for seed in range(runs):
        pgd(model, clean, label, eps=eps, alpha=eps / 4, steps=steps, seed=seed)
    loop = (time.perf_counter() - start) * n / runs
    return {"n": n, "seconds_colliding": twins, "seconds_pgd_loop": loop, "pgd_runs_timed": runs,
            "extrapolated": runs < n, "speedup": loop / twins}


def tiled_twin(model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, *, eps: float,
               seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """The paper's construction P = beta [phi ... phi] (``nullspace.null_space_perturbation``, phi a random
    kernel vector of the first layer, mapped to pixels by the model's std) added to ``adversarial`` with the
    largest beta that keeps the image within ``eps`` of ``clean`` and inside [0, 1]; for first layers where
    exact twins do not exist (overlapping windows). Returns (twin (1, C, H, W), nullspace.collision_residuals
    between adversarial and twin, plus "beta" and "linf_to_clean")."""
    from . import nullspace

    inner = model.model if isinstance(model, PixelSpace) else model
    _, layer = nullspace.first_layer(inner)
    phi = nullspace.kernel_basis(layer).random_vector(torch.Generator().manual_seed(seed))
    p = nullspace.null_space_perturbation(layer, tuple(clean.shape[1:]), phi, 1.0)
    if isinstance(model, PixelSpace) and model.std is not None:
        p = nullspace.to_pixel_space(p, model.std.view(-1).tolist())
    lo, hi = headroom(clean.cpu(), adversarial.cpu(), eps)
    beta = float(_max_scale(p.reshape(1, -1), lo.reshape(1, -1), hi.reshape(1, -1)))
    twin = (adversarial.double().cpu() + beta * p).to(adversarial.dtype).to(adversarial.device)
    residuals = nullspace.collision_residuals(model, adversarial, twin)
    residuals.update(beta=beta, linf_to_clean=float((twin - clean).abs().max()))
    return twin, residuals


@torch.no_grad()
def top_k(model: nn.Module, images: torch.Tensor, k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and class indices of the top ``k`` for each image, (N, k) each."""
    return batched(model, images).softmax(1).topk(k, dim=1)


def classification_figure(images: Sequence[torch.Tensor], titles: Sequence[str], model: nn.Module,
                          class_names: Sequence[str], k: int = 6, gain: float = 10.0,
                          reference: torch.Tensor | None = None) -> Any:
    """Fig. 3 (classification) style: each image with its top-``k`` predictions below, and (if ``reference``)
    a row of the perturbations image - reference amplified by ``gain`` around gray."""
    import matplotlib.pyplot as plt

    from . import plotting

    rows = 3 if reference is not None else 2
    fig, axes = plt.subplots(rows, len(images), figsize=(2.2 * len(images), 2.2 * rows), squeeze=False)
    probs, idx = top_k(model, torch.cat(list(images)), k)
    for j, (img, title) in enumerate(zip(images, titles)):
        axes[0, j].imshow(plotting.to_image(img).clip(0, 1), cmap="gray" if img.shape[1] == 1 else None)
        axes[0, j].set_title(title, fontsize=8)
        axes[0, j].axis("off")
        names = [str(class_names[i])[:18] if class_names else str(int(i)) for i in idx[j]]
        axes[1, j].barh(range(k)[::-1], probs[j].numpy(), color="#9ecae1")
        for y, name in zip(range(k)[::-1], names):  # names inside the panel: tick labels would squeeze the images
            axes[1, j].text(0.02, y, name, transform=axes[1, j].get_yaxis_transform(), va="center", fontsize=7)
        axes[1, j].set_yticks([])
        axes[1, j].set_xlim(0, max(1e-3, 1.1 * float(probs.max())))  # random weights: near-uniform
        axes[1, j].tick_params(axis="x", labelsize=7)
        if reference is not None:
            diff = (img - reference).cpu() * gain + 0.5
            axes[2, j].imshow(plotting.to_image(diff).clip(0, 1), cmap="gray" if img.shape[1] == 1 else None)
            axes[2, j].set_title(f"(image - clean) x {gain:g} + 0.5", fontsize=7)
            axes[2, j].axis("off")
    fig.tight_layout()
    return fig


def segmentation_figure(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], titles: Sequence[str],
                        target: torch.Tensor | None = None) -> Any:
    """Fig. 3 (segmentation) style: images on top, predicted masks below (IoU with ``target`` in the titles)."""
    import matplotlib.pyplot as plt

    from . import plotting

    cols = len(images) + (target is not None)
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols, 4.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (img, mask, title) in enumerate(zip(images, masks, titles)):
        axes[0, j].imshow(plotting.to_image(img).clip(0, 1), cmap="gray" if img.shape[1] == 1 else None)
        axes[0, j].set_title(title, fontsize=8)
        axes[1, j].imshow(mask.cpu().numpy(), cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        if target is not None:
            axes[1, j].set_title(f"IoU with target {mask_iou(mask.cpu(), target.cpu()):.3f}", fontsize=8)
    if target is not None:
        axes[1, -1].imshow(target.cpu().numpy(), cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        axes[1, -1].set_title("target mask", fontsize=8)
    fig.tight_layout()
    return fig


def first_fooled(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, steps: int = 10,
                 alpha: float | None = None, limit: int = 64) -> tuple[int, torch.Tensor]:
    """The first of ``images`` (up to ``limit``) that the model classifies correctly and PGD(eps) fools:
    (index, adversarial (1, C, H, W)). Raises ValueError if none is found."""
    images, labels = images[:limit], labels[:limit]
    device = next(model.parameters(), torch.empty(0)).device
    adversarial = pgd(model, images.to(device), labels.to(device), eps=eps, alpha=alpha or eps / 4, steps=steps)
    with torch.no_grad():
        clean_ok = model(images.to(device)).argmax(1).cpu() == labels
        fooled = model(adversarial).argmax(1).cpu() != labels
    hits = torch.nonzero(clean_ok & fooled).flatten()
    if not len(hits):
        raise ValueError(f"PGD with eps={eps:.3g}, {steps} steps fooled none of the first {len(images)} images; "
                         "raise eps or steps")
    i = int(hits[0])
    return i, adversarial[i:i + 1]


def table(rows: dict[str, dict[str, Any]] | Sequence[dict[str, Any]], digits: int = 4) -> Any:
    """A table for the notebooks: ``{row name: {column: value}}`` or a list of dicts, floats with ``digits``
    significant digits. Returns an IPython ``HTML`` object (``page.table_html``; plain text outside IPython)."""
    if isinstance(rows, dict):
        rows = [{"": name, **values} for name, values in rows.items()]
    try:
        from IPython.display import HTML

        return HTML(page.table_html(rows, digits=digits))
    except ImportError:
        return page.table_text(rows, digits=digits)


# --- command line -------------------------------------------------------------------------------------------

def _parse_eps(text: str) -> float:
    """'8/255' or '0.03' -> float."""
    num, _, den = text.partition("/")
    return float(num) / float(den or 1)


def _attacks_command(args: argparse.Namespace) -> int:
    from . import data, models

    loaded = models.load(args.model, args.weights, args.device)
    model = pixel_space(loaded)
    device = next(model.parameters()).device
    if loaded.spec.task != "classification":
        raise ValueError(f"{args.model!r} is a {loaded.spec.task} model; this command runs PGD on classifiers")
    image = data.imagenet_pixels(data.load_image(args.image), args.size).to(device)
    eps, pgd_eps = _parse_eps(args.eps), _parse_eps(args.pgd_eps) if args.pgd_eps else _parse_eps(args.eps) / 2
    with torch.no_grad():
        label = model(image).argmax(1)
    adversarial = pgd(model, image, label, eps=pgd_eps, alpha=pgd_eps / 4, steps=args.steps)
    twins = colliding_adversarials(model, image, adversarial, eps=eps, n=args.n)
    report = {"model": args.model, "weights": loaded.weights, "eps": eps, "pgd_eps": pgd_eps,
              **describe_colliding(model, twins)}
    from .__main__ import print_report

    print_report(report, args.json)
    return 0


def add_cli(subparsers: Any) -> None:
    """``python -m helpers attacks MODEL``: PGD, then N colliding adversarial examples, and their report."""
    from .__main__ import add_common

    p = subparsers.add_parser("attacks", help="PGD + colliding adversarial examples (null-space twins) on a classifier")
    p.add_argument("model", help="a registry classifier whose first layer has a kernel (e.g. deit_tiny_patch16_224)")
    p.add_argument("--image", default="astronaut", help="sample name, path or URL")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--eps", default="8/255", help="budget of the twins around the clean image (pixels)")
    p.add_argument("--pgd-eps", default=None, help="PGD's budget (default eps/2, leaving room for the twins)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--n", type=int, default=100)
    add_common(p)
    p.set_defaults(func=_attacks_command)


def random_kernel_perturbation(kernel: PixelKernel, image_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A pixel perturbation (1, C, H, W), float32, with an independent random kernel direction in every patch,
    scaled to l_inf 1 (no range constraint: add beta times it to get a twin at l_inf distance beta)."""
    c, h, w = image_shape
    grid = 1 if kernel.patch is None else (h // kernel.patch[0]) * (w // kernel.patch[1])
    free = torch.zeros(grid, kernel.dim, dtype=torch.bool)
    p = _from_patches(kernel_directions(kernel, free, 1, torch.Generator().manual_seed(seed)), kernel.patch, (c, h, w))
    return (p / p.abs().max()).float()
