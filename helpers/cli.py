"""The command line: ``python -m helpers <command> ...`` (``--help`` on each command).

Every subcommand is defined here and only here; the experiment modules know nothing of argparse. Each
command imports its experiment module when it runs, so that ``models`` or ``load`` work even where an
optional dependency of another command (torchattacks for ``attacks`` and ``gauge``) is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch

from helpers.models import registry


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """Print a command's result: indented JSON with ``--json``, else one ``key: value`` line per entry."""
    print(json.dumps(report, indent=1) if as_json else "\n".join(f"{k}: {v}" for k, v in report.items()))


def parse_eps(text: str) -> float:
    """'8/255' or '0.03' -> float."""
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget {text!r} is not a number; valid: a float (0.03) or a fraction (8/255)") from None


# --- models, load -----------------------------------------------------------------------------------------


def _models_command(args: argparse.Namespace) -> int:
    rows = [
        {"name": s.name, "source": s.source, "builder": s.builder, "task": s.task, "table1": s.table1}
        for s in registry.REGISTRY.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<36} {r['source']:<12} {r['task']:<15} {r['table1'] or ''}")
    return 0


def _load_command(args: argparse.Namespace) -> int:
    loaded = registry.load(args.model, args.weights, args.device)
    info = {
        "model": args.model,
        "weights": loaded.weights,
        "detail": loaded.detail,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
    }
    print_report(info, args.json)
    return 0


def nodeps_requirements() -> str:
    """The text of ``helpers/nodeps.txt``: the pinned packages that must be installed with ``--no-deps``."""
    from importlib import resources

    return resources.files("helpers").joinpath("nodeps.txt").read_text()


def _install_nodeps_command(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(nodeps_requirements())
        f.flush()
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-r", f.name]
        if args.dry_run:
            print(" ".join(command[:-1] + ["helpers/nodeps.txt"]))
            return 0
        return subprocess.call(command)


# --- audit ------------------------------------------------------------------------------------------------


def _audit_command(args: argparse.Namespace) -> int:
    from helpers.experiments import audit as audit_module
    from helpers.linalg import rank_rule

    audit = audit_module.audit_registry_model(
        args.model,
        args.weights,
        args.device,
        dtype=rank_rule.DTYPES[args.dtype],
        rtol=args.rtol,
        method=args.method,
        conv_transpose=args.conv_transpose,
    )
    info = audit.summary()
    if args.json:
        if args.rows:
            info["rows"] = [{**dataclasses.asdict(r), "nullity": r.nullity} for r in audit.rows]
        print(json.dumps(info, indent=1))
        return 0
    for key in (
        "model",
        "weights",
        "n",
        "nu",
        "mu",
        "sum_nullity",
        "nullity_w1",
        "w1_name",
        "w1_shape",
        "structural_nu",
        "structural_sum_nullity",
        "structural_nullity_w1",
        "rule",
        "svds",
        "seconds",
    ):
        print(f"{key}: {info[key]}")
    if args.rows:
        for r in audit.rows:
            print(f"  {r.name:<48} {r.kind:<14} {r.rows:>6} x {r.cols:<6} rank {r.rank:>5} nullity {r.nullity}")
    return 0


# --- collide, attacks -------------------------------------------------------------------------------------


def _collide_command(args: argparse.Namespace) -> int:
    from helpers.experiments import collisions

    print_report(collisions.collide(args.model, args.image, args.beta, args.weights, args.device, args.seed), args.json)
    return 0


def _attacks_command(args: argparse.Namespace) -> int:
    from helpers.data import normalization, photos
    from helpers.experiments import attacks, collisions

    loaded = registry.load(args.model, args.weights, args.device)
    model = normalization.pixel_space(loaded)
    device = next(model.parameters()).device
    if loaded.spec.task != "classification":
        raise ValueError(f"{args.model!r} is a {loaded.spec.task} model; this command runs PGD on classifiers")
    image = photos.imagenet_pixels(photos.load_image(args.image), args.size).to(device)
    eps = parse_eps(args.eps)
    if not 0 < args.reach <= 1:
        raise ValueError(f"--reach must be in (0, 1], got {args.reach}")
    # One budget: PGD's own limit eps. Without a random start PGD moves a pixel at most steps * alpha = reach * eps,
    # leaving room for twins, which are drawn within the same eps (the paper's condition).
    alpha = args.reach * eps / args.steps
    with torch.no_grad():
        label = model(image).argmax(1)
    adversarial = attacks.pgd(model, image, label, eps=eps, alpha=alpha, steps=args.steps, random_start=False)
    twins = collisions.colliding_adversarials(model, image, adversarial, eps=eps, n=args.n)
    report = {
        "model": args.model,
        "weights": loaded.weights,
        "eps": eps,
        "pgd_reach": attacks.pgd_reach(eps, alpha, args.steps, random_start=False),
        **collisions.describe_colliding(model, twins),
    }
    print_report(report, args.json)
    return 0


# --- polytope ---------------------------------------------------------------------------------------------


def _polytope_command(args: argparse.Namespace) -> int:
    from helpers import runtime
    from helpers.data import mnist_data
    from helpers.experiments import polytope
    from helpers.models import train

    device = runtime.resolve_device(args.device)
    if args.weights != "random":
        train.train_mnist(train.CANONICAL[args.model], device)  # trains once, then cached
    loaded = registry.load(args.model, args.weights, device)
    images, _ = mnist_data.load(train=False)
    for index in (args.target, args.start if args.start is not None else args.target):
        if not 0 <= index < len(images):
            raise ValueError(f"test image index {index} out of range; valid: 0..{len(images) - 1}")
    if not isinstance(loaded.model, torch.nn.Sequential):
        raise ValueError(f"{args.model!r} is not an nn.Sequential MNIST model; valid: {', '.join(POLYTOPE_MODELS)}")
    split = polytope.split_sequential(loaded.model, polytope.MNIST_SPLITS[args.model], (1, 28, 28))
    target = images[args.target : args.target + 1]
    start = images[args.start : args.start + 1] if args.start is not None else target
    config = polytope.SearchConfig(alpha=args.alpha, steps=args.steps, lr=args.lr)
    polys = polytope.find_polytopes(split, target, start, args.vertices, config, progress=not args.json)
    report = polytope.measure_polytope(
        split, target[0], polys.vertices[0], args.samples, torch.Generator().manual_seed(0)
    )
    report.pop("samples_kept")
    train_images, _ = mnist_data.load(train=True)
    reference = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:1000]]
    summary = {
        "model": args.model,
        "weights": loaded.weights,
        "layer": split.name,
        **dataclasses.asdict(config),
        **polytope.table_row(report, polytope.mean_pairwise_distance(reference)),
        "seconds_per_vertex": polys.seconds_per_vertex(),
        "seconds_per_polytope": polys.seconds_per_polytope(),
    }
    if args.json:
        print(json.dumps({**summary, "report": report}, indent=1))
    else:
        print("\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    return 0


# --- gauge ------------------------------------------------------------------------------------------------


def _gauge_command(args: argparse.Namespace) -> int:
    from helpers import runtime
    from helpers.book import results
    from helpers.experiments import gauge

    runtime.resolve_device(args.device)  # a bad --device fails before any work
    widths = gauge.SWEEP_QUICK if args.quick else gauge.SWEEP_FULL
    settings = gauge.QUICK_ATTACKS if args.quick else gauge.FULL_ATTACKS
    epochs, train_size = (1, args.train_size or 3000) if args.quick else (args.epochs, args.train_size)
    configs = gauge.sweep_configs(widths, range(args.seeds), epochs, train_size)
    rows = gauge.run_sweep(configs, args.device, settings, progress=not args.json)
    table = gauge.correlation_table(rows, gauge.PAPER_METRICS, gauge.risk_columns(settings), n_boot=args.n_boot)
    if args.json:
        print(json.dumps({"rows": rows, "correlations": gauge.table_jsonable(table)}, indent=1, default=str))
    else:
        print(
            results.markdown_table(
                table,
                [
                    "risk",
                    "metric",
                    "pooled",
                    "given clean_acc",
                    "given log10_params",
                    *dict.fromkeys(r["family"] for r in rows),
                ],
            )
        )
    return 0


# --- the parser -------------------------------------------------------------------------------------------


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options every model command shares: --weights, --device, --json."""
    parser.add_argument("--weights", default="auto", choices=registry.WEIGHT_CHOICES)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    """All subcommands: models, load, install-nodeps, audit, collide, attacks, polytope, gauge."""
    # Option values that live in experiment modules are repeated as plain data here, so that building the
    # parser imports no experiment module (tests/test_cli.py checks they agree).
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models_command)

    p = sub.add_parser("load", help="load a model and say what was really loaded")
    p.add_argument("model", help="a registry name (see `models`)")
    add_common(p)
    p.set_defaults(func=_load_command)

    p = sub.add_parser("install-nodeps", help="pip install --no-deps the pins of helpers/nodeps.txt (Colab)")
    p.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    p.set_defaults(func=_install_nodeps_command)

    p = sub.add_parser("audit", help="Table 1 numbers of a model: n, nu, mu, nullities, W1")
    p.add_argument("model", help="a registry name (see `python -m helpers models`)")
    add_common(p)
    p.add_argument(
        "--dtype",
        default="float64",
        choices=AUDIT_DTYPES,
        help="precision of the rank tolerance; singular values are always computed in float64 (default float64)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="relative rank tolerance (default: max(rows, cols) * eps(dtype), as matrix_rank)",
    )
    p.add_argument("--method", default="fast", choices=("fast", "reference"))
    p.add_argument(
        "--conv-transpose",
        default="skip",
        choices=CONV_TRANSPOSE_RULES,
        help="transposed convolutions: skip (Table 1's count), operator, as_stored",
    )
    p.add_argument("--rows", action="store_true", help="also print every matrix")
    p.set_defaults(func=_audit_command)

    p = sub.add_parser("collide", help="null-space search on a model's first layer: residuals, top-5")
    p.add_argument("model", help="a registry name (see `models`)")
    p.add_argument("--image", default="astronaut", help="sample name, path or URL (ImageNet models)")
    p.add_argument("--beta", type=float, default=2.0, help="perturbation multiplier (model-space units)")
    p.add_argument("--seed", type=int, default=0, help="which basis vector (random choice)")
    add_common(p)
    p.set_defaults(func=_collide_command)

    p = sub.add_parser("attacks", help="PGD + colliding adversarial examples (null-space twins) on a classifier")
    p.add_argument("model", help="a registry classifier whose first layer has a kernel (e.g. deit_tiny_patch16_224)")
    p.add_argument("--image", default="astronaut", help="sample name, path or URL")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--eps", default="8/255", help="the attack's l_inf budget; twins stay within it too (pixels)")
    p.add_argument(
        "--reach", type=float, default=0.5, help="fraction of eps PGD may use (no random start), leaving room for twins"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--n", type=int, default=100)
    add_common(p)
    p.set_defaults(func=_attacks_command)

    p = sub.add_parser("polytope", help="Li et al.'s colliding polytopes around MNIST test digits")
    p.add_argument("model", choices=POLYTOPE_MODELS, help="a book-trained MNIST model")
    p.add_argument("--target", type=int, default=0, help="index of the target in the MNIST test set")
    p.add_argument("--start", type=int, default=None, help="start from this test image (default: the target)")
    p.add_argument("--vertices", type=int, default=5)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=POLYTOPE_DEFAULTS["steps"])
    p.add_argument("--alpha", type=float, default=POLYTOPE_DEFAULTS["alpha"])
    p.add_argument("--lr", type=float, default=POLYTOPE_DEFAULTS["lr"])
    add_common(p)
    p.set_defaults(func=_polytope_command)

    p = sub.add_parser("gauge", help="width sweep: null-space metrics vs adversarial risk (MNIST)")
    p.add_argument("--quick", action="store_true", help="tiny sweep, 1 epoch on 3000 digits (tests)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-size", type=int, default=None, help="training digits (default: all 60,000)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    add_common(p)
    p.set_defaults(func=_gauge_command)
    return parser


AUDIT_DTYPES = ("float64", "float32")
CONV_TRANSPOSE_RULES = ("skip", "operator", "as_stored")
POLYTOPE_MODELS = ("mnist_mlp_2x256", "lenet5")
POLYTOPE_DEFAULTS = {"alpha": 100.0, "steps": 1000, "lr": 0.2}


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad argument or input prints one ``error:`` line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError, registry.WeightsUnavailable) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
