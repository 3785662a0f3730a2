"""Commonsense-reasoning (CSR) instruction data in the LLM-Adapters / DoRA format.

Every record is ``{"instruction", "input", "output", "answer"}`` with ``output`` = "the correct answer is
<answer>". Training follows LLM-Adapters' ``finetune.py`` as run by DoRA (the protocol TS-PEFT's Table 1
uses): an Alpaca prompt, the response followed by EOS, sequences cut at 256 tokens and 120 training
examples held out for validation. The paper trains on ``commonsense_170k.json`` (the 8 training sets
merged); when that file is absent the module trains on the per-task ``<set>/train.json`` files that exist
and says so, since results on them are not comparable with the paper's.
"""

from __future__ import annotations

import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tsft import paths
from tsft.data.glue import fixed_subset
from tsft.data.loading import training_loader
from tsft.errors import InputError

log = logging.getLogger(__name__)

# The 8 test sets in the column order of the paper's Table 1; names are LLM-Adapters' dataset folders.
TEST_SETS = ("piqa", "boolq", "hellaswag", "winogrande", "social_i_qa", "openbookqa", "ARC-Easy", "ARC-Challenge")
FULL_TRAIN_FILE = "commonsense_170k.json"
IGNORE_INDEX = -100  # label value the cross-entropy loss skips
DORA_SPLIT_SEED = 42  # DoRA's train_test_split seed for the validation examples

_ANSWER_FORMAT = re.compile(r"Answer format: (\S+)\s*$")  # how every CSR instruction ends

# LLM-Adapters' Alpaca prompt. Its source writes the template as an indented triple-quoted string, so the
# original prompt also carries 16 spaces before "### Instruction:" etc.; we use the clean Alpaca form.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# Special tokens a vocabulary reserves and ordinary text never produces: Llama 3.1 names one for padding
# (id 128004); Llama 3.0 only has unnamed reserved tokens.
RESERVED_PAD_TOKENS = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
ADDED_PAD_TOKEN = "<|pad|>"


def ensure_pad_token(tokenizer) -> bool:
    """Give ``tokenizer`` a pad token that is neither EOS nor a token of ordinary text.

    LLM-Adapters sets pad id 0, which is <unk> in LLaMA-1/2 but "!" in Llama 3; and pad = EOS (SmolLM2's
    default) confuses padding with the EOS the model must learn to emit. Choice, in order: an existing pad
    token other than EOS; a pad token the vocabulary reserves; the unk token when it is not EOS (what
    LLM-Adapters meant, and SmolLM2's "<|endoftext|>"); else a new "<|pad|>". Returns True when a token was
    added: the model's embeddings must then grow to ``len(tokenizer)`` (CausalLMModule sees to it).
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    vocab = tokenizer.get_vocab()
    for token in RESERVED_PAD_TOKENS:
        if token in vocab:
            tokenizer.pad_token = token
            return False
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    return True


def build_prompt(record: dict[str, Any]) -> str:
    """The prompt up to and including "### Response:\\n"; the model's answer follows it."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT.format(instruction=record["instruction"])


def by_prompt_length(records: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """The records, longest prompt (in tokens) first; ties keep their order."""
    if not records:
        return records
    lengths = [len(ids) for ids in tokenizer([build_prompt(r) for r in records], add_special_tokens=True)["input_ids"]]
    return [records[i] for i in sorted(range(len(records)), key=lambda i: -lengths[i])]


def answer_choices(record: dict[str, Any]) -> list[str]:
    """The answers the instruction offers, from its closing "Answer format: a/b/..." line ([] without one)."""
    match = _ANSWER_FORMAT.search(record["instruction"])
    return match.group(1).split("/") if match else []


def candidate_responses(record: dict[str, Any]) -> list[str]:
    """The record's ``output`` ("the correct answer is answer2") with each offered answer in place of its own."""
    stem = record["output"][: len(record["output"]) - len(record["answer"])]
    return [stem + choice for choice in answer_choices(record)]


def load_records(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Read a JSON list of records, checking that each has the string fields ``required``."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
        # "input" is optional: every CSR record has one (empty), other Alpaca-style files may not.
        for field in required:
            if not isinstance(record.get(field), str):
                raise InputError(
                    f"{path}: record {index} needs a string field '{field}' (its fields: {sorted(record)})"
                )
        if not isinstance(record.get("input", ""), str):
            raise InputError(f"{path}: record {index} has a field 'input' that is not a string")
    return records


def find_test_file(csr_dir: Path, name: str) -> Path:
    """``<name>/test.json``, or ``test.reconstructed.json`` (HellaSwag: rebuilt from its source) if only that exists."""
    original = csr_dir / name / "test.json"
    reconstructed = csr_dir / name / "test.reconstructed.json"
    if original.exists() or not reconstructed.exists():
        return original
    return reconstructed


def training_files(csr_dir: Path) -> tuple[list[Path], str | list[str]]:
    """The files to train on and how result.json names them (``train_data``)."""
    full = csr_dir / FULL_TRAIN_FILE
    if full.exists():
        return [full], FULL_TRAIN_FILE
    per_task = sorted(csr_dir.glob("*/train.json"))
    if not per_task:
        raise InputError(
            f"no CSR training data in {csr_dir}: expected {FULL_TRAIN_FILE} (LLM-Adapters' merged training set) "
            "or per-task <set>/train.json files"
        )
    return per_task, [str(path.relative_to(csr_dir)) for path in per_task]


def encode_for_training(
    tokenizer, records: list[dict[str, Any]], cutoff_len: int, train_on_inputs: bool
) -> list[dict[str, list[int]]]:
    """Token ids and labels of prompt + output + EOS, cut to ``cutoff_len`` tokens.

    Prompt and output are tokenized separately, so the prompt tokens are exactly those the model is given
    at evaluation time and the label mask starts exactly at the first response token. Labels of prompt
    tokens are IGNORE_INDEX unless ``train_on_inputs``. As in LLM-Adapters, a sequence longer than
    ``cutoff_len`` loses its tail (and so its EOS).
    """
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token; CSR training appends EOS to every response")
    prompts = tokenizer([build_prompt(r) for r in records], add_special_tokens=True)["input_ids"]
    outputs = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    examples = []
    for prompt_ids, output_ids in zip(prompts, outputs):
        response_ids = [*output_ids, tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[:cutoff_len]
        prompt_labels = prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
        labels = (prompt_labels + response_ids)[:cutoff_len]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def pad_right(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch examples padded at the end: pad id in ``input_ids``, 0 in ``attention_mask``, IGNORE_INDEX in labels."""
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_validation(n_records: int, val_set_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices. Reproduces ``datasets.Dataset.train_test_split(test_size=val_set_size,
    seed=seed)`` that DoRA calls with 120 and 42, so on commonsense_170k.json the same 120 examples are held out."""
    if val_set_size >= n_records:
        raise InputError(f"task.val_set_size={val_set_size} leaves no training examples out of {n_records}")
    permutation = np.random.default_rng(seed).permutation(n_records)
    return permutation[val_set_size:], permutation[:val_set_size]


def load_test_sets(csr_dir: Path, limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """The 8 test sets in Table 1 order; with ``limit``, the same random ``limit`` records of each in every
    run (a prefix would be unrepresentative: HellaSwag, for one, lists its ActivityNet items first)."""
    sets = {}
    for name in TEST_SETS:
        path = find_test_file(csr_dir, name)
        if not path.exists():
            raise InputError(f"CSR test set '{name}' not found: {path}")
        if path.name != "test.json":
            log.warning("CSR test set %s: using %s (not the original LLM-Adapters file)", name, path)
        records = load_records(path, required=("instruction", "output", "answer"))
        for index, record in enumerate(records):
            _check_test_record(path, index, record)
        sets[name] = fixed_subset(records, limit)
    return sets


def _check_test_record(path: Path, index: int, record: dict[str, Any]) -> None:
    """Both evaluation modes need the gold answer among the offered ones and at the end of ``output``."""
    answer = record["answer"]
    if answer not in answer_choices(record):
        raise InputError(
            f"{path}: record {index}: answer {answer!r} is not among those its instruction offers "
            f"(its closing 'Answer format: a/b/...' line: {record['instruction'][-80:]!r})"
        )
    if not record["output"].endswith(answer):
        raise InputError(f"{path}: record {index}: output {record['output']!r} does not end with its answer {answer!r}")


class CSRDataModule(L.LightningDataModule):
    """Instruction tuning on the CSR training data; validation loss on 120 held-out training examples;
    the 8 test sets as test dataloaders of raw records (one per set, Table 1 order) for tsft.eval.csr.

    Reads from ``task``: max_length (LLM-Adapters' cutoff_len), val_set_size, train_on_inputs,
    train_limit, eval_limit, batch_size, eval_batch_size. Gives ``tokenizer`` a proper pad token if it
    lacks one (ensure_pad_token). ``train_data`` names the training files for result.json:
    "commonsense_170k.json" or the list of per-task files, relative to ``<data_dir>/csr``.
    """

    def __init__(self, task: DictConfig, tokenizer: Any, paths_cfg: DictConfig, seed: int) -> None:
        super().__init__()
        ensure_pad_token(tokenizer)  # before the model is built from this tokenizer (its vocabulary size)
        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        self.csr_dir = paths.data_dir(paths_cfg) / "csr"
        self.train_data: str | list[str] | None = None
        self.test_sets: dict[str, list[dict[str, Any]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        files, train_data = training_files(self.csr_dir)
        records = [r for path in files for r in load_records(path, required=("instruction", "output"))]
        if train_data == FULL_TRAIN_FILE:
            log.info("CSR training data: %s (%d examples)", files[0], len(records))
        else:
            log.warning(
                "CSR training data: %s not found in %s; training on the per-task sets present instead: %s "
                "(%d examples). This is a small-scale substitute, not the paper's training set.",
                FULL_TRAIN_FILE,
                self.csr_dir,
                ", ".join(train_data),
                len(records),
            )
        train_idx, val_idx = split_validation(len(records), self.task.val_set_size, DORA_SPLIT_SEED)
        train_records = fixed_subset([records[i] for i in train_idx], self.task.train_limit)
        encode = partial(
            encode_for_training,
            self.tokenizer,
            cutoff_len=self.task.max_length,
            train_on_inputs=self.task.train_on_inputs,
        )
        self.train_examples = encode(train_records)
        self.val_examples = encode([records[i] for i in val_idx])
        self.test_sets = load_test_sets(self.csr_dir, self.task.eval_limit)
        self.train_data = train_data

    @property
    def num_train_examples(self) -> int:
        return len(self.train_examples)

    @property
    def num_eval_examples(self) -> int:
        return sum(len(records) for records in self.test_sets.values())

    def _collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_right(examples, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return training_loader(
            self.train_examples,
            batch_size=self.task.batch_size,
            seed=self.seed,
            collate_fn=self._collate,
            datamodule=self,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, batch_size=self.task.eval_batch_size, collate_fn=self._collate)

    def test_dataloader(self) -> list[DataLoader]:
        # Records stay records: tsft.eval.csr builds the prompts its evaluation mode needs. Batches hold prompts of
        # similar length (longest first, so an out-of-memory batch shows at once): left padding then wastes little
        # of the prefill, which on a CPU costs as much per token at batch 16 as at batch 1. The scores are counts,
        # so the order does not change them.
        return [
            DataLoader(by_prompt_length(records, self.tokenizer), batch_size=self.task.eval_batch_size, collate_fn=list)
            for records in self.test_sets.values()
        ]
