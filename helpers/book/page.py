"""The page: what a chapter shows (HTML blocks, tables, settings).

Every function works in three places: a live notebook (Jupyter, Colab), the executed notebook that the book
renders (HTML outputs), and plain Python (a readable text fallback is printed instead).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any


def in_notebook() -> bool:
    """True inside an IPython kernel (a notebook, papermill, Colab)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ != "TerminalInteractiveShell"


def show_html(text: str, fallback: str = "", display_id: str | None = None) -> Any:
    """Display an HTML block (``fallback`` is printed outside a notebook); returns the display handle or None.

    With ``display_id``, a second call with the same id replaces the first block in place (one banner per
    chapter that grows as models are loaded).
    """
    if not in_notebook():
        print(fallback or text)
        return None
    from IPython.display import HTML, display, update_display

    if display_id is not None and display_id in _SHOWN:
        update_display(HTML(text), display_id=display_id)
        return None
    if display_id is not None:
        _SHOWN.add(display_id)
        return display(HTML(text), display_id=display_id)
    return display(HTML(text))


_SHOWN: set[str] = set()


def cell_text(value: Any, digits: int = 4) -> str:
    """How a value reads in a table cell: floats to ``digits`` significant digits, None as an em dash, objects
    with a ``text()`` method (e.g. ``gauge.Correlation``) by that text."""
    if hasattr(value, "text") and callable(value.text):
        return str(value.text())
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if value is None:
        return "—"
    return str(value)


def table_html(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    labels: dict[str, str] | None = None,
    notes: Sequence[str] = (),
    highlight: str | None = None,
    digits: int = 4,
    caption: str = "",
) -> str:
    """An HTML table of dict rows that fits the text column.

    ``columns``: which keys, in order (default: every key, first-seen order). ``labels``: header (and string
    cell) renames. ``notes``: keys of long explanations; they leave the table and become numbered notes under it,
    the row showing the note's number. ``highlight``: a key whose truthy ("yes"/True) rows are shaded.
    """
    rows = list(rows)
    labels = labels or {}
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    shown = [c for c in columns if c not in notes]
    note_texts: list[str] = []
    body = []
    for r in rows:
        # snake_case names may break after an underscore rather than widen the table
        cells = [
            html.escape(labels.get(v, v) if isinstance(v, str) else cell_text(v, digits)).replace("_", "_<wbr>")
            for v in (r.get(c) for c in shown)
        ]
        refs = []
        for key in notes:
            text = r.get(key)
            if text not in (None, "", "same"):
                note = f"{html.escape(labels.get(key, key))}: {html.escape(str(text))}"
                if note not in note_texts:
                    note_texts.append(note)
                refs.append(str(note_texts.index(note) + 1))
        if notes:
            cells.append(", ".join(refs) or "—")
        attrs = ' class="highlight-row"' if highlight and r.get(highlight) in (True, "yes") else ""
        body.append(f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = [html.escape(labels.get(c, c)).replace("_", "_<wbr>") for c in shown] + (["note"] if notes else [])
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    notes_html = (
        "<ol class='table-notes'>" + "".join(f"<li>{n}</li>" for n in note_texts) + "</ol>" if note_texts else ""
    )
    return (
        f'<div class="collisions-table"><table>{cap}<thead>{head}</thead><tbody>{"".join(body)}</tbody>'
        f"</table>{notes_html}</div>"
    )


def table_text(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """The same table as aligned plain text (for the command line)."""
    rows = list(rows)
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    cells = [[str(c) for c in columns]] + [[cell_text(r.get(c), digits) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)


def table(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    labels: dict[str, str] | None = None,
    notes: Sequence[str] = (),
    highlight: str | None = None,
    digits: int = 4,
    caption: str = "",
) -> None:
    """Show dict rows as a table on the page (see ``table_html``); plain text outside a notebook."""
    rows = list(rows)
    if not rows:
        show_html("<p><i>(empty table)</i></p>", "(empty table)")
        return
    show_html(
        table_html(rows, columns, labels=labels, notes=notes, highlight=highlight, digits=digits, caption=caption),
        table_text(rows, columns, digits),
    )


def key_values(mapping: dict[str, Any], caption: str = "") -> None:
    """Show named settings or results as a two-column table (instead of printing a dict)."""
    table(
        [
            {"name": k, "value": v if isinstance(v, (int, float, str)) or v is None else repr(v)}
            for k, v in mapping.items()
        ],
        caption=caption,
    )


class GluedText(str):
    """A string glued for prose: the same text as plain text (``{glue:text}``) and as Markdown (``{glue:md}``)."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_markdown_(self) -> str:
        return str(self)


def glue(name: str, value: Any) -> None:
    """Make ``value`` available to the chapter's prose (MyST-NB glue), without showing it here.

    Numbers: ``{glue:text}`name:.2f``` in the Markdown; text (a str, e.g. a conclusion a computation chose):
    ``{glue:md}`name```. Numbers and conclusions in prose come from here, never typed. Outside a book build
    (e.g. on Colab without MyST-NB) nothing is shown; the prose then shows the role's name. Returns None, so a
    cell that ends with a glue shows no echo.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, GluedText(value) if isinstance(value, str) else value, display=False)
