"""Seeds make every command reproducible: each CLI command, run twice with the same arguments, prints the same JSON
(timings and cache bookkeeping aside). Random weights are the hard case: their initialisation must be seeded too.

Every run is small (random weights, the smallest models and sizes, CPU); about 30 s in all on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import cli
from tests.conftest import REPO, needs_mnist

CPU_RANDOM = ["--weights", "random", "--device", "cpu", "--json"]
#: Keys that may differ between two identical runs: wall-clock timings and whether a cache answered.
VOLATILE = ("seconds", "from_cache", "cached")

COMMANDS = [
    pytest.param(["models", "--json"], id="models"),
    pytest.param(["load", "lenet5", *CPU_RANDOM], id="load"),
    pytest.param(["audit", "lenet5", *CPU_RANDOM, "--rows"], id="audit"),
    pytest.param(["collide", "mobilenet_v3_large", *CPU_RANDOM, "--seed", "3"], id="collide-imagenet"),
    pytest.param(["collide", "lenet5", *CPU_RANDOM], id="collide-mnist", marks=needs_mnist),
    pytest.param(
        ["attacks", "deit_tiny_patch16_224", *CPU_RANDOM, "--n", "2", "--steps", "1", "--seed", "1"], id="attacks"
    ),
    pytest.param(
        ["polytope", "lenet5", *CPU_RANDOM, "--vertices", "2", "--steps", "2", "--samples", "10"],
        id="polytope",
        marks=needs_mnist,
    ),
    pytest.param(
        ["gauge", "--quick", "--seeds", "1", "--train-size", "200", "--n-boot", "10", "--device", "cpu", "--json"],
        id="gauge-quick",
        marks=needs_mnist,
    ),
]


def without_volatile(value: Any) -> Any:
    """``value`` with every key naming a timing or a cache hit (:data:`VOLATILE`) removed, recursively."""
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def strict_json(text: str) -> Any:
    """Parse ``text`` as strict JSON: NaN and Infinity are refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    code = cli.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return strict_json(out)


@pytest.mark.parametrize("argv", COMMANDS)
def test_a_command_run_twice_prints_the_same_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str]
) -> None:
    # an empty cache: the first run computes (trains, audits), the second may read what the first cached
    monkeypatch.setenv("COLLISIONS_CACHE", str(tmp_path / "cache"))
    first, second = (without_volatile(run_json(capsys, argv)) for _ in range(2))
    assert first == second


def test_collide_is_reproducible_across_processes_and_the_seed_matters() -> None:
    # torch seeds its generator from the OS in every new process: without seeding, random weights differ
    argv = [sys.executable, "-m", "helpers", "collide", "mobilenet_v3_large", *CPU_RANDOM]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(*extra: str) -> dict[str, Any]:
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return without_volatile(strict_json(done.stdout))

    first, second, other = run("--seed", "5"), run("--seed", "5"), run("--seed", "6")
    assert first == second
    assert (other["top5_original"], other["perturbation_linf"]) != (first["top5_original"], first["perturbation_linf"])
