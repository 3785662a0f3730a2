# ruff: noqa: E501  (the table of rows reads best one row to a line)
"""The bad-input table (issue 21): every row is refused through train.py's command line with exit status 1 and
exactly one line on stderr that names the fix, before anything is written under results/ (or Hydra's
outputs/ in the working directory), and before model weights are loaded wherever the input allows it.

The rows run train.py's ``__main__`` in this process (interpreter start-up costs ~7 s a row on 2 cores);
``test_in_process_verdict_is_the_processes`` shows for a sample that a real process prints the same line.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

import tsft.models.build

from .helpers import REPO_ROOT, tiny_overrides, write_rte

STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


@dataclass(frozen=True)
class Row:
    overrides: tuple[str, ...]
    message: str  # what the one line says (a substring after "error: ")
    before_weights: bool = True  # refused before any model weights are built or loaded
    setup: Callable[[Path, Path], list[str]] | None = None  # (tmp_path, a real checkpoint) -> more overrides


def bad_stsb(score: str) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, ckpt: Path) -> list[str]:
        folder = tmp / "data" / "glue" / "STS-B"
        folder.mkdir(parents=True)
        rows = [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\ta man sings {i}\ta man is singing\t3.0" for i in range(8)]
        rows[3] = rows[3].rpartition("\t")[0] + f"\t{score}"
        for name in ("train.tsv", "dev.tsv"):
            (folder / name).write_text("\n".join([STSB_HEADER, *rows]) + "\n")
        return ["task=glue/stsb"]

    return setup


def rte_line(line: str) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, ckpt: Path) -> list[str]:
        with open(tmp / "data" / "glue" / "RTE" / "train.tsv", "a") as f:
            f.write(line + "\n")
        return []

    return setup


def latin1_rte(tmp: Path, ckpt: Path) -> list[str]:
    with open(tmp / "data" / "glue" / "RTE" / "train.tsv", "ab") as f:
        f.write("99\tcaf\xe9 au lait\tit is coffee\tentailment\n".encode("latin-1"))
    return []


def no_dev_file(tmp: Path, ckpt: Path) -> list[str]:
    (tmp / "data" / "glue" / "RTE" / "dev.tsv").unlink()
    return []


def file_in_the_way(tmp: Path, ckpt: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"paths.results_dir={tmp / 'afile' / 'results'}"]


def ckpt_file(content: bytes | None) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, ckpt: Path) -> list[str]:
        path = tmp / "bad.ckpt"
        if content is None:
            torch.save({"state_dict": {}, "epoch": 0}, path)  # a torch file, not a tsft checkpoint
        else:
            path.write_bytes(content)
        return [f"ckpt_path={path}"]

    return setup


def real_ckpt(truncate: bool = False) -> Callable[[Path, Path], list[str]]:
    """tsft's own last.ckpt from a tiny LoRA run (r 4) of tiny-bert on RTE, intact or cut in half."""

    def setup(tmp: Path, ckpt: Path) -> list[str]:
        path = ckpt
        if truncate:
            cut = tmp / "cut.ckpt"
            cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            path = cut
        return [*CKPT_RUN, f"ckpt_path={path}"]  # the rows differ from the saved run in their own overrides only

    return setup


CKPT_RUN = ["trainer.max_steps=-1", "trainer.max_epochs=1"]  # one epoch of 4 steps: its end saves last.ckpt

ROWS: dict[str, Row] = {
    # group choices and keys
    "unknown peft": Row(("peft=lorra",), "unknown peft 'lorra'; choose one of: adalora, adapter, dora, heads, lora"),
    "unknown task": Row(("task=glue/rtee",), "unknown task 'glue/rtee'"),
    "unknown logger": Row(("logger=nope",), "unknown logger 'nope'"),
    "misspelt group key": Row(("sparsty.lambda=1e-5",), "'sparsty.lambda' is not a setting of tsft; did you mean sparsity.lambda"),
    "bare lr": Row(("lr=1e-3",), "'lr' is not a setting of tsft; did you mean task.lr or optim.lr?"),
    "unknown task key": Row(("task.nosuch=1",), "'task.nosuch' is not a setting of tsft"),
    "misspelt trainer key": Row(("trainer.max_stepz=3",), "did you mean trainer.max_steps"),
    "added unknown top key": Row(("+anything=1",), "'anything' is not a setting of tsft, so it would be ignored"),
    "added lr": Row(("+lr=1e-3",), "'lr' is not a setting of tsft, so it would be ignored"),
    "added trainer arg": Row(("+trainer.max_stepz=3",), "trainer.max_stepz is not a lightning.Trainer argument"),
    "lambda with sparsity off": Row(("sparsity=off", "sparsity.lambda=1e-5"), "has no effect with sparsity=off"),
    # values
    "negative lr": Row(("optim.lr=-1e-4",), "optim.lr must be > 0 (got -0.0001); set e.g. optim.lr=1e-4"),
    "zero lr": Row(("task.lr=0",), "optim.lr must be > 0"),
    "lr not a number": Row(("task.lr=abc",), "task.lr must be a number (got 'abc')"),
    "batch not a number": Row(("task.batch_size=abc",), "task.batch_size must be an integer (got 'abc')"),
    "fractional batch": Row(("task.batch_size=2.5",), "task.batch_size must be an integer (got 2.5)"),
    "zero batch": Row(("task.batch_size=0",), "task.batch_size must be > 0"),
    "steps not a number": Row(("trainer.max_steps=abc",), "trainer.max_steps must be an integer"),
    "zero steps": Row(("trainer.max_steps=0",), "trainer.max_steps must be > 0 or -1"),
    "seed not a number": Row(("seed=abc",), "seed must be an integer"),
    "negative seed": Row(("seed=-1",), "seed must lie in [0, 2**32)"),
    "dropout too big": Row(("peft.dropout=1.5",), "peft.dropout must lie in [0, 1)"),
    "dropout not a number": Row(("peft.dropout=abc",), "peft.dropout must be a number"),
    "zero rank": Row(("peft.r=0",), "peft.r must be a positive integer (got 0)"),
    "adalora init below target": Row(("peft=adalora", "peft.init_r=2"), "peft.init_r (2) must be >= peft.target_r (4)"),
    "adalora negative target": Row(("peft=adalora", "peft.target_r=-2"), "peft.target_r must be a positive integer"),
    "adapter negative size": Row(("peft=adapter", "peft.hidden_size=-32"), "peft.hidden_size must be a positive integer"),
    "negative lambda": Row(("sparsity=ts", "sparsity.lambda=-1"), "sparsity.lambda must be >= 0"),
    "lambda not a number": Row(("sparsity.lambda=abc",), "sparsity.lambda must be a number"),
    "zero s": Row(("sparsity=ts", "sparsity.s=0"), "sparsity.s and sparsity.alpha must be > 0"),
    "warm-up ratio": Row(("optim.warmup_ratio=1.5",), "optim.warmup_ratio must lie in [0, 1)"),
    "eval limit not a number": Row(("task.eval_limit=abc",), "task.eval_limit must be an integer"),
    "zero eval limit": Row(("task.eval_limit=0",), "task.eval_limit must be null or > 0"),
    "zero accumulation": Row(("trainer.accumulate_grad_batches=0",), "trainer.accumulate_grad_batches must be >= 1"),
    "negative checkpoint interval": Row(("checkpoint.every_n_train_steps=-5",), "checkpoint.every_n_train_steps must be null or a positive integer"),
    "unknown precision": Row(("trainer.precision=nonsense",), "trainer.precision 'nonsense' is not one of"),
    "gpu without a gpu": Row(("trainer=gpu",), "trainer.accelerator=gpu but torch sees no CUDA device here; use trainer=cpu"),
    "fsdp without a gpu": Row(("trainer=fsdp",), "trainer.accelerator=gpu but torch sees no CUDA device here; use trainer=cpu"),
    "deepspeed without a gpu": Row(("trainer=deepspeed_zero3",), "trainer.accelerator=gpu but torch sees no CUDA device here"),
    "deepspeed not installed": Row(("trainer=deepspeed_zero2", "trainer.accelerator=cpu"), "trainer.strategy is DeepSpeed, which is not installed; pip install -e '.[deepspeed]'"),
    "fsdp1 strategy": Row(("trainer.strategy=fsdp",), "trainer.strategy=fsdp is FSDP1, whose bf16 mixed precision casts buffers"),
    "deepspeed strategy string": Row(("trainer.strategy=deepspeed_stage_3",), "trainer.strategy is DeepSpeed, which is not installed"),
    "strategy class unknown": Row(("trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy._target_=nowhere.Strategy"), "trainer.strategy._target_ 'nowhere.Strategy' is not an importable class"),
    "unknown logger kind": Row(("logger.kind=xyz",), "logger.kind 'xyz' is not one of"),
    "zero beams": Row(("task=csr", "model=tiny-llama", "task.num_beams=0"), "task.num_beams must be a positive integer (got 0)"),
    "sequence beyond positions": Row(("task.max_length=1024",), "task.max_length 1024 exceeds the 512 positions of model 'tiny-bert'"),
    # where results go
    "run name up and out": Row(("run_name=../../../../escaped",), "run_name '../../../../escaped' must be one directory name"),
    "absolute run name": Row(("run_name=/tmp/abs_escape",), "run_name '/tmp/abs_escape' must be one directory name"),
    "nested run name": Row(("run_name=a/b",), "run_name 'a/b' must be one directory name"),
    "skip_existing unnamed": Row(("++skip_existing=true",), "skip_existing=true finds a finished run by its name"),
    "results under a file": Row((), "which is a file; set paths.results_dir=<a directory>", setup=file_in_the_way),
    # data
    "no data dir": Row(("paths.data_dir=/nonexistent",), "GLUE RTE not found: no folder /nonexistent/glue/RTE"),
    "missing dev file": Row((), "dev.tsv is missing", setup=no_dev_file),
    "short TSV row": Row((), "expected at least 4 tab-separated fields", setup=rte_line("99\tonly a premise")),
    "label outside the set": Row((), "label 'maybe' is not one of", setup=rte_line("99\ta\tb\tmaybe")),
    "Latin-1 TSV": Row((), "is not UTF-8", setup=latin1_rte),
    "STS-B score above 5": Row((), "score '7.5' lies outside [0, 5]", setup=bad_stsb("7.5")),
    "STS-B score nan": Row((), "score 'nan' lies outside [0, 5]", setup=bad_stsb("nan")),
    # targets (the model's modules are known only once it is built)
    "target matches nothing": Row(("peft.target_modules=[q,up]",), "target module 'up' matches no module", False),
    "target a LayerNorm": Row(("peft.target_modules=[LayerNorm]",), "is of type LayerNorm, and the PEFT methods adapt Linear layers only", False),
    "gated embedding": Row(("peft.target_modules=[embeddings.word_embeddings]", "sparsity=ts"), "is of type Embedding", False),
    # checkpoints
    "missing checkpoint": Row(("ckpt_path=/nonexistent/last.ckpt",), "ckpt_path /nonexistent/last.ckpt does not exist"),
    "random bytes checkpoint": Row((), "is not a readable checkpoint", setup=ckpt_file(os.urandom(4096))),
    "text checkpoint": Row((), "is not a readable checkpoint", setup=ckpt_file(b"not a checkpoint\n")),
    "torch file not from tsft": Row((), "was not saved by tsft", setup=ckpt_file(None)),
    "truncated checkpoint": Row((), "is not a readable checkpoint", setup=real_ckpt(truncate=True)),
    "checkpoint of another rank": Row(("peft.r=8",), "was saved by a run with other settings: peft.r 4 -> 8; resume with", setup=real_ckpt()),
    "checkpoint of another method": Row(("peft=dora",), "other settings: peft.name lora -> dora", setup=real_ckpt()),
    "checkpoint of another task": Row(("task=glue/stsb",), "other settings: task.name glue/rte -> glue/stsb", setup=real_ckpt()),
    "checkpoint of other targets": Row(("peft.target_modules=[q]",), "peft.target_modules ['q', 'k', 'v', 'o', 'i'] -> ['q']", setup=real_ckpt()),
    "checkpoint of another seed": Row(("seed=2",), "seed 1 -> 2; resume with", setup=real_ckpt()),
    "checkpoint of another lr": Row(("task.lr=5e-3",), "optim.lr", setup=real_ckpt()),
    "TS resume of a dense checkpoint": Row(("sparsity=ts",), "sparsity.enabled False -> True", setup=real_ckpt()),
}  # fmt: skip


def train_cli(argv: list[str], capsys) -> tuple[int, str]:
    """train.py's ``__main__`` with ``argv``: (exit status, stderr) as a process would report them."""
    GlobalHydra.instance().clear()
    saved_argv = sys.argv
    sys.argv = [str(REPO_ROOT / "train.py"), *argv]
    status = 0
    try:
        runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
    except SystemExit as exit_:  # sys.exit("error: ...") prints its message and exits 1
        if isinstance(exit_.code, str):
            sys.stderr.write(exit_.code + "\n")
            status = 1
        else:
            status = exit_.code or 0
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A real tsft last.ckpt: LoRA r 4 on tiny-bert, RTE, one epoch."""
    from tsft.pipeline import run

    from .helpers import compose_config

    tmp = tmp_path_factory.mktemp("ckpt")
    write_rte(tmp / "data" / "glue" / "RTE")
    run(compose_config([*tiny_overrides(tmp, tmp / "data"), *CKPT_RUN]))
    return next((tmp / "results").rglob("last.ckpt"))


def row_argv(row: Row, tmp_path: Path, ckpt: Path) -> list[str]:
    write_rte(tmp_path / "data" / "glue" / "RTE")
    extra = row.setup(tmp_path, ckpt) if row.setup else []
    # the row's own overrides come last so that they win over the tiny defaults (e.g. task.max_length=1024)
    return [*tiny_overrides(tmp_path, tmp_path / "data"), *extra, *row.overrides]


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_refused_in_one_line_before_any_work(name, tmp_path, monkeypatch, capsys, trained_checkpoint):
    row = ROWS[name]
    argv = row_argv(row, tmp_path, trained_checkpoint)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    built = []
    real_load = tsft.models.build.load_backbone
    monkeypatch.setattr(tsft.models.build, "load_backbone", lambda *a, **k: built.append(1) or real_load(*a, **k))

    status, stderr = train_cli(argv, capsys)

    assert status == 1, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert row.message in stderr, stderr
    assert not (tmp_path / "results").exists(), "a refused run wrote under results/"
    assert list(workdir.iterdir()) == [], "a refused run wrote into the working directory"
    if row.before_weights:
        assert not built, "refused only after the model was built"


SAMPLE = ["misspelt group key", "short TSV row", "random bytes checkpoint"]  # before Hydra, after the tokenizer, a file


@pytest.mark.parametrize("name", SAMPLE)
def test_in_process_verdict_is_the_processes(name, tmp_path, capsys, trained_checkpoint):
    row = ROWS[name]
    argv = row_argv(row, tmp_path, trained_checkpoint)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.run(
        [sys.executable, "train.py", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert (process.returncode, process.stderr) == train_cli(argv, capsys)
