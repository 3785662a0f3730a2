"""CSR evaluation speed: tsft's batched generation and log-likelihood scoring against the anchors' batch-size-1
generation (LLM-Adapters' commonsense_evaluate.py, as DoRA runs it), on the same records (issue 22).

    python scripts/bench_csr_eval.py [--per-set 4] [--batch 16] [--beams 1] [--out results/bench/pipeline.json]

SmolLM2-135M (the CPU preset's model) answers the first ``--per-set`` records of each of the 8 real test sets:

- batch 1: one record per ``generate`` call, no padding (the anchor's loop);
- batched: ``--batch`` records per call, left-padded, grouped by prompt length, as tsft's test loop evaluates
  (tsft.data.csr.by_prompt_length, tsft.eval.csr.generate_responses);
- loglik: ``--batch`` records per forward pass, each offered answer scored (tsft.eval.csr.choose_by_loglik).

It reports answers/s of each, the speed-ups over batch 1, and how many batched responses (and extracted
answers) are identical to batch 1's, naming the records that differ. The section ``csr_eval`` of the output
JSON is replaced; its other sections (scripts/bench_pipeline.py's training figures) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_smollm2():
    """SmolLM2-135M and its tokenizer as a CSR run builds them (pad token, embeddings fitted), no adapter."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from tsft import paths
    from tsft.config import CONFIG_DIR
    from tsft.data.csr import ensure_pad_token
    from tsft.lit.causal_lm import fit_embeddings_to_tokenizer
    from tsft.models import load_tokenizer
    from tsft.models.backbone import load_backbone

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=["task=csr", "model=smollm2-135m"])
    cache = paths.cache_dir(cfg.paths)
    tokenizer = load_tokenizer(cfg.model, cache)
    ensure_pad_token(tokenizer)
    model = load_backbone(cfg.model, AutoModelForCausalLM, tokenizer, cache)
    fit_embeddings_to_tokenizer(model, tokenizer)
    return model.eval(), tokenizer


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-set", type=int, default=4, help="records per test set (8 sets)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beams", type=int, default=1, help="1: greedy (the comparison of issue 22)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "pipeline.json")
    args = parser.parse_args(argv)

    from tsft.data.csr import by_prompt_length, load_test_sets
    from tsft.eval.csr import choose_by_loglik, extract_answer, generate_responses

    data = Path(os.environ.get("TSFT_DATA_DIR") or REPO.parent / "shared" / "data") / "csr"
    test_sets = load_test_sets(data)
    records = [(name, record) for name, rows in test_sets.items() for record in rows[: args.per_set]]
    model, tokenizer = load_smollm2()
    generate = dict(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    generate_responses(model, tokenizer, [records[0][1]], **generate)  # warm-up

    single, single_s = timed(lambda: [generate_responses(model, tokenizer, [r], **generate)[0] for _, r in records])

    def in_batches(function):
        """Batches as tsft's test loop makes them: per test set, prompts of similar length together
        (tsft.data.csr.by_prompt_length); the answers come back in the records' order."""
        out = {}
        for name in test_sets:
            own = [i for i, (set_name, _) in enumerate(records) if set_name == name]
            position = {id(records[i][1]): i for i in own}
            ordered = by_prompt_length([records[i][1] for i in own], tokenizer)
            for start in range(0, len(ordered), args.batch):
                chunk = ordered[start : start + args.batch]
                out.update({position[id(r)]: answer for r, answer in zip(chunk, function(chunk))})
        return [out[i] for i in range(len(records))]

    batched, batched_s = timed(lambda: in_batches(lambda rows: generate_responses(model, tokenizer, rows, **generate)))
    loglik, loglik_s = timed(lambda: in_batches(lambda rows: choose_by_loglik(model, tokenizer, rows)))

    answers_single = [extract_answer(name, text) for (name, _), text in zip(records, single)]
    answers_batched = [extract_answer(name, text) for (name, _), text in zip(records, batched)]
    differing = [
        {"test_set": name, "index": i, "batch_1": a, "batched": b}
        for i, ((name, _), a, b) in enumerate(zip(records, single, batched))
        if a != b
    ]
    n = len(records)
    section = {
        "setup": {
            "model": "smollm2-135m (SmolLM2-135M-Instruct, float32)",
            "records": f"{args.per_set} per test set x 8 real CSR test sets = {n}",
            "batch": args.batch,
            "num_beams": args.beams,
            "max_new_tokens": args.max_new_tokens,
            "threads": torch.get_num_threads(),
            "anchor": "LLM-Adapters' commonsense_evaluate.py loop: one record per generate() call",
        },
        "answers_per_s": {"batch_1_generate": n / single_s, "batched_generate": n / batched_s, "loglik": n / loglik_s},
        "speedup_vs_batch_1": {"batched_generate": single_s / batched_s, "loglik": single_s / loglik_s},
        "identical_responses": (n - len(differing)) / n,
        "identical_answers": sum(a == b for a, b in zip(answers_single, answers_batched)) / n,
        "answers_parsed": {
            "batch_1": sum(bool(a) for a in answers_single) / n,
            "batched": sum(bool(a) for a in answers_batched) / n,
        },
        "differing_responses": differing,
        "loglik_agrees_with_batch_1_answer": sum(a == b for a, b in zip(answers_single, loglik)) / n,
        "targets": {"speedup_vs_batch_1.batched_generate": ">= 5", "identical_answers": ">= 0.99"},
    }
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["csr_eval"] = section
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    rates = section["answers_per_s"]
    print(f"answers/s: batch 1 {rates['batch_1_generate']:.2f}, batched {rates['batched_generate']:.2f}, "
          f"loglik {rates['loglik']:.2f}")  # fmt: skip
    print(f"speed-up over batch 1: batched x{section['speedup_vs_batch_1']['batched_generate']:.2f}, "
          f"loglik x{section['speedup_vs_batch_1']['loglik']:.2f}")  # fmt: skip
    print(f"identical responses {100 * section['identical_responses']:.1f} %, "
          f"identical answers {100 * section['identical_answers']:.1f} % -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
