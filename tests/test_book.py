"""The book's structure: toc, chapter notebooks (parameters, no outputs), results and scoreboard, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.book import pipeline, results

REQUIRED_PARAMETERS = ("device", "weights", "quick", "seed")


def test_every_toc_entry_has_a_source() -> None:
    for entry in pipeline.toc_files():
        if entry == "scoreboard":
            continue
        assert (pipeline.ROOT / f"{entry}.ipynb").exists() or (pipeline.ROOT / f"{entry}.md").exists(), entry
    assert len(pipeline.chapter_notebooks()) >= 10


@pytest.mark.parametrize("notebook", pipeline.chapter_notebooks(), ids=lambda p: p.stem)
def test_chapter_notebook_shape(notebook) -> None:
    nb = json.loads(notebook.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), "commit notebooks without outputs"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one papermill parameters cell"
    source = "".join(params[0]["source"])
    for name in REQUIRED_PARAMETERS:
        assert f"{name} =" in source, f"parameter {name} missing"
    assert "colab.research.google.com" in "".join(nb["cells"][0]["source"]), "Open-in-Colab badge"


def test_content_hash_tracks_notebook_and_parameters() -> None:
    nb = pipeline.chapter_notebooks()[0]
    base = pipeline.content_hash(nb, {"quick": False})
    assert base == pipeline.content_hash(nb, {"quick": False})
    assert base != pipeline.content_hash(nb, {"quick": True})


def test_scoreboard_lists_claims(tmp_path) -> None:
    claim = results.Claim(
        "x.y", "a claim", paper=84, ours=83, status=results.DIFFERS, weights="random", reason="trained weights add one"
    )
    path = results.save("demo", [claim], quick=False, device="cpu")
    records = results.load_all(path.parent)
    page = results.scoreboard_markdown([r for r in records if r["chapter"] == "demo"], {"demo": "Demo"})
    assert "## [Demo](chapters/demo.ipynb)" in page
    assert (
        '| <span class="status status-differs">differs</span> | a claim | 84 | 83 | random | trained weights add one |'
    ) in page
    assert "**1 differs.**" in page


def test_claim_status_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown status 'ok'"):
        results.Claim("a", "b", 1, 1, "ok")


def test_checks_fail_the_build() -> None:
    checks = results.Checks()
    checks.require(True, "fine")
    checks.require(False, "residual below 1e-6", 1e-3)
    with pytest.raises(results.ClaimFailed, match="residual below 1e-6"):
        checks.finish()


def test_cli_lists_models_and_rejects_unknown_ones() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "helpers", "models", "--json"],
        capture_output=True,
        text=True,
        cwd=pipeline.ROOT,
        check=True,
    )
    assert any(row["name"] == "resnet50" for row in json.loads(listed.stdout))
    bad = subprocess.run(
        [sys.executable, "-m", "helpers", "load", "resnet51", "--weights", "random"],
        capture_output=True,
        text=True,
        cwd=pipeline.ROOT,
    )
    assert bad.returncode == 2 and "unknown model 'resnet51'" in bad.stderr and "resnet50" in bad.stderr
