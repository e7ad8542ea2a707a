"""The command line (``python -m helpers``): every command on small inputs, offline, and its bad-input paths.

A bad argument or input must end in exit code 2 and one ``error:`` line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import cli
from helpers.experiments import audit, polytope
from helpers.linalg import rank_rule
from helpers.models import registry
from tests.conftest import REPO, needs_mnist

CPU_RANDOM = ["--weights", "random", "--device", "cpu"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    """stderr is exactly one ``error: ...`` line (no traceback) that mentions every fragment."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """A parser rejection: exit code 2 and exactly one ``error:`` line (no usage text); returns that line."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    return err.strip()


# --- the option values repeated in cli.py agree with their homes ----------------------------------------------


def test_option_values_agree_with_the_experiment_modules() -> None:
    assert cli.CONV_TRANSPOSE_RULES == audit.CONV_TRANSPOSE_RULES
    assert cli.AUDIT_DTYPES == tuple(rank_rule.DTYPES)
    assert cli.POLYTOPE_MODELS == tuple(polytope.MNIST_SPLITS)
    config = polytope.MNIST_CONFIG
    assert cli.POLYTOPE_DEFAULTS == {"alpha": config.alpha, "steps": config.steps, "lr": config.lr}
    args = cli.build_parser().parse_args(["polytope", "lenet5"])
    assert (args.alpha, args.steps, args.lr) == (config.alpha, config.steps, config.lr)


def test_parse_eps() -> None:
    assert cli.parse_eps("8/255") == pytest.approx(8 / 255)
    assert cli.parse_eps("0.03") == 0.03
    with pytest.raises(ValueError):
        cli.parse_eps("eight")


# --- models, load -----------------------------------------------------------------------------------------


def test_models_lists_the_registry_as_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(registry.REGISTRY)
    assert any(line.split()[:3] == ["lenet5", "book", "mnist"] for line in lines)
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == list(registry.REGISTRY)
    assert set(rows[0]) == {"name", "source", "builder", "task", "table1"}
    resnet = next(r for r in rows if r["name"] == "resnet50")
    assert resnet["source"] == "torchvision" and resnet["table1"] == "ResNet-50"


def test_load_says_what_was_loaded(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "load", "lenet5", *CPU_RANDOM, "--json")
    info = json.loads(out)
    expected = sum(p.numel() for p in registry.load("lenet5", "random", "cpu").model.parameters())
    assert code == 0 and info["model"] == "lenet5" and info["weights"] == "random"
    assert info["parameters"] == expected == 61706 and info["detail"] == "random weights asked for"
    code, out, _ = run_cli(capsys, "load", "lenet5", *CPU_RANDOM)
    assert code == 0 and "weights: random" in out.splitlines() and "parameters: 61706" in out.splitlines()


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        pytest.param(["load", "resnet51", "--weights", "random"], ["unknown model 'resnet51'", "resnet50"], id="load"),
        pytest.param(["load", "lenet5", "--weights", "random", "--device", "gpu0"], ["'gpu0'"], id="load-device"),
        pytest.param(["audit", "resnet51", "--weights", "random"], ["unknown model 'resnet51'"], id="audit"),
        pytest.param(["collide", "resnet51", "--weights", "random"], ["unknown model 'resnet51'"], id="collide"),
        pytest.param(["attacks", "resnet51", "--weights", "random"], ["unknown model 'resnet51'"], id="attacks"),
        # a model that is not a classifier: refused before any work
        pytest.param(["attacks", "lenet5", *CPU_RANDOM], ["'lenet5' is a mnist model"], id="attacks-task"),
        pytest.param(["gauge", "--quick", "--device", "gpu0"], ["'gpu0'"], id="gauge-device"),
    ],
)
def test_bad_input_is_one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_error_line(err, *fragments)


def test_bad_options_are_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'resnet51'" in parse_error(capsys, "polytope", "resnet51", "--weights", "random")
    assert "invalid choice: 'float16'" in parse_error(capsys, "audit", "lenet5", "--dtype", "float16")
    assert "invalid choice: 'transpose'" in parse_error(capsys, "audit", "lenet5", "--conv-transpose", "transpose")
    assert "invalid choice: 'trained'" in parse_error(capsys, "load", "lenet5", "--weights", "trained")
    assert "argument --beta" in parse_error(capsys, "collide", "lenet5", "--beta", "big")
    assert "required" in parse_error(capsys)  # no command at all


# --- audit ------------------------------------------------------------------------------------------------


def test_audit_json_on_the_smallest_registry_model(capsys: pytest.CaptureFixture[str]) -> None:
    # lenet5: conv 6x1x5x5, conv 16x6x5x5, fc 120x400, 84x120, 10x84: every matrix is wide or square
    code, out, _ = run_cli(capsys, "audit", "lenet5", *CPU_RANDOM, "--json", "--rows")
    info = json.loads(out)
    assert code == 0 and info["model"] == "lenet5" and info["weights"].startswith("random")
    assert (info["n"], info["nu"], info["mu"]) == (5, 5, 5)
    assert info["w1_name"] == "0.weight" and info["w1_shape"] == [6, 25] and info["nullity_w1"] == 19
    assert info["sum_nullity"] == 19 + (150 - 16) + (400 - 120) + (120 - 84) + (84 - 10) == 543
    assert info["structural_sum_nullity"] == info["sum_nullity"]
    assert [(r["rows"], r["cols"]) for r in info["rows"]] == [(6, 25), (16, 150), (120, 400), (84, 120), (10, 84)]
    assert all(r["nullity"] == r["cols"] - r["rank"] for r in info["rows"])
    assert "float64" in info["rule"]


def test_audit_text_and_float32(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "audit", "lenet5", *CPU_RANDOM, "--dtype", "float32")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == "model: lenet5"
    assert "nullity_w1: 19" in lines and "n: 5" in lines and any("float32" in line for line in lines)


# --- collide ----------------------------------------------------------------------------------------------


@needs_mnist
def test_collide_on_a_small_model_is_an_exact_collision(capsys: pytest.CaptureFixture[str]) -> None:
    # mnist_mlp_2x256: W1 is 256 x 784, so 528 kernel directions and the first layer cannot tell x from x + P
    code, out, _ = run_cli(capsys, "collide", "mnist_mlp_2x256", *CPU_RANDOM, "--json", "--beta", "3")
    report = json.loads(out)
    assert code == 0 and report["W1"] == [256, 784] and report["nullity"] == 528 and report["beta"] == 3.0
    assert report["perturbation_l2"] == pytest.approx(3.0, rel=1e-5)  # beta times a unit kernel vector
    assert report["input_rel"] > 0.1
    assert report["first_layer_rel"] < 1e-5 and report["output_rel"] < 1e-5
    assert report["top5_original"] == report["top5_colliding"] and report["same_argmax"] == 1.0


def test_collide_refuses_a_layer_without_a_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    # squeezenet1_1's first layer is 64 x 27: full column rank, no exact null-space search exists
    code, _, err = run_cli(capsys, "collide", "squeezenet1_1", *CPU_RANDOM)
    assert code == 2
    assert_one_error_line(err, "trivial kernel", "64 x 27")


# --- attacks, polytope, gauge, install-nodeps: parsing and bad input ----------------------------------------


def test_attacks_polytope_gauge_parse_to_their_commands() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["attacks", "deit_tiny_patch16_224", "--eps", "4/255", "--n", "3", "--steps", "2"])
    assert args.func is cli._attacks_command and args.model == "deit_tiny_patch16_224"
    assert (args.eps, args.reach, args.n, args.steps, args.size) == ("4/255", 0.5, 3, 2, 224)
    assert (args.weights, args.device, args.json) == ("auto", "auto", False)
    args = parser.parse_args(["polytope", "mnist_mlp_2x256", "--target", "3", "--vertices", "2", "--json"])
    assert args.func is cli._polytope_command and (args.target, args.start, args.vertices) == (3, None, 2)
    assert args.json and args.samples == 2000
    args = parser.parse_args(["gauge", "--quick", "--seeds", "1", "--n-boot", "10", "--device", "cpu"])
    assert args.func is cli._gauge_command and (args.quick, args.seeds, args.n_boot, args.train_size) == (
        True,
        1,
        10,
        None,
    )
    assert parser.parse_args(["install-nodeps", "--dry-run"]).func is cli._install_nodeps_command


@needs_mnist
def test_polytope_rejects_an_image_index_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "polytope", "mnist_mlp_2x256", *CPU_RANDOM, "--target", "10000")
    assert code == 2
    assert_one_error_line(err, "index 10000 out of range", "0..9999")
    code, _, err = run_cli(capsys, "polytope", "lenet5", *CPU_RANDOM, "--start", "-1")
    assert code == 2
    assert_one_error_line(err, "index -1 out of range")


def test_attacks_rejects_a_missing_image(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    missing = str(tmp_path / "no-such-image.png")
    code, _, err = run_cli(capsys, "attacks", "squeezenet1_1", *CPU_RANDOM, "--image", missing, "--size", "32")
    assert code == 2
    assert_one_error_line(err, "not found", "astronaut")


def test_attacks_rejects_a_zero_denominator_budget(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "attacks", "squeezenet1_1", *CPU_RANDOM, "--size", "32", "--eps", "8/0")
    assert code == 2
    assert_one_error_line(err, "8/0")


def test_install_nodeps_dry_run_prints_the_pip_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "install-nodeps", "--dry-run")
    assert code == 0 and "pip install" in out and "--no-deps" in out and "nodeps.txt" in out
    assert cli.nodeps_requirements().strip()


# --- as a program -----------------------------------------------------------------------------------------


def _python(code: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", code] if code else [sys.executable, *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_python_m_helpers_runs_and_fails_cleanly() -> None:
    listed = _python(None, "-m", "helpers", "models", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [row["name"] for row in json.loads(listed.stdout)] == list(registry.REGISTRY)
    bad = _python(None, "-m", "helpers", "load", "resnet51", "--weights", "random")
    assert bad.returncode == 2 and bad.stdout == ""
    assert_one_error_line(bad.stderr, "unknown model 'resnet51'", "resnet50")


def test_importing_the_cli_imports_no_optional_dependency() -> None:
    # `models` must work where torchattacks (needed by attacks and gauge only) is missing
    probe = (
        "import contextlib, io, json, sys\n"
        "from helpers import cli\n"
        "cli.build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    code = cli.main(['models'])\n"
        "print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in ('torchattacks', 'helpers'))]))\n"
    )
    run = _python(probe)
    assert run.returncode == 0, run.stderr
    code, modules = json.loads(run.stdout)
    assert code == 0 and "torchattacks" not in modules
    assert not [m for m in modules if m.startswith("helpers.experiments")], modules
