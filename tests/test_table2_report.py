"""Table 2 from hand-made result.json files (tsft/report/table2.py)."""

from __future__ import annotations

import json

from tsft.report.table2 import table2_report


def write(root, name, **fields):
    run_dir = root / "vit" / name
    run_dir.mkdir(parents=True)
    result = {"family": "vit", "study": "table2", "preset": "cpu", "task": "vit", **fields}
    (run_dir / "result.json").write_text(json.dumps(result))


def test_held_out_scores_pair_ts_with_dense_and_skipped_benchmarks_are_explained(tmp_path):
    skipped = {"pope": {"skipped": "8910 of 8910 images missing"}, "vizwiz": {"submission": "/r/vizwiz.json"}}
    for seed, dense, ts in ((1, 40.0, 41.0), (2, 42.0, 42.0), (3, 44.0, 46.0)):
        write(tmp_path, f"lora{seed}", method="lora", peft="lora", seed=seed, score=dense, trivial_score=12.5,
              benchmarks=skipped)  # fmt: skip
        write(tmp_path, f"ts{seed}", method="ts-lora", peft="lora", ts=True, seed=seed, score=ts, trivial_score=12.5,
              sparsity={"overall": 0.6}, benchmarks=skipped, **{"lambda": 2e-6})  # fmt: skip
    write(tmp_path, "stage1", method="heads", peft="heads", seed=1, score=30.0)  # stage 1 is not a table row
    report = table2_report(tmp_path, "cpu")
    grid = report.grids[0]
    held = grid.columns.index("held-out answers (token acc.)")
    rows = {(r[0], r[1]): r for r in grid.rows}
    assert rows[("LoRA", "score — ours")][held] == "42.0 ± 2.0 (n=3)"
    assert rows[("TS-LoRA", "score — ours")][held] == "43.0 ± 2.6 (n=3)"
    paired = next(r for r in grid.rows if r[1] == "score — TS − LoRA, paired (95 % CI)")
    assert paired[held] == "+1.0 [-1.5, +3.5] (n=3)"  # differences 1, 0, 2
    sparsity = next(r for r in grid.rows if r[1].startswith("sparsity % — ours (λ 2e-06)"))
    assert sparsity[held] == "60.0 ± 0.0 (n=3)"
    assert rows[("Trivial baseline", "most common answer token")][held] == "12.5"
    lora_paper = grid.rows[grid.rows.index(rows[("LoRA", "score — ours")]) + 1]
    assert lora_paper[1] == "score — paper (Table 2)" and lora_paper[grid.columns.index("SQA")] == "68.1"
    assert rows[("LoRA", "score — ours")][grid.columns.index("POPE")] == "—"
    assert any(n.startswith("pope: not scored here — 8910 of 8910 images missing") for n in report.notes)
    assert any("vizwiz: not scored here — answers on the evaluation server" in n for n in report.notes)
