"""The whole flow on real photos: train, test, save a model repo that `pipeline` loads offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import QUICKSTART, REPO
from transformers import pipeline

from hf_transfer.errors import RecipeError
from hf_transfer.recipe import parse_recipe


def test_quickstart_beats_chance_and_reports_everything(quickstart_model_dir):
    results = json.loads((quickstart_model_dir / "all_results.json").read_text())
    assert results["test_accuracy"] >= 0.9, "a frozen ImageNet backbone separates cats from dogs easily"
    for key in ("test_accuracy", "test_f1", "eval_accuracy", "eval_f1", "train_runtime", "train_loss"):
        assert isinstance(results[key], float), key
    assert results["split_sizes"] == {"train": 96, "validation": 16, "test": 96}
    assert results["skipped_images"] == {"train": 0, "validation": 0, "test": 0}
    state = json.loads((quickstart_model_dir / "trainer_state.json").read_text())
    assert state["best_metric"] == max(entry["eval_accuracy"] for entry in state["log_history"] if "eval_accuracy" in entry)
    plan = json.loads((quickstart_model_dir / "freeze_plan.json").read_text())
    assert plan["trainable_parameters"] == 1280 * 2 + 2, "head_only trains exactly the new 2-class head"


def test_output_dir_is_a_complete_safetensors_model_repo(quickstart_model_dir):
    files = {path.name for path in quickstart_model_dir.iterdir() if path.is_file()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= files
    written = [p for p in quickstart_model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not [p for p in written if not p.parent.name.startswith("checkpoint-")], f"pickles in the model repo: {written}"
    assert not (quickstart_model_dir / ".partial").exists()
    config = json.loads((quickstart_model_dir / "config.json").read_text())
    assert config["label_names"] == ["cat", "dog"]


def test_pipeline_loads_the_output_offline_with_real_labels(quickstart_model_dir, test_photos):
    env_offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        classifier = pipeline("image-classification", model=str(quickstart_model_dir))
    finally:
        os.environ.pop("HF_HUB_OFFLINE") if env_offline is None else os.environ.update(HF_HUB_OFFLINE=env_offline)
    answers = classifier([photo for photo, _ in test_photos])
    assert {answer[0]["label"] for answer in answers} <= {"cat", "dog"}
    correct = sum(answer[0]["label"] == label for answer, (_, label) in zip(answers, test_photos))
    assert correct >= len(test_photos) - 1, f"{correct}/{len(test_photos)} held-out photos right"


def test_recipe_keys_can_be_overridden_on_the_command_line():
    recipe = parse_recipe([str(QUICKSTART), "--num_train_epochs", "2", "--freeze", "last_n:3", "--augmentation", "none"])
    assert recipe.training.num_train_epochs == 2 and recipe.freezing.freeze == "last_n:3" and recipe.data.augmentation == "none"
    assert recipe.training.output_dir == "outputs/quickstart" and recipe.training.remove_unused_columns is False
    with pytest.raises(RecipeError, match="num_train_epochs"):
        parse_recipe([str(QUICKSTART), "--num_train_epoch", "2"])


def test_help_explains_the_commands():
    train_help = subprocess.run([sys.executable, "-m", "hf_transfer.cli", "train", "--help"], capture_output=True, text=True, cwd=REPO)
    assert train_help.returncode == 0, train_help.stderr
    for option in ("--dataset", "--model", "--freeze", "--stages", "--layer_decay", "--resume", "TrainingArguments"):
        assert option in train_help.stdout, option


def test_timm_itself_loads_the_output_dir(quickstart_model_dir):
    import timm
    import torch
    from transformers import AutoModelForImageClassification

    with_transformers = AutoModelForImageClassification.from_pretrained(quickstart_model_dir).eval()
    with_timm = timm.create_model(f"local-dir:{quickstart_model_dir}", pretrained=True).eval()
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(with_transformers(pixels).logits, with_timm(pixels), atol=1e-5)
    assert with_timm.pretrained_cfg["label_names"] == ["cat", "dog"]
