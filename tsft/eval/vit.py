"""Scorers of Table 2's seven visual-instruction benchmarks, as LLaVA-1.5's evaluation scripts score them.

One small function per benchmark, on plain strings (a model's greedy answer and the gold answers), so each
is tested on hand-computed cases:

- VQAv2 val, TextVQA val, VizWiz val: VQA accuracy with the official answer normalisation (EvalAI's answer
  processor, as in the VQA evaluation code and LLaVA's m4c evaluator): lower case, punctuation, number
  words to digits, articles dropped, contractions restored; then acc = mean over the 10 leave-one-out subsets
  of min(1, #matches among the other 9 / 3). VizWiz's gold answers include "unanswerable".
- GQA testdev-balanced: exact match of the normalised prediction (lower case, trailing period dropped).
- ScienceQA-IMG: the option letter read from the answer ("B", "B. text", "The answer is B."); anything else
  counts as wrong and is counted as unparsed.
- POPE: "no" if the first sentence holds the word no / not, else "yes"; accuracy, precision, recall, F1 and
  the share of yes answers, per split (adversarial, popular, random).
- MMBench: the option letter; circular evaluation: a question counts only if every rotation of its options
  was answered right.

Splits whose answers are kept on an evaluation server (VQAv2 test-dev, VizWiz test, MMBench test) are not
scored here: ``submission`` writes the file the server takes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

# ---------------------------------------------------------------- VQA answer normalisation

# Contractions written without their apostrophe, as answers often are, mapped back (VQA evaluation's list).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# a period not between digits ("3.5" keeps its point); the odd "(?!<=" is the official pattern, kept as is:
# it is a negative lookahead for "<=", so it strips every period not followed by a digit
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # a mark next to a space (or any digit-comma-digit in the answer) is deleted, otherwise it splits words
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's VQA answer processor: 'Two Dogs.' -> '2 dogs', 'the cat's toy' -> "cat 's toy"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, gold_answers: list[str]) -> float:
    """VQA accuracy of one answer: mean over leaving each of the (10) gold answers out of min(1, matches among
    the others / 3). Four or more matching annotators give 1, three 0.9, two 0.6, one 0.3."""
    if not gold_answers:
        raise ValueError("vqa_accuracy needs the gold answers of the question (VQA: 10 per question)")
    answer = normalize_vqa_answer(prediction)
    gold = [normalize_vqa_answer(g) for g in gold_answers]
    scores = []
    for left_out in range(len(gold)):
        matches = sum(1 for i, g in enumerate(gold) if i != left_out and g == answer)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- GQA


def gqa_correct(prediction: str, answer: str) -> bool:
    """Exact match after LLaVA's GQA conversion: lower case, surrounding space and a trailing period dropped."""
    return prediction.strip().rstrip(".").lower() == answer.strip().lower()


# ---------------------------------------------------------------- ScienceQA

_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def scienceqa_letter(prediction: str, num_options: int) -> Optional[str]:
    """The option letter of an answer: 'B', 'B. apostrophe', or '... The answer is B.'; None if none fits."""
    letters = [chr(ord("A") + i) for i in range(num_options)]
    text = prediction.strip()
    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    if found and found[0] in letters:
        return found[0]
    return None


def scienceqa_options(question: str) -> int:
    """How many lettered options ('A. ...' lines) the question text lists."""
    return len(re.findall(r"^[A-Z]\. ", question, flags=re.MULTILINE))


# ---------------------------------------------------------------- POPE


def pope_label(prediction: str) -> str:
    """LLaVA's POPE parsing: the first sentence; 'no' if it holds the word No, no or not, else 'yes'."""
    text = prediction
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with 'yes' as the positive class, and the share of yes answers."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("pope_metrics needs one prediction per label")
    parsed = [pope_label(p) for p in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(parsed, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(parsed, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(parsed, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(labels),
    }


def pope_by_split(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``records``: {category, prediction, label}; the metrics per POPE split (LLaVA reports F1 averaged)."""
    by_split: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for record in records:
        predictions, labels = by_split[record["category"]]
        predictions.append(record["prediction"])
        labels.append(record["label"])
    return {split: pope_metrics(p, g) for split, (p, g) in sorted(by_split.items())}


# ---------------------------------------------------------------- MMBench


def mmbench_letter(prediction: str, options: dict[str, str]) -> Optional[str]:
    """The option letter of an answer: a bare or leading letter ('C', 'C.', 'C) ...'), else the one option
    whose text the answer equals; None if neither."""
    text = prediction.strip()
    match = re.match(r"^\(?([A-Z])(?:[.):\s]|$)", text)
    if match and match.group(1) in options:
        return match.group(1)
    same = [letter for letter, option in options.items() if text.lower().rstrip(".") == option.strip().lower()]
    return same[0] if len(same) == 1 else None


def mmbench_circular(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Circular evaluation: ``records`` are {index, prediction, options, answer} with one record per rotation of
    a question's options (``index`` names the question); a question is right only if all its rotations are."""
    by_question: dict[Any, list[bool]] = defaultdict(list)
    for record in records:
        by_question[record["index"]].append(mmbench_letter(record["prediction"], record["options"]) == record["answer"])
    if not by_question:
        raise ValueError("mmbench_circular needs at least one record")
    circular = sum(all(results) for results in by_question.values()) / len(by_question)
    single = sum(sum(r) for r in by_question.values()) / sum(len(r) for r in by_question.values())
    return {"circular_accuracy": circular, "accuracy": single, "questions": len(by_question)}


def rotations(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """Every rotation of the options with the answer letter that follows it (MMBench's circular variants)."""
    letters = sorted(options)
    texts = [options[letter] for letter in letters]
    out = []
    for shift in range(len(letters)):
        rotated = texts[shift:] + texts[:shift]
        out.append((dict(zip(letters, rotated)), letters[rotated.index(options[answer])]))
    return out


# ---------------------------------------------------------------- evaluation servers


def submission(benchmark: str, records: list[dict[str, Any]], path: Path) -> Path:
    """The file an evaluation server takes, for splits whose answers are not public. ``records`` hold
    question_id (or image for VizWiz, index for MMBench) and the raw prediction."""
    if benchmark == "vqav2":
        rows: Any = [
            {"question_id": r["question_id"], "answer": normalize_vqa_answer(r["prediction"])} for r in records
        ]
    elif benchmark == "vizwiz":
        rows = [{"image": r["image"], "answer": normalize_vqa_answer(r["prediction"])} for r in records]
    elif benchmark == "mmbench":
        rows = [{"index": r["index"], "prediction": r["prediction"]} for r in records]
    else:
        raise ValueError(f"no evaluation-server format for {benchmark!r}; expected vqav2, vizwiz or mmbench")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path
