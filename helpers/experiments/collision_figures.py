"""How a collision is shown: figures (images side by side, spectra, beta grids) and the rows of its tables.

Inputs are in model space (see :mod:`helpers.data.normalization`); ``mean``/``std`` convert to pixels for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from helpers import stats
from helpers.book import plotting
from helpers.data import image_validity
from helpers.data.normalization import pixels_of
from helpers.experiments import collisions
from helpers.linalg import conv_operator, kernels
from helpers.models.forward import output_tensor, top_k
from helpers.models.segmentation import mask_iou


def classification_figure(
    images: Sequence[torch.Tensor],
    titles: Sequence[str],
    model: nn.Module,
    class_names: Sequence[str],
    k: int = 6,
    gain: float = 10.0,
    reference: torch.Tensor | None = None,
) -> Any:
    """Fig. 3 (classification) style: each image with its top-``k`` predictions below, and (if ``reference``)
    a row of the perturbations image - reference amplified by ``gain`` around gray."""
    import matplotlib.pyplot as plt

    from helpers.book import plotting

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


def segmentation_figure(
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    titles: Sequence[str],
    target: torch.Tensor | None = None,
) -> Any:
    """Fig. 3 (segmentation) style: images on top, predicted masks below (IoU with ``target`` in the titles)."""
    import matplotlib.pyplot as plt

    from helpers.book import plotting

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


def collision_figure(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    titles: Sequence[str],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> plt.Figure:
    """Original | perturbation (stretched) | colliding image (clipped to [0, 1] for display only)."""
    px, px_hat = pixels_of(x, mean, std)[0].cpu(), pixels_of(x_hat, mean, std)[0].cpu()
    p = px_hat - px
    stretched = (p - p.min()) / (p.max() - p.min()).clamp_min(1e-30)
    return plotting.image_grid([px, stretched, px_hat], titles, ncols=3, size=3.0)


def residual_table(
    results: dict[str, dict[str, Any]],
    keys: Sequence[str] = ("first_layer_rel", "output_rel", "same_argmax", "input_rel"),
) -> list[dict[str, Any]]:
    """Rows for ``page.table``: one per construction/model (``case``), one column per residual key."""
    return [{"case": name, **{k: res[k] for k in keys}} for name, res in results.items()]


def top_k_table(columns: dict[str, list[tuple[str, float]]]) -> list[dict[str, Any]]:
    """Rows for ``page.table``: one per rank, one column per image with 'class (probability)'."""
    depth = len(next(iter(columns.values())))
    return [
        {"rank": r + 1, **{h: f"{top[r][0]} ({top[r][1]:.3g})" for h, top in columns.items()}} for r in range(depth)
    ]


def spectrum_figure(
    spectrum: conv_operator.PolyphaseSpectrum, boundary_gains: torch.Tensor | None = None
) -> plt.Figure:
    """Left: smallest singular value per output-grid frequency; right: histogram of all singular values."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    smin = torch.fft.fftshift(spectrum.smallest()).numpy() / spectrum.sigma_max
    im = a.imshow(smin, cmap="viridis", extent=(-np.pi, np.pi, np.pi, -np.pi))
    a.set_title("sigma_min(M(omega)) / sigma_max, per frequency")
    a.set_xlabel("omega_2 (output grid)")
    a.set_ylabel("omega_1")
    a.grid(False)
    fig.colorbar(im, ax=a, fraction=0.046)
    b.hist(spectrum.singular.flatten().numpy() / spectrum.sigma_max, bins=80, color="0.4")
    if boundary_gains is not None:
        for g in boundary_gains.tolist():
            b.axvline(g / spectrum.sigma_max, color="tab:red", lw=0.8)
    b.set_xlabel("singular value / sigma_max (red: corner modes, zero padding)")
    b.set_ylabel("count")
    b.set_title("whole-image operator: bulk spectrum")
    fig.tight_layout()
    return fig


def beta_grid(
    x: torch.Tensor,
    layer: nn.Module,
    vectors: torch.Tensor,
    betas: Sequence[float],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    region: Any = None,
    cmap: str = "gray",
) -> plt.Figure:
    """The static stand-in for the explorer: rows = basis vectors, columns = betas (pixels clipped)."""
    images, titles = [], []
    for i, phi in enumerate(vectors):
        for beta in betas:
            x_hat = collisions.null_space_search(x, layer, phi, beta, region)
            images.append(pixels_of(x_hat, mean, std)[0].cpu())
            titles.append(f"phi_{i}, beta={beta:g}")
    return plotting.image_grid(images, titles, ncols=len(betas), size=2.0, cmap=cmap)


def window_leak_figure(window_residual: torch.Tensor) -> plt.Figure:
    """Heat map of ``||W1 window|| / (||W1|| ||window||)`` per output position, (H', W') -> one panel."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(window_residual.numpy(), cmap="magma")
    ax.set_title("||W1 window|| / (||W1|| ||window||) per output position")
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def mask_comparison_figure(masks: torch.Tensor, titles: Sequence[str]) -> plt.Figure:
    """Predicted segmentation masks (N, H, W) class indices (< 20 shown distinctly), side by side with titles."""
    fig, axes = plt.subplots(1, len(masks), figsize=(3 * len(masks), 3.2))
    for ax, m, t in zip(np.atleast_1d(axes), masks, titles):
        ax.imshow(np.asarray(m), cmap="tab20", vmin=0, vmax=20)
        ax.set_title(t)
        ax.axis("off")
    return fig


@dataclass
class SetCollision:
    """One model-space perturbation P added to every image of a set, measured per image (tensors (N,), CPU).

    ``first_layer_rel``: ||f1(x + P) - f1(x)|| / ||f1(x)|| through the model in its dtype (a hook on ``layer``);
    ``first_layer_rel64``: the same from the float64 operator, ||A P|| / ||f1(x)||. ``agreement``: share of argmax
    positions that agree (top-1 for a classifier, pixels for a segmenter); ``same_top5`` (classifiers, else
    None): the top-5 classes in the same order. Validity: ``outside`` is how far the colliding pixels leave
    [0, 1]; ``scale_hi`` the largest multiple s of P with x + s P inside (s >= 1: P itself fits; 0 when a
    saturated pixel pins it). After an 8-bit PNG round trip of the colliding image: ``png_first_layer_rel``
    (against the original), ``png_reference_rel`` (the original's own round trip), ``png_agreement``,
    ``png_same_top5``. ``top_probs``/``top_idx``: (2, N, 5) for original and colliding (classifiers).
    ``layer_rel``: {probe name: ||g(x + P) - g(x)|| / ||g(x)|| per image} for the modules given to ``collide_set``
    as ``probes`` (their outputs g, in the model's dtype), then "output" (the logits); empty without probes.
    """

    names: list[str]
    first_layer_rel: torch.Tensor
    first_layer_rel64: torch.Tensor
    agreement: torch.Tensor
    same_top5: torch.Tensor | None
    outside: torch.Tensor
    scale_hi: torch.Tensor
    png_first_layer_rel: torch.Tensor
    png_reference_rel: torch.Tensor
    png_agreement: torch.Tensor
    png_same_top5: torch.Tensor | None
    top_probs: torch.Tensor | None = None
    top_idx: torch.Tensor | None = None
    layer_rel: dict[str, torch.Tensor] = field(default_factory=dict)

    def spread(self, field: str, *, larger_is_worse: bool = True) -> stats.Spread:
        return stats.Spread.of(getattr(self, field).tolist(), larger_is_worse=larger_is_worse)

    def layer_spread(self, name: str) -> stats.Spread:
        """The relative change at probe ``name`` (or "output") over the image set; KeyError names the probes."""
        if name not in self.layer_rel:
            raise KeyError(f"no probe {name!r}; measured: {', '.join(self.layer_rel) or 'none (no probes given)'}")
        return stats.Spread.of(self.layer_rel[name].tolist())

    def rate(self, field: str) -> stats.Rate:
        """A Rate of a bool field (``same_top5``, ``png_same_top5``) or of ``inside`` (pixels in [0, 1])."""
        flags = self.outside == 0 if field == "inside" else getattr(self, field)
        if flags is None:
            raise ValueError(f"{field} was not measured (not a classifier)")
        return stats.Rate.of(flags.tolist())

    def outputs_kept(self, after_png: bool = False) -> str:
        """How the outputs agree, as text: the Rate of same top-5 (classifiers) or the Spread of mask pixel
        agreement (segmenters), for the colliding images as made or after the PNG round trip."""
        prefix = "png_" if after_png else ""
        if self.same_top5 is not None:
            return self.rate(f"{prefix}same_top5").text()
        return self.spread(f"{prefix}agreement", larger_is_worse=False).text()

    def float_paths_agree(self, atol: float = 1e-5, rtol: float = 1e-3) -> tuple[bool, float]:
        """Internal check: the first-layer change measured through the model (its dtype) and computed from the
        float64 operator agree to ``atol + rtol * float64 value`` on every image. Returns (ok, worst gap)."""
        gap = (self.first_layer_rel - self.first_layer_rel64).abs()
        return bool((gap <= atol + rtol * self.first_layer_rel64).all()), float(gap.max())


def _pixel_direction(p: torch.Tensor, std: Sequence[float] | None) -> torch.Tensor:
    if std is None:
        return p
    return p * torch.as_tensor(std, dtype=p.dtype).view(-1, 1, 1)


def _to_model(pixels: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    if mean is None or std is None:
        return pixels
    m = torch.as_tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - m) / s


@torch.no_grad()
def collide_set(
    model: nn.Module,
    layer: nn.Conv2d,
    pixels: torch.Tensor,
    p: torch.Tensor,
    names: Sequence[str],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch: int = 16,
    probes: dict[str, nn.Module] | None = None,
) -> SetCollision:
    """Add the model-space perturbation ``p`` (C, H, W) to every image of ``pixels`` (N, C, H, W) in [0, 1] and
    measure the collision per image (see :class:`SetCollision`). One forward pass per batch of originals,
    colliding images and their PNG round trips, on the model's device and dtype; ``probes`` (name: module of
    ``model``) adds the relative change of each module's output to ``layer_rel`` from the same passes."""
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"collide_set needs a Conv2d first layer, got {type(layer).__name__}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixels = pixels.detach().cpu().double()
    direction = _pixel_direction(p.detach().cpu().double(), std)
    hat_pixels = pixels + direction
    outside = torch.tensor([image_validity.outside_unit_range(h) for h in hat_pixels], dtype=torch.float64)
    scale_hi = torch.tensor([image_validity.beta_interval(x, direction)[1] for x in pixels], dtype=torch.float64)
    x = _to_model(pixels, mean, std)
    x_hat = x + p.detach().cpu().double()
    x_png = _to_model(image_validity.png_round_trip(hat_pixels), mean, std)
    ref_png = _to_model(image_validity.png_round_trip(pixels), mean, std)
    f1_64 = conv_operator.conv_apply(layer, x)
    if layer.bias is not None:
        f1_64 = f1_64 + layer.bias.detach().cpu().double().view(1, -1, 1, 1)
    change64 = conv_operator.conv_apply(layer, p.detach().cpu().double().unsqueeze(0)).norm()
    rel64 = change64 / f1_64.flatten(1).norm(dim=1)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o.detach().cpu().double()))
    probed: dict[str, list[torch.Tensor]] = {name: [] for name in probes or {}}

    def probe(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            orig, hat, _ = output_tensor(output).detach().double().chunk(3)
            probed[name].append(((hat - orig).flatten(1).norm(dim=1) / orig.flatten(1).norm(dim=1)).cpu())

        return hook

    handles = [module.register_forward_hook(probe(name)) for name, module in (probes or {}).items()]
    outs: list[torch.Tensor] = []
    try:
        for i in range(0, len(x), batch):
            chunk = torch.cat([t[i : i + batch] for t in (x, x_hat, x_png)]).to(device=device, dtype=dtype)
            outs.append(output_tensor(model(chunk)).detach().cpu().double())
    finally:
        handle.remove()
        for h in handles:
            h.remove()
    parts = [c.chunk(3) for c in captured]
    f1, f1_hat, f1_png = (torch.cat([pt[j] for pt in parts]) for j in range(3))
    out_parts = [o.chunk(3) for o in outs]
    y, y_hat, y_png = (torch.cat([pt[j] for pt in out_parts]) for j in range(3))
    with torch.no_grad():
        f1_ref = layer(ref_png.to(device=device, dtype=dtype)).detach().cpu().double()

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-300)

    def agree(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.argmax(1) == b.argmax(1)).double().reshape(len(a), -1).mean(dim=1)

    classifier = y.dim() == 2
    k = min(5, y.shape[1]) if classifier else 0
    top = [torch.softmax(t, dim=1).topk(k) for t in (y, y_hat, y_png)] if classifier else []
    return SetCollision(
        list(names),
        rel(f1_hat, f1),
        rel64,
        agree(y_hat, y),
        (top[1].indices == top[0].indices).all(dim=1) if classifier else None,
        outside,
        scale_hi,
        rel(f1_png, f1),
        rel(f1_ref, f1),
        agree(y_png, y),
        (top[2].indices == top[0].indices).all(dim=1) if classifier else None,
        torch.stack([top[0].values, top[1].values]) if classifier else None,
        torch.stack([top[0].indices, top[1].indices]) if classifier else None,
        {**{name: torch.cat(v) for name, v in probed.items()}, "output": rel(y_hat, y)} if probes else {},
    )


def set_rows(cases: dict[str, SetCollision]) -> list[dict[str, Any]]:
    """Rows for ``page.table``: per case, the first-layer change (model dtype and float64) and the outputs, as
    spreads and rates over the image set (mean, 95% interval, worst)."""
    rows = []
    for name, c in cases.items():
        rows.append(
            {
                "case": name,
                "first-layer rel. change": c.spread("first_layer_rel").text(),
                "same, float64 operator": c.spread("first_layer_rel64").text(),
                "same top-5" if c.same_top5 is not None else "mask pixel agreement": c.outputs_kept(),
            }
        )
    return rows


def validity_rows(cases: dict[str, SetCollision]) -> list[dict[str, Any]]:
    """Rows for ``page.table``: is each colliding image an image (pixels in [0, 1]), how far outside, the largest
    multiple of the perturbation that stays inside, and what an 8-bit PNG round trip does to the collision."""
    rows = []
    for name, c in cases.items():
        rows.append(
            {
                "case": name,
                "inside [0, 1]": c.rate("inside").text(),
                "distance outside": c.spread("outside").text(),
                "largest multiple inside": c.spread("scale_hi", larger_is_worse=False).text(),
                "first-layer rel. change after PNG": c.spread("png_first_layer_rel").text(),
                "the original's own PNG": c.spread("png_reference_rel").text(),
                "outputs after PNG": c.outputs_kept(after_png=True),
            }
        )
    return rows


def injectivity_rows(evidence: conv_operator.InjectivityEvidence, sigma_max: float) -> list[dict[str, Any]]:
    """Rows for ``page.table``: sigma_min of the zero-padded operator, exact on small images and by Lanczos on
    the full one, beside the corner modes' upper bounds (also as fractions of ``sigma_max``)."""
    c, h, w = evidence.input_shape
    rows = [
        {
            "image": f"{c}x{n}x{n}",
            "method": "dense SVD (exact)",
            "sigma_min": s,
            "sigma_min/sigma_max": s / sigma_max,
            "corner upper bound": evidence.corner_at[n],
        }
        for n, s in evidence.exact.items()
    ]
    rows.append(
        {
            "image": f"{c}x{h}x{w}",
            "method": f"Lanczos (residual {evidence.residual:.1e}; from above, not a certified bound)",
            "sigma_min": evidence.iterative,
            "sigma_min/sigma_max": evidence.iterative / sigma_max,
            "corner upper bound": evidence.corner,
        }
    )
    return rows


def periodic_conclusion(rank: int, dim: int) -> str:
    """The sentence the prose shows about W1 on stride-periodic patches, chosen by its rank (rank rule)."""
    if rank == dim:
        return f"rank {rank} of {dim}, a trivial kernel: no image realises Remark 3's unfolded matrix for this W1"
    return (
        f"rank {rank} of {dim}, a kernel of dimension {dim - rank}: stride-periodic images realise Remark 3 "
        "exactly for this W1"
    )


def operator_conclusion(evidence: conv_operator.InjectivityEvidence, sigma_max: float, rtol: float) -> str:
    """The sentence the prose shows about the zero-padded operator, chosen by the computed sigma_min values (exact
    on small images, Lanczos, and the directly measured corner gain, an upper bound) against the rank rule's
    tolerance ``rtol`` (relative to ``sigma_max``)."""
    smallest = min(*evidence.exact.values(), evidence.iterative, evidence.corner) / sigma_max
    if smallest <= rtol:
        return (
            f"sigma_min reaches the rank rule's tolerance ({smallest:.2g} of sigma_max <= {rtol:.2g}): the "
            "convolution has a numerically null image direction, and a collision through it is exact."
        )
    if not evidence.exact:
        return (
            f"Every computed sigma_min is above the rank rule's tolerance ({smallest:.2g} of sigma_max > {rtol:.2g}); "
            "at the full size this rests on the Lanczos estimate (from above), not on a proof."
        )
    largest = max(evidence.exact)
    gap = abs(evidence.iterative - evidence.exact[largest]) / evidence.exact[largest]
    return (
        f"Every computed sigma_min is far above the rank rule's tolerance ({smallest:.2g} of sigma_max > "
        f"{rtol:.2g}): no image perturbation is invisible to this layer at these sizes. At the full size this rests "
        f"on the Lanczos estimate, which differs from the exact value at {largest} pixels by {gap:.1e} relative "
        "(the least visible direction is a corner mode, whose gain does not grow with the image), not on a proof."
    )


def layer_rows(cases: dict[str, SetCollision]) -> list[dict[str, Any]]:
    """Rows for ``page.table``: one per probe (``collide_set``'s ``probes``, then "output"), one column per case
    with the relative change of that module's output over the image set (mean, 95% interval, worst)."""
    names = list(dict.fromkeys(n for c in cases.values() for n in c.layer_rel))
    return [
        {"layer": n, **{case: c.layer_spread(n).text() if n in c.layer_rel else "" for case, c in cases.items()}}
        for n in names
    ]


def singular_value_rows(basis: kernels.KernelBasis, k: int = 6) -> list[dict[str, Any]]:
    """Rows for ``page.table``: the ``k`` smallest singular values of W1 (``basis.singular_values``) relative to
    sigma_max, beside the rank rule's threshold ``tol / sigma_max``, and whether the rule counts each as zero."""
    s = basis.singular_values
    smax = float(s.max())
    n = s.numel()
    return [
        {
            "index": i + 1,
            "sigma_i / sigma_max": float(s[i]) / smax,
            "rank rule threshold": basis.tol / smax,
            "counted as null": bool(float(s[i]) <= basis.tol),
        }
        for i in range(max(0, n - k), n)
    ]


def spectrum_comparison_rows(
    trained: conv_operator.SpectrumSummary, random: Sequence[conv_operator.SpectrumSummary]
) -> list[dict[str, Any]]:
    """Rows for ``page.table``: sigma_min/sigma_max of the circular (DFT) and zero-padded (Lanczos) operators, for
    the trained layer and each random initialisation (seed = its position)."""
    rows = [("trained", trained)] + [(f"random, seed {i}", r) for i, r in enumerate(random)]
    return [
        {
            "weights": label,
            "image": "x".join(str(d) for d in r.input_shape),
            "circular sigma_min/sigma_max": r.circular,
            "zero-padded sigma_min/sigma_max (Lanczos)": r.zero_padded,
            "Lanczos residual": r.residual,
        }
        for label, r in rows
    ]


def equal_taps_text(pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], nullity: int) -> str:
    """The sentence the prose shows about where a trained W1's kernel comes from: the pairs of kernel taps
    (channel, row, col) with equal weights in every filter (``conv_operator.equal_taps``), beside the nullity."""
    if nullity == 0:
        return "W1 has a trivial kernel by the rank rule; the search below uses its least visible directions."
    listed = ", ".join(f"{a} = {b}" for a, b in pairs) or "none"
    if len(pairs) == nullity:
        return (
            f"The kernel comes from the weights themselves: {len(pairs)} pairs of taps (channel, row, column) carry "
            f"the same weights in every filter ({listed}), so each difference e_a - e_b of two such taps is a kernel "
            "vector, and these differences account for the whole kernel."
        )
    return (
        f"Pairs of taps (channel, row, column) with the same weights in every filter: {listed}; they account for "
        f"{len(pairs)} of the {nullity} kernel dimensions."
    )


def collision_conclusion(case: str, c: SetCollision, rtol: float) -> str:
    """The sentence the prose shows about one colliding set: exact (worst float64 first-layer change at most the
    rank rule's ``rtol``) or not, and whether the top-5 survived on every image."""
    worst = c.spread("first_layer_rel64").worst
    exact = worst <= rtol
    top = c.rate("same_top5") if c.same_top5 is not None else None
    kept = "" if top is None else (" and the top-5 is kept on every photo" if top.k == top.n else
                                   f" and the top-5 is kept on only {top.k} of {top.n} photos")  # fmt: skip
    verdict_text = "is invisible to the first layer at round-off" if exact else "is visible to the first layer"
    return f"The {case} {verdict_text} (worst change {worst:.2g} against the tolerance {rtol:.2g}){kept}."
