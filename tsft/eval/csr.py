"""Commonsense-reasoning evaluation following LLM-Adapters' ``commonsense_evaluate.py`` (as run by DoRA).

``generate`` is the protocol of the paper's Table 1: the model answers the Alpaca prompt (beam search,
4 beams, at most 32 new tokens), the first answer token of the test set's kind found in the response is
the prediction, and accuracy is exact match with the record's ``answer``. The match is case-sensitive,
as in the protocol: a response "True" predicts nothing for BoolQ.

``loglik`` is a faster alternative, not the paper's protocol: each answer listed in the instruction's
"Answer format: a/b/..." line is scored by log P(response | prompt), the response being the record's
``output`` with that answer in place of the gold one; the highest-scoring answer is the prediction.
It always yields one of the offered answers, so it also measures a model that has not yet learned the
response format, which generation scores as wrong.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from tsft.data.csr import answer_choices, build_prompt, candidate_responses

# What LLM-Adapters' extract_answer searches for per test set. SIQA has 3 answers in the data, but the
# protocol's pattern allows 5, like ARC's (a few ARC questions have 3 or 5 answers).
_ANSWERS_1_TO_5 = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "social_i_qa": re.compile(_ANSWERS_1_TO_5),
    "ARC-Challenge": re.compile(_ANSWERS_1_TO_5),
    "ARC-Easy": re.compile(_ANSWERS_1_TO_5),
    "openbookqa": re.compile(_ANSWERS_1_TO_5),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
}
MODES = ("generate", "loglik")


def extract_answer(test_set: str, response: str) -> str:
    """The first answer token in ``response`` ("" when there is none), as LLM-Adapters extracts it."""
    match = ANSWER_PATTERNS[test_set].search(response)
    return match.group(0) if match else ""


def pad_left(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of sequences padded at the start.

    Left padding puts every sequence's last token in the last column, where generation continues and where
    ``loglik`` reads the response scores. Position ids count real tokens only, so a padded sequence is
    encoded exactly as it would be alone (generate() derives the same ones from the attention mask).
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, length - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, length - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_responses(
    model, tokenizer, records: list[dict[str, Any]], num_beams: int = 4, max_new_tokens: int = 32
) -> list[str]:
    """The model's responses to the records' prompts: the decoded new tokens, i.e. the text after the
    prompt's "### Response:". LLM-Adapters also passes temperature/top_p/top_k, which do nothing
    without sampling; ``num_beams=1`` is greedy decoding."""
    prompts = tokenizer([build_prompt(r) for r in records], add_special_tokens=True)["input_ids"]
    input_ids, attention_mask, _ = pad_left(prompts, tokenizer.pad_token_id)
    device = _device(model)
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, input_ids.shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def _score_rows(model, rows: list[tuple[list[int], int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of (token ids, number of trailing ids to score): the summed log-probability of those
    trailing ids given everything before them, and the log-distribution of the token after the row."""
    input_ids, attention_mask, position_ids = pad_left([ids for ids, _ in rows], pad_token_id)
    longest = max(n for _, n in rows)
    device = _device(model)
    # Only the logits of the last `longest` + 1 positions are needed: large vocabularies make the rest costly.
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        logits_to_keep=longest + 1,
    )
    logp = torch.log_softmax(output.logits.float(), dim=-1)
    targets = input_ids[:, input_ids.shape[1] - longest :].to(device)
    token_logp = logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    scored = torch.tensor([n for _, n in rows], device=device)
    is_scored = torch.arange(longest, device=device) >= (longest - scored).unsqueeze(1)
    return (token_logp * is_scored).sum(dim=1).cpu(), logp[:, -1].cpu()


def choice_logliks(model, tokenizer, records: list[dict[str, Any]]) -> list[list[float]]:
    """log P(response | prompt) for each answer a record offers (tsft.data.csr.candidate_responses).

    The responses of a record differ only in their end ("... is answer1" / "... is answer2"). When they
    differ in their last token only, as with the LLM-Adapters answers under Llama and SmolLM2 tokenizers,
    one forward pass over prompt + common part scores them all: the distribution after the common part
    gives each last token's probability. Otherwise each response gets its own row.
    """
    rows: list[tuple[list[int], int]] = []
    plans: list[list[tuple[int, int | None]]] = []  # per record, per answer: (row, extra last token or None)
    for record in records:
        prompt_ids = tokenizer(build_prompt(record), add_special_tokens=True)["input_ids"]
        responses = [
            tokenizer(response, add_special_tokens=False)["input_ids"] for response in candidate_responses(record)
        ]
        common = _common_prefix(responses)
        if all(len(response) == len(common) + 1 for response in responses):
            rows.append((prompt_ids + common, len(common)))
            plans.append([(len(rows) - 1, response[-1]) for response in responses])
        else:
            first = len(rows)
            rows.extend((prompt_ids + response, len(response)) for response in responses)
            plans.append([(first + i, None) for i in range(len(responses))])
    row_logp, next_logp = _score_rows(model, rows, tokenizer.pad_token_id)
    return [
        [float(row_logp[row]) + (0.0 if last is None else float(next_logp[row, last])) for row, last in plan]
        for plan in plans
    ]


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    length = 0
    while all(len(s) > length for s in sequences) and len({s[length] for s in sequences}) == 1:
        length += 1
    return sequences[0][:length]


def choose_by_loglik(model, tokenizer, records: list[dict[str, Any]]) -> list[str]:
    """For each record, the offered answer whose response the model finds most likely."""
    scores = choice_logliks(model, tokenizer, records)
    return [
        max(zip(answer_choices(record), record_scores), key=lambda pair: pair[1])[0]
        for record, record_scores in zip(records, scores)
    ]


def predict(
    model,
    tokenizer,
    test_set: str,
    records: list[dict[str, Any]],
    mode: str,
    num_beams: int = 4,
    max_new_tokens: int = 32,
) -> list[str]:
    """Predicted answers for one batch of records of ``test_set``."""
    if mode == "generate":
        responses = generate_responses(model, tokenizer, records, num_beams, max_new_tokens)
        return [extract_answer(test_set, response) for response in responses]
    if mode == "loglik":
        return choose_by_loglik(model, tokenizer, records)
    raise ValueError(f"eval mode must be one of {MODES}, got {mode!r}")


def accuracies(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Accuracy per test set from its (correct, total) counts, and their unweighted mean ``avg`` (the paper's
    "Avg" column). Sets with no records stay out."""
    scores = {name: correct / total for name, (correct, total) in counts.items() if total > 0}
    if not scores:
        raise ValueError("no test records were evaluated")
    scores["avg"] = sum(scores.values()) / len(scores)
    return scores


def trivial_scores(test_sets: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Per test set, the accuracy (percent) of always giving its most common gold answer: the tables'
    chance line (about 100/k for a balanced k-way choice; BoolQ's majority is higher)."""
    scores = {}
    for name, records in test_sets.items():
        if records:
            counts = Counter(record["answer"] for record in records)
            scores[name] = 100.0 * max(counts.values()) / len(records)
    return scores
