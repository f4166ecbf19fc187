"""Feature cache: real tiny runs on the shipped cats-vs-dogs photos with a random-init timm ConvNeXt
(its classifier sits inside a head module, after a frozen norm: the general case).

Hits and misses are read from the run's own record and the cache folders' modification times, never from timing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import SAMPLE
from safetensors.torch import load_file
from transformers import pipeline

from hf_transfer import finetune
from hf_transfer.feature_store import KEY_FILE, load, weights_digest

TINY = dict(
    dataset=str(SAMPLE), model="test_convnext", pretrained=False, validation_size=16, max_train_samples=32,
    max_test_samples=16, num_train_epochs=2, per_device_train_batch_size=16, learning_rate=3e-3,
    augmentation="none", save_strategy="no", load_best_model_at_end=False,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(path))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield path


def _train(tmp_path, name, **options):
    return finetune(output_dir=str(tmp_path / name), **{**TINY, **options})


def _mtimes(results) -> dict:
    return {split: os.stat(info["path"]).st_mtime_ns for split, info in results["feature_cache"]["splits"].items()}


@pytest.fixture(scope="module")
def first_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return out, _train(out, "first")


def test_first_run_extracts_float16_features_into_the_datasets_cache(first_run, cache_dir):
    _, results = first_run
    splits = results["feature_cache"]["splits"]
    assert {split: info["hit"] for split, info in splits.items()} == {"train": False, "validation": False, "test": False}
    for split, size in results["split_sizes"].items():
        info = splits[split]
        assert info["path"].startswith(str(cache_dir)) and info["images"] == size and info["dtype"] == "float16"
        features, labels = load(info["path"])
        assert features.dtype == np.float16 and features.shape == (size, 1, 64) and len(labels) == size
        key = json.loads((Path(info["path"]) / KEY_FILE).read_text())
        assert key["split"] == split and key["model"] == "test_convnext" and "Normalize" in key["transform"]


def test_full_model_test_accuracy_equals_the_cached_features_accuracy(first_run):
    _, results = first_run
    assert results["test_accuracy"] == results["test_cache_accuracy"]
    assert results["test_cache_agreement"] == 1.0


def test_output_dir_loads_with_pipeline_and_predicts_like_the_trained_head(first_run):
    out, results = first_run
    model_dir = out / "first"
    classifier = pipeline("image-classification", model=str(model_dir))
    test = datasets.load_dataset(str(SAMPLE), split="test").shuffle(seed=42).select(range(16))
    answers = classifier(list(test["image"]), top_k=1)
    piped = np.array([classifier.model.config.label2id[answer[0]["label"]] for answer in answers])

    # The same predictions from the saved head applied to the cached test features.
    weights = load_file(model_dir / "model.safetensors")
    features, labels = load(results["feature_cache"]["splits"]["test"]["path"])
    logits = torch.from_numpy(features[:, 0]).float() @ weights["head.fc.weight"].T + weights["head.fc.bias"]  # timm layout
    assert np.array_equal(labels, np.array(test["labels"]))
    assert np.array_equal(piped, logits.argmax(-1).numpy())
    assert (piped == labels).mean() == pytest.approx(results["test_accuracy"])


def test_second_run_skips_extraction_and_says_so(first_run, caplog):
    out, first = first_run
    caplog.set_level(logging.INFO, logger="hf_transfer")
    second = _train(out, "second")
    assert all(info["hit"] for info in second["feature_cache"]["splits"].values())
    assert _mtimes(second) == _mtimes(first), "cached folders were rewritten"
    assert "feature cache hit: skipping extraction of train" in caplog.text
    assert "extracted" not in caplog.text
    assert second["test_accuracy"] == first["test_accuracy"] and second["eval_loss"] == pytest.approx(first["eval_loss"])


def test_changed_data_invalidates_only_that_split(first_run):
    out, first = first_run
    results = _train(out, "fewer", max_train_samples=24)
    hits = {split: info["hit"] for split, info in results["feature_cache"]["splits"].items()}
    assert hits == {"train": False, "validation": True, "test": True}
    assert results["feature_cache"]["splits"]["train"]["path"] != first["feature_cache"]["splits"]["train"]["path"]


def test_augmented_views_are_cached_separately_and_used_one_per_epoch(first_run):
    out, first = first_run
    results = _train(out, "views", augmentation="default", feature_cache_views=2)
    train = results["feature_cache"]["splits"]["train"]
    assert not train["hit"] and train["views"] == 2
    features, _ = load(train["path"])
    assert features.shape[1] == 2 and not np.array_equal(features[:, 0], features[:, 1]), "two different augmented views"
    assert results["feature_cache"]["splits"]["validation"]["hit"], "evaluation splits stay un-augmented"


def test_cached_and_uncached_training_reach_the_same_head(first_run):
    out, first = first_run
    uncached = _train(out, "uncached", feature_cache=False)
    assert "feature_cache" not in uncached
    assert uncached["train_loss"] == pytest.approx(first["train_loss"], rel=1e-2)
    assert uncached["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-2)
    assert uncached["test_accuracy"] == first["test_accuracy"]


def test_weights_digest_follows_the_backbone_not_the_head():
    import timm

    model = timm.create_model("test_efficientnet", num_classes=2)
    digest = weights_digest(model, "classifier")
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        assert weights_digest(model, "classifier") == digest
        model.bn1.running_mean.add_(1e-3)
        assert weights_digest(model, "classifier") != digest


# --- staged schedules: the head-only first stage trains on the cache, the later stages on images ----------
# 32 train images in batches of 16: 2 steps an epoch; stage 1 (everything trains) starts at epoch 1 = step 2.
STAGED = dict(freeze="staged", stages="[{at_epoch: 0, train: head}, {at_epoch: 1, train: all}]")


@pytest.fixture(scope="module")
def staged_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("staged")
    return out, _train(out, "staged", **STAGED)


def test_staged_schedule_trains_its_head_stage_on_the_cache_then_everything_on_images(staged_run):
    out, results = staged_run
    cache = results["feature_cache"]
    assert set(cache["splits"]) == {"train", "validation"}, "no test check: the backbone changes after stage 0"
    assert cache["head_stage"]["train_steps_per_second"] > 0
    plan = json.loads((out / "staged" / "freeze_plan.json").read_text())
    assert [(stage["train"], stage["started_at_step"]) for stage in plan["history"]] == [("head", 0), ("all", 2)]
    assert plan["integrity"]["frozen_unchanged"]
    history = json.loads((out / "staged" / "trainer_state.json").read_text())["log_history"]
    assert [entry["epoch"] for entry in history if "eval_loss" in entry][:2] == [1.0, 2.0], "both epochs are in the record"
    assert not list((out / "staged").glob("checkpoint-*")), "the hand-over checkpoint is removed with save_strategy 'no'"
    classifier = pipeline("image-classification", model=str(out / "staged"))
    test = datasets.load_dataset(str(SAMPLE), split="test").shuffle(seed=42).select(range(16))
    predicted = [classifier.model.config.label2id[answer[0]["label"]] for answer in classifier(list(test["image"]), top_k=1)]
    assert np.mean(np.array(predicted) == np.array(test["labels"])) == pytest.approx(results["test_accuracy"])


def test_staged_on_the_cache_trains_like_staged_on_images(staged_run):
    out, cached = staged_run
    uncached = _train(out, "staged_uncached", feature_cache=False, **STAGED)
    assert "feature_cache" not in uncached
    # The head-only stage sees float16-rounded features instead of float32 ones; nothing else differs.
    assert uncached["train_loss"] == pytest.approx(cached["train_loss"], rel=2e-2)
    assert uncached["eval_loss"] == pytest.approx(cached["eval_loss"], rel=2e-2)


@pytest.mark.parametrize("kept", [2, 4], ids=["inside_the_cached_stage", "after_it"])
def test_staged_cached_run_resumes_exactly_from_either_stage(cache_dir, tmp_path_factory, kept):
    # 3 epochs, stage 1 from epoch 2 (step 4); a checkpoint every epoch: steps 2 (head stage), 4 (boundary), 6.
    out = tmp_path_factory.mktemp(f"resume_{kept}")
    options = dict(
        STAGED, stages="[{at_epoch: 0, train: head}, {at_epoch: 2, train: all}]", num_train_epochs=3,
        save_strategy="epoch", save_total_limit=None,
    )
    _train(out, "whole", **options)
    shutil.copytree(out / "whole", out / "killed")
    for step in (2, 4, 6):
        if step > kept:
            shutil.rmtree(out / "killed" / f"checkpoint-{step}")
    (out / "killed" / "model.safetensors").unlink()
    # A tracer in the kept checkpoint's state: only a run that really resumed from it carries it to the end.
    state_file = out / "killed" / f"checkpoint-{kept}" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["resumed_from"] = kept
    state_file.write_text(json.dumps(state))
    _train(out, "killed", resume=True, **options)
    assert json.loads((out / "killed" / "trainer_state.json").read_text())["log_history"][0]["resumed_from"] == kept
    whole, resumed = (load_file(out / name / "model.safetensors") for name in ("whole", "killed"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
