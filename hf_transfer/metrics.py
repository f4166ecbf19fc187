"""Accuracy, macro-F1 and the per-class test report, computed by scikit-learn (no network, no files)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def compute_metrics(eval_prediction) -> dict[str, float]:
    """`Trainer`'s `compute_metrics` hook: logits in, accuracy and macro-F1 (classes weighted equally) out."""
    predictions, references = np.argmax(eval_prediction.predictions, axis=-1), eval_prediction.label_ids
    return {"accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions, average="macro", zero_division=0))}


def test_report(predictions, references, labels: list[str]) -> dict:
    """Per-class precision/recall/F1 and the confusion matrix (rows = true class, columns = predicted)."""
    ids = list(range(len(labels)))
    # target_names would key the classes by name, and two classes may share a name once escaped: keyed by id, then named.
    report = classification_report(references, predictions, labels=ids, output_dict=True, zero_division=0)
    return {
        "labels": labels,
        "confusion_matrix": confusion_matrix(references, predictions, labels=ids).tolist(),
        "per_class": {
            label: {"precision": float(row["precision"]), "recall": float(row["recall"]), "f1": float(row["f1-score"]),
                    "support": int(row["support"])}
            for label, row in zip(labels, (report[str(i)] for i in ids))
        },
    }
