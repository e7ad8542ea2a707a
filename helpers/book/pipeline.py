"""Build the book: execute chapters with papermill (content-hash cached), write the scoreboard, render.

    python -m helpers.book build               # execute changed chapters, scoreboard, jupyter-book (make build)
    python -m helpers.book build --quick --device cpu --force   # make test: all of it in _build/quick

Chapters are the notebooks listed in ``_toc.yml``. A chapter is re-executed only when its notebook, its
parameters, the ``helpers`` package or the pinned requirements change, or when its results file is not the one
that run wrote. A chapter writes its results and figures into a pending folder; they are kept only when the
notebook ran to the end with every check passed, with the checks' outcome and the content hash of the sources.
The full book (``build`` without ``--quick``: results/ and figures/ of the repository) is staged only from full
runs of the current sources; a quick run needs its own folder (``_build/quick`` by default).
A mistake in the arguments is one ``error:`` line and exit code 2, before any kernel starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers import progress, runtime
from helpers.book import results
from helpers.usage import OneLineParser, UsageError

ROOT = runtime.repo_root()


BUILD = ROOT / "_build"


KERNEL = "collisions-book"


def toc_files() -> list[str]:
    """Every file entry of ``_toc.yml`` (without suffix), in order, the root first."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc.get("parts", toc.get("chapters", [])))
    return files


def chapter_notebooks() -> list[Path]:
    return [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]


def chapter_titles() -> dict[str, str]:
    """Chapter name (notebook stem) -> its first markdown heading."""
    titles = {}
    for nb in chapter_notebooks():
        cells = json.loads(nb.read_text())["cells"]
        heading = next(
            (
                line.lstrip("# ").strip()
                for c in cells
                if c["cell_type"] == "markdown"
                for line in "".join(c["source"]).splitlines()
                if line.startswith("# ")
            ),
            nb.stem,
        )
        titles[nb.stem] = heading
    return titles


def _tree_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        files = (
            sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            if path.is_dir()
            else [path]
        )
        for f in files:
            digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def content_hash(notebook: Path, parameters: dict[str, object]) -> str:
    """Hash of what a chapter's output depends on: notebook, parameters, helpers, pinned requirements."""
    shared = _tree_digest([ROOT / "helpers", ROOT / "requirements.txt"])
    blob = notebook.read_bytes() + json.dumps(parameters, sort_keys=True).encode() + shared.encode()
    return hashlib.sha256(blob).hexdigest()


def _kernel_env() -> dict[str, str]:
    """An environment whose Jupyter kernel ``collisions-book`` is this very interpreter.

    Written under ``_build/jupyter`` and put first on ``JUPYTER_PATH``, so that papermill uses the same
    Python as the build (the project venv, or the interpreter given as ``make PYTHON=...``).
    """
    spec_dir = BUILD / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--log-level=ERROR"],
        "display_name": "Python (collisions-book)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(BUILD / "jupyter"), env.get("JUPYTER_PATH")]))
    return env


@dataclass
class Run:
    chapter: str
    status: str  # executed / cached / FAILED
    seconds: float
    error: str = ""  # the end of the error, for the log
    reason: str = ""  # one line: what failed (the failing check's name when a check failed)


class ChapterFailed(Exception):
    """A chapter ran but left nothing the book may keep (no results, no checks, or results of the wrong kind)."""


def outputs_folder(out: Path, quick: bool) -> Path:
    """Where a build keeps the chapters' ``results/`` and ``figures/``: the repository for the full build in
    ``_build``; the build folder itself for any other build (quick ones included)."""
    return ROOT if out == BUILD and not quick else out


def failure_reason(err: BaseException) -> str:
    """One line saying what made a chapter fail: for a cell error, its exception type and message (a failed check
    raises ``results.ClaimFailed`` naming every check that does not hold)."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:1000]


def _writes(content: str | Path) -> Callable[[Path], object]:
    """For :func:`helpers.runtime.write_atomically`: write ``content`` (text, or a copy of a file) to the path."""
    if isinstance(content, Path):
        return lambda tmp: shutil.copyfile(content, tmp)
    return lambda tmp: tmp.write_text(content)


def _record_path(outputs: Path, stem: str) -> Path:
    return outputs / "results" / f"{stem}.json"


def results_problem(outputs: Path, stem: str, digest: str, quick: bool) -> str:
    """Why ``outputs/results/<stem>.json`` (and the figures it lists) cannot go into a book built with ``quick``
    from the sources whose content hash is ``digest``; "" when they can."""
    path = _record_path(outputs, stem)
    if not path.exists():
        return f"results/{stem}.json is missing"
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"results/{stem}.json is not valid JSON"
    problem = results.record_problem(record, chapter=stem, source_hash=digest, quick=quick, figures=outputs / "figures")
    return f"results/{stem}.json {problem}" if problem else ""


def promote(stem: str, pending: Path, outputs: Path, digest: str, quick: bool) -> None:
    """Keep what a chapter that ran to the end wrote into ``pending``: its figures, then its results file (with the
    checks' outcome, the content hash ``digest`` and the figures' hashes) in ``outputs``. Raises
    :class:`ChapterFailed`, keeping nothing, when the results or the checks are missing or of the wrong kind."""
    record_file = _record_path(pending, stem)
    if not record_file.exists():
        raise ChapterFailed(f"wrote no results/{stem}.json (ch.save() never ran)")
    checks = results.read_checks(pending / "checks.json")
    if checks is None:
        raise ChapterFailed("ran no checks (results.Checks().finish() never ran)")
    if checks["failed"]:
        raise ChapterFailed("checks that do not hold: " + "; ".join(checks["failed"]))
    record = json.loads(record_file.read_text())
    if record.get("chapter") != stem or bool(record.get("quick")) != quick:
        raise ChapterFailed(f"results/{stem}.json names chapter {record.get('chapter')!r}, quick={record.get('quick')}")
    figures = pending / "figures"
    final = results.finalize(record, checks=checks, source_hash=digest, figures=results.figure_digests(figures))
    for png in sorted(figures.glob("*.png")):
        runtime.write_atomically(outputs / "figures" / png.name, _writes(png))
    runtime.write_atomically(_record_path(outputs, stem), _writes(json.dumps(final, indent=1)))


def _run_papermill(nb: Path, target: Path, parameters: dict[str, object], pending: Path) -> None:
    """Execute ``nb`` into ``target`` with the chapter's outputs and checks sent to ``pending``."""
    import papermill

    saved = {k: os.environ.get(k) for k in ("COLLISIONS_OUT", results.CHECKS_FILE_ENV)}
    os.environ["COLLISIONS_OUT"] = str(pending)
    os.environ[results.CHECKS_FILE_ENV] = str(pending / "checks.json")
    try:
        papermill.execute_notebook(
            str(nb),
            str(target),
            parameters=parameters,
            kernel_name=KERNEL,
            cwd=str(nb.parent),
            progress_bar=False,
            log_output=False,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(parameters: dict[str, object], out: Path, force: bool = False, only: list[str] | None = None) -> list[Run]:
    """Execute every chapter (or those in ``only``) into ``out/executed``; skip unchanged ones.

    A chapter runs with its ``results/``, ``figures/`` and checks' outcome sent to ``out/pending/<chapter>``; they
    are moved to the build's outputs (:func:`outputs_folder`) only when the notebook ran to the end with every
    check passed (:func:`promote`). A failed chapter keeps the previous good results, figures and notebook; its
    notebook as it failed is ``out/executed/<chapter>.failed.ipynb``. A chapter is unchanged when its stamp
    matches the content hash and its results file is the one that run wrote (:func:`results_problem`).
    """
    quick = bool(parameters["quick"])
    outputs = outputs_folder(out, quick)
    known = [nb.stem for nb in chapter_notebooks()]
    unknown = [name for name in only or () if name not in known]
    if unknown or only == []:
        what = f"unknown chapter {', '.join(map(repr, unknown))}" if unknown else "no chapter named"
        raise UsageError(f"{what}; valid: {', '.join(known)}")
    os.environ.update(_kernel_env())
    os.environ[progress.STATIC_PROGRESS_ENV] = "1"
    executed = out / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    runs = []
    for nb in [nb for nb in chapter_notebooks() if not only or nb.stem in only]:
        target, stamp = executed / nb.name, executed / f"{nb.stem}.hash"
        digest = content_hash(nb, parameters)
        if not force and target.exists() and stamp.exists() and stamp.read_text() == digest:
            problem = results_problem(outputs, nb.stem, digest, quick)
            if not problem:
                runs.append(Run(nb.stem, "cached", 0.0))
                print(f"[book] {nb.stem}: unchanged, not re-executed", flush=True)
                continue
            print(f"[book] {nb.stem}: {problem}; re-executing", flush=True)
        pending = out / "pending" / nb.stem
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir(parents=True)
        print(f"[book] {nb.stem}: executing ...", flush=True)
        start = time.perf_counter()
        ran = pending / nb.name
        try:
            _run_papermill(nb, ran, parameters, pending)
            promote(nb.stem, pending, outputs, digest, quick)
            os.replace(ran, target)
        except Exception as err:  # papermill's error names the failing cell; keep going, fail at the end
            failed = executed / f"{nb.stem}.failed.ipynb"
            if ran.exists():
                os.replace(ran, failed)
            detail = str(err).strip()[-3000:]
            runs.append(Run(nb.stem, "FAILED", time.perf_counter() - start, detail, failure_reason(err)))
            print(f"[book] FAILED {nb.stem}: {runs[-1].reason}\n{detail}", flush=True)
            print(
                f"[book] {nb.stem}: nothing of this run kept (results, figures); failed notebook: {failed}", flush=True
            )
            continue
        finally:
            shutil.rmtree(pending, ignore_errors=True)
        (executed / f"{nb.stem}.failed.ipynb").unlink(missing_ok=True)
        runtime.write_atomically(stamp, _writes(digest))
        runs.append(Run(nb.stem, "executed", time.perf_counter() - start))
    if (out / "pending").is_dir() and not any((out / "pending").iterdir()):
        (out / "pending").rmdir()
    return runs


def print_timings(runs: list[Run]) -> None:
    print("\n[book] chapter timings")
    for run in runs:
        print(f"  {run.chapter:<40} {run.status:<9} {run.seconds:8.1f} s")
    print(f"  {'total':<40} {'':<9} {sum(r.seconds for r in runs):8.1f} s", flush=True)


def write_scoreboard(results_folder: Path, target: Path, parameters: dict[str, object] | None = None) -> None:
    """Write the scoreboard page from the results files in ``results_folder``.

    With ``parameters`` (those of the build), a record that is not from a run of the current sources with those
    parameters (:func:`helpers.book.results.record_problem`), or of no chapter in the toc, is left out and named.
    """
    records = results.load_all(results_folder)
    if parameters is not None:
        quick = bool(parameters["quick"])
        digests = {nb.stem: content_hash(nb, parameters) for nb in chapter_notebooks()}
        kept = []
        for record in records:
            chapter = str(record.get("chapter"))
            problem = (
                results.record_problem(
                    record,
                    chapter=chapter,
                    source_hash=digests[chapter],
                    quick=quick,
                    figures=results_folder.parent / "figures",
                )
                if chapter in digests
                else "is not a chapter of the toc"
            )
            if problem:
                print(f"[book] scoreboard leaves out {chapter}: results/{chapter}.json {problem}", flush=True)
            else:
                kept.append(record)
        records = kept
    target.write_text(results.scoreboard_markdown(records, chapter_titles()))


def stage_problems(out: Path, outputs: Path, parameters: dict[str, object]) -> list[str]:
    """Why the executed chapters in ``out/executed`` and their results in ``outputs`` cannot make a book built
    with ``parameters``: a notebook whose hash stamp is not the content hash of the current sources and these
    parameters (a quick or stale run), or results that are not the ones that run wrote (:func:`results_problem`).
    A chapter with no executed notebook is left to :func:`stage` to report."""
    quick = bool(parameters["quick"])
    problems = []
    for nb in chapter_notebooks():
        target, stamp = out / "executed" / nb.name, out / "executed" / f"{nb.stem}.hash"
        if not target.exists():
            continue
        digest = content_hash(nb, parameters)
        if not stamp.exists() or stamp.read_text() != digest:
            problems.append(
                f"{nb.stem}: {target} was not executed from the current sources with these parameters "
                f"({'quick' if quick else 'full'} run)"
            )
        problem = results_problem(outputs, nb.stem, digest, quick)
        if problem:
            problems.append(f"{nb.stem}: {problem}")
    return problems


def _tag(cell: dict, tag: str) -> None:
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


#: The Open-in-Colab badge image is remote; the rendered book uses a local copy so it shows offline.
COLAB_BADGE_URL = "https://colab.research.google.com/assets/colab-badge.svg"


LOCAL_COLAB_BADGE = "/_static/colab-badge.svg"


#: The second code cell of every chapter: on Colab, install the helpers package (its dependencies come from
#: pyproject.toml) and the --no-deps pins of helpers/nodeps.txt. No version is written in a chapter.
COLAB_INSTALL_CELL = """import sys

if "google.colab" in sys.modules:  # on Colab: install the book's helpers (locally, `make env` does it)
    !pip install -q "collisions-book @ git+https://github.com/collisions-book/collisions-book" && python -m helpers install-nodeps"""  # noqa: E501


def page_role(cell: dict) -> str:
    """What a chapter cell is for the reader: ``plumbing`` (papermill parameters, the Colab install: removed
    from the page), ``setup`` (``chapter.setup``: code shown, output folded), ``claims`` (the claims cell: code
    folded, its result table shown), or ``content``."""
    tags = cell.get("metadata", {}).get("tags", [])
    source = "".join(cell.get("source", ""))
    if cell["cell_type"] != "code":
        return "content"
    if "parameters" in tags or "injected-parameters" in tags or ("google.colab" in source and "pip install" in source):
        return "plumbing"
    if "chapter.setup(" in source:
        return "setup"
    if "claims" in tags or "results.Checks()" in source:
        return "claims"
    return "content"


def prepare_for_render(notebook: Path, target: Path) -> None:
    """Copy an executed notebook for rendering, with the plumbing out of the reader's way.

    Parameters (the defaults and the values papermill injected) and the Colab install cell are removed from the
    page (they stay in the notebook for Colab and papermill); the setup cell's output and the claims cell's code
    are folded; the Colab badge points at a local image.
    """
    nb = json.loads(notebook.read_text())
    for cell in nb["cells"]:
        role = page_role(cell)
        if role == "plumbing":
            _tag(cell, "remove-cell")
        elif role == "setup":
            _tag(cell, "hide-output")
        elif role == "claims":
            _tag(cell, "hide-input")
        if cell["cell_type"] == "markdown":
            cell["source"] = "".join(cell["source"]).replace(COLAB_BADGE_URL, LOCAL_COLAB_BADGE)
    target.write_text(json.dumps(nb, indent=1))
    shutil.copystat(notebook, target)


def stage(out: Path, outputs: Path, parameters: dict[str, object]) -> Path:
    """Assemble the book's source (config, static files, pages, executed notebooks, scoreboard) under
    ``out/src``; ``outputs`` is the folder that holds the chapters' ``results/`` and ``figures/``.

    Only chapters executed from the current sources with ``parameters`` (the full book: ``quick=False``), with
    the results that run wrote, are staged: anything else stops the build, named (:func:`stage_problems`).
    """
    problems = stage_problems(out, outputs, parameters)
    if problems:
        command = "python -m helpers.book execute" + (" --quick" if parameters["quick"] else "")
        raise SystemExit("[book] cannot stage the book:\n  " + "\n  ".join(problems) + f"\nrun `{command}`")
    src = out / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "references.bib", "logo.png"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "_static", src / "_static")
    for f in toc_files():
        source = out / "executed" / f"{Path(f).name}.ipynb" if (ROOT / f"{f}.ipynb").exists() else ROOT / f"{f}.md"
        if f == "scoreboard":
            continue
        if not source.exists():
            raise SystemExit(f"missing page for toc entry {f!r}: {source}")
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".ipynb":
            prepare_for_render(source, src / f"{f}.ipynb")
        else:
            shutil.copy2(source, src / f"{f}{source.suffix}")
    write_scoreboard(outputs / "results", src / "scoreboard.md", parameters)
    return src


def render(src: Path, path_output: Path) -> Path:
    """Run Jupyter Book (execution off) on the staged source; HTML lands in ``path_output/_build/html``.

    Skipped when the staged source is byte-identical to the one the current HTML was rendered from.
    """
    html = path_output / "_build" / "html"
    index, stamp = html / "index.html", html / ".source-hash"
    digest = _tree_digest([src])
    if index.exists() and stamp.exists() and stamp.read_text() == digest:
        print("[book] book source unchanged, HTML is up to date")
        return index
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or "jupyter-book"
    done = subprocess.run(
        [jupyter_book, "build", str(src), "--path-output", str(path_output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    print(done.stdout, end="")
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args)
    missing = missing_glue(done.stdout)
    if missing:  # MyST-NB renders a missing glue key as nothing: the prose would silently lose its number
        raise RuntimeError("prose refers to numbers no cell glued:\n" + "\n".join(missing))
    stamp.write_text(digest)
    return index


def missing_glue(log: str) -> list[str]:
    """The lines of a Jupyter Book log that report a glue reference without glued data."""
    return [ln.strip() for ln in log.splitlines() if "[mystnb.glue]" in ln]


def build_parser() -> argparse.ArgumentParser:
    from helpers.models import registry

    parser = OneLineParser(
        prog="python -m helpers.book", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["build", "execute", "scoreboard"])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--weights", default="auto", choices=registry.WEIGHT_CHOICES)
    parser.add_argument("--quick", action="store_true", help="small sizes (what make test runs)")
    parser.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}")
    parser.add_argument("--out", type=Path, help="build folder (default: _build; _build/quick with --quick)")
    parser.add_argument("--force", action="store_true", help="re-execute even unchanged chapters")
    parser.add_argument("--only", nargs="*", help="chapter names (notebook stems) to execute")
    return parser


#: The largest seed NumPy accepts (``runtime.seed_everything`` seeds NumPy too).
MAX_SEED = 2**32 - 1


def check_device(device: str) -> None:
    """Raise :class:`UsageError` unless ``device`` is one ``runtime.resolve_device`` finds on this machine (which
    checks it without starting CUDA) and one a chapter can run on (not ``meta``, which holds no numbers)."""
    try:
        resolved = runtime.resolve_device(device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--device: {err}") from err
    if resolved.type == "meta":
        valid = ", ".join(d for d in runtime.VALID_DEVICES if d != "meta")
        raise UsageError(f"--device {device!r}: chapters compute numbers, the meta device has none; valid: {valid}")


def check_arguments(args: argparse.Namespace) -> tuple[dict[str, object], Path]:
    """The chapters' parameters and the build folder, after checking every argument (device, seed, chapter names,
    folder) so that a mistake is reported before any kernel starts; raises :class:`UsageError`."""
    check_device(args.device)
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed {args.seed} is out of range; valid: 0 to {MAX_SEED}")
    known = [nb.stem for nb in chapter_notebooks()]
    if args.only is not None and not args.only:
        raise UsageError(f"--only needs at least one chapter name; valid: {', '.join(known)}")
    unknown = [name for name in args.only or () if name not in known]
    if unknown:
        raise UsageError(f"unknown chapter {', '.join(map(repr, unknown))}; valid: {', '.join(known)}")
    out = (args.out or (BUILD / "quick" if args.quick else BUILD)).resolve()
    if args.quick and out in (ROOT, BUILD):
        raise UsageError(
            f"--out {out} holds the full book; a quick run needs its own folder (default {BUILD / 'quick'})"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out} cannot be created ({err.strerror})") from err
    parameters: dict[str, object] = {
        "device": args.device,
        "weights": args.weights,
        "quick": args.quick,
        "seed": args.seed,
    }
    return parameters, out


def main(argv: list[str] | None = None) -> int:
    """Run one action; a mistake in the arguments prints one ``error:`` line and returns 2, before any kernel."""
    try:
        args = build_parser().parse_args(argv)
        parameters, out = check_arguments(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The full build keeps results/ and figures/ in the repository; any other build keeps them in its own folder,
    # so that quick numbers never reach the book.
    outputs = outputs_folder(out, args.quick)
    os.environ["COLLISIONS_OUT"] = str(outputs)
    if args.action == "scoreboard":
        write_scoreboard(outputs / "results", out / "scoreboard.md", parameters)
        return 0
    only = list(dict.fromkeys(args.only)) if args.only else None
    runs = execute(parameters, out, force=args.force, only=only)
    print_timings(runs)
    failed = [r for r in runs if r.status == "FAILED"]
    if failed:
        for run in failed:
            print(f"[book] FAILED {run.chapter}: {run.reason}", file=sys.stderr)
        return 1
    if args.action == "build":
        start = time.perf_counter()
        index = render(stage(out, outputs, parameters), ROOT if out == BUILD else out)
        print(f"[book] rendered {index} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
