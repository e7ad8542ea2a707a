"""The command line: ``python -m helpers <command> ...`` (``--help`` on each command).

Every subcommand is defined here and only here; the experiment modules know nothing of argparse. Each
command imports its experiment module when it runs, so that ``models`` or ``load`` work even where an
optional dependency of another command (torchattacks for ``attacks`` and ``gauge``) is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from helpers import runtime
from helpers.models import registry
from helpers.usage import OneLineParser, UsageError


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None`` and NumPy/torch scalars and arrays
    turned into plain numbers and lists, recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy and torch scalars and arrays
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any) -> str:
    """Strict JSON (RFC 8259) for ``--json``: a missing or undefined number is ``null``, never NaN/Infinity;
    objects JSON does not know are written as their ``str``."""
    return json.dumps(jsonable(value), indent=1, allow_nan=False, default=str)


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """Print a command's result: strict JSON with ``--json``, else one ``key: value`` line per entry."""
    print(json_text(report) if as_json else "\n".join(f"{k}: {v}" for k, v in report.items()))


#: ``--eps``: an l_inf budget in pixel units (pixels in [0, 1]).
EPS_RANGE = "0 < eps <= 1"


def parse_eps(text: str) -> float:
    """'8/255' or '0.03' -> float in (0, 1]; anything else raises a one-line ``ValueError`` naming the valid forms."""
    num, _, den = text.partition("/")
    try:
        eps = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget {text!r} is not a number; valid: a float (0.03) or a fraction (8/255)") from None
    if not (math.isfinite(eps) and 0 < eps <= 1):
        raise ValueError(f"--eps {text} is out of range; valid: {EPS_RANGE} (pixels in [0, 1]), e.g. 8/255 or 0.03")
    return eps


# --- argument types: ranges and finite numbers, checked by argparse (exit 2, one error line) --------------


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when ``high`` is None)."""
    valid = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; valid: {valid}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; valid: {valid}")
        return value

    return parse


def finite(low: float | None = None, high: float | None = None, *, nonzero: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float; with ``low``, > low; with ``high``, <= high; ``nonzero``: not 0."""
    parts = ["a finite number"]
    if low is not None and high is not None:
        parts.append(f"in ({low:g}, {high:g}]")
    elif low is not None:
        parts.append(f"> {low:g}")
    if nonzero:
        parts.append("nonzero")
    valid = " ".join(parts)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: {valid}") from None
        bad = not math.isfinite(value) or (nonzero and value == 0)
        bad = bad or (low is not None and value <= low) or (high is not None and value > high)
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is out of range; valid: {valid}")
        return value

    return parse


def rank_tolerance(text: str) -> float:
    """An argparse type for ``audit --rtol``: a finite number in [0, 1) (the rank rule's relative tolerance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: a number in [0, 1)") from None
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"{text} is out of range; valid: a number in [0, 1)")
    return value


#: ``--seed``: what NumPy, Python and torch all accept.
SEED = integer(0, 2**32 - 1)
#: MNIST's training set size, the largest ``--train-size``.
MNIST_TRAIN_SIZE = 60_000


# --- models, load -----------------------------------------------------------------------------------------


def _models_command(args: argparse.Namespace) -> int:
    rows = [
        {"name": s.name, "source": s.source, "builder": s.builder, "task": s.task, "table1": s.table1}
        for s in registry.REGISTRY.values()
    ]
    if args.json:
        print(json_text(rows))
    else:
        for r in rows:
            print(f"{r['name']:<36} {r['source']:<12} {r['task']:<15} {r['table1'] or ''}")
    return 0


def _load_command(args: argparse.Namespace) -> int:
    loaded = registry.load(args.model, args.weights, args.device, seed=args.seed)
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
    from helpers.linalg import rank_rule
    from helpers.models import any_model

    result = any_model.audit_any(
        args.model,
        checkpoint=args.checkpoint,
        weights=args.weights,
        device=args.device,
        dtype=rank_rule.DTYPES[args.dtype],
        rtol=args.rtol,
        method=args.method,
        conv_transpose=args.conv_transpose,
    )
    audit, verdict = result.audit, result.first_layer
    info = result.summary()
    if args.json:
        if args.rows:
            info["rows"] = [{**dataclasses.asdict(r), "nullity": r.nullity} for r in audit.rows]
        print(json_text(info))
        return 0
    for key in (
        "model",
        "source",
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
    print(f"first_layer: {verdict.layer} ({verdict.module_type} {list(verdict.weight_shape)}, {verdict.order} order)")
    patch = verdict.patch_nullity if verdict.patch_nullity is not None else verdict.patch_nullity_structural
    print(f"first_layer_patch_nullity: {patch} (forced by the shape: {verdict.patch_nullity_structural})")
    if verdict.groups > 1:
        block = verdict.block_nullity if verdict.block_nullity is not None else verdict.block_nullity_structural
        print(f"first_layer_block_nullity: {block} (groups {verdict.groups})")
    print(f"first_layer_operator: {verdict.operator_structural}")
    if verdict.operator_measured:
        print(f"first_layer_measured: {verdict.operator_measured}")
    print(f"exact_first_layer_collisions: {verdict.answer}")
    for note in verdict.notes:
        print(f"note: {note}")
    if args.rows:
        for r in audit.rows:
            print(f"  {r.name:<48} {r.kind:<14} {r.rows:>6} x {r.cols:<6} rank {r.rank:>5} nullity {r.nullity}")
    return 0


# --- collide, attacks -------------------------------------------------------------------------------------


#: ``collide`` compares the top-5 predictions of an input and its collision.
TOP_K = 5


def collide_refusal(name: str) -> str | None:
    """Why ``collide`` cannot run on registry model ``name`` (None: it can): no class scores to compare."""
    s = registry.spec(name)
    if s.task == "localization":
        return f"{name!r} is a localization model (boxes and masks, no class scores to compare)"
    classes = int(s.kwargs.get("classes", 1)) if s.source == "smp" else TOP_K
    if classes < TOP_K:
        return f"{name!r} outputs {classes} class map (smp's default), fewer than the top-{TOP_K} collide compares"
    return None


def collide_models() -> list[str]:
    """The registry models ``collide`` runs on."""
    return [name for name in registry.REGISTRY if collide_refusal(name) is None]


def _collide_command(args: argparse.Namespace) -> int:
    from helpers.data import photos
    from helpers.experiments import collisions

    refusal = collide_refusal(args.model)
    if refusal:
        raise ValueError(f"{refusal}; valid: {', '.join(collide_models())}")
    if registry.spec(args.model).task == "mnist":
        if args.image is not None:
            raise ValueError(
                f"--image does not apply to {args.model!r}: an MNIST model collides the first MNIST test digit; "
                "valid: leave out --image, or an ImageNet model (see `models`)"
            )
    else:
        photos.load_image(args.image or DEFAULT_IMAGE)  # a bad image fails in one line before the model is built
    report = collisions.collide(
        args.model, args.image or DEFAULT_IMAGE, args.beta, args.weights, args.device, args.seed
    )
    print_report(report, args.json)
    return 0


def _attacks_command(args: argparse.Namespace) -> int:
    from helpers.data import normalization, photos
    from helpers.experiments import attacks, collisions

    task = registry.spec(args.model).task
    if task != "classification":
        classifiers = [n for n, s in registry.REGISTRY.items() if s.task == "classification"]
        raise ValueError(
            f"{args.model!r} is a {task} model; this command runs PGD on classifiers; valid: {', '.join(classifiers)}"
        )
    eps = parse_eps(args.eps)
    picture = photos.load_image(args.image)
    loaded = registry.load(args.model, args.weights, args.device, seed=args.seed)
    model = normalization.pixel_space(loaded)
    device = next(model.parameters()).device
    image = photos.imagenet_pixels(picture, args.size).to(device)
    # One budget: PGD's own limit eps. Without a random start PGD moves a pixel at most steps * alpha = reach * eps,
    # leaving room for twins, which are drawn within the same eps (the paper's condition).
    alpha = args.reach * eps / args.steps
    try:
        with torch.no_grad():
            label = model(image).argmax(1)
    except (RuntimeError, AssertionError, ValueError) as err:  # the input size is the one thing that varies here
        from helpers.experiments import gauge

        why = " ".join(str(err).split())[:160]
        size = gauge.imagenet_input_size(loaded.model, args.model)
        raise ValueError(
            f"--size {args.size} does not fit {args.model!r} ({why}); valid: its input size, {size}"
        ) from err
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
    from helpers.data import mnist_data
    from helpers.experiments import polytope
    from helpers.models import train

    device = runtime.resolve_device(args.device)
    images, _ = mnist_data.load(train=False)
    for index in (args.target, args.start if args.start is not None else args.target):
        if not 0 <= index < len(images):
            raise ValueError(f"test image index {index} out of range; valid: 0..{len(images) - 1}")
    if args.weights != "random":
        train.train_mnist(train.CANONICAL[args.model], device)  # trains once, then cached
    loaded = registry.load(args.model, args.weights, device, seed=args.seed)
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
        print(json_text({**summary, "report": report}))
    else:
        print("\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
    return 0


# --- gauge ------------------------------------------------------------------------------------------------


def _gauge_command(args: argparse.Namespace) -> int:
    from helpers.book import results
    from helpers.experiments import gauge

    widths = gauge.SWEEP_QUICK if args.quick else gauge.SWEEP_FULL
    settings = gauge.QUICK_ATTACKS if args.quick else gauge.FULL_ATTACKS
    epochs, train_size = (1, args.train_size or 3000) if args.quick else (args.epochs, args.train_size)
    configs = gauge.sweep_configs(widths, range(args.seeds), epochs, train_size)
    rows = gauge.run_sweep(configs, args.device, settings, progress=not args.json)
    table = gauge.correlation_table(rows, gauge.PAPER_METRICS, gauge.risk_columns(settings), n_boot=args.n_boot)
    if args.json:
        print(json_text({"rows": rows, "correlations": gauge.table_jsonable(table)}))
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


def add_offline(parser: argparse.ArgumentParser, default: Any = False) -> None:
    """``--offline``: sets ``COLLISIONS_OFFLINE=1`` (no network probe, no download; cached files still used)."""
    help_text = "no network: no probe, no download (same as COLLISIONS_OFFLINE=1)"
    parser.add_argument("--offline", action="store_true", default=default, help=help_text)


def add_common(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """The options every model command shares: --weights, --device, --json, --offline and (``seed``) --seed."""
    parser.add_argument("--weights", default="auto", choices=registry.WEIGHT_CHOICES)
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(runtime.VALID_DEVICES)} (default auto)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (strict JSON, null for NaN)")
    add_offline(parser, default=argparse.SUPPRESS)  # after the command too; the global flag's value is kept
    if seed:
        parser.add_argument(
            "--seed", type=SEED, default=0, help="seeds Python, NumPy and torch, random weights included (default 0)"
        )


def build_parser() -> argparse.ArgumentParser:
    """All subcommands: models, load, install-nodeps, audit, collide, attacks, polytope, gauge."""
    # Option values that live in experiment modules are repeated as plain data here, so that building the
    # parser imports no experiment module (tests/test_cli.py checks they agree).
    parser = OneLineParser(
        prog="python -m helpers",
        description=__doc__,
        epilog="A bad argument or input prints one `error:` line and exits with code 2.",
    )
    add_offline(parser)
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

    p = sub.add_parser("audit", help="Table 1 numbers of any model (n, nu, mu, nullities, W1) and its first layer")
    p.add_argument(
        "model",
        help="a registry name (see `python -m helpers models`), a torchvision builder or a timm model name "
        "(prefix torchvision: or timm: to choose where both have it)",
    )
    add_common(p)
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="a state dict for the named architecture (loaded strictly); --device meta audits shapes only",
    )
    p.add_argument(
        "--dtype",
        default="float64",
        choices=AUDIT_DTYPES,
        help="precision of the rank tolerance; singular values are always computed in float64 (default float64)",
    )
    p.add_argument(
        "--rtol",
        type=rank_tolerance,
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
    p.add_argument(
        "--image",
        default=None,
        help=f"sample name, path or URL (ImageNet models; default {DEFAULT_IMAGE}); MNIST models use a test digit",
    )
    p.add_argument("--beta", type=finite(nonzero=True), default=2.0, help="perturbation multiplier (model-space units)")
    add_common(p)  # --seed also picks the basis vector
    p.set_defaults(func=_collide_command)

    p = sub.add_parser("attacks", help="PGD + colliding adversarial examples (null-space twins) on a classifier")
    p.add_argument("model", help="a registry classifier whose first layer has a kernel (e.g. deit_tiny_patch16_224)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="sample name, path or URL")
    p.add_argument("--size", type=integer(1), default=224, help="input side in pixels (the model's, default 224)")
    p.add_argument(
        "--eps", default="8/255", help=f"the attack's l_inf budget, {EPS_RANGE}; twins stay within it too (pixels)"
    )
    p.add_argument(
        "--reach",
        type=finite(0, 1),
        default=0.5,
        help="fraction of eps PGD may use (no random start), leaving room for twins; in (0, 1]",
    )
    p.add_argument("--steps", type=integer(1), default=10)
    p.add_argument("--n", type=integer(1), default=100, help="twins to draw")
    add_common(p)
    p.set_defaults(func=_attacks_command)

    p = sub.add_parser("polytope", help="Li et al.'s colliding polytopes around MNIST test digits")
    p.add_argument("model", choices=POLYTOPE_MODELS, help="a book-trained MNIST model")
    p.add_argument("--target", type=int, default=0, help="index of the target in the MNIST test set")
    p.add_argument("--start", type=int, default=None, help="start from this test image (default: the target)")
    p.add_argument("--vertices", type=integer(2), default=5, help="vertices per polytope (distances need 2)")
    p.add_argument("--samples", type=integer(1), default=2000)
    p.add_argument("--steps", type=integer(1), default=POLYTOPE_DEFAULTS["steps"])
    p.add_argument("--alpha", type=finite(0), default=POLYTOPE_DEFAULTS["alpha"])
    p.add_argument("--lr", type=finite(0), default=POLYTOPE_DEFAULTS["lr"])
    add_common(p)
    p.set_defaults(func=_polytope_command)

    p = sub.add_parser("gauge", help="width sweep: null-space metrics vs adversarial risk (MNIST)")
    p.add_argument("--quick", action="store_true", help="tiny sweep, 1 epoch on 3000 digits (tests)")
    p.add_argument("--seeds", type=integer(1), default=3, help="seeds per configuration")
    p.add_argument("--epochs", type=integer(1), default=2, help="ignored with --quick (1 epoch)")
    p.add_argument(
        "--train-size",
        type=integer(1, MNIST_TRAIN_SIZE),
        default=None,
        help="training digits (default: all 60,000; 3000 with --quick)",
    )
    p.add_argument("--n-boot", type=integer(1), default=2000, help="bootstrap resamples")
    add_common(p, seed=False)  # the training seeds are 0 .. --seeds - 1
    p.set_defaults(func=_gauge_command)
    return parser


AUDIT_DTYPES = ("float64", "float32")
CONV_TRANSPOSE_RULES = ("skip", "operator", "as_stored")
POLYTOPE_MODELS = ("mnist_mlp_2x256", "lenet5")
POLYTOPE_DEFAULTS = {"alpha": 100.0, "steps": 1000, "lr": 0.2}


DEFAULT_IMAGE = "astronaut"
#: The commands that work on shapes alone, hence accept ``--device meta``.
SHAPE_ONLY_COMMANDS = ("load", "audit")


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad argument or input prints one ``error:`` line and returns 2.

    Before the command: ``--offline`` sets ``COLLISIONS_OFFLINE=1``; ``--device`` is checked; Python, NumPy and
    torch are seeded with ``--seed`` (0 for commands without one), so that every command is reproducible.
    """
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.offline:
        os.environ["COLLISIONS_OFFLINE"] = "1"
        runtime.network_available.cache_clear()
    try:
        if hasattr(args, "device"):  # a bad --device fails before any work
            if runtime.resolve_device(args.device).type == "meta" and args.command not in SHAPE_ONLY_COMMANDS:
                valid = ", ".join(runtime.available_devices())
                raise ValueError(f"--device meta (shapes, no data) cannot run {args.command}; valid: {valid}")
        runtime.seed_everything(getattr(args, "seed", 0))
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError, registry.WeightsUnavailable) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
