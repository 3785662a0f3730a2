"""GLUE's official metrics per task, and the headline number the paper reports (Table 3)."""

from __future__ import annotations

from collections import Counter

from torchmetrics import Accuracy, F1Score, MatthewsCorrCoef, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef

# The metric Table 3 reports per task; MNLI reports accuracy on the matched dev set.
HEADLINE_METRIC = {
    "cola": "mcc",
    "stsb": "pearson",
    "mnli": "accuracy_matched",
}


def glue_metrics(glue_task: str, num_labels: int) -> MetricCollection:
    """Metrics fed with predicted class ids (a float score for STS-B) and the gold labels."""
    if glue_task == "stsb":
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    if glue_task == "cola":
        return MetricCollection({"mcc": MatthewsCorrCoef(task="binary")})
    metrics = {"accuracy": Accuracy(task="multiclass", num_classes=num_labels)}
    if glue_task in ("mrpc", "qqp"):
        metrics["f1"] = F1Score(task="binary")
    return MetricCollection(metrics)


def headline_score(glue_task: str, metrics: dict[str, float]) -> float:
    """The paper's number for the task: its headline metric x 100."""
    return 100.0 * metrics[HEADLINE_METRIC.get(glue_task, "accuracy")]


def trivial_score(glue_task: str, labels: list[int | float]) -> float:
    """The headline score of the best constant prediction on these (dev) labels, the chance line of a table:
    the majority class's accuracy; 0 for CoLA's MCC and STS-B's Pearson, which a constant cannot raise
    above 0 (both are 0 or undefined for it, and a table reads undefined as no skill)."""
    if glue_task in ("cola", "stsb"):
        return 0.0
    return 100.0 * max(Counter(labels).values()) / len(labels)
