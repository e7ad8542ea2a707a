"""What a chapter puts on the page: figures with captions, tables that fit, checks in words, one banner,
plain-text progress, and the staging that keeps plumbing off the page."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from helpers import progress
from helpers.book import page, pipeline, plotting, results
from helpers.progress import progress_bar


def test_figure_html_has_inline_png_and_caption() -> None:
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    path = plotting.savefig(fig, "test_inline")
    text = plotting.figure_html(path.read_bytes(), "test_inline", "Figure 1. a <caption>")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'id="fig-test_inline"' in text and "<figcaption>Figure 1. a &lt;caption&gt;</figcaption>" in text
    data = text.split("base64,", 1)[1].split('"', 1)[0]
    assert base64.b64decode(data) == path.read_bytes()


def test_show_figure_saves_closes_and_returns_the_path(capsys: pytest.CaptureFixture[str]) -> None:
    fig, _ = plt.subplots(figsize=(1, 1))
    path = plotting.show_figure(fig, "test_show", "a caption")
    assert path.name == "test_show.png" and path.exists()
    assert not plt.fignum_exists(fig.number), "an inline backend would draw it again"
    assert "test_show.png: a caption" in capsys.readouterr().out  # the plain-Python fallback


def test_table_moves_long_explanations_to_notes() -> None:
    rows = [
        {"row": "A", "nu": 3, "why": "same"},
        {"row": "B", "nu": 1.23456789, "why": "training lowered a rank"},
        {"row": "C", "nu": None, "why": "training lowered a rank"},
    ]
    text = page.table_html(rows, notes=["why"], labels={"nu": "ν"})
    assert "<th>ν</th>" in text and "<th>why</th>" not in text and "<th>note</th>" in text
    assert text.count("training lowered a rank") == 1, "a repeated note is listed once"
    assert "<td>1.235</td>" in text and "<td>—</td>" in text
    assert "<td>a_<wbr>long_<wbr>name</td>" in display_long_name()
    assert "<ol class='table-notes'><li>why: training lowered a rank</li></ol>" in text


def display_long_name() -> str:
    return page.table_html([{"model": "a_long_name"}])


def test_table_text_for_the_command_line() -> None:
    assert page.table_text([{"a": 1, "bb": 0.5}]).splitlines() == ["a  bb ", "1  0.5"]


def test_checks_read_in_words_and_fail_on_a_failed_one() -> None:
    checks = results.Checks()
    checks.require(True, "holds")
    checks.skip("needs trained weights", "random weights")
    html = checks.html()
    assert "✓ passed" in html and "– skipped" in html and "failed" not in html
    checks.require(False, "breaks", 3)
    assert 'class="check-failed"' in checks.html()
    with pytest.raises(results.ClaimFailed, match="breaks"):
        checks.finish()


def test_banner_lists_every_random_model_with_its_whole_reason() -> None:
    reason = "timm could not load pretrained 'x' (OSError: " + "a long hub message " * 20 + "end of message)"
    models = [
        SimpleNamespace(spec=SimpleNamespace(name="deit_tiny"), detail=reason),
        SimpleNamespace(spec=SimpleNamespace(name="resnet50"), detail="no network"),
    ]
    text = results.banner_html(models)
    assert text.count("<li>") == 2 and "end of message)" in text and "resnet50" in text and "<details>" not in text
    many = results.banner_html(models * 3)
    assert many.count("<li>") == 6 and "<details><summary>6 models" in many


def test_one_banner_per_chapter_updated_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.book import chapter

    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(page, "show_html", lambda text, fallback="", display_id=None: calls.append((text, display_id)))
    ch = chapter.setup("test_banner", device="cpu", weights="random", quick=True, seed=0)
    ch.load("squeezenet1_1")
    ch.load("lenet5")
    ids = {i for _, i in calls}
    assert len(calls) == 2 and len(ids) == 1 and None not in ids, "the same banner, shown once and updated"
    assert "squeezenet1_1" in calls[-1][0] and "lenet5" in calls[-1][0]


def test_static_progress_prints_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(progress.STATIC_PROGRESS_ENV, "1")
    assert list(progress_bar(range(3), desc="loop")) == [0, 1, 2]
    bar = progress_bar(total=5, desc="inner", leave=False)
    bar.update(5)
    bar.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("loop: 3/3 done in")


def _notebook(tmp_path: Path) -> Path:
    cells = [
        {
            "cell_type": "markdown",
            "metadata": {},
            "source": f"# T\n\n[![Open In Colab]({pipeline.COLAB_BADGE_URL})](x)",
        },
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "quick = False", "outputs": []},
        {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": "quick = True", "outputs": []},
        {
            "cell_type": "code",
            "metadata": {},
            "source": "import sys\nif 'google.colab' in sys.modules:\n    !pip install x",
            "outputs": [],
        },
        {"cell_type": "code", "metadata": {}, "source": "ch = chapter.setup('t')", "outputs": []},
        {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": []},
        {"cell_type": "code", "metadata": {"tags": ["claims"]}, "source": "checks = results.Checks()", "outputs": []},
    ]
    path = tmp_path / "t.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_prepare_for_render_keeps_plumbing_off_the_page(tmp_path: Path) -> None:
    target = tmp_path / "out.ipynb"
    pipeline.prepare_for_render(_notebook(tmp_path), target)
    cells = json.loads(target.read_text())["cells"]
    tags = [c["metadata"].get("tags", []) for c in cells]
    assert all("remove-cell" in t for t in tags[1:4]), "parameters (default, injected) and the install cell"
    assert "hide-output" in tags[4] and tags[5] == [] and "hide-input" in tags[6]
    assert pipeline.LOCAL_COLAB_BADGE in cells[0]["source"] and pipeline.COLAB_BADGE_URL not in cells[0]["source"]


def test_quick_builds_keep_their_outputs_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quick build's results never land in the folder the full book is rendered from."""
    monkeypatch.delenv("COLLISIONS_OUT", raising=False)
    calls: dict[str, object] = {}
    monkeypatch.setattr(pipeline, "execute", lambda parameters, out, force, only: calls.setdefault("out", out) and [])
    assert pipeline.main(["execute", "--quick", "--device", "cpu"]) == 0
    assert calls["out"] == pipeline.BUILD / "quick" and os.environ["COLLISIONS_OUT"] == str(pipeline.BUILD / "quick")


def test_wide_figures_are_narrowed_to_the_column() -> None:
    fig, axes = plt.subplots(1, 6, figsize=(18, 3))
    for ax in axes:
        ax.set_title("a title")
    path = plotting.show_figure(fig, "test_wide", "wide")
    from PIL import Image

    width_px = Image.open(path).size[0]
    assert width_px <= plotting.MAX_WIDTH_IN * plotting.STYLE["savefig.dpi"] * 1.05


def test_table1_page_rows_pair_ours_with_the_paper() -> None:
    from helpers.experiments import table1

    record = {
        "row": "AlexNet",
        "model": "alexnet",
        "n": 8,
        "n (implied)": "8",
        "mu": 7,
        "mu paper": 7,
        "nu": 7,
        "nu paper": 8,
        "sum": 16515,
        "sum paper": 16547,
        "W1": 299,
        "W1 paper": 299,
        "nu why": "trained weights / tolerance",
        "sum why": "same",
        "W1 why": "same",
        "nu f32": 8,
        "sum f32": 16518,
        "W1 f32": 299,
        "weights": "random",
    }
    row = table1.page_rows([record])[0]
    assert row["ν"] == "7\u00a0/\u00a08" and row["Σ nullity"] == "16515 / 16547"
    assert row["why"] == "nu: trained weights / tolerance" and row["float32 ν / Σ / W1"] == "8 / 16518 / 299"


def test_write_atomically_leaves_nothing_half_written(tmp_path: Path) -> None:
    from helpers import runtime

    target = tmp_path / "sub" / "a.txt"
    runtime.write_atomically(target, lambda tmp: tmp.write_text("one"))
    assert target.read_text() == "one"

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runtime.write_atomically(target, crash)
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]
