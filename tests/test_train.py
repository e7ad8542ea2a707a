"""helpers.models.train: the training cache and the MNIST zoo of the null-space chapters (quick and full)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers.models import train

from .conftest import needs_mnist


def test_zoo_full_is_the_canonical_configurations() -> None:
    assert train.zoo(quick=False) == train.MNIST_ZOO
    assert list(train.zoo(quick=False)) == ["mlp", "cnn", "patch"]


def test_zoo_quick_trains_fewer_digits_for_one_epoch() -> None:
    quick = train.zoo(quick=True)
    assert list(quick) == list(train.MNIST_ZOO)
    for kind, config in quick.items():
        full = train.MNIST_ZOO[kind]
        assert config == replace(full, train_size=train.QUICK_TRAIN_SIZE, epochs=1)
        assert config.kwargs == full.kwargs and config.key() != full.key()  # its own cache entry


def test_train_zoo_trains_the_named_kinds_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_train(config: train.TrainConfig, device: str, progress: bool = True) -> tuple:
        calls.append((config, device, progress))
        return (config.kind, device)

    monkeypatch.setattr(train, "train_mnist", fake_train)
    out = train.train_zoo(True, "cpu", kinds=("patch", "mlp"), progress=False)
    assert list(out) == ["patch", "mlp"] and out["patch"] == ("patch", "cpu")
    assert [c[0] for c in calls] == [train.zoo(True)["patch"], train.zoo(True)["mlp"]]
    assert all(c[2] is False for c in calls)
    assert list(train.train_zoo(False)) == ["mlp", "cnn", "patch"]
    with pytest.raises(KeyError, match="unknown zoo model.*lenet5.*valid: mlp, cnn, patch"):
        train.train_zoo(False, kinds=("lenet5",))


@needs_mnist
def test_training_is_cached_by_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path))
    config = train.TrainConfig("mlp", {"hidden": (32,)}, epochs=1, train_size=2000)
    first = train.train_mnist(config, "cpu", progress=False)
    second = train.train_mnist(config, "cpu", progress=False)
    assert not first.from_cache and second.from_cache
    assert first.test_accuracy == second.test_accuracy > 0.5
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert train.TrainConfig("mlp", {"hidden": (33,)}).key() != config.key()


def test_unknown_mnist_kind() -> None:
    with pytest.raises(KeyError, match="valid: mlp, cnn, patch, lenet5"):
        train.TrainConfig("resnet", {}).build()
