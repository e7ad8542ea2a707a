"""Naive vs fast Table 1 audit, side by side on the same weights: seconds, ratio, and every rank compared.

    python tools/bench_audit.py                          # every Table 1 constructor, random weights
    python tools/bench_audit.py resnet50 deit_tiny_patch16_224 --dtype float32 --json bench.json

Naive: ``svdvals`` of every weight matrix one by one (float64 by default). Fast: ``helpers.audit``'s batched
Cholesky certificates with the SVD only where they cannot decide. Neither uses the audit cache. The load
average is printed because a shared machine inflates both timings (the ratio is the number to quote).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import audit, models, runtime  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(models.TABLE1_ROWS.values()))
    parser.add_argument("--dtype", default="float64", choices=tuple(audit.DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="random", choices=models.WEIGHT_CHOICES)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in models.REGISTRY]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(sorted(models.REGISTRY))}")
    runtime.seed_everything(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"dtype {args.dtype}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    rows, disagreements = [], 0
    for name in args.models:
        model = models.load(name, args.weights, args.device).model  # type: ignore[arg-type]
        result = audit.compare_methods(model, dtype=audit.DTYPES[args.dtype], device=args.device)
        disagreements += len(result["disagree"])
        rows.append(
            {
                "model": name,
                "matrices": result["matrices"],
                "naive_s": round(result["reference_s"], 2),
                "fast_s": round(result["fast_s"], 2),
                "svds_fast": result["svds_fast"],
                "disagree": result["disagree"],
            }
        )
        print(
            f"{name:<38} {result['matrices']:>4} matrices  naive {result['reference_s']:8.1f} s  "
            f"fast {result['fast_s']:6.1f} s  x{result['reference_s'] / max(result['fast_s'], 1e-9):6.1f}  "
            f"fast SVDs {result['svds_fast']}  rank disagreements {len(result['disagree'])}",
            flush=True,
        )
        del model
    naive, fast = sum(r["naive_s"] for r in rows), sum(r["fast_s"] for r in rows)
    print(
        f"total: naive {naive:.1f} s, fast {fast:.1f} s, ratio {naive / max(fast, 1e-9):.1f}x; "
        f"rank disagreements: {disagreements}; load average now {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"dtype": args.dtype, "device": args.device, "rows": rows, "naive_s": naive, "fast_s": fast}, indent=1
            )
        )
    return 1 if disagreements else 0


if __name__ == "__main__":
    raise SystemExit(main())
