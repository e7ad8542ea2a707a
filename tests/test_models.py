"""The model registry: every name builds, the offline fallback is fast and visible, errors are clear."""

from __future__ import annotations

import time

import pytest
import torch

from helpers import runtime
from helpers.models import registry

from .conftest import needs_mnist


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """No network, and empty torch/HF caches in a scratch folder."""
    monkeypatch.setenv("COLLISIONS_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path / "cache"))
    runtime.network_available.cache_clear()
    yield tmp_path
    runtime.network_available.cache_clear()


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_every_registry_model_builds_with_random_weights(name: str) -> None:
    loaded = registry.load(name, "random")
    assert loaded.weights == "random" and not loaded.is_pretrained
    assert sum(p.numel() for p in loaded.model.parameters()) > 0
    assert not loaded.model.training
    assert "RANDOM" in loaded.caption()


def test_table1_has_19_rows() -> None:
    from helpers.data import paper

    assert set(registry.TABLE1_ROWS) == set(paper.get("ozbulak", "table1", "rows"))
    assert len(registry.TABLE1_ROWS) == 19


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="unknown model 'resnet51'.*resnet50"):
        registry.load("resnet51")


def test_unknown_weights_is_rejected() -> None:
    with pytest.raises(ValueError, match="valid: auto, pretrained, random"):
        registry.load("squeezenet1_1", "imagenet")  # type: ignore[arg-type]


def test_auto_falls_back_fast_and_says_why(offline) -> None:
    start = time.perf_counter()
    tv = registry.load("squeezenet1_1", "auto")
    tm = registry.load("deit_tiny_patch16_224", "auto")
    assert time.perf_counter() - start < 20, "the fallback must not wait for network retries"
    for loaded in (tv, tm):
        assert loaded.weights == "random"
        assert loaded.detail and "RANDOM" in loaded.caption()


def test_pretrained_raises_instead_of_falling_back(offline) -> None:
    with pytest.raises(registry.WeightsUnavailable, match="squeezenet1_1"):
        registry.load("squeezenet1_1", "pretrained")
    with pytest.raises(registry.WeightsUnavailable, match="deit_tiny"):
        registry.load("deit_tiny_patch16_224", "pretrained")


def test_pretrained_path_loads_a_cached_checkpoint_without_network(offline) -> None:
    """A checkpoint in the torch hub cache is what torchvision loads: proves the pretrained path offline."""
    import torchvision

    reference = torchvision.models.squeezenet1_1(weights=None)
    enum = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    checkpoint = registry._torchvision_checkpoint(enum)
    checkpoint.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoint)
    loaded = registry.load("squeezenet1_1", "pretrained")
    assert loaded.is_pretrained and str(checkpoint) in loaded.detail
    for (name, a), b in zip(reference.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.class_names[:1] == ["tench"] and loaded.transform is not None


@needs_mnist
def test_book_model_uses_the_training_cache(offline) -> None:
    from helpers.models import train

    assert registry.load("lenet5", "auto").weights == "random"
    config = train.CANONICAL["lenet5"]
    path, _ = train._cache_paths(config)
    model = config.build()
    torch.save(model.state_dict(), path)  # weights without their verified metadata: not trusted
    assert registry.load("lenet5", "auto").weights == "random"
    assert train.store(config, model, train.accuracy(model, *train.holdout_digits()), 0.0)
    assert registry.load("lenet5", "pretrained").is_pretrained


def test_resolve_device() -> None:
    assert runtime.resolve_device("cpu").type == "cpu"
    assert runtime.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        runtime.resolve_device("gpu0")
