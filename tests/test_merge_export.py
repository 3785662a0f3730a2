"""Merge-aware export (issue 20, part 2): gates that are always on are merged, always off are dropped, the rest
kept; where no decision changes, the exported model computes what the gated one did."""

from __future__ import annotations

import json

import pytest
import torch

from tsft.gate import find_token_gates
from tsft.integrations.merge_export import changed_decisions, load_export, plan_export, write_export
from tsft.integrations.run_adapter import evaluate_model, load_run
from tsft.pipeline import run

from .helpers import compose_config, load_script, tiny_overrides
from .test_run_adapter import TS, write_stsb

ALWAYS_ON, ALWAYS_OFF = 0.0, 1e9  # tau: every real token's ratio is above 0, none is above 1e9
AUTO = "AutoModelForSequenceClassification"


def _trained_run(tmp_path, data_dir, settings):
    write_stsb(data_dir)
    overrides = [*tiny_overrides(tmp_path, data_dir), "task=glue/stsb", *settings]
    overrides += ["trainer.max_steps=8", "optim.lr=1e-2"]
    return run(compose_config(overrides))


def _force(model, taus):
    with torch.no_grad():
        for gate, tau in zip(find_token_gates(model), taus):
            if tau is not None:
                gate.tau.fill_(tau)


def _logits(model, tokenizer):
    texts = ["a man plays the guitar", "a dog sleeps in the house quickly"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(
    "settings, expected",
    [
        (["peft=lora", *TS], "merge"),
        (["peft=dora", *TS], "merge"),
        (["peft=adalora", *TS, "peft.deltaT=1"], "merge"),
        (["peft=adapter", *TS], "dense"),
    ],
    ids=["ts-lora", "ts-dora", "ts-adalora", "ts-adapter"],
)
def test_settled_gates_are_merged_or_dropped_and_the_outputs_do_not_change(tmp_path, data_dir, settings, expected):
    run_dir, _ = _trained_run(tmp_path, data_dir, settings)
    model, tokenizer, cfg = load_run(run_dir)
    # 10 gates: 4 always on, 3 always off, 3 at their mean update ratio (so some tokens are on, some off)
    evaluate_model(model, tokenizer, cfg)
    between = [find_token_gates(model)[i].mean_norms("eval")[0] for i in (7, 8, 9)]
    _force(model, [ALWAYS_ON] * 4 + [ALWAYS_OFF] * 3 + between)
    before = evaluate_model(model, tokenizer, cfg)
    gated_logits = _logits(model, tokenizer)
    plan = plan_export(model)
    actions = [step.action for step in plan]
    assert actions == [expected] * 4 + ["drop"] * 3 + ["gate"] * 3
    assert changed_decisions(plan) == 0.0  # on-shares of exactly 1 and 0: nothing applied differently

    out = write_export(model, tokenizer, plan, tmp_path / "export", {"auto_class": AUTO})
    exported, exported_tokenizer = load_export(out)
    kept = {step.name for step in plan if step.action == "gate"}
    assert {g.name for g in find_token_gates(exported)} == kept
    torch.testing.assert_close(_logits(exported, exported_tokenizer), gated_logits, rtol=1e-5, atol=1e-5)
    after = evaluate_model(exported, exported_tokenizer, cfg)
    assert after["pearson"] == pytest.approx(before["pearson"], abs=1e-5)
    summary = json.loads((out / "export.json").read_text())
    assert summary["counts"][expected] == 4 and summary["counts"]["drop"] == 3
    assert [m["action"] for m in summary["modules"]] == actions


def test_a_merged_module_really_holds_the_update_and_a_dropped_one_loses_it(tmp_path, data_dir):
    # can fail: were the update neither folded in nor dropped, the two exports would compute the same
    run_dir, _ = _trained_run(tmp_path, data_dir, ["peft=lora", *TS])
    exports = {}
    for label, tau in (("merged", ALWAYS_ON), ("dropped", ALWAYS_OFF)):
        model, tokenizer, cfg = load_run(run_dir)
        _force(model, [tau] * 10)
        evaluate_model(model, tokenizer, cfg)
        gated = _logits(model, tokenizer)  # every token updated / none (the trained head either way)
        out = write_export(model, tokenizer, plan_export(model), tmp_path / label, {"auto_class": AUTO})
        exported, _ = load_export(out)
        assert not (out / "adapter").exists() and find_token_gates(exported) == []
        torch.testing.assert_close(_logits(exported, tokenizer), gated, rtol=1e-5, atol=1e-5)
        exports[label] = gated
    assert not torch.allclose(exports["merged"], exports["dropped"], atol=1e-3)


def test_plan_thresholds_and_the_changed_share():
    from tsft.integrations.merge_export import ModuleAction

    plan = [ModuleAction("a", 0.996, "merge"), ModuleAction("b", 0.004, "drop"), ModuleAction("c", 0.5, "gate")]
    assert changed_decisions(plan) == pytest.approx((0.004 + 0.004 + 0.0) / 3)
    with pytest.raises(ValueError, match="drop_at <= merge_at"):
        plan_export(torch.nn.Linear(2, 2), merge_at=0.4, drop_at=0.5)


def test_the_export_script_measures_the_score_before_and_after_and_refuses_to_overwrite(tmp_path, data_dir, capsys):
    run_dir, result = _trained_run(tmp_path, data_dir, ["peft=lora", *TS])
    script = load_script("export")
    assert script.main([str(run_dir)]) == 0
    summary = json.loads((run_dir / "export" / "export.json").read_text())
    assert summary["score_before"] == pytest.approx(result["score"], abs=1e-9)  # the run's own evaluation, again
    assert summary["score_change"] == pytest.approx(summary["score_after"] - summary["score_before"])
    assert sum(summary["counts"].values()) == 10 and 0.0 <= summary["changed_decisions"] <= 0.005
    assert not list(run_dir.glob("export.tmp-*"))
    assert "score before" in capsys.readouterr().out
    assert script.main([str(run_dir)]) == 2
    assert "exists; pass --out" in capsys.readouterr().err


def test_the_export_script_refuses_a_dense_run(tmp_path, data_dir, capsys):
    run_dir, _ = _trained_run(tmp_path, data_dir, ["peft=lora"])
    assert load_script("export").main([str(run_dir)]) == 2
    assert "dense run" in capsys.readouterr().err
    assert not (run_dir / "export").exists()


def test_the_export_benchmark_times_every_variant_and_scores_it(tmp_path, data_dir):
    run_dir, result = _trained_run(tmp_path, data_dir, ["peft=lora", *TS])
    out = tmp_path / "export.json"
    argv = [str(run_dir), "--settings", "0.995:0.005", "0:0", "--rounds", "1", "--examples", "4", "--out", str(out)]
    assert load_script("bench_export").main(argv) == 0
    report = json.loads(out.read_text())
    names = ["gated (unmerged)", "base", "dense merged", "merge-aware (0.995 / 0.005)", "merge-aware (0 / 0)"]
    assert list(report["variants"]) == names
    assert report["variants"]["gated (unmerged)"]["score"] == pytest.approx(result["score"], abs=1e-9)
    # merge_at 0 merges every module: the dense merged model again, score and all
    merged_all = report["variants"]["merge-aware (0 / 0)"]
    assert merged_all["counts"]["merge"] == 10
    assert merged_all["score"] == pytest.approx(report["variants"]["dense merged"]["score"], abs=1e-5)
    for batch in ("batch 1", "batch 16"):
        assert report["timing"][batch]["gated (unmerged)"]["speed_vs_gated"] == 1.0
        assert all(report["timing"][batch][n]["tokens_per_s"] > 0 for n in names)
