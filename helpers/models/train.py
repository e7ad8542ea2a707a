"""Train the book's MNIST models, cached by configuration hash.

A configuration (architecture, its arguments, epochs, optimiser settings, seed, training-set size) names a
trained model: training it twice gives the same file, so a rebuild loads it instead of retraining.

A cache entry is two files written atomically, the weights (``<key>.pt``) first and the metadata (``<key>.json``,
with the SHA-256 of the weights, in ``runtime.write_json_cache``'s hash envelope) last: weights without metadata
are an unfinished entry. Reading verifies the entry (both hashes, the weights load into the architecture, and
the stored accuracy is re-measured on ``HOLDOUT_SIZE`` held-out test digits); an entry that fails is discarded
with one line and the model retrained.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helpers import runtime, stats
from helpers.data import mnist_data
from helpers.models import mnist_models
from helpers.progress import progress_bar


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained MNIST model (Adam, cross-entropy, pixels in [0, 1])."""

    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    train_size: int | None = None  # None: all 60,000 training digits

    def key(self) -> str:
        """A short content hash of the configuration (the cache file name)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=list)
        return f"{self.kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def build(self) -> nn.Sequential:
        return mnist_models.build(self.kind, **self.kwargs)


#: The configurations behind the registry's book-trained models (see ``models.REGISTRY``).
CANONICAL: dict[str, TrainConfig] = {
    "mnist_mlp_2x256": TrainConfig("mlp", {"hidden": (256, 256)}, epochs=5),
    "lenet5": TrainConfig("lenet5", {}, epochs=3),
}


#: MNIST models whose first layer has a non-trivial kernel (the null-space chapters' offline track).
#: W1 shapes: mlp 256 x 784; cnn 6 x 16 (4x4 kernel, stride 3: overlapping windows, and 6 channels < 3*3 pixels
#: per stride cell, so the conv as an operator on 28x28 images has a large exact null space: 784 - 6*9*9 = 298
#: dimensions at least); patch 16 x 49 (7x7, stride 7: non-overlapping, nullity 33 per patch).
MNIST_ZOO: dict[str, TrainConfig] = {
    "mlp": TrainConfig("mlp", {"hidden": (256, 128)}, epochs=2),
    "cnn": TrainConfig("cnn", {"channels": 6, "kernel": 4, "stride": 3}, epochs=2),
    "patch": TrainConfig("patch", {"patch_size": 7, "embed": 16}, epochs=2),
}


#: Quick builds (``--quick``) train every zoo model on this many training digits, for one epoch.
QUICK_TRAIN_SIZE = 6000


def zoo(quick: bool) -> dict[str, TrainConfig]:
    """The ``MNIST_ZOO`` configurations, in its order (mlp, cnn, patch).

    quick: each trained on the first ``QUICK_TRAIN_SIZE`` training digits for 1 epoch (a different cache
    entry, lower accuracy); otherwise the full configurations, unchanged.
    """
    return {k: (replace(c, train_size=QUICK_TRAIN_SIZE, epochs=1) if quick else c) for k, c in MNIST_ZOO.items()}


@dataclass
class TrainedModel:
    """A trained model with its configuration, test accuracy (0..1), training time (s) and cache path."""

    model: nn.Sequential
    config: TrainConfig
    test_accuracy: float
    train_seconds: float
    path: Path
    from_cache: bool


def _cache_paths(config: TrainConfig) -> tuple[Path, Path]:
    folder = runtime.cache_dir() / "mnist-models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{config.key()}.pt", folder / f"{config.key()}.json"


def cached_checkpoint(registry_name: str) -> Path | None:
    """The cached state dict of a registry model the book trains, or None if not trained yet (or its cache entry
    failed verification and was discarded, see :func:`load_cached`)."""
    config = CANONICAL.get(registry_name)
    if config is None:
        return None
    cached = load_cached(config)
    return cached.path if cached is not None else None


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 2000) -> float:
    """Top-1 accuracy (0..1) of ``model`` on (N, 1, 28, 28) images, evaluated in batches on its device."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(images[start : start + batch].to(device))
        correct += (logits.argmax(1).cpu() == labels[start : start + batch]).sum().item()
    return correct / len(images)


#: Test digits on which a cached model's stored accuracy is re-measured when it is read (a fixed random subset
#: of the 10,000 test digits, none of them seen in training).
HOLDOUT_SIZE = 500

#: z of the Wilson interval around the re-measured accuracy that must contain the stored one. 4 (not 1.96): a
#: sound entry is then discarded with probability below 1e-4 (less still, as the slice is drawn from the very
#: test set the stored accuracy was measured on), while zeroed weights fail (stored 97.55%, measured 9.8% =
#: 49/500, interval [5.7%, 16.4%]), as does a stored 97% that measures 93.8% (469/500) or less.
HOLDOUT_Z = 4.0


def holdout_interval(correct: int, n: int = HOLDOUT_SIZE, z: float = HOLDOUT_Z) -> tuple[float, float]:
    """Wilson score interval (accuracy 0..1) of ``correct`` of ``n`` held-out digits at ``z`` standard errors."""
    return stats.wilson_interval(correct, n, z)


def holdout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The ``HOLDOUT_SIZE`` test digits (N, 1, 28, 28) and labels (N,) used to re-measure cached models."""
    images, labels = mnist_data.load(train=False)
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:HOLDOUT_SIZE]
    return images[index], labels[index]


class _Invalid(Exception):
    """A cache entry failed verification; the message says how (one line)."""


def _legacy_meta(meta_path: Path) -> dict[str, Any] | None:
    """The metadata of an entry written before the hash envelope (plain JSON, no weights hash), or None."""
    try:
        data = json.loads(meta_path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "payload" not in data and "test_accuracy" in data else None


def _verified(config: TrainConfig, weights_path: Path, meta: dict[str, Any]) -> tuple[nn.Sequential, str]:
    """The cached model of ``config`` (CPU, eval) and the SHA-256 of its weights file, or raise ``_Invalid``."""
    if meta.get("config") != json.loads(json.dumps(asdict(config), default=list)):
        raise _Invalid("its metadata names another configuration")
    stored = meta.get("test_accuracy")
    if (
        not isinstance(stored, float | int)
        or not 0 <= stored <= 1
        or not isinstance(meta.get("train_seconds"), float | int)
    ):
        raise _Invalid("its metadata lacks a test accuracy in [0, 1] or a training time")
    try:
        data = weights_path.read_bytes()
    except OSError as err:  # e.g. removed meanwhile by another process
        raise _Invalid(f"its weights file cannot be read ({type(err).__name__})") from None
    if "weights_sha256" in meta and hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise _Invalid("weights do not match the hash in their metadata")
    model = config.build()
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as err:  # torch raises pickle, zip, EOF or key/shape errors depending on the damage
        raise _Invalid(f"weights do not load into {config.kind} ({type(err).__name__})") from None
    images, labels = holdout_digits()
    correct = round(accuracy(model, images, labels) * len(images))
    low, high = holdout_interval(correct, len(images))
    if not low <= stored <= high:
        raise _Invalid(
            f"stored accuracy {stored:.2%} but {correct / len(images):.2%} measured on {len(images)} held-out test "
            f"digits (outside [{low:.2%}, {high:.2%}], Wilson interval at z={HOLDOUT_Z:g})"
        )
    return model.eval(), hashlib.sha256(data).hexdigest()


def load_cached(config: TrainConfig) -> TrainedModel | None:
    """The verified cache entry of ``config`` (model on CPU, eval mode), or None.

    None when the entry is absent or unfinished (weights without metadata), or when it fails verification: then
    it is discarded with one line on stderr (``runtime.discard_cache``). Verifying needs the MNIST test set
    (``mnist_data.load`` raises ``FileNotFoundError``/``ValueError`` when it is missing or broken).
    """
    weights_path, meta_path = _cache_paths(config)
    if not meta_path.exists():  # written last: without it the entry is unfinished (or absent)
        return None
    legacy = _legacy_meta(meta_path)
    try:
        meta = legacy if legacy is not None else runtime.read_json_cache(meta_path)  # None: discarded with a line
    except OSError:  # removed meanwhile by another process: an absent entry
        return None
    if meta is None:
        weights_path.unlink(missing_ok=True)
        return None
    try:
        if not weights_path.exists():
            raise _Invalid("its weights file is missing")
        model, sha256 = _verified(config, weights_path, meta)
    except _Invalid as err:
        runtime.discard_cache(weights_path, str(err))
        meta_path.unlink(missing_ok=True)
        return None
    if legacy is not None:  # upgrade the entry to the hashed metadata, now that it passed the checks
        legacy["weights_sha256"] = sha256
        runtime.write_cache_or_warn(meta_path, lambda: runtime.write_json_cache(meta_path, legacy))
    return TrainedModel(model, config, meta["test_accuracy"], meta["train_seconds"], weights_path, from_cache=True)


def store(config: TrainConfig, model: nn.Module, test_accuracy: float, train_seconds: float) -> bool:
    """Write the cache entry of ``config`` (weights, then hashed metadata, each atomically); False if it failed.

    ``test_accuracy`` (0..1) is checked against ``HOLDOUT_SIZE`` held-out digits whenever the entry is read."""
    weights_path, meta_path = _cache_paths(config)
    buffer = io.BytesIO()  # serialised in memory: a full disk then fails as an OSError in write_bytes
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    if not runtime.write_cache_or_warn(
        weights_path, lambda: runtime.write_atomically(weights_path, lambda t: t.write_bytes(data))
    ):
        return False
    meta = {
        "config": asdict(config),
        "test_accuracy": test_accuracy,
        "train_seconds": train_seconds,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
    }
    payload = json.loads(json.dumps(meta, default=list))
    return runtime.write_cache_or_warn(meta_path, lambda: runtime.write_json_cache(meta_path, payload))


def train_mnist(config: TrainConfig, device: str | torch.device = "cpu", progress: bool = True) -> TrainedModel:
    """Train ``config`` on MNIST (or load its verified cache entry) and return it in eval mode on ``device``.

    A cache entry that fails verification is discarded with one line and the model retrained; a cache write that
    fails (full disk) is reported in one line and the trained model returned uncached.
    """
    device = runtime.resolve_device(device) if isinstance(device, str) else device
    cached = load_cached(config)
    if cached is not None:
        cached.model.to(device)
        return cached

    generator = runtime.seed_everything(config.seed)
    model = config.build().to(device)  # built after seeding so the initialisation is reproducible
    images, labels = mnist_data.load(train=True)
    if config.train_size is not None:
        images, labels = images[: config.train_size], labels[: config.train_size]
    images, labels = images.to(device), labels.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    steps = config.epochs * ((len(images) + config.batch_size - 1) // config.batch_size)
    bar = progress_bar(total=steps, desc=f"train {config.kind} {config.kwargs}", disable=not progress, leave=False)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(images), generator=generator).to(device)
        for batch in order.split(config.batch_size):
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(images[batch]), labels[batch]).backward()
            optimiser.step()
            bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    test_images, test_labels = mnist_data.load(train=False)
    acc = accuracy(model, test_images, test_labels)
    store(config, model, acc, seconds)
    return TrainedModel(model.eval(), config, acc, seconds, _cache_paths(config)[0], from_cache=False)


def train_zoo(
    quick: bool,
    device: str | torch.device = "cpu",
    *,
    kinds: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, TrainedModel]:
    """Train (or load from the cache) the ``zoo(quick)`` models named in ``kinds`` (default: all), in that order.

    Returns {kind: TrainedModel} on ``device``, in eval mode. Raises KeyError for a kind not in ``MNIST_ZOO``.
    """
    configs = zoo(quick)
    kinds = list(configs) if kinds is None else list(kinds)
    unknown = [k for k in kinds if k not in configs]
    if unknown:
        raise KeyError(f"unknown zoo model(s) {', '.join(unknown)}; valid: {', '.join(configs)}")
    return {k: train_mnist(configs[k], device, progress=progress) for k in kinds}
