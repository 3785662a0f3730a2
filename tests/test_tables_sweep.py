"""scripts/sweep_summary.py: a λ sweep becomes a printed table and a PNG figure."""

from tests.helpers import load_script
from tests.test_tables_aggregate import write_run


def sweep_runs(root, model_scale=None):
    for lam, scores in ((1e-6, (60.0, 62.0)), (1e-5, (61.0, 61.0)), (1e-4, (55.0, 57.0))):
        for seed, score in enumerate(scores, start=1):
            write_run(
                root,
                task="glue/rte",
                method="ts-lora",
                seed=seed,
                score=score,
                sparsity=lam * 5000,
                lam=lam,
                preset="custom",
                scale=model_scale,
            )
    write_run(root, task="glue/rte", method="lora", seed=1, score=59.0, preset="custom", scale=model_scale)


def test_sweep_plot_and_table(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "figures"
    sweep_runs(runs)
    assert load_script("sweep_summary").main(["--runs", str(runs), "--out", str(out)]) == 0
    figure = out / "rte_ts-lora_lambda.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.iterdir()] == [figure.name]  # no temporary file left behind
    printed = capsys.readouterr().out
    assert "glue/rte ts-lora (model minilm-l6, preset custom)" in printed
    lines = printed.splitlines()
    assert any(line.split() == ["1e-6", "61.0", "±", "1.4", "(n=2)", "0.5", "±", "0.0", "(n=2)"] for line in lines)
    assert any(line.split() == ["1e-4", "56.0", "±", "1.4", "(n=2)", "50.0", "±", "0.0", "(n=2)"] for line in lines)
    assert any(line.split() == ["dense", "lora", "59.0", "(n=1)"] for line in lines)


def test_sweep_refuses_to_pool_models(tmp_path, capsys):
    runs = tmp_path / "runs"
    sweep_runs(runs / "a")
    sweep_runs(runs / "b", model_scale={"model": "tiny-bert"})
    script = load_script("sweep_summary")
    assert script.main(["--runs", str(runs), "--out", str(tmp_path / "f")]) == 1
    assert "choose with --model/--preset" in capsys.readouterr().err
    assert script.main(["--runs", str(runs), "--out", str(tmp_path / "f"), "--model", "tiny-bert"]) == 0
    assert (tmp_path / "f" / "rte_ts-lora_lambda.png").exists()


def test_sweep_without_runs_fails_clearly(tmp_path, capsys):
    assert load_script("sweep_summary").main(["--runs", str(tmp_path), "--out", str(tmp_path / "f")]) == 1
    assert "no TS runs with a λ" in capsys.readouterr().err


def test_a_sweep_over_s_and_the_overview_figure(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "figures"
    for s, sparsity in ((1e-4, 0.2), (3e-4, 0.55), (1e-3, 0.8)):
        write_run(runs, task="glue/sst2", method="ts-lora", seed=1, score=80.0, sparsity=sparsity, lam=2e-5, s=s,
                  preset="cpu", name=f"ts-{s}")  # fmt: skip
    write_run(runs, task="glue/sst2", method="lora", seed=1, score=82.0, preset="cpu")
    overview = out / "overview.png"
    argv = ["--runs", str(runs), "--over", "s", "--overview", str(overview), "--band", "40", "70"]
    assert load_script("sweep_summary").main(argv) == 0
    printed = capsys.readouterr().out
    assert any(line.split()[:2] == ["3e-4", "80.0"] and "55.0" in line for line in printed.splitlines())
    assert overview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # over λ the three runs share one λ and seed: a conflict, not a curve
    assert load_script("sweep_summary").main(["--runs", str(runs), "--out", str(out)]) == 0
    assert "a seed appears in several runs" in capsys.readouterr().out
