"""Build the book: execute chapters with papermill (content-hash cached), write the scoreboard, render.

    python -m helpers.book build               # execute changed chapters, scoreboard, jupyter-book (make build)
    python -m helpers.book build --quick --device cpu --force   # make test: all of it in _build/quick

Chapters are the notebooks listed in ``_toc.yml``. A chapter is re-executed only when its notebook, its
parameters, the ``helpers`` package or the pinned requirements change.
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
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers import progress, runtime
from helpers.book import results

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
    error: str = ""


def execute(parameters: dict[str, object], out: Path, force: bool = False, only: list[str] | None = None) -> list[Run]:
    """Execute every chapter (or those in ``only``) into ``out/executed``; skip unchanged ones."""
    import papermill

    os.environ.update(_kernel_env())
    os.environ[progress.STATIC_PROGRESS_ENV] = "1"
    executed = out / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    runs = []
    notebooks = [nb for nb in chapter_notebooks() if not only or nb.stem in only]
    if only and len(notebooks) != len(only):
        known = ", ".join(nb.stem for nb in chapter_notebooks())
        raise SystemExit(f"unknown chapter in {only}; valid: {known}")
    for nb in notebooks:
        target, stamp = executed / nb.name, executed / f"{nb.stem}.hash"
        digest = content_hash(nb, parameters)
        if not force and target.exists() and stamp.exists() and stamp.read_text() == digest:
            runs.append(Run(nb.stem, "cached", 0.0))
            print(f"[book] {nb.stem}: unchanged, not re-executed", flush=True)
            continue
        stamp.unlink(missing_ok=True)
        print(f"[book] {nb.stem}: executing ...", flush=True)
        start = time.perf_counter()
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
        except Exception as err:  # papermill's error names the failing cell; keep going, fail at the end
            runs.append(Run(nb.stem, "FAILED", time.perf_counter() - start, str(err).strip()[-3000:]))
            print(f"[book] {nb.stem}: FAILED\n{runs[-1].error}", flush=True)
            continue
        stamp.write_text(digest)
        runs.append(Run(nb.stem, "executed", time.perf_counter() - start))
    return runs


def print_timings(runs: list[Run]) -> None:
    print("\n[book] chapter timings")
    for run in runs:
        print(f"  {run.chapter:<40} {run.status:<9} {run.seconds:8.1f} s")
    print(f"  {'total':<40} {'':<9} {sum(r.seconds for r in runs):8.1f} s", flush=True)


def write_scoreboard(results_folder: Path, target: Path) -> None:
    target.write_text(results.scoreboard_markdown(results.load_all(results_folder), chapter_titles()))


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


def stage(out: Path, outputs: Path) -> Path:
    """Assemble the book's source (config, static files, pages, executed notebooks, scoreboard) under
    ``out/src``; ``outputs`` is the folder that holds the chapters' ``results/`` and ``figures/``."""
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
    write_scoreboard(outputs / "results", src / "scoreboard.md")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.book", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["build", "execute", "scoreboard"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default="auto", choices=["auto", "pretrained", "random"])
    parser.add_argument("--quick", action="store_true", help="small sizes (what make test runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="build folder (default: _build; _build/quick with --quick)")
    parser.add_argument("--force", action="store_true", help="re-execute even unchanged chapters")
    parser.add_argument("--only", nargs="*", help="chapter names (notebook stems) to execute")
    args = parser.parse_args(argv)
    parameters = {"device": args.device, "weights": args.weights, "quick": args.quick, "seed": args.seed}
    out = (args.out or (BUILD / "quick" if args.quick else BUILD)).resolve()
    # The full build keeps results/ and figures/ in the repository; any other build keeps them in its own folder,
    # so that quick numbers never reach the book.
    outputs = ROOT if out == BUILD and not args.quick else out
    os.environ["COLLISIONS_OUT"] = str(outputs)
    if args.action == "scoreboard":
        write_scoreboard(outputs / "results", out / "scoreboard.md")
        return 0
    runs = execute(parameters, out, force=args.force, only=args.only)
    print_timings(runs)
    failed = [r.chapter for r in runs if r.status == "FAILED"]
    if failed:
        print(f"[book] FAILED chapters: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.action == "build":
        start = time.perf_counter()
        index = render(stage(out, outputs), ROOT if out == BUILD else out)
        print(f"[book] rendered {index} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
