"""GLUE as a LightningDataModule: the original TSV files, or the hub copy when there are none.

Local layout (what GLUE's ``download_glue_data.py`` writes): ``<data_dir>/glue/<DIR>/train.tsv``
and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` and ``dev_mismatched.tsv``). Texts are tokenized per
batch and padded to the longest example in it (dynamic padding).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tsft import paths
from tsft.data.loading import training_loader
from tsft.errors import InputError

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
SUBSET_SEED = 0  # train_limit/eval_limit subsets are the same for every run seed


class Example(NamedTuple):
    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GlueFormat:
    """How one task is stored: TSV columns (names, or indices when there is no header) and labels."""

    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # label strings in id order (the hub's order); None: a float score
    hub_text: tuple[str, str | None]
    dev_splits: tuple[str, ...] = ("dev",)  # file stems; hub split = "validation" + stem suffix
    header: bool = True
    score_range: tuple[float, float] | None = None  # regression: the scores a row may hold (STS-B: 0 to 5)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
FORMATS: dict[str, GlueFormat] = {
    # CoLA has no header row: source, label, original label, sentence.
    "cola": GlueFormat(3, None, 1, BINARY, ("sentence", None), header=False),
    "sst2": GlueFormat("sentence", None, "label", BINARY, ("sentence", None)),
    "mrpc": GlueFormat("#1 String", "#2 String", "Quality", BINARY, ("sentence1", "sentence2")),
    "stsb": GlueFormat("sentence1", "sentence2", "score", None, ("sentence1", "sentence2"), score_range=(0.0, 5.0)),
    "qqp": GlueFormat("question1", "question2", "is_duplicate", BINARY, ("question1", "question2")),
    "mnli": GlueFormat(
        "sentence1",
        "sentence2",
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        ("premise", "hypothesis"),
        dev_splits=("dev_matched", "dev_mismatched"),
    ),
    "qnli": GlueFormat("question", "sentence", "label", NLI2, ("question", "sentence")),
    "rte": GlueFormat("sentence1", "sentence2", "label", NLI2, ("sentence1", "sentence2")),
}


def eval_split_suffix(split: str) -> str:
    """``dev`` -> ``""``, ``dev_matched`` -> ``"_matched"``: appended to metric names."""
    return split.removeprefix("dev")


def read_glue_tsv(path: Path, fmt: GlueFormat, skipped: list[str] | None = None) -> list[Example]:
    """Parse one GLUE TSV file; any row that does not fit raises naming the file and line (given ``skipped``, it is
    left out and its error appended there instead).

    Quotes are ordinary characters in GLUE's TSVs (MRPC, MNLI), so rows are split on newlines and
    tabs only (not on the other characters str.splitlines treats as line breaks); ``utf-8-sig``
    drops the byte-order mark MRPC's files start with.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise InputError(f"{path} line {line} is not UTF-8 text; convert the file to UTF-8") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    start, positions = 0, {}
    if fmt.header:
        if not lines:
            raise InputError(f"{path}: empty file, expected a header row")
        names = lines[0].split("\t")
        wanted = [c for c in (fmt.text_a, fmt.text_b, fmt.label) if c is not None]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise InputError(f"{path} line 1: header lacks column(s) {missing} (has {names})")
        positions = {c: names.index(c) for c in wanted}
        start = 1

    # Column names -> their index in the header; headerless formats give indices directly.
    a, b, y = (positions.get(c, c) for c in (fmt.text_a, fmt.text_b, fmt.label))
    needed = max(i for i in (a, b, y) if i is not None) + 1
    examples = []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) < needed:
                raise InputError(
                    f"{path} line {number}: expected at least {needed} tab-separated fields, found {len(fields)}"
                )
            label = _label(fields[y], fmt, path, number)
        except InputError as row_error:
            if skipped is None:
                raise
            skipped.append(str(row_error))  # task.skip_malformed_rows: counted, logged, in result.json
            continue
        examples.append(Example(fields[a], fields[b] if b is not None else None, label))
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def _label(raw: str, fmt: GlueFormat, path: Path, number: int) -> int | float:
    if fmt.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise InputError(f"{path} line {number}: score {raw!r} is not a number") from None
        low, high = fmt.score_range or (-math.inf, math.inf)
        if not (math.isfinite(score) and low <= score <= high):
            raise InputError(f"{path} line {number}: score {raw!r} lies outside [{low:g}, {high:g}]")
        return score
    if raw not in fmt.labels:
        raise InputError(f"{path} line {number}: label {raw!r} is not one of {list(fmt.labels)}")
    return fmt.labels.index(raw)


def load_local(
    task_dir: Path, fmt: GlueFormat, train_file: str, skipped: dict[str, list[str]] | None = None
) -> dict[str, list[Example]]:
    """The train file and the dev files that exist: the first dev split (MNLI: matched) is required, the others
    (MNLI's mismatched) are evaluated when present. ``skipped``: file name -> the rows left out (else they refuse)."""
    required = {"train": train_file, fmt.dev_splits[0]: f"{fmt.dev_splits[0]}.tsv"}
    for filename in required.values():
        if not (task_dir / filename).is_file():
            raise InputError(f"{task_dir / filename} is missing; the folder must hold {sorted(required.values())}")
    optional = {s: f"{s}.tsv" for s in fmt.dev_splits[1:] if (task_dir / f"{s}.tsv").is_file()}
    splits = {}
    for split, filename in {**required, **optional}.items():
        rows = None if skipped is None else skipped.setdefault(filename, [])
        splits[split] = read_glue_tsv(task_dir / filename, fmt, rows)
    return splits


def load_hub(glue_task: str, fmt: GlueFormat, cache_dir: Path) -> dict[str, list[Example]]:
    import datasets

    from tsft.hub import hub_reachable, use_local_files_only

    if not hub_reachable():  # a cached copy still loads; otherwise fail now, not after the hub's retries
        use_local_files_only()
    hub = datasets.load_dataset(HUB_DATASET, glue_task, cache_dir=str(cache_dir / "datasets"))
    col_a, col_b = fmt.hub_text
    hub_split = {"train": "train", **{s: "validation" + eval_split_suffix(s) for s in fmt.dev_splits}}
    return {
        split: [Example(row[col_a], row[col_b] if col_b else None, row["label"]) for row in hub[name]]
        for split, name in hub_split.items()
    }


def fixed_subset(examples: list[Example], limit: int | None) -> list[Example]:
    """A random subset of ``limit`` examples, the same for every run (order kept)."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(SUBSET_SEED).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


class GlueDataModule(L.LightningDataModule):
    def __init__(self, task: DictConfig, tokenizer: Any, paths_cfg: DictConfig, seed: int) -> None:
        super().__init__()
        if task.glue_task not in FORMATS:
            raise InputError(f"task.glue_task '{task.glue_task}' is not one of {sorted(FORMATS)}")
        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        self.format = FORMATS[task.glue_task]
        self.task_dir = paths.data_dir(paths_cfg) / "glue" / task.dir
        self.cache_dir = paths.cache_dir(paths_cfg)
        self.splits: dict[str, list[Example]] = {}
        self.skipped: dict[str, list[str]] | None = None  # task.skip_malformed_rows: file -> rows left out

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The dev splits there are files for (MNLI without dev_mismatched.tsv: matched only)."""
        return tuple(s for s in self.format.dev_splits if s in self.splits) if self.splits else self.format.dev_splits

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.task_dir.is_dir():
            skipping = self.task.get("skip_malformed_rows", False)
            self.skipped = {} if skipping else None
            splits = load_local(self.task_dir, self.format, self.task.get("train_file", "train.tsv"), self.skipped)
            for filename, rows in (self.skipped or {}).items():
                if rows:
                    log.warning("%s: skipped %d malformed rows (first: %s)", filename, len(rows), rows[0])
            missing = [s for s in self.format.dev_splits if s not in splits]
            if missing:
                log.warning("%s: no %s, evaluating %s only", self.task_dir, missing, list(splits)[1:])
        else:
            splits = self._load_hub_or_explain()
        self.splits = {
            name: fixed_subset(rows, self.task.train_limit if name == "train" else self.task.eval_limit)
            for name, rows in splits.items()
        }

    def _load_hub_or_explain(self) -> dict[str, list[Example]]:
        try:
            return load_hub(self.task.glue_task, self.format, self.cache_dir)
        except Exception as err:  # offline, no such dataset, ...: all mean "supply the files"
            raise InputError(
                f"GLUE {self.task.dir} not found: no folder {self.task_dir} and the hub copy ({HUB_DATASET}) "
                f"could not be loaded ({type(err).__name__}); put the GLUE TSVs in <data_dir>/glue/{self.task.dir}/ "
                "and set TSFT_DATA_DIR=<data_dir> or paths.data_dir=<data_dir>"
            ) from None

    @property
    def num_train_examples(self) -> int:
        return len(self.splits["train"])

    @property
    def num_eval_examples(self) -> int:
        return sum(len(self.splits[s]) for s in self.eval_splits)

    def collate(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        texts_b = [ex.text_b for ex in batch] if self.format.text_b is not None else None
        encoded = self.tokenizer(
            [ex.text_a for ex in batch],
            texts_b,
            truncation=True,
            max_length=self.task.max_length,
            padding=True,
            return_tensors="pt",
        )
        dtype = torch.float32 if self.format.is_regression else torch.long
        encoded["labels"] = torch.tensor([ex.label for ex in batch], dtype=dtype)
        return dict(encoded)

    def train_dataloader(self) -> DataLoader:
        return training_loader(
            self.splits["train"],
            batch_size=self.task.batch_size,
            seed=self.seed,
            collate_fn=self.collate,
            datamodule=self,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                self.splits[split],
                batch_size=self.task.eval_batch_size,
                collate_fn=self.collate,
                generator=torch.Generator().manual_seed(self.seed),
            )
            for split in self.eval_splits
        ]
