"""The papers' reported numbers (``data/paper_numbers.json``), for side-by-side display only."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any


@functools.cache
def numbers() -> dict[str, Any]:
    """The whole data file as a nested dict (keys: paper, then section)."""
    return json.loads(resources.files("helpers.data").joinpath("paper_numbers.json").read_text())


def get(*path: str) -> Any:
    """A value by its key path, e.g. ``get("ozbulak", "table1", "rows", "ResNet-50", "nullity_W1")``."""
    node: Any = numbers()
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            where = "/".join(path[:i]) or "<root>"
            valid = ", ".join(k for k in node if not k.startswith("_")) if isinstance(node, dict) else "none"
            raise KeyError(f"paper number {'/'.join(path)!r}: no {key!r} under {where}; valid: {valid}")
        node = node[key]
    return node
