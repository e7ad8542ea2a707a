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
from typing import Any, Literal

import torch
from torch import nn


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


def similarity_table(
    model: nn.Module, clean: torch.Tensor, others: torch.Tensor, layers: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """PSNR, SSIM (pixels, data range 1) and the feature distance of each of ``others`` (N, C, H, W) to ``clean``
    (1, C, H, W). Images outside [0, 1] are compared as they are (PSNR/SSIM with data range 1)."""
    ref = clean.expand_as(others)
    return {
        "psnr_db": psnr(others, ref),
        "ssim": ssim(others, ref),
        "feature_distance": feature_distance(model, others, ref, layers),
        "linf": (others - ref).abs().amax((1, 2, 3)),
    }


def strength_sweep(
    model: nn.Module,
    clean: torch.Tensor,
    direction: torch.Tensor,
    betas: Sequence[float],
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """For each beta: PSNR, SSIM and feature distance of clean + beta * direction to clean, and the same for a
    Gaussian-noise control of equal l2 norm (which the features do see). direction: (1, C, H, W), typically a
    null-space perturbation with max |direction| = 1, so beta is the l_inf size in pixels."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(direction.shape, generator=generator, dtype=direction.dtype).to(direction.device)
    noise = noise * direction.norm() / noise.norm()
    rows = []
    for beta in betas:
        twin = clean + beta * direction
        control = clean + beta * noise
        t = similarity_table(model, clean, torch.cat([twin, control]), layers)
        rows.append(
            {
                "beta (l_inf)": float(beta),
                "PSNR dB": float(t["psnr_db"][0]),
                "SSIM": float(t["ssim"][0]),
                "feature distance": float(t["feature_distance"][0]),
                "noise PSNR dB": float(t["psnr_db"][1]),
                "noise SSIM": float(t["ssim"][1]),
                "noise feature distance": float(t["feature_distance"][1]),
            }
        )
    return rows


def sweep_figure(rows: list[dict[str, float]], caption_model: str = "") -> Any:
    """PSNR, SSIM and feature distance against beta for the null-space twin and the noise control."""
    import matplotlib.pyplot as plt

    betas = [r["beta (l_inf)"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ["PSNR dB", "SSIM", "feature distance"], ["PSNR (dB)", "SSIM", "feature distance"]):
        floor = 1e-18 if key == "feature distance" else -float("inf")  # exact zeros on a log axis
        ax.plot(betas, [max(r[key], floor) for r in rows], "o-", label="null-space twin")
        ax.plot(betas, [max(r["noise " + key], floor) for r in rows], "s--", label="noise, same l2")
        ax.set_xscale("log")
        ax.set_xlabel("perturbation l_inf (pixels)")
        ax.set_title(label + (f" ({caption_model})" if caption_model and key == "feature distance" else ""))
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
