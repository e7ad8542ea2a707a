"""Audit any model by name or as a module (helpers.models.any_model): names outside the registry, the same numbers
as the registry path for names inside it, closest-name suggestions, checkpoints, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli
from helpers.experiments import audit
from helpers.experiments import first_layer as fl
from helpers.models import any_model
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLLISIONS_OFFLINE", "1")


def test_a_torchvision_name_outside_the_registry() -> None:
    result = any_model.audit_any("mnasnet0_5", weights="random")
    assert result.source == "torchvision" and result.audit.model == "mnasnet0_5"
    assert result.audit.weights.startswith("random") and result.audit.n == 53
    v = result.first_layer
    assert (v.layer, v.order, v.patch_nullity, result.audit.nullity_w1) == ("layers.0", "forward", 11, 11)
    assert v.polyphase_count == 12 and v.answer == fl.DO_NOT_EXIST


def test_a_timm_name_outside_the_registry_on_meta() -> None:
    result = any_model.audit_any("resnet10t", device="meta")
    v = result.first_layer
    assert result.source == "timm" and result.input_shape == (3, 176, 176)  # its pretrained_cfg input size
    assert result.audit.weights.startswith("none (meta") and result.audit.rule.startswith("structural")
    assert (v.layer, v.order, v.patch_nullity, v.patch_nullity_structural) == ("conv1.0", "forward", None, 3)


def test_prefix_picks_the_library() -> None:
    assert any_model.resolve("resnet18") == any_model.ModelName("resnet18", "torchvision", "classification")
    assert any_model.resolve("timm:resnet18").source == "timm"
    assert any_model.resolve("resnet18.a1_in1k").source == "timm"
    assert any_model.resolve("lenet5").source == "registry"
    assert any_model.resolve("r3d_18").task == "video"


@pytest.mark.parametrize("name", ["lenet5", "mnist_mlp_2x256", "squeezenet1_1"])
def test_registry_names_give_the_registry_numbers(name: str) -> None:
    ours = any_model.audit_any(name, weights="random", device="cpu").audit.summary()
    theirs = audit.audit_registry_model(name, "random", "cpu").summary()
    ours.pop("seconds")
    theirs.pop("seconds")
    assert ours == theirs


def test_unknown_names_get_the_closest_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet51'.*resnet50") as info:
        any_model.resolve("resnet51")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="in torchvision; closest valid names: .*mobilenet_v3_large"):
        any_model.resolve("torchvision:mobilenet_v3_larg")
    with pytest.raises(ValueError, match="unknown library prefix 'keras'"):
        any_model.resolve("keras:resnet50")


# --- checkpoints ------------------------------------------------------------------------------------------------


@pytest.fixture
def good_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    model = any_model.build("lenet5", "random").model
    path = tmp_path / "lenet5.pt"
    torch.save(model.state_dict(), path)
    return path


def test_a_good_checkpoint_is_loaded(good_checkpoint: Path) -> None:
    built = any_model.build("lenet5", checkpoint=good_checkpoint)
    state = torch.load(good_checkpoint, weights_only=True)
    assert built.weights == f"checkpoint {good_checkpoint}"
    assert all(torch.equal(built.model.state_dict()[k], v) for k, v in state.items())
    wrapped = good_checkpoint.with_name("wrapped.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    result = any_model.audit_any("lenet5", checkpoint=wrapped)
    assert result.audit.nullity_w1 == result.first_layer.patch_nullity == 19


def test_a_checkpoint_with_a_wrong_shape_names_the_key_and_both_shapes(good_checkpoint: Path) -> None:
    state = torch.load(good_checkpoint, weights_only=True)
    state["0.weight"] = torch.zeros(6, 1, 3, 3)
    torch.save(state, good_checkpoint)
    with pytest.raises(ValueError, match=r"key '0.weight' is \[6, 1, 3, 3\] in the checkpoint but \[6, 1, 5, 5\]"):
        any_model.build("lenet5", checkpoint=good_checkpoint)


def test_a_checkpoint_with_wrong_keys(good_checkpoint: Path) -> None:
    state = torch.load(good_checkpoint, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "0.bias"}, good_checkpoint)
    with pytest.raises(ValueError, match=r"key '0.bias' is missing from the checkpoint \(the model has \[6\]\)"):
        any_model.build("lenet5", checkpoint=good_checkpoint)
    torch.save({**state, "extra.weight": torch.zeros(2)}, good_checkpoint)
    with pytest.raises(ValueError, match="key 'extra.weight' in the checkpoint is not in the model"):
        any_model.build("lenet5", checkpoint=good_checkpoint)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "tensor", "missing"])
def test_a_damaged_checkpoint_is_one_clear_line(good_checkpoint: Path, damage: str) -> None:
    if damage == "garbage":
        good_checkpoint.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        good_checkpoint.write_bytes(good_checkpoint.read_bytes()[:5000])
    elif damage == "empty":
        good_checkpoint.write_bytes(b"")
    elif damage == "tensor":
        torch.save(torch.zeros(3), good_checkpoint)
    else:
        good_checkpoint.unlink()
    with pytest.raises(ValueError) as info:
        any_model.build("lenet5", checkpoint=good_checkpoint)
    message = str(info.value)
    assert "\n" not in message and str(good_checkpoint) in message
    assert any(s in message for s in ("not a readable PyTorch state dict", "not a state dict", "does not exist"))


def test_a_checkpoint_on_meta_is_refused(good_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="needs real weights"):
        any_model.build("lenet5", device="meta", checkpoint=good_checkpoint)


def test_any_module_is_audited() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Flatten(), torch.nn.Linear(8 * 4, 3))
    result = any_model.audit_any(model, input_shape=(3, 8, 8))
    assert result.source == "module" and result.audit.n == 2 and result.first_layer.answer == fl.PATCH_EXISTS
    assert json.loads(json.dumps(result.summary()))["first_layer"]["operator_kernel_dim"] == 4 * 40


# --- the command line -------------------------------------------------------------------------------------------


def test_cli_audits_a_timm_name_with_its_first_layer(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["audit", "resnet10t", "--device", "meta", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["source"] == "timm" and info["first_layer"]["layer"] == "conv1.0"
    assert info["first_layer"]["answer"] == fl.DO_NOT_EXIST and info["first_layer"]["patch_nullity"] is None
    code = cli.main(["audit", "lenet5", "--weights", "random", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0] == "model: lenet5" and "exact_first_layer_collisions: do not exist" in lines


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["audit", "resnet51", "--weights", "random"], "closest valid names: resnet51q, resnet50"),
        (["audit", "lenet5", "--checkpoint", "/nonexistent/x.pt"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fragment in err


def test_cli_garbage_checkpoint_in_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLLISIONS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "helpers", "audit", "lenet5", "--checkpoint", str(bad), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines() == [done.stderr.strip()] and "not a readable PyTorch state dict" in done.stderr
    )
