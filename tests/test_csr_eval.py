"""CSR evaluation: answer extraction per test set, batched generation, log-likelihood choice, accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.test_csr_data import BOOLQ, CSR_DIR, needs_real_data, smollm2_tokenizer
from tsft.data.csr import answer_choices, build_prompt, find_test_file
from tsft.eval.csr import (
    accuracies,
    choice_logliks,
    choose_by_loglik,
    extract_answer,
    generate_responses,
    pad_left,
    predict,
)


def _record(test_set: str, index: int) -> dict:
    return json.loads(find_test_file(CSR_DIR, test_set).read_text())[index]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("test_set", "response", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false. It is not true that ...", "false"),  # the first match counts
        ("boolq", "The correct answer is True", ""),  # case-sensitive, as in the protocol
        ("boolq", "untrue", "true"),  # a substring match, as in the protocol
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "Solution1", ""),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("social_i_qa", "answer4", "answer4"),  # SIQA offers 3 answers, the protocol's pattern 5
        ("ARC-Challenge", "the correct answer is answer5", "answer5"),
        ("ARC-Easy", "answer10", "answer1"),
        ("openbookqa", "the correct answer is answer 2, i.e. answer4", "answer4"),
        ("hellaswag", "the correct answer is ending4.", "ending4"),
        ("hellaswag", "ending5 ending2", "ending2"),
        ("winogrande", "the correct answer is option1", "option1"),
        ("winogrande", "option 2", ""),
    ],
)
def test_extract_answer(test_set, response, expected):
    assert extract_answer(test_set, response) == expected


@needs_real_data
@pytest.mark.parametrize(
    ("test_set", "index", "choices"),
    [
        ("boolq", 7, ["true", "false"]),
        ("piqa", 3, ["solution1", "solution2"]),
        ("social_i_qa", 5, ["answer1", "answer2", "answer3"]),
        ("hellaswag", 3, ["ending1", "ending2", "ending3", "ending4"]),
        ("winogrande", 3, ["option1", "option2"]),  # no blank line before "Answer format" here
        ("openbookqa", 3, ["answer1", "answer2", "answer3", "answer4"]),
        ("ARC-Easy", 93, ["answer1", "answer2", "answer3"]),
        ("ARC-Easy", 1441, ["answer1", "answer2", "answer3", "answer4", "answer5"]),
    ],
)
def test_answer_choices_come_from_the_answer_format_line(test_set, index, choices):
    record = _record(test_set, index)
    assert answer_choices(record) == choices
    assert record["answer"] in choices
    assert extract_answer(test_set, record["output"]) == record["answer"]  # gold responses score 100%


def test_pad_left_aligns_ends_and_counts_positions_from_the_first_real_token():
    input_ids, attention_mask, position_ids = pad_left([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def _records(n: int) -> list[dict]:
    questions = ["is the sky blue?", "do fish swim?", "is ice made of frozen water at sea level on earth?"]
    return [{**BOOLQ, "instruction": BOOLQ["instruction"].replace("is the sky blue?", q)} for q in questions[:n]]


def test_batched_generation_with_left_padding_matches_one_by_one(tiny_llama, tokenizer):
    records = _records(3)
    lengths = {len(tokenizer(build_prompt(r))["input_ids"]) for r in records}
    assert len(lengths) > 1  # so the batch is padded
    batched = generate_responses(tiny_llama, tokenizer, records, num_beams=1, max_new_tokens=8)
    alone = [generate_responses(tiny_llama, tokenizer, [r], num_beams=1, max_new_tokens=8)[0] for r in records]
    assert batched == alone
    assert all(batched)
    beams = generate_responses(tiny_llama, tokenizer, records, num_beams=4, max_new_tokens=8)
    assert len(beams) == 3 and all(isinstance(text, str) for text in beams)


def test_generate_mode_predicts_the_extracted_answer(tiny_llama, tokenizer, monkeypatch):
    monkeypatch.setattr("tsft.eval.csr.generate_responses", lambda *a, **k: ["the correct answer is false", "no"])
    assert predict(tiny_llama, tokenizer, "boolq", _records(2), mode="generate") == ["false", ""]
    with pytest.raises(ValueError, match="eval mode must be one of"):
        predict(tiny_llama, tokenizer, "boolq", _records(2), mode="beam")


def _unpadded_loglik(model, tokenizer, prompt: str, response: str) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0, :-1]
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(response_ids))


def test_choice_logliks_equal_scoring_each_response_alone(tiny_llama, tokenizer):
    # Three records of different lengths in one padded batch: two whose answers differ in their last token
    # only (one forward pass each) and one whose answers are several tokens long (one row per answer).
    multi_token = {
        **BOOLQ,
        "instruction": "Which word is longer?\n\nAnswer format: quizzaciously/xylophonists",
        "output": "the correct answer is xylophonists",
        "answer": "xylophonists",
    }
    records = [*_records(2), multi_token]
    scores = choice_logliks(tiny_llama, tokenizer, records)
    for record, record_scores in zip(records, scores):
        stem = record["output"][: -len(record["answer"])]
        expected = [
            _unpadded_loglik(tiny_llama, tokenizer, build_prompt(record), stem + choice)
            for choice in answer_choices(record)
        ]
        assert record_scores == pytest.approx(expected, abs=1e-4)


def test_loglik_chooses_the_answer_the_model_favours(tiny_llama, tokenizer):
    # Favour one answer token by adding to its logit; the choice must follow in both directions.
    true_id, false_id = (tokenizer(" " + w, add_special_tokens=False)["input_ids"][-1] for w in ("true", "false"))
    assert true_id != false_id
    records = _records(3)
    for favoured, expected in ((true_id, "true"), (false_id, "false")):

        def boost(module, args, output, token=favoured):
            output[..., token] += 20.0
            return output

        handle = tiny_llama.lm_head.register_forward_hook(boost)
        try:
            assert choose_by_loglik(tiny_llama, tokenizer, records) == [expected] * 3
        finally:
            handle.remove()


def test_accuracies_per_set_and_unweighted_average():
    scores = accuracies({"boolq": (3, 4), "piqa": (0, 2), "hellaswag": (0, 0)})
    assert scores == {"boolq": 0.75, "piqa": 0.0, "avg": 0.375}
    with pytest.raises(ValueError, match="no test records"):
        accuracies({"boolq": (0, 0)})
