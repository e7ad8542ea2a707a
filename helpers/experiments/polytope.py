"""Li et al.'s polytopes of approximately colliding examples at a ReLU layer (method, sampling, measurements).

Cut a network at one ReLU layer (``ReluSplit``): ``pre(u)`` maps inputs u (B, *input_shape) to the layer's
pre-activations ỹ(u) (B, N); ``head`` maps post-activations y = relu(ỹ) (B, N) to logits. For a target x_t
with pre-activations ỹ^t, Proposition 1 of Li et al. says that u collides with x_t at this layer iff

    ỹ_j(u) = ỹ^t_j   for every j with ỹ^t_j > 0      (equalities, the "active" units)
    ỹ_j(u) <= 0      for every j with ỹ^t_j <= 0     (inequalities, the "inactive" units).

A vertex of (a relaxation of) this polytope is found by pushing one inactive unit i as negative as possible:

    min_u  alpha * L_plus(u) + L_i(u)
    L_plus(u) = || ỹ(u) * 1[ỹ^t > 0] - y^t ||_2^2
    L_i(u)    = ỹ_i(u) + sum_{j != i, ỹ^t_j <= 0} max(ỹ_j(u), 0)

(the printed L_i is garbled in our copy of the paper; we read the second term as the hinge that "keeps the other
hidden units close to zero", i.e. non-positive). Adam on u, clamped to the pixel box after each step; all
vertices of all polytopes are optimised in one batch (the problems are independent, and Adam is per-coordinate).

The patch-composition variant (Li et al., Sec. 4) searches over softmax coefficients that mix retrieved patches
instead of raw pixels: ``find_polytopes`` with ``decode``/``params0`` from ``helpers.experiments.patch_composition``.

The last sections hold the studies of chapters 08-09 built on these pieces: two polytopes per target
(``search_two_starts``, ``two_start_rows``, ``summarise``, ``worst_case``), the optimiser sweep's rows and figure,
the paper-vs-ours tables (``paper_vs_ours``, ``side_by_side``) and the claims' criteria (``mnist_claims``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

from helpers.models.forward import device_of
from helpers.progress import progress_bar


@dataclass
class ReluSplit:
    """A classifier cut at one ReLU layer.

    ``pre``: inputs (B, *input_shape) -> pre-activations (B, N); ``head``: post-activations (B, N) -> logits
    (B, C); ``module`` owns every parameter involved (frozen during searches); ``name`` says where the cut is.
    """

    pre: Callable[[Tensor], Tensor]
    head: Callable[[Tensor], Tensor]
    input_shape: tuple[int, ...]
    n_units: int
    module: nn.Module
    name: str

    def logits(self, u: Tensor) -> Tensor:
        """(B, *input_shape) -> (B, C), through the cut (identical to the full model)."""
        return self.head(torch.relu(self.pre(u)))

    def check_inputs(self, u: Tensor, what: str = "inputs") -> None:
        if u.dim() != len(self.input_shape) + 1 or tuple(u.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{what} must have shape (B, {', '.join(map(str, self.input_shape))}) for "
                f"{self.name}, got {tuple(u.shape)}"
            )


def relu_indices(model: nn.Sequential) -> list[int]:
    """Positions of the ``nn.ReLU`` modules in a sequential model."""
    return [i for i, m in enumerate(model) if isinstance(m, nn.ReLU)]


def split_sequential(model: nn.Sequential, relu_index: int, input_shape: Sequence[int]) -> ReluSplit:
    """Cut ``model`` at its ReLU module number ``relu_index`` (a position in the Sequential, see ``relu_indices``).

    ``pre`` runs ``model[:relu_index]`` and flattens to (B, N); ``head`` reshapes and runs ``model[relu_index+1:]``.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"split_sequential needs an nn.Sequential, got {type(model).__name__}")
    valid = relu_indices(model)
    if relu_index not in valid:
        raise ValueError(f"module {relu_index} of the model is not an nn.ReLU; valid ReLU positions: {valid}")
    if model.training:
        raise ValueError("put the model in eval mode first (model.eval()): the cut must be deterministic")
    prefix, rest = model[:relu_index], model[relu_index + 1 :]
    input_shape = tuple(int(s) for s in input_shape)
    with torch.no_grad():
        probe = prefix(torch.zeros(1, *input_shape, device=device_of(model)))
    feature_shape = tuple(probe.shape[1:])

    def pre(u: Tensor) -> Tensor:
        return prefix(u).flatten(1)

    def head(y: Tensor) -> Tensor:
        return rest(y.view(len(y), *feature_shape))

    name = f"{type(model[relu_index - 1]).__name__} before ReLU #{relu_index} (N={probe[0].numel()})"
    return ReluSplit(pre, head, input_shape, probe[0].numel(), model, name)


def split_vgg_fc6(model: nn.Module, normalize: Callable[[Tensor], Tensor], size: int = 224) -> ReluSplit:
    """Cut a torchvision VGG at fc6 (``classifier[0]``, 4096 units); inputs are pixels in [0, 1], (B, 3, size, size).

    ``normalize`` maps pixels to the network's input (ImageNet normalisation). The head skips ``classifier[1]``
    (an in-place ReLU, already applied) and runs dropout (identity in eval mode), fc7, ReLU, dropout, fc8.
    """
    for attr in ("features", "avgpool", "classifier"):
        if not hasattr(model, attr):
            raise ValueError(
                f"split_vgg_fc6 needs a torchvision VGG (features/avgpool/classifier); "
                f"{type(model).__name__} has no {attr!r}"
            )
    if model.training:
        raise ValueError("put the model in eval mode first (model.eval()): dropout must be off")
    features, avgpool, classifier = model.features, model.avgpool, model.classifier
    assert isinstance(features, nn.Module) and isinstance(avgpool, nn.Module), "VGG features/avgpool are modules"
    assert isinstance(classifier, nn.Sequential), "a VGG classifier is an nn.Sequential"
    fc6 = classifier[0]
    assert isinstance(fc6, nn.Linear), "a VGG classifier starts with fc6, an nn.Linear"

    def pre(u: Tensor) -> Tensor:
        return fc6(torch.flatten(avgpool(features(normalize(u))), 1))

    def head(y: Tensor) -> Tensor:
        return classifier[2:](y)

    return ReluSplit(pre, head, (3, size, size), fc6.out_features, model, f"VGG fc6 (N={fc6.out_features})")


def split_efficientnet_head(model: nn.Module, normalize: Callable[[Tensor], Tensor], size: int = 224) -> ReluSplit:
    """Cut a timm EfficientNet(-Lite) at its last ReLU-type layer: the head's 1x1 conv + BatchNorm (``conv_head``,
    ``bn2``) before its activation, N = ``num_features`` x (size/32)^2 units (1280 x 7 x 7 at 224 px).

    Inputs are pixels in [0, 1], (B, 3, size, size); ``normalize`` maps them to the network's input. ``pre`` runs
    the stem, the blocks, ``conv_head`` and ``bn2``'s normalisation (not its activation), flattened to (B, N);
    ``head`` takes y = relu(ỹ), applies the rest of ``bn2``'s activation (ReLU6 = min(relu, 6)), the global pool
    and the classifier (timm's ``forward_head``; its dropout is off in eval mode). This is the layer
    Proposition 1 applies to: the pooled 1280-d features are averages of
    the activations, not a ReLU of an affine map. With ReLU6 the polytope of ``li_losses`` (active units equal,
    inactive ones <= 0) is a subset of the true collision set (equal pre-activations give equal ReLU6 outputs),
    so its points collide exactly like a ReLU layer's.
    """
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise ValueError(f"split_efficientnet_head needs a timm EfficientNet; {type(model).__name__} has no {missing}")
    if model.training:
        raise ValueError("put the model in eval mode first (model.eval()): BatchNorm must use its running statistics")
    bn2 = model.get_submodule("bn2")
    act = getattr(bn2, "act", None)
    if not isinstance(act, (nn.ReLU, nn.ReLU6)) or not isinstance(bn2, nn.BatchNorm2d):
        raise ValueError(
            f"the head's activation must be a ReLU or ReLU6 after a BatchNorm (EfficientNet-Lite), got "
            f"{type(bn2).__name__} with {type(act).__name__}"
        )
    stem, bn1, blocks, conv_head = (model.get_submodule(n) for n in ("conv_stem", "bn1", "blocks", "conv_head"))
    cap = 6.0 if isinstance(act, nn.ReLU6) else math.inf
    pool, classifier = model.get_submodule("global_pool"), model.get_submodule("classifier")

    def features(u: Tensor) -> Tensor:
        x = conv_head(blocks(bn1(stem(normalize(u)))))
        return nn.functional.batch_norm(x, bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, False, 0.0, bn2.eps)

    with torch.no_grad():
        feature_shape = tuple(features(torch.zeros(1, 3, size, size, device=device_of(model))).shape[1:])
    n_units = int(np.prod(feature_shape))

    def pre(u: Tensor) -> Tensor:
        return features(u).flatten(1)

    def head(y: Tensor) -> Tensor:
        return classifier(pool(y.clamp(max=cap).view(len(y), *feature_shape)))  # timm's head (dropout: eval)

    name = f"{type(model).__name__} head conv + BN before {type(act).__name__} (N={n_units})"
    return ReluSplit(pre, head, (3, size, size), n_units, model, name)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters without gradients inside the block (the search only needs d loss / d input: ~1/3 less work)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def pre_activations(split: ReluSplit, u: Tensor, batch: int = 2000) -> Tensor:
    """ỹ(u): (B, *input_shape) -> (B, N), in batches on the model's device, returned on u's device."""
    split.check_inputs(u)
    device = device_of(split.module)
    return torch.cat([split.pre(c.to(device)).to(u.device) for c in u.split(batch)])


def _check_pre(pre_u: Tensor, target_pre: Tensor) -> None:
    if pre_u.dim() != 2:
        raise ValueError(f"pre-activations must be (B, N), got shape {tuple(pre_u.shape)}")
    if target_pre.shape != pre_u.shape:
        raise ValueError(
            f"target pre-activations must match the pre-activations' shape {tuple(pre_u.shape)} "
            f"(one target row per row), got {tuple(target_pre.shape)}"
        )


def li_losses(pre_u: Tensor, target_pre: Tensor, units: Tensor) -> tuple[Tensor, Tensor]:
    """Li et al.'s L_plus and L_i, one value per row.

    pre_u, target_pre: (B, N) pre-activations of the candidates and of their targets; units: (B,) long, the
    inactive unit i pushed down in each row (must satisfy target_pre[b, units[b]] <= 0).
    Returns (L_plus (B,), L_i (B,)), in squared / plain pre-activation units.
    """
    _check_pre(pre_u, target_pre)
    _check_units(target_pre, units)
    return _li_losses(pre_u, target_pre, units)


def _check_units(target_pre: Tensor, units: Tensor) -> None:
    if units.shape != (len(target_pre),) or units.dtype != torch.long:
        raise ValueError(
            f"units must be a (B,) = ({len(target_pre)},) long tensor of unit indices, "
            f"got shape {tuple(units.shape)} dtype {units.dtype}"
        )
    if units.numel() and (units.min() < 0 or units.max() >= target_pre.shape[1]):
        raise ValueError(
            f"units must lie in [0, {target_pre.shape[1]}), got {units.min().item()}..{units.max().item()}"
        )
    if (target_pre.gather(1, units[:, None]) > 0).any():
        raise ValueError("each pushed unit must be inactive for its target (target pre-activation <= 0)")


def _li_losses(pre_u: Tensor, target_pre: Tensor, units: Tensor) -> tuple[Tensor, Tensor]:
    active = target_pre > 0
    l_plus = ((pre_u - target_pre) * active).pow(2).sum(1)  # = ||ỹ(u)*1[ỹt>0] - y^t||^2 since y^t = 0 off `active`
    pushed = pre_u.gather(1, units[:, None]).squeeze(1)
    others = (torch.relu(pre_u) * ~active).sum(1) - torch.relu(pushed)
    return l_plus, pushed + others


def prop1_residuals(pre_u: Tensor, target_pre: Tensor) -> dict[str, Tensor]:
    """How far candidates are from Proposition 1's constraints; each value (B,).

    eq_rel:      ||(ỹ(u) - ỹ^t) on active units|| / ||ỹ^t on active units||   (equalities; 0 = exact)
    eq_max_abs:  max |ỹ_j(u) - ỹ^t_j| over active units                       (pre-activation units)
    ineq_max:    max ỹ_j(u) over inactive units (<= 0: all inequalities hold)
    ineq_frac:   share of inactive units with ỹ_j(u) > 0 (violated inequalities)
    act_rel:     ||relu(ỹ(u)) - relu(ỹ^t)|| / ||relu(ỹ^t)||  (the post-activation mismatch at this layer)
    viol_rel:    ||(ỹ(u) - ỹ^t) on active units, relu(ỹ(u)) on inactive ones|| / ||relu(ỹ^t)|| (how far u is
                 from the polytope: 0 inside; bounds act_rel from above, and for an affine cut a convex combination
                 of vertices is never further than its worst vertex, see ``convexity_violations``)
    pattern:     share of units whose on/off state equals the target's
    """
    _check_pre(pre_u, target_pre)
    active = target_pre > 0
    diff = (pre_u - target_pre) * active
    inactive_vals = pre_u.masked_fill(active, -math.inf)
    n_inactive = (~active).sum(1).clamp_min(1)
    target_norm = torch.relu(target_pre).norm(dim=1).clamp_min(1e-12)
    return {
        "eq_rel": diff.norm(dim=1) / (target_pre * active).norm(dim=1).clamp_min(1e-12),
        "eq_max_abs": diff.abs().amax(1),
        "ineq_max": inactive_vals.amax(1),
        "ineq_frac": ((pre_u > 0) & ~active).sum(1) / n_inactive,
        "act_rel": (torch.relu(pre_u) - torch.relu(target_pre)).norm(dim=1) / target_norm,
        "viol_rel": (diff + torch.relu(pre_u) * ~active).norm(dim=1) / target_norm,
        "pattern": ((pre_u > 0) == active).float().mean(1),
    }


def choose_units(target_pre: Tensor, n: int, how: str = "first", generator: torch.Generator | None = None) -> Tensor:
    """(T, N) target pre-activations -> (T, n) long: the inactive units to push, one per vertex.

    how="first": the first n inactive units in index order (the paper's i = 0, 1, ..., 4); "random": n random ones.
    """
    if how not in ("first", "random"):
        raise ValueError(f"unknown how={how!r}; valid: first, random")
    inactive = target_pre <= 0
    fewest = int(inactive.sum(1).min())
    if n < 1 or n > fewest:
        raise ValueError(f"n_vertices must be between 1 and the fewest inactive units of a target ({fewest}), got {n}")
    if how == "first":
        key = torch.arange(target_pre.shape[1], device=target_pre.device).expand_as(target_pre).float()
    else:
        key = torch.rand(target_pre.shape, generator=generator).to(target_pre.device)
    return key.masked_fill(~inactive, math.inf).argsort(1)[:, :n]


@dataclass(frozen=True)
class SearchConfig:
    """Settings of the vertex search: alpha weighs L_plus; Adam with a cosine learning-rate decay to lr/100.

    lo, hi: the valid input range (pixels), applied by clamping after every step (pixel search only).
    """

    alpha: float = 100.0
    steps: int = 500
    lr: float = 0.01
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if not self.alpha > 0 or self.steps < 1 or not self.lr > 0 or not self.lo < self.hi:
            raise ValueError(f"invalid SearchConfig {self}: need alpha > 0, steps >= 1, lr > 0, lo < hi")


@dataclass
class Polytopes:
    """T polytopes with V vertices each, found by ``find_polytopes``.

    vertices (T, V, *input_shape) inputs; params (T, V, ...) what was optimised (= vertices for pixel search);
    units (T, V) the pushed inactive units; target_pre (T, N); starts (T, *input_shape) where each search began;
    loss_curve (steps,) the mean objective per step; seconds: wall time of the whole batched search.
    """

    vertices: Tensor
    params: Tensor
    units: Tensor
    target_pre: Tensor
    starts: Tensor
    loss_curve: Tensor
    seconds: float
    config: SearchConfig

    @property
    def n_polytopes(self) -> int:
        return self.vertices.shape[0]

    @property
    def n_vertices(self) -> int:
        return self.vertices.shape[1]

    def seconds_per_vertex(self) -> float:
        return self.seconds / (self.n_polytopes * self.n_vertices)

    def seconds_per_polytope(self) -> float:
        return self.seconds / self.n_polytopes

    def distances_to(self, points: Tensor) -> Tensor:
        """Mean l2 distance of each polytope's vertices from one point per polytope, points (T, *input_shape): (T,)."""
        if points.shape != (self.n_polytopes, *self.vertices.shape[2:]):
            raise ValueError(
                f"points must be (T, *input_shape) = {(self.n_polytopes, *self.vertices.shape[2:])}, "
                f"got {tuple(points.shape)}"
            )
        return (self.vertices - points[:, None].to(self.vertices)).flatten(2).norm(dim=2).mean(1)


def optimise(
    split: ReluSplit,
    params0: Tensor,
    target_pre: Tensor,
    units: Tensor,
    config: SearchConfig,
    decode: Callable[[Tensor], Tensor] | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Minimise alpha*L_plus + L_i for every row at once (Adam, cosine decay).

    params0 (B, ...): pixels (B, *input_shape) when ``decode`` is None (then clamped to [lo, hi] every step),
    else parameters that ``decode`` maps to inputs (B, *input_shape). target_pre (B, N), units (B,).
    Returns (params (B, ...), loss_curve (steps,) mean objective per step).
    """
    if len(params0) != len(target_pre) or len(params0) != len(units):
        raise ValueError(
            f"params0, target_pre and units need the same batch size, got "
            f"{len(params0)}, {len(target_pre)}, {len(units)}"
        )
    device = device_of(split.module)
    params = params0.detach().clone().to(device).requires_grad_(True)
    target_pre, units = target_pre.to(device), units.to(device)
    _check_units(target_pre, units)  # once, not every step (each check would synchronise a GPU)
    optimiser = torch.optim.Adam([params], lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.steps, eta_min=config.lr / 100)
    curve = torch.empty(config.steps, device=device)
    with frozen(split.module):
        for step in progress_bar(range(config.steps), desc="vertex search", disable=not progress, leave=False):
            optimiser.zero_grad(set_to_none=True)
            u = params if decode is None else decode(params)
            l_plus, l_i = _li_losses(split.pre(u), target_pre, units)
            loss = config.alpha * l_plus + l_i
            loss.sum().backward()  # independent problems: the sum's gradient is each row's own gradient
            optimiser.step()
            schedule.step()
            if decode is None:
                with torch.no_grad():
                    params.clamp_(config.lo, config.hi)
            curve[step] = loss.detach().mean()
    return params.detach(), curve.cpu()


def find_polytopes(
    split: ReluSplit,
    targets: Tensor,
    starts: Tensor | None,
    n_vertices: int = 5,
    config: SearchConfig = SearchConfig(),
    units: Tensor | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    params0: Tensor | None = None,
    progress: bool = True,
) -> Polytopes:
    """One polytope per target, ``n_vertices`` vertices each, all optimised in one batch.

    targets (T, *input_shape): the examples to collide with; starts (T, *input_shape): the initial points
    (the targets themselves, or other images). units (T, V) overrides the pushed units (default: the first V
    inactive ones). For the patch variant give ``decode`` and ``params0`` (T, ...) instead of pixel starts.
    """
    split.check_inputs(targets, "targets")
    if params0 is None:
        if starts is None:
            raise ValueError("give the starting inputs (starts), or params0 with a decode function")
        split.check_inputs(starts, "starts")
        if len(starts) != len(targets):
            raise ValueError(f"one start per target: got {len(starts)} starts for {len(targets)} targets")
        params0 = starts
    elif decode is None:
        raise ValueError("params0 needs a decode function (parameters -> inputs)")
    target_pre = pre_activations(split, targets)
    if units is None:
        units = choose_units(target_pre, n_vertices)
    if units.shape != (len(targets), n_vertices):
        raise ValueError(f"units must be (T, V) = ({len(targets)}, {n_vertices}), got {tuple(units.shape)}")
    T, V = units.shape
    start_time = time.perf_counter()
    params, curve = optimise(
        split,
        params0.repeat_interleave(V, 0),
        target_pre.repeat_interleave(V, 0),
        units.reshape(-1),
        config,
        decode,
        progress,
    )
    with torch.no_grad():
        vertices = params if decode is None else torch.cat([decode(p) for p in params.split(8)])
    if vertices.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start_time
    with torch.no_grad():
        shown_starts = starts if decode is None else decode(params0.to(params.device))
    assert shown_starts is not None, "without decode, params0 are the starts (checked above)"
    return Polytopes(
        vertices.view(T, V, *split.input_shape).cpu(),
        params.view(T, V, *params.shape[1:]).cpu(),
        units.cpu(),
        target_pre.cpu(),
        shown_starts.cpu(),
        curve,
        seconds,
        config,
    )


def convex_samples(vertices: Tensor, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """n random convex combinations of V vertices (V, *shape): weights ~ Dirichlet(1, ..., 1), i.e. uniform on the
    simplex (normalised Exp(1) draws). Returns (samples (n, *shape), weights (n, V))."""
    if vertices.dim() < 2 or len(vertices) < 1:
        raise ValueError(f"vertices must be (V, *shape) with V >= 1, got shape {tuple(vertices.shape)}")
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    exp = -torch.rand(n, len(vertices), generator=generator, dtype=torch.float64).log()
    weights = (exp / exp.sum(1, keepdim=True)).to(vertices.dtype).to(vertices.device)
    return (weights @ vertices.flatten(1)).view(n, *vertices.shape[1:]), weights


def mean_pairwise_distance(x: Tensor, scale: float = 1.0) -> float:
    """Mean l2 distance over all pairs of the rows of x (M, ...) (M >= 2), times ``scale`` (e.g. 255 for 8-bit)."""
    if len(x) < 2:
        raise ValueError(f"need at least two items for a pairwise distance, got shape {tuple(x.shape)}")
    return float(torch.pdist(x.flatten(1).double()).mean()) * scale


@torch.no_grad()
def probabilities_from_pre(split: ReluSplit, pre: Tensor, batch: int = 2000) -> Tensor:
    """Softmax class probabilities (B, C) from the cut layer's pre-activations (B, N) (no second pass through the
    layers below the cut)."""
    device = device_of(split.module)
    return torch.cat([torch.softmax(split.head(torch.relu(c.to(device))), 1).cpu() for c in pre.split(batch)])


def _summary(values: Tensor) -> dict[str, float]:
    return {
        "mean": float(values.float().mean()),
        "max": float(values.float().max()),
        "min": float(values.float().min()),
    }


def measure_polytope(
    split: ReluSplit,
    target: Tensor,
    vertices: Tensor,
    n_samples: int = 2000,
    generator: torch.Generator | None = None,
    batch: int = 2000,
    scale: float = 1.0,
    keep_samples: int = 0,
) -> dict[str, Any]:
    """Li et al.'s Table 2/4/6 numbers for one polytope, plus Proposition 1's residuals and an 8-bit PNG round trip.

    target (*input_shape), vertices (V, *input_shape). Returns a dict: target_class (the target's predicted class);
    same_class_k / n_samples (samples whose predicted class is the target's) and same_class_pct (%); target_prob
    (the target's probability of its class), sample_target_prob / sample_target_prob_min (mean / lowest probability
    of the *target's* class over the samples: a sample classified as another class counts with its low
    probability), sample_prob (mean top-class probability of the samples, whatever class); vertex_distance (mean
    pairwise l2 between vertices, times ``scale``); vertices/samples residual summaries (``prop1_residuals``);
    png_same_class_k / png_n / png_act_rel_max: the vertices and kept samples stored as 8-bit PNGs and read back
    (``image_validity.png_round_trip``): how many keep the target's class and their worst activation mismatch;
    outside_unit_range (how far any vertex or sample strays from [0, 1]); and ``samples_kept`` (the first
    ``keep_samples`` samples) for figures.
    """
    from helpers.data import image_validity

    split.check_inputs(target[None], "target")
    split.check_inputs(vertices, "vertices")
    samples, _ = convex_samples(vertices, n_samples, generator)
    target_pre = pre_activations(split, target[None], batch)
    target_probs = probabilities_from_pre(split, target_pre)[0]
    target_class = int(target_probs.argmax())
    pre_s = pre_activations(split, samples, batch)
    sample_probs = probabilities_from_pre(split, pre_s, batch)
    pre_v = pre_activations(split, vertices, batch)
    res_v = prop1_residuals(pre_v, target_pre.expand_as(pre_v))
    res_s = prop1_residuals(pre_s, target_pre.expand_as(pre_s))
    stored = torch.cat([vertices, samples[:keep_samples]])
    if len(split.input_shape) == 3 and split.input_shape[0] in (1, 3):
        pre_png = pre_activations(split, image_validity.png_round_trip(stored), batch)
        png_same = int((probabilities_from_pre(split, pre_png, batch).argmax(1) == target_class).sum())
        png_act = float(prop1_residuals(pre_png, target_pre.expand_as(pre_png))["act_rel"].max())
    else:  # not an image (no PNG of it)
        png_same, png_act = 0, math.nan
    in_class = sample_probs.argmax(1) == target_class
    return {
        "target_class": target_class,
        "same_class_k": int(in_class.sum()),
        "same_class_pct": float(in_class.float().mean() * 100),
        "target_prob": float(target_probs[target_class]),
        "sample_prob": float(sample_probs.max(1).values.mean()),
        "sample_target_prob": float(sample_probs[:, target_class].mean()),
        "sample_target_prob_min": float(sample_probs[:, target_class].min()),
        "vertex_distance": mean_pairwise_distance(vertices, scale),
        "target_to_vertex_distance": float((vertices - target).flatten(1).norm(dim=1).mean()) * scale,
        "n_samples": n_samples,
        "vertices": {k: _summary(v) for k, v in res_v.items()},
        "samples": {k: _summary(v) for k, v in res_s.items()},
        "png_same_class_k": png_same,
        "png_n": len(stored),
        "png_act_rel_max": png_act,
        "outside_unit_range": max(
            image_validity.outside_unit_range(vertices), image_validity.outside_unit_range(samples)
        ),
        "samples_kept": samples[:keep_samples],
    }


def measure_polytopes(
    split: ReluSplit,
    targets: Tensor,
    polys: Polytopes,
    n_samples: int = 2000,
    generator: torch.Generator | None = None,
    batch: int = 2000,
    scale: float = 1.0,
    keep_samples: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """``measure_polytope`` for every polytope of ``polys``; targets (T, *input_shape) in the same order."""
    if len(targets) != polys.n_polytopes:
        raise ValueError(f"{len(targets)} targets for {polys.n_polytopes} polytopes; give one target per polytope")
    return [
        measure_polytope(split, t, v, n_samples, generator, batch, scale, keep_samples)
        for t, v in progress_bar(
            list(zip(targets, polys.vertices)), desc="sampling polytopes", disable=not progress, leave=False
        )
    ]


def table_row(report: dict[str, Any], image_distance: float) -> dict[str, Any]:
    """The flat numbers of one ``measure_polytope`` report (Li et al.'s table columns + Proposition 1 residuals).

    ratio_pct: mean vertex distance as a percentage of ``image_distance`` (mean distance between dataset images);
    sample_prob is the samples' mean probability of the *target's* class (``sample_target_prob``: a sample
    classified as another class counts with its low probability); same_class_k / n_samples: samples kept in the
    target's class; png_*: the vertices and kept samples after an 8-bit PNG round trip.
    """
    return {
        "same_class_pct": report["same_class_pct"],
        "same_class_k": report["same_class_k"],
        "n_samples": report["n_samples"],
        "target_prob": report["target_prob"],
        "sample_prob": report["sample_target_prob"],
        "sample_prob_min": report["sample_target_prob_min"],
        "image_distance": image_distance,
        "vertex_distance": report["vertex_distance"],
        "ratio_pct": 100 * report["vertex_distance"] / image_distance,
        "vertex_eq_rel_max": report["vertices"]["eq_rel"]["max"],
        "vertex_ineq_max": report["vertices"]["ineq_max"]["max"],
        "vertex_viol_rel_max": report["vertices"]["viol_rel"]["max"],
        "sample_act_rel_max": report["samples"]["act_rel"]["max"],
        "sample_viol_rel_max": report["samples"]["viol_rel"]["max"],
        "sample_pattern_min": report["samples"]["pattern"]["min"],
        "png_same_class_k": report["png_same_class_k"],
        "png_n": report["png_n"],
        "png_act_rel_max": report["png_act_rel_max"],
    }


@torch.no_grad()
def cut_error(split: ReluSplit, full: Callable[[Tensor], Tensor], u: Tensor) -> float:
    """How far the cut's logits are from the whole model's on inputs u (B, *input_shape): max |difference| relative
    to the largest |logit| (0 when the cut reproduces the model)."""
    split.check_inputs(u)
    device = device_of(split.module)
    u = u.to(device)
    reference = full(u)
    return float((split.logits(u) - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def search_checks(
    split: ReluSplit, polys: Polytopes, rows: Sequence[dict[str, Any]], name: str, batch: int = 8
) -> list[tuple[bool, str, str]]:
    """Internal checks of a search, as ``(ok, what, measured)``; each can fail.

    rows: ``table_row`` dicts of ``polys``' polytopes (their ``vertex_viol_rel_max``). Checks: the mean objective
    fell from the first step to the last; every polytope whose start lies outside it (``viol_rel`` > 1e-6) has its
    worst vertex nearer the polytope than that start (Proposition 1's constraints at the cut), so the search moved
    towards it.
    """
    if len(rows) != polys.n_polytopes:
        raise ValueError(f"{len(rows)} rows for {polys.n_polytopes} polytopes; give one row per polytope")
    first, last = float(polys.loss_curve[0]), float(polys.loss_curve[-1])
    start_viol = prop1_residuals(pre_activations(split, polys.starts, batch), polys.target_pre)["viol_rel"]
    vertex_viol = torch.tensor([float(r["vertex_viol_rel_max"]) for r in rows], dtype=start_viol.dtype)
    closer = (vertex_viol < start_viol) | (start_viol <= 1e-6)  # a start inside the polytope: nothing to approach
    return [
        (last < first, f"the {name} search lowers alpha*L_plus + L_i", f"{first:.4g} -> {last:.4g}"),
        (
            bool(closer.all()),
            f"every {name} polytope: the worst vertex is nearer the polytope than the search's start (viol_rel)",
            f"{int(closer.sum())} of {len(closer)}; worst vertex / start: "
            f"{float((vertex_viol / start_viol.clamp_min(1e-12)).max()):.3g}",
        ),
    ]


def timing_row(name: str, polys: Polytopes, device: torch.device | str) -> dict[str, Any]:
    """Wall time of a batched search: total, per vertex and per polytope (seconds)."""
    return {
        "search": name,
        "device": str(device),
        "polytopes": polys.n_polytopes,
        "vertices": polys.n_vertices,
        "steps": polys.config.steps,
        "seconds": polys.seconds,
        "s_per_vertex": polys.seconds_per_vertex(),
        "s_per_polytope": polys.seconds_per_polytope(),
    }


def other_class_indices(labels: Tensor, targets: Sequence[int], generator: torch.Generator | None = None) -> list[int]:
    """For each target index, a random dataset index whose label differs from the target's (all distinct)."""
    order = torch.randperm(len(labels), generator=generator).tolist()
    used = set(int(t) for t in targets)
    chosen = []
    for t in targets:
        j = next(i for i in order if i not in used and labels[i] != labels[t])
        used.add(j)
        chosen.append(j)
    return chosen


def distance_sweep(
    split: ReluSplit,
    targets: Tensor,
    starts: Tensor,
    configs: Sequence[SearchConfig],
    n_vertices: int = 5,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Polytope size and collision quality for several optimiser settings (the push term is unbounded below except
    by the pixel box, so how far the vertices travel is set by the optimiser: learning rate x steps).

    targets/starts (T, *input_shape). One row per config: lr, steps, alpha, vertex_distance (mean pairwise, averaged
    over polytopes), to_start / to_target (mean distance of the vertices from their start / target), act_rel_max
    (worst vertex), seconds, and vertices (T, V, *input_shape) for figures.
    """
    rows = []
    for config in configs:
        polys = find_polytopes(split, targets, starts, n_vertices, config, progress=progress)
        pre = pre_activations(split, polys.vertices.flatten(0, 1))
        res = prop1_residuals(pre, polys.target_pre.repeat_interleave(polys.n_vertices, 0))
        rows.append(
            {
                "lr": config.lr,
                "steps": config.steps,
                "alpha": config.alpha,
                "vertex_distance": float(np.mean([mean_pairwise_distance(v) for v in polys.vertices])),
                "to_start": float((polys.vertices - starts[:, None]).flatten(2).norm(dim=2).mean()),
                "to_target": float((polys.vertices - targets[:, None]).flatten(2).norm(dim=2).mean()),
                "act_rel_max": float(res["act_rel"].max()),
                "seconds": polys.seconds,
                "vertices": polys.vertices,
            }
        )
    return rows


def polytope_figure(rows: Sequence[dict[str, Any]], difference: bool = False, size: float = 1.1) -> plt.Figure:
    """Li et al.'s Table 1/3/5 as a figure, one row per polytope.

    Each row: {"label": str, "target": (C,H,W), "vertices": (V,C,H,W), "samples": (S,C,H,W), optional "start":
    (C,H,W), optional "boxes": [(top, left, height, width), ...] drawn in purple on an extra "indicator" panel
    showing vertex 0 (Li et al.'s Table 5)}; pixels in [0, 1]. ``difference``: show each vertex and sample minus
    the target instead (red = brighter than the target, blue = darker; one symmetric scale per figure).
    """
    import matplotlib.pyplot as plt

    from helpers.book.plotting import MAX_WIDTH_IN, to_image

    def items(row: dict[str, Any]) -> list[tuple[str, Tensor]]:
        head = [("target", row["target"])] + ([("start", row["start"])] if row.get("start") is not None else [])
        tail = [("indicator", row["vertices"][0])] if row.get("boxes") else []
        return (
            head
            + [(f"vertex {i}", v) for i, v in enumerate(row["vertices"])]
            + [(f"sample {i}", x) for i, x in enumerate(row["samples"])]
            + tail
        )

    n_cols = max(len(items(r)) for r in rows)
    size = min(size, MAX_WIDTH_IN / n_cols)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(size * n_cols, size * len(rows) + 0.3), squeeze=False)
    scale = (
        max(float((torch.cat([r["vertices"], r["samples"]]) - r["target"]).abs().max()) for r in rows)
        if difference
        else 1.0
    )
    for r, row in enumerate(rows):
        entries = items(row)
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(entries):
                continue
            title, img = entries[c]
            if difference and title.startswith(("vertex", "sample")):
                arr = to_image(img - row["target"])
                ax.imshow(arr.mean(-1) if arr.ndim == 3 else arr, cmap="seismic", vmin=-scale, vmax=scale)
            else:
                arr = np.clip(to_image(img), 0, 1)
                ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1)
            if title == "indicator":
                for top, left, h, w in row["boxes"]:
                    ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), w, h, fill=False, color="purple", lw=1.5))
            ax.set_title(title, fontsize=7)
        axes[r][0].text(
            -0.12, 0.5, row["label"], transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=7
        )
    fig.tight_layout()
    return fig


@torch.no_grad()
def active_counts(model: nn.Sequential, x: Tensor) -> list[dict[str, Any]]:
    """For each ReLU of a sequential model and inputs x (B, *shape): units N, mean active units N+, and whether
    N+ < d (d = input dimension, since the search runs over inputs), Proposition 1's assumption."""
    d = x[0].numel()
    rows = []
    for idx in relu_indices(model):
        pre = model[:idx](x).flatten(1)
        n_plus = (pre > 0).sum(1).float()
        rows.append(
            {
                "relu_index": idx,
                "layer": type(model[idx - 1]).__name__,
                "units": pre.shape[1],
                "active_mean": float(n_plus.mean()),
                "active_max": int(n_plus.max()),
                "d": d,
                "n_plus_below_d": bool(n_plus.max() < d),
            }
        )
    return rows


MNIST_SPLITS = {"mnist_mlp_2x256": 2, "lenet5": 8}  # the ReLU position of the collision layer (first hidden / fc1)


#: The MNIST chapter's search settings (pixels in [0, 1]); see chapter 08 for how the polytope size depends on them.
MNIST_CONFIG = SearchConfig(alpha=100.0, steps=1000, lr=0.2)
