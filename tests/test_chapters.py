"""The chapter contract, read from the committed notebooks: chapters narrate and call, the package does the work.

Rules (CONTRIBUTING.md): no outputs committed; no ``def``/``class``; no loop whose body is longer than
``MAX_LOOP_BODY`` lines; at most ``MAX_FIGURE_LINES`` lines of matplotlib code in a cell (figures come from
helpers functions); at most ``MAX_STATEMENTS`` statements in a code cell (the claims cell excepted: it lists
claims); no code cell copied between chapters; the Colab cell is ``pipeline.COLAB_INSTALL_CELL`` (no pins).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import tomllib

from helpers.book import pipeline, verdict

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = pipeline.chapter_notebooks()
MAX_LOOP_BODY = 3
MAX_FIGURE_LINES = 3
MAX_STATEMENTS = 15
#: The names and words of the statuses: only helpers/book/verdict.py decides a status.
STATUS_NAMES = {
    n for n in dir(verdict) if getattr(verdict, n) in verdict.STATUSES and isinstance(getattr(verdict, n), str)
}
STATUS_WORDS = set(verdict.STATUSES)
STATUS_HOLDERS = {"verdict", "results"}
FIGURE_CALL = re.compile(r"\b(plt|ax|axes|fig)\s*(\.|\[)")


def code_cells(notebook: Path) -> list[dict]:
    return [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]


def python_source(cell: dict) -> str:
    """The cell's code with IPython escapes (``!pip``, ``%magic``) replaced by ``pass``."""
    lines = "".join(cell["source"]).splitlines()
    return "\n".join(re.sub(r"^(\s*)[!%].*$", r"\1pass", line) for line in lines)


def status_literals(tree: ast.AST) -> list[str]:
    """Places where code names a status instead of letting ``verdict.status_of`` compute it."""
    imported = {
        a.asname or a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").endswith(("verdict", "results"))
        for a in n.names
    }
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.keyword) and n.arg == "status":
            found.append("passes status=")
        elif isinstance(n, ast.Attribute) and n.attr in STATUS_NAMES and getattr(n.value, "id", "") in STATUS_HOLDERS:
            found.append(f"passes the status {n.attr}")
        elif isinstance(n, ast.Name) and n.id in STATUS_NAMES and n.id in imported:
            found.append(f"passes the status {n.id}")
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.lower() in STATUS_WORDS:
            found.append(f"passes the status literal {n.value!r}")
        elif isinstance(n, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "status" for k in n.keys):
            found.append("builds a claim dict with a 'status'")
    return found


def rule_violations(cell: dict) -> list[str]:
    """The chapter rules one code cell breaks (empty when it follows them)."""
    source = python_source(cell)
    tree = ast.parse(source)
    found = [f"defines {n.name!r}" for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    found += status_literals(tree)
    for loop in (n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))):
        body = (loop.body[-1].end_lineno or loop.body[-1].lineno) - loop.body[0].lineno + 1
        if body > MAX_LOOP_BODY:
            found.append(f"loop at line {loop.lineno} has a {body}-line body (max {MAX_LOOP_BODY})")
    figure_lines = [ln for ln in source.splitlines() if FIGURE_CALL.search(ln) and "ch.figure(" not in ln]
    if len(figure_lines) > MAX_FIGURE_LINES:
        found.append(f"{len(figure_lines)} lines of figure code (max {MAX_FIGURE_LINES})")
    statements = sum(isinstance(n, ast.stmt) for n in ast.walk(tree))
    if statements > MAX_STATEMENTS and pipeline.page_role(cell) != "claims":
        found.append(f"{statements} statements (max {MAX_STATEMENTS})")
    return found


def test_every_chapter_is_checked() -> None:
    assert len(CHAPTERS) >= 10


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_committed_without_outputs(notebook: Path) -> None:
    dirty = [i for i, c in enumerate(code_cells(notebook)) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{notebook.name}: code cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_narrates_and_calls(notebook: Path) -> None:
    problems = [f"cell {i}: {v}" for i, c in enumerate(code_cells(notebook)) for v in rule_violations(c)]
    assert not problems, f"{notebook.name} breaks the chapter rules:\n" + "\n".join(problems)


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_colab_cell_installs_from_the_package(notebook: Path) -> None:
    install = [c for c in code_cells(notebook) if pipeline.page_role(c) == "plumbing" and "pip" in "".join(c["source"])]
    assert len(install) == 1 and "".join(install[0]["source"]) == pipeline.COLAB_INSTALL_CELL


def test_no_code_cell_is_copied_between_chapters() -> None:
    seen: dict[str, str] = {}
    copies = []
    for notebook in CHAPTERS:
        for cell in code_cells(notebook):
            if pipeline.page_role(cell) == "plumbing":
                continue
            key = "\n".join(ln.strip() for ln in python_source(cell).splitlines() if ln.strip())
            if key in seen and seen[key] != notebook.name:
                copies.append(f"{notebook.name} repeats a cell of {seen[key]}: {key[:80]!r}")
            seen.setdefault(key, notebook.name)
    assert not copies, "\n".join(copies)


@pytest.mark.parametrize(
    "source, rule",
    [
        ("def f(x):\n    return x\n", "defines"),
        ("class A:\n    pass\n", "defines"),
        ("for i in range(3):\n    a = i\n    b = a\n    c = b\n    d = c\n", "loop"),
        ("fig, ax = plt.subplots()\nax.plot([1])\nax.set_title('t')\nax.grid(False)\nfig.colorbar(1)\n", "figure"),
        ("\n".join(f"a{i} = {i}" for i in range(MAX_STATEMENTS + 1)), "statements"),
        ("ch.claim('a', 'b', crit, paper=1, ours=1, status='reproduced')\n", "status"),
        ("s = results.REPRODUCED if ok else results.DIFFERS\n", "status"),
        ("s = 'differs'\n", "status"),
        ("from helpers.book.verdict import REPRODUCED\nx = REPRODUCED\n", "status"),
    ],
)
def test_rules_catch_violations(source: str, rule: str) -> None:
    violations = rule_violations({"cell_type": "code", "metadata": {}, "source": source})
    assert any(rule in v for v in violations), violations


#: The only modules that may name a status: the rule itself and the scoreboard that counts them.
STATUS_HOMES = {"helpers/book/verdict.py", "helpers/book/results.py"}


def test_no_module_but_the_verdict_names_a_status() -> None:
    """Experiment modules hand criteria and measurements to ``verdict.status_of``; none writes a status in."""
    offenders = []
    for path in sorted((ROOT / "helpers").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel not in STATUS_HOMES:
            offenders += [f"{rel}: {v}" for v in status_literals(ast.parse(path.read_text()))]
    assert not offenders, "\n".join(offenders)


def test_rules_accept_a_narrating_cell() -> None:
    source = "x = load()\nfor name in names:\n    show(name)\nfig = figures.spectrum(x)\nch.figure(fig, 'a', 'b')\n"
    assert rule_violations({"cell_type": "code", "metadata": {}, "source": source}) == []


def _imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "helpers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


#: import name -> distribution name, where they differ
DISTRIBUTIONS = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "skimage": "scikit-image",
    "IPython": "ipython",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
}


def test_every_import_is_declared_and_pinned() -> None:
    """Each third-party package that helpers/ imports is declared in pyproject (or helpers/nodeps.txt) and pinned."""
    import sys

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    nodeps = (ROOT / "helpers" / "nodeps.txt").read_text()
    pinned = (ROOT / "requirements.txt").read_text() + nodeps

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~ \[;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

    declared_names = {name(d) for d in declared} | {name(ln) for ln in nodeps.splitlines() if ln and ln[0] != "#"}
    pinned_names = {name(ln) for ln in pinned.splitlines() if "==" in ln and not ln.startswith("#")}
    third_party = {m for m in _imported_modules() if m not in sys.stdlib_module_names and m != "helpers"}
    missing = sorted(m for m in third_party if DISTRIBUTIONS.get(m, m).lower().replace("_", "-") not in declared_names)
    unpinned = sorted(d for d in declared_names if d not in pinned_names)
    assert not missing, f"imported by helpers/ but not declared in pyproject.toml: {missing}"
    assert not unpinned, f"declared but not pinned in requirements.txt / helpers/nodeps.txt: {unpinned}"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_a_valid_notebook(notebook: Path) -> None:
    """nbformat's schema holds (cell ids present and unique), so papermill and Jupyter read it without warnings."""
    import nbformat

    nb = nbformat.reads(notebook.read_text(), as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4 and nb.nbformat_minor >= 5
    nbformat.validate(nb)
    ids = [c["id"] for c in nb.cells]
    assert len(ids) == len(set(ids))
