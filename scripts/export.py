"""Merge-aware export of a finished TS run: modules whose gate is (nearly) always on are merged into the base
weights, (nearly) always off are dropped, the rest keep their gate (tsft/integrations/merge_export.py).

python scripts/export.py results/runs/glue/sst2/<run>                     # -> <run>/export/
python scripts/export.py <run> --merge-at 0.99 --drop-at 0.01 --out my_export

It evaluates the run's adapter on the run's dev data (which also measures each gate's on-share), writes the
export, loads it back and evaluates it again: export.json records both scores, their difference and the share
of (module, token) decisions the export changes. Load it with tsft.integrations.merge_export.load_export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def export_run(run_dir: Path, out: Path, merge_at: float, drop_at: float) -> dict:
    from tsft.integrations.merge_export import PLAN_FILE, load_export, plan_export, write_export
    from tsft.integrations.run_adapter import evaluate_model, load_run
    from tsft.pipeline import task_family

    model, tokenizer, cfg = load_run(run_dir)
    if not cfg.sparsity.enabled:
        raise ValueError(f"{run_dir} is a dense run: no gate decides per token (peft's merge_and_unload merges it)")
    family = task_family(cfg)
    before = evaluate_model(model, tokenizer, cfg)  # also fills each gate's evaluation counts
    plan = plan_export(model, merge_at=merge_at, drop_at=drop_at)
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # nothing half-written under the final name
    try:
        record = {
            "auto_class": family.auto_class.__name__,
            "source_run": str(run_dir),
            "merge_at": merge_at,
            "drop_at": drop_at,
            "metrics_before": before,
            "score_before": family.score(cfg, before),
        }
        write_export(model, tokenizer, plan, staging, record)
        exported, exported_tokenizer = load_export(staging)
        after = evaluate_model(exported, exported_tokenizer, cfg)
        summary = json.loads((staging / PLAN_FILE).read_text())
        summary["metrics_after"] = after
        summary["score_after"] = family.score(cfg, after)
        if summary["score_before"] is not None and summary["score_after"] is not None:
            summary["score_change"] = summary["score_after"] - summary["score_before"]
        (staging / PLAN_FILE).write_text(json.dumps(summary, indent=1))
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="the export folder (default: <run_dir>/export)")
    parser.add_argument("--merge-at", type=float, default=0.995, help="merge a module on for >= this share of tokens")
    parser.add_argument("--drop-at", type=float, default=0.005, help="drop a module on for <= this share of tokens")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "export"
    if out.exists():
        print(f"error: {out} exists; pass --out <another folder> or delete it", file=sys.stderr)
        return 2
    if not (args.run_dir / "adapter").is_dir():
        print(f"error: {args.run_dir / 'adapter'} does not exist: pass the folder of a finished run", file=sys.stderr)
        return 2
    try:
        summary = export_run(args.run_dir, out, args.merge_at, args.drop_at)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {a}" for a, n in summary["counts"].items())
    print(f"{out}: {counts} of {len(summary['modules'])} gated modules")
    print(f"  changed (module, token) decisions: {100 * summary['changed_decisions']:.2f} %")
    print(f"  score before {summary['score_before']}, after {summary['score_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
