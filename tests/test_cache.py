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
from conftest import QUICKSTART, SAMPLE, launch_processes, run_command
from safetensors.torch import load_file
from transformers import pipeline

from hf_transfer import finetune
from hf_transfer.cached_head import check_cache
from hf_transfer.feature_files import KEY_FILE, cache_root, load, relative_errors, storage_dtype, store
from hf_transfer.feature_store import CHECK_IMAGES, FeatureCacheMismatchError, weights_digest
from hf_transfer.strategies import CachedHead

# The data doctor off: these tests count the cache's own extractions and checks (tests/test_doctor.py runs it in a run).
TINY = dict(
    data_doctor=False,
    dataset=str(SAMPLE), model="test_convnext", pretrained=False, validation_size=16, max_train_samples=32,
    max_test_samples=16, num_train_epochs=2, per_device_train_batch_size=16, learning_rate=3e-3,
    augmentation="none", save_strategy="no", load_best_model_at_end=False,
)


def _train(tmp_path, name, **options):
    return finetune(output_dir=str(tmp_path / name), **{**TINY, **options})


def _entry(info: dict) -> Path:
    """The cache entry a run's record names (all_results.json names it relative to the cache, which it publishes)."""
    return cache_root() / info["entry"]


def _mtimes(results) -> dict:
    return {split: os.stat(_entry(info)).st_mtime_ns for split, info in results["feature_cache"]["splits"].items()}


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
        assert _entry(info).is_relative_to(cache_dir) and info["images"] == size and info["dtype"] == "float16"
        features, labels = load(_entry(info))
        assert features.dtype == np.float16 and features.shape == (size, 1, 64) and len(labels) == size
        key = json.loads((_entry(info) / KEY_FILE).read_text())
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
    features, labels = load(_entry(results["feature_cache"]["splits"]["test"]))
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
    assert results["feature_cache"]["splits"]["train"]["entry"] != first["feature_cache"]["splits"]["train"]["entry"]


def test_augmented_views_are_cached_separately_and_used_one_per_epoch(first_run):
    out, first = first_run
    results = _train(out, "views", augmentation="default", feature_cache_views=2)
    train = results["feature_cache"]["splits"]["train"]
    assert not train["hit"] and train["views"] == 2
    features, _ = load(_entry(train))
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


# --- storage keeps precision -------------------------------------------------------------------------------
def test_features_too_small_for_float16_are_stored_in_float32(tmp_path):
    rng = np.random.default_rng(0)
    normal = rng.random((8, 1, 32), dtype=np.float32) * 6  # ReLU6 features of a pretrained CNN
    tiny = normal * 1e-14  # a random-init network's: float16 would round them to 0 (subnormal below 6.1e-5)
    assert storage_dtype(normal) == "float16" and storage_dtype(tiny) == "float32"
    assert storage_dtype(normal * 1e5) == "float32", "beyond float16's 65504"
    for name, features in (("normal", normal), ("tiny", tiny)):
        store(tmp_path / name, features, np.zeros(8), {"split": "test"})
        loaded, _ = load(tmp_path / name)
        assert relative_errors(loaded, features).max() < 1e-3


def test_a_random_init_backbone_trains_on_its_cache_and_passes_the_check(cache_dir, tmp_path):
    """Uncalibrated BatchNorm: pooled features ~1e-14. In float16 they became 0 and the check failed on 75% of images."""
    results = finetune(str(QUICKSTART), model="test_efficientnet", pretrained=False, max_train_samples=32, validation_size=8,
                       max_test_samples=32, num_train_epochs=1, output_dir=str(tmp_path / "random"), disable_tqdm=True)
    splits = results["feature_cache"]["splits"]
    assert {split: info["dtype"] for split, info in splits.items()} == {"train": "float32", "validation": "float32", "test": "float32"}
    check = results["feature_cache"]["test_check"]
    assert check["images"] == 32 and check["mismatched"] == 0 and results["test_cache_agreement"] == 1.0


# --- the check: numerical noise passes, a wrong cache does not ---------------------------------------------
def _near_tie_case(first_run, images: int = 500):
    """Real cached test features tiled to `images` rows, a linear head, and the full model's view of them: the same
    features with last-bit float16 noise (another batch composition), one image a near-tie that flips."""
    _, results = first_run
    features, labels = load(_entry(results["feature_cache"]["splits"]["test"]))
    cached = np.resize(features[:, 0].astype(np.float32), (images, features.shape[-1]))
    labels = np.resize(labels, images)
    rng = np.random.default_rng(0)
    full = cached * (1 + rng.choice([-1, 0, 1], cached.shape) * 2.0**-11)
    head = torch.nn.Linear(cached.shape[1], 2)
    with torch.no_grad():
        cached_logits, full_logits = head(torch.from_numpy(cached)).numpy(), head(torch.from_numpy(full).float()).numpy()
    cached_logits[7] = [0.5, 0.5 + 1e-4]  # a near-tie: the noise moves it across
    full_logits[7] = [0.5 + 1e-4, 0.5]
    return full, cached, full_logits, cached_logits, labels


def test_one_near_tie_in_500_images_is_noise_not_a_wrong_cache(first_run):
    """A 2-process run on features cached by a 1-process run stopped at 'disagree on 0.20% of test images': one
    near-tie in 500, and `1 - agreement > 1/len` true by float rounding at exactly one image."""
    full, cached, full_logits, cached_logits, labels = _near_tie_case(first_run)
    check = check_cache(full, cached, full_logits, cached_logits, labels, labels)
    assert check.ok and check.flips == 1 and check.agreement == pytest.approx(0.998)
    assert check.max_feature_error < 1e-3


def test_a_wrong_cache_fails_the_check(first_run):
    full, cached, full_logits, cached_logits, labels = _near_tie_case(first_run, images=64)
    others = np.roll(np.arange(64), 1)  # each row holds the next image's features (a mis-ordered join, say)
    for name, features, wrong_labels in (
        ("other images", cached[others], labels),
        ("other preprocessing", cached * 1.5 + 0.1, labels),
        ("other labels", cached, 1 - labels),
    ):
        check = check_cache(full, features, full_logits, cached_logits, labels, wrong_labels)
        assert not check.ok and check.mismatched >= 32, name


def test_a_corrupted_cache_stops_the_run_with_a_user_error(first_run, tmp_path):
    _, results = first_run
    path = _entry(results["feature_cache"]["splits"]["test"])
    key = json.loads((path / KEY_FILE).read_text())
    features, labels = load(path)
    original = tmp_path / "original"
    shutil.copytree(path, original)
    try:
        store(path, features[::-1].astype(np.float32), labels, key)  # the cache entry holds other images' features
        with pytest.raises(FeatureCacheMismatchError, match="disagree on .* of 16 checked test images"):
            _train(tmp_path, "corrupted")
    finally:
        shutil.rmtree(path)
        shutil.copytree(original, path)


# --- a second run: test metrics from the cache, the full model checked on a sample ------------------------
@pytest.fixture(scope="module")
def all_test_images(cache_dir, tmp_path_factory):
    """Two identical runs over all 96 test photos of the sample: the first extracts, the second finds everything cached."""
    out = tmp_path_factory.mktemp("all_test")
    first = _train(out, "first", max_test_samples=None)
    passes = []
    original = CachedHead._full_model_pass

    def counted(self, split):
        passes.append(len(split))
        return original(self, split)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CachedHead, "_full_model_pass", counted)
        second = _train(out, "second", max_test_samples=None)
    return out, first, second, passes


def test_first_run_checks_every_test_image_and_a_rerun_a_seeded_sample(all_test_images):
    out, first, second, passes = all_test_images
    assert first["split_sizes"]["test"] == 96 and not first["feature_cache"]["splits"]["test"]["hit"]
    assert first["feature_cache"]["test_check"]["images"] == 96 and first["feature_cache"]["test_check"]["all_test_images"]
    assert passes == [CHECK_IMAGES], "the rerun pushed only the sample through the full model"
    assert all(info["hit"] for info in second["feature_cache"]["splits"].values())
    check = second["feature_cache"]["test_check"]
    assert check["images"] == CHECK_IMAGES < 96 and not check["all_test_images"] and check["mismatched"] == 0
    for key in ("test_accuracy", "test_f1", "test_loss"):
        assert second[key] == first[key], key
    reports = [json.loads((out / name / "test_report.json").read_text()) for name in ("first", "second")]
    assert reports[0] == reports[1]
    assert second["test_samples_per_second"] > 0, "the full model's speed on images, from the check"


# --- features cached by a 1-process run serve a 2-process run -----------------------------------------------
def test_features_cached_by_one_process_serve_a_two_process_run(tmp_path):
    """Lite0 with its ImageNet weights in bf16: the 2-process run computes the checked test images in batches of
    another composition, on one thread per process; the check must see noise, not a wrong cache."""
    options = [
        "--dataset", str(SAMPLE), "--model", "timm/tf_efficientnet_lite0.in1k", "--freeze", "head_only", "--validation_size", "8",
        "--max_train_samples", "32", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--learning_rate", "3e-3", "--augmentation", "none", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--disable_tqdm", "true",
        "--data_doctor", "false",  # it would extract the test features first, and the first run then checks a sample
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    one = run_command(*options, "--output_dir", str(tmp_path / "one"), env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    two = launch_processes(*options, "--output_dir", str(tmp_path / "two"), env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]

    first, second = (json.loads((tmp_path / name / "all_results.json").read_text()) for name in ("one", "two"))
    assert first["inference_precision"] == second["inference_precision"]
    assert not first["feature_cache"]["splits"]["test"]["hit"] and first["feature_cache"]["test_check"]["images"] == 96
    assert all(info["hit"] for info in second["feature_cache"]["splits"].values())
    check = second["feature_cache"]["test_check"]
    assert check["images"] == CHECK_IMAGES and check["mismatched"] == 0 and check["max_feature_error"] < 0.01
    # Two processes train the head on batches of 2 x 8 (one process: 8), so the heads differ; each is checked.
    assert check["full_accuracy"] == pytest.approx(check["cache_accuracy"], abs=1 / CHECK_IMAGES)
    assert min(first["test_accuracy"], second["test_accuracy"]) > 0.8, "Lite0's ImageNet features separate cats from dogs"
