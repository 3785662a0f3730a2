"""Table 4, Figure 2 and Figure 3 from hand-made result.json files (tsft/report/analysis.py)."""

from __future__ import annotations

import csv
import json

import pytest

from tsft.report.analysis import figure2_points, make_figure2, make_figure3, pick_module, table4_report


def write_run(root, name, **fields):
    run_dir = root / "glue" / fields["task"].split("/")[-1] / name
    run_dir.mkdir(parents=True)
    result = {"family": "glue", "study": "analysis", "preset": "cpu", "model": "minilm-l6", "ts": False, **fields}
    (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


def selection_run(root, rule, seed, score, task="glue/sst2", p=0.5, draw=0, peft="dora", modules=3):
    selection = {"rule": rule, "p": p, "draw": draw, "modules": [f"m{i}" for i in range(modules)]}
    return write_run(
        root,
        f"{peft}-{rule}-{p}-{draw}-{seed}-{task[-4:]}",
        task=task,
        peft=peft,
        seed=seed,
        score=score,
        trivial_score=50.9,
        selection=selection,
        trainable_params={"peft": 100 * modules},
    )


def test_table4_rows_average_random_draws_and_pair_with_all_modules(tmp_path):
    for seed, base in ((1, 80.0), (2, 82.0), (3, 81.0)):
        selection_run(tmp_path, "all", seed, base, modules=6)
        selection_run(tmp_path, "s_low", seed, base + 2.0)
        for draw, offset in enumerate((-3.0, -1.0, 1.0)):  # draws average to base - 1
            selection_run(tmp_path, "random", seed, base + offset, draw=draw)
    write_run(
        tmp_path,
        "other-study",
        task="glue/sst2",
        peft="dora",
        seed=1,
        score=10.0,
        study=None,
        selection={"rule": "s_low", "p": 0.5, "modules": []},
    )
    report = table4_report(tmp_path, "cpu", "dora")
    rows = {row[0]: row for row in report.grids[0].rows}
    head = report.grids[0].columns
    sst2, avg, paired, paper = (head.index(c) for c in ("SST-2", "Avg", head[-2], head[-1]))
    assert rows["S_low_50%"][sst2] == "83.0 ± 1.0 (n=3)"  # the other study's 10.0 is not pooled
    assert rows["S_low_50%"][paired] == "+2.0 [+2.0, +2.0] (n=3)"  # the same +2 every seed: zero width
    assert rows["random_50% (mean of draws)"][sst2] == "80.0 ± 1.0 (n=3)"
    assert rows["random_50% (mean of draws)"][paired] == "-1.0 [-1.0, -1.0] (n=3)"
    assert rows["DoRA, all modules (reference)"][paper] == "85.0" and rows["S_low_50%"][paper] == "85.7"
    assert rows["S_low_50%"][1] == "3" and rows["DoRA, all modules (reference)"][1] == "6"
    assert report.grids[0].rows[0][0].startswith("Trivial baseline") and report.grids[0].rows[0][sst2] == "50.9"
    assert rows["S_high_50%"][sst2] == "—"  # no runs: nothing made up


def test_figure2_points_put_the_full_module_run_at_100_percent(tmp_path):
    for seed in (1, 2):
        for p, score in ((0.1, 70.0), (0.5, 80.0)):
            selection_run(tmp_path, "s_low", seed, score + seed, p=p, peft="lora")
        selection_run(tmp_path, "all", seed, 78.0 + seed, peft="lora")
    from tsft.report.analysis import analysis_runs

    runs, _ = analysis_runs(tmp_path, "cpu")
    points = figure2_points(runs)["lora"]
    assert [(x, s.mean, s.n) for x, s, _ in points] == [(10.0, 71.5, 2), (50.0, 81.5, 2), (100.0, 79.5, 2)]
    csv_path, png_path = make_figure2(tmp_path, "cpu", tmp_path / "figures")
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert list(csv.reader(csv_path.open()))[1][:3] == ["lora", "10", "71.500"]


def test_figure3_reads_the_two_traced_runs_and_picks_a_module_by_name_or_index(tmp_path):
    names = ["step", "loss", "base_model.model.l0.value", "base_model.model.l1.value"]
    for adam in (True, False):
        run_dir = write_run(
            tmp_path,
            f"trace-{adam}",
            task="glue/sst2",
            peft="lora",
            ts=True,
            seed=1,
            score=80.0,
            **{"lambda": 4e-6},
            config={"sparsity": {"trace_tau": True, "adam": adam}},
        )
        rows = [[step, 0.7 / step, 0.01 * step, 0.02 * step] for step in range(1, 6)]
        with open(run_dir / "tau_trace.csv", "w", newline="") as out:
            csv.writer(out).writerows([names, *rows])
    assert pick_module(names, "l1.value") == 3 and pick_module(names, "0") == 2 and pick_module(names, "-1") == 3
    with pytest.raises(ValueError, match="no gate"):
        pick_module(names, "l9.value")
    (png,) = make_figure3(tmp_path, "cpu", tmp_path / "figures", "l1.value")
    assert png.name == "figure3_cpu.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_figure3_without_both_traced_runs_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="adam=true and one with false"):
        make_figure3(tmp_path, "cpu", tmp_path, "l0.value")
