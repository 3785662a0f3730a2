"""Module selection (Table 4, Figure 2): the rules on a hand-made module table, and a run that uses one."""

from __future__ import annotations

import json

import pytest

from tsft.analysis.selection import ModuleStats, read_source, select_modules, selection_count
from tsft.errors import InputError
from tsft.pipeline import run

from .test_training import tiny  # noqa: F401  (fixture)

# name, sparsity, mean relative norm, mean norm, trainable weights
TABLE = [
    ModuleStats("l0.q", 0.90, 0.010, 0.50, 100),
    ModuleStats("l0.v", 0.20, 0.030, 0.10, 100),
    ModuleStats("l1.q", 0.50, 0.020, 0.40, 100),
    ModuleStats("l1.v", 0.20, 0.050, 0.20, 100),  # ties l0.v on sparsity
    ModuleStats("l2.q", 0.70, 0.040, 0.30, 100),
]


def names(modules):
    return [m.name for m in modules]


@pytest.mark.parametrize(
    ("n", "p", "kept"), [(5, 0.5, 3), (4, 0.5, 2), (9, 0.5, 5), (10, 0.1, 1), (3, 0.1, 1), (7, 1.0, 7)]
)
def test_p_keeps_round_p_n_with_halves_up_and_at_least_one(n, p, kept):
    assert selection_count(n, p) == kept


@pytest.mark.parametrize("p", [0.0, -0.5, 1.5])
def test_p_outside_0_1_is_refused(p):
    with pytest.raises(InputError, match="selection.p"):
        selection_count(5, p)


def test_s_low_keeps_the_least_sparse_modules_and_breaks_ties_by_model_order():
    # 0.2 (l0.v), 0.2 (l1.v), 0.5 (l1.q): the tie keeps model order; the output keeps model order too
    assert names(select_modules(TABLE, "s_low", 0.5)) == ["l0.v", "l1.q", "l1.v"]
    assert names(select_modules(TABLE, "s_low", 0.2)) == ["l0.v"]  # of the tie, the earlier module


def test_s_high_norm_relative_norm_abs_take_the_largest_first():
    assert names(select_modules(TABLE, "s_high", 0.4)) == ["l0.q", "l2.q"]
    assert names(select_modules(TABLE, "norm_relative", 0.4)) == ["l1.v", "l2.q"]
    assert names(select_modules(TABLE, "norm_abs", 0.4)) == ["l0.q", "l1.q"]


def test_random_draws_are_seeded_and_differ_between_draws():
    draws = [names(select_modules(TABLE, "random", 0.6, draw=d)) for d in range(3)]
    assert draws[0] == names(select_modules(TABLE, "random", 0.6, draw=0))
    assert all(len(d) == 3 for d in draws) and len({tuple(d) for d in draws}) > 1


def test_all_and_half_rank_keep_every_module():
    assert names(select_modules(TABLE, "all", 0.5)) == names(TABLE) == names(select_modules(TABLE, "half_rank", 0.5))


def test_a_rule_needing_a_statistic_the_source_lacks_is_refused():
    old = [ModuleStats("a", 0.5, None, None, None), ModuleStats("b", 0.4, None, None, None)]
    assert names(select_modules(old, "s_low", 0.5)) == ["b"]
    with pytest.raises(InputError, match="mean_norm"):
        select_modules(old, "norm_abs", 0.5)


def test_unknown_rule_is_refused():
    with pytest.raises(InputError, match="s_low"):
        select_modules(TABLE, "lowest", 0.5)


def test_a_source_without_gates_or_of_another_model_is_refused(tmp_path):
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({"model": "tiny-bert", "sparsity": None}))
    with pytest.raises(InputError, match="TS run"):
        read_source(dense)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "minilm-l6", "sparsity": {"modules": [{"name": "x", "sparsity": 0.5}]}}))
    with pytest.raises(InputError, match="same model"):
        read_source(other, model="tiny-bert")
    with pytest.raises(InputError, match="result.json"):
        read_source(tmp_path / "missing")


def test_a_selected_run_adapts_exactly_the_chosen_modules(tiny):  # noqa: F811
    """A TS run records per-module statistics; s_low at 30 % of its 10 modules makes a dense run with LoRA on
    the 3 least sparse, and half_rank halves the rank of all 10 (half the trainable weights of the PEFT layers)."""
    source_dir, source = run(tiny("sparsity=ts", "sparsity.lambda=1e-3", "trainer.max_steps=4"))
    modules = source["sparsity"]["modules"]
    assert all(m["mean_relative_norm"] > 0 and m["mean_norm"] > 0 and m["trainable_params"] > 0 for m in modules)
    expected = names(select_modules(read_source(source_dir), "s_low", 0.3))
    _, selected = run(
        tiny("selection=s_low", f"selection.source={source_dir}", "selection.p=0.3", "trainer.max_steps=2")
    )
    assert selected["selection"]["modules"] == expected and len(expected) == 3
    assert selected["config"]["peft"]["target_modules"] == expected
    chosen = sum(m["trainable_params"] for m in modules if m["name"].removeprefix("base_model.model.") in expected)
    assert selected["trainable_params"]["peft"] == chosen < source["trainable_params"]["peft"]

    _, halved = run(tiny("selection=half_rank", "trainer.max_steps=2", "sparsity=ts", "sparsity.lambda=1e-3"))
    full = sum(m["trainable_params"] for m in modules)
    assert full == source["trainable_params"]["peft"]
    assert sum(m["trainable_params"] for m in halved["sparsity"]["modules"]) * 2 == full
    assert halved["trainable_params"]["peft"] * 2 == full
    assert (
        halved["selection"]["rule"] == "half_rank"
        and halved["config"]["peft"]["r"] * 2 == source["config"]["peft"]["r"]
    )


def test_a_selection_without_a_source_is_refused_before_anything_loads(tiny):  # noqa: F811
    with pytest.raises(InputError, match="selection.source"):
        run(tiny("selection=s_low"))
