"""Image similarity: pixel metrics (PSNR, SSIM via torchmetrics) and a deep-feature distance.

The journal version of Ozbulak et al. notes that a feature-based similarity judges a colliding image identical
to the original while pixel metrics flag a large difference. LPIPS (torchmetrics) needs backbone weights that
must be downloaded; offline, ``feature_distance`` is the stand-in: an LPIPS-style distance (channel-normalised
activations, squared differences averaged over positions, summed over layers, *no learned weights*) computed on
the network the perturbation lives in. It is stated as such wherever it is used.

Images: (N, C, H, W); pixel metrics assume data range 1 (pixels in [0, 1]) unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from helpers.linalg.kernels import PixelKernel


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image (N,) (torchmetrics); inf for identical images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _same_shape(a, b)
    return peak_signal_noise_ratio(a.float(), b.float(), data_range=data_range, reduction="none", dim=(1, 2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per image (N,) (torchmetrics, Gaussian window 11, sigma 1.5); 1 for identical images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _same_shape(a, b)
    values = structural_similarity_index_measure(a.float(), b.float(), data_range=data_range, reduction="none")
    assert isinstance(values, torch.Tensor)  # a tuple only with return_full_image=True
    return values


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"need two (N, C, H, W) batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def feature_layers(model: nn.Module) -> list[str]:
    """Default layers for ``feature_distance``: every ReLU/GELU output and the last module (the logits)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.GELU))]
    last = [n for n, _ in model.named_modules()][-1]
    return names + ([last] if last not in names else [])


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    """Activations of the named ``layers`` for ``images`` (hooks; module outputs, in ``layers`` order)."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise KeyError(f"no layers {missing} in {type(model).__name__}; valid: {', '.join(n for n in modules if n)}")
    found: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: found.__setitem__(n, o)) for n in layers]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return [found[n] for n in layers]


def _unit_channels(f: torch.Tensor) -> torch.Tensor:
    """Normalise each position's channel vector to unit length (LPIPS's step 1); (N, C, ...) or (N, C)."""
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-10)


@torch.no_grad()
def feature_distance(
    model: nn.Module, a: torch.Tensor, b: torch.Tensor, layers: Sequence[str] | None = None
) -> torch.Tensor:
    """LPIPS-style distance without learned weights on ``model``'s own layers, per image (N,).

    d(a, b) = sum over layers of mean over positions of ||u_a - u_b||^2, with u the channel-normalised
    activations (token sequences (N, T, C) are treated as positions x channels).
    """
    _same_shape(a, b)
    layers = list(layers) if layers is not None else feature_layers(model)
    total = a.new_zeros(a.shape[0], dtype=torch.float64)
    for fa, fb in zip(features(model, a, layers), features(model, b, layers)):
        if fa.dim() == 3:  # (N, tokens, C) -> (N, C, tokens)
            fa, fb = fa.transpose(1, 2), fb.transpose(1, 2)
        diff = (_unit_channels(fa.double()) - _unit_channels(fb.double())) ** 2
        total += diff.sum(1).reshape(diff.shape[0], -1).mean(1)
    return total


def lpips_metric(net: Literal["vgg", "alex", "squeeze"] = "alex") -> Any:
    """torchmetrics' LPIPS when its backbone weights can be had, else None (offline); never downloads when
    the network is unavailable."""
    from helpers import runtime

    if not runtime.network_available():
        return None
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    except Exception:  # missing package or weights: the caller falls back to feature_distance
        return None


# --- valid colliding twins over a set of images ----------------------------------------------------------------


@dataclass
class ValidTwins:
    """Colliding twins that are images, for a batch of clean images, and a same-size control.

    ``clean``: (N, C, H, W) pixels in [0, 1] (8-bit values); ``twins``: clean + ``perturbation``, every patch of
    the perturbation in the first layer's pixel-space kernel (exact collision), float32, inside [0, 1];
    ``saved``: the twins after an 8-bit PNG round trip (what an image file keeps; the collision is no longer
    exact); ``control``: clean + noise outside the kernel with the same l2 norm as the perturbation (smaller where
    the free pixels leave less room), inside [0, 1], after the same PNG round trip; ``perturbation`` and
    ``control_perturbation``: (N, C, H, W) float32, before the round trip; ``beta_hi``: (N,) the largest
    beta with clean + beta * perturbation in [0, 1] (``image_validity.beta_interval``; >= 1 since each patch was
    scaled to the largest multiplier its pixels allow); ``patches_moved``: (N,) share of the patches that carry
    a kernel direction (a patch whose pixels at 0 or 1 leave no kernel direction stays as it was).
    """

    clean: torch.Tensor
    twins: torch.Tensor
    saved: torch.Tensor
    control: torch.Tensor
    perturbation: torch.Tensor
    control_perturbation: torch.Tensor
    beta_hi: torch.Tensor
    patches_moved: torch.Tensor

    @property
    def moved(self) -> torch.Tensor:
        """(N,) bool: the images whose twin differs from them (some patch had a kernel direction left)."""
        return self.patches_moved > 0


def valid_twins(kernel: PixelKernel, clean: torch.Tensor, seed: int = 0, margin: float = 1e-6) -> ValidTwins:
    """A colliding twin and a same-size control for each image of ``clean`` (N, C, H, W) in [0, 1].

    Per patch of the first layer (``kernel.patch``), a random (seeded) kernel direction that vanishes on the
    pixels at 0 or 1 (``collisions.kernel_directions``), scaled by the largest multiplier keeping every pixel of
    the patch in [margin, 1 - margin]: nothing is clipped, so the twin collides exactly. The control is Gaussian
    noise on the same free pixels, scaled the same way, then shrunk to the twin's l2 norm: a change of (at most)
    the same size that the first layer does see. Raises ValueError unless ``clean`` is a batch of pixels in [0, 1]
    and the kernel works on patches.
    """
    from helpers.data import image_validity
    from helpers.experiments import collisions

    if clean.dim() != 4 or image_validity.outside_unit_range(clean) > 0:
        raise ValueError(f"clean must be (N, C, H, W) pixels in [0, 1], got {tuple(clean.shape)}")
    if kernel.patch is None:
        raise ValueError("valid_twins needs a patch-embedding first layer (kernel.patch is None for a Linear one)")
    patch, shape = kernel.patch, tuple(clean.shape[1:])
    x = torch.nn.functional.unfold(clean.double().cpu(), kernel_size=patch, stride=patch).transpose(1, 2)  # (N, L, d)
    if x.shape[-1] != kernel.dim:
        raise ValueError(f"images {shape} do not fit the kernel's patches ({patch}, {kernel.dim} pixels)")
    lo, hi = (-x + margin).clamp_max(0), (1 - x - margin).clamp_min(0)
    pinned = (lo >= 0) | (hi <= 0)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.stack([collisions.kernel_directions(kernel, pin, 1, generator)[0] for pin in pinned])
    p = directions * collisions.max_patch_scale(directions, lo, hi)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).masked_fill(pinned, 0.0)
    c = noise * collisions.max_patch_scale(noise, lo, hi)
    c = c * (p.flatten(1).norm(dim=1) / c.flatten(1).norm(dim=1).clamp_min(1e-300)).clamp_max(1.0).view(-1, 1, 1)

    def to_image(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.fold(t.transpose(1, 2), output_size=shape[-2:], kernel_size=patch, stride=patch)

    perturbation = to_image(p)
    twins = (clean.double().cpu() + perturbation).float()
    control = (clean.double().cpu() + to_image(c)).float()
    beta_hi = torch.tensor(
        [image_validity.beta_interval(x0, d)[1] for x0, d in zip(clean.double().cpu(), perturbation)]
    )
    device = clean.device
    return ValidTwins(
        clean=clean,
        twins=twins.to(device),
        saved=image_validity.png_round_trip(twins).to(device),
        control=image_validity.png_round_trip(control).to(device),
        perturbation=perturbation.float().to(device),
        control_perturbation=to_image(c).float().to(device),
        beta_hi=beta_hi,
        patches_moved=(p.abs().amax(-1) > 0).double().mean(1),
    )


@torch.no_grad()
def first_layer_residual(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image (N,): ||f1(b) - f1(a)|| / ||f1(a)||, f1 the output of the model's first Linear/Conv2d layer."""
    from helpers.data.normalization import PixelSpace
    from helpers.linalg.kernels import first_layer

    _same_shape(a, b)
    inner = model.model if isinstance(model, PixelSpace) else model
    name, _ = first_layer(inner)
    full = f"model.{name}" if inner is not model else name
    fa, fb = (f.double().flatten(1) for f in features(model, torch.cat([a, b]), [full])[0].chunk(2))
    return (fb - fa).norm(dim=1) / fa.norm(dim=1).clamp_min(1e-300)


@dataclass
class SimilarityStudy:
    """Pixel and feature similarity of each saved twin and control to its clean image, (N,) each: ``psnr_db``,
    ``ssim``, ``feature_distance`` (``feature_distance`` on the model's own layers), ``linf`` (pixels), keyed
    ``"saved"`` / ``"control"``; ``residual``: first-layer residual (``first_layer_residual``) of the exact and
    the saved twins (keys ``"exact"``, ``"saved"``)."""

    metrics: dict[str, dict[str, torch.Tensor]]
    residual: dict[str, torch.Tensor]


def similarity_study(model: nn.Module, twins: ValidTwins, layers: Sequence[str] | None = None) -> SimilarityStudy:
    """PSNR, SSIM (data range 1), the feature distance and l_inf of the saved twins and of the controls to the
    clean images (all valid 8-bit images), and the first-layer residuals of the exact and saved twins."""
    metrics = {}
    for key, other in (("saved", twins.saved), ("control", twins.control)):
        metrics[key] = {
            "psnr_db": psnr(other, twins.clean).double().cpu(),
            "ssim": ssim(other, twins.clean).double().cpu(),
            "feature_distance": feature_distance(model, other, twins.clean, layers).cpu(),
            "linf": (other - twins.clean).abs().amax((1, 2, 3)).double().cpu(),
        }
    residual = {
        "exact": first_layer_residual(model, twins.clean, twins.twins).cpu(),
        "saved": first_layer_residual(model, twins.clean, twins.saved).cpu(),
    }
    return SimilarityStudy(metrics, residual)


def strength_sweep(
    model: nn.Module, twins: ValidTwins, fractions: Sequence[float], layers: Sequence[str] | None = None
) -> list[dict[str, float]]:
    """For each fraction t in (0, 1]: medians over the images of PSNR, SSIM and feature distance to the clean
    image of clean + t * perturbation (the twin at a fraction of its size: still in [0, 1], still colliding) and
    of clean + t * control perturbation, both after the 8-bit PNG round trip."""
    from helpers.data import image_validity

    rows = []
    for t in fractions:
        if not 0 < t <= 1:
            raise ValueError(f"fractions must lie in (0, 1] (larger ones leave [0, 1]), got {t}")
        twin = image_validity.png_round_trip(twins.clean + t * twins.perturbation)
        control = image_validity.png_round_trip(twins.clean + t * twins.control_perturbation)
        row: dict[str, float] = {
            "fraction": float(t),
            "median l_inf": float((twin - twins.clean).abs().amax((1, 2, 3)).median()),
        }
        for prefix, other in (("", twin), ("control ", control)):
            row[prefix + "PSNR dB"] = float(psnr(other, twins.clean).median())
            row[prefix + "SSIM"] = float(ssim(other, twins.clean).median())
            row[prefix + "feature distance"] = float(feature_distance(model, other, twins.clean, layers).median())
        rows.append(row)
    return rows


def sweep_figure(rows: list[dict[str, float]], caption_model: str = "") -> Any:
    """Median PSNR, SSIM and feature distance against the twins' median l_inf, for the saved twins and the
    same-size controls (``strength_sweep`` rows)."""
    import matplotlib.pyplot as plt

    sizes = [r["median l_inf"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ["PSNR dB", "SSIM", "feature distance"], ["PSNR (dB)", "SSIM", "feature distance"]):
        ax.plot(sizes, [r[key] for r in rows], "o-", label="colliding twin (saved as PNG)")
        ax.plot(sizes, [r["control " + key] for r in rows], "s--", label="control, same l2 (saved as PNG)")
        ax.set_xscale("log")
        ax.set_xlabel("median l_inf of the twin (pixels)")
        ax.set_title(label + (f" ({caption_model})" if caption_model and key == "feature distance" else ""))
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- near-null twins on a trained model without exact twins (EfficientNet-Lite0) ------------------------------

#: Near-null twins are sized so that, before clipping and saving, their PSNR to the clean image is this (dB):
#: well below ``explain.FLAGGED_PSNR_DB``, so a pixel metric flags them as heavily altered.
TWIN_PSNR_DB = 25.0


@dataclass
class NearNullPairs:
    """A near-null twin and a same-size control per clean image, both saved as 8-bit PNGs.

    ``clean``: (N, C, H, W) pixels in [0, 1]; ``twins``: PNG round trip of clip(clean + s v), v a whole-image
    direction the first layer barely sees, s fixed by ``psnr_db``; ``control``: PNG round trip of clip(clean + r),
    r Gaussian (seeded) scaled to the l2 norm of clip(clean + s v) - clean; ``size``: s / ||v||_inf, the twin's
    l_inf step in pixels before clipping; ``psnr_db``: the PSNR the unclipped step was sized for.
    """

    clean: torch.Tensor
    twins: torch.Tensor
    control: torch.Tensor
    size: float
    psnr_db: float

    def batch(self) -> torch.Tensor:
        """(3N, C, H, W): clean, twins, controls."""
        return torch.cat([self.clean, self.twins, self.control])


def near_null_pairs(
    clean: torch.Tensor, direction: torch.Tensor, psnr_db: float = TWIN_PSNR_DB, seed: int = 0
) -> NearNullPairs:
    """Twins clean + s v (``direction`` v: (C, H, W), e.g. ``attacks.stem_report(...).direction``) with s such
    that the unclipped step has PSNR ``psnr_db`` (RMS 10^(-psnr_db / 20) pixels), clipped to [0, 1] and saved
    as 8-bit PNGs, and same-l2 Gaussian controls (see ``NearNullPairs``). Raises ValueError unless ``clean`` is
    (N, C, H, W) pixels in [0, 1] and ``direction`` is one nonzero image of the same shape."""
    from helpers.data import image_validity

    if clean.dim() != 4 or image_validity.outside_unit_range(clean) > 0:
        raise ValueError(f"clean must be (N, C, H, W) pixels in [0, 1], got {tuple(clean.shape)}")
    if tuple(direction.shape) != tuple(clean.shape[1:]) or float(direction.abs().max()) == 0:
        raise ValueError(f"direction must be one nonzero {tuple(clean.shape[1:])} image, got {tuple(direction.shape)}")
    v = direction.to(clean.device, torch.float64)
    v = v / v.pow(2).mean().sqrt() * 10 ** (-psnr_db / 20)
    x = clean.double()
    twins = (x + v).clamp(0, 1)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = noise.to(clean.device)
    scale = (twins - x).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    control = (x + scale.view(-1, 1, 1, 1) * noise).clamp(0, 1)
    return NearNullPairs(
        clean=clean,
        twins=image_validity.png_round_trip(twins.float()).to(clean.device),
        control=image_validity.png_round_trip(control.float()).to(clean.device),
        size=float(v.abs().max()),
        psnr_db=psnr_db,
    )


def pair_metrics(pairs: NearNullPairs, features: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """PSNR, SSIM and the feature distance of each saved twin and control to its clean image, keyed
    ``"twin"`` / ``"control"`` then ``"psnr_db"``, ``"ssim"``, ``"feature_distance"`` (each (N,), float64, cpu).

    ``features``: (3N, D) features of ``pairs.batch()`` (e.g. a trained network's pooled features before its
    classifier); the feature distance is ||f(other) - f(clean)|| / ||f(clean)||. Raises ValueError when the
    features do not have 3N rows."""
    n = len(pairs.clean)
    if features.dim() != 2 or len(features) != 3 * n:
        raise ValueError(f"features must be (3N, D) = ({3 * n}, D), got {tuple(features.shape)}")
    f = features.double()
    base = f[:n]
    out = {}
    for i, (key, other) in enumerate((("twin", pairs.twins), ("control", pairs.control)), start=1):
        out[key] = {
            "psnr_db": psnr(other, pairs.clean).double().cpu(),
            "ssim": ssim(other, pairs.clean).double().cpu(),
            "feature_distance": (
                (f[i * n : (i + 1) * n] - base).norm(dim=1) / base.norm(dim=1).clamp_min(1e-300)
            ).cpu(),
        }
    return out
