"""Accuracy, macro-F1 and the test report: scikit-learn's numbers, every class reported, nothing written."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from transformers import EvalPrediction

from hf_transfer import metrics


def test_trainer_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    logits, references = rng.normal(size=(1000, 10)), rng.integers(0, 10, 1000)
    predictions = logits.argmax(-1)
    expected = {"accuracy": accuracy_score(references, predictions), "f1": f1_score(references, predictions, average="macro")}
    assert metrics.compute_metrics(EvalPrediction(predictions=logits, label_ids=references)) == expected


def test_report_lists_every_class_even_one_never_predicted_or_seen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels = ["cat", "dog", "bird"]
    references, predictions = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])  # bird: no image, no prediction
    report = metrics.test_report(predictions, references, labels)
    precision, recall, f1, support = precision_recall_fscore_support(references, predictions, labels=[0, 1, 2], zero_division=0)
    assert list(report["per_class"]) == labels
    assert [row["f1"] for row in report["per_class"].values()] == [float(value) for value in f1]
    assert [row["support"] for row in report["per_class"].values()] == [2, 2, 0]
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert not list(tmp_path.iterdir())
