"""LLaVA-format conversations: the vicuna_v1 prompt, the answer-only loss mask, and refusals (tsft/data/vit.py)."""

from __future__ import annotations

import json

import pytest

from tsft.data.vit import IGNORE, IMAGE_TOKEN, Entry, read_entries, render_vicuna, tokenize_entry
from tsft.errors import InputError

from .helpers import SHARED_DATA


class PairTokenizer:
    """Tokens of two characters each (offsets given), so a boundary inside a token can be arranged."""

    eos_token = "#"

    def __call__(self, text, return_offsets_mapping, add_special_tokens):
        spans = [(i, min(i + 2, len(text))) for i in range(0, len(text), 2)]
        return {"input_ids": [hash(text[s:e]) % 1000 for s, e in spans], "offset_mapping": spans}

    def convert_tokens_to_ids(self, token):
        return -1

    def convert_ids_to_tokens(self, token_id):
        return str(token_id)


def write(tmp_path, entries):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    return path


def test_image_token_moves_to_the_start_of_the_first_human_turn(tmp_path):
    path = write(tmp_path, [
        {"id": "a", "image": "x.jpg", "conversations": [
            {"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ])  # fmt: skip
    with_image, text_only = read_entries(path)
    assert with_image.turns[0] == ("human", f"{IMAGE_TOKEN}\nWhat is this?") and with_image.image == "x.jpg"
    assert text_only.turns[0] == ("human", "Hi") and text_only.image is None


def test_vicuna_template_and_answer_spans_by_hand():
    entry = Entry("e", None, [("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")])
    text, spans = render_vicuna(entry, "</s>", system="SYS")
    assert text == "SYS USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    assert [text[s:e] for s, e in spans] == [" A1</s>", " A2</s>"]


@pytest.mark.parametrize(
    ("conversations", "message"),
    [
        ([{"from": "gpt", "value": "x"}], "turn 0 must be from 'human'"),
        ([{"from": "human", "value": "q"}], "ends with a human turn"),
        ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}], "has no image"),
        ([], "non-empty 'conversations'"),
    ],
)
def test_malformed_entries_are_refused_naming_the_entry(tmp_path, conversations, message):
    with pytest.raises(InputError, match=message):
        read_entries(write(tmp_path, [{"id": "z", "conversations": conversations}]))


def test_a_token_across_an_answer_boundary_is_an_error_not_a_silent_mask():
    # "S USER: q ASSISTANT: a#": the answer span " a#" starts at an odd character, inside a 2-character token
    entry = Entry("odd", None, [("human", "q"), ("gpt", "a")])
    with pytest.raises(InputError, match="sample odd: .* spans an answer's boundary"):
        tokenize_entry(entry, PairTokenizer(), image_seq_length=4)


def smollm2_tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path("~/.cache/tsft/models/smollm2-135m").expanduser()
    if not (path / "tokenizer.json").is_file():
        pytest.skip("SmolLM2's tokenizer is not prepared (make install / a CSR test prepares it)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def test_only_answers_and_their_eos_are_labels_and_the_image_expands():
    tokenizer = smollm2_tokenizer()
    entry = Entry("m", "x.jpg", [("human", f"{IMAGE_TOKEN}\nDescribe."), ("gpt", "A red bus."),
                                 ("human", "Color?"), ("gpt", "Red")])  # fmt: skip
    ids, labels = tokenize_entry(entry, tokenizer, image_seq_length=5)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 5 and all(lab == IGNORE for i, lab in zip(ids, labels) if i == image_id)
    answer = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert answer == f" A red bus.{tokenizer.eos_token} Red{tokenizer.eos_token}"
    assert len(ids) == len(labels)
    first_image = ids.index(image_id)
    with pytest.raises(InputError, match="cuts through its 5 image tokens"):
        tokenize_entry(entry, tokenizer, image_seq_length=5, max_length=first_image + 2)
    cut, _ = tokenize_entry(entry, tokenizer, image_seq_length=5, max_length=first_image + 5)
    assert len(cut) == first_image + 5  # a cut after the image is plain truncation


def test_every_real_caption_entry_tokenizes_with_a_consistent_mask():
    path = SHARED_DATA / "vlm" / "llava_pretrain_subset" / "blip_laion_cc_sbu_subset.json"
    if not path.is_file():
        pytest.skip(f"no caption subset at {path}")
    tokenizer = smollm2_tokenizer()
    entries = read_entries(path)
    assert len(entries) == 707 and all(e.image for e in entries)
    for entry in entries:
        ids, labels = tokenize_entry(entry, tokenizer, image_seq_length=1)
        caption = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
        assert caption == f" {entry.turns[1][1]}{tokenizer.eos_token}"
