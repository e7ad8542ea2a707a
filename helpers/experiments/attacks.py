"""Adversarial attacks and colliding adversarial examples (Ozbulak et al., Sec. 4.2 and 5, Fig. 3).

Every budget is an l_inf distance in pixel units: the models are wrapped with ``normalization.pixel_space``.

* ``pgd``: PGD (Madry et al.) through torchattacks; ``first_fooled`` picks a test image it fools.
* ``asma``: the Adaptive Segmentation Mask Attack (Ozbulak, Van Messem, De Neve, MICCAI 2019), which no library
  ships; written here after the paper and its authors' reference implementation.
* ``pgd_twins`` / ``pgd_budget_study``: PGD, then many images x_hat = x' + P with P in the kernel of the first
  layer (``collisions.colliding_adversarials``), each within the budget around the clean image and inside [0, 1],
  so that the model's output for every x_hat equals its output for x' (up to float round-off).
* ``benchmark``: those twins against running PGD as many times.
* ``Fig3Results``, ``fig3_requirements``, ``fig3_paper_vs_ours``: the Fig. 3 chapter's decision rules and table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from helpers.book import page
from helpers.data.normalization import PixelInputError, check_pixels
from helpers.experiments.collisions import CollidingSet, Requirement, colliding_adversarials, colliding_report
from helpers.linalg.kernels import PixelKernel, pixel_kernel
from helpers.models.segmentation import mask_iou
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
    pgd_eps: float,
    steps: int,
    alpha: float | None = None,
    n: int = 100,
    kernel: PixelKernel | None = None,
    seed: int = 0,
) -> PGDTwins:
    """PGD with budget ``pgd_eps`` (step ``alpha``, default pgd_eps / 4), then ``n`` colliding twins within the
    larger budget ``eps`` of ``clean`` (all l_inf, pixel units).

    model: pixel-space classifier; clean: (1, C, H, W) in [0, 1]; label: (1,) the class to move away from
    (None: the model's own prediction). Raises ``PixelInputError`` for non-pixel images.
    """
    if label is None:
        with torch.no_grad():
            label = model(clean).argmax(1)
    adversarial = pgd(model, clean, label, eps=pgd_eps, alpha=alpha if alpha is not None else pgd_eps / 4, steps=steps)
    twins, report = colliding_report(model, clean, adversarial, eps=eps, n=n, kernel=kernel, seed=seed)
    report["saturated_pixels"] = saturation(clean, adversarial, pgd_eps)
    return PGDTwins(clean, label, twins, report)


def pgd_budget_study(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    pgd_budgets: Sequence[float],
    steps: int,
    n: int = 100,
    kernel: PixelKernel | None = None,
    seed: int = 0,
) -> tuple[dict[float, dict[str, Any]], PGDTwins]:
    """Colliding twins after PGD at each of ``pgd_budgets`` (<= eps), on one test image.

    The image is the first of ``images`` (N, C, H, W) / ``labels`` (N,) that the model gets right and PGD at the
    smallest budget fools (``first_fooled``). Returns ({pgd_eps: report with "pgd_eps" added}, in the order
    given; the ``PGDTwins`` of the smallest budget). ``kernel``: ``pixel_kernel(model, (C, H, W))`` if None.
    """
    if not pgd_budgets or max(pgd_budgets) > eps:
        raise PixelInputError(f"pgd_budgets must be non-empty and <= eps = {eps}, got {list(pgd_budgets)}")
    smallest = min(pgd_budgets)
    index, _ = first_fooled(model, images, labels, eps=smallest, steps=steps)
    device = next(model.parameters()).device
    clean, label = images[index : index + 1].to(device), labels[index : index + 1].to(device)
    kernel = kernel or pixel_kernel(model, clean.shape[1:])
    reports, runs = {}, {}
    for pgd_eps in pgd_budgets:
        runs[pgd_eps] = pgd_twins(
            model, clean, label, eps=eps, pgd_eps=pgd_eps, steps=steps, n=n, kernel=kernel, seed=seed
        )
        reports[pgd_eps] = {**runs[pgd_eps].report, "pgd_eps": pgd_eps}
    return reports, runs[smallest]


#: The columns of the PGD-budget table (``twin_table_rows``).
TWIN_COLUMNS = (
    "pgd_eps",
    "saturated_pixels",
    "distinct",
    "keep_adversarial_prediction",
    "max_linf_to_clean",
    "in_range",
    "perturbation_linf_median",
    "pairwise_linf_min",
    "pairwise_l2_median",
    "max_rel_output_change",
    "seconds",
)


def twin_table_rows(
    reports: dict[tuple[str, float], dict[str, Any]], columns: Sequence[str] = TWIN_COLUMNS
) -> dict[str, dict[str, Any]]:
    """{"<model>, PGD eps <e>": {column: value}} from {(model, pgd_eps): report}, for ``table``."""
    return {f"{k}, PGD eps {e:g}": {c: r[c] for c in columns} for (k, e), r in reports.items()}


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


# --- Fig. 3: paper vs ours, checks --------------------------------------------------------------------------


@dataclass
class Fig3Results:
    """The measurements behind the Fig. 3 chapter's claims.

    ``mnist``: {(model, pgd_eps): report}; ``classification``: the ImageNet model's twin report (``model``
    names it); ``asma_iou``: (start, end) IoU of the MNIST segmenter's ASMA run; ``segmenter``: its twin report;
    ``mobilenet``: the tiled twin's residuals (``tiled_twin``); ``benchmark``: {name: ``benchmark`` result}.
    Budgets in pixel units.
    """

    mnist: dict[tuple[str, float], dict[str, Any]]
    mnist_eps: float
    mnist_pgd_eps: float
    model: str
    classification: dict[str, Any]
    imagenet_eps: float
    asma_iou: tuple[float, float]
    segmenter: dict[str, Any]
    mobilenet: dict[str, Any]
    benchmark: dict[str, dict[str, Any]]

    def extra(self) -> dict[str, Any]:
        """The results JSON's ``extra`` (model keys as "<model>@<pgd_eps>")."""
        return {
            "mnist": {f"{k}@{e}": r for (k, e), r in self.mnist.items()},
            "classification": {self.model: self.classification},
            "mnist_segmenter": self.segmenter,
            "asma_mnist_iou": list(self.asma_iou),
            "mobilenet": self.mobilenet,
            "benchmark": self.benchmark,
        }


def _kept(report: dict[str, Any], of: str = "n") -> str:
    return f"{report['keep_adversarial_prediction']}/{report[of]}"


def fig3_paper_vs_ours(
    r: Fig3Results, classification_model: str, segmentation_model: str, bench: str = "MNIST patch"
) -> list[dict[str, str]]:
    """Rows (claim, paper, ours) comparing Fig. 3's claims with ``r``; the paper's model names are given."""
    patch, mlp = r.mnist[("patch", r.mnist_pgd_eps)], r.mnist[("mlp", r.mnist_pgd_eps)]
    timing = r.benchmark[bench]
    rows = [
        (
            "classification twins keep the PGD prediction",
            classification_model,
            f"{r.model}: {_kept(r.classification)} within {r.imagenet_eps * 255:.0f}/255",
        ),
        ("MNIST patch / MLP twins keep the prediction", "—", f"{_kept(patch)}, {_kept(mlp)}"),
        (
            "segmentation twins keep the ASMA mask",
            segmentation_model,
            f"MNIST segmenter {_kept(r.segmenter)}; MobileNet-V3 first layer "
            f"moves by {r.mobilenet['first_layer_rel']:.2g} (relative): not exact",
        ),
        (
            "100 twins vs 100 PGD runs",
            "—",
            f"{timing['seconds_colliding']:.2f} s vs {timing['seconds_pgd_loop']:.2f} s ({bench})",
        ),
    ]
    return [dict(zip(["claim", "paper", "ours"], row)) for row in rows]


def fig3_requirements(
    r: Fig3Results, *, min_distinct: int = 100, max_rel_change: float = 1e-4
) -> dict[str, list[Requirement]]:
    """Fig. 3's decision rules on ``r``, grouped by the claim they back.

    "classification": the classification twins within eps, in range, distinct, all keeping the prediction, and
    logits equal to ``max_rel_change``. "mnist": every MNIST twin within eps, in [0, 1] and with the adversarial
    prediction; at the smaller PGD budget at least ``min_distinct`` distinct twins from an adversarial example that
    differs from the clean prediction, logits equal to ``max_rel_change``; twins cheaper than the PGD loop.
    "segmenter": ASMA raises the IoU, every segmenter twin keeps the mask within eps. "mobilenet": the tiled
    twin within the ImageNet budget.
    """
    c, eps255 = r.classification, f"{r.imagenet_eps * 255:.0f}/255"
    out: dict[str, list[Requirement]] = {
        "classification": [
            Requirement(
                c["within_eps"] and c["in_range"] and c["keep_adversarial_prediction"] == c["n"] == c["distinct"],
                f"{r.model}: every twin within {eps255}, in range, distinct, same prediction",
                f"{_kept(c)}, l_inf {c['max_linf_to_clean']:.5f}",
            ),
            Requirement(
                c["max_rel_output_change"] < max_rel_change,
                f"{r.model}: logits equal to round-off",
                f"{c['max_rel_output_change']:.2e}",
            ),
        ],
        "mnist": [],
        "segmenter": [
            Requirement(
                r.asma_iou[1] > r.asma_iou[0],
                "ASMA raises the IoU with the target (MNIST segmenter)",
                f"{r.asma_iou[0]:.3f} -> {r.asma_iou[1]:.3f}",
            ),
            Requirement(
                r.segmenter["keep_adversarial_prediction"] == r.segmenter["n"] and r.segmenter["within_eps"],
                "MNIST segmenter: every twin keeps the ASMA mask exactly, within eps",
                str(r.segmenter["keep_adversarial_prediction"]),
            ),
        ],
        "mobilenet": [
            Requirement(
                r.mobilenet["linf_to_clean"] <= r.imagenet_eps + 1e-6,
                "MobileNet-V3 tiled twin within budget",
                f"{r.mobilenet['linf_to_clean']:.5f}",
            )
        ],
    }
    mnist = out["mnist"]
    for (kind, pgd_eps), rep in r.mnist.items():
        mnist += [
            Requirement(
                rep["within_eps"] and rep["in_range"],
                f"MNIST {kind} (PGD {pgd_eps}): twins within eps and in [0, 1]",
                f"{rep['max_linf_to_clean']:.4f} <= {r.mnist_eps}",
            ),
            Requirement(
                rep["keep_adversarial_prediction"] == rep["n"],
                f"MNIST {kind} (PGD {pgd_eps}): every twin keeps the adversarial prediction",
                _kept(rep),
            ),
        ]
    for kind in dict.fromkeys(k for k, _ in r.mnist):
        rep = r.mnist[(kind, r.mnist_pgd_eps)]
        mnist += [
            Requirement(
                rep["distinct"] >= min_distinct and rep["adversarial_differs_from_clean"],
                f"MNIST {kind}: >= {min_distinct} distinct colliding adversarial examples",
                str(rep["distinct"]),
            ),
            Requirement(
                rep["max_rel_output_change"] < max_rel_change,
                f"MNIST {kind}: logits equal to round-off",
                f"{rep['max_rel_output_change']:.2e}",
            ),
        ]
    for name, b in r.benchmark.items():
        ok = b["seconds_colliding"] < b["seconds_pgd_loop"]
        mnist.append(
            Requirement(ok, f"{b['n']} twins are cheaper than {b['n']} PGD runs ({name})", f"{b['speedup']:.1f}x")
        )
    return out
