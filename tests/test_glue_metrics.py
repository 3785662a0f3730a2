"""GLUE metrics per task against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tsft.eval.glue import glue_metrics, headline_score


def compute(task: str, num_labels: int, predictions, labels) -> dict[str, float]:
    metrics = glue_metrics(task, num_labels)
    metrics.update(torch.tensor(predictions), torch.tensor(labels))
    return {k: float(v) for k, v in metrics.compute().items()}


def test_cola_matthews_correlation():
    # TP=1 FP=1 TN=2 FN=0: (1*2 - 1*0) / sqrt(2 * 1 * 3 * 2)
    values = compute("cola", 2, [1, 1, 0, 0], [1, 0, 0, 0])
    assert values == {"mcc": pytest.approx(2 / math.sqrt(12))}
    assert headline_score("cola", values) == pytest.approx(100 * 2 / math.sqrt(12))


def test_mrpc_accuracy_and_f1():
    values = compute("mrpc", 2, [1, 1, 0, 0], [1, 0, 0, 0])
    assert values == {"accuracy": pytest.approx(0.75), "f1": pytest.approx(2 / 3)}
    assert headline_score("mrpc", values) == pytest.approx(75.0)


def test_stsb_pearson_and_spearman():
    predictions, labels = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 7.0, 6.0]
    values = compute("stsb", 1, predictions, labels)
    assert values["pearson"] == pytest.approx(np.corrcoef(predictions, labels)[0, 1], abs=1e-6)
    assert values["spearman"] == pytest.approx(0.8, abs=1e-6)  # ranks 1,2,3,4 vs 1,2,4,3
    assert headline_score("stsb", values) == pytest.approx(100 * values["pearson"])


def test_three_way_accuracy_and_mnli_headline():
    assert compute("mnli", 3, [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": pytest.approx(0.75)}
    assert headline_score("mnli", {"accuracy_matched": 0.8, "accuracy_mismatched": 0.7}) == pytest.approx(80.0)
    assert set(glue_metrics("rte", 2)) == {"accuracy"}
