"""The book pipeline under a hostile user (issue 15): quick runs never reach the book, a chapter's results are
recorded only after its checks passed (a failed chapter keeps the previous good results and names the check),
and every mistake in ``python -m helpers.book``'s arguments is one ``error:`` line, exit code 2, before any kernel
starts.

The repository is a tiny fake one (a root page and one chapter, ``tiny``) under ``tmp_path``. Chapters run
in-process through a stand-in for ``papermill.execute_notebook`` that executes the code cells with the injected
parameters, the way the kernel would (same environment, same ``helpers``); one test runs the real kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import papermill
import pytest
import torch
from papermill.exceptions import PapermillExecutionError

from helpers.book import pipeline, results

#: The tiny chapter's cells: parameters, setup, a figure, and the claims cell that records a claim, a check and
#: saves before it finishes the checks (the order every chapter of the book uses). ``BROKEN`` fails the check.
PARAMETERS = 'device = "auto"\nweights = "auto"\nquick = False\nseed = 0\n'
SETUP = (
    "import matplotlib.pyplot as plt\n"
    "from helpers.book import chapter, results, verdict\n"
    'ch = chapter.setup("tiny", device=device, weights=weights, quick=quick, seed=seed)\n'
)
CLAIMS = (
    "BROKEN = {broken}\n"
    "checks = results.Checks()\n"
    'ch.claim("tiny.zero", "the residual is zero", verdict.at_most(1e-6, "residual"), paper=0, ours=0.0)\n'
    "fig = plt.figure(figsize=(2, 2))\n"
    "plt.plot([0, 1 + BROKEN])\n"
    'ch.figure(fig, "tiny_plot", "a line")\n'
    'checks.require(not BROKEN, "the solver residual stays below 1e-6", BROKEN)\n'
    "{save}"
)
SAVE_THEN_FINISH = "ch.save()\nchecks.finish()\n"


def _notebook(broken: bool = False, save: str = SAVE_THEN_FINISH) -> str:
    def cell(source: str, tags: tuple[str, ...] = ()) -> dict:
        meta = {"tags": list(tags)} if tags else {}
        return {"cell_type": "code", "execution_count": None, "metadata": meta, "outputs": [], "source": source}

    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": "# Tiny chapter\n"},
        cell(PARAMETERS, ("parameters",)),
        cell(SETUP),
        cell(CLAIMS.format(broken=broken, save=save), ("claims",)),
    ]
    for i, c in enumerate(cells):
        c["id"] = f"cell-{i}"
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    return json.dumps({"cells": cells, "metadata": kernel, "nbformat": 4, "nbformat_minor": 5}, indent=1) + "\n"


class FakePapermill:
    """``papermill.execute_notebook`` in this process: code cells run in one namespace after the parameters."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, input_path: str, output_path: str, parameters: dict[str, Any], **_: Any) -> None:
        self.calls.append(Path(input_path).stem)
        nb = json.loads(Path(input_path).read_text())
        namespace: dict[str, Any] = {}
        code = [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
        index = 0
        try:
            for index, c in code:  # noqa: B007  (the failing cell's index is reported below)
                exec("".join(c["source"]), namespace)
                if "parameters" in c["metadata"].get("tags", []):
                    namespace.update(parameters)
        except Exception as err:
            Path(output_path).write_text(json.dumps(nb))
            raise PapermillExecutionError(
                index, index, "", type(err).__name__, str(err), traceback.format_exception(err)
            ) from err
        Path(output_path).write_text(json.dumps(nb))


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake repository (root page, one chapter ``tiny``, a ``helpers`` tree for the content hash) as ROOT."""
    root = tmp_path / "repo"
    (root / "chapters").mkdir(parents=True)
    (root / "_static").mkdir()
    (root / "helpers").mkdir()
    (root / "helpers" / "x.py").write_text("X = 1\n")
    (root / "requirements.txt").write_text("torch\n")
    (root / "_config.yml").write_text('title: "Fake book"\n')
    (root / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n- file: scoreboard\n- file: chapters/tiny\n"
    )
    (root / "intro.md").write_text("# Intro\n")
    (root / "chapters" / "tiny.ipynb").write_text(_notebook())
    monkeypatch.setattr(pipeline, "ROOT", root)
    monkeypatch.setattr(pipeline, "BUILD", root / "_build")
    for name in ("COLLISIONS_OUT", "JUPYTER_PATH", "COLLISIONS_STATIC_PROGRESS", "COLLISIONS_CHECKS_FILE"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever the pipeline sets
    monkeypatch.setenv("COLLISIONS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return root


@pytest.fixture
def fake_papermill(monkeypatch: pytest.MonkeyPatch) -> FakePapermill:
    fake = FakePapermill()
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    return fake


@pytest.fixture
def rendered(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bytes]]:
    """Stands in for Jupyter Book: records the staged source (path -> bytes) of each render."""
    seen: list[dict[str, bytes]] = []

    def render(src: Path, path_output: Path) -> Path:
        seen.append(_snapshot(src))
        return path_output / "index.html"

    monkeypatch.setattr(pipeline, "render", render)
    return seen


def _snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _book_state(root: Path) -> dict[str, dict[str, bytes]]:
    """What ``make build`` renders from: the repository's results/ and figures/, the full build's notebooks."""
    return {name: _snapshot(root / name) for name in ("results", "figures", "_build/executed")}


FULL = ["--device", "cpu", "--seed", "0"]
QUICK = ["--quick", "--device", "cpu", "--force"]


# --- case 1: quick results never reach the book -------------------------------------------------------------


def test_quick_run_writes_everything_under_its_out(repo: Path, fake_papermill: FakePapermill, tmp_path: Path) -> None:
    out = tmp_path / "quick"
    assert pipeline.main(["execute", *QUICK, "--out", str(out)]) == 0
    assert (out / "executed" / "tiny.ipynb").exists()
    assert json.loads((out / "results" / "tiny.json").read_text())["quick"] is True
    assert (out / "figures" / "tiny_plot.png").exists()
    assert not (repo / "results").exists() and not (repo / "figures").exists()


def test_quick_runs_cannot_change_what_the_book_renders(
    repo: Path, fake_papermill: FakePapermill, rendered: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert pipeline.main(["build", *FULL]) == 0
    before = _book_state(repo)
    assert before["results"] and before["figures"] and before["_build/executed"]
    for extra in ([], ["--out", str(tmp_path / "q")], ["--out", str(repo / "_build")], ["--out", str(repo)]):
        pipeline.main(["execute", *QUICK, *extra])  # refused or sent elsewhere; either way the book is untouched
        assert _book_state(repo) == before, extra
    capsys.readouterr()
    assert pipeline.main(["build", *FULL]) == 0
    assert "tiny: unchanged, not re-executed" in capsys.readouterr().out
    assert rendered[-1] == rendered[0]
    assert "(quick mode)" not in rendered[-1]["scoreboard.md"].decode()


def test_quick_results_left_in_the_repository_are_not_rendered(
    repo: Path, fake_papermill: FakePapermill, rendered: list
) -> None:
    """A chapter run by hand (Jupyter, quick=True) writes into the repository's results/: the next build must not
    keep those numbers as 'cached'."""
    assert pipeline.main(["build", *FULL]) == 0
    record = json.loads((repo / "results" / "tiny.json").read_text())
    record["quick"] = True
    (repo / "results" / "tiny.json").write_text(json.dumps(record))
    assert pipeline.main(["build", *FULL]) == 0
    assert "(quick mode)" not in rendered[-1]["scoreboard.md"].decode()
    assert json.loads((repo / "results" / "tiny.json").read_text())["quick"] is False


def test_results_record_mode_and_source_hash(repo: Path, fake_papermill: FakePapermill) -> None:
    assert pipeline.main(["execute", *FULL]) == 0
    record = json.loads((repo / "results" / "tiny.json").read_text())
    parameters = {"device": "cpu", "weights": "auto", "quick": False, "seed": 0}
    assert record["quick"] is False
    assert record["source_hash"] == pipeline.content_hash(repo / "chapters" / "tiny.ipynb", parameters)
    png = (repo / "figures" / "tiny_plot.png").read_bytes()
    assert record["figure_sha256"] == {"tiny_plot": hashlib.sha256(png).hexdigest()}


def _full_build_on_disk(repo: Path) -> tuple[Path, dict[str, object]]:
    assert pipeline.main(["execute", *FULL]) == 0
    return repo / "_build", {"device": "cpu", "weights": "auto", "quick": False, "seed": 0}


def test_stage_refuses_a_notebook_from_other_sources(repo: Path, fake_papermill: FakePapermill) -> None:
    out, parameters = _full_build_on_disk(repo)
    pipeline.stage(out, repo, parameters)  # current: fine
    (repo / "helpers" / "x.py").write_text("X = 2\n")  # the sources change; the notebook was not re-executed
    with pytest.raises(SystemExit, match="tiny: .*not executed from the current sources"):
        pipeline.stage(out, repo, parameters)


def test_stage_refuses_a_quick_notebook_or_quick_results(repo: Path, fake_papermill: FakePapermill) -> None:
    out, parameters = _full_build_on_disk(repo)
    with pytest.raises(SystemExit, match="tiny: .*not executed from the current sources"):
        pipeline.stage(out, repo, {**parameters, "quick": True})
    record = json.loads((repo / "results" / "tiny.json").read_text())
    (repo / "results" / "tiny.json").write_text(json.dumps({**record, "quick": True}))
    with pytest.raises(SystemExit, match="tiny: results/tiny.json .*quick"):
        pipeline.stage(out, repo, parameters)
    del record["source_hash"]
    (repo / "results" / "tiny.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="tiny: results/tiny.json .*source"):
        pipeline.stage(out, repo, parameters)


def test_stage_refuses_a_figure_changed_since_the_run(repo: Path, fake_papermill: FakePapermill) -> None:
    out, parameters = _full_build_on_disk(repo)
    (repo / "figures" / "tiny_plot.png").write_bytes(b"a quick figure")
    with pytest.raises(SystemExit, match="tiny: .*tiny_plot"):
        pipeline.stage(out, repo, parameters)


def test_scoreboard_leaves_out_and_names_records_that_do_not_match(
    repo: Path, fake_papermill: FakePapermill, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, parameters = _full_build_on_disk(repo)
    target = tmp_path / "scoreboard.md"
    pipeline.write_scoreboard(repo / "results", target, parameters)
    assert "the residual is zero" in target.read_text()
    pipeline.write_scoreboard(repo / "results", target, {**parameters, "quick": True})
    assert "the residual is zero" not in target.read_text()
    assert "leaves out tiny" in capsys.readouterr().out


# --- case 2: results are recorded only after the checks passed ----------------------------------------------


def test_results_carry_the_checks_outcome(repo: Path, fake_papermill: FakePapermill) -> None:
    assert pipeline.main(["execute", *FULL]) == 0
    checks = json.loads((repo / "results" / "tiny.json").read_text())["checks"]
    assert checks["passed"] == 1 and checks["failed"] == [] and checks["skipped"] == 0


def test_a_failing_check_keeps_the_previous_results_and_names_the_check(
    repo: Path, fake_papermill: FakePapermill, capsys: pytest.CaptureFixture
) -> None:
    assert pipeline.main(["execute", *FULL]) == 0
    before = _book_state(repo)
    (repo / "chapters" / "tiny.ipynb").write_text(_notebook(broken=True))
    capsys.readouterr()
    assert pipeline.main(["execute", *FULL]) == 1
    captured = capsys.readouterr()
    failed = [ln for ln in (captured.out + captured.err).splitlines() if ln.startswith("[book] FAILED")]
    assert failed and any("the solver residual stays below 1e-6" in ln for ln in failed), failed
    now = _book_state(repo)
    assert now["results"] == before["results"] and now["figures"] == before["figures"]
    assert not (repo / "_build" / "pending").exists() or not any((repo / "_build" / "pending").iterdir())


def test_a_chapter_that_never_ran_its_checks_is_not_recorded(
    repo: Path, fake_papermill: FakePapermill, capsys: pytest.CaptureFixture
) -> None:
    (repo / "chapters" / "tiny.ipynb").write_text(_notebook(save="ch.save()\n"))
    assert pipeline.main(["execute", *FULL]) == 1
    assert "no checks" in capsys.readouterr().out
    assert not (repo / "results" / "tiny.json").exists()


def test_checks_finished_before_saving_are_recorded_too(repo: Path, fake_papermill: FakePapermill) -> None:
    (repo / "chapters" / "tiny.ipynb").write_text(_notebook(save="checks.finish()\nch.save()\n"))
    assert pipeline.main(["execute", *FULL]) == 0
    assert json.loads((repo / "results" / "tiny.json").read_text())["checks"]["passed"] == 1


def test_the_real_kernel_keeps_good_results_when_a_check_fails(
    repo: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """End to end with papermill and a Jupyter kernel: a quick run elsewhere leaves the book's files alone, and a
    failing check leaves the previous full results in place and is named."""
    assert pipeline.main(["execute", *FULL]) == 0
    before = _book_state(repo)
    assert json.loads((repo / "results" / "tiny.json").read_text())["checks"]["passed"] == 1
    (repo / "chapters" / "tiny.ipynb").write_text(_notebook(broken=True))
    capsys.readouterr()
    assert pipeline.main(["execute", *FULL]) == 1
    captured = capsys.readouterr()
    assert "[book] FAILED tiny: ClaimFailed: claims that do not hold: the solver residual" in captured.out
    now = _book_state(repo)
    assert now["results"] == before["results"] and now["figures"] == before["figures"]


# --- cases 3-5: argument mistakes: one error line, exit code 2, no kernel started ---------------------------

NO_CUDA = [] if torch.cuda.is_available() else [(["execute", "--device", "cuda"], "cuda")]
NO_MPS = [] if torch.backends.mps.is_available() else [(["execute", "--device", "mps"], "mps")]
CUDA_INDEX = f"cuda:{torch.cuda.device_count()}"  # one past the last device: never there


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["execute", "--only"], "valid: tiny"),
        (["build", "--only"], "valid: tiny"),
        (["execute", "--only", "nope"], "unknown chapter 'nope'; valid: tiny"),
        (["execute", "--only", "tiny", "nope"], "unknown chapter 'nope'; valid: tiny"),
        (["execute", "--device", "nonsense"], "unknown device 'nonsense'"),
        (["execute", "--device", ""], "device"),
        (["execute", "--weights", "bogus"], "invalid choice: 'bogus'"),
        (["execute", "--seed", "x"], "invalid int value: 'x'"),
        (["execute", "--seed", "-1"], "--seed"),
        (["execute", "--seed", str(2**32)], "--seed"),
        (["execute", "--quick", "--out", "{root}"], "--out"),
        (["execute", "--quick", "--out", "{root}/_build"], "--out"),
        (["execute", "--out", "{root}/intro.md"], "--out"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "action"),
        (["execute", "--bogus"], "unrecognized arguments: --bogus"),
        (["execute", "--device", CUDA_INDEX], "cuda"),
        (["execute", "--device", "xpu"], "xpu"),
        (["execute", "--device", "meta"], "valid: auto, cpu"),
        (["execute", "--only", "tiny", "--device", "cpu", "--out", "/proc/nope"], "--out"),
        *NO_CUDA,
        *NO_MPS,
    ],
)
def test_argument_mistakes_are_one_line_and_exit_2(
    repo: Path, fake_papermill: FakePapermill, capsys: pytest.CaptureFixture, argv: list[str], says: str
) -> None:
    argv = [a.replace("{root}", str(repo)) for a in argv]
    try:
        code = pipeline.main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], captured.err
    assert fake_papermill.calls == [], "a kernel was started before the arguments were checked"
    assert not (repo / "_build").exists() and not (repo / "results").exists()


def test_python_m_helpers_book_exits_2_without_a_traceback() -> None:
    env = {**os.environ, "COLLISIONS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "helpers.book", "execute", "--device", "nonsense", "--out", "/nonexistent/x"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert "Traceback" not in done.stderr and "unknown device 'nonsense'" in done.stderr


# --- every rule of a results file can fail ------------------------------------------------------------------

GOOD = {
    "chapter": "tiny",
    "quick": False,
    "source_hash": "abc",
    "checks": {"passed": 2, "failed": [], "skipped": 0},
    "figure_sha256": {"tiny_plot": hashlib.sha256(b"png").hexdigest()},
}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"chapter": "other"}, "is not the results file of chapter 'tiny'"),
        ({"quick": True}, "written by a quick run"),
        ({"source_hash": None}, "records no source hash"),
        ({"source_hash": "def"}, "not from the current sources"),
        ({"checks": None}, "records no checks outcome"),
        ({"checks": {"passed": 1, "failed": ["residual below 1e-6"], "skipped": 0}}, "failed checks: residual"),
        ({"figure_sha256": {"gone": "0"}}, "figures/gone.png, which is missing"),
        ({"figure_sha256": {"tiny_plot": "0"}}, "figures/tiny_plot.png, which changed since the run"),
    ],
)
def test_record_problem_catches_each_violation(tmp_path: Path, change: dict, says: str) -> None:
    (tmp_path / "tiny_plot.png").write_bytes(b"png")
    check = {"chapter": "tiny", "source_hash": "abc", "quick": False, "figures": tmp_path}
    assert results.record_problem(GOOD, **check) == ""
    record = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    assert says in results.record_problem(record, **check)


def test_checks_of_two_claims_cells_add_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(results.CHECKS_FILE_ENV, str(tmp_path / "checks.json"))
    first, second = results.Checks(), results.Checks()
    first.require(True, "a")
    first.skip("b", "needs trained weights")
    first.finish()
    second.require(False, "c")
    with pytest.raises(results.ClaimFailed, match="c"):
        second.finish()
    assert results.read_checks(tmp_path / "checks.json") == {"passed": 1, "failed": ["c"], "skipped": 1}
