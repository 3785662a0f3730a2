"""Summarise λ sweeps (or sweeps of the gate scale s): score and token sparsity, as a printed table and a figure.

    python train.py -m task=glue/rte peft=lora sparsity=ts sparsity.lambda=1e-6,1e-5,1e-4 seed=1,2
    python scripts/sweep_summary.py                       # every (task, TS method) found
    python scripts/sweep_summary.py --task glue/rte --method ts-lora
    -> results/figures/<task>_<method>_lambda.png
    python scripts/sweep_summary.py --over s --preset cpu --overview results/figures/table3_cpu_s_sweep.png --band 40 70
    -> one figure, every (task, method) sweep over s, the target sparsity band shaded

Runs of different models or presets are never pooled: each combination is its own curve, and when
one task/method has several, use --model / --preset to pick the one to plot.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tsft.report.plots import VARIABLES, build_sweep, plot_overview, plot_sweep, sweep_keys, sweep_table  # noqa: E402
from tsft.report.runs import load_runs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "results" / "runs", help="directory searched for result.json"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "figures")
    parser.add_argument("--task", help="e.g. glue/rte (default: every task with TS runs)")
    parser.add_argument("--method", help="e.g. ts-lora (default: every TS method)")
    parser.add_argument("--model")
    parser.add_argument("--preset")
    parser.add_argument("--over", choices=sorted(VARIABLES), default="lambda", help="the swept variable")
    parser.add_argument("--overview", type=Path, help="write one figure with every matching sweep to this file")
    parser.add_argument("--band", type=float, nargs=2, metavar=("LOW", "HIGH"), help="target sparsity %% to shade")
    args = parser.parse_args(argv)

    runs, unreadable = load_runs(args.runs)
    for problem in unreadable:
        print(f"warning: skipped unreadable {problem}", file=sys.stderr)
    wanted = {"task": args.task, "method": args.method, "model": args.model, "preset": args.preset}
    groups = [
        key for key in sweep_keys(runs) if all(v is None or v == k for v, k in zip(wanted.values(), key, strict=True))
    ]
    if not groups:
        print(f"no TS runs with a λ under {args.runs} match {wanted}", file=sys.stderr)
        return 1
    ambiguous = {(t, m) for t, m, *_ in groups if sum(1 for g in groups if g[:2] == (t, m)) > 1}
    if ambiguous:
        for t, m in sorted(ambiguous):
            combos = ", ".join(f"model={g[2]} preset={g[3]}" for g in groups if g[:2] == (t, m))
            print(f"{t} {m}: runs of several settings ({combos}); choose with --model/--preset", file=sys.stderr)
        return 1
    sweeps = [build_sweep(runs, *key, variable=args.over) for key in sorted(groups)]
    for sweep in sweeps:
        print(sweep_table(sweep))
        if args.overview is None:
            print(f"-> {plot_sweep(sweep, args.out)}\n")
    if args.overview is not None:
        shown = [s for s in sweeps if len(s.points) > 1]  # a single point is no sweep
        print(f"-> {plot_overview(shown, args.overview, tuple(args.band) if args.band else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
