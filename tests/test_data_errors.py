"""Data options and dataset layouts that used to end in a raw traceback or a silent surprise: each now gives one
clear `error: ...` line (exit code 2, no traceback) or does the sensible thing, and says what it found.

Real photos from the repo's cats-vs-dogs sample throughout; image folders are written file by file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from conftest import IMAGE, LABEL, SAMPLE, TINY_RUN, labelled, photos, sample_rows, train_in_process, user_error, write_dataset

from hf_transfer.data import load_image_dataset
from hf_transfer.errors import DatasetError, HFTransferError
from hf_transfer.options import DataArguments

pytestmark = pytest.mark.usefixtures("offline_hub")

TRAIN_FILE = SAMPLE / "data" / "train-00000-of-00001.parquet"  # 112 photos, 56 per class


def write_photos(folder: Path, label: int, count: int, skip: int = 0) -> list[Path]:
    """`count` real photos of class `label` (0 cat, 1 dog) as JPEG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [row for row in sample_rows("train") if row["labels"] == label][skip:skip + count]
    paths = [folder / Path(row["image"]["path"]).name for row in rows]
    for path, row in zip(paths, rows):
        path.write_bytes(row["image"]["bytes"])
    return paths


# ---- option values: refused when the options are read, before any data is loaded ----------------------------------
OPTION_CASES = {
    ("validation_size", "0"): ["`validation_size: 0` carves no images", "a fraction of the train split below 1", "a whole number"],
    ("validation_size", "-3"): ["`validation_size: -3` carves no images"],
    ("test_size", "0"): ["`test_size: 0` carves no images"],
    ("test_size", "2.5"): ["`test_size: 2.5` is neither a fraction below 1 nor a whole number of images"],
    ("max_train_samples", "0"): ["`max_train_samples: 0` would leave the train split without images", "leave `max_train_samples` unset"],
    ("max_eval_samples", "0"): ["`max_eval_samples: 0` would leave the validation split without images"],
    ("max_test_samples", "-1"): ["`max_test_samples: -1` would leave the test split without images"],
}


@pytest.mark.parametrize(("option", "value"), OPTION_CASES)
def test_option_values_that_select_no_images_are_refused_first(option, value, tmp_path, capsys):
    # The dataset folder does not exist: the option is reported first, so nothing was loaded before the check.
    missing = tmp_path / "no_such_folder"
    message = user_error(capsys, "--dataset", str(missing), f"--{option}", value, "--output_dir", str(tmp_path / "out"))
    for phrase in OPTION_CASES[option, value]:
        assert phrase in message
    other = "test_size" if option == "validation_size" else "validation_size"
    assert f"`{other}" not in message
    with pytest.raises(HFTransferError):
        DataArguments(dataset=str(missing), **{option: float(value) if "size" in option else int(value)})


# ---- carving validation and test from train -------------------------------------------------------------------------
def test_validation_size_larger_than_the_split_names_validation_size(tmp_path, capsys):
    # The sample has a test split, so only validation is carved: the message must not blame `test_size`.
    for size in ("1000", "112"):
        message = user_error(capsys, "--dataset", str(SAMPLE), "--validation_size", size, "--output_dir", str(tmp_path / "out"))
        assert f"`validation_size: {size}` asks for {size} images but the train split has only 112" in message
        assert "Lower `validation_size`" in message and "test_size" not in message


def test_carving_after_the_test_split_says_what_is_left(tmp_path):
    only_train = write_dataset(tmp_path / "only_train", {"train": labelled("train", 40)}, {"image": IMAGE, "labels": LABEL})
    with pytest.raises(DatasetError, match=r"`test_size: 50` asks for 50 images but the train split has only 40\."):
        load_image_dataset(DataArguments(dataset=only_train, test_size=50, validation_size=4))
    with pytest.raises(DatasetError) as error:
        load_image_dataset(DataArguments(dataset=only_train, test_size=20, validation_size=20))
    assert "`validation_size: 20` asks for 20 images but the train split has only 20 (after carving the test split)" in str(error.value)


def test_one_image_per_class_cannot_be_stratified(tmp_path, capsys):
    cats, dogs = photos("train", 3, label=0), photos("train", 1, label=1)
    folder = write_dataset(tmp_path / "few", {
        "train": {"image": cats[0] + dogs[0], "labels": cats[1] + dogs[1]}, "test": labelled("test", 8),
    }, {"image": IMAGE, "labels": LABEL})
    message = user_error(capsys, "--dataset", folder, "--validation_size", "2", "--output_dir", str(tmp_path / "out"))
    assert "Class ['dog'] has only 1 image in the train split" in message
    assert "cannot carve a stratified validation split" in message
    assert "Add images of that class, or give the dataset a validation split" in message


def test_more_classes_than_the_carved_split_can_hold(tmp_path, capsys):
    images, _ = photos("train", 40)
    ten = datasets.ClassLabel(names=[f"class_{index}" for index in range(10)])
    folder = write_dataset(tmp_path / "ten", {
        "train": {"image": images, "labels": [index % 10 for index in range(40)]},
        "test": {"image": images[:10], "labels": list(range(10))},
    }, {"image": IMAGE, "labels": ten})
    message = user_error(capsys, "--dataset", folder, "--validation_size", "3", "--output_dir", str(tmp_path / "out"))
    assert "`validation_size: 3` carves 3 of the 40 images in the train split for 10 classes" in message
    assert "Set `validation_size` to at least 10 (images) or 0.25 (a fraction)" in message
    message = user_error(capsys, "--dataset", folder, "--validation_size", "0.05", "--output_dir", str(tmp_path / "out"))
    assert "`validation_size: 0.05` carves 2 of the 40 images" in message
    message = user_error(capsys, "--dataset", folder, "--validation_size", "35", "--output_dir", str(tmp_path / "out"))
    assert "`validation_size: 35` leaves 5 images in the train split for 10 classes" in message
    assert "Set `validation_size` to at most 30" in message


def test_max_samples_that_keep_a_few_images_still_work():
    prepared = load_image_dataset(DataArguments(dataset=str(SAMPLE), validation_size=8, max_train_samples=6,
                                                max_eval_samples=1, max_test_samples=40))
    assert prepared.sizes == {"train": 6, "validation": 1, "test": 40}


# ---- what the dataset path points at --------------------------------------------------------------------------------
def test_a_single_parquet_file_is_the_train_split_and_the_rest_is_carved(caplog):
    caplog.set_level(logging.INFO, logger="hf_transfer")
    prepared = load_image_dataset(DataArguments(dataset=str(TRAIN_FILE), validation_size=8, test_size=16))
    assert prepared.sizes == {"train": 88, "validation": 8, "test": 16}
    assert prepared.labels == ["cat", "dog"] and prepared.label_column == "labels"
    assert "train-00000-of-00001.parquet as the train split" in caplog.text


@pytest.mark.parametrize("reading", [[], ["--streaming", "true", "--max_steps", "2"]], ids=["map-style", "streamed"])
def test_a_file_that_is_not_parquet_is_refused(tmp_path, capsys, reading):
    photo = write_photos(tmp_path, 0, 1)[0]
    message = user_error(capsys, "--dataset", str(photo), "--output_dir", str(tmp_path / "out"), *reading)
    assert f"Dataset '{photo}' is a file, not a folder or a .parquet file" in message
    assert "Give a folder (an image folder with one sub-folder per class, or a parquet export) or one .parquet file." in message


def test_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "readme_only").mkdir()
    (tmp_path / "readme_only" / "README.md").write_text("# my photos\n")
    for name in ("empty", "readme_only"):
        message = user_error(capsys, "--dataset", str(tmp_path / name), "--output_dir", str(tmp_path / "out"))
        assert f"Dataset folder '{tmp_path / name}' holds no data files" in message
        assert "one folder per class" in message and "parquet" in message


# ---- image folders ------------------------------------------------------------------------------------------------
def test_image_folder_logs_the_images_found_per_class(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_transfer")
    write_photos(tmp_path / "photos" / "train" / "cat", 0, 12)
    write_photos(tmp_path / "photos" / "train" / "dog", 1, 9)
    write_photos(tmp_path / "photos" / "test" / "cat", 0, 3, skip=20)
    write_photos(tmp_path / "photos" / "test" / "dog", 1, 2, skip=20)
    load_image_dataset(DataArguments(dataset=str(tmp_path / "photos"), validation_size=4))
    assert f"Image folder {tmp_path / 'photos'}: train: 21 images (cat 12, dog 9); test: 5 images (cat 3, dog 2)" in caplog.text


def test_a_class_folder_that_is_a_symlink_is_followed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_transfer")
    elsewhere = tmp_path / "elsewhere"
    write_photos(elsewhere / "dogs", 1, 10)
    write_photos(tmp_path / "photos" / "cat", 0, 10)
    (tmp_path / "photos" / "dog").symlink_to(elsewhere / "dogs")
    prepared = load_image_dataset(DataArguments(dataset=str(tmp_path / "photos"), validation_size=4, test_size=4))
    assert prepared.labels == ["cat", "dog"] and sum(prepared.sizes.values()) == 20
    assert "train: 20 images (cat 10, dog 10)" in caplog.text
    assert "Following the linked folder(s) ['dog']" in caplog.text

    # Every class folder a link, inside train/ and test/ split folders: nothing is visible to a plain file search.
    write_photos(elsewhere / "cats", 0, 10)
    write_photos(elsewhere / "test_cats", 0, 2, skip=30)
    write_photos(elsewhere / "test_dogs", 1, 2, skip=30)
    for split, cat, dog in (("train", "cats", "dogs"), ("test", "test_cats", "test_dogs")):
        (tmp_path / "linked" / split).mkdir(parents=True)
        (tmp_path / "linked" / split / "cat").symlink_to(elsewhere / cat)
        (tmp_path / "linked" / split / "dog").symlink_to(elsewhere / dog)
    prepared = load_image_dataset(DataArguments(dataset=str(tmp_path / "linked"), validation_size=4))
    assert prepared.sizes == {"train": 16, "validation": 4, "test": 4}
    test_paths = [cell["path"] for cell in prepared.splits["test"]["image"]]
    assert all(path.startswith(str(tmp_path / "linked" / "test")) for path in test_paths), test_paths


def test_a_folder_link_back_into_the_dataset_is_refused(tmp_path, capsys):
    write_photos(tmp_path / "photos" / "cat", 0, 4)
    write_photos(tmp_path / "photos" / "dog", 1, 4)
    (tmp_path / "photos" / "cat" / "again").symlink_to(tmp_path / "photos")
    message = user_error(capsys, "--dataset", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out"))
    assert "The folder link 'cat/again' in" in message and "points back into the dataset folder" in message
    assert "Remove the link" in message


def test_images_at_mixed_depths_say_so_and_how_to_lay_the_folder_out(tmp_path, capsys):
    write_photos(tmp_path / "photos" / "cat", 0, 4)
    write_photos(tmp_path / "photos" / "dog", 1, 4)
    stray = write_photos(tmp_path / "photos", 0, 1, skip=10)[0]
    message = user_error(capsys, "--dataset", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out"))
    assert "Images in image folder" in message and "sit at different depths" in message
    assert f"1 directly in the folder (e.g. '{stray.name}')" in message and "8 one folder down (e.g. 'cat/" in message
    assert "<class>/<image>" in message and "class_encode_column" not in message


def test_an_image_folder_with_one_class_folder_says_so(tmp_path, capsys):
    write_photos(tmp_path / "photos" / "cat", 0, 6)
    message = user_error(capsys, "--dataset", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out"))
    assert "all 6 images are in one folder ('cat')" in message and "at least two class folders" in message
    write_photos(tmp_path / "loose", 0, 6)
    message = user_error(capsys, "--dataset", str(tmp_path / "loose"), "--output_dir", str(tmp_path / "out"))
    assert "all 6 images are directly in the folder, with no class folders" in message and "<class>/<image>" in message


# ---- what is recorded about skipped images: paths relative to the dataset folder ------------------------------------
def test_skipped_images_are_named_relative_to_the_dataset_folder(tmp_path):
    root = tmp_path / "photos"
    write_photos(root / "cat", 0, 8)
    write_photos(root / "dog", 1, 8)
    (root / "dog" / "broken.jpg").write_bytes(sample_rows("train")[0]["image"]["bytes"][:300])  # a truncated download
    output_dir = tmp_path / "out"
    train_in_process("--dataset", str(root), "--output_dir", str(output_dir), *TINY_RUN, "--test_size", "4")

    results = json.loads((output_dir / "all_results.json").read_text())
    entries = [entry for found in results["skipped_image_examples"].values() for entry in found]
    assert len(entries) == 1 and entries[0].startswith("dog/broken.jpg: "), entries
    assert str(root) not in (output_dir / "all_results.json").read_text()
    card_lines = [line for line in (output_dir / "README.md").read_text().splitlines() if "broken.jpg" in line]
    assert card_lines and all("dog/broken.jpg" in line and str(root) not in line for line in card_lines), card_lines


def test_absolute_paths_outside_the_dataset_folder_become_file_names(tmp_path):
    # Parquet rows written elsewhere may carry their author's absolute paths: only the file name is kept.
    images, labels = photos("train", 16)
    images[5] = {"bytes": b"<html>404</html>", "path": "/home/someone/private/cat.999.jpg"}
    folder = write_dataset(tmp_path / "exported", {"train": {"image": images, "labels": labels}, "test": labelled("test", 8)},
                           {"image": IMAGE, "labels": LABEL})
    prepared = load_image_dataset(DataArguments(dataset=folder, validation_size=4))
    entries = [entry for found in prepared.skipped.values() for entry in found]
    assert len(entries) == 1 and entries[0].startswith("cat.999.jpg: ") and "/home/someone" not in entries[0], entries
