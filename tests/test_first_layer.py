"""The first-layer verdict on hand-built layers whose answer is known by hand (helpers.experiments.first_layer)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from helpers.experiments import first_layer as fl


def conv_model(*args: Any, **kwargs: Any) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(*args, **kwargs), nn.ReLU())


def conv_weight(model: nn.Sequential) -> torch.Tensor:
    conv = model[0]
    assert isinstance(conv, nn.Conv2d)
    return conv.weight


def test_kernel_smaller_than_stride_never_reads_some_pixels() -> None:
    # 1x1 conv, stride 2, on 8x8: 16 of 64 pixels read, 48 unread in each of 3 channels
    v = fl.first_layer_verdict(conv_model(3, 64, 1, 2), (3, 8, 8))
    assert (v.patch_rows, v.patch_cols, v.patch_nullity_structural, v.patch_nullity) == (64, 3, 0, 0)
    assert not v.patch_rule  # the paper's rule sees nothing
    assert v.unread_pixels == 3 * 48 and v.operator_forced and v.operator_kernel_dim == 144
    assert v.answer == fl.PATCH_EXISTS


def test_patch_embedding_with_more_patch_values_than_outputs() -> None:
    # ViT-style: kernel == stride 4, C*k^2 = 48 > 8 outputs: 40 per patch, 4 patches on 8x8
    v = fl.first_layer_verdict(conv_model(3, 8, 4, 4), (3, 8, 8))
    assert (v.patch_nullity_structural, v.patch_nullity, v.polyphase_count) == (40, 40, 48)
    assert not v.overlapping and v.operator_kernel_dim == v.operator_kernel_dim_structural == 160
    assert v.operator_forced and v.answer == fl.PATCH_EXISTS and "kernel == stride" in v.operator_structural


def test_patch_embedding_with_enough_outputs_is_injective() -> None:
    v = fl.first_layer_verdict(conv_model(3, 64, 4, 4), (3, 8, 8))
    assert (v.patch_nullity_structural, v.patch_nullity, v.operator_kernel_dim) == (0, 0, 0)
    assert not v.operator_forced and v.answer == fl.DO_NOT_EXIST and v.operator_rank_lost is False


@pytest.mark.parametrize(("out", "forced"), [(8, True), (16, False)])
def test_stride_two_three_by_three_polyphase(out: int, forced: bool) -> None:
    # 3 channels x 2 x 2 phases = 12 polyphase components against 8 or 16 outputs per position
    v = fl.first_layer_verdict(conv_model(3, out, 3, 2, 1), (3, 16, 16))
    assert v.polyphase_count == 12 and v.overlapping and v.unread_pixels == 0
    assert v.patch_nullity_structural == 27 - out and v.patch_rule  # the paper's rule says "exist" for both
    assert v.operator_forced is forced
    assert v.operator_dimension_count == 3 * 256 - out * 64
    assert v.answer == (fl.PATCH_EXISTS if forced else fl.DO_NOT_EXIST)
    if not forced:  # random weights: the circular operator is measured, and keeps full rank
        assert v.operator_rank_lost is False and "circular operator" in v.operator_measured


def test_a_border_the_last_window_misses_forces_a_kernel() -> None:
    # 3x3 stride 2 without padding on 8x8: windows start at 0, 2, 4 and end at 6: row and column 7 unread
    v = fl.first_layer_verdict(conv_model(1, 4, 3, 2, 0), (1, 8, 8))
    assert v.polyphase_count == 4 and v.unread_pixels == 15 and v.operator_forced and v.answer == fl.PATCH_EXISTS


def test_depthwise_block_nullity_differs_from_stacked() -> None:
    # 4 groups of 1 channel: stacked 4 x 9 (nullity 5); block-diagonal 4 x 36 of four 1 x 9 blocks (nullity 32)
    v = fl.first_layer_verdict(conv_model(4, 4, 3, 1, 1, groups=4), (4, 8, 8))
    assert (v.patch_rows, v.patch_cols, v.patch_nullity_structural, v.patch_nullity) == (4, 9, 5, 5)
    assert (v.block_nullity_structural, v.block_nullity) == (32, 32)
    assert v.polyphase_count == 1 and v.answer == fl.DO_NOT_EXIST


def test_linear_first_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))
    v = fl.first_layer_verdict(model, (3, 2, 2))
    assert (v.layer, v.module_type, v.kernel, v.stride) == ("1", "Linear", (), ())
    assert (v.patch_nullity_structural, v.patch_nullity, v.operator_kernel_dim) == (7, 7, 7)
    assert v.answer == fl.PATCH_EXISTS
    wide = fl.first_layer_verdict(nn.Sequential(nn.Flatten(), nn.Linear(4, 6)), (1, 2, 2))
    assert wide.patch_nullity == 0 and wide.answer == fl.DO_NOT_EXIST


class HeadFirst(nn.Module):
    """Registers the head before the stem, and runs a linear layer on a constant table before the input."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.table_mlp = nn.Linear(2, 2)
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.register_buffer("table", torch.zeros(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table_mlp(self.table).sum()  # weight layer on a constant: not the first layer the input meets
        return self.head(self.stem(x).mean((2, 3))) + bias


class Broken(HeadFirst):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no forward here")


def test_forward_order_not_registration_order() -> None:
    v = fl.first_layer_verdict(HeadFirst(), (3, 8, 8))
    assert (v.layer, v.order, v.module_type, v.layer_input_shape) == ("stem", "forward", "Conv2d", (1, 3, 8, 8))
    fallback = fl.first_layer_verdict(Broken(), (3, 8, 8))
    assert (fallback.layer, fallback.order) == ("head", "registration")
    assert "RuntimeError: no forward here" in fallback.order_detail and fallback.notes


def test_hooks_and_requires_grad_are_restored() -> None:
    model = HeadFirst().train()
    model.head.weight.requires_grad_(False)
    fl.first_layer_verdict(model, (3, 8, 8))
    assert model.training and not model.head.weight.requires_grad and model.stem.weight.requires_grad
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_rank_lost_in_training() -> None:
    # structurally injective patch embedding (48 <= 64) whose weights have rank 40: 8 null directions per patch
    model = conv_model(3, 64, 4, 4)
    with torch.no_grad():
        w = conv_weight(model).reshape(64, 48)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        s[40:] = 0
        conv_weight(model).copy_((u * s @ vh).reshape(64, 3, 4, 4))
    v = fl.first_layer_verdict(model, (3, 8, 8), dtype=torch.float32)
    assert (v.patch_nullity_structural, v.patch_nullity, v.operator_kernel_dim_structural) == (0, 8, 0)
    assert v.operator_kernel_dim == 32 and v.operator_rank_lost and v.answer == fl.ONLY_WITH_RANK_LOSS


def test_rank_lost_in_an_overlapping_conv() -> None:
    # 3 -> 16, 3x3 stride 2 is injective for generic weights; a dead input channel makes it singular
    model = conv_model(3, 16, 3, 2, 1)
    with torch.no_grad():
        conv_weight(model)[:, 0] = 0
    v = fl.first_layer_verdict(model, (3, 16, 16))
    assert not v.operator_forced and v.operator_rank_lost and v.answer == fl.ONLY_WITH_RANK_LOSS


def test_meta_model_gives_structure_only() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU())
    v = fl.first_layer_verdict(model, (3, 8, 8))
    assert v.patch_nullity is None and v.block_nullity is None and v.operator_rank_lost is None and not v.measured
    real = fl.first_layer_verdict(conv_model(3, 8, 4, 4), (3, 8, 8))
    assert (v.layer, v.order, v.patch_nullity_structural, v.operator_kernel_dim, v.answer) == (
        real.layer,
        real.order,
        real.patch_nullity_structural,
        real.operator_kernel_dim,
        real.answer,
    )
    assert json.loads(json.dumps(v.to_json()))["kernel"] == [4, 4]


def test_conv1d_and_conv3d() -> None:
    v1 = fl.first_layer_verdict(nn.Sequential(nn.Conv1d(2, 3, 4, 4)), (2, 16))
    assert v1.kernel == (4,) and v1.patch_nullity_structural == 5 and v1.operator_kernel_dim == 4 * 5
    with torch.device("meta"):
        video = nn.Sequential(nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3)))
    v3 = fl.first_layer_verdict(video, (3, 4, 16, 16))
    assert v3.kernel == (3, 7, 7) and v3.polyphase_count == 12 and v3.answer == fl.DO_NOT_EXIST


def test_tf_same_padding_is_asymmetric() -> None:
    from timm.layers import Conv2dSame

    with torch.device("meta"):
        model = nn.Sequential(Conv2dSame(3, 8, 3, 2))
    v = fl.first_layer_verdict(model, (3, 224, 224))
    assert v.padding == (0, 1, 0, 1) and v.unread_pixels == 0


def test_a_model_without_weight_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="no weight layer"):
        fl.first_layer_verdict(nn.Sequential(nn.ReLU()), (3, 8, 8))
