"""The command line: ``python -m helpers <command> ...`` (``--help`` on each command).

Commands come from the experiment modules: each module that defines ``add_cli(subparsers)`` registers its
own subcommand (e.g. ``audit`` in ``helpers.audit``, ``collide`` in ``helpers.nullspace``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import models

#: Modules asked for subcommands, in help order; a module that does not exist yet is skipped.
CLI_MODULES = ("audit", "nullspace", "attacks", "polytope", "gauge")


def _models_command(args: argparse.Namespace) -> int:
    rows = [{"name": s.name, "source": s.source, "builder": s.builder, "task": s.task, "table1": s.table1}
            for s in models.REGISTRY.values()]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<36} {r['source']:<12} {r['task']:<15} {r['table1'] or ''}")
    return 0


def print_report(report: dict, as_json: bool) -> None:
    """Print a command's result: indented JSON with ``--json``, else one ``key: value`` line per entry."""
    print(json.dumps(report, indent=1) if as_json else "\n".join(f"{k}: {v}" for k, v in report.items()))


def _load_command(args: argparse.Namespace) -> int:
    loaded = models.load(args.model, args.weights, args.device)
    info = {"model": args.model, "weights": loaded.weights, "detail": loaded.detail,
            "parameters": sum(p.numel() for p in loaded.model.parameters())}
    print_report(info, args.json)
    return 0


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options every command shares: --weights, --device, --json."""
    parser.add_argument("--weights", default="auto", choices=models.WEIGHT_CHOICES)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models_command)
    p = sub.add_parser("load", help="load a model and say what was really loaded")
    p.add_argument("model", help="a registry name (see `models`)")
    add_common(p)
    p.set_defaults(func=_load_command)
    for name in CLI_MODULES:
        try:
            module = importlib.import_module(f"helpers.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"helpers.{name}":
                raise
            continue
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError, models.WeightsUnavailable) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
