"""Adversarial attacks and colliding adversarial examples (Ozbulak et al., Sec. 4.2 and 5, Fig. 3).

Every budget is an l_inf distance in pixel units: the models are wrapped with ``normalization.pixel_space``.

* ``pgd``: PGD (Madry et al.) through torchattacks; ``first_fooled`` picks a test image it fools.
* ``asma``: the Adaptive Segmentation Mask Attack (Ozbulak, Van Messem, De Neve, MICCAI 2019), which no library
  ships; written here after the paper and its authors' reference implementation.
* ``pgd_twins``: PGD with limit eps, then many images x_hat = x' + P with P in the kernel of the first layer
  (``collisions.colliding_adversarials``), each within the *attack's own* eps of the clean image and inside
  [0, 1], so that the model's output for every x_hat equals its output for x' (up to float round-off).
* ``twin_study`` / ``pgd_twin_study`` / ``asma_batch`` / ``tiled_twin_study``: the same over sets of inputs,
  with rates (95% intervals), worst cases and the twins measured again after an 8-bit PNG round trip.
* ``benchmark`` / ``benchmark_set``: those twins against running PGD as many times.
* ``Fig3Results``, ``fig3_claims``, ``fig3_checks``: the Fig. 3 chapter's criteria (claims) and internal checks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from helpers import stats
from helpers.book import page, verdict
from helpers.data import image_validity
from helpers.data.normalization import PixelInputError, check_pixels
from helpers.experiments.collisions import (
    CollidingSet,
    Requirement,
    colliding_adversarials,
    colliding_report,
    headroom,
    max_patch_scale,
    random_kernel_perturbation,
    tiled_twin,
)
from helpers.linalg.kernels import PixelKernel, pixel_kernel
from helpers.models.forward import batched
from helpers.models.segmentation import mask_iou, mask_iou_batch
from helpers.progress import progress_bar

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

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
    prediction is not, summed over the batch. logits (B, K, H, W); target (B, H, W), or (H, W) for every image,
    long."""
    pred = logits.argmax(1)
    loss = logits.new_zeros(())
    for c in classes:
        loss = loss + (logits[:, c] * ((target == c) & (pred != c))).sum()
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


#: A ``{row name: {column: value}}`` table with more columns than this is shown transposed.
WIDE_TABLE_COLUMNS = 8


def table(rows: dict[str, dict[str, Any]] | Sequence[dict[str, Any]], digits: int = 4) -> Any:
    """A table for the notebooks: ``{row name: {column: value}}`` (transposed when it has more than
    ``WIDE_TABLE_COLUMNS`` columns) or a list of dicts, floats with ``digits`` significant digits. Returns an
    IPython ``HTML`` object (``page.table_html``; plain text outside IPython)."""
    if isinstance(rows, dict):
        columns = list(dict.fromkeys(k for values in rows.values() for k in values))
        if len(columns) > WIDE_TABLE_COLUMNS:  # too wide for the text column: one row per quantity instead
            rows = [{"": c, **{name: values.get(c) for name, values in rows.items()}} for c in columns]
        else:
            rows = [{"": name, **values} for name, values in rows.items()]
    try:
        from IPython.display import HTML

        return HTML(page.table_html(rows, digits=digits))
    except ImportError:
        return page.table_text(rows, digits=digits)


# --- Fig. 3: PGD, then colliding twins ----------------------------------------------------------------------


@dataclass
class PGDTwins:
    """One PGD run and its colliding twins: ``clean`` (1, C, H, W) pixels, ``label`` (1,) the class attacked,
    ``twins`` (its ``clean`` / ``adversarial`` / ``images``: see ``CollidingSet``), ``report``
    (``describe_colliding`` plus "saturated_pixels", the fraction of pixels PGD pushed to its budget)."""

    clean: torch.Tensor
    label: torch.Tensor
    twins: CollidingSet
    report: dict[str, Any]

    @property
    def adversarial(self) -> torch.Tensor:
        return self.twins.adversarial


def pgd_twins(
    model: nn.Module,
    clean: torch.Tensor,
    label: torch.Tensor | None = None,
    *,
    eps: float,
    steps: int,
    alpha: float | None = None,
    random_start: bool = True,
    n: int = 100,
    kernel: PixelKernel | None = None,
    seed: int = 0,
) -> PGDTwins:
    """PGD with limit ``eps`` (step ``alpha``, default eps / 4), then ``n`` colliding twins within the *same*
    ``eps`` of ``clean`` (l_inf, pixel units): the paper's condition that the twins respect the attack's limit.

    model: pixel-space classifier; clean: (1, C, H, W) in [0, 1]; label: (1,) the class to move away from
    (None: the model's own prediction). Raises ``PixelInputError`` for non-pixel images.
    """
    if label is None:
        with torch.no_grad():
            label = model(clean).argmax(1)
    alpha = alpha if alpha is not None else eps / 4
    adversarial = pgd(model, clean, label, eps=eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed)
    twins, report = colliding_report(model, clean, adversarial, eps=eps, n=n, kernel=kernel, seed=seed)
    report["saturated_pixels"] = saturation(clean, adversarial, eps)
    return PGDTwins(clean, label, twins, report)


def twins_figure(
    model: nn.Module,
    run: PGDTwins,
    class_names: Sequence[str] = (),
    *,
    attack: str,
    twin: str = "twin",
    shown: int = 3,
    k: int = 6,
    gain: float = 10.0,
) -> plt.Figure:
    """Fig. 3 (classification): clean, adversarial (titled ``attack``) and ``shown`` twins ("<twin> i"), each
    with its top-``k`` predictions, and the perturbations from the clean image times ``gain`` around gray."""
    from helpers.experiments.collision_figures import classification_figure

    images = [run.clean, run.adversarial] + [run.twins.images[i : i + 1] for i in range(shown)]
    titles = ["clean", attack] + [f"{twin} {i}" for i in range(shown)]
    return classification_figure(images, titles, model, class_names, k=k, gain=gain, reference=run.clean)


# --- Fig. 3: ASMA, then colliding twins -------------------------------------------------------------------------


def asma_summary(result: ASMAResult) -> dict[str, float | int]:
    """What an ASMA run did: iterations, IoU with the target at the start, end and best, final l_inf (pixels)."""
    return {
        "iterations": len(result.iou) - 1,
        "IoU start": result.iou[0],
        "IoU end": result.final_iou,
        "IoU best": max(result.iou),
        "l_inf": result.linf[-1],
    }


def square_target(size: int, cls: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A (size, size) long mask: class ``cls`` on the central square [size/4, 3 size/4), background 0 elsewhere."""
    if size < 4:
        raise PixelInputError(f"size must be >= 4 to hold a square, got {size}")
    target = torch.zeros(size, size, dtype=torch.long, device=device)
    target[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = cls
    return target


@torch.no_grad()
def predicted_masks(model: nn.Module, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The predicted mask (H, W) (argmax over classes) of a segmentation model for each (1, C, H, W) image."""
    return [model(im).argmax(1)[0] for im in images]


def mask_figure(
    model: nn.Module, images: Sequence[torch.Tensor], titles: Sequence[str], target: torch.Tensor | None = None
) -> plt.Figure:
    """Fig. 3 (segmentation): ``images`` (each (1, C, H, W)) on top, the model's predicted masks below, with
    their IoU to ``target`` (H, W) and the target itself when given."""
    from helpers.experiments.collision_figures import segmentation_figure

    return segmentation_figure(list(images), predicted_masks(model, images), titles, target=target)


# --- Fig. 3 over sets of inputs: rates, worst cases, PNG round trips ------------------------------------------


def pgd_reach(eps: float, alpha: float, steps: int, random_start: bool) -> float:
    """How far (l_inf, pixels) PGD with limit ``eps`` can move a pixel: eps with a random start (it starts
    anywhere in the ball), else min(eps, steps * alpha) (it starts at the clean image)."""
    if not 0 < eps <= 1 or alpha <= 0 or steps < 1:
        raise PixelInputError(f"need 0 < eps <= 1, alpha > 0, steps >= 1, got eps={eps}, alpha={alpha}, steps={steps}")
    return eps if random_start else min(eps, steps * alpha)


def largest_beta(clean: torch.Tensor, adversarial: torch.Tensor, direction: torch.Tensor, eps: float) -> float:
    """The largest beta >= 0 with ``adversarial + beta * direction`` within ``eps`` (l_inf) of ``clean`` and in
    [0, 1]: how far the paper's single-multiplier construction P = beta * direction may go. One pixel at the
    budget or at 0 / 1 with the direction pointing out pins it to 0 (reported as measured).

    clean, adversarial, direction: same shape; adversarial in [0, 1] and within eps of clean.
    """
    if not clean.shape == adversarial.shape == direction.shape:
        raise PixelInputError(
            f"clean {tuple(clean.shape)}, adversarial {tuple(adversarial.shape)} and direction "
            f"{tuple(direction.shape)} must have the same shape"
        )
    lo, hi = headroom(clean, adversarial, eps, margin=0.0)
    return float(max_patch_scale(direction.double().reshape(1, -1), lo.reshape(1, -1), hi.reshape(1, -1)))


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per item, whether two predictions agree everywhere: (N,) labels or (N, H, W) masks -> (N,) bool."""
    return (a == b).reshape(len(a), -1).all(1)


@torch.no_grad()
def png_predictions(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The model's argmax (labels (N,) or masks (N, H, W)) on ``images`` (N, C, H, W) after each is stored as an
    8-bit PNG and read back (``image_validity.png_round_trip``)."""
    return batched(model, image_validity.png_round_trip(images), batch).argmax(1)


@dataclass
class TwinStudy:
    """An attack on a set of clean inputs, then colliding twins of each adversarial example within the attack's
    own limit ``eps`` of its clean input.

    Per input (lists of length N): ``correct`` (the clean prediction is the label; always true without labels),
    ``fooled`` (correct, and the attack changed the prediction, or any pixel of the mask). Per fooled input,
    ``reports``: ``describe_colliding`` plus "index", "keep_after_png" (twins whose prediction after a PNG round
    trip is the adversarial one), "linf_after_png" (largest l_inf to the clean input after the round trip),
    "outside_unit_range", "adversarial_survives_png" (the PNG-stored adversarial example keeps its prediction),
    "largest_tiled_beta" (``largest_beta`` of one random kernel direction in every patch, l_inf 1), "reach"
    (l_inf of x' - x). ``example``: the first fooled input's run, for figures. ``reach``: how far the attack may
    move a pixel (``pgd_reach``; default ``eps``).
    """

    eps: float
    correct: list[bool]
    fooled: list[bool]
    reports: list[dict[str, Any]]
    example: PGDTwins | None
    seconds: float = 0.0
    reach: float | None = None

    def __post_init__(self) -> None:
        if self.reach is None:
            self.reach = self.eps

    @property
    def n_inputs(self) -> int:
        return len(self.correct)

    def _need_fooled(self) -> list[dict[str, Any]]:
        if not self.reports:
            raise ValueError(f"the attack fooled none of the {self.n_inputs} inputs: no twins to measure")
        return self.reports

    @property
    def fooling(self) -> stats.Rate:
        """Inputs the attack fooled, among those the model got right."""
        return stats.Rate(sum(self.fooled), sum(self.correct))

    @property
    def kept(self) -> stats.Rate:
        """Twins with exactly the adversarial prediction (mask), over all twins of all fooled inputs."""
        r = self._need_fooled()
        return stats.Rate(sum(x["keep_adversarial_prediction"] for x in r), sum(x["n"] for x in r))

    @property
    def kept_after_png(self) -> stats.Rate:
        """Twins whose prediction after an 8-bit PNG round trip is the (float) adversarial one."""
        r = self._need_fooled()
        return stats.Rate(sum(x["keep_after_png"] for x in r), sum(x["n"] for x in r))

    @property
    def adversarial_png(self) -> stats.Rate:
        """Adversarial examples whose prediction survives an 8-bit PNG round trip."""
        return stats.Rate.of(x["adversarial_survives_png"] for x in self._need_fooled())

    def spread(self, key: str, *, larger_is_worse: bool = True, unit: str = "") -> stats.Spread:
        """A per-fooled-input number of ``reports`` as a ``Spread`` (e.g. "distinct", "max_linf_to_clean")."""
        return stats.Spread.of((x[key] for x in self._need_fooled()), larger_is_worse=larger_is_worse, unit=unit)

    @property
    def collapsed(self) -> stats.Rate:
        """Fooled inputs whose twins are all one image (the attack left no room for a kernel direction)."""
        return stats.Rate.of(x["distinct"] == 1 for x in self._need_fooled())

    @property
    def distinct_share(self) -> stats.Spread:
        """Distinct twins / twins drawn, per fooled input (the worst case is the smallest)."""
        return stats.Spread.of((x["distinct"] / x["n"] for x in self._need_fooled()), larger_is_worse=False)

    def summary(self) -> dict[str, Any]:
        """The numbers a table or the results JSON shows (rates as text, spreads as mean and worst)."""
        row: dict[str, Any] = {"inputs": self.n_inputs, "fooled": self.fooling.text()}
        if not self.reports:
            return row
        dist, linf = self.spread("distinct", larger_is_worse=False), self.spread("max_linf_to_clean")
        return {
            **row,
            "twins keep the prediction": self.kept.text(),
            "after PNG": self.kept_after_png.text(),
            "adversarial survives PNG": self.adversarial_png.text(),
            "distinct twins (worst)": dist.worst,
            "attack reach": self.spread("reach").worst,
            "saturated pixels (mean)": self.spread("saturated_pixels").mean,
            "l_inf to clean (worst)": linf.worst,
            "eps": self.eps,
            "l_inf after PNG (worst)": self.spread("linf_after_png").worst,
            "outside [0, 1] (worst)": self.spread("outside_unit_range").worst,
            "largest tiled beta (worst)": self.spread("largest_tiled_beta", larger_is_worse=False).worst,
            "output change (worst)": self.spread("max_rel_output_change").worst,
        }


def twin_study(
    model: nn.Module,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    *,
    eps: float,
    n_twins: int,
    labels: torch.Tensor | None = None,
    kernel: PixelKernel | None = None,
    seed: int = 0,
    batch: int = 32,
) -> TwinStudy:
    """Colliding twins of every fooled adversarial example, within ``eps`` of its clean input (see ``TwinStudy``).

    model: pixel-space classifier or segmenter; clean, adversarial: (N, C, H, W) in [0, 1], the attack's output
    for each input; labels: (N,) true classes (None: the model's clean prediction, labels or masks). Twins of
    input i use seed ``seed + i``.
    """
    check_pixels(clean, "clean")
    check_pixels(adversarial, "adversarial")
    if clean.shape != adversarial.shape:
        raise PixelInputError(f"clean {tuple(clean.shape)} and adversarial {tuple(adversarial.shape)} differ")
    start = time.perf_counter()
    device = next(model.parameters()).device
    kernel = kernel or pixel_kernel(model, clean.shape[1:])
    with torch.no_grad():
        pred_clean = batched(model, clean, batch).argmax(1)
        pred_adv = batched(model, adversarial, batch).argmax(1)
    truth = pred_clean if labels is None else labels.cpu()
    correct = _same(pred_clean, truth)
    fooled = correct & ~_same(pred_adv, truth)
    png_adv = png_predictions(model, adversarial, batch)
    reports, example = [], None
    for i in torch.nonzero(fooled).flatten().tolist():
        x, x_adv = clean[i : i + 1].to(device), adversarial[i : i + 1].to(device)
        twins, report = colliding_report(model, x, x_adv, eps=eps, n=n_twins, kernel=kernel, seed=seed + i)
        after = image_validity.png_round_trip(twins.images)
        direction = random_kernel_perturbation(kernel, tuple(clean.shape[1:]), seed=seed + i).to(device)
        report.update(
            index=i,
            keep_after_png=int(_same(png_predictions(model, twins.images, batch), pred_adv[i : i + 1]).sum()),
            linf_after_png=float((after - x).abs().max()),
            outside_unit_range=image_validity.outside_unit_range(twins.images) + 0.0,  # no "-0.0"
            adversarial_survives_png=bool(_same(png_adv[i : i + 1], pred_adv[i : i + 1])),
            largest_tiled_beta=largest_beta(x, x_adv, direction.reshape(x.shape), eps),
            reach=float((x_adv - x).abs().max()),
            saturated_pixels=saturation(x, x_adv, eps),
        )
        reports.append(report)
        if example is None:
            example = PGDTwins(x, truth[i : i + 1].to(device), twins, report)
    return TwinStudy(eps, correct.tolist(), fooled.tolist(), reports, example, time.perf_counter() - start)


def pgd_twin_study(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool,
    n_twins: int,
    kernel: PixelKernel | None = None,
    seed: int = 0,
) -> TwinStudy:
    """PGD with limit ``eps`` on every image of ``images`` (N, C, H, W) at once, then ``twin_study``.

    labels: (N,) true classes; None attacks the model's own prediction (models without a test set here).
    ``random_start`` False with steps * alpha < eps leaves the attack room inside its own limit
    (``pgd_reach``).
    """
    device = next(model.parameters()).device
    images = images.to(device)
    if labels is None:
        with torch.no_grad():
            labels = batched(model, images).argmax(1)
    target = labels.to(device)
    adversarial = pgd(model, images, target, eps=eps, alpha=alpha, steps=steps, random_start=random_start, seed=seed)
    study = twin_study(model, images, adversarial, eps=eps, n_twins=n_twins, labels=labels, kernel=kernel, seed=seed)
    study.reach = pgd_reach(eps, alpha, steps, random_start)
    return study


def imagenet_inputs(size: int = 224, minimum: int = 20) -> tuple[list[str], torch.Tensor]:
    """Every offline natural photo (``photos.natural_image_set``), then horizontal flips of the first ones until
    there are ``minimum`` inputs: (names, (N, 3, size, size) in [0, 1]); a flip is named "<photo> (flipped)"."""
    from helpers.data import photos

    names, images = photos.natural_image_set(size)
    extra = max(0, minimum - len(names))
    if extra > len(names):
        raise ValueError(f"{len(names)} photos and their flips cannot make {minimum} inputs")
    names += [f"{n} (flipped)" for n in names[:extra]]
    return names, torch.cat([images, images[:extra].flip(-1)])


@dataclass
class ASMABatch:
    """ASMA on a batch: ``adversarial`` (B, C, H, W) in [0, 1], ``masks`` (B, H, W) predicted for them, and each
    image's IoU with its target at the start and the end (0..1)."""

    adversarial: torch.Tensor
    masks: torch.Tensor
    iou_start: list[float]
    iou_end: list[float]
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Mean IoU with the target before and after, and the share of images whose IoU rose."""
        rose = stats.Rate.of(e > s for s, e in zip(self.iou_start, self.iou_end))
        return {
            "images": len(self.iou_start),
            "IoU start (mean)": sum(self.iou_start) / len(self.iou_start),
            "IoU end (mean)": sum(self.iou_end) / len(self.iou_end),
            "IoU rose": rose.text(),
        }


def asma_batch(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    iterations: int = ASMA_ITERATIONS,
    tau: float = ASMA_TAU,
    beta: float = ASMA_BETA,
    eps: float | None = None,
    classes: Sequence[int] | None = None,
    stop_iou: float | None = 1.0,
) -> ASMABatch:
    """``asma`` on a batch at once, each image with its own adaptive multiplier beta * IoU_i + tau and its own
    target; an image stops moving once its IoU reaches ``stop_iou``. For one image it gives ``asma``'s result.

    images: (B, C, H, W) in [0, 1]; targets: (B, H, W) integer masks. The models' images must not interact
    (eval mode: no batch statistics).
    """
    check_pixels(images, "images")
    if targets.dim() != 3 or targets.shape[0] != images.shape[0] or targets.shape[1:] != images.shape[-2:]:
        raise PixelInputError(
            f"targets must be (B, H, W) = ({images.shape[0]}, {images.shape[-2]}, {images.shape[-1]}), "
            f"got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or iterations < 1:
        raise PixelInputError(f"targets must be integer masks and iterations >= 1, got {targets.dtype}, {iterations}")
    start = time.perf_counter()
    targets = targets.to(images.device).long()
    classes = sorted(int(c) for c in targets.unique()) if classes is None else list(classes)
    x0 = images.detach()
    x = x0.clone()
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    iou_start: list[float] = []
    for step in range(iterations):
        x.requires_grad_(True)
        logits = model(x)
        loss = asma_loss(logits, targets, classes)
        (grad,) = torch.autograd.grad(loss - ((x - x0) ** 2).sum(), x)
        iou = mask_iou_batch(logits.detach().argmax(1), targets)
        iou_start = iou_start or iou.tolist()
        if stop_iou is not None:
            done |= iou >= stop_iou
        multiplier = (beta * iou * (1.0 if step else 0.0) + tau) * (~done)
        x = (x.detach() + multiplier.view(-1, 1, 1, 1) * grad).clamp_(0, 1)
        if eps is not None:
            x = torch.max(torch.min(x, x0 + eps), x0 - eps)
    x = x.detach()
    with torch.no_grad():
        masks = model(x).argmax(1)
    iou_end = mask_iou_batch(masks, targets).tolist()
    return ASMABatch(x, masks, iou_start, iou_end, time.perf_counter() - start)


@torch.no_grad()
def tiled_twin_study(
    model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, *, eps: float, seed: int = 0
) -> list[dict[str, Any]]:
    """The paper's tiled construction (``collisions.tiled_twin``) on every input, for first layers with no exact
    twin: per input its residuals (``collision_residuals`` between x' and the twin), "beta", "linf_to_clean",
    "outside_unit_range", "same_mask" (the twin's whole mask is x''s) and "same_mask_after_png" (after an 8-bit
    PNG round trip of the twin). clean, adversarial: (N, C, H, W) in [0, 1]."""
    rows = []
    for i in range(len(clean)):
        x, x_adv = clean[i : i + 1], adversarial[i : i + 1]
        twin, res = tiled_twin(model, x, x_adv, eps=eps, seed=seed + i)
        mask_adv = model(x_adv).argmax(1)
        res.update(
            outside_unit_range=image_validity.outside_unit_range(twin),
            same_mask=bool(_same(model(twin).argmax(1), mask_adv)),
            same_mask_after_png=bool(_same(model(image_validity.png_round_trip(twin)).argmax(1), mask_adv)),
        )
        rows.append(res)
    return rows


def benchmark(
    model: nn.Module,
    clean: torch.Tensor,
    label: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool,
    n: int = 100,
    pgd_runs: int | None = None,
    kernel: PixelKernel | None = None,
) -> dict[str, Any]:
    """Seconds for ``n`` colliding adversarial examples (one PGD run with the given settings, then ``n`` twins
    within the same ``eps``) against ``n`` PGD runs with random starts (seeds 0..n-1; the way to get different
    adversarial examples from PGD); ``pgd_runs`` < n times that many and scales to n ("extrapolated").
    clean: (1, C, H, W) in [0, 1]; label: (1,)."""
    kernel = kernel or pixel_kernel(model, clean.shape[1:])
    start = time.perf_counter()
    adversarial = pgd(model, clean, label, eps=eps, alpha=alpha, steps=steps, random_start=random_start, seed=0)
    colliding_adversarials(model, clean, adversarial, eps=eps, n=n, kernel=kernel)
    twins = time.perf_counter() - start
    runs = min(n, pgd_runs or n)
    start = time.perf_counter()
    for seed in range(runs):
        pgd(model, clean, label, eps=eps, alpha=alpha, steps=steps, random_start=True, seed=seed)
    loop = (time.perf_counter() - start) * n / runs
    return {
        "n": n,
        "seconds_colliding": twins,
        "seconds_pgd_loop": loop,
        "pgd_runs_timed": runs,
        "extrapolated": runs < n,
        "speedup": loop / twins,
    }


def benchmark_set(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, inputs: int, **settings: Any
) -> list[dict[str, Any]]:
    """``benchmark`` on each of the first ``inputs`` images (N, C, H, W) / labels (N,); ``settings`` as there."""
    device = next(model.parameters()).device
    return [
        benchmark(model, images[i : i + 1].to(device), labels[i : i + 1].to(device), **settings)
        for i in range(min(inputs, len(images)))
    ]


# --- Fig. 3: criteria, claims and internal checks -------------------------------------------------------------

#: A twin's logits may differ from x''s by float round-off only: relative to the largest |logit| of x'.
ROUND_OFF = 1e-4
#: A PGD or ASMA output may exceed its limit by float32 round-off only (pixels).
PIXEL_SLACK = 1e-6
#: The share of twins that must keep the prediction after a PNG round trip (lower 95% bound), our own claim.
PNG_KEEP = 0.95


@dataclass
class Fig3Results:
    """The measurements behind the Fig. 3 chapter's claims (all budgets l_inf in pixel units).

    ``mnist``: {model: ``TwinStudy``} of the PGD that leaves room inside its limit; ``mnist_whole``: the same with
    PGD run to its limit; ``imagenet``: the ImageNet classifier's study (``model`` names it, ``model_weights``
    its weights, ``is_paper_model``: it is the paper's ViT-B with trained weights); ``segmenter``: ASMA then twins
    on the MNIST segmenter, ``asma``: that ASMA run; ``mobilenet``: ``tiled_twin_study`` rows, with the
    twins' eps, the weights and whether they are trained; ``benchmark``: ``benchmark_set`` rows.
    """

    mnist: dict[str, TwinStudy]
    mnist_whole: dict[str, TwinStudy]
    imagenet: TwinStudy
    model: str
    model_weights: str
    is_paper_model: bool
    segmenter: TwinStudy
    asma: ASMABatch
    mobilenet: list[dict[str, Any]]
    mobilenet_eps: float
    mobilenet_weights: str
    mobilenet_trained: bool
    benchmark: list[dict[str, Any]]

    def studies(self) -> dict[str, TwinStudy]:
        """Every twin study by name (the whole-budget ones excepted: they may have no twins worth the name)."""
        return {
            **{f"MNIST {k}": s for k, s in self.mnist.items()},
            self.model: self.imagenet,
            "MNIST segmenter (ASMA)": self.segmenter,
        }

    def extra(self) -> dict[str, Any]:
        """The results JSON's ``extra``: each study's summary, ASMA's, the MobileNet rows, the benchmark."""
        return {
            "studies": {k: s.summary() for k, s in self.studies().items()},
            "whole_budget": {k: s.summary() for k, s in self.mnist_whole.items()},
            "asma_mnist": self.asma.summary(),
            "mobilenet": self.mobilenet,
            "benchmark": self.benchmark,
        }


def _pooled(rates: Sequence[stats.Rate]) -> stats.Rate:
    return stats.Rate(sum(r.k for r in rates), sum(r.n for r in rates))


def _pooled_spread(spreads: Sequence[stats.Spread]) -> stats.Spread:
    values = [v for s in spreads for v in s.values]
    return stats.Spread.of(values, larger_is_worse=spreads[0].larger_is_worse, unit=spreads[0].unit)


def _png_rates(r: Fig3Results) -> dict[str, stats.Rate]:
    return {k: s.kept_after_png for k, s in r.studies().items()}


def fig3_claims(r: Fig3Results, paper_claim: str, paper_models: tuple[str, str]) -> list[dict[str, Any]]:
    """The Fig. 3 chapter's claims as keyword arguments of ``results.judge`` (criterion, measured value, weights,
    whether trained weights decide it). ``paper_claim``: the paper's words; ``paper_models``: its classification
    and segmentation models. Every criterion is fixed here, before any value of ``r`` is read."""
    classification, segmentation_model = paper_models
    n_mnist = ", ".join(f"{k} {s.kept.k}/{s.kept.n}" for k, s in r.mnist.items())
    mnist_inputs = max(s.n_inputs for s in r.mnist.values())
    whole = _pooled_spread([s.spread("distinct") for s in r.mnist_whole.values()])
    share = _pooled_spread([s.distinct_share for s in r.studies().values()])
    png = _png_rates(r)
    moved = [row for row in r.mobilenet if row["beta"] > 0] or r.mobilenet  # beta = 0: the twin is x' itself
    pinned = len(r.mobilenet) - len(moved)
    first = stats.Spread.of(row["first_layer_rel"] for row in moved)
    masks = stats.Rate.of(row["same_mask"] for row in moved)
    speed = stats.Spread.of((b["speedup"] for b in r.benchmark), larger_is_worse=False, unit="x")
    book = "pretrained (book-trained)"
    return [
        dict(
            id="fig3.pgd_twins_keep_prediction_vitb",
            description=f"PGD colliding adversarial examples keep the prediction ({classification})",
            criterion=verdict.every("colliding twins keep the PGD prediction").trained(),
            paper=paper_claim,
            ours=f"{r.imagenet.kept.text()} twins on {r.model}, {r.imagenet.fooling.n} photos",
            measured=r.imagenet.kept,
            trained=r.is_paper_model,
            weights=r.model_weights,
            reason=""
            if r.is_paper_model
            else f"{classification} with trained weights is needed; measured on {r.model} ({r.model_weights})",
        ),
        dict(
            id="fig3.pgd_twins_mnist",
            description=f"PGD colliding adversarial examples keep the prediction ({mnist_inputs} MNIST test digits, "
            "book-trained patch model and MLP)",
            criterion=verdict.every("twins within the attack's eps keep the adversarial prediction"),
            paper=paper_claim,
            ours=_pooled([s.kept for s in r.mnist.values()]).text() + f" ({n_mnist})",
            measured=_pooled([s.kept for s in r.mnist.values()]),
            trained=True,
            weights=book,
            reason=f"PGD with limit {next(iter(r.mnist.values())).eps:g} stops at "
            f"{max(s.reach or 0.0 for s in r.mnist.values()):g} (no random start), leaving the twins room",
        ),
        dict(
            id="fig3.pgd_twins_beyond_vitb",
            description=f"exact PGD twins keep the prediction on {r.model} ({r.model_weights} weights)",
            criterion=verdict.every("twins within the attack's eps keep the adversarial prediction", kind="beyond"),
            paper="—",
            ours=r.imagenet.kept,
            measured=r.imagenet.kept,
            trained=True,
            weights=r.model_weights,
            reason=f"{r.imagenet.n_inputs} inputs: the offline photos and flips of the first ones",
        ),
        dict(
            id="fig3.twins_are_numerous",
            description="every adversarial example has as many distinct twins as drawn, within the attack's limit",
            criterion=verdict.at_least(1.0, "distinct twins / twins drawn (worst fooled input)"),
            paper="numerous colliding adversarial examples per adversarial example",
            ours=share,
            measured=share,
            trained=True,
            weights=f"{book} / {r.model_weights}",
        ),
        dict(
            id="fig3.whole_budget_leaves_no_room",
            description="PGD run to its limit (random start) leaves no room: every fooled digit's twins collapse "
            "onto x'",
            criterion=verdict.at_most(1, "distinct twins per fooled digit (largest)", kind="beyond"),
            paper="—",
            ours=f"{whole.text()}; one distinct twin: " + _pooled([s.collapsed for s in r.mnist_whole.values()]).text(),
            measured=whole,
            trained=True,
            weights=book,
        ),
        dict(
            id="fig3.twins_survive_png",
            description="twins keep the adversarial prediction (mask) after an 8-bit PNG round trip",
            criterion=verdict.holds_when(
                f"in every study, lower 95% bound of the share of twins that keep it ≥ {PNG_KEEP:.0%}",
                lambda rates: all(rate.interval[0] >= PNG_KEEP for rate in rates.values()),
                kind="beyond",
            ),
            paper="—",
            ours="; ".join(f"{k}: {v.text()}" for k, v in png.items()),
            measured=png,
            trained=True,
            weights=f"{book} / {r.model_weights}",
        ),
        dict(
            id="fig3.asma_twins_mnist",
            description=f"ASMA colliding twins keep the adversarial mask ({r.segmenter.n_inputs} MNIST digits, "
            "book-trained segmenter with a patch first layer)",
            criterion=verdict.every("twins within ASMA's eps keep its mask pixel for pixel"),
            paper="same predicted mask",
            ours=r.segmenter.kept,
            measured=r.segmenter.kept,
            trained=True,
            weights=book,
            reason=f"tau, beta scaled by 1e4 (published values barely move this model); ASMA changed "
            f"{r.segmenter.fooling.text()} masks",
        ),
        dict(
            id="fig3.asma_twins_mobilenet",
            description=f"the tiled null-space twin is an exact collision on {segmentation_model} "
            f"({len(r.mobilenet)} photos)",
            criterion=verdict.at_most(ROUND_OFF, "first-layer relative change (worst input)"),
            paper="same predicted mask",
            ours=first,
            measured=first,
            trained=True,
            weights=r.mobilenet_weights,
            reason="3x3 stride-2 padded first conv: windows overlap and the whole-image operator is injective "
            f"(12 inputs vs 16 outputs per position), for any weights; {pinned} photo(s) left out: a pixel at "
            "0 or 1 pins the tiled beta to 0 (the twin is x' itself)",
        ),
        dict(
            id="fig3.asma_mask_mobilenet",
            description=f"the tiled twin keeps the ASMA mask on {segmentation_model}",
            criterion=verdict.every("twins keep the ASMA mask pixel for pixel").trained(),
            paper="same predicted mask",
            ours=masks,
            measured=masks,
            trained=r.mobilenet_trained,
            weights=r.mobilenet_weights,
            reason="" if r.mobilenet_trained else "a random DeepLabV3 maps every input to (almost) one output",
        ),
        dict(
            id="fig3.twins_cheaper_than_pgd",
            description=f"{r.benchmark[0]['n']} twins from one PGD run take less time than "
            f"{r.benchmark[0]['n']} PGD runs (MNIST patch model)",
            criterion=verdict.at_least(1.0, "speedup (worst input)", kind="beyond"),
            paper="—",
            ours=speed,
            measured=speed,
            trained=True,
            weights=book,
            reason="wall-clock on the build machine"
            + (" (PGD loop timed on fewer runs and scaled)" if r.benchmark[0]["extrapolated"] else ""),
        ),
    ]


def fig3_checks(r: Fig3Results) -> list[Requirement]:
    """Internal checks of our own code (each can fail; ``results.Checks`` fails the build when one does):
    every attack within its reach (PGD) or its eps (ASMA); every twin within the attack's eps of the clean
    input and in [0, 1]; exact twins' logits equal to round-off (``ROUND_OFF``); ASMA raising the mean IoU with
    its target; the tiled twins within eps and in [0, 1]."""
    out = []
    for name, s in {**r.studies(), **{f"MNIST {k}, whole budget": v for k, v in r.mnist_whole.items()}}.items():
        if not s.reports:
            out.append(Requirement(False, f"{name}: the attack fools at least one input", s.fooling.text()))
            continue
        linf, outside = s.spread("max_linf_to_clean").worst, s.spread("outside_unit_range").worst
        change = s.spread("max_rel_output_change").worst
        reach = s.reach if s.reach is not None else s.eps
        out += [
            Requirement(
                s.spread("reach").worst <= reach + PIXEL_SLACK,
                f"{name}: the attack stays within its reach {reach:.4g}",
                f"{s.spread('reach').worst:.4g}",
            ),
            Requirement(
                linf <= s.eps + PIXEL_SLACK and outside == 0,
                f"{name}: every twin within the attack's eps {s.eps:.4g} and in [0, 1]",
                f"l_inf {linf:.4g}, outside {outside + 0.0:.2g}",
            ),
            Requirement(change < ROUND_OFF, f"{name}: twins' outputs equal x''s to round-off", f"{change:.2e}"),
        ]
    start, end = sum(r.asma.iou_start) / len(r.asma.iou_start), sum(r.asma.iou_end) / len(r.asma.iou_end)
    out.append(Requirement(end > start, "ASMA raises the mean IoU with the target", f"{start:.3f} -> {end:.3f}"))
    worst = max((row["linf_to_clean"] for row in r.mobilenet), default=0.0)
    outside = max((row["outside_unit_range"] for row in r.mobilenet), default=0.0)
    limit = r.mobilenet_eps
    out.append(
        Requirement(
            worst <= limit + PIXEL_SLACK and outside == 0,
            f"tiled twins within eps {limit:.4g} and in [0, 1]",
            f"l_inf {worst:.4g}, outside {outside + 0.0:.2g}",
        )
    )
    return out


# --- a trained substitute (EfficientNet-Lite0): PGD against eps, the stem's kernel, near-null twins -----------

#: The share of photos PGD at the paper's 8/255 must fool (lower 95% bound), our own claim on a trained model.
SUBSTITUTE_FOOLED = 0.8
#: A near-null twin "barely moves" the logits when its relative logit change is at most this share of that of
#: a random perturbation of the same l2 norm.
NEAR_NULL_RATIO = 0.5


@dataclass
class StemReport:
    """What the first layer (a strided, padded conv) of a pixel-space model allows.

    ``nullity``: dimension of ker(W1) by the rank rule (one window, ``kernels.kernel_basis``); ``matrix_shape``:
    W1's shape; ``window_ratio``: sigma_min / sigma_max of W1; ``exact_reason``: why no exact whole-image twin
    exists ("" if one does); ``operator_ratio``: the smallest singular value of the layer as an operator on the
    whole image (circular boundary, ``conv_operator.polyphase_spectrum``) over sigma_max; ``operator_nullity``:
    the dimension of that operator's kernel (circular boundary: null directions per frequency x frequencies;
    0 when every output position sees fewer new pixels than it has filters); ``direction``:
    (C, H, W) float64, the most invisible whole image in *pixel* space (unit l2); ``direction_gain`` and
    ``random_gain``: ||A d|| / (||d|| sigma_max) with the real (zero-padded) conv, for ``direction`` and for a
    seeded Gaussian image (both taken in model space, i.e. divided by the model's std).
    """

    nullity: int
    matrix_shape: tuple[int, int]
    window_ratio: float
    exact_reason: str
    operator_ratio: float
    operator_nullity: int
    direction: torch.Tensor
    direction_gain: float
    random_gain: float


def stem_report(model: nn.Module, image_shape: Sequence[int], seed: int = 0) -> StemReport:
    """The first layer's kernel by the rank rule, whether exact twins exist, and its most invisible direction.

    model: a ``PixelSpace`` model whose first layer is an ``nn.Conv2d`` with H, W divisible by its stride;
    image_shape: (C, H, W).
    """
    from helpers.data.normalization import PixelSpace, to_pixel_space
    from helpers.linalg import conv_operator, kernels

    inner = model.model if isinstance(model, PixelSpace) else model
    _, layer = kernels.first_layer(inner)
    if not isinstance(layer, nn.Conv2d):
        raise PixelInputError(f"stem_report needs a Conv2d first layer, got {type(layer).__name__}")
    try:
        nullity = kernels.kernel_basis(layer).nullity
    except kernels.TrivialKernelError:
        nullity = 0
    w = kernels.weight_matrix(layer)
    s = torch.linalg.svdvals(w)
    _, reason = kernels.first_layer_kernel_or_reason(model, image_shape)
    spectrum = conv_operator.polyphase_spectrum(layer, image_shape)
    _, vectors = spectrum.near_null_vectors(1)
    std = model.std if isinstance(model, PixelSpace) and isinstance(model.std, torch.Tensor) else None
    noise = torch.randn(tuple(image_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    direction = vectors[0] if std is None else to_pixel_space(vectors[0], std.view(-1).double().tolist())
    return StemReport(
        nullity=nullity,
        matrix_shape=(w.shape[0], w.shape[1]),
        window_ratio=float(s.min() / s.max()),
        exact_reason=reason,
        operator_ratio=spectrum.sigma_min() / spectrum.sigma_max,
        operator_nullity=spectrum.per_frequency_nullity * spectrum.grid[0] * spectrum.grid[1],
        direction=direction / direction.norm(),
        direction_gain=conv_operator.operator_gain(layer, vectors[0]) / spectrum.sigma_max,
        random_gain=conv_operator.operator_gain(layer, noise) / spectrum.sigma_max,
    )


@dataclass
class EpsSweep:
    """PGD against a grid of limits on one set of photos (pixel units, l_inf).

    ``eps``: the grid, increasing; ``first``: per photo, the index into ``eps`` of the smallest limit at which
    PGD fooled it (-1: none); ``adversarial``: (N, C, H, W) the adversarial example found at that limit (the clean
    photo where none was); ``labels``: (N,) the model's clean prediction, which PGD moves away from. An example
    found within a smaller limit lies within every larger one, so a photo fooled at eps_k counts as fooled for
    every eps >= eps_k.
    """

    eps: tuple[float, ...]
    first: list[int]
    adversarial: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor
    seconds: float = 0.0

    def rate(self, eps: float) -> stats.Rate:
        """Photos for which PGD found an adversarial example within ``eps`` (one of the grid's values)."""
        k = self.eps.index(eps)
        return stats.Rate.of(0 <= f <= k for f in self.first)

    @property
    def fooled(self) -> torch.Tensor:
        """(N,) bool: photos fooled at some eps of the grid."""
        return torch.tensor([f >= 0 for f in self.first], dtype=torch.bool)

    def eps_of(self) -> torch.Tensor:
        """(N,) the limit each photo was fooled at (0 where none)."""
        return torch.tensor([self.eps[f] if f >= 0 else 0.0 for f in self.first], dtype=torch.float64)

    def rows(self) -> list[dict[str, Any]]:
        """One table row per eps: the limit in 1/255 units, the rate and its interval."""
        return [
            {"eps (x 1/255)": e * 255, "fooled": self.rate(e).text(), "share": self.rate(e).value} for e in self.eps
        ]


def pgd_eps_sweep(model: nn.Module, images: torch.Tensor, eps_grid: Sequence[float], *, steps: int) -> EpsSweep:
    """PGD (no random start, step 2 eps / steps: it reaches the limit) at each eps of the increasing
    ``eps_grid`` on the photos not fooled yet, moving each away from the model's own prediction.

    model: pixel-space classifier; images: (N, C, H, W) in [0, 1]. Returns an ``EpsSweep``.
    """
    grid = tuple(float(e) for e in eps_grid)
    if not grid or list(grid) != sorted(grid) or steps < 1:
        raise PixelInputError(f"eps_grid must be increasing and non-empty, steps >= 1; got {grid}, {steps}")
    start = time.perf_counter()
    device = next(model.parameters()).device
    images = images.to(device)
    labels = batched(model, images).argmax(1).to(device)
    adversarial, first = images.clone(), [-1] * len(images)
    for k, eps in enumerate(grid):
        todo = [i for i, f in enumerate(first) if f < 0]
        if not todo:
            break
        adv = pgd(model, images[todo], labels[todo], eps=eps, alpha=2 * eps / steps, steps=steps, random_start=False)
        hit = batched(model, adv).argmax(1).to(device) != labels[todo]
        for j, i in enumerate(todo):
            if hit[j]:
                first[i], adversarial[i] = k, adv[j]
    return EpsSweep(grid, first, adversarial, images, labels.cpu(), time.perf_counter() - start)


@dataclass
class NearNullTwins:
    """Twins x' + d of adversarial examples x' along the first layer's most invisible direction, against a
    random perturbation of the same l2 norm (the control), all clipped to [0, 1] (clipping included in what is
    measured). Per fooled photo (N,): ``stem_rel`` / ``control_stem_rel`` (relative change of the first layer's
    output), ``logit_rel`` / ``control_logit_rel`` (relative change of the logits), ``kept`` /
    ``control_kept`` (the adversarial prediction survives), ``linf_to_clean`` (pixels)."""

    stem_rel: torch.Tensor
    control_stem_rel: torch.Tensor
    logit_rel: torch.Tensor
    control_logit_rel: torch.Tensor
    kept: list[bool]
    control_kept: list[bool]
    linf_to_clean: torch.Tensor

    def ratio(self) -> stats.Spread:
        """Per photo, the twin's relative logit change over the control's."""
        return stats.Spread.of((self.logit_rel / self.control_logit_rel.clamp_min(1e-300)).tolist())

    def summary(self) -> dict[str, Any]:
        return {
            "photos": len(self.kept),
            "twin keeps x' prediction": stats.Rate.of(self.kept).text(),
            "control keeps it": stats.Rate.of(self.control_kept).text(),
            "stem change twin (median)": float(self.stem_rel.median()),
            "stem change control (median)": float(self.control_stem_rel.median()),
            "logit change twin (median)": float(self.logit_rel.median()),
            "logit change control (median)": float(self.control_logit_rel.median()),
            "l_inf to clean (worst)": float(self.linf_to_clean.max()),
        }


@torch.no_grad()
def near_null_twins(
    model: nn.Module,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    size: torch.Tensor,
    direction: torch.Tensor,
    seed: int = 0,
    batch: int = 8,
) -> NearNullTwins:
    """x_hat = clip(x' + s_i d / ||d||_inf) with ``direction`` d (C, H, W) and ``size`` s (N,) pixels per photo,
    and a control clip(x' + r) with r Gaussian scaled to ||x_hat - x'||_2; see ``NearNullTwins``.

    model: pixel-space classifier whose first layer is a Conv2d; clean, adversarial: (N, C, H, W) in [0, 1].
    """
    from helpers.data.normalization import PixelSpace
    from helpers.linalg.kernels import first_layer

    check_pixels(clean, "clean")
    check_pixels(adversarial, "adversarial")
    inner = model.model if isinstance(model, PixelSpace) else model
    _, layer = first_layer(inner)
    device = adversarial.device
    d = (direction / direction.abs().max()).to(adversarial.dtype).to(device)
    twins = (adversarial + size.to(adversarial.dtype).to(device).view(-1, 1, 1, 1) * d).clamp(0, 1)
    noise = torch.randn(adversarial.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    norm = (twins - adversarial).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    control = (adversarial + norm.view(-1, 1, 1, 1) * noise).clamp(0, 1)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("stem", "logit", "kept", "c_stem", "c_logit", "c_kept")}
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        for x, t, c in zip(adversarial.split(batch), twins.split(batch), control.split(batch)):
            captured.clear()
            y, y_t, y_c = model(torch.cat([x, t, c])).chunk(3)
            f, f_t, f_c = captured[0].chunk(3)
            for prefix, fo, yo in (("", f_t, y_t), ("c_", f_c, y_c)):
                out[prefix + "stem"].append(_relative(fo, f))
                out[prefix + "logit"].append(_relative(yo, y))
                out[prefix + "kept"].append(yo.argmax(1) == y.argmax(1))
    finally:
        handle.remove()
    cat = {k: torch.cat(v).cpu() for k, v in out.items()}
    return NearNullTwins(
        stem_rel=cat["stem"],
        control_stem_rel=cat["c_stem"],
        logit_rel=cat["logit"],
        control_logit_rel=cat["c_logit"],
        kept=cat["kept"].tolist(),
        control_kept=cat["c_kept"].tolist(),
        linf_to_clean=(twins - clean).abs().amax((1, 2, 3)).double().cpu(),
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per item (N,): ||a - b|| / ||b|| in float64 over all but the first dimension."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)


def substitute_claims(
    stem: StemReport, sweep: EpsSweep, twins: NearNullTwins, paper_claim: str, model: str
) -> list[dict[str, Any]]:
    """The Fig. 3 chapter's trained-substitute claims as keyword arguments of ``Chapter.claim`` (criteria fixed
    here, before any value is read): PGD at the paper's 8/255 fools the substitute (beyond); twins along the
    circular operator's least visible direction (a near-null direction spread over the image) keep the
    adversarial prediction and move the logits at most ``NEAR_NULL_RATIO`` of a same-size random perturbation
    (beyond). ``model``: the substitute's display name."""
    label = f"trained substitute: {model}"
    paper_eps = EPS_8_255 if EPS_8_255 in sweep.eps else sweep.eps[-1]
    ratio = twins.ratio()
    kept = stats.Rate.of(twins.kept)
    return [
        dict(
            id="fig3.pgd_fools.trained_substitute",
            description=f"PGD within the paper's eps fools a trained ImageNet model on the offline photos ({label})",
            criterion=verdict.rate_at_least(
                SUBSTITUTE_FOOLED, f"photos fooled within {paper_eps * 255:.0f}/255", kind="beyond"
            ).trained(),
            paper="—",
            ours=sweep.rate(paper_eps).text(),
            measured=sweep.rate(paper_eps),
            reason="; ".join(f"{e * 255:g}/255: {sweep.rate(e).text()}" for e in sweep.eps),
        ),
        dict(
            id="fig3.near_null_twins.trained_substitute",
            description="twins along the first layer's least visible periodic direction keep the adversarial "
            f"prediction and move the logits at most {NEAR_NULL_RATIO:g} x a same-size random perturbation ({label})",
            criterion=verdict.holds_when(
                f"every twin keeps the prediction and every photo's logit-change ratio ≤ {NEAR_NULL_RATIO:g}",
                lambda m: m[0].k == m[0].n > 0 and m[1].worst <= NEAR_NULL_RATIO,
                kind="beyond",
            ).trained(),
            paper="—",
            ours=f"kept {kept.text()}; logit change / control's: {ratio.text('.2g')}",
            measured=(kept, ratio),
            reason=f"direction: smallest whole-image gain {stem.direction_gain:.3g} sigma_max (zero padding) against "
            f"{stem.random_gain:.3g} for noise; twins sized by the eps each photo was fooled at, within "
            f"{float(twins.linf_to_clean.max()) * 255:.2g}/255 of the clean photo, clipped to [0, 1]",
        ),
    ]


def substitute_checks(stem: StemReport, sweep: EpsSweep, twins: NearNullTwins) -> list[Requirement]:
    """Internal checks of the substitute study: every adversarial example within the limit it was found at and
    in [0, 1]; the most invisible direction is less visible to the first layer than noise (gain) and, on every
    photo, its twin changes the first layer's output less than the same-size control does."""
    eps = sweep.eps_of().to(sweep.clean.device).view(-1, 1, 1, 1)
    linf = float(((sweep.adversarial - sweep.clean).abs() - eps).amax())
    outside = image_validity.outside_unit_range(sweep.adversarial)
    smaller = bool((twins.stem_rel < twins.control_stem_rel).all())
    return [
        Requirement(
            linf <= PIXEL_SLACK and outside == 0,
            "PGD sweep: every adversarial example within the eps it was found at, in [0, 1]",
            f"excess {linf:.2g}, outside {outside + 0.0:.2g}",
        ),
        Requirement(
            stem.direction_gain < stem.random_gain and smaller,
            "the near-null direction is less visible to the first layer than noise, on every photo",
            f"gain {stem.direction_gain:.3g} vs {stem.random_gain:.3g}; stem change twin "
            f"{float(twins.stem_rel.max()):.2g} (worst) vs control {float(twins.control_stem_rel.min()):.2g} (least)",
        ),
    ]
