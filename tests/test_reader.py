"""The reader's test on tiny synthetic books: a clean page passes, each kind of breakage is caught, the command line."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers.book import reader

pytestmark = pytest.mark.skipif(reader.find_browser() is None, reason=reader.SKIP_REASON)
pytest.importorskip("selenium", reason="selenium is not installed")

REPO = Path(__file__).resolve().parent.parent


def _png_uri(width: int = 40) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, 30), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(name: str, src: str) -> str:
    return (
        f'<figure class="collisions-figure" id="fig-{name}"><img src="{src}" style="max-width:100%">'
        f"<figcaption>{name}</figcaption></figure>"
    )


CLEAN = (
    "<h1>Clean</h1><p>Prose with a pipe | in it and a dash - too.</p>"
    "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>"
    "<pre>x = 1\nprint(x)</pre>"
    '<div class="cell_input"><pre>pattern = re.compile(r"\\(x\\)")</pre></div>'
    '<div style="overflow-x:auto"><table style="width:1800px"><tr><td>wide but scrolls</td></tr></table></div>'
)

# page stem -> (extra HTML, figures the results list, the one problem expected)
BROKEN = {
    "missing_figure": ("", ["gone"], "missing figure"),
    "figure_not_loaded": (_figure("bad", "data:image/png;base64,AAAA"), ["bad"], "figure not loaded"),
    "figure_too_small": (_figure("wide", _png_uri(2000)), ["wide"], "figure too small"),
    "broken_image": ('<p><img src="https://example.invalid/badge.png" alt="badge"></p>', [], "broken image"),
    "raw_table": ("<p>| model | top-1 |\n|---|---|\n| ViT | 81.2 |</p>", [], "raw markdown table"),
    "echoed_path": ("<pre>PosixPath('/x/y.png')</pre>", [], "echoed path"),
    "echoed_object": (
        "<p>a <span>&lt;IPython.core.display.Markdown object&gt;</span> first layer</p>",
        [],
        "echoed object",
    ),
    "traceback": (
        '<div class="cell_output"><pre>Traceback (most recent call last):\n  File "x.py", line 1\n'
        + "ValueError: bad</pre></div>",
        [],
        "traceback",
    ),
    "raw_math": ("<p>The norm \\( x \\) is small.</p>", [], "unrendered math"),
    "overflow": ('<div style="width:2000px">a very wide box</div>', [], "overflow"),
}


def _page(body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>t</title></head><body>"
        f"<main><article class='bd-article' style='width:700px'>{body}</article></main></body></html>"
    )


def _book(root: Path, chapters: dict[str, tuple[str, list[str]]]) -> tuple[Path, Path]:
    html, results = root / "html", root / "results"
    (html / "chapters").mkdir(parents=True)
    (html / "_static").mkdir()
    results.mkdir()
    (html / "index.html").write_text(_page("<h1>Book</h1><p>Welcome.</p>"))
    (html / "search.html").write_text(_page("<p>| not | checked |</p>"))
    (html / "_static" / "x.html").write_text(_page(""))
    (html / "old.html").write_text('<meta http-equiv="Refresh" content="0; url=index.html" />')
    for stem, (body, figures) in chapters.items():
        (html / "chapters" / f"{stem}.html").write_text(_page(body))
        (results / f"{stem}.json").write_text(json.dumps({"chapter": stem, "figures": figures, "claims": []}))
    return html, results


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, set[str]], dict[str, int], Path]:
    """Every page checked in one browser: page -> labels of its problems, heights, the screenshots folder."""
    root = tmp_path_factory.mktemp("book")
    uri = _png_uri()
    chapters = {"clean": (_figure("ok", uri) + CLEAN, ["ok"])}
    chapters |= {
        stem: (_figure("ok", uri) + CLEAN + extra, ["ok", *figures]) for stem, (extra, figures, _) in BROKEN.items()
    }
    html, results = _book(root, chapters)
    shots = root / "shots"
    problems, heights = reader.check_book(html, results, shots)
    labels: dict[str, set[str]] = {page: set() for page in heights}
    for p in problems:
        labels.setdefault(p.page, set()).add(p.what)
    return labels, heights, shots


def test_pages_and_expected_figures(tmp_path: Path) -> None:
    html, results = _book(tmp_path, {"a": ("", ["f1", "f2"])})
    (results / "b.json").write_text(json.dumps({"chapter": "b"}))
    assert [p.relative_to(html).as_posix() for p in reader.book_pages(html)] == ["chapters/a.html", "index.html"]
    assert reader.expected_figures(results) == {"chapters/a.html": ["f1", "f2"], "chapters/b.html": []}


def test_clean_page_passes(checked: tuple[dict[str, set[str]], dict[str, int], Path]) -> None:
    labels, heights, shots = checked
    assert labels["chapters/clean.html"] == set() and labels["index.html"] == set()
    assert set(heights) == {"index.html", "chapters/clean.html", *(f"chapters/{s}.html" for s in BROKEN)}
    assert all(h > 100 for h in heights.values())
    assert (shots / "chapters__clean.png").stat().st_size > 1000
    report = json.loads((shots / "report.json").read_text())
    assert report["heights_px"] == heights


@pytest.mark.parametrize("stem", BROKEN)
def test_each_breakage_is_caught(checked: tuple[dict[str, set[str]], dict[str, int], Path], stem: str) -> None:
    labels, _, _ = checked
    assert labels[f"chapters/{stem}.html"] == {BROKEN[stem][2]}


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "helpers.book.reader", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
        timeout=120,
    )


def test_cli_bad_arguments(tmp_path: Path) -> None:
    run = _cli(str(tmp_path / "nope"))
    assert run.returncode == 2
    assert len((run.stdout + run.stderr).strip().splitlines()) == 1 and "Traceback" not in run.stderr


def test_cli_skips_without_browser(tmp_path: Path) -> None:
    html, _ = _book(tmp_path, {})
    run = _cli(str(html), CHROMIUM=str(tmp_path / "no-chromium"), CI="")
    assert run.returncode == 0 and run.stdout.strip().startswith("[reader] skipped:")
    assert len(run.stdout.strip().splitlines()) == 1
    assert _cli(str(html), CHROMIUM=str(tmp_path / "no-chromium"), CI="true").returncode == 1


def test_cli_fails_on_a_bad_page(tmp_path: Path) -> None:
    html, results = _book(tmp_path, {"bad": (BROKEN["raw_math"][0], ["lost"])})
    run = _cli(str(html), "--results", str(results), "--screenshots", str(tmp_path / "shots"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "chapters/bad.html" in run.stdout and "missing figure" in run.stdout and "unrendered math" in run.stdout
    assert "[reader] index.html:" in run.stdout and " ok" in run.stdout


@pytest.mark.parametrize("argv", [["/nonexistent"], ["--bogus"], []])
def test_bad_arguments_give_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.book import reader

    assert reader.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[reader] error: "), err
