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

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from helpers.book import page
from helpers.data.normalization import PixelInputError, check_pixels
from helpers.experiments.collisions import colliding_adversarials
from helpers.linalg.kernels import PixelKernel, pixel_kernel
from helpers.models.segmentation import mask_iou
from helpers.progress import progress_bar

#: ASMA's parameters as the authors' reference implementation sets them (src/main.py of
#: github.com/utkuozbulak/adaptive-segmentation-mask-attack): multiplier = beta * IoU + tau, 2501 iterations.
ASMA_TAU = 1e-7


ASMA_BETA = 1e-6


ASMA_ITERATIONS = 2501


EPS_8_255 = 8 / 255


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = EPS_8_255,
    alpha: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    seed: int | None = 0,
) -> torch.Tensor:
    """Untargeted l_inf PGD (torchattacks.PGD) on a pixel-space classifier.

    images: (B, C, H, W) in [0, 1]; labels: (B,) class indices; eps, alpha in pixel units.
    Returns the adversarial images (B, C, H, W) in [0, 1] with ||x' - x||_inf <= eps.
    """
    import torchattacks

    check_pixels(images)
    if labels.shape != images.shape[:1]:
        raise PixelInputError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if not 0 < eps <= 1 or steps < 1:
        raise PixelInputError(f"need 0 < eps <= 1 and steps >= 1, got eps={eps}, steps={steps}")
    if seed is not None:
        torch.manual_seed(seed)  # torchattacks draws the random start from the global generator
    attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    return attack(images, labels).detach()


@torch.no_grad()
def saturation(clean: torch.Tensor, adversarial: torch.Tensor, eps: float, tol: float = 1e-6) -> float:
    """Fraction (0..1) of pixels whose perturbation sits at the budget, |x' - x| >= eps - tol."""
    return ((adversarial - clean).abs() >= eps - tol).float().mean().item()


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


def asma(
    model: nn.Module,
    image: torch.Tensor,
    target: torch.Tensor,
    *,
    iterations: int = ASMA_ITERATIONS,
    tau: float = ASMA_TAU,
    beta: float = ASMA_BETA,
    eps: float | None = None,
    classes: Sequence[int] | None = None,
    stop_iou: float | None = 1.0,
    progress: bool = False,
) -> ASMAResult:
    """The Adaptive Segmentation Mask Attack: a targeted attack toward the mask ``target``.

    Each iteration ascends ``asma_loss(g(x), target) - ||x - x0||_2^2`` with a raw-gradient step scaled by
    the adaptive multiplier ``beta * IoU(prediction, target) + tau`` and clamps x to [0, 1] (the paper's
    Algorithm 1; defaults are the authors' parameters). ``eps`` optionally also projects x onto the l_inf
    ball of radius eps around x0 (not part of ASMA; used when a fixed budget is wanted, as in Fig. 3).

    model: pixel-space segmentation model, (1, C, H, W) -> (1, K, H, W) logits; image: (1, C, H, W) in [0, 1];
    target: (H, W) integer mask; classes: those the loss pushes toward (default: those in the target).
    Stops early when the IoU reaches ``stop_iou`` (1.0: only on a perfect match; None: never).
    """

    check_pixels(image, "image")
    if image.shape[0] != 1:
        raise PixelInputError(f"asma attacks one image at a time, got a batch of {image.shape[0]}")
    if target.dim() != 2 or target.shape != image.shape[-2:] or target.is_floating_point():
        raise PixelInputError(
            f"target must be an integer (H, W) = {tuple(image.shape[-2:])} mask, "
            f"got {target.dtype} {tuple(target.shape)}"
        )
    if iterations < 1:
        raise PixelInputError(f"iterations must be >= 1, got {iterations}")
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
    for step in progress_bar(range(iterations), desc="ASMA", disable=not progress, leave=False):
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


def benchmark(
    model: nn.Module,
    clean: torch.Tensor,
    label: torch.Tensor,
    *,
    eps: float,
    pgd_eps: float,
    n: int = 100,
    pgd_runs: int | None = None,
    steps: int = 10,
    alpha: float | None = None,
    kernel: PixelKernel | None = None,
) -> dict[str, float]:
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
    return {
        "n": n,
        "seconds_colliding": twins,
        "seconds_pgd_loop": loop,
        "pgd_runs_timed": runs,
        "extrapolated": runs < n,
        "speedup": loop / twins,
    }


def first_fooled(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    limit: int = 64,
) -> tuple[int, torch.Tensor]:
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
        raise ValueError(
            f"PGD with eps={eps:.3g}, {steps} steps fooled none of the first {len(images)} images; raise eps or steps"
        )
    i = int(hits[0])
    return i, adversarial[i : i + 1]


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
