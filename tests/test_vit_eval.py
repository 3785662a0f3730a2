"""The seven Table 2 scorers on hand-computed cases (tsft/eval/vit.py), including the official VQA
normalisation cases and the real ScienceQA / POPE question files where they hold answers."""

from __future__ import annotations

import json

import pytest

from tsft.eval import vit

from .helpers import SHARED_DATA

VLM_EVAL = SHARED_DATA / "vlm" / "eval"


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),  # number words
        ("the Dog", "dog"),  # articles, case
        ("A red car.", "red car"),  # trailing period
        ("3.5", "3.5"),  # a decimal point stays
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("man's hat", "man 's hat"),  # possessive split as EvalAI does
        ("1,000", "1000"),  # comma between digits
        ("yes, sir", "yes sir"),
        ("black/white", "black white"),  # a mark inside a word splits it
        ("red - white", "red white"),  # a mark beside a space is deleted
        ("What?", "what"),
        ("  none \n", "0"),
    ],
)
def test_vqa_normalisation_follows_the_official_processor(raw, normalised):
    assert vit.normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_leave_one_out_mean_of_min_matches_over_3(matching, expected):
    gold = ["two"] * matching + ["three"] * (10 - matching)
    assert vit.vqa_accuracy("2", gold) == pytest.approx(expected)


def test_vizwiz_unanswerable_is_an_answer_like_any_other():
    gold = ["unanswerable"] * 6 + ["blue"] * 4
    assert vit.vqa_accuracy("Unanswerable.", gold) == 1.0
    assert vit.vqa_accuracy("blue", gold) == 1.0  # four annotators said blue
    assert vit.vqa_accuracy("red", gold) == 0.0


def test_gqa_exact_match_after_normalisation():
    assert vit.gqa_correct("Yes.", "yes") and vit.gqa_correct(" Left ", "left")
    assert not vit.gqa_correct("the left", "left")


@pytest.mark.parametrize(
    ("answer", "letter"),
    [("B", "B"), ("B. apostrophe", "B"), ("I think so. The answer is A.", "A"), ("E", None), ("apostrophe", None)],
)
def test_scienceqa_letter_extraction(answer, letter):
    assert vit.scienceqa_letter(answer, 4) == letter


def test_scienceqa_real_question_file_scores_its_own_answers_perfectly_and_perturbed_ones_not():
    path = VLM_EVAL / "scienceqa" / "llava_test_CQM-A.json"
    if not path.is_file():
        pytest.skip(f"no ScienceQA question file at {path}")
    records = [r for r in json.loads(path.read_text()) if "image" in r][:200]  # the IMG subset
    questions = [r["conversations"][0]["value"] for r in records]
    gold = [r["conversations"][1]["value"] for r in records]
    counts = [vit.scienceqa_options(q) for q in questions]
    assert all(n >= 2 for n in counts)
    exact = [vit.scienceqa_letter(g, n) == g for g, n in zip(gold, counts)]
    assert all(exact)
    wrong = [chr(ord("A") + (ord(g) - ord("A") + 1) % n) for g, n in zip(gold, counts)]  # the next option
    assert not any(vit.scienceqa_letter(w, n) == g for w, g, n in zip(wrong, gold, counts))
    assert [vit.scienceqa_letter(f"The answer is {g}.", n) for g, n in zip(gold, counts)] == gold
    assert vit.scienceqa_letter("I cannot tell", counts[0]) is None  # malformed: unparsed, counted wrong


@pytest.mark.parametrize(
    ("answer", "label"),
    [("Yes", "yes"), ("No", "no"), ("There is not a dog.", "no"), ("Yes. But no cat.", "yes"), ("no, sir", "no")],
)
def test_pope_parsing(answer, label):
    assert vit.pope_label(answer) == label


def test_pope_metrics_by_hand():
    # predictions yes, yes, no, no, yes against labels yes, no, yes, no, yes: tp 2, fp 1, fn 1, tn 1
    metrics = vit.pope_metrics(["Yes", "yes", "No", "no", "Yes"], ["yes", "no", "yes", "no", "yes"])
    assert metrics == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6}
    )


def test_pope_real_labels_scored_per_split():
    splits = {}
    for split in ("adversarial", "popular", "random"):
        path = VLM_EVAL / "pope" / "coco" / f"coco_pope_{split}.json"
        if not path.is_file():
            pytest.skip(f"no POPE labels at {path}")
        splits[split] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = []
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            # exact answers in adversarial; flipped answers in popular; every 4th one flipped in random
            flip = split == "popular" or (split == "random" and i % 4 == 0)
            answer = {"yes": "no", "no": "yes"}[row["label"]] if flip else row["label"]
            records.append({"category": split, "prediction": answer.capitalize() + ".", "label": row["label"]})
    scores = vit.pope_by_split(records)
    assert scores["adversarial"]["accuracy"] == 1.0 and scores["adversarial"]["f1"] == 1.0
    assert scores["popular"]["accuracy"] == 0.0
    flipped = sum(1 for i in range(len(splits["random"])) if i % 4 == 0)
    assert scores["random"]["accuracy"] == pytest.approx(1 - flipped / len(splits["random"]))


def test_mmbench_letters_and_circular_evaluation():
    options = {"A": "cat", "B": "dog", "C": "bird"}
    assert vit.mmbench_letter("B", options) == "B" and vit.mmbench_letter("(C) bird", options) == "C"
    assert vit.mmbench_letter("Dog.", options) == "B" and vit.mmbench_letter("a fish", options) is None
    variants = vit.rotations(options, "B")
    assert [answer for _, answer in variants] == ["B", "A", "C"]  # 'dog' moves with the rotation
    right = [{"index": 1, "prediction": a, "options": o, "answer": a} for o, a in variants]
    # question 2: right in two of its three rotations
    q2 = [{"index": 2, "prediction": a if i else "A" if a != "A" else "B", "options": o, "answer": a}
          for i, (o, a) in enumerate(variants)]  # fmt: skip
    scores = vit.mmbench_circular(right + q2)
    assert scores == {"circular_accuracy": 0.5, "accuracy": 5 / 6, "questions": 2}


def test_server_splits_write_submission_files(tmp_path):
    path = vit.submission("vqav2", [{"question_id": 7, "prediction": "Two."}], tmp_path / "vqav2.json")
    assert json.loads(path.read_text()) == [{"question_id": 7, "answer": "2"}]
    path = vit.submission("vizwiz", [{"image": "VizWiz_test_0.jpg", "prediction": "Unanswerable"}], tmp_path / "v.json")
    assert json.loads(path.read_text()) == [{"image": "VizWiz_test_0.jpg", "answer": "unanswerable"}]
    with pytest.raises(ValueError, match="vqav2"):
        vit.submission("gqa", [], tmp_path / "x.json")


def test_the_real_pope_questions_pair_with_their_labels_in_order():
    from tsft.eval.vit_benchmarks import read_pope

    if not (VLM_EVAL / "pope" / "llava_pope_test.jsonl").is_file():
        pytest.skip("no POPE question file")
    records = read_pope(VLM_EVAL, None)
    assert len(records) == 8910 and {r.category for r in records} == {"adversarial", "popular", "random"}
    assert {r.gold for r in records} == {"yes", "no"}
    assert sum(r.gold == "yes" for r in records) == pytest.approx(len(records) / 2, rel=0.02)  # POPE is balanced


def test_mmbench_tsv_rotates_options_and_scores_circularly(tmp_path):
    """Two questions in MMBench's TSV layout (images inline as base64): one record per rotation; answering
    every rotation right counts, missing one rotation loses the question under circular evaluation."""
    import base64
    import csv
    import io

    from PIL import Image

    from tsft.eval.vit_benchmarks import read_mmbench, score

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    (tmp_path / "mmbench").mkdir()
    with open(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", "w", newline="") as out:
        writer = csv.writer(out, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        writer.writerow([7, "Colour?", "nan", "red", "green", "blue", "nan", "B", "x", image])
        writer.writerow([8, "Shape?", "A hint.", "square", "circle", "nan", "nan", "A", "x", image])
    records = read_mmbench(tmp_path, None)
    assert len(records) == 3 + 2
    assert (
        records[0].question
        == "Colour?\nA. red\nB. green\nC. blue\nAnswer with the option's letter from the given choices directly."
    )
    assert records[3].question.startswith("A hint.\nShape?\nA. square\nB. circle")
    right = [r.gold["answer"] for r in records]
    assert right == ["B", "A", "C", "A", "B"]  # green moves with each rotation
    assert score("mmbench", records, right, tmp_path)["score"] == 100.0
    one_wrong = right[:4] + ["A"]  # question 8's second rotation answered wrong
    result = score("mmbench", records, one_wrong, tmp_path)
    assert result["score"] == 50.0 and result["accuracy"] == pytest.approx(4 / 5)
