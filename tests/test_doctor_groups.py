"""Data doctor, copies as groups: copies in other colour modes, copies with different labels, data unlike ImageNet, and
what `exclude_flagged` does with whole groups; built from the repo's own photos (and noise images), checked on real
ImageNet features (EfficientNet-Lite0, offline weights)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from conftest import TINY_RUN, TINY_SAMPLE, photos, sample_rows, user_error
from huggingface_hub import constants as hub_constants
from PIL import Image

from hf_transfer import offline
from hf_transfer.card import data_quality_section
from hf_transfer.cli import main
from hf_transfer.data import load_image_dataset
from hf_transfer.data_check import exclude, flagged_indices, image_names, summary_text
from hf_transfer.errors import DoctorError
from hf_transfer.pipeline import run_doctor
from hf_transfer.recipe import parse_recipe
from hf_transfer.repo_files import DATA_REPORT

LITE0 = "timm/tf_efficientnet_lite0.in1k"
COPIES_OF_ONE = 25  # more copies of one photo than the 20 neighbours the similarity search returns per image


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """No Hub, and a datasets cache (with its feature cache) of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        patch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("HF_TRANSFER_DEBUG", raising=False)
        offline.hub_reachable.cache_clear()
        yield
        offline.hub_reachable.cache_clear()


def _saved(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def colour_mode_copies(photo: bytes) -> dict[str, bytes]:
    """The photo saved in other colour modes: what a dataset assembled from several sources holds."""
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    gray = image.convert("L")
    return {
        "cmyk.jpg": _saved(image.convert("CMYK"), "JPEG", quality=95),
        "gray.png": _saved(gray, "PNG"),
        "palette.png": _saved(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"),
        "rgba.png": _saved(image.convert("RGBA"), "PNG"),
        "gray16.png": _saved(Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257), "PNG"),  # 16-bit samples
    }


def write_folder(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def split_photos(split: str, label: int, start: int, count: int, folder: str) -> dict[str, bytes]:
    cells, _ = photos(split, start + count, label)
    return {f"{folder}/{index}.jpg": cell["bytes"] for index, cell in enumerate(cells[start:], start)}


@pytest.fixture(scope="module")
def copies(offline_cache, tmp_path_factory):
    """An image folder with two planted groups: five copies of test cat A in other colour modes filed under train/dog,
    and 25 exact copies of test cat B under train/cat. Everything else is a distinct photo. The doctor runs once."""
    root = tmp_path_factory.mktemp("copies") / "pets"
    cats, _ = photos("test", 2, 0)
    a, b = cats[0]["bytes"], cats[1]["bytes"]
    files = {**split_photos("train", 0, 0, 12, "train/cat"), **split_photos("train", 1, 0, 12, "train/dog"),
             **split_photos("train", 0, 12, 3, "validation/cat"), **split_photos("train", 1, 12, 3, "validation/dog"),
             **split_photos("test", 0, 2, 6, "test/cat"), **split_photos("test", 1, 0, 8, "test/dog"),
             "test/cat/a.jpg": a, "test/cat/b.jpg": b,
             **{f"train/dog/a-{name}": data for name, data in colour_mode_copies(a).items()},
             **{f"train/cat/b-{index}.jpg": b for index in range(COPIES_OF_ONE)}}
    write_folder(root, files)
    output_dir = tmp_path_factory.mktemp("doctor") / "out"
    recipe = parse_recipe([], dataset=str(root), model=LITE0, output_dir=str(output_dir), per_device_eval_batch_size=64, seed=42)
    report = run_doctor(recipe)
    return SimpleNamespace(report=report, recipe=recipe, root=root, output_dir=output_dir,
                           a_copies={f"train/dog/a-{name}" for name in colour_mode_copies(a)},
                           b_copies={f"train/cat/b-{index}.jpg" for index in range(COPIES_OF_ONE)})


def _names(group: dict) -> set[str]:
    return {image["image"] for image in group["images"]}


def _group_of(report: dict, name: str) -> dict:
    return next(group for group in report["copy_groups"] if name in _names(group))


def test_copies_in_every_colour_mode_join_their_source_in_one_group(copies):
    assert _names(_group_of(copies.report, "test/cat/a.jpg")) == copies.a_copies | {"test/cat/a.jpg"}
    # every copy, gray and palette too, is a leak of test image A: the train side of a cross-split group
    assert _names(_group_of(copies.report, "test/cat/b.jpg")) == copies.b_copies | {"test/cat/b.jpg"}
    assert len(copies.report["copy_groups"]) == 2, "no distinct photos grouped"
    assert copies.report["summary"]["copy_groups"] == 2
    assert copies.report["summary"]["images_in_copy_groups"] == len(copies.a_copies) + len(copies.b_copies) + 2


def test_copies_with_different_labels_are_a_label_problem_in_the_report_summary_and_card(copies):
    report = copies.report
    assert [(_names(group), group["labels"]) for group in report["conflicting_labels"]] == [
        (copies.a_copies | {"test/cat/a.jpg"}, ["cat", "dog"])]
    assert report["summary"]["conflicting_label_groups"] == 1 and report["summary"]["conflicting_label_images"] == 6
    text = summary_text(report)
    assert "copies with different labels: 1 group(s), 6 image(s)" in text
    assert "test #" in text and "test/cat/a.jpg labelled cat" in text and "labelled dog" in text
    section = data_quality_section(report)
    assert "| copies with different labels | 1 group(s), 6 images |" in section
    written = json.loads((copies.output_dir / DATA_REPORT).read_text())
    assert written["conflicting_labels"] == report["conflicting_labels"]


def test_exclude_flagged_removes_whole_groups(copies):
    report, data = copies.report, load_image_dataset(copies.recipe.data, seed=42)
    names = image_names(data, copies.recipe.data.dataset)

    def removed(choice: str) -> set[str]:
        return {names["train"][index] for index in flagged_indices(report, choice).get("train", [])}

    # every train copy of a test image, not only those the similarity search paired with it
    assert copies.b_copies | copies.a_copies <= removed("leaks")
    assert copies.a_copies <= removed("label_issues"), "a group with two labels: its train images go"
    assert not copies.b_copies & removed("label_issues")
    kept = exclude(data, flagged_indices(report, "leaks"))
    assert len(kept.splits["train"]) == len(data.splits["train"]) - len(removed("leaks"))


def noise_images(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_saved(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG") for _ in range(count)]


def test_on_noise_images_the_features_make_no_false_copies_and_the_report_says_why(offline_cache, tmp_path):
    """Images unlike ImageNet: all look alike to the backbone (cosine >= 0.9), which is no sign of copies."""
    root = tmp_path / "noise"
    images = iter(noise_images(4 * 14, seed=0))
    files = {f"{split}/class{label}/{index}.png": next(images)
             for label in range(4) for split, count in (("train", 8), ("validation", 2), ("test", 4)) for index in range(count)}
    files["train/class0/copy.png"] = files["test/class0/0.png"]  # one real copy
    write_folder(root, files)
    recipe = parse_recipe([], dataset=str(root), model=LITE0, output_dir=str(tmp_path / "out"), per_device_eval_batch_size=64, seed=42)
    report = run_doctor(recipe)
    pairs = [sorted(image["image"] for image in pair["images"]) for pair in report["leaks"] + report["near_duplicates"]]
    assert pairs == [["test/class0/0.png", "train/class0/copy.png"]]
    assert report["copies"]["features_meaningful"] is False
    assert report["copies"]["share_with_a_neighbour_above_threshold"] > 0.5
    assert "the backbone's features do not tell these images apart" in summary_text(report)
    assert "features do not tell these images apart" in data_quality_section(report)


# --- exclusions in a run ------------------------------------------------------------------------------------------------
def test_exclusions_that_would_empty_a_class_of_the_train_split_are_refused(offline_cache, tmp_path, capsys):
    """Every train cat is also in test: `exclude_flagged: leaks` would train a one-class model; refused, as at load time."""
    root = tmp_path / "pets"
    cats, _ = photos("test", 8, 0)
    files = {**split_photos("test", 0, 0, 8, "test/cat"), **split_photos("test", 1, 0, 8, "test/dog"),
             **{f"train/cat/{index}.jpg": cell["bytes"] for index, cell in enumerate(cats)},
             **split_photos("train", 1, 0, 8, "train/dog"),
             **split_photos("train", 0, 0, 2, "validation/cat"), **split_photos("train", 1, 8, 2, "validation/dog")}
    write_folder(root, files)
    message = user_error(capsys, *TINY_RUN, "--dataset", str(root), "--exclude_flagged", "leaks", "--output_dir", str(tmp_path / "out"))
    assert "`exclude_flagged: leaks` would remove every train image of class 'cat' (8 of 8)" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_exclude_refuses_to_empty_a_class_of_any_split(copies):
    data = load_image_dataset(copies.recipe.data, seed=42)
    test_cats = [index for index, label in enumerate(data.splits["test"][data.label_column]) if label == 0]
    with pytest.raises(DoctorError) as refused:
        exclude(data, {"test": test_cats})
    assert f"would remove every test image of class 'cat' ({len(test_cats)} of {len(test_cats)})" in str(refused.value)


# --- the doctor command and a finished run ------------------------------------------------------------------------------
def doctor_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(["doctor", *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err, err
    message = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]  # after any progress bar
    assert len(message) == 1, err
    return message[0]


@pytest.mark.slow
def test_the_doctor_never_replaces_a_runs_report_with_one_made_with_other_options(offline_cache, tmp_path, capsys):
    run = tmp_path / "run"
    options = (*TINY_RUN, *TINY_SAMPLE, "--freeze", "head_only")
    main(["train", *options, "--output_dir", str(run)])
    report = (run / DATA_REPORT).read_bytes()
    message = doctor_error(capsys, *options, "--doctor_duplicate_threshold", "0.95", "--output_dir", str(run))
    assert "holds a run whose data and data report were made with other options" in message
    assert "(differs in: doctor.doctor_duplicate_threshold)" in message and "replace the one its model card describes" in message
    assert (run / DATA_REPORT).read_bytes() == report, "the run's report, which its card describes, is untouched"
    main(["doctor", *options, "--output_dir", str(run)])  # the run's own options: the same report again
    assert json.loads((run / DATA_REPORT).read_text())["summary"] == json.loads(report)["summary"]


def test_one_class_folders_in_several_splits_are_all_named(offline_cache, tmp_path, capsys):
    rows = [row for row in sample_rows("train") if row["labels"] == 0][:8]
    write_folder(tmp_path / "cats", {f"{'train' if index < 6 else 'test'}/cat/{index}.jpg": row["image"]["bytes"]
                                     for index, row in enumerate(rows)})
    message = user_error(capsys, "--dataset", str(tmp_path / "cats"), "--output_dir", str(tmp_path / "out"))
    assert "all 8 images are in folders named 'cat' ('test/cat': 2, 'train/cat': 6)" in message, message
