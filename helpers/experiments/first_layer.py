"""The first-layer verdict: does a model admit exact first-layer collisions, by the paper's rule and beyond it?

The first layer is the first weight layer (convolution, linear or attention) **the input meets**: found by a
forward pass with forward pre-hooks (:func:`first_input_layer`), which stops as soon as a weight layer receives a
tensor computed from the input (weight layers run on constants, e.g. a relative-position MLP, are passed over).
It works on ``meta``-device models. Where the forward fails, the first weight matrix in registration order is
taken instead and :attr:`FirstLayerVerdict.order` says so.

Three readings of that layer (rank rule: :mod:`helpers.linalg.rank_rule`, the book's one rule):

* **Patch rule** (Ozbulak et al.): ``W1`` is ``out x (in/groups * prod(k))`` (the matrix of
  :func:`helpers.experiments.audit.weight_matrices`); exact collisions exist iff its nullity is positive.
* **Block reading** (grouped and depthwise convolutions): the layer's own map of one whole input patch,
  ``out x (in * prod(k))``, block-diagonal in the groups (:func:`helpers.experiments.audit.grouped_reading`);
  its nullity differs from the stacked matrix's as soon as ``groups > 1``.
* **Operator reading** (beyond the paper): the layer as a linear map on the whole input it receives (size,
  stride, padding and dilation included). Per spatial axis the pixels some window reads are a set
  (separable, so the read pixels form a grid):

  - pixels no window reads (kernel < stride, or a border the last window misses) are in the kernel whatever
    the weights: ``in_channels * unread`` exact null directions;
  - non-overlapping windows (kernel <= stride, dilation 1: ViT/Swin patch embeddings): the operator is a direct
    sum over windows, so its kernel dimension is exact: the unread pixels plus, for every window, the nullity of
    ``W1`` restricted to the taps inside the image (:attr:`FirstLayerVerdict.operator_kernel_dim`);
  - overlapping windows: the input splits into ``C * prod(s)`` polyphase components per group
    (:attr:`FirstLayerVerdict.polyphase_count`) against ``out/groups`` outputs per position; rank-nullity on the
    real, zero-padded operator (input dimension minus output dimension, per group) forces a kernel when it is
    positive, which for large inputs is ``C * prod(s) > out`` per group. Otherwise the circular operator is
    injective for generic weights (each polyphase column has its own weights), and only rank lost in training
    can make it singular: measured on the circular operator's spectrum
    (:func:`helpers.linalg.conv_operator.polyphase_spectrum`, one matrix per frequency) by the rank rule.

The one-line answer (:attr:`FirstLayerVerdict.answer`): :data:`PATCH_EXISTS` when the operator's kernel is
forced by the shapes, :data:`ONLY_WITH_RANK_LOSS` when it is not forced but the measured weights lose rank,
else :data:`DO_NOT_EXIST` (on ``meta``: for every full-rank set of weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from helpers.experiments.audit import grouped_reading, weight_matrices
from helpers.linalg.conv_operator import polyphase_spectrum
from helpers.linalg.rank_rule import default_rtol, rank_from_singular_values, reference_rank

#: The three answers (plain strings, not verdict statuses).
PATCH_EXISTS = "exist"
ONLY_WITH_RANK_LOSS = "exist only with rank lost in training"
DO_NOT_EXIST = "do not exist"
ANSWERS: tuple[str, ...] = (PATCH_EXISTS, ONLY_WITH_RANK_LOSS, DO_NOT_EXIST)

#: The modules whose weights are weight matrices (the audit's matrix rule), transposed convolutions aside.
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)

#: Above this many complex entries the measured polyphase spectrum is skipped (it would cost seconds).
MAX_SPECTRUM_ENTRIES = 2**26


@dataclass(frozen=True)
class FirstLayerVerdict:
    """The first layer the input meets and whether it admits exact collisions (module docstring).

    Shapes: ``weight_shape`` as stored; ``kernel``/``stride`` per spatial axis (``()`` for Linear);
    ``layer_input_shape`` the tensor the layer received (batch of 1 included). Nullities are dimensions
    (numbers of independent input directions). ``*_structural`` fields hold for every full-rank set of weights;
    the measured ones (``patch_nullity``, ``block_nullity``, ``operator_rank_lost``) are ``None`` on ``meta``.
    ``operator_kernel_dim``: the operator's exact kernel dimension where computable (Linear layers and
    non-overlapping windows): measured from the weights, or on ``meta`` the structural value
    (``operator_kernel_dim_structural``); ``None`` for overlapping windows.
    """

    layer: str | None
    order: str
    module_type: str
    weight_shape: tuple[int, ...]
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    patch_rows: int
    patch_cols: int
    patch_nullity_structural: int
    patch_nullity: int | None
    block_nullity_structural: int
    block_nullity: int | None
    polyphase_count: int
    operator_structural: str
    operator_forced: bool
    operator_kernel_dim: int | None
    answer: str
    # additions to the contract
    order_detail: str = ""
    layer_input_shape: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    unread_pixels: int = 0
    overlapping: bool = False
    operator_kernel_dim_structural: int | None = None
    operator_dimension_count: int | None = None
    operator_rank_lost: bool | None = None
    operator_measured: str = ""
    notes: tuple[str, ...] = ()

    @property
    def measured(self) -> bool:
        """Whether the weights were read (False on ``meta``)."""
        return self.patch_nullity is not None

    @property
    def patch_rule(self) -> bool:
        """The paper's rule: exact collisions exist iff the patch nullity (measured, else structural) is > 0."""
        return (self.patch_nullity if self.patch_nullity is not None else self.patch_nullity_structural) > 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), with ``patch_rule`` and ``measured``."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {**data, "patch_rule": self.patch_rule, "measured": self.measured}

    def line(self) -> str:
        """One line: the layer, the patch rule and the operator rule's answer."""
        patch = self.patch_nullity if self.patch_nullity is not None else self.patch_nullity_structural
        return (
            f"{self.layer} ({self.module_type} {list(self.weight_shape)}, {self.order} order): patch nullity {patch}; "
            f"exact first-layer collisions {self.answer} ({self.operator_structural})"
        )


class _Found(BaseException):
    """Raised by the pre-hook to stop the forward at the first weight layer (BaseException: models that catch
    ``Exception`` cannot swallow it)."""


def _example(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """A zero input ``(1, *input_shape)`` on the model's device (``meta`` for a meta model)."""
    tensors = [*model.parameters(recurse=True)][:1] or [*model.buffers()][:1] or [torch.empty(0)]
    tensor = tensors[0]
    dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    return torch.zeros(1, *(int(s) for s in input_shape), device=tensor.device, dtype=dtype)


def _tracked(example: Any) -> Any:
    """``example`` with every floating tensor in it replaced by a non-leaf copy that requires grad."""
    if isinstance(example, torch.Tensor):
        if not example.is_floating_point():
            return example
        return example.detach().requires_grad_(True).clone()
    if isinstance(example, (list, tuple)):
        return type(example)(_tracked(e) for e in example)
    if isinstance(example, dict):
        return {k: _tracked(v) for k, v in example.items()}
    return example


def first_input_layer(model: nn.Module, example: Any) -> tuple[str, tuple[int, ...]] | None:
    """(name, input shape) of the first weight-layer module (conv, linear, attention) whose input is computed
    from ``example``, by forward pre-hooks; the forward stops there. ``None`` when the forward ends without one.

    The input's dependence is tracked by autograd (parameters are frozen for the call and restored), so it works
    on ``meta`` tensors. A tuple ``example`` is passed as positional arguments. Errors of the forward propagate.
    """
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    found: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for t in (*args, *kwargs.values()):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                found["layer"] = (names[id(module)], tuple(int(s) for s in t.shape))
                raise _Found

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if id(m) in names]
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    try:
        for p in trainable:
            p.requires_grad_(False)
        model.eval()
        x = _tracked(example)
        with torch.enable_grad():
            model(*x) if isinstance(x, tuple) else model(x)
    except _Found:
        pass
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return found.get("layer")


# --- geometry of a convolution on its input ---------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """One spatial axis of a convolution on an input of ``size`` pixels: padding before/after, the output size,
    which input pixels some window reads, and for each window the range of kernel taps inside the input."""

    size: int
    kernel: int
    stride: int
    dilation: int
    pad: tuple[int, int]

    @property
    def outputs(self) -> int:
        span = self.dilation * (self.kernel - 1) + 1
        return max(0, (self.size + self.pad[0] + self.pad[1] - span) // self.stride + 1)

    def taps(self, i: int) -> list[int]:
        """Kernel taps of window ``i`` that land inside the input."""
        start = i * self.stride - self.pad[0]
        return [t for t in range(self.kernel) if 0 <= start + t * self.dilation < self.size]

    def read(self) -> int:
        """How many input pixels some window reads."""
        seen = {i * self.stride - self.pad[0] + t * self.dilation for i in range(self.outputs) for t in self.taps(i)}
        return len(seen)

    def windows(self) -> Counter[tuple[int, int]]:
        """(first tap, tap count) inside the input -> number of windows (dilation 1: taps are contiguous)."""
        return Counter((t[0], len(t)) if t else (0, 0) for t in (self.taps(i) for i in range(self.outputs)))


def _padding(layer: nn.modules.conv._ConvNd, sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(before, after) padding per axis, including the string modes and timm's dynamic TF-'SAME' padding."""
    dims = len(layer.kernel_size)
    k, s, d = layer.kernel_size, layer.stride, layer.dilation
    if type(layer).__name__.endswith("Conv2dSame") or getattr(layer, "same_pad", False) is True:
        totals = [max((math.ceil(n / s[a]) - 1) * s[a] + (k[a] - 1) * d[a] + 1 - n, 0) for a, n in enumerate(sizes)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if layer.padding == "valid":
        return ((0, 0),) * dims
    if layer.padding == "same":
        totals = [d[a] * (k[a] - 1) for a in range(dims)]
        return tuple((t // 2, t - t // 2) for t in totals)
    pads = tuple(int(p) for p in layer.padding)
    return tuple((p, p) for p in pads)


@dataclass(frozen=True)
class _Operator:
    """The structural operator reading of a convolution (see the module docstring)."""

    unread: int
    overlapping: bool
    dimension_count: int
    kernel_dim_structural: int | None
    forced: bool
    text: str


def _window_classes(axes: Sequence[_Axis]) -> Counter[tuple[tuple[int, int], ...]]:
    """Windows grouped by the taps inside the input on every axis: ((first, count) per axis) -> windows."""
    classes: Counter[tuple[tuple[int, int], ...]] = Counter({(): 1})
    for axis in axes:
        new: Counter[tuple[tuple[int, int], ...]] = Counter()
        for key, n in classes.items():
            for window, m in axis.windows().items():
                new[(*key, window)] += n * m
        classes = new
    return classes


def _sub_nullity(rows: int, cols: int, groups: int) -> int:
    """Structural nullity of a block-diagonal map with ``groups`` blocks ``rows x cols``."""
    return groups * (cols - min(rows, cols))


def _operator(layer: nn.modules.conv._ConvNd, axes: Sequence[_Axis], patch_struct: int, block_struct: int) -> _Operator:
    g = layer.groups
    c, o = layer.in_channels // g, layer.out_channels // g
    pixels = math.prod(a.size for a in axes)
    read = math.prod(a.read() for a in axes)
    out_positions = math.prod(a.outputs for a in axes)
    unread = layer.in_channels * (pixels - read)
    count = g * (c * read - o * out_positions)
    poly = c * math.prod(a.stride for a in axes)
    overlapping = not all(a.dilation == 1 and a.kernel <= a.stride for a in axes)
    kernel_dim: int | None = None
    if not overlapping:
        per_window = sum(
            n * _sub_nullity(o, c * math.prod(t for _, t in key), g) for key, n in _window_classes(axes).items()
        )
        kernel_dim = unread + per_window
        forced = kernel_dim > 0
        how = "kernel == stride" if all(a.kernel == a.stride for a in axes) else "kernel <= stride"
        text = (
            f"non-overlapping windows ({how}): exact kernel dim {kernel_dim} = {unread} unread + "
            f"{per_window} from {out_positions} windows (block nullity {block_struct} each when whole)"
        )
    else:
        forced = unread > 0 or count > 0
        parts = [f"{unread} unread input values"] if unread else []
        parts.append(f"polyphase {c}*{math.prod(a.stride for a in axes)} = {poly} vs {o} outputs per group")
        parts.append(f"input - output dimension {count:+d}")
        if forced:
            text = "overlapping windows, kernel forced: " + "; ".join(parts)
        else:
            text = "overlapping windows, injective for generic weights: " + "; ".join(parts)
    return _Operator(unread, overlapping, count, kernel_dim, forced, text)


# --- measured ranks ------------------------------------------------------------------------------------------


def _measured_kernel_dim(
    layer: nn.modules.conv._ConvNd, axes: Sequence[_Axis], unread: int, dtype: torch.dtype, rtol: float | None
) -> int:
    """Exact kernel dimension of a non-overlapping convolution from its weights: unread pixels plus, per window
    class, the block nullity of the weight restricted to the taps inside the input (rank rule)."""
    total = unread
    for key, n in _window_classes(axes).items():
        index = tuple(slice(first, first + count) for first, count in key)
        sub = layer.weight.detach()[(slice(None), slice(None), *index)]
        if sub.numel() == 0:
            continue
        reading = grouped_reading("window", sub, layer.groups, dtype=dtype, rtol=rtol)
        total += n * reading.block_nullity
    return total


def _circular_rank_lost(
    layer: nn.modules.conv._ConvNd, axes: Sequence[_Axis], dtype: torch.dtype, rtol: float | None
) -> tuple[bool | None, str]:
    """Whether the circular whole-input operator of an overlapping 2-D convolution loses rank by the rank rule
    (its singular values are those of the polyphase matrices of every group and frequency), with what was
    computed. ``None`` where it cannot be computed (not 2-D, dilation, size not a multiple of the stride, too big)."""
    if len(axes) != 2 or any(a.dilation != 1 or a.size % a.stride for a in axes):
        return None, "circular spectrum not computed (needs 2-D, dilation 1, input size a multiple of the stride)"
    g = layer.groups
    c, o = layer.in_channels // g, layer.out_channels // g
    freqs = math.prod(a.size // a.stride for a in axes)
    if g * freqs * o * c * math.prod(a.stride for a in axes) > MAX_SPECTRUM_ENTRIES:
        return None, "circular spectrum not computed (too large)"
    weight = layer.weight.detach().to("cpu", torch.float64)
    k, s = tuple(a.kernel for a in axes), tuple(a.stride for a in axes)
    p = tuple(a.pad[0] for a in axes)
    sigmas = []
    for block in weight.split(o):
        conv = nn.Conv2d(c, o, k, s, p, bias=False, dtype=torch.float64)  # type: ignore[arg-type]
        conv.weight = nn.Parameter(block, requires_grad=False)
        sigmas.append(polyphase_spectrum(conv, (c, axes[0].size, axes[1].size)).singular.flatten())
    sigma = torch.cat(sigmas)
    shape = (layer.out_channels * freqs, layer.in_channels * math.prod(a.size for a in axes))
    rank = rank_from_singular_values(sigma, shape, dtype, rtol)
    lost = rank < min(shape)
    ratio = float(sigma.min() / sigma.max()) if sigma.numel() and float(sigma.max()) > 0 else 0.0
    return lost, (
        f"circular operator {shape[0]} x {shape[1]}: rank {rank} of {min(shape)} "
        f"(sigma_min/sigma_max {ratio:.3g}, rtol {default_rtol(shape, dtype) if rtol is None else rtol:.3g})"
    )


# --- the verdict ---------------------------------------------------------------------------------------------


def _registration_first(model: nn.Module) -> str | None:
    matrices = weight_matrices(model)
    return matrices[0].name.rsplit(".", 1)[0] if matrices else None


def _locate(
    model: nn.Module, input_shape: Sequence[int], example: Any | None
) -> tuple[str | None, str, str, tuple[int, ...]]:
    """(layer name, order, detail, the layer's input shape) by the forward, else by registration order."""
    try:
        found = first_input_layer(model, _example(model, input_shape) if example is None else example)
    except Exception as err:  # any model's forward may fail on meta or on this input: fall back, and say why
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        return _registration_first(model), "registration", f"forward failed ({reason})", ()
    if found is None:
        return _registration_first(model), "registration", "the forward met no weight layer", ()
    return found[0], "forward", "", found[1]


def first_layer_verdict(
    model: nn.Module,
    input_shape: tuple[int, ...] = (3, 224, 224),
    *,
    example: Any | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
) -> FirstLayerVerdict:
    """The :class:`FirstLayerVerdict` of ``model`` on inputs of ``input_shape`` (no batch axis; ``example``, any
    object the model's forward takes, overrides it). Works on ``meta``-device models (structural only: measured
    fields ``None``) and on real weights (the rank rule at precision ``dtype`` with ``rtol``, as the audit).

    Raises ``ValueError`` when the model has no weight layer at all.
    """
    name, order, detail, seen_shape = _locate(model, input_shape, example)
    if name is None:
        raise ValueError(f"{type(model).__name__} has no weight layer (conv, linear or attention)")
    layer = model.get_submodule(name)
    layer_input = seen_shape or (1, *(int(s) for s in input_shape))
    measured = not any(p.is_meta for p in layer.parameters())
    notes: list[str] = [f"first layer by registration order: {detail}"] if order == "registration" else []
    image = math.prod(int(s) for s in input_shape) if example is None else None
    if image is not None and seen_shape and math.prod(seen_shape) != image:
        notes.append(
            f"the layer receives {list(seen_shape)}, not the {list(input_shape)} input itself: the operator "
            "reading is of the layer's own input"
        )
    if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return _conv_verdict(layer, name, order, detail, layer_input, measured, dtype, rtol, notes)
    return _linear_verdict(layer, name, order, detail, layer_input, measured, dtype, rtol, notes)


def _answer(forced: bool, lost: bool | None) -> str:
    if forced:
        return PATCH_EXISTS
    return ONLY_WITH_RANK_LOSS if lost else DO_NOT_EXIST


def _conv_verdict(
    layer: nn.modules.conv._ConvNd,
    name: str,
    order: str,
    detail: str,
    layer_input: tuple[int, ...],
    measured: bool,
    dtype: torch.dtype,
    rtol: float | None,
    notes: list[str],
) -> FirstLayerVerdict:
    dims = len(layer.kernel_size)
    g, weight = layer.groups, layer.weight
    c_g, o = layer.in_channels // g, layer.out_channels
    taps = math.prod(layer.kernel_size)
    rows, cols = o, c_g * taps
    sizes = [int(s) for s in layer_input[-dims:]] if len(layer_input) >= dims + 1 else [1] * dims
    pads = _padding(layer, sizes)
    axes = [
        _Axis(sizes[a], int(layer.kernel_size[a]), int(layer.stride[a]), int(layer.dilation[a]), pads[a])
        for a in range(dims)
    ]
    patch_struct = cols - min(rows, cols)
    block_struct = _sub_nullity(o // g, cols, g)
    op = _operator(layer, axes, patch_struct, block_struct)
    if layer.padding_mode != "zeros":
        notes.append(f"padding_mode={layer.padding_mode!r}: the operator reading assumes zero padding")
    if "StdConv" in type(layer).__name__:
        notes.append(
            "weight standardisation in forward: the applied W1 has zero-mean rows, so the all-ones patch is always "
            "in its kernel; the numbers here are of the stored weight"
        )
    patch = block = kernel_dim = None
    lost: bool | None = None
    how = ""
    if measured:
        reading = grouped_reading(name, weight, g, dtype=dtype, rtol=rtol)
        patch, block = reading.stacked_nullity, reading.block_nullity
        if not op.overlapping:
            kernel_dim = _measured_kernel_dim(layer, axes, op.unread, dtype, rtol)
            lost = kernel_dim > (op.kernel_dim_structural or 0)
            how = f"exact kernel dimension from the weights: {kernel_dim}"
        elif not op.forced:
            lost, how = _circular_rank_lost(layer, axes, dtype, rtol)
            if lost is None:  # the spectrum could not be computed: lost rank of the block map is the evidence left
                lost = block > block_struct
                how += f"; block map nullity {block} vs {block_struct} forced by the shape"
    return FirstLayerVerdict(
        layer=name,
        order=order,
        module_type=type(layer).__name__,
        weight_shape=tuple(int(s) for s in weight.shape),
        in_channels=int(layer.in_channels),
        out_channels=o,
        groups=g,
        kernel=tuple(int(k) for k in layer.kernel_size),
        stride=tuple(int(s) for s in layer.stride),
        patch_rows=rows,
        patch_cols=cols,
        patch_nullity_structural=patch_struct,
        patch_nullity=patch,
        block_nullity_structural=block_struct,
        block_nullity=block,
        polyphase_count=c_g * math.prod(int(s) for s in layer.stride),
        operator_structural=op.text,
        operator_forced=op.forced,
        operator_kernel_dim=kernel_dim if measured else op.kernel_dim_structural,
        answer=_answer(op.forced, lost),
        order_detail=detail,
        layer_input_shape=layer_input,
        padding=tuple(p for pair in pads for p in pair),
        dilation=tuple(int(d) for d in layer.dilation),
        unread_pixels=op.unread,
        overlapping=op.overlapping,
        operator_kernel_dim_structural=op.kernel_dim_structural,
        operator_dimension_count=op.dimension_count,
        operator_rank_lost=lost,
        operator_measured=how,
        notes=tuple(notes),
    )


def _linear_verdict(
    layer: nn.Module,
    name: str,
    order: str,
    detail: str,
    layer_input: tuple[int, ...],
    measured: bool,
    dtype: torch.dtype,
    rtol: float | None,
    notes: list[str],
) -> FirstLayerVerdict:
    """Linear (or attention ``in_proj``) layers: the operator acts on every token (all but the last axis) alike,
    so its kernel is ``tokens * nullity(W1)`` exactly."""
    weight: Any = layer.weight if not isinstance(layer, nn.MultiheadAttention) else layer.in_proj_weight
    if isinstance(layer, nn.MultiheadAttention):
        weight = weight if weight is not None else layer.q_proj_weight
        notes.append("attention first: W1 is its input projection as stored")
    assert isinstance(weight, torch.Tensor)
    rows, cols = int(weight.shape[0]), int(weight.shape[1])
    tokens = math.prod(layer_input[:-1]) if len(layer_input) > 1 else 1
    struct = cols - min(rows, cols)
    patch = None
    if measured:
        rank, _ = reference_rank(weight.detach().reshape(rows, cols).cpu(), dtype, rtol)
        patch = cols - rank
    kernel_struct = tokens * struct
    forced = kernel_struct > 0
    text = f"linear on {tokens} token(s) of {cols} features: kernel dim = {tokens} x nullity(W1)"
    return FirstLayerVerdict(
        layer=name,
        order=order,
        module_type=type(layer).__name__,
        weight_shape=tuple(int(s) for s in weight.shape),
        in_channels=cols,
        out_channels=rows,
        groups=1,
        kernel=(),
        stride=(),
        patch_rows=rows,
        patch_cols=cols,
        patch_nullity_structural=struct,
        patch_nullity=patch,
        block_nullity_structural=struct,
        block_nullity=patch,
        polyphase_count=cols,
        operator_structural=text,
        operator_forced=forced,
        operator_kernel_dim=tokens * patch if patch is not None else kernel_struct,
        answer=_answer(forced, None if patch is None else patch > struct),
        order_detail=detail,
        layer_input_shape=layer_input,
        overlapping=False,
        operator_kernel_dim_structural=kernel_struct,
        operator_dimension_count=tokens * (cols - rows),
        operator_rank_lost=None if patch is None else patch > struct,
        operator_measured="" if patch is None else f"nullity(W1) from the weights: {patch}",
        notes=tuple(notes),
    )
