"""The interactive explorer builds its widgets and its first view on a small patch-embedding model."""

from __future__ import annotations

import torch
from torch import nn

from helpers.experiments import explorer
from helpers.linalg import kernels


def test_interactive_explorer_builds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    embed = model[0]
    basis = kernels.kernel_basis(embed)  # 8 x 48: nullity 40
    x = torch.rand(1, 3, 16, 16)
    widget = explorer.interactive(model, x, embed, basis, [f"class {i}" for i in range(5)])
    assert len(widget.children) >= 2
