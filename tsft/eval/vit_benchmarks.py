"""Table 2's benchmarks as records to generate for, and their scoring (tsft.eval.vit) once generated.

Each benchmark reads LLaVA-1.5's own question file under ``<data_dir>/vlm/eval/`` and the images it names
under ``task.benchmark_images.<name>`` (relative to data_dir). A benchmark is evaluated only when its question
file and every image it needs are there; otherwise result.json says why it was skipped (the benchmark images
are not on this machine, so here only the tests' generated ones are). Gold answers come from the files that
hold them (ScienceQA and MMBench dev: the question file; POPE: the COCO label files; MMBench's images are inline
in its TSV, so it needs no image folder); splits whose answers an evaluation server
keeps (VQAv2 test-dev, VizWiz test, MMBench test) write that server's submission file instead of a score, and
benchmarks whose answers are in files not shipped with the question file (GQA, TextVQA) are scored when
``task.benchmark_answers.<name>`` names them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tsft.eval import vit

SCIENCEQA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Record:
    key: Any  # question_id (or ScienceQA's id)
    image: Optional[str]
    question: str  # the text after <image>, with the file's answer-format suffix
    gold: Any = None  # what the scorer compares with (None: scored by a server)
    category: Optional[str] = None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_pope(eval_dir: Path, answers: Optional[Path]) -> list[Record]:
    """LLaVA's POPE questions with the COCO labels. As LLaVA's eval_pope, the i-th question of a split goes with
    the i-th row of its label file (the question file numbers the splits from 1, 10000001 and 20000001); the
    question texts must agree, so a shuffled or foreign label file is an error, not a wrong score."""
    questions = _jsonl(eval_dir / "pope" / "llava_pope_test.jsonl")
    labels = {
        split: _jsonl(eval_dir / "pope" / "coco" / f"coco_pope_{split}.json")
        for split in sorted({q["category"] for q in questions})
    }
    position: dict[str, int] = {}
    records = []
    for question in questions:
        split = question["category"]
        index = position[split] = position.get(split, -1) + 1
        row = labels[split][index] if index < len(labels[split]) else None
        if row is None or not question["text"].startswith(row["text"]) or row["image"] != question["image"]:
            raise ValueError(f"POPE {split} question {question['question_id']} does not match label row {index}")
        records.append(Record(question["question_id"], question["image"], question["text"], row["label"], split))
    return records


def read_scienceqa(eval_dir: Path, answers: Optional[Path]) -> list[Record]:
    """The IMG subset: the questions with an image; the gold letter is the file's gpt turn."""
    rows = json.loads((eval_dir / "scienceqa" / "llava_test_CQM-A.json").read_text(encoding="utf-8"))
    out = []
    for row in rows:
        if "image" not in row:
            continue
        question = row["conversations"][0]["value"].replace("<image>", "").strip()
        out.append(Record(row["id"], row["image"], question + SCIENCEQA_SUFFIX, row["conversations"][1]["value"]))
    return out


MMBENCH_FILE = "mmbench/mmbench_dev_20230712.tsv"


def read_mmbench(eval_dir: Path, answers: Optional[Path], file: str = MMBENCH_FILE) -> list[Record]:
    """MMBench's TSV (one row per question, its image inline as base64), as LLaVA's model_vqa_mmbench reads it
    with --all-rounds: one record per rotation of the options, prompt = hint, question, lettered options and
    the letter instruction. Images are decoded once into a temporary folder. Rows without an ``answer`` column
    (the test split) go to the evaluation server."""
    import base64
    import csv
    import hashlib
    import sys
    import tempfile

    csv.field_size_limit(sys.maxsize)  # the base64 images exceed csv's default field limit
    path = eval_dir / file
    images = Path(tempfile.gettempdir()) / "tsft-mmbench" / hashlib.sha1(str(path).encode()).hexdigest()[:12]
    images.mkdir(parents=True, exist_ok=True)
    records = []
    with open(path, newline="", encoding="utf-8") as table:
        for row in csv.DictReader(table, delimiter="\t"):
            image = images / f"{row['index']}.png"
            if not image.is_file():
                image.write_bytes(base64.b64decode(row["image"]))
            options = {c: row[c] for c in "ABCD" if row.get(c) not in (None, "", "nan")}
            answer = row.get("answer")
            hint = row.get("hint")
            head = row["question"] if hint in (None, "", "nan") else f"{hint}\n{row['question']}"
            variants = vit.rotations(options, answer) if answer in options else [(options, None)]
            for round_id, (rotated, letter) in enumerate(variants):
                text = head + "".join(f"\n{c}. {o}" for c, o in rotated.items()) + SCIENCEQA_SUFFIX
                gold = None if letter is None else {"index": row["index"], "answer": letter, "options": rotated}
                records.append(Record((row["index"], round_id), str(image), text, gold))
    return records


def _questions_with_answers(file: str) -> Callable[[Path, Optional[Path]], list[Record]]:
    """GQA / TextVQA style: a LLaVA question file; answers (question_id -> answer or list of 10) from ``answers``."""

    def read(eval_dir: Path, answers: Optional[Path]) -> list[Record]:
        gold = json.loads(answers.read_text(encoding="utf-8")) if answers else {}
        return [
            Record(r["question_id"], r["image"], r["text"], gold.get(str(r["question_id"])), r.get("category"))
            for r in _jsonl(eval_dir / file)
        ]

    return read


@dataclass(frozen=True)
class Benchmark:
    name: str
    question_file: str  # under vlm/eval/
    reader: Optional[Callable[[Path, Optional[Path]], list[Record]]] = None  # default: a LLaVA question file
    server: Optional[str] = None  # the evaluation server's format (tsft.eval.vit.submission), if answers are there

    def read(self, eval_dir: Path, answers: Optional[Path]) -> list[Record]:
        return (self.reader or _questions_with_answers(self.question_file))(eval_dir, answers)


BENCHMARKS = {
    "pope": Benchmark("pope", "pope/llava_pope_test.jsonl", read_pope),
    "scienceqa": Benchmark("scienceqa", "scienceqa/llava_test_CQM-A.json", read_scienceqa),
    "gqa": Benchmark("gqa", "gqa/llava_gqa_testdev_balanced.jsonl"),
    "textvqa": Benchmark("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl"),
    "vizwiz": Benchmark("vizwiz", "vizwiz/llava_test.jsonl", server="vizwiz"),
    "vqav2": Benchmark("vqav2", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", server="vqav2"),
    "mmbench": Benchmark("mmbench", MMBENCH_FILE, read_mmbench),  # images inline; test split -> server
}
INLINE_IMAGES = {"mmbench"}  # benchmarks whose question file carries its images


def available(name: str, data_dir: Path, image_dir: Optional[str], answers: Optional[str], limit: Optional[int]):
    """(records, None) for a benchmark that can run, else (None, the reason it is skipped)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    eval_dir = data_dir / "vlm" / "eval"
    if not (eval_dir / bench.question_file).is_file():
        return None, f"no question file {eval_dir / bench.question_file}"
    answers_path = data_dir / answers if answers else None
    records = bench.read(eval_dir, answers_path)[:limit] if limit else bench.read(eval_dir, answers_path)
    if name in INLINE_IMAGES:
        return records, None
    if not image_dir:
        return None, f"no image folder given (task.benchmark_images.{name})"
    missing = [r.image for r in records if r.image and not (data_dir / image_dir / r.image).is_file()]
    if missing:
        return None, f"{len(missing)} of {len(records)} images missing under {data_dir / image_dir} (e.g. {missing[0]})"
    return records, None


def score(name: str, records: list[Record], predictions: list[str], out_dir: Path) -> dict[str, Any]:
    """The benchmark's metrics (percent where the paper gives percent), or where its submission file went."""
    bench = BENCHMARKS[name]
    if bench.server:
        rows = [
            {"question_id": r.key, "image": r.image, "index": r.key, "prediction": p}
            for r, p in zip(records, predictions)
        ]
        path = vit.submission(bench.server, rows, out_dir / f"{name}_submission.json")
        return {"submission": str(path), "records": len(records)}
    if name == "pope":
        splits = vit.pope_by_split(
            {"category": r.category, "prediction": p, "label": r.gold} for r, p in zip(records, predictions)
        )
        f1 = sum(s["f1"] for s in splits.values()) / len(splits)
        return {"score": 100 * f1, "splits": splits, "records": len(records)}  # LLaVA reports F1 over the splits
    if name == "mmbench":
        if any(r.gold is None for r in records):  # the test split: answers on the server
            rows = [{"index": r.key[0], "prediction": p} for r, p in zip(records, predictions)]
            return {"submission": str(vit.submission("mmbench", rows, out_dir / "mmbench_submission.json"))}
        scores = vit.mmbench_circular(
            {"index": r.gold["index"], "prediction": p, "options": r.gold["options"], "answer": r.gold["answer"]}
            for r, p in zip(records, predictions)
        )
        return {"score": 100 * scores["circular_accuracy"], **scores, "records": len(records)}
    if name == "scienceqa":
        letters = [vit.scienceqa_letter(p, vit.scienceqa_options(r.question)) for r, p in zip(records, predictions)]
        correct = sum(letter == r.gold for letter, r in zip(letters, records))
        return {"score": 100 * correct / len(records), "unparsed": letters.count(None), "records": len(records)}
    scored = [(r, p) for r, p in zip(records, predictions) if r.gold is not None]
    if not scored:
        return {"score": None, "records": len(records), "note": f"no answers: set task.benchmark_answers.{name}"}
    if name == "gqa":
        values = [float(vit.gqa_correct(p, r.gold)) for r, p in scored]
    else:  # textvqa: ten answers per question
        values = [vit.vqa_accuracy(p, r.gold) for r, p in scored]
    return {"score": 100 * sum(values) / len(values), "records": len(scored)}
