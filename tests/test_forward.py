"""Running a model (helpers.models.forward): device, batches, the output tensor, the top-k classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.models import forward


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x * 2, "aux": x}


def test_output_tensor_unwraps_the_usual_containers() -> None:
    t = torch.ones(2)
    assert forward.output_tensor(t) is t
    assert forward.output_tensor({"aux": t * 3, "out": t}) is t
    assert forward.output_tensor((t, None)) is t
    with pytest.raises(TypeError, match="cannot find the output tensor"):
        forward.output_tensor("logits")


def test_batched_equals_one_pass() -> None:
    model = nn.Linear(4, 3).eval()
    x = torch.randn(10, 4)
    with torch.no_grad():
        assert torch.allclose(forward.batched(model, x, batch=3), model(x))


def test_top_k_is_sorted_softmax_and_labels_name_classes() -> None:
    model = nn.Linear(4, 6).eval()
    x = torch.randn(5, 4)
    probs, idx = forward.top_k(model, x, k=3)
    assert probs.shape == idx.shape == (5, 3) and probs.dtype == torch.float64
    with torch.no_grad():
        reference = model(x).double().softmax(-1)
    assert torch.equal(idx[:, 0], reference.argmax(-1)) and bool((probs[:, :-1] >= probs[:, 1:]).all())
    labels = forward.top_k_labels(probs, idx, ["a", "b", "c", "d"])
    assert labels[0][0] == (
        ["a", "b", "c", "d"][int(idx[0, 0])] if idx[0, 0] < 4 else str(int(idx[0, 0])),
        float(probs[0, 0]),
    )
    assert all(name == str(int(i)) for row, irow in zip(labels, idx) for (name, _), i in zip(row, irow) if i >= 4)


def test_device_of() -> None:
    assert forward.device_of(nn.Linear(2, 2)) == torch.device("cpu")
