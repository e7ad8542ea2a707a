"""Train the book's MNIST models, cached by configuration hash.

A configuration (architecture, its arguments, epochs, optimiser settings, seed, training-set size) names a
trained model: training it twice gives the same file, so a rebuild loads it instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helpers import runtime
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
    """The cached state dict of a registry model the book trains, or None if not trained yet."""
    config = CANONICAL.get(registry_name)
    if config is None:
        return None
    weights, _ = _cache_paths(config)
    return weights if weights.exists() else None


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


def train_mnist(config: TrainConfig, device: str | torch.device = "cpu", progress: bool = True) -> TrainedModel:
    """Train ``config`` on MNIST (or load it from the cache) and return it in eval mode on ``device``."""
    device = runtime.resolve_device(device) if isinstance(device, str) else device
    weights_path, meta_path = _cache_paths(config)
    model = config.build()
    if weights_path.exists() and meta_path.exists():
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        meta = json.loads(meta_path.read_text())
        return TrainedModel(
            model.to(device).eval(), config, meta["test_accuracy"], meta["train_seconds"], weights_path, from_cache=True
        )

    generator = runtime.seed_everything(config.seed)
    model = config.build().to(device)  # rebuilt after seeding so the initialisation is reproducible
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
    # weights first, metadata last: a cache entry is complete only when both files exist
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    runtime.write_atomically(weights_path, lambda tmp: torch.save(state, tmp))
    meta = {"config": asdict(config), "test_accuracy": acc, "train_seconds": seconds}
    runtime.write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, default=list, indent=1)))
    return TrainedModel(model.eval(), config, acc, seconds, weights_path, from_cache=False)


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
