"""Data stage: column detection, split carving, limits, RGB conversion and transforms, on real photos."""

from __future__ import annotations

import io
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from conftest import SAMPLE, sample_rows
from PIL import Image

from hf_transfer.data import attach_transforms, build_transforms, collate, load_image_dataset
from hf_transfer.models import data_config, load_model
from hf_transfer.options import DataArguments, ModelArguments


def _save(tmp_path, splits: dict[str, datasets.Dataset]) -> str:
    folder = tmp_path / "dataset"
    for name, split in splits.items():
        split.to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    return str(folder)


def _photo_dataset(rows, image_column="img", label_column="label") -> datasets.Dataset:
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict(
        {image_column: [row["image"] for row in rows], label_column: [row["labels"] for row in rows]}, features=features
    )


def test_columns_found_by_feature_type_for_both_hub_schemas(tmp_path):
    # cats_vs_dogs names them image/labels; CIFAR-10 names them img/label.
    prepared = load_image_dataset(DataArguments(dataset=str(SAMPLE)))
    assert (prepared.image_column, prepared.label_column, prepared.labels) == ("image", "labels", ["cat", "dog"])

    cifar_like = _save(tmp_path, {"train": _photo_dataset(sample_rows("train")[:40])})
    prepared = load_image_dataset(DataArguments(dataset=cifar_like, validation_size=8, test_size=8))
    assert (prepared.image_column, prepared.label_column) == ("img", "label")


def test_columns_named_in_the_recipe_win(tmp_path):
    dataset = _photo_dataset(sample_rows("train")[:40], image_column="photo", label_column="species")
    dataset = dataset.add_column("other", [0] * 40).cast_column("other", datasets.ClassLabel(names=["a", "b"]))
    folder = _save(tmp_path, {"train": dataset})
    prepared = load_image_dataset(DataArguments(dataset=folder, label_column="species", validation_size=8, test_size=8))
    assert prepared.label_column == "species" and prepared.image_column == "photo"


def test_missing_splits_are_carved_from_train_stratified_and_seeded(tmp_path):
    folder = _save(tmp_path, {"train": _photo_dataset(sample_rows("train"))})  # 112 photos, 56 per class
    args = DataArguments(dataset=folder, validation_size=0.25, test_size=16)
    first, second = load_image_dataset(args, seed=3), load_image_dataset(args, seed=3)
    assert first.sizes == {"train": 72, "validation": 24, "test": 16}
    for name in ("validation", "test"):
        counts = Counter(first.splits[name]["label"])
        assert counts[0] == counts[1], f"{name} split is not stratified: {counts}"
        assert first.splits[name]["img"] == second.splits[name]["img"], "same seed must give the same split"
    carved = {cell["path"] for name in ("train", "validation", "test") for cell in first.splits[name]["img"]}
    assert len(carved) == 112, "the carved splits must not overlap"
    other_seed = load_image_dataset(args, seed=4)
    assert other_seed.splits["test"]["img"] != first.splits["test"]["img"]


def test_existing_test_split_is_kept_and_limits_apply():
    prepared = load_image_dataset(
        DataArguments(dataset=str(SAMPLE), validation_size=16, max_train_samples=30, max_eval_samples=10, max_test_samples=20)
    )
    assert prepared.sizes == {"train": 30, "validation": 10, "test": 20}
    test_paths = {cell["path"] for cell in prepared.splits["test"]["image"]}
    assert all(path.split(".")[1].isdigit() and int(path.split(".")[1]) > 4000 for path in test_paths), "test must come from the test split"


def _odd_modes(photo: Image.Image) -> dict[str, Image.Image]:
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    return {
        "L": photo.convert("L"),
        "RGBA": rgba,
        "P": photo.convert("P", palette=Image.Palette.ADAPTIVE),
        "CMYK": photo.convert("CMYK"),
        "I;16": Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)),
    }


def test_every_image_mode_reaches_the_model_as_rgb(tmp_path):
    photo = Image.open(io.BytesIO(sample_rows("train")[0]["image"]["bytes"]))
    encoded = []
    for mode, image in _odd_modes(photo).items():
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": f"{mode}.img"})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    rows = [{"image": e, "label": i % 2} for i, e in enumerate(encoded)] * 4
    folder = _save(tmp_path, {"train": datasets.Dataset.from_list(rows, features=features)})
    prepared = load_image_dataset(DataArguments(dataset=folder, validation_size=2, test_size=2, augmentation="none"))
    transform = build_transforms({"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0}, "none")[1]
    splits = attach_transforms(prepared, transform, transform)
    batch = collate([splits["train"][i] for i in range(len(splits["train"]))])
    assert batch["pixel_values"].shape[1:] == (3, 64, 64)
    gray = transform(photo.convert("L").convert("RGB"))
    by_path = {cell["path"]: i for i, cell in enumerate(prepared.splits["train"]["image"])}
    for mode in ("L", "I;16"):
        assert torch.allclose(batch["pixel_values"][by_path[f"{mode}.img"]], gray, atol=1 / 255 + 1e-6), mode
    reference = transform(photo.convert("RGB"))
    cmyk = batch["pixel_values"][by_path["CMYK.img"]]
    assert (cmyk - reference).abs().mean() < 0.02, "CMYK must come back with the photo's colours"


def test_preprocessing_comes_from_the_backbones_pretrained_config():
    model, processor = load_model(ModelArguments(), ["cat", "dog"])
    config = data_config(model, processor)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bicubic"
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5) and config["crop_pct"] == 0.875
    train_transform, eval_transform = build_transforms(config)
    photo = Image.open(io.BytesIO(sample_rows("test")[0]["image"]["bytes"])).convert("RGB")
    assert torch.equal(eval_transform(photo), eval_transform(photo)), "evaluation must be deterministic"
    torch.manual_seed(0)
    assert not torch.equal(train_transform(photo), train_transform(photo)), "training must augment"
    assert eval_transform(photo).shape == train_transform(photo).shape == (3, 224, 224)


@pytest.mark.parametrize("augmentation", ["randaugment", "trivialaugment"])
def test_selectable_augmentations_run(augmentation):
    train_transform, _ = build_transforms(
        {"input_size": (3, 96, 96), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}, augmentation
    )
    assert augmentation.removesuffix("augment").lower() in repr(train_transform).lower()
    photo = Image.open(io.BytesIO(sample_rows("test")[1]["image"]["bytes"])).convert("RGB")
    assert train_transform(photo).shape == (3, 96, 96)
