"""The classic transfer-learning recipes in recipes/classic/ run as written: offline for a few steps with random weights
on small local data, and through the normal Hub loading path against the test Hub server (real configs, random weights)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import safetensors.torch
from conftest import REPO, SAMPLE, train_command, trains, write_dataset
from hub_server import LocalHub
from PIL import Image
from sklearn.datasets import load_digits
from transformers import pipeline

from hf_transfer.cli import main

pytestmark = pytest.mark.usefixtures("offline_hub")

CLASSIC = REPO / "recipes" / "classic"
# A few steps: the recipes' own data, model and epochs are for a real run; these keep everything else as written.
FEW_STEPS = ("--pretrained", "false", "--max_train_samples", "8", "--max_eval_samples", "4", "--max_test_samples", "8",
             "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
             "--save_strategy", "no", "--load_best_model_at_end", "false")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """Handwritten digits in MNIST's schema (`image`, `label` 0-9, grey PNGs): scikit-learn's 8 x 8 digits at 28 px."""
    found = load_digits()
    def rows(indices):
        images = []
        for index in indices:
            pixels = (found.images[index] * 255 / 16).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels, "L").resize((28, 28)).save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": f"{index}.png"})
        return {"image": images, "label": [int(found.target[i]) for i in indices]}
    names = [str(digit) for digit in range(10)]
    return write_dataset(tmp_path_factory.mktemp("digits"), {"train": rows(range(0, 60)), "test": rows(range(60, 90))},
                         {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})


@trains
def run_classic(name: str, output_dir: Path, *options: str) -> dict:
    main(["train", str(CLASSIC / f"{name}.yaml"), *FEW_STEPS, "--output_dir", str(output_dir), *options])
    return json.loads((output_dir / "all_results.json").read_text())


def trainable_blocks(output_dir: Path) -> list[str]:
    plan = json.loads((output_dir / "freeze_plan.json").read_text())
    return [block["name"] for block in plan["blocks"] if block["trainable"]]


def test_resnet18_cifar10_trains_the_final_stage_with_sgd_and_step_decay(tmp_path):
    results = run_classic("resnet18_cifar10", tmp_path / "out", "--dataset", str(SAMPLE), "--validation_size", "4")
    assert results["optimizer"]["class"] == "torch.optim.sgd.SGD" and results["optimizer"]["hyperparameters"]["momentum"] == 0.9
    assert results["lr_scheduler"]["type"] == "step" and results["lr_scheduler"]["kwargs"] == {"step_size": 7, "gamma": 0.1}
    assert trainable_blocks(tmp_path / "out") == ["layer4.0", "layer4.1", "head"]
    assert pipeline("image-classification", model=str(tmp_path / "out"))(str(REPO / "tests" / "fixtures" / "cat.jpg"))


def test_vgg16_sgd_step_retrains_the_classifier_and_scores_test_every_epoch(tmp_path):
    results = run_classic("vgg16_sgd_step", tmp_path / "out", "--dataset", str(SAMPLE), "--validation_size", "4", "--image_size", "64")
    assert results["optimizer"]["weight_decays"] == [5e-4, 0.0] and results["lr_scheduler"]["type"] == "step"
    assert trainable_blocks(tmp_path / "out") == ["pre_logits", "head"]
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [entry["epoch"] for entry in history if "test_accuracy" in entry] == [1.0, 2.0]
    assert "test accuracy" in (tmp_path / "out" / "README.md").read_text()


def test_vgg16_mnist_freezes_the_first_two_conv_blocks(digits, tmp_path):
    results = run_classic("vgg16_mnist", tmp_path / "out", "--dataset", digits, "--validation_size", "10", "--max_eval_samples", "10",
                          "--max_test_samples", "30")
    frozen = {"features.0", "features.2", "features.5", "features.7"}
    trainable = trainable_blocks(tmp_path / "out")
    assert not frozen & set(trainable) and {"features.10", "features.28", "pre_logits", "head"} <= set(trainable)
    assert results["split_sizes"]["test"] == 30


def test_two_stage_early_stopping_starts_with_the_head_under_adam(tmp_path):
    results = run_classic("two_stage_early_stopping", tmp_path / "out", "--dataset", str(SAMPLE), "--validation_size", "4")
    assert results["optimizer"]["class"] == "torch.optim.adamw.AdamW" and results["optimizer"]["weight_decays"] == [0.0]
    assert results["early_stopping"]["patience"] == 3
    history = json.loads((tmp_path / "out" / "freeze_plan.json").read_text())["history"]
    assert history[0]["train"] == "head"


TIMM_REPOS = ("resnet18.tv_in1k", "vgg16.tv_in1k")


@pytest.fixture(scope="module")
def timm_hub(tmp_path_factory):
    """The test Hub serving timm/resnet18.tv_in1k and timm/vgg16.tv_in1k: timm's own config.json, random weights."""
    with LocalHub(username="timm") as hub:
        home = tmp_path_factory.mktemp("publisher")
        code = (
            "import sys, timm, torch\nfrom huggingface_hub import HfApi\nfrom timm.models import save_for_hf\n"
            "for name in sys.argv[1:]:\n"
            "    torch.manual_seed(0)\n"
            "    model = timm.create_model(name, pretrained=False)\n"
            f"    folder = {str(home)!r} + '/' + name\n"
            "    save_for_hf(model, folder, safe_serialization=True)\n"
            "    HfApi().create_repo(f'timm/{name}', exist_ok=True)\n"
            "    HfApi().upload_folder(repo_id=f'timm/{name}', folder_path=folder)\n"
        )
        done = subprocess.run([sys.executable, "-c", code, *TIMM_REPOS], env=hub.client_env(home / "hf", token="hf_publisher"),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        yield hub, home


def test_resnet18_loads_from_the_hub_through_the_normal_online_path(timm_hub, tmp_path):
    hub, home = timm_hub
    served = safetensors.torch.load_file(home / "resnet18.tv_in1k" / "model.safetensors")
    output_dir = tmp_path / "out"
    done = subprocess.run(
        train_command(str(CLASSIC / "resnet18_cifar10.yaml"), *FEW_STEPS[2:],
         "--model", "timm/resnet18.tv_in1k", "--dataset", str(SAMPLE), "--validation_size", "4", "--output_dir", str(output_dir)),
        env=hub.client_env(tmp_path / "hf", token="hf_reader"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = safetensors.torch.load_file(output_dir / "model.safetensors")
    assert (trained["conv1.weight"] == served["conv1.weight"]).all(), "the frozen stem holds the weights the Hub served"
    card = (output_dir / "README.md").read_text()
    assert "base_model: timm/resnet18.tv_in1k" in card and "license: bsd-3-clause" in card
    assert any(request["path"].startswith("/timm/resnet18.tv_in1k/resolve/") for request in hub.requests)
    config = json.loads(subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import hf_hub_download; print(open(hf_hub_download('timm/vgg16.tv_in1k', "
         "'config.json')).read())"], env=hub.client_env(tmp_path / "hf2"), capture_output=True, text=True, timeout=120).stdout)
    assert config["architecture"] == "vgg16" and config["num_classes"] == 1000
