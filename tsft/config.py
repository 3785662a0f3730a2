"""Checks on a composed run config, made before anything is trained or written."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tsft.errors import InputError
from tsft.paths import check_results_dir

# heads: no PEFT layer, only model.head_modules train (LLaVA stage 1, the projector warm-up)
PEFT_METHODS = ("lora", "dora", "adalora", "adapter", "heads")
SCALE_READINGS = ("r_over_alpha", "alpha_over_r")  # how Table 6's "Scale" sets lora_alpha (configs/peft/lora.yaml)
LOGGER_KINDS = ("csv", "wandb", "tensorboard", "none")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _s_suffix(s: Any, reference: Any) -> str:
    """``-s<s>`` when the gate scale differs from the grid's own (run names of an s sweep stay distinct, and the
    names of runs at the grid's s stay as they were); used as ``${s_suffix:${sparsity.s},1e-4}``."""
    if math.isclose(float(s), float(reference), rel_tol=1e-9):
        return ""
    mantissa, exponent = f"{float(s):.2e}".split("e")
    return f"-s{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # -s1e-3, -s2.5e-4


OmegaConf.register_new_resolver("s_suffix", _s_suffix, replace=True)


def method_name(cfg: DictConfig) -> str:
    """``ts-<peft>`` when token selection is on, else ``<peft>`` (the paper's row names)."""
    return f"ts-{cfg.peft.name}" if cfg.sparsity.enabled else cfg.peft.name


def run_base_name(cfg: DictConfig) -> str:
    """``<method>-<model>[-lam<lambda>]-seed<seed>``; the run directory adds a timestamp."""
    if cfg.run_name:
        return str(cfg.run_name)
    lam = f"-lam{float(cfg.sparsity['lambda']):g}" if cfg.sparsity.enabled else ""
    return f"{method_name(cfg)}-{cfg.model.name}{lam}-seed{cfg.seed}"


def check_group_choices(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject ``group=option`` overrides naming an option that has no config file.

    Hydra reports these over several lines of search-path detail; this names the group, the
    option and the choices on one line. Sweeps (``peft=lora,dora``) are checked option by option.
    """
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if key == "hydra/launcher":
            _check_launcher(value)
        group_dir = config_dir / key
        if not sep or key.startswith("hydra") or not group_dir.is_dir() or "(" in value:
            continue
        available = sorted(str(p.relative_to(group_dir).with_suffix("")) for p in group_dir.rglob("*.yaml"))
        for option in value.split(","):
            if option not in available and option != "null":
                raise InputError(f"unknown {key} '{option}'; choose one of: {', '.join(available)}")


def _check_launcher(launcher: str) -> None:
    """The submitit launchers (configs/hydra/launcher: slurm, local) come from an extra, not a core dependency."""
    import importlib.util

    if launcher in ("slurm", "local", "submitit_slurm", "submitit_local"):
        _require(
            importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None,
            f"hydra/launcher={launcher} needs the submitit launcher plugin; pip install -e '.[slurm]'",
        )


def known_setting_keys(config_dir: Path = CONFIG_DIR) -> set[str]:
    """Every dotted key some config file defines (train.yaml, each group's options under the group's name,
    the ``@package _global_`` experiments at the top): a superset of any composed config's keys."""
    known: set[str] = set()

    def add(prefix: str, node: Any) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in ("defaults", "hydra") and not prefix:
                continue
            dotted = f"{prefix}.{key}" if prefix else str(key)
            known.add(dotted)
            add(dotted, value)

    add("", OmegaConf.to_container(OmegaConf.load(config_dir / "train.yaml")))
    for group_dir in (p for p in config_dir.iterdir() if p.is_dir()):
        known.add(group_dir.name)
        for file in group_dir.rglob("*.yaml"):
            package = "" if "@package _global_" in file.read_text() else group_dir.name
            add(package, OmegaConf.to_container(OmegaConf.load(file)))
    return known


def check_override_keys(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject ``key=value`` for a key no config defines, naming the closest known keys on one line.

    Hydra refuses these too, over six lines and without a suggestion. Keys added with ``+`` are left to
    ``validate`` (which refuses top-level ones nothing reads); ``hydra.*`` and group choices pass.
    """
    import difflib

    known: set[str] | None = None
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or override.startswith(("+", "~", "-")) or "/" in key or "@" in key or key.startswith("hydra"):
            continue
        known = known if known is not None else known_setting_keys(config_dir)
        if key in known:
            continue
        leaf = key.rpartition(".")[2]
        same_leaf = sorted(k for k in known if k.rpartition(".")[2] == leaf and k != key)
        close = difflib.get_close_matches(key, same_leaf, n=2, cutoff=0) or difflib.get_close_matches(
            key, sorted(known), n=2, cutoff=0.8
        )
        hint = f"did you mean {' or '.join(close)}?" if close else "see `python train.py --cfg job` for the keys"
        raise InputError(f"'{key}' is not a setting of tsft; {hint} (a new key is added with +{key}=...)")


def with_implied_groups(overrides: list[str]) -> list[str]:
    """``sparsity.<key>=...`` without a ``sparsity=`` choice selects ``sparsity=ts``.

    Setting TS-PEFT's lambda asks for TS-PEFT (``python train.py task=csr peft=dora
    sparsity.lambda=1e-5`` is the paper's TS-DoRA run), while the group's default, ``off``, has no
    lambda to set, so ``sparsity=off`` with such a key is an error.
    """
    keys = [override.lstrip("+~").partition("=")[0] for override in overrides]
    settings = [i for i, key in enumerate(keys) if key.startswith("sparsity.")]
    if not settings:
        return overrides
    if "sparsity" in keys:
        if overrides[keys.index("sparsity")].partition("=")[2] == "off":
            raise InputError(f"{overrides[settings[0]]} has no effect with sparsity=off; drop it or use sparsity=ts")
        return overrides
    # Inserted beside the user's own override: Hydra's parser wants all overrides in one run of arguments.
    return [*overrides[: settings[0]], "sparsity=ts", *overrides[settings[0] :]]


# Values typed on the command line that must be numbers: the key a user types, and whether it is an integer.
# (Hydra passes "abc" through as a string; the range checks below would then fail with a TypeError.)
NUMERIC_KEYS = {
    "seed": int,
    "task.lr": float,
    "task.batch_size": int,
    "task.eval_batch_size": int,
    "task.max_length": int,
    "task.train_limit": int,
    "task.eval_limit": int,
    "task.rank": int,
    "task.dropout": float,
    "task.scale": float,
    "optim.lr": float,
    "optim.weight_decay": float,
    "optim.warmup_ratio": float,
    "peft.dropout": float,
    "peft.scale": float,
    "trainer.max_steps": int,
    "trainer.max_epochs": int,
    "trainer.accumulate_grad_batches": int,
    "sparsity.lambda": float,
    "sparsity.s": float,
    "sparsity.alpha": float,
    "sparsity.target": float,
    "sparsity.target_gain": float,
    "sparsity.target_max_step": float,
    "sparsity.target_ema": float,
    "sparsity.target_horizon": float,
    "sparsity.target_warmup": float,
    "sparsity.target_drive_max": float,
    "sparsity.target_proportional": float,
}


def _check_numbers(cfg: DictConfig) -> None:
    for dotted, kind in NUMERIC_KEYS.items():
        value = OmegaConf.select(cfg, dotted, default=None)
        if value is None or isinstance(value, bool):
            if isinstance(value, bool):
                raise InputError(f"{dotted} must be a number (got {value})")
            continue
        if kind is int and not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                continue  # 32.0 is 32
            raise InputError(f"{dotted} must be an integer (got {value!r}); e.g. {dotted}=32")
        if kind is float and not isinstance(value, (int, float)):
            try:
                float(value)  # YAML 1.1 reads "1e-5" as a string; the gate and optimizer coerce it
            except (TypeError, ValueError):
                raise InputError(f"{dotted} must be a number (got {value!r}); e.g. {dotted}=1e-4") from None


# Top-level keys a run reads: configs/train.yaml's own and its groups', plus the lookup tables the experiment
# configs add (per-task λ, lengths, ...). Anything else came from a `+key=...` that nothing would read.
EXPERIMENT_TABLES = ("table1", "table2", "table3", "analysis")


def _check_top_level_keys(cfg: DictConfig) -> None:
    import difflib

    known = set(OmegaConf.load(CONFIG_DIR / "train.yaml")) | {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    known |= set(EXPERIMENT_TABLES) | {"defaults"}
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see `python train.py --cfg job` for the keys"
            raise InputError(f"'{key}' is not a setting of tsft, so it would be ignored; {hint}")


def validate(cfg: DictConfig) -> None:
    """Raise InputError on the first setting that cannot work. Cheap: no data or model is loaded."""
    _check_top_level_keys(cfg)
    _check_numbers(cfg)
    _check_run_name(cfg.get("run_name"))
    _require(
        not cfg.get("skip_existing") or bool(cfg.get("run_name")),
        "skip_existing=true finds a finished run by its name, and this run has none; set run_name=<name>",
    )
    check_results_dir(cfg.paths)
    _require(0 <= cfg.seed < 2**32, f"seed must lie in [0, 2**32) (got {cfg.seed}); e.g. seed=1")
    every = cfg.checkpoint.get("every_n_train_steps")
    _require(
        every is None or (isinstance(every, int) and every > 0),
        f"checkpoint.every_n_train_steps must be null or a positive integer (got {every})",
    )
    _check_optim(cfg.optim)
    _check_task(cfg.task)
    _check_peft(cfg.peft)
    if cfg.sparsity.enabled:
        _require(cfg.peft.name != "heads", "sparsity=ts gates PEFT layers and peft=heads has none; use sparsity=off")
        _check_sparsity(cfg.sparsity)
    _check_trainer(cfg.trainer)
    if cfg.logger.kind not in LOGGER_KINDS:
        raise InputError(f"logger.kind '{cfg.logger.kind}' is not one of {', '.join(LOGGER_KINDS)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


# One directory name: a run always lives in <results_dir>/runs/<task>/, so no separators, no "..".
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def _check_run_name(run_name: Any) -> None:
    if run_name is None:
        return
    _require(
        isinstance(run_name, str) and _RUN_NAME.fullmatch(run_name) is not None and ".." not in run_name,
        f"run_name '{run_name}' must be one directory name (letters, digits and . _ - + =, no '/' or '..'): "
        "runs are written under paths.results_dir/runs/<task>/; e.g. run_name=my-run, or paths.results_dir=<dir>",
    )


def _check_optim(optim: DictConfig) -> None:
    _require(optim.lr > 0, f"optim.lr must be > 0 (got {optim.lr}); set e.g. optim.lr=1e-4")
    _require(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0 (got {optim.weight_decay})")
    _require(0 <= optim.warmup_ratio < 1, f"optim.warmup_ratio must lie in [0, 1) (got {optim.warmup_ratio})")


def _check_task(task: DictConfig) -> None:
    for key in ("batch_size", "eval_batch_size", "max_length"):
        _require(task[key] > 0, f"task.{key} must be > 0 (got {task[key]}); set e.g. task.{key}=32")
    for key in ("train_limit", "eval_limit"):
        value = task.get(key)
        _require(value is None or value > 0, f"task.{key} must be null or > 0 (got {value})")
    for key in ("num_beams", "max_new_tokens"):  # generation (CSR, VIT): checked now, not after training
        value = task.get(key)
        _require(
            value is None or (isinstance(value, int) and value > 0),
            f"task.{key} must be a positive integer (got {value}); e.g. task.{key}=1",
        )


def _check_peft(peft: DictConfig) -> None:
    name = peft.name
    _require(name in PEFT_METHODS, f"peft.name '{name}' is not one of {', '.join(PEFT_METHODS)}")
    if name == "heads":
        return  # nothing to size: the model's head_modules are trained in full
    if name in ("lora", "dora"):
        _positive_int(peft, "r")
    elif name == "adalora":
        _positive_int(peft, "init_r")
        _positive_int(peft, "target_r")
        _require(
            peft.init_r >= peft.target_r,
            f"peft.init_r ({peft.init_r}) must be >= peft.target_r ({peft.target_r}); raise peft.init_r",
        )
        for key in ("tinit_ratio", "tfinal_ratio"):
            _require(0 <= peft[key] < 1, f"peft.{key} must lie in [0, 1) (got {peft[key]})")
        _require(
            peft.tinit_ratio + peft.tfinal_ratio < 1,
            "peft.tinit_ratio + peft.tfinal_ratio must be < 1 to leave steps for rank pruning",
        )
        _positive_int(peft, "deltaT")
    else:
        _positive_int(peft, "hidden_size")
    _require(0 <= peft.dropout < 1, f"peft.dropout must lie in [0, 1) (got {peft.dropout})")
    _require(peft.scale > 0, f"peft.scale must be > 0 (got {peft.scale})")
    if name != "adapter":
        _require(
            peft.get("scale_reading") in SCALE_READINGS,
            f"peft.scale_reading must be one of {', '.join(SCALE_READINGS)} (got {peft.get('scale_reading')})",
        )
    _require(len(peft.target_modules) > 0, "peft.target_modules is empty; set e.g. peft.target_modules=[q,v]")


def _positive_int(section: DictConfig, key: str) -> None:
    value = section[key]
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"peft.{key} must be a positive integer (got {value}); set e.g. peft.{key}=4",
    )


def _check_sparsity(sparsity: DictConfig) -> None:
    from tsft.gate import GateConfig  # the gate validates its own settings
    from tsft.gate.controller import ControllerConfig

    try:
        GateConfig.from_mapping(sparsity)
        ControllerConfig.from_mapping(sparsity)
    except ValueError as err:
        raise InputError(str(err)) from None


def _check_trainer(trainer: DictConfig) -> None:
    import lightning as L  # imported here: the override check above runs before any heavy import

    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    unknown = sorted(set(trainer.keys()) - accepted)
    if unknown:
        raise InputError(f"trainer.{unknown[0]} is not a lightning.Trainer argument; see `python train.py --cfg job`")
    for key in ("max_steps", "max_epochs"):
        value: Any = trainer.get(key)
        _require(value is None or value == -1 or value > 0, f"trainer.{key} must be > 0 or -1 (got {value})")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    _require(accumulate >= 1, f"trainer.accumulate_grad_batches must be >= 1 (got {accumulate})")
    _check_precision(trainer.get("precision"))
    _check_accelerator(trainer.get("accelerator"))
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        _check_strategy(strategy, trainer.get("accelerator"))
    elif isinstance(strategy, str) and strategy.startswith("fsdp"):
        raise InputError(
            f"trainer.strategy={strategy} is FSDP1, whose bf16 mixed precision casts buffers and so the gates' "
            "thresholds; use trainer=fsdp (FSDP2, tsft/lit/sharding.py)"
        )
    elif isinstance(strategy, str) and strategy.startswith("deepspeed"):
        _check_deepspeed(trainer.get("accelerator"))


def _check_strategy(strategy: DictConfig, accelerator: Any) -> None:
    """A strategy given as a config node (trainer=fsdp, deepspeed_*): its class must be importable, and DeepSpeed
    installed and on a GPU, before anything is built."""
    target = strategy.get("_target_")
    _require(isinstance(target, str), "trainer.strategy needs a _target_ (a strategy class), e.g. trainer=fsdp")
    if "DeepSpeed" in target:
        _check_deepspeed(accelerator)
    from hydra.utils import get_class

    try:
        get_class(target)
    except Exception:
        message = f"trainer.strategy._target_ '{target}' is not an importable class; e.g. trainer=fsdp"
        raise InputError(message) from None


def _check_precision(precision: Any) -> None:
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT

    def values(literal: Any) -> list[Any]:  # the Literal[...] unions, flattened
        return [v for arg in get_args(literal) for v in (values(arg) if get_args(arg) else [arg])]

    accepted = list(dict.fromkeys(str(v) for v in values(_PRECISION_INPUT)))
    _require(
        precision is None or str(precision) in accepted,
        f"trainer.precision '{precision}' is not one of {', '.join(accepted)}; e.g. trainer.precision=bf16-mixed",
    )


def _check_deepspeed(accelerator: Any) -> None:
    import importlib.util

    _require(
        importlib.util.find_spec("deepspeed") is not None,
        "trainer.strategy is DeepSpeed, which is not installed; pip install -e '.[deepspeed]', or use trainer=fsdp",
    )
    _require(
        accelerator in ("gpu", "cuda", "auto"),
        f"DeepSpeed needs CUDA GPUs (trainer.accelerator={accelerator}); on CPU use trainer=fsdp with "
        "trainer.accelerator=cpu",
    )


def _check_accelerator(accelerator: Any) -> None:
    import torch

    if accelerator in ("gpu", "cuda"):
        _require(
            torch.cuda.is_available(),
            f"trainer.accelerator={accelerator} but torch sees no CUDA device here; use trainer=cpu",
        )
    elif accelerator == "mps":
        _require(torch.backends.mps.is_available(), "trainer.accelerator=mps but MPS is not available; use trainer=cpu")
