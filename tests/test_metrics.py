"""Accuracy and macro-F1 through `evaluate`'s interface: the same numbers as scikit-learn, one object, no files."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from hf_transfer.metrics import classification_metrics


def test_one_shot_and_batched_compute_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 10, 1000), rng.integers(0, 10, 1000)
    expected = {"accuracy": accuracy_score(references, predictions), "f1": f1_score(references, predictions, average="macro")}
    metric = classification_metrics()
    assert metric.compute(predictions=predictions, references=references) == expected
    for start in range(0, 1000, 250):
        metric.add_batch(predictions=predictions[start:start + 250], references=references[start:start + 250])
    assert metric.compute() == expected


def test_the_metric_is_built_once_and_writes_nothing(tmp_path, monkeypatch):
    import evaluate.config

    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", str(tmp_path))
    assert classification_metrics() is classification_metrics()
    classification_metrics().compute(predictions=[0, 1], references=[0, 0])
    assert not list(tmp_path.rglob("*"))
