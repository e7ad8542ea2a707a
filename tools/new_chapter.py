"""Create a chapter notebook skeleton: title, Colab badge, parameters, setup, claim, plan, claims cell.

    python tools/new_chapter.py chapters/11_name "Title" "What the paper claims." "The plan." [issue]

Every chapter starts from this skeleton so that the parameters and setup cells are the same everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers.book.pipeline import COLAB_INSTALL_CELL

REPO = "collisions-book/collisions-book"


def skeleton(path: str, title: str, claim: str, plan: str, issue: str = "") -> nbformat.NotebookNode:
    name = Path(path).stem
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{REPO}/blob/main/{path}.ipynb)"
    )
    params = new_code_cell(
        'device = "auto"   # "auto" (cuda if available), "cpu", "cuda"\n'
        'weights = "auto"  # "auto", "pretrained" (fail if unavailable), "random"\n'
        "quick = False     # small sizes (tests)\n"
        "seed = 0"
    )
    params.metadata["tags"] = ["parameters"]
    claims = new_code_cell(
        "checks = results.Checks()\n"
        f'ch.claim("{name}.planned", "chapter written", paper="—", ours=None, status=results.PENDING,\n'
        f'         reason="planned{f" ({issue})" if issue else ""}")\n'
        "ch.save()\n"
        "checks.finish()"
    )
    claims.metadata["tags"] = ["claims"]
    nb = new_notebook(
        cells=[
            new_markdown_cell(f"# {title}\n\n{badge}"),
            params,
            new_code_cell(COLAB_INSTALL_CELL),
            new_code_cell(
                "from helpers.book import chapter, page, results\nfrom helpers.data import paper\n\n"
                f'ch = chapter.setup("{name}", device=device, weights=weights, quick=quick, seed=seed)'
            ),
            new_markdown_cell(f"## The claim\n\n{claim}"),
            new_markdown_cell(f"## Plan\n\n{plan}"),
            new_markdown_cell("## Claims\n\nThe cell below fails the build if a claim that must hold does not."),
            claims,
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    target = Path(sys.argv[1]).with_suffix(".ipynb")
    if target.exists():
        raise SystemExit(f"{target} exists; not overwriting")
    nbformat.write(skeleton(*sys.argv[1:]), target)
    print(f"wrote {target}")
