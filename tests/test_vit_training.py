"""task=vit end to end on a random tiny LLaVA with generated images: gated DoRA trains, the held-out answers
are scored, result.json says what was measured (tsft.data.vit, tsft.lit.vision_language)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tsft.errors import InputError
from tsft.pipeline import run

from .helpers import compose_config


def write_captions(root, count=24, missing=0):
    """Solid-colour images of two kinds, captioned by their colour (learnable from the pixels)."""
    folder = root / "vlm" / "tiny"
    (folder / "images").mkdir(parents=True)
    entries = []
    for i in range(count):
        colour = ("red", (220, 20, 20)) if i % 2 else ("blue", (20, 20, 220))
        if i >= missing:
            Image.new("RGB", (40 + i, 30), colour[1]).save(folder / "images" / f"{i}.png")
        entries.append({
            "id": f"{i:03d}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is this?"},
                {"from": "gpt", "value": f"It is {colour[0]}."},
            ],
        })  # fmt: skip
    entries.append(
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    )
    (folder / "train.json").write_text(json.dumps(entries))
    return root


def overrides(tmp_path, data_dir, *extra):
    return [
        "task=vit",
        "model=tiny-llava",
        f"paths.data_dir={data_dir}",
        f"paths.results_dir={tmp_path / 'results'}",
        "task.train_file=vlm/tiny/train.json",
        "task.image_folder=vlm/tiny/images",
        "task.eval_share=0.25",
        "task.max_length=128",
        "task.batch_size=4",
        "task.eval_batch_size=4",
        "task.rank=4",
        "task.adalora_init_rank=6",
        "task.lr=1e-3",
        "trainer.max_steps=6",
        "trainer.enable_progress_bar=false",
        "checkpoint.enabled=false",
        *extra,
    ]


def test_gated_dora_on_a_tiny_llava_trains_and_scores_held_out_answers(tmp_path):
    data = write_captions(tmp_path / "data")
    cfg = compose_config(overrides(tmp_path, data, "peft=dora", "sparsity=ts", "sparsity.lambda=1e-4"))
    run_dir, result = run(cfg)
    assert result["family"] == "vit" and result["method"] == "ts-dora"
    assert set(result["metrics"]) == {"answer_loss", "answer_ppl", "token_accuracy"}
    assert 0 <= result["score"] <= 100 and result["eval"]["held_out"] == 7  # every 4th of 25 entries by id
    # the most common held-out answer token: "It is red." / "It is blue." / "Hello" share "It", " is", "." and eos
    assert 0 < result["trivial_score"] < 100
    modules = result["sparsity"]["modules"]
    assert modules and all("language_model" in m["name"] for m in modules)  # no gate on the vision tower
    assert len(modules) == 2 * 7  # 2 layers x q, k, v, o, up, down, gate
    assert result["trainable_params"]["peft"] < result["trainable_params"]["total"]  # the projector trains too


def test_missing_images_are_refused_before_training(tmp_path):
    data = write_captions(tmp_path / "data", missing=3)
    with pytest.raises(InputError, match="3 of 25 entries name images missing"):
        run(compose_config(overrides(tmp_path, data)))
    assert not (tmp_path / "results").exists()


def test_head_lr_puts_the_fully_trained_heads_in_a_group_of_their_own():
    import torch
    from omegaconf import OmegaConf

    from tsft.lit.base import PeftModule

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.Linear(2, 2)
            self.modules_to_save = torch.nn.Linear(2, 2)  # peft's name for a head trained in full
            self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    for head_lr, expected in ((None, [(4, 1e-3)]), (2e-5, [(2, 1e-3), (2, 2e-5)])):
        optim = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "head_lr": head_lr})
        groups = PeftModule(Model(), optim, OmegaConf.create({}))._param_groups()
        # tensors per group (weight and bias of each layer) and their learning rate; the frozen layer in none
        assert [(len(g["params"]), g.get("lr", 1e-3)) for g in groups] == expected


def test_stage_one_trains_only_the_projector_and_stage_two_starts_from_it(tmp_path):
    """peft=heads (LLaVA's stage 1): only the projector changes and is saved; model.init_from loads it into the
    next run's model before its PEFT layers are added."""
    import torch
    from safetensors.torch import load_file

    from tsft.models import build_peft_model, load_tokenizer
    from tsft.models.build import HEADS_FILE
    from tsft.pipeline import VIT

    data = write_captions(tmp_path / "data")
    stage1_dir, stage1 = run(compose_config(overrides(tmp_path, data, "peft=heads")))
    heads = load_file(str(stage1_dir / HEADS_FILE))
    assert heads and all(name.startswith("model.multi_modal_projector.") for name in heads)
    assert stage1["trainable_params"]["total"] == sum(t.numel() for t in heads.values())

    cfg = compose_config(overrides(tmp_path, data, "peft=lora", f"model.init_from={stage1_dir}"))
    tokenizer = load_tokenizer(cfg.model, tmp_path)
    model = build_peft_model(cfg, tokenizer, VIT.auto_class, VIT.peft_task_type, 10)
    projector = {n: p for n, p in model.named_parameters() if "multi_modal_projector" in n and "modules_to_save" in n}
    for name, weight in heads.items():
        leaf = name.removeprefix("model.multi_modal_projector.")
        (ours,) = [p for n, p in projector.items() if n.endswith(leaf)]
        assert torch.equal(ours.detach(), weight)
    with pytest.raises(InputError, match="sparsity=ts gates PEFT layers"):
        run(compose_config(overrides(tmp_path, data, "peft=heads", "sparsity=ts")))
    with pytest.raises(InputError, match="no heads.safetensors"):
        run(compose_config(overrides(tmp_path, data, f"model.init_from={tmp_path}")))


def write_benchmarks(data, images=3):
    """POPE, ScienceQA and VizWiz in LLaVA-1.5's file formats, over generated images."""
    eval_dir = data / "vlm" / "eval"
    for folder in ("pope/coco", "scienceqa", "vizwiz", "img"):
        (eval_dir / folder).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (30, 40), (40 * i, 100, 200)).save(eval_dir / "img" / f"{i}.jpg")
    pope, labels = [], {"adversarial": [], "popular": [], "random": []}
    for qid, split in enumerate(["adversarial", "popular", "random"] * 2, start=1):
        pope.append(
            {
                "question_id": qid,
                "image": f"{qid % images}.jpg",
                "text": "Is there a cat?\nAnswer the question using a single word or phrase.",
                "category": split,
            }
        )
        labels[split].append(
            {
                "question_id": qid,
                "image": f"{qid % images}.jpg",
                "text": "Is there a cat?",
                "label": "yes" if qid % 2 else "no",
            }
        )
    (eval_dir / "pope" / "llava_pope_test.jsonl").write_text("\n".join(json.dumps(r) for r in pope))
    for split, rows in labels.items():
        (eval_dir / "pope" / "coco" / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(r) for r in rows))
    sqa = [
        {
            "id": str(i),
            "image": f"{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhich?\nA. one\nB. two"},
                {"from": "gpt", "value": "A"},
            ],
        }
        for i in range(images)
    ]
    sqa.append(
        {
            "id": "t",
            "conversations": [{"from": "human", "value": "Text only?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}],
        }
    )
    (eval_dir / "scienceqa" / "llava_test_CQM-A.json").write_text(json.dumps(sqa))
    vizwiz = [
        {"question_id": i, "image": f"{i}.jpg", "text": "What is this?", "category": "default"} for i in range(images)
    ]
    (eval_dir / "vizwiz" / "llava_test.jsonl").write_text("\n".join(json.dumps(r) for r in vizwiz))
    import base64
    import io

    png = io.BytesIO()
    Image.new("RGB", (30, 30), (5, 5, 5)).save(png, format="PNG")
    (eval_dir / "mmbench").mkdir()
    row = ["1", "Which?", "nan", "one", "two", "nan", "nan", "A", "x", base64.b64encode(png.getvalue()).decode()]
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    (eval_dir / "mmbench" / "mmbench_dev_20230712.tsv").write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    return "vlm/eval/img"


def test_the_benchmark_loop_generates_scores_and_writes_submissions_end_to_end(tmp_path):
    """A tiny random LLaVA answers POPE, ScienceQA-IMG and VizWiz over generated images: POPE and ScienceQA are
    scored from their gold answers, VizWiz (answers on a server) writes a submission file, and a benchmark
    whose images are missing is reported as skipped, with the reason."""
    data = write_captions(tmp_path / "data")
    images = write_benchmarks(data)
    extra = [
        "task.benchmarks=[pope,scienceqa,vizwiz,gqa,mmbench]",
        f"task.benchmark_images={{pope: {images}, scienceqa: {images}, vizwiz: {images}, gqa: {images}}}",
        "task.max_new_tokens=4",
        "trainer.max_steps=2",
    ]
    run_dir, result = run(compose_config(overrides(tmp_path, data, *extra)))
    bench = result["benchmarks"]
    assert set(bench["pope"]["splits"]) == {"adversarial", "popular", "random"} and bench["pope"]["records"] == 6
    assert 0 <= bench["pope"]["score"] <= 100
    assert bench["scienceqa"]["records"] == 3  # the IMG subset: the text-only question is left out
    assert 0 <= bench["scienceqa"]["score"] <= 100 and 0 <= bench["scienceqa"]["unparsed"] <= 3
    submission = json.loads((run_dir / "vizwiz_submission.json").read_text())
    assert [row["image"] for row in submission] == ["0.jpg", "1.jpg", "2.jpg"]
    assert bench["gqa"]["skipped"].startswith("no question file")
    assert bench["mmbench"]["records"] == 2 and bench["mmbench"]["questions"] == 1  # two rotations of one question
