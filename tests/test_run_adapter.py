"""Every run leaves <run_dir>/adapter/ (issue 20, part 4): peft's format, the gates, a model card; loading it onto
a rebuilt base model reproduces the run's evaluation metrics exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tsft.gate import find_token_gates
from tsft.integrations.run_adapter import evaluate_run, load_run
from tsft.pipeline import run

from .helpers import compose_config, tiny_overrides
from .test_csr_lit import _write_csr
from .test_vit_training import overrides as vit_overrides
from .test_vit_training import write_captions

TS = ["sparsity=ts", "sparsity.lambda=1e-3", "sparsity.s=0.01"]
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
WORDS = "a man woman dog cat plays sings runs sleeps guitar piano park house quickly slowly".split()


def write_stsb(data_dir):
    """A small STS-B: its Pearson correlation is continuous, so any change to the model's outputs shows."""
    folder = data_dir / "glue" / "STS-B"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for name, count in (("train.tsv", 32), ("dev.tsv", 24)):
        rows = [STSB_HEADER]
        for i in range(count):
            a, b = (" ".join(WORDS[j] for j in torch.randint(len(WORDS), (5,), generator=generator)) for _ in "ab")
            rows.append(
                f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{5 * torch.rand(1, generator=generator).item():.2f}"
            )
        (folder / name).write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize(
    "settings",
    [
        ["peft=lora"],
        ["peft=lora", *TS],
        ["peft=dora", *TS],
        ["peft=adalora", *TS, "peft.deltaT=1"],
        ["peft=adapter", *TS],
    ],
    ids=["lora", "ts-lora", "ts-dora", "ts-adalora", "ts-adapter"],
)
def test_the_saved_adapter_reproduces_the_runs_glue_evaluation_exactly(tmp_path, data_dir, settings):
    # trained enough that the gates and the task head matter: a wrong tau or a lost head changes the predictions
    write_stsb(data_dir)
    run_dir, result = run(compose_config([*tiny_overrides(tmp_path, data_dir), "task=glue/stsb", *settings,
                                          "trainer.max_steps=8", "optim.lr=1e-2"]))  # fmt: skip
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "README.md").is_file()
    assert evaluate_run(run_dir) == result["metrics"]

    model, _, _ = load_run(run_dir)
    gates = find_token_gates(model)
    assert len(gates) == (10 if result["ts"] else 0)
    if gates:  # the thresholds are the trained ones, as in the run's last checkpoint
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        saved = {
            k.removeprefix("model.").removesuffix(".token_gate.tau"): v for k, v in ckpt.items() if k.endswith("tau")
        }
        assert {g.name: float(g.tau) for g in gates} == pytest.approx({n: float(v) for n, v in saved.items()}, abs=0)
        assert max(float(g.tau) for g in gates) > 0
    card = (adapter / "README.md").read_text()
    assert f"# {result['method']} on glue/stsb (tiny-bert)" in card and f"{result['score']:.2f}" in card
    assert ("λ 0.001, s 0.01" in card) == result["ts"]


def test_a_gated_causal_lm_run_reproduces_its_csr_evaluation(tmp_path):
    data = _write_csr(tmp_path / "data")
    cfg = compose_config(
        ["task=csr", "model=tiny-llama", "peft=lora", *TS, f"paths.data_dir={data}",
         f"paths.results_dir={tmp_path / 'results'}", "task.val_set_size=4", "task.batch_size=4",
         "task.eval_batch_size=4", "task.max_length=96", "task.eval_mode=loglik", "trainer.max_steps=4",
         "trainer.enable_progress_bar=false"]
    )  # fmt: skip
    run_dir, result = run(cfg)
    assert evaluate_run(run_dir) == result["metrics"]


def test_a_vision_language_run_reproduces_its_held_out_scores(tmp_path):
    data = tmp_path / "data"
    write_captions(data)
    run_dir, result = run(compose_config(vit_overrides(tmp_path, data, "peft=lora", *TS)))
    assert evaluate_run(run_dir) == result["metrics"]


def test_export_adapter_false_leaves_no_adapter_and_load_run_says_why(tmp_path, data_dir):
    run_dir, _ = run(compose_config([*tiny_overrides(tmp_path, data_dir), "export.adapter=false"]))
    assert not (run_dir / "adapter").exists() and json.loads((run_dir / "result.json").read_text())
    with pytest.raises(FileNotFoundError, match="export.adapter=false"):
        load_run(run_dir)


def test_push_to_hub_refuses_offline_in_one_line_and_uploads_the_folder_where_reachable(
    tmp_path, data_dir, monkeypatch
):
    import tsft.hub
    from tsft.integrations.run_adapter import push_to_hub

    from .helpers import load_script

    run_dir, _ = run(compose_config(tiny_overrides(tmp_path, data_dir)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tsft.hub.hub_reachable.cache_clear()
    with pytest.raises(ConnectionError, match="not reachable"):
        push_to_hub(run_dir, "me/tsft-test")
    assert load_script("adapter").main(["push", str(run_dir), "me/tsft-test"]) == 1

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir())))

    import huggingface_hub

    monkeypatch.setattr(tsft.hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(run_dir, "me/tsft-test") == "https://huggingface.co/me/tsft-test"
    assert calls == [("create", "me/tsft-test", True),
                     ("upload", ["README.md", "adapter_config.json", "adapter_model.safetensors"])]  # fmt: skip
    monkeypatch.undo()
    tsft.hub.hub_reachable.cache_clear()  # the offline answer cached above is not this machine's
