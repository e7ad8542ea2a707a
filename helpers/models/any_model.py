"""Any model by name: the book's registry, every torchvision builder and every timm model, with an optional
checkpoint, and the audit of any ``nn.Module`` (Table 1's numbers plus the first-layer verdict).

Names resolve in this order: the registry (:mod:`helpers.models.registry`, unchanged: same models, same
numbers), then ``torchvision.models.list_models()`` (classification, segmentation, detection, video, optical
flow, quantization), then ``timm.list_models()`` (a pretrained tag such as ``resnet18.a1_in1k`` is accepted).
A prefix ``torchvision:`` or ``timm:`` picks the library where a name exists in several (``resnet18``).
An unknown name raises a ``ValueError`` naming the closest valid names (``difflib`` over all three sources).

``checkpoint``: a state dict (``torch.save(model.state_dict())``; a ``{"state_dict": ...}`` or
``{"model": ...}`` wrapper and a ``module.`` prefix are accepted) for the named architecture, loaded strictly.
A file that is not a state dict, or one that does not fit, raises one ``ValueError`` line naming the first
mismatching key and both shapes (or the missing or unexpected key).

``device="meta"`` builds the model without allocating weights: the audit is then structural
(:func:`helpers.experiments.audit.structural_audit`) and the verdict's measured fields are ``None``.
"""

from __future__ import annotations

import difflib
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helpers import runtime
from helpers.experiments import audit as audit_module
from helpers.experiments.first_layer import FirstLayerVerdict, first_layer_verdict
from helpers.linalg.rank_rule import Method
from helpers.models import registry

SOURCES: tuple[str, ...] = ("registry", "torchvision", "timm")

#: torchvision's model modules and the registry task each maps to (num_classes and transforms follow it).
TORCHVISION_MODULES: tuple[tuple[str, str], ...] = (
    ("segmentation", "segmentation"),
    ("detection", "localization"),
    ("video", "classification"),
    ("optical_flow", "classification"),
    ("quantization", "classification"),
)

#: Frames x height x width given to torchvision's video models (MViT needs 16 x 224 x 224).
VIDEO_INPUT = (3, 16, 224, 224)


@dataclass(frozen=True)
class ModelName:
    """A resolved model name: ``name`` as its ``source`` (registry, torchvision, timm) knows it; ``task`` the
    torchvision module (classification, segmentation, detection, video, optical_flow, quantization) or ""."""

    name: str
    source: str
    task: str = ""

    def __str__(self) -> str:
        return self.name if self.source == "registry" else f"{self.source}:{self.name}"


@functools.cache
def torchvision_names() -> dict[str, str]:
    """Every torchvision builder name -> its module (``classification`` for the top-level ones)."""
    import torchvision.models as tvm

    tasks = {name: "classification" for name in tvm.list_models(module=tvm)}
    for module, _ in TORCHVISION_MODULES:
        tasks.update({name: module for name in tvm.list_models(module=getattr(tvm, module))})
    return tasks


@functools.cache
def timm_names() -> frozenset[str]:
    """Every ``timm.list_models()`` name (architectures, without pretrained tags)."""
    runtime.ensure_hub_mode()
    import timm

    return frozenset(timm.list_models())


def all_names() -> list[str]:
    """Every valid name, sorted: registry, torchvision and timm together."""
    return sorted(set(registry.REGISTRY) | set(torchvision_names()) | timm_names())


def closest_names(name: str, n: int = 5) -> list[str]:
    """The ``n`` valid names closest to ``name`` (``difflib``), best first."""
    return difflib.get_close_matches(name, all_names(), n=n, cutoff=0.5)


def resolve(name: str) -> ModelName:
    """The source of ``name`` (module docstring); ``ValueError`` with the closest valid names when unknown."""
    source, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if source and source not in ("torchvision", "timm"):
        raise ValueError(f"unknown library prefix {source!r} in {name!r}; valid: torchvision:NAME, timm:NAME")
    if not source and bare in registry.REGISTRY:
        return ModelName(bare, "registry")
    if source in ("", "torchvision") and bare in torchvision_names():
        return ModelName(bare, "torchvision", torchvision_names()[bare])
    if source in ("", "timm") and (bare in timm_names() or bare.split(".", 1)[0] in timm_names()):
        return ModelName(bare, "timm")
    close = closest_names(bare)
    where = {"torchvision": "torchvision", "timm": "timm"}.get(source, "the registry, torchvision or timm")
    raise ValueError(
        f"unknown model {name!r} in {where}; closest valid names: {', '.join(close) or 'none'} "
        "(see `python -m helpers models`, torchvision.models.list_models(), timm.list_models())"
    )


# --- building -------------------------------------------------------------------------------------------------


@dataclass
class BuiltModel:
    """A model built by name: ``weights`` says what was loaded (pretrained, random with why, a checkpoint, or
    ``meta``); ``input_shape`` the input (no batch axis) its first-layer verdict is read on; ``example`` a
    forward argument where a single tensor does not fit (optical flow: two images), else None."""

    model: nn.Module
    name: ModelName
    weights: str
    input_shape: tuple[int, ...]
    example: Any = None


def _spec(name: ModelName) -> registry.ModelSpec:
    if name.source == "registry":
        return registry.spec(name.name)
    task = dict(TORCHVISION_MODULES).get(name.task, "classification")
    return registry.ModelSpec(name.name, name.source, name.name, task)  # type: ignore[arg-type]


def input_shape_of(name: ModelName, model: nn.Module) -> tuple[int, ...]:
    """The input (no batch axis) a model of this name takes: timm's ``pretrained_cfg["input_size"]``, the
    packaged checkpoints' size, MNIST's 1 x 28 x 28, torchvision's ``image_size`` (ViT), 299 for Inception,
    :data:`VIDEO_INPUT` for video models, else 3 x 224 x 224."""
    from helpers.models import packaged_weights

    spec = _spec(name)
    cfg = getattr(model, "pretrained_cfg", None)
    if spec.source == "timm" and isinstance(cfg, Mapping) and "input_size" in cfg:
        return tuple(int(s) for s in cfg["input_size"])
    if spec.source == "package":
        size = packaged_weights.PACKAGED[spec.builder].input_size
        return (3, size, size)
    if spec.source == "book":
        return (1, 28, 28)
    if name.task == "video":
        return VIDEO_INPUT
    image_size: Any = getattr(model, "image_size", None)
    if isinstance(image_size, int):
        return (3, image_size, image_size)
    return (3, 299, 299) if "inception" in spec.builder else (3, 224, 224)


def build(
    name: str,
    weights: str = "auto",
    device: str | torch.device = "cpu",
    *,
    checkpoint: Path | str | None = None,
    seed: int | None = 0,
) -> BuiltModel:
    """Build ``name`` (module docstring) in eval mode on ``device`` (``"meta"``: shapes only, random weights).

    ``seed``: random initialisation under :func:`registry.init_seed` (the same seed, the same weights).

    ``checkpoint`` replaces the weights by a state dict (loaded strictly, on CPU, then moved to ``device``).
    Raises ``ValueError`` (one line) for an unknown name, a model that fails to build, or a bad checkpoint.
    """
    resolved = resolve(name)
    meta = str(device) == "meta"
    if meta and checkpoint is not None:
        raise ValueError("a checkpoint needs real weights: use --device cpu (or cuda), not meta")
    spec = _spec(resolved)
    try:
        if meta:
            with torch.device("meta"):
                loaded = registry.load_spec(spec, "random", "meta")
        else:
            weights_asked = "random" if checkpoint is not None else weights
            loaded = registry.load_spec(spec, weights_asked, "cpu" if checkpoint else device, seed=seed)  # type: ignore[arg-type]
    except (ValueError, registry.WeightsUnavailable):
        raise
    except Exception as err:  # a constructor failing is the model's problem: one line, not a traceback
        raise ValueError(f"{resolved} failed to build: {type(err).__name__}: {' '.join(str(err).split())}") from err
    if meta:
        label = "none (meta device: shapes only)"
    elif checkpoint is not None:
        load_checkpoint(loaded.model, Path(checkpoint), str(resolved))
        loaded.model.to(runtime.resolve_device(device) if isinstance(device, str) else device)
        label = f"checkpoint {checkpoint}"
    else:
        label = loaded.weights if loaded.is_pretrained else f"random ({loaded.detail})"
    shape = input_shape_of(resolved, loaded.model)
    example = None
    if resolved.task == "optical_flow":
        param = next(loaded.model.parameters())
        example = (torch.zeros(1, *shape, device=param.device), torch.zeros(1, *shape, device=param.device))
    return BuiltModel(loaded.model, resolved, label, shape, example)


# --- checkpoints ----------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (unwrapping ``state_dict``/``model`` and a ``module.`` prefix); ``ValueError``
    (one line) for a missing file, a file torch cannot read (garbage, truncated, not weights-only) or no state dict."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist (valid: a file written by torch.save(model.state_dict()))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip, EOF or runtime errors depending on the damage
        raise ValueError(f"checkpoint {path} is not a readable PyTorch state dict ({_first_line(err)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    return {str(k): v for k, v in state.items()}


def checkpoint_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """The first way ``state`` does not fit ``model`` (model order: a shape or a missing key first, then an
    unexpected key), with how many more; ``None`` when every key and shape agree."""
    expected = model.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key not in state:
            problems.append(f"key {key!r} is missing from the checkpoint (the model has {list(tensor.shape)})")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(
                f"key {key!r} is {list(state[key].shape)} in the checkpoint but {list(tensor.shape)} in the model"
            )
    problems += [f"key {key!r} in the checkpoint is not in the model" for key in state if key not in expected]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else "")


def load_checkpoint(model: nn.Module, path: Path, label: str = "") -> None:
    """Load the state dict at ``path`` into ``model`` strictly; ``ValueError`` (one line) when it does not fit."""
    state = read_state_dict(path)
    problem = checkpoint_mismatch(model, state)
    if problem is not None:
        raise ValueError(f"checkpoint {path} does not fit {label or type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=True)


# --- the audit of any model ------------------------------------------------------------------------------------


@dataclass
class AnyModelAudit:
    """Table 1's numbers of one model (:class:`ModelAudit`) and its :class:`FirstLayerVerdict`; ``source`` is
    registry, torchvision, timm or module (an ``nn.Module`` given directly)."""

    audit: audit_module.ModelAudit
    first_layer: FirstLayerVerdict
    source: str
    input_shape: tuple[int, ...]
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The audit's summary plus ``source``, ``input_shape`` and ``first_layer`` (JSON-ready)."""
        return {
            **self.audit.summary(),
            "source": self.source,
            "input_shape": list(self.input_shape),
            "first_layer": self.first_layer.to_json(),
            "total_seconds": round(self.seconds, 3),
        }


def audit_any(
    model_or_name: nn.Module | str,
    *,
    checkpoint: Path | str | None = None,
    weights: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    method: Method = "fast",
    conv_transpose: audit_module.ConvTransposeRule = "skip",
    input_shape: tuple[int, ...] | None = None,
    example: Any | None = None,
) -> AnyModelAudit:
    """Audit a model given by name (:func:`build`) or as an ``nn.Module``: Table 1's numbers under the rule
    (``dtype``, ``rtol``, ``method``, ``conv_transpose`` as :func:`audit.audit_model`) and the first-layer verdict
    at the same rank rule, on ``input_shape`` (default: the model's own, or 3 x 224 x 224 for a module).

    For a registry name without a checkpoint the numbers equal :func:`audit.audit_registry_model`'s. On ``meta``
    (``device="meta"`` or a module whose weights are on ``meta``) the audit is structural.
    """
    start = time.perf_counter()
    if isinstance(model_or_name, nn.Module):
        model, source, label = model_or_name, "module", "as given"
        name = type(model).__name__
        shape = input_shape or (3, 224, 224)
    else:
        built = build(model_or_name, weights, device, checkpoint=checkpoint)
        model, source, label, name = built.model, built.name.source, built.weights, built.name.name
        shape = input_shape or built.input_shape
        example = example if example is not None else built.example
    if any(p.is_meta for p in model.parameters()):
        result = audit_module.structural_audit(model, conv_transpose=conv_transpose)
        label = "none (meta device: shapes only)"
    else:
        result = audit_module.audit_model(
            model, dtype=dtype, rtol=rtol, device=device, method=method, conv_transpose=conv_transpose
        )
    result.model, result.weights = name, label
    verdict = first_layer_verdict(model, shape, example=example, dtype=dtype, rtol=rtol)
    return AnyModelAudit(result, verdict, source, tuple(shape), time.perf_counter() - start)
