"""Small images resized on the training device (`resize_on_device`): real photos shrunk to CIFAR's 32 px,
EfficientNet-Lite0 with its offline ImageNet weights; forced on (`true`) since this machine has no GPU."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import SAMPLE, sample_rows
from PIL import Image
from torch.nn import functional as F
from transformers import pipeline

from hf_transfer import finetune, metrics
from hf_transfer.data import build_transforms, collate, load_image_dataset
from hf_transfer.data.device_resize import device_resized_size, device_transforms, transforms_for_run
from hf_transfer.errors import DatasetError, RecipeError
from hf_transfer.feature_files import KEY_FILE, cache_root
from hf_transfer.images import load_image
from hf_transfer.models import data_config, load_model
from hf_transfer.options import DataArguments, ModelArguments
from hf_transfer.recipe import device_defaults, parse_recipe, parse_recipe_for

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # only compared, never used to compute here
LITE0 = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875, "crop_mode": "center"}


def _shrunk(rows: list[dict], size: tuple[int, int] = (32, 32)) -> list[dict]:
    """The photos as `size` PNGs, as CIFAR-10 stores its images."""
    cells = []
    for index, row in enumerate(rows):
        buffer = io.BytesIO()
        load_image(row["image"]).resize(size, Image.Resampling.BICUBIC).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": f"{index}.png"})
    return cells


def _save(folder: Path, splits: dict[str, tuple[list[dict], list[int]]]) -> str:
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    for name, (cells, labels) in splits.items():
        datasets.Dataset.from_dict({"img": cells, "label": labels}, features=features).to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> str:
    """48 train and 16 test photos of cats and dogs at 32x32 px (both classes in both splits)."""
    train, test = sample_rows("train")[::2][:48], sample_rows("test")[::6][:16]
    return _save(tmp_path_factory.mktemp("cifar_like"), {
        "train": (_shrunk(train), [row["labels"] for row in train]),
        "test": (_shrunk(test), [row["labels"] for row in test]),
    })


@pytest.fixture(scope="module")
def small_data(cifar_like):
    return load_image_dataset(DataArguments(dataset=cifar_like, validation_size=8))


# --- when it is on ------------------------------------------------------------------------------------------

def test_auto_is_on_only_on_cuda_for_images_of_one_size_smaller_than_the_input(small_data, tmp_path):
    auto = "auto"
    assert device_resized_size(auto, small_data, LITE0, CUDA) == (32, 32)
    assert None is device_resized_size(auto, small_data, LITE0, CPU), "a CPU gains nothing"
    assert None is device_resized_size(auto, small_data, {**LITE0, "input_size": (3, 32, 32)}, CUDA), "not smaller than the input"
    assert None is device_resized_size(auto, small_data, {**LITE0, "interpolation": "lanczos"}, CUDA), "no device version: the CPU does it"
    photos = load_image_dataset(DataArguments(dataset=str(SAMPLE), max_train_samples=40, max_test_samples=8))
    assert None is device_resized_size(auto, photos, LITE0, CUDA), "photos of many sizes stay on the CPU"
    assert device_resized_size("true", small_data, LITE0, CPU) == (32, 32)
    assert None is device_resized_size("false", small_data, LITE0, CUDA)


def test_the_option_reads_yaml_booleans_and_rejects_other_values():
    recipe = ["recipes/quickstart.yaml"]
    assert parse_recipe(recipe).data.resize_on_device == "auto"
    assert parse_recipe(recipe, resize_on_device=True).data.resize_on_device == "true"  # YAML `true`
    assert parse_recipe([*recipe, "--resize_on_device", "False"]).data.resize_on_device == "false"
    with pytest.raises(RecipeError, match="auto | true | false"):
        parse_recipe([*recipe, "--resize_on_device", "yes"])


def test_forcing_it_on_images_of_several_sizes_says_how_to_fix_it(small_data):
    photos = load_image_dataset(DataArguments(dataset=str(SAMPLE), max_train_samples=40, max_test_samples=8))
    forced = DataArguments(dataset=str(SAMPLE), resize_on_device="true")
    with pytest.raises(DatasetError, match=r"needs images of one size.*; found \d+x\d+ .*`resize_on_device: false`"):
        transforms_for_run(forced, photos, LITE0, CPU)
    with pytest.raises(ValueError, match="interpolation 'lanczos'.*`resize_on_device: false`"):
        transforms_for_run(forced, small_data, {**LITE0, "interpolation": "lanczos"}, CPU)
    # An image of another size further in (past the sample) stops at its batch, with the same advice.
    _, eval_transform, _ = device_transforms(LITE0, (32, 32))
    batch = [{"pixel_values": eval_transform(load_image(row["image"])), "labels": 0} for row in sample_rows("test")[:2]]
    with pytest.raises(DatasetError, match="different sizes .*`resize_on_device: false`"):
        collate(batch)


# --- what the CPU and the device compute -------------------------------------------------------------------

def test_the_cpu_only_decodes_and_the_training_shift_and_flip_are_cifars(small_data):
    train_transform, eval_transform, _ = device_transforms(LITE0, (32, 32), "default")
    photo = load_image(small_data.splits["train"][0]["img"])
    decoded = eval_transform(photo)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 32, 32)
    assert torch.equal(eval_transform(photo), decoded), "evaluation must be deterministic"

    padded = F.pad(decoded[None].float(), (4, 4, 4, 4), mode="reflect")[0]  # CIFAR's pad 4 (reflect), crop 32
    windows = {(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)}
    seen = set()
    torch.manual_seed(0)
    for _ in range(60):
        augmented = train_transform(photo)
        assert augmented.dtype == torch.uint8 and augmented.shape == (3, 32, 32)
        match = [w for w in windows if torch.equal(_window(padded, *w), augmented.float())]
        assert match, "every augmented image is a flipped or unflipped window of the reflect-padded image"
        seen.add(match[0])
    assert len(seen) > 20 and {flip for *_, flip in seen} == {False, True}, "shifts and flips vary"
    torch.manual_seed(0)
    first = train_transform(photo)
    torch.manual_seed(0)
    assert torch.equal(train_transform(photo), first), "seeded like every other augmentation"


def _window(padded: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    window = padded[:, top:top + 32, left:left + 32]
    return window.flip(-1) if flip else window


@pytest.mark.parametrize("augmentation", ["none", "randaugment", "trivialaugment"])
def test_every_augmentation_runs_on_the_uint8_images(small_data, augmentation):
    train_transform, eval_transform, device_step = device_transforms(LITE0, (32, 32), augmentation)
    photo = load_image(small_data.splits["train"][1]["img"])
    torch.manual_seed(1)
    images = torch.stack([train_transform(photo) for _ in range(8)])
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    if augmentation == "none":
        assert train_transform is eval_transform and all(torch.equal(image, images[0]) for image in images)
    else:
        assert augmentation.removesuffix("augment").lower() in repr(train_transform).lower()
        assert len({image.numpy().tobytes() for image in images}) > 1
    assert device_step(images).shape == (8, 3, 224, 224)


def test_the_feature_cache_key_names_the_device_step():
    # The feature store keys on repr(transform): the CPU half names the device half, so changing either misses the cache.
    cpu_path = repr(build_transforms(LITE0)[1])
    device_path = repr(device_transforms(LITE0, (32, 32))[1])
    other_crop = repr(device_transforms({**LITE0, "crop_pct": 1.0}, (32, 32))[1])
    assert "then on the device: DeviceResize(input_size=(224, 224), crop_pct=0.875" in device_path
    assert len({cpu_path, device_path, other_crop}) == 3


@pytest.mark.parametrize("size, config", [
    ((32, 32), {}),
    ((40, 30), {"input_size": (3, 200, 240)}),  # timm's ResizeKeepRatio
    ((30, 44), {"crop_mode": "squash", "crop_pct": 0.9}),
    ((32, 32), {"interpolation": "bilinear", "crop_pct": 1.0, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
])
def test_evaluation_on_the_device_computes_what_timm_computes_on_the_cpu(size, config):
    config = {**LITE0, **config}
    photos = [load_image(cell) for cell in _shrunk(sample_rows("test")[:6], size)]
    cpu = torch.stack([build_transforms(config, "none")[1](photo) for photo in photos])
    _, eval_transform, device_step = device_transforms(config, (32, 32), "none")
    on_device = device_step(torch.stack([eval_transform(photo) for photo in photos]))
    assert on_device.shape == cpu.shape
    # Pillow rounds to 8 bits after each of its two passes and so does the device step, but Pillow's coefficients
    # are fixed-point: a few pixels land one level apart (two for bilinear upsampling), none further.
    levels = (on_device - cpu).abs() * torch.tensor(config["std"]).view(1, 3, 1, 1) * 255
    assert levels.max() < 2.01 and (levels > 0.01).float().mean() < 0.01


def test_a_pretrained_model_sees_the_same_images_either_way(small_data):
    model, processor = load_model(ModelArguments(), small_data.labels)
    model.eval()
    config = data_config(model, processor)
    photos = [load_image(cell) for cell in small_data.splits["test"]["img"]]
    cpu = torch.stack([build_transforms(config, "none")[1](photo) for photo in photos])
    _, eval_transform, device_step = device_transforms(config, (32, 32), "none")
    backbone = model.timm_model
    with torch.inference_mode():
        on_device = device_step(torch.stack([eval_transform(photo) for photo in photos]))
        reference, features = (backbone.forward_head(backbone.forward_features(x), pre_logits=True) for x in (cpu, on_device))
        logits, reference_logits = backbone.get_classifier()(features), backbone.get_classifier()(reference)
    # Inputs differ by one 8-bit level on <1% of pixels (see above): the pooled features move by ~0.1% (0.2% at
    # most, measured), against ~50% for +-1 level of noise on every pixel. A prediction can flip only where the
    # head's two logits are closer than that; the fresh head here is random, so compare where they are not.
    change = (features - reference).norm(dim=1) / reference.norm(dim=1)
    assert change.max() < 0.01
    difference = (logits - reference_logits).abs().max()
    margin = (reference_logits[:, 0] - reference_logits[:, 1]).abs()
    clear = margin > 2 * difference
    assert clear.sum() >= len(photos) - 2
    assert torch.equal(logits.argmax(-1)[clear], reference_logits.argmax(-1)[clear])


# --- a whole run -------------------------------------------------------------------------------------------

def test_a_run_resizes_on_the_device_and_saves_a_model_that_pipeline_preprocesses_as_usual(cifar_like, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output_dir = tmp_path / "model"
    results = finetune(
        dataset=cifar_like, validation_size=8, resize_on_device=True, freeze="head_only", num_train_epochs=3,
        learning_rate=3e-3, per_device_train_batch_size=16, save_strategy="no", load_best_model_at_end=False,
        output_dir=str(output_dir),
    )
    # The frozen backbone's features were extracted from uint8 32 px batches, resized by the hook.
    for info in results["feature_cache"]["splits"].values():
        assert "then on the device: DeviceResize" in json.loads((cache_root() / info["entry"] / KEY_FILE).read_text())["transform"]
    assert results["test_cache_agreement"] == 1.0

    classifier = pipeline("image-classification", model=str(output_dir))
    test = datasets.load_dataset(cifar_like, split="test")
    answers = classifier(list(test["img"]), top_k=1)
    predicted = np.array([classifier.model.config.label2id[answer[0]["label"]] for answer in answers])
    in_run = json.loads((output_dir / "test_report.json").read_text())
    labels = ["cat", "dog"]
    assert metrics.test_report(predicted, np.array(test["label"]), labels)["confusion_matrix"] == in_run["confusion_matrix"]
    assert np.mean(predicted == np.array(test["label"])) == pytest.approx(results["test_accuracy"])
    assert results["resized_on_device"]


def test_training_steps_go_through_the_device_resize_and_the_card_says_so(cifar_like, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The last block trains on images, so every training step's uint8 32 px batch must pass the hook
    # (the convolutions would refuse uint8 input otherwise).
    results = finetune(
        dataset=cifar_like, validation_size=8, resize_on_device=True, freeze="last_n:1", num_train_epochs=1,
        per_device_train_batch_size=16, save_strategy="no", load_best_model_at_end=False, output_dir=str(tmp_path / "model"),
    )
    assert results["resized_on_device"] and results["train_loss"] > 0
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| train-time augmentation | random shift by up to 1/8 of the side (reflect) + horizontal flip |" in card
    assert "resized and normalised on the training device" in card


# --- CUDA defaults -----------------------------------------------------------------------------------------

def test_on_cuda_loader_workers_default_to_the_cores_up_to_8_unless_the_recipe_sets_them():
    assert device_defaults("cuda", 16)["dataloader_num_workers"] == 8
    assert device_defaults("cuda", 4)["dataloader_num_workers"] == 4
    assert device_defaults("cuda", 16, processes=4)["dataloader_num_workers"] == 4, "processes share the cores"
    assert device_defaults("cuda", None)["dataloader_num_workers"] == 1
    assert device_defaults("cpu", 16) == {}
    quickstart, cifar10 = "recipes/quickstart.yaml", "recipes/cifar10.yaml"  # unset / `dataloader_num_workers: 2`
    unset = parse_recipe_for("cuda", [quickstart]).training.dataloader_num_workers
    assert unset == device_defaults("cuda", os.cpu_count())["dataloader_num_workers"]
    assert parse_recipe_for("cuda", [cifar10]).training.dataloader_num_workers == 2
    assert parse_recipe_for("cuda", [quickstart, "--dataloader_num_workers", "0"]).training.dataloader_num_workers == 0
    assert parse_recipe_for("cuda", [quickstart], dataloader_num_workers=3).training.dataloader_num_workers == 3
    assert parse_recipe_for("cpu", [quickstart]).training.dataloader_num_workers == 0, "Trainer's default on a CPU"
    training = parse_recipe_for("cuda", [quickstart]).training  # batches copied to the GPU without a sync per step
    assert training.accelerator_config.non_blocking and training.dataloader_pin_memory
    assert not parse_recipe_for("cpu", [quickstart]).training.accelerator_config.non_blocking
