"""Accuracy and macro-F1 as `evaluate` metrics that need no network, plus the per-class test report.

`evaluate.load("accuracy")` downloads its script from the Hub; these subclasses keep the same
`compute` / `add_batch` interface with the computation done locally by scikit-learn.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

_INT_PAIRS = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the reference label.",
            citation="", inputs_description="predictions, references: class ids", features=_INT_PAIRS,
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 averaged over classes with equal weight (macro).",
            citation="", inputs_description="predictions, references: class ids", features=_INT_PAIRS,
        )

    def _compute(self, predictions, references, labels=None):
        return {"f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0))}


def classification_metrics():
    """An `evaluate.combine` of accuracy and macro-F1: `.compute(predictions=..., references=...)`."""
    return evaluate.combine([Accuracy(), MacroF1()])


def compute_metrics(eval_prediction) -> dict[str, float]:
    """`Trainer`'s `compute_metrics` hook: logits in, accuracy and macro-F1 out."""
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    return classification_metrics().compute(predictions=predictions, references=eval_prediction.label_ids)


def test_report(predictions, references, labels: list[str]) -> dict:
    """Per-class precision/recall/F1 and the confusion matrix (rows = true class, columns = predicted)."""
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(references, predictions, labels=ids, zero_division=0)
    return {
        "labels": labels,
        "confusion_matrix": confusion_matrix(references, predictions, labels=ids).tolist(),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
    }
