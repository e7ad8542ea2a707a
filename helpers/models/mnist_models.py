"""Small MNIST classifiers the book trains itself (inputs: (B, 1, 28, 28) float pixels in [0, 1]).

Their first layers are chosen so that the null space of the first weight is easy to control:
an MLP (first weight hidden x 784), a CNN (first conv out x (1*k*k)), and a patch-embedding model
(a stride-p conv with p*p inputs per patch and ``embed`` outputs). LeNet-5 and Li et al.'s 2x256 MLP too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

KINDS = ("mlp", "cnn", "patch", "lenet5")


def mlp(hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    """784 -> hidden[0] -> ... -> 10 with ReLU; the first weight is hidden[0] x 784."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def cnn(channels: int = 8, kernel: int = 5, stride: int = 1, hidden: int = 64) -> nn.Sequential:
    """conv(1 -> channels, kernel, stride) -> ReLU -> conv(channels -> 2*channels, 3, 2) -> ReLU -> pool -> fc."""
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel, stride=stride),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def patch(patch_size: int = 7, embed: int = 16, hidden: int = 128) -> nn.Sequential:
    """A patch embedding (conv with kernel = stride = patch_size, ``embed`` channels), then an MLP head.

    The patches do not overlap, so a kernel vector of the embedding weight added to *any* patch is exactly
    invisible to the model. The first weight is embed x patch_size**2.
    """
    if 28 % patch_size:
        raise ValueError(f"patch_size must divide 28, got {patch_size}; valid: 1, 2, 4, 7, 14, 28")
    tokens = (28 // patch_size) ** 2
    return nn.Sequential(
        nn.Conv2d(1, embed, patch_size, stride=patch_size),
        nn.Flatten(),
        nn.ReLU(),
        nn.Linear(embed * tokens, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def lenet5() -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, padded to take 28x28 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


_FACTORIES: dict[str, Callable[..., nn.Sequential]] = {"mlp": mlp, "cnn": cnn, "patch": patch, "lenet5": lenet5}


def build(kind: str, **kwargs: Any) -> nn.Sequential:
    """Build an MNIST model of ``kind`` (one of ``KINDS``) with its keyword arguments."""
    try:
        factory = _FACTORIES[kind]
    except KeyError:
        raise KeyError(f"unknown MNIST model kind {kind!r}; valid: {', '.join(KINDS)}") from None
    if "hidden" in kwargs and isinstance(kwargs["hidden"], list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return factory(**kwargs)
