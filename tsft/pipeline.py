"""One run from a composed config: validate -> data -> model -> fit -> evaluate -> result.json.

Everything that can be wrong with the input (config values, data files, targets, checkpoint
path) is found before the run directory is created, so a bad command writes nothing to results/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tsft import paths
from tsft.analysis.selection import apply_selection
from tsft.checkpoint import checked_checkpoint, run_settings
from tsft.config import method_name, run_base_name, validate
from tsft.data.csr import TEST_SETS, CSRDataModule
from tsft.data.glue import GlueDataModule
from tsft.errors import InputError
from tsft.eval.csr import trivial_scores as csr_trivial_scores
from tsft.eval.glue import headline_score, trivial_score
from tsft.launch import (
    cluster_plugins,
    create_launch_run_dir,
    launch_run_dir,
    own_checkpoint,
    process_launch,
    stable_run_name,
    under_submitit,
)
from tsft.lit.base import PeftModule
from tsft.lit.causal_lm import CausalLMModule
from tsft.lit.classification import SequenceClassificationModule
from tsft.lit.progress import StepProgressBar
from tsft.lit.stopping import StopCheckpoints
from tsft.models import build_peft_model, load_tokenizer
from tsft.models.backbone import check_max_length
from tsft.report.grid import finished_result, is_run_dir_of
from tsft.report.result import make_result, summary_line, write_result
from tsft.run_files import log_to_run_dir, record_inputs

log = logging.getLogger(__name__)
RUN_DIR_ENV = "TSFT_RUN_DIR"


@dataclass(frozen=True)
class TaskFamily:
    """How a family of tasks (``task.family``) plugs into a run.

    Its data module exposes ``num_train_examples`` and ``num_eval_examples`` once set up; its
    LightningModule leaves the last evaluation in ``eval_metrics``. ``evaluate`` names the Trainer
    loop that computes them after fitting ("validate" or "test"); ``result_extras`` adds
    family-specific fields to result.json.
    """

    auto_class: Any  # transformers Auto* class of the backbone
    peft_task_type: str  # peft's TaskType
    model_kwargs: Callable[[DictConfig], dict[str, Any]]
    datamodule: Callable[[DictConfig, Any], L.LightningDataModule]
    lightning_module: Callable[[DictConfig, nn.Module, Any], PeftModule]
    score: Callable[[DictConfig, dict[str, Any]], float | None]
    evaluate: str = "validate"
    result_extras: Callable[[DictConfig, Any], dict[str, Any]] = lambda cfg, datamodule: {}


def _glue_score(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    try:
        return headline_score(cfg.task.glue_task, metrics)
    except TypeError:  # the headline metric is undefined (null), e.g. a constant prediction
        return None


GLUE = TaskFamily(
    auto_class=AutoModelForSequenceClassification,
    peft_task_type="SEQ_CLS",
    model_kwargs=lambda cfg: {"num_labels": cfg.task.num_labels},
    datamodule=lambda cfg, tokenizer: GlueDataModule(cfg.task, tokenizer, cfg.paths, cfg.seed),
    lightning_module=lambda cfg, model, data: SequenceClassificationModule(
        model, cfg.optim, cfg.peft, cfg.task.glue_task, cfg.task.num_labels, data.eval_splits
    ),
    score=_glue_score,
    # the chance line of the evaluated dev examples (headline split: MNLI's matched), for the tables
    result_extras=lambda cfg, data: {
        **({"skipped_rows": {f: len(rows) for f, rows in data.skipped.items()}} if data.skipped is not None else {}),
        "trivial_score": trivial_score(cfg.task.glue_task, [ex.label for ex in data.splits[data.eval_splits[0]]]),
    },
)


def _weights_dtype(cfg: DictConfig) -> dict[str, Any]:
    """``model.dtype`` (e.g. bfloat16 for LLaMA-3.1-8B) for pretrained weights; null keeps float32."""
    if not cfg.model.get("dtype") or cfg.model.random_init:
        return {}
    return {"dtype": getattr(torch, cfg.model.dtype)}


CSR = TaskFamily(
    auto_class=AutoModelForCausalLM,
    peft_task_type="CAUSAL_LM",
    model_kwargs=_weights_dtype,
    datamodule=lambda cfg, tokenizer: CSRDataModule(cfg.task, tokenizer, cfg.paths, cfg.seed),
    lightning_module=lambda cfg, model, data: CausalLMModule(
        model,
        cfg.optim,
        cfg.peft,
        data.tokenizer,
        TEST_SETS,
        cfg.task.eval_mode,
        cfg.task.num_beams,
        cfg.task.max_new_tokens,
        cfg.model.get("gradient_checkpointing", False),
    ),
    score=lambda cfg, metrics: 100 * metrics["avg"],  # Table 1's Avg., in percent
    evaluate="test",
    result_extras=lambda cfg, data: {
        "eval": {"mode": cfg.task.eval_mode, "limit": cfg.task.eval_limit},  # limit: records per test set,
        "train_data": data.train_data,
        "trivial_score": csr_trivial_scores(data.test_sets),
    },
)


def _vit_datamodule(cfg: DictConfig, tokenizer: Any) -> L.LightningDataModule:
    from tsft.data.csr import ensure_pad_token
    from tsft.data.vit import ImageSettings, VitDataModule

    ensure_pad_token(tokenizer)
    image = ImageSettings(cfg.model.image.size, tuple(cfg.model.image.mean), tuple(cfg.model.image.std))
    return VitDataModule(cfg.task, tokenizer, cfg.paths, cfg.seed, image, cfg.model.image_seq_length)


def _vit_module(cfg: DictConfig, model: nn.Module, data: Any) -> PeftModule:
    from tsft.lit.causal_lm import fit_embeddings_to_tokenizer
    from tsft.lit.vision_language import VisionLanguageModule

    fit_embeddings_to_tokenizer(model, data.tokenizer)
    return VisionLanguageModule(model, cfg.optim, cfg.peft, data.tokenizer, cfg.task.max_new_tokens)


def _llava_class() -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


VIT = TaskFamily(
    auto_class=_llava_class(),
    peft_task_type="CAUSAL_LM",
    model_kwargs=_weights_dtype,
    datamodule=_vit_datamodule,
    lightning_module=_vit_module,
    # at the CPU scale, where the benchmark images are absent: answer tokens of held-out conversations
    # predicted exactly (teacher-forced), in percent
    score=lambda cfg, metrics: None if "token_accuracy" not in metrics else 100 * metrics["token_accuracy"],
    evaluate="test",  # held-out answers, then the benchmarks of task.benchmarks
    result_extras=lambda cfg, data: {"eval": {"held_out": data.num_eval_examples, "train_file": cfg.task.train_file}},
)

FAMILIES: dict[str, TaskFamily] = {"glue": GLUE, "csr": CSR, "vit": VIT}


def run(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Train and evaluate ``cfg``; return the run directory and the result written there."""
    validate(cfg)
    paths.task_runs_dir(cfg.paths, cfg.task.name)  # refuses a task name leading out of results_dir, before loading
    selection = apply_selection(cfg)  # a module subset or halved ranks (Table 4); None for an ordinary run
    # under submitit a requeued job must continue its checkpoint, so resume.auto is implied there
    auto_resume = bool((cfg.get("resume") or {}).get("auto")) or under_submitit()
    if auto_resume and not cfg.run_name:
        cfg.run_name = stable_run_name(cfg, run_base_name(cfg))
    if (cfg.get("skip_existing") or auto_resume) and (finished := finished_result(cfg)) is not None:
        log.info("skipping: %s is a finished run of this configuration", finished.parent)
        return finished.parent, json.loads(finished.read_text())
    if auto_resume and cfg.ckpt_path is None:  # a requeued or resubmitted job continues its own checkpoint
        task_dir = paths.task_runs_dir(cfg.paths, cfg.task.name)
        cfg.ckpt_path = own_checkpoint(task_dir, cfg.run_name, partial(is_run_dir_of, cfg.run_name))
        if cfg.ckpt_path is not None:
            log.info("resume.auto: continuing %s", cfg.ckpt_path)
    family = task_family(cfg)
    ckpt_path, allowed_changes = checked_checkpoint(cfg)

    check_max_length(cfg.model, cfg.task.max_length)
    tokenizer = load_tokenizer(cfg.model, paths.cache_dir(cfg.paths))
    datamodule = family.datamodule(cfg, tokenizer)
    datamodule.setup("fit")  # reads (and checks) the data now, not after the Trainer starts
    planned_steps = planned_optimizer_steps(cfg, datamodule.num_train_examples)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before any random init (heads, PEFT weights)
    model = build_peft_model(
        cfg, tokenizer, family.auto_class, family.peft_task_type, planned_steps, **family.model_kwargs(cfg)
    )
    module = family.lightning_module(cfg, model, datamodule)
    module.run_settings = run_settings(cfg)  # saved in its checkpoints, compared when one is resumed

    # the process that writes the run's records: not a rank Lightning started (it inherits rank 0's directory),
    # not a rank > 0 of an external launch (torchrun, srun)
    is_first_rank = RUN_DIR_ENV not in os.environ and process_launch().rank == 0
    run_dir = shared_run_dir(cfg, ckpt_path)
    try:
        extras = {"selection": selection} if selection is not None else {}
        if ckpt_path is not None:  # a resumed run says from where, and which settings it was allowed to change
            extras["resume"] = {"ckpt_path": ckpt_path, "allowed_changes": allowed_changes}
        if is_first_rank:
            record_inputs(cfg, run_dir)
        with log_to_run_dir(run_dir) if is_first_rank else nullcontext():
            result = fit_and_evaluate(cfg, family, module, datamodule, run_dir, ckpt_path, extras)
    except BaseException:  # also Ctrl-C and sys.exit: a run that stopped before its first checkpoint goes
        if is_first_rank:
            paths.discard_if_unfinished(run_dir)
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)  # the next run of a sweep gets its own directory
    return run_dir, result


def fit_and_evaluate(
    cfg: DictConfig,
    family: TaskFamily,
    module: PeftModule,
    datamodule: Any,
    run_dir: Path,
    ckpt_path: str | None,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit, evaluate, write result.json (``extras``: more fields for it, e.g. the module selection)."""
    trainer = L.Trainer(
        **trainer_arguments(cfg),
        logger=build_loggers(cfg, run_dir),
        callbacks=build_callbacks(cfg, run_dir),
        enable_checkpointing=cfg.checkpoint.enabled,
        default_root_dir=str(run_dir),
    )
    started = time.monotonic()
    # A signal (SIGTERM, a first Ctrl-C) stops fit at a batch boundary with a checkpoint (tsft.lit.stopping);
    # an error ends it where it is. Either way the run never reaches write_result.
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stop = next(c for c in trainer.callbacks if isinstance(c, StopCheckpoints))
        stop.hand_over_preemption()  # submitit's signal: the checkpoint is saved, now submitit requeues the job
        raise stop.stop_error() from None
    getattr(trainer, family.evaluate)(module, datamodule=datamodule, verbose=False)

    metrics = module.eval_metrics
    result = make_result(
        cfg,
        method=method_name(cfg),
        run_name=run_dir.name,
        metrics=metrics,
        score=family.score(cfg, metrics),
        sparsity=getattr(module, "sparsity_report", None),  # set by TokenGateCallback
        scale=run_scale(cfg, trainer, datamodule),
        trainable_params=trainable_params(module.model),
        wall_time_s=time.monotonic() - started,
        **family.result_extras(cfg, datamodule),
        **getattr(module, "eval_extras", {}),  # CSR: share of answers that parse, per test set
        **(extras or {}),
    )
    if cfg.peft.name != "heads" and cfg.get("export", {}).get("adapter", True):
        from tsft.integrations.run_adapter import save_run_adapter

        # every rank: gathering a sharded adapter is collective; rank 0 writes <run_dir>/adapter/
        save_run_adapter(module.model, run_dir, cfg, result, write=trainer.is_global_zero)
    if trainer.is_global_zero:
        if cfg.peft.name == "heads":  # a stage-1 run: what the next stage starts from (model.init_from)
            from tsft.models.build import save_heads

            save_heads(module.model, run_dir)
        write_result(run_dir / paths.RESULT_FILENAME, result)
        log.info("result: %s", summary_line(result))  # train.log ends with what the run measured
    if cfg.logger.kind == "wandb":
        import wandb

        wandb.finish()  # else the next run of a sweep would log into this one
    return result


def task_family(cfg: DictConfig) -> TaskFamily:
    if cfg.task.family not in FAMILIES:
        raise InputError(f"task.family '{cfg.task.family}' is not one of {', '.join(FAMILIES)}")
    return FAMILIES[cfg.task.family]


def shared_run_dir(cfg: DictConfig, ckpt_path: str | None) -> Path:
    """The run directory, one per run however many processes it has (tsft.launch).

    Lightning's DDP launcher starts ranks 1..n by running this script again when rank 0 calls
    fit; they inherit RUN_DIR_ENV from rank 0 and write into its directory. The processes of an
    external launch (torchrun, srun) all compute the same directory from the launch's id.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    launch = process_launch()
    run_dir = resume_run_dir(ckpt_path)
    if run_dir is None:
        task_dir = paths.task_runs_dir(cfg.paths, cfg.task.name)
        if launch.is_external:
            run_dir = create_launch_run_dir(launch_run_dir(task_dir, run_base_name(cfg), launch), launch)
        else:
            run_dir = paths.create_run_dir(task_dir, run_base_name(cfg))
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def resume_run_dir(ckpt_path: str | None) -> Path | None:
    """A resumed run finishes in the directory its checkpoint came from, unless that run finished."""
    if ckpt_path is None:
        return None
    run_dir = paths.run_dir_of_checkpoint(ckpt_path)
    if run_dir is None or (run_dir / paths.RESULT_FILENAME).exists():
        return None
    return run_dir


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as lightning.Trainer arguments: a strategy given as a config node (``_target_``, e.g.
    trainer=fsdp) is built; under submitit, Lightning's SLURM auto-requeue is off (tsft.launch)."""
    arguments = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(arguments.get("strategy"), dict):
        from hydra.utils import instantiate

        arguments["strategy"] = instantiate(arguments["strategy"])
    plugins = cluster_plugins()
    if plugins:
        arguments["plugins"] = [*(arguments.get("plugins") or []), *plugins]
    return arguments


def planned_optimizer_steps(cfg: DictConfig, train_examples: int) -> int:
    """Optimizer steps the Trainer will take on one device (AdaLoRA's schedule needs it up front;
    the LightningModule re-reads the Trainer's own estimate when training starts)."""
    batches = math.ceil(train_examples / cfg.task.batch_size)
    per_epoch = math.ceil(batches / cfg.trainer.get("accumulate_grad_batches", 1))
    max_epochs, max_steps = cfg.trainer.get("max_epochs") or -1, cfg.trainer.get("max_steps", -1)
    by_epochs = per_epoch * max_epochs if max_epochs > 0 else math.inf
    return int(min(by_epochs, max_steps if max_steps > 0 else math.inf))


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    # last.ckpt at the end of training and on a signal, whatever the interval of the saves below
    callbacks: list[Callback] = [StopCheckpoints(run_dir / paths.CHECKPOINTS_SUBDIR, cfg.checkpoint.enabled)]
    if cfg.checkpoint.enabled:
        callbacks.append(
            # One file, last.ckpt, overwritten at every save (no metric is monitored, so the
            # "top 1" is the newest), also by a resumed run.
            ModelCheckpoint(
                dirpath=run_dir / paths.CHECKPOINTS_SUBDIR,
                filename=paths.LAST_CHECKPOINT,
                save_top_k=1,
                enable_version_counter=False,
                every_n_train_steps=cfg.checkpoint.every_n_train_steps,
            )
        )
    if cfg.sparsity.enabled:
        from tsft.integrations.lightning import TokenGateCallback

        callbacks.append(TokenGateCallback(cfg.sparsity))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())  # planned optimizer steps, not the epoch's batches
    return callbacks


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    kind = cfg.logger.kind
    if kind == "csv":
        return [CSVLogger(save_dir=str(run_dir), name="logs")]  # logs/version_N: a resumed run adds one
    if kind == "tensorboard":
        return [TensorBoardLogger(save_dir=str(run_dir), name="logs")]
    if kind == "wandb":
        return [
            WandbLogger(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=cfg.logger.mode == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        ]
    return []


def run_scale(cfg: DictConfig, trainer: L.Trainer, datamodule: Any) -> dict[str, Any]:
    """How much was trained and evaluated (small-scale runs must say so)."""
    examples_seen = trainer.global_step * cfg.task.batch_size * cfg.trainer.get("accumulate_grad_batches", 1)
    return {
        "model": cfg.model.name,
        "train_examples": datamodule.num_train_examples,
        "max_steps": trainer.global_step,
        "epochs": round(examples_seen / datamodule.num_train_examples, 3),
        "max_length": cfg.task.max_length,
        "eval_examples": datamodule.num_eval_examples,
    }


def trainable_params(model: nn.Module) -> dict[str, int]:
    """Trainable weights: all of them, and those of the PEFT layers alone (without the heads trained in
    full, peft's modules_to_save), the budget Table 4's selections are compared at."""
    total = peft = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            total += parameter.numel()
            peft += 0 if "modules_to_save" in name else parameter.numel()
    return {"total": total, "peft": peft}
