"""The book's structure: toc, chapter notebooks (parameters, no outputs), results and scoreboard, staging.

The command line is tested in tests/test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.book import pipeline, results, verdict

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
    claim = results.judge(
        "x.y",
        "a claim",
        verdict.equals(84, "nullity"),
        paper=84,
        ours=83,
        weights="random",
        reason="trained weights add one",
    )
    path = results.save("demo", [claim], quick=False, device="cpu")
    records = results.load_all(path.parent)
    page = results.scoreboard_markdown([r for r in records if r["chapter"] == "demo"], {"demo": "Demo"})
    assert "## [Demo](chapters/demo.ipynb)" in page
    assert (
        '| <span class="status status-differs">differs</span> | a claim | nullity = 84 | 84 | 83 | Weights: random. '
        "trained weights add one |"
    ) in page
    assert "**1 differs.**" in page
    assert records[-1]["claims"][0]["criterion"] == "nullity = 84"


def test_every_status_has_a_colour() -> None:
    css = (pipeline.ROOT / "_static" / "book.css").read_text()
    for status in verdict.STATUSES:
        slug = results.status_badge(status).split("status-", 1)[1].split('"', 1)[0]
        assert f"span.status-{slug} " in css, status


def test_claim_status_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown status 'ok'"):
        results.Claim("a", "b", "c", 1, 1, "ok")


def test_checks_fail_the_build() -> None:
    checks = results.Checks()
    checks.require(True, "fine")
    checks.require(False, "residual below 1e-6", 1e-3)
    with pytest.raises(results.ClaimFailed, match="residual below 1e-6"):
        checks.finish()


# --- staging the book's source ----------------------------------------------------------------------------


def _cell(kind: str, source: str, tags: tuple[str, ...] = (), outputs: list | None = None) -> dict:
    cell = {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {}, "source": source.splitlines(True)}
    if kind == "code":
        cell |= {"execution_count": 1, "outputs": outputs or []}
    return cell


def _executed_chapter(title: str) -> dict:
    """An executed chapter as papermill leaves it: defaults, injected parameters, install, setup, work, claims."""
    badge = f"[![Open In Colab]({pipeline.COLAB_BADGE_URL})](https://colab.research.google.com/github/x/y)"
    shown = [{"output_type": "stream", "name": "stdout", "text": ["residual 1e-07\n"]}]
    cells = [
        _cell("markdown", f"# {title}\n\n{badge}"),
        _cell("code", 'device = "auto"\nquick = False', ("parameters",)),
        _cell("code", 'device = "cpu"\nquick = True', ("injected-parameters",)),
        _cell("code", pipeline.COLAB_INSTALL_CELL),
        _cell("code", 'ch = chapter.setup("x", device=device)'),
        _cell("code", "print(residual)", outputs=shown),
        _cell("code", "checks = results.Checks()\nch.finish(checks)", ("claims",)),
    ]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


#: The parameters of the fake quick build below.
QUICK = {"device": "cpu", "weights": "auto", "quick": True, "seed": 0}


@pytest.fixture
def fake_book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A repository with two chapters and a page, and a quick build folder holding both executed chapters (with
    their hash stamps) and their results as the pipeline keeps them; returns (build folder, outputs folder)."""
    root, out, outputs = tmp_path / "repo", tmp_path / "build", tmp_path / "outputs"
    (root / "chapters").mkdir(parents=True)
    (root / "helpers").mkdir()
    (root / "requirements.txt").write_text("")
    (root / "_static").mkdir()
    (root / "_static" / "colab-badge.svg").write_text("<svg/>")
    (root / "_config.yml").write_text('title: "Fake book"\n')
    toc = "format: jb-book\nroot: intro\nchapters:\n- file: scoreboard\n- file: chapters/a\n- file: chapters/b\n"
    (root / "_toc.yml").write_text(toc)
    (root / "intro.md").write_text("# Intro\n")
    (out / "executed").mkdir(parents=True)
    for stem, title in (("a", "Chapter A"), ("b", "Chapter B")):
        nb = json.dumps(_executed_chapter(title), indent=1)
        (root / "chapters" / f"{stem}.ipynb").write_text(nb)  # the source: titles come from here
        (out / "executed" / f"{stem}.ipynb").write_text(nb)
    monkeypatch.setattr(pipeline, "ROOT", root)
    monkeypatch.setenv("COLLISIONS_OUT", str(outputs))
    results.save(
        "a",
        [results.judge("a.1", "residual is zero", verdict.at_most(1e-6, "residual"), paper=0, ours=1e-7)],
        quick=True,
        device="cpu",
    )
    results.save(
        "b",
        [results.judge("b.1", "two colliding images", verdict.equals(2, "images"), paper=2, ours=2)],
        quick=True,
        device="cpu",
    )
    for stem in ("a", "b"):  # as pipeline.promote keeps them: stamp, checks' outcome, content hash
        digest = pipeline.content_hash(root / "chapters" / f"{stem}.ipynb", QUICK)
        (out / "executed" / f"{stem}.hash").write_text(digest)
        record = json.loads((outputs / "results" / f"{stem}.json").read_text())
        checks = {"passed": 1, "failed": [], "skipped": 0}
        final = results.finalize(record, checks=checks, source_hash=digest, figures={})
        (outputs / "results" / f"{stem}.json").write_text(json.dumps(final))
    return out, outputs


def test_stage_assembles_the_book_source(fake_book: tuple[Path, Path]) -> None:
    out, outputs = fake_book
    src = pipeline.stage(out, outputs, QUICK)
    assert src == out / "src"
    root = pipeline.ROOT
    for name in ("_config.yml", "_toc.yml", "intro.md", "_static/colab-badge.svg"):
        assert (src / name).read_text() == (root / name).read_text(), name
    assert sorted(p.name for p in (src / "chapters").iterdir()) == ["a.ipynb", "b.ipynb"]
    scoreboard = (src / "scoreboard.md").read_text()
    assert "## [Chapter A](chapters/a.ipynb) (quick mode)" in scoreboard
    assert "## [Chapter B](chapters/b.ipynb) (quick mode)" in scoreboard
    assert (
        "residual is zero" in scoreboard and "two colliding images" in scoreboard and "**2 reproduced.**" in scoreboard
    )

    cells = json.loads((src / "chapters" / "a.ipynb").read_text())["cells"]
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    assert "remove-cell" not in tags[0] and "/_static/colab-badge.svg" in cells[0]["source"]
    assert pipeline.COLAB_BADGE_URL not in cells[0]["source"]
    assert all("remove-cell" in t for t in tags[1:4]), tags  # defaults, injected parameters, Colab install
    assert tags[4] == ["hide-output"]  # the setup cell
    assert tags[5] == [] and cells[5]["outputs"][0]["text"] == ["residual 1e-07\n"]  # the work: shown, untouched
    assert tags[6] == ["claims", "hide-input"]


def test_stage_starts_from_scratch_and_needs_every_page(fake_book: tuple[Path, Path]) -> None:
    out, outputs = fake_book
    stale = out / "src" / "chapters" / "old.ipynb"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    pipeline.stage(out, outputs, QUICK)
    assert not stale.exists()
    (out / "executed" / "b.ipynb").unlink()
    with pytest.raises(SystemExit, match="missing page for toc entry 'chapters/b'"):
        pipeline.stage(out, outputs, QUICK)


def test_missing_glue_is_caught() -> None:
    log = (
        "reading sources...\n/src/chapters/a.ipynb:10004: WARNING: No key 'r' found in glue data for this document. "
        "(use `path::key`, to glue from another document) [mystnb.glue]\nbuild succeeded, 1 warning.\n"
    )
    assert pipeline.missing_glue(log) == [log.splitlines()[1].strip()]
    assert pipeline.missing_glue("build succeeded.\n") == []
