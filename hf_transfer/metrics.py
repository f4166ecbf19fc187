"""Accuracy and macro-F1 as one `evaluate` metric that needs no network, plus the per-class test report.

`evaluate.load("accuracy")` downloads its script from the Hub; this subclass keeps the same
`compute` / `add_batch` interface with the computation done locally by scikit-learn.
"""

from __future__ import annotations

import functools

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

_INT_PAIRS = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class ClassificationMetrics(evaluate.Metric):
    """Accuracy and macro-F1 as one `evaluate` metric: `compute(predictions=..., references=...)` or `add_batch` then `compute`."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy (fraction of predictions equal to the reference) and F1 averaged over classes with equal weight.",
            citation="", inputs_description="predictions, references: class ids", features=_INT_PAIRS,
        )

    def _compute(self, predictions, references, labels=None):
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
        }

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Accuracy and macro-F1 of `predictions` against `references` (or of the batches added so far). """
        # A one-shot call needs none of evaluate's Arrow buffering: 3 ms instead of 23 ms on 10,000 predictions.
        if predictions is not None and self.writer is None:
            return self._compute(np.asarray(predictions), np.asarray(references), **kwargs)
        return super().compute(predictions=predictions, references=references, **kwargs)


@functools.cache
def classification_metrics() -> ClassificationMetrics:
    """The process's one metric object; in memory, so it leaves no lock files under HF_HOME."""
    return ClassificationMetrics(keep_in_memory=True)


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
