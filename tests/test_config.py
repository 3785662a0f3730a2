"""Config groups compose, carry the paper's Table 6 settings, and reject bad values up front."""

from __future__ import annotations

import pytest

from tsft.config import check_group_choices, method_name, run_base_name, validate, with_implied_groups
from tsft.errors import InputError

from .helpers import compose_config

GLUE_TASKS = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]

# Table 6 (NLU): learning rate, epochs, dropout per task; rank 4, scale 0.5, batch 32, Q,K,V,O,I for all.
TABLE6 = {
    "cola": (4e-4, 40, 0.1),
    "mnli": (2.5e-4, 10, 0.15),
    "qnli": (2e-4, 10, 0.1),
    "rte": (1e-4, 80, 0.2),
    "mrpc": (1e-4, 60, 0.0),
    "qqp": (4e-4, 10, 0.15),
    "sst2": (4e-4, 48, 0.0),
    "stsb": (5e-4, 45, 0.2),
}


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_task_configs_follow_table6(task):
    cfg = compose_config([f"task=glue/{task}", "peft=lora"])
    lr, epochs, dropout = TABLE6[task]
    assert (cfg.optim.lr, cfg.trainer.max_epochs, cfg.peft.dropout) == (lr, epochs, dropout)
    assert (cfg.peft.r, cfg.peft.scale, cfg.task.batch_size) == (4, 0.5, 32)
    assert list(cfg.peft.target_modules) == ["q", "k", "v", "o", "i"]
    validate(cfg)


@pytest.mark.parametrize("peft", ["lora", "dora", "adalora", "adapter"])
@pytest.mark.parametrize("model", ["minilm-l6", "deberta-v3-base", "tiny-bert"])
def test_every_peft_and_model_composes_and_validates(peft, model):
    cfg = compose_config([f"peft={peft}", f"model={model}", "sparsity=ts"])
    validate(cfg)
    assert cfg.peft.name == peft
    assert set(cfg.peft.target_modules) <= set(cfg.model.targets)


def test_dora_is_lora_with_weight_decomposition():
    lora, dora = compose_config(["peft=lora"]).peft, compose_config(["peft=dora"]).peft
    assert (lora.use_dora, dora.use_dora) == (False, True)
    assert {k: v for k, v in dora.items() if k not in ("name", "use_dora")} == {
        k: v for k, v in lora.items() if k not in ("name", "use_dora")
    }


def test_sparsity_groups():
    assert compose_config(["sparsity=off"]).sparsity.enabled is False
    ts = compose_config(["sparsity=ts", "sparsity.lambda=2e-5"]).sparsity
    assert ts.enabled is True and ts["lambda"] == 2e-5 and ts.s == 1e-4 and ts.beta2 == 0.98


def test_method_and_run_names():
    plain = compose_config(["peft=adalora", "model=tiny-bert", "seed=3"])
    assert method_name(plain) == "adalora"
    assert run_base_name(plain) == "adalora-tiny-bert-seed3"
    ts = compose_config(["peft=dora", "sparsity=ts", "sparsity.lambda=6e-6", "seed=2"])
    assert method_name(ts) == "ts-dora"
    assert run_base_name(ts) == "ts-dora-minilm-l6-lam6e-06-seed2"


def test_paths_default_to_env_data_dir(monkeypatch):
    monkeypatch.setenv("TSFT_DATA_DIR", "/somewhere/data")
    assert compose_config([]).paths.data_dir == "/somewhere/data"
    monkeypatch.delenv("TSFT_DATA_DIR")
    assert compose_config([]).paths.data_dir == "data"


def test_unknown_group_option_is_one_line_with_choices():
    with pytest.raises(InputError) as err:
        check_group_choices(["peft=lorra"])
    assert str(err.value) == "unknown peft 'lorra'; choose one of: adalora, adapter, dora, heads, lora"
    with pytest.raises(InputError, match="unknown task 'glue/rtee'.*glue/rte"):
        check_group_choices(["task=glue/rtee"])
    with pytest.raises(InputError, match="unknown model 'nope'"):
        check_group_choices(["model=tiny-bert,nope"])  # a sweep is checked option by option
    check_group_choices(["task=glue/rte", "peft=lora,dora", "sparsity.lambda=1e-5", "trainer.max_steps=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1e-4", "optim.lr must be > 0 (got -0.0001); set e.g. optim.lr=1e-4"),
        ("task.lr=0", "optim.lr must be > 0"),
        ("peft.r=-4", "peft.r must be a positive integer (got -4)"),
        ("peft.r=0", "peft.r must be a positive integer (got 0)"),
        ("peft.dropout=1.5", "peft.dropout must lie in [0, 1)"),
        ("task.batch_size=0", "task.batch_size must be > 0"),
        ("+trainer.max_stepz=3", "trainer.max_stepz is not a lightning.Trainer argument"),
        ("sparsity=ts", None),
        ("run_name=../../../../escaped", "run_name '../../../../escaped' must be one directory name"),
        ("run_name=/tmp/abs_escape", "run_name '/tmp/abs_escape' must be one directory name"),
        ("run_name=a/b", "run_name 'a/b' must be one directory name"),
        ("run_name=a..b", "run_name 'a..b' must be one directory name"),
        ("run_name=ts-lora-minilm-l6-lam1.5e-05-seed1-cpu", None),
    ],
)
def test_validate_names_the_bad_value(override, message):
    cfg = compose_config([override])
    if message is None:
        validate(cfg)
        return
    with pytest.raises(InputError) as err:
        validate(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_validate_adalora_and_adapter_ranks():
    with pytest.raises(InputError, match="peft.init_r .2. must be >= peft.target_r .4."):
        validate(compose_config(["peft=adalora", "peft.init_r=2"]))
    with pytest.raises(InputError, match="peft.hidden_size must be a positive integer"):
        validate(compose_config(["peft=adapter", "peft.hidden_size=-32"]))
    with pytest.raises(InputError, match="sparsity.lambda must be >= 0"):
        validate(compose_config(["sparsity=ts", "sparsity.lambda=-1"]))


def test_setting_a_sparsity_value_selects_ts_next_to_it():
    assert with_implied_groups(["task=csr", "sparsity.lambda=1e-5", "-m"]) == [
        "task=csr",
        "sparsity=ts",
        "sparsity.lambda=1e-5",
        "-m",
    ]
    assert with_implied_groups(["sparsity=ts", "sparsity.s=1e-3"]) == ["sparsity=ts", "sparsity.s=1e-3"]
    assert with_implied_groups(["peft=dora"]) == ["peft=dora"]
    with pytest.raises(
        InputError, match="sparsity.lambda=1e-5 has no effect with sparsity=off; drop it or use sparsity=ts"
    ):
        with_implied_groups(["sparsity=off", "sparsity.lambda=1e-5"])


def test_skip_existing_without_a_run_name_is_refused_not_silently_retrained():
    with pytest.raises(InputError, match="skip_existing=true finds a finished run by its name"):
        validate(compose_config(["++skip_existing=true"]))
    validate(compose_config(["++skip_existing=true", "run_name=named"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.lr=abc", "task.lr must be a number (got 'abc')"),
        ("task.batch_size=abc", "task.batch_size must be an integer (got 'abc')"),
        ("task.batch_size=2.5", "task.batch_size must be an integer (got 2.5)"),
        ("trainer.max_steps=abc", "trainer.max_steps must be an integer"),
        ("seed=abc", "seed must be an integer"),
        ("peft.dropout=abc", "peft.dropout must be a number"),
        ("task.eval_limit=abc", "task.eval_limit must be an integer"),
        ("sparsity.lambda=abc", "sparsity.lambda must be a number"),
        ("trainer.accumulate_grad_batches=x", "trainer.accumulate_grad_batches must be an integer"),
    ],
)
def test_values_that_must_be_numbers_are_refused_in_one_line(override, message):
    overrides = [override] + (["sparsity=ts"] if override.startswith("sparsity.") else [])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(overrides))


@pytest.mark.parametrize(("override", "message"), [("+anything=1", "'anything' is not a setting"),
                                                   ("+lr=1e-3", "'lr' is not a setting of tsft"),
                                                   ("+sed=3", "did you mean seed?")])  # fmt: skip
def test_added_keys_nothing_reads_are_refused_with_the_closest_known_key(override, message):
    with pytest.raises(InputError, match=message):
        validate(compose_config([override]))
