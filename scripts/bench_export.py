"""Inference speed of a TS run's model four ways: the base model, every update merged (dense merged), the
gated model as trained (gated, unmerged), and merge-aware exports (scripts/export.py) at one or more thresholds.

    python scripts/bench_export.py results/runs/glue/sst2/<run> [--settings 0.995:0.005 0.9:0.1] [--rounds 7]

All variants are built in one process from the run's adapter and timed on the same dev-set batches (batch 1 and
batch 16, the run's max length, real tokens counted), alternating the variants inside every round so machine
noise hits them alike. Per variant and batch size: median latency per batch, real tokens/s, and the ratio of
gated-unmerged's time to the variant's (> 1: faster than gated). Each variant's dev score is measured too, so
speed and the score it costs sit side by side. Writes results/bench/export.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def dev_batches(cfg, tokenizer, batch_size: int, examples: int) -> list[dict]:
    """The first ``examples`` dev inputs as model batches of ``batch_size``, padded to the batch's longest, as the
    run's evaluation collates them (a GLUE run)."""
    from tsft.pipeline import task_family

    datamodule = task_family(cfg).datamodule(cfg, tokenizer)
    datamodule.setup("fit")
    dev = list(datamodule.splits[datamodule.eval_splits[0]])[:examples]
    batches = []
    for start in range(0, len(dev), batch_size):
        batch = datamodule.collate(dev[start : start + batch_size])
        batch.pop("labels")
        batches.append(batch)
    return batches


def time_pass(model, batches) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - start


def build_variants(run_dir: Path, settings: list[tuple[float, float]], workdir: Path) -> tuple[dict, dict, object]:
    """{name: model} and {name: score or export summary}; the tokenizer and cfg of the run."""
    from tsft.gate import remove_token_gates
    from tsft.integrations.merge_export import load_export
    from tsft.integrations.run_adapter import evaluate_model, load_run
    from tsft.pipeline import task_family

    sys.path.insert(0, str(ROOT / "scripts"))
    from export import export_run

    gated, tokenizer, cfg = load_run(run_dir)
    score = task_family(cfg).score
    variants, facts = {}, {}
    facts["gated (unmerged)"] = {"score": score(cfg, evaluate_model(gated, tokenizer, cfg))}
    variants["gated (unmerged)"] = gated
    for name, merge in (("base", False), ("dense merged", True)):
        model, _, _ = load_run(run_dir)
        remove_token_gates(model)
        model = model.merge_and_unload() if merge else model.unload()
        facts[name] = {"score": score(cfg, evaluate_model(model, tokenizer, cfg))}
        variants[name] = model.eval()
    for merge_at, drop_at in settings:
        name = f"merge-aware ({merge_at:g} / {drop_at:g})"
        folder = workdir / f"export-{merge_at:g}-{drop_at:g}"
        summary = export_run(run_dir, folder, merge_at, drop_at)
        facts[name] = {
            "score": summary["score_after"],
            "score_change": summary.get("score_change"),
            "counts": summary["counts"],
            "changed_decisions": summary["changed_decisions"],
        }
        variants[name], _ = load_export(folder)
    return variants, facts, (tokenizer, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--settings", nargs="+", default=["0.995:0.005", "0.9:0.1"], help="merge_at:drop_at pairs")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--examples", type=int, default=128, help="dev inputs timed per pass")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "export.json")
    args = parser.parse_args(argv)
    settings = [tuple(float(x) for x in pair.split(":")) for pair in args.settings]
    with tempfile.TemporaryDirectory() as workdir:
        variants, facts, (tokenizer, cfg) = build_variants(args.run_dir, settings, Path(workdir))
        report = {
            "run": str(args.run_dir),
            "task": cfg.task.name,
            "model": cfg.model.name,
            "method": f"{cfg.peft.name} + gates (λ {cfg.sparsity['lambda']:g}, s {cfg.sparsity.s:g})",
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "examples": args.examples,
            "rounds": args.rounds,
            "variants": facts,
            "timing": {},
        }
        for batch_size in args.batch_sizes:
            batches = dev_batches(cfg, tokenizer, batch_size, args.examples)
            tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
            times = {name: [] for name in variants}
            for model in variants.values():
                time_pass(model, batches[:2])  # warm-up
            for round_index in range(args.rounds):
                order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
                for name in order:
                    times[name].append(time_pass(variants[name], batches))
            gated = statistics.median(times["gated (unmerged)"])
            report["timing"][f"batch {batch_size}"] = {
                name: {
                    "latency_ms_per_batch": 1000 * statistics.median(t) / len(batches),
                    "tokens_per_s": tokens / statistics.median(t),
                    "speed_vs_gated": gated / statistics.median(t),
                }
                for name, t in times.items()
            }
            report["timing"][f"batch {batch_size}"]["real_tokens"] = tokens
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for batch, rows in report["timing"].items():
        print(batch)
        for name, row in rows.items():
            if isinstance(row, dict):
                print(f"  {name:32s} {row['latency_ms_per_batch']:8.2f} ms  {row['tokens_per_s']:9.0f} tok/s  "
                      f"x{row['speed_vs_gated']:.3f} vs gated  score {facts[name]['score']}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
