"""Visual instruction tuning data in LLaVA's format: conversations, the vicuna_v1 prompt, the loss mask.

An entry of ``llava_v1_5_mix665k.json`` (or of the 707-image caption subset here) is
``{id, image?, conversations: [{from: human|gpt, value}, ...]}``. As LLaVA does, ``<image>`` is moved to the
start of the first human turn (``"<image>\\n" + rest``) when the entry has an image; text-only entries have
none. The conversation is rendered with LLaVA-1.5's vicuna_v1 template,

    <system> USER: <image>\\n<question> ASSISTANT: <answer><eos>USER: ... ASSISTANT: ...<eos>

(``<eos>`` is the tokenizer's end-of-sequence text, ``</s>`` for LLaVA's Vicuna), and only the assistant
answers and their end-of-sequence tokens are in the loss. The mask is computed from character spans: the
whole conversation is tokenized once (what the model sees) and a token is a label when its characters lie
inside an answer. A token that straddles an answer's boundary would put prompt text into the loss or an
answer's start out of it; LLaVA then silently masks the whole sample ("tokenization mismatch"), here it is
an error that names the sample. ``<image>`` becomes ``image_seq_length`` image-token positions, never labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L

from tsft.errors import InputError

IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
IGNORE = -100


@dataclass(frozen=True)
class Entry:
    id: str
    image: Optional[str]  # path relative to the image folder, or None (text-only)
    turns: list[tuple[str, str]]  # (human|gpt, text), alternating, starting with human


def read_entries(path: Path) -> list[Entry]:
    """The entries of a LLaVA-format JSON file, checked: one line naming the file and entry on a bad one."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give a LLaVA-format JSON file") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(raw, list):
        raise InputError(f"{path} must hold a JSON list of {{id, image?, conversations}} entries")
    return [_entry(item, path, index) for index, item in enumerate(raw)]


def _entry(item: Any, path: Path, index: int) -> Entry:
    where = f"{path} entry {index}"
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list) or not item["conversations"]:
        raise InputError(f"{where} needs a non-empty 'conversations' list")
    turns = []
    for number, turn in enumerate(item["conversations"]):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        expected = "human" if number % 2 == 0 else "gpt"
        if speaker != expected or not isinstance(turn.get("value"), str):
            raise InputError(f"{where} turn {number} must be from '{expected}' with a text 'value' (turns alternate)")
        turns.append((speaker, turn["value"]))
    if turns[-1][0] != "gpt":
        raise InputError(f"{where} ends with a human turn: a conversation ends with the assistant's answer")
    image = item.get("image")
    text = [value for _, value in turns]
    if image is not None:
        # LLaVA's preprocess_multimodal: the image token once, at the start of the first human turn
        text = [value.replace(IMAGE_TOKEN, "").strip() for value in text]
        text[0] = f"{IMAGE_TOKEN}\n{text[0]}"
    elif any(IMAGE_TOKEN in value for value in text):
        raise InputError(f"{where} has no image but its text holds {IMAGE_TOKEN}; add 'image' or remove the token")
    return Entry(str(item.get("id", index)), image, [(s, v) for (s, _), v in zip(turns, text)])


def render_vicuna(entry: Entry, eos: str, system: str = VICUNA_SYSTEM) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as vicuna_v1 text and the character spans that are in the loss (answers + eos)."""
    text, spans = system + " ", []
    for speaker, value in entry.turns:
        if speaker == "human":
            text += f"{ROLES['human']}: {value} {ROLES['gpt']}:"
        else:
            # the space after "ASSISTANT:" belongs to the answer: BPE and sentencepiece tokenizers both fold
            # it into the answer's first token ("ĠYes", "▁Yes"), and generation continues "ASSISTANT:" with it
            start = len(text)
            text += f" {value}{eos}"
            spans.append((start, len(text)))
    return text, spans


def prompt_of(question: str, has_image: bool, system: str = VICUNA_SYSTEM) -> str:
    """The generation prompt of one question (evaluation): everything up to "ASSISTANT:"."""
    question = f"{IMAGE_TOKEN}\n{question}" if has_image and IMAGE_TOKEN not in question else question
    return f"{system} {ROLES['human']}: {question} {ROLES['gpt']}:"


def tokenize_entry(
    entry: Entry, tokenizer: Any, image_seq_length: int, max_length: Optional[int] = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one entry: labels are the ids on answer tokens and -100 elsewhere; ``<image>``
    expanded to ``image_seq_length`` image-token ids. Raises InputError on a token across an answer boundary."""
    text, spans = render_vicuna(entry, tokenizer.eos_token)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = [], []
    for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = [s <= start and end <= e for s, e in spans]
        touching = [start < e and end > s for s, e in spans]
        if any(touching) and not any(inside):
            raise InputError(
                f"sample {entry.id}: token {tokenizer.convert_ids_to_tokens(token_id)!r} at characters "
                f"{start}-{end} spans an answer's boundary, so the loss mask cannot follow the answer; "
                "check the template's separators for this tokenizer"
            )
        if token_id == image_id:
            ids += [image_id] * image_seq_length
            labels += [IGNORE] * image_seq_length
        else:
            ids.append(token_id)
            labels.append(token_id if any(inside) and end > start else IGNORE)
    if max_length is not None and len(ids) > max_length:
        if image_id in ids[max_length:] and image_id in ids[:max_length]:
            raise InputError(
                f"sample {entry.id}: task.max_length={max_length} cuts through its {image_seq_length} image tokens; "
                "raise task.max_length"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


# ---------------------------------------------------------------- images and batches


@dataclass(frozen=True)
class ImageSettings:
    """How images become pixel values: padded to a square with the mean colour (LLaVA's expand2square),
    resized to ``size`` and normalised with ``mean`` / ``std`` (the vision tower's processor values)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_image(path: Path, settings: ImageSettings):
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        side = max(width, height)
        square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in settings.mean))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        square = square.resize((settings.size, settings.size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(settings.size, settings.size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(settings.mean).view(3, 1, 1), torch.tensor(settings.std).view(3, 1, 1)
    return (pixels - mean) / std


def held_out(entries: list[Entry], share: float) -> tuple[list[Entry], list[Entry]]:
    """(train, held-out): a fixed split by id (every entry whose position in id order is a multiple of
    round(1 / share) is held out), the same on every machine and for every seed."""
    if not 0 < share < 1:
        raise InputError(f"task.eval_share must lie in (0, 1) (got {share}); e.g. task.eval_share=0.1")
    step = max(2, round(1 / share))
    ordered = sorted(entries, key=lambda e: e.id)
    return [e for i, e in enumerate(ordered) if i % step], [e for i, e in enumerate(ordered) if not i % step]


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded ids, labels -100 on padding, the attention mask, and the images of the samples that have one."""
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        ids[row, :n] = torch.tensor(sample["input_ids"])
        labels[row, :n] = torch.tensor(sample["labels"])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch


class VitDataModule(L.LightningDataModule):
    """Training and held-out conversations of one LLaVA-format file, their images under
    ``<data_dir>/<task.image_folder>``, read lazily (a sample is tokenized and its image loaded when the loader
    asks for it; every mask is checked once in ``setup``). Exposes ``num_train_examples`` / ``num_eval_examples``
    as the pipeline expects."""

    def __init__(self, task, tokenizer, paths_cfg, seed: int, image: ImageSettings, image_seq_length: int) -> None:
        from tsft import paths

        super().__init__()
        self.task, self.tokenizer, self.seed = task, tokenizer, seed
        self.image, self.image_seq_length = image, image_seq_length
        self.data_dir = paths.resolve(paths_cfg.data_dir)
        self.splits: dict[str, list[Entry]] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        path = self.data_dir / self.task.train_file
        if not path.is_file():
            raise InputError(f"no training file {path}; set task.train_file (relative to paths.data_dir)")
        entries = read_entries(path)
        missing = [
            e.image for e in entries if e.image and not (self.data_dir / self.task.image_folder / e.image).is_file()
        ]
        if missing:
            raise InputError(
                f"{len(missing)} of {len(entries)} entries name images missing under "
                f"{self.data_dir / self.task.image_folder} (e.g. {missing[0]}); fix task.image_folder"
            )
        train, held = held_out(entries, self.task.eval_share)
        if self.task.train_limit:
            train = train[: self.task.train_limit]
        if self.task.eval_limit:
            held = held[: self.task.eval_limit]
        self.splits = {"train": train, "eval": held}
        for entry in train + held:  # every mask is checked now, before any training
            tokenize_entry(entry, self.tokenizer, self.image_seq_length, self.task.max_length)
        self._find_benchmarks()

    def _find_benchmarks(self) -> None:
        """The benchmarks of ``task.benchmarks`` that can run here, and why the others cannot."""
        from tsft.eval.vit_benchmarks import available

        self.benchmarks, self.skipped = {}, {}
        images, answers = self.task.get("benchmark_images") or {}, self.task.get("benchmark_answers") or {}
        for name in self.task.get("benchmarks") or []:
            records, reason = available(
                name, self.data_dir, images.get(name), answers.get(name), self.task.get("benchmark_limit")
            )
            if records is None:
                self.skipped[name] = reason
            else:
                self.benchmarks[name] = records

    @property
    def num_train_examples(self) -> int:
        return len(self.splits["train"])

    @property
    def num_eval_examples(self) -> int:
        return len(self.splits["eval"])

    def _sample(self, entry: Entry) -> dict[str, Any]:
        ids, labels = tokenize_entry(entry, self.tokenizer, self.image_seq_length, self.task.max_length)
        pixels = load_image(self.data_dir / self.task.image_folder / entry.image, self.image) if entry.image else None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}

    def _eval_loader(self):
        from torch.utils.data import DataLoader

        pad = self.tokenizer.pad_token_id
        samples = _Lazy(self.splits["eval"], self._sample)
        return DataLoader(samples, batch_size=self.task.eval_batch_size, collate_fn=lambda batch: collate(batch, pad))

    def test_dataloader(self):
        """The held-out conversations (answer loss), then one loader of prompts per runnable benchmark."""
        return [self.val_dataloader()] + [self._prompt_loader(name) for name in self.benchmarks]

    def _prompt_loader(self, name: str):
        from torch.utils.data import DataLoader

        records = self.benchmarks[name]
        # MMBench's images come decoded from its question file, as absolute paths the join leaves as they are
        folder = self.data_dir / ((self.task.get("benchmark_images") or {}).get(name) or "")

        def make(index: int) -> dict[str, Any]:
            record = records[index]
            text = prompt_of(record.question, has_image=record.image is not None)
            ids = expand_image_tokens(self.tokenizer(text)["input_ids"], self.tokenizer, self.image_seq_length)
            pixels = load_image(folder / record.image, self.image) if record.image else None
            return {"input_ids": ids, "pixel_values": pixels, "index": index}

        pad = self.tokenizer.pad_token_id
        return DataLoader(
            _Lazy(list(range(len(records))), make),
            batch_size=self.task.eval_batch_size,
            collate_fn=lambda batch: collate_prompts(batch, pad),
        )

    def train_dataloader(self):
        from tsft.data.loading import training_loader

        pad = self.tokenizer.pad_token_id
        samples = _Lazy(self.splits["train"], self._sample)
        return training_loader(
            samples,
            batch_size=self.task.batch_size,
            seed=self.seed,
            collate_fn=lambda b: collate(b, pad),
            datamodule=self,
        )

    def val_dataloader(self):
        return self._eval_loader()


class _Lazy:
    """A map-style dataset: ``make(entries[i])`` on access."""

    def __init__(self, entries: list[Entry], make) -> None:
        self.entries, self.make = entries, make

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.make(self.entries[index])


def expand_image_tokens(ids: list[int], tokenizer: Any, image_seq_length: int) -> list[int]:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out = []
    for token in ids:
        out += [token] * image_seq_length if token == image_id else [token]
    return out


def collate_prompts(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Left-padded prompts for batched generation (the new tokens then follow every prompt directly)."""
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        ids[row, width - n :] = torch.tensor(sample["input_ids"])
        mask[row, width - n :] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([s["index"] for s in samples])}
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch
