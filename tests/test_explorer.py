"""The interactive explorer: moving its controls redraws what it promises (tested without a Jupyter kernel: the
widgets' callbacks run, and what the explorer displays goes to stdout)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
from torch import nn

from helpers.experiments import collisions, explorer
from helpers.linalg import kernels

NAMES = [f"class {i}" for i in range(5)]


def _controls(widget: Any) -> dict[str, Any]:
    """The explorer's sliders by description (they sit in nested boxes)."""
    found, stack = {}, [widget]
    while stack:
        w = stack.pop()
        stack.extend(getattr(w, "children", ()))
        if getattr(w, "description", ""):
            found[w.description] = w
    return found


class Display:
    """What the explorer shows: the residuals line, the top-5 of both images, and the colliding image drawn."""

    def __init__(self, capsys: pytest.CaptureFixture[str], drawn: list[torch.Tensor]) -> None:
        self.capsys, self.drawn = capsys, drawn

    def read(self) -> tuple[float, float, list[str], list[str], torch.Tensor]:
        """(first-layer rel change, output rel change, top-5 original, top-5 colliding, x_hat) of the last redraw."""
        text = self.capsys.readouterr().out
        first, output = re.findall(r"first-layer rel change ([-+.\de]+), output rel change ([-+.\de]+)", text)[-1]
        view = text[text.rindex("first-layer rel change") :]
        cells = re.findall(r"class \d \([.\de-]+\)", view)  # 'class (probability)', row by row
        assert len(cells) == 10, view
        return float(first), float(output), cells[0::2], cells[1::2], self.drawn[-1]


@pytest.fixture
def setting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """A patch-embedding classifier (4x4 patches, 8 features of 48 pixels: nullity 40), one image, and a spy
    on the images the explorer builds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    basis = kernels.kernel_basis(model[0])
    x = torch.rand(1, 3, 16, 16)
    drawn: list[torch.Tensor] = []
    search = collisions.null_space_search

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        drawn.append(search(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(collisions, "null_space_search", spy)
    return model, basis, x, Display(capsys, drawn)


def test_moving_the_controls_changes_the_image_but_not_the_prediction(setting) -> None:
    model, basis, x, display = setting
    assert basis.nullity == 40
    controls = _controls(explorer.interactive(model, x, model[0], basis, NAMES))
    assert set(controls) >= {"beta", "phi index", "tile rows", "tile cols"}
    first, output, original, colliding, x_hat = display.read()  # the first view: beta 2, phi 0, every tile
    p2 = x_hat - x
    assert p2.abs().max() > 0.05 and first < 1e-5 and output < 1e-5 and original == colliding

    controls["beta"].value = -6.0
    first, output, original_now, colliding, x_hat = display.read()
    assert torch.allclose(x_hat - x, -3 * p2, atol=1e-5)  # the perturbation scales with beta
    assert first < 1e-5 and output < 1e-5 and colliding == original_now == original

    controls["phi index"].value = 7
    first, output, _, colliding, x_hat = display.read()
    p7 = (x_hat - x).flatten()
    cosine = float(p7 @ (-3 * p2).flatten() / (p7.norm() * 3 * p2.norm()))
    assert abs(cosine) < 1e-4  # another orthonormal kernel vector: a different, orthogonal perturbation
    assert first < 1e-5 and output < 1e-5 and colliding == original

    controls["tile rows"].value = (1, 2)  # only the tile in row 1, column 2: pixels 4:8, 8:12
    controls["tile cols"].value = (2, 3)
    first, output, _, colliding, x_hat = display.read()
    changed = (x_hat - x).abs().amax(dim=(0, 1)) > 0
    assert changed[4:8, 8:12].all() and changed.sum() == 16
    assert first < 1e-5 and output < 1e-5 and colliding == original


def test_the_displayed_residual_is_measured_not_assumed(setting) -> None:
    # the same explorer on directions that are NOT in the kernel (rows of W1) must show the collision break
    model, basis, x, display = setting
    rows = model[0].weight.detach().double().flatten(1)
    not_null = dataclasses.replace(basis, vectors=(rows / rows.norm(dim=1, keepdim=True)).reshape(8, 3, 4, 4))
    controls = _controls(explorer.interactive(model, x, model[0], not_null, NAMES))
    first, output, original, colliding, _ = display.read()
    assert first > 0.1 and output > 1e-3
    controls["beta"].value = 20.0
    first_large, output_large, _, colliding_large, _ = display.read()
    assert first_large > first and colliding_large != colliding
    controls["beta"].value = 0.0  # no perturbation: an exact copy
    first, output, original, colliding, _ = display.read()
    assert first == 0.0 and output == 0.0 and colliding == original
