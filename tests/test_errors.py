"""Every bad dataset, recipe or output dir gives one clear error: exit code 2, no traceback, and a message
that names the problem and says what to do.

Most cases call the `hf-transfer` entry point (`hf_transfer.cli.main`) in this process, since they fail
before any model loads; `run_command` runs the real command in a subprocess where the process boundary matters.
"""

from __future__ import annotations

import datasets
import pytest
from conftest import (
    CLASSES,
    IMAGE,
    LABEL,
    SAMPLE,
    TINY_RUN,
    TINY_SAMPLE,
    labelled,
    photos,
    run_command,
    train_in_process,
    user_error,
    write_dataset,
)

pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def bad_datasets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_datasets")
    train_images, train_labels = photos("train", 16)
    test_images, test_labels = photos("test", 8)
    as_text = lambda labels: [CLASSES[label] for label in labels]  # noqa: E731
    return {
        "no_image_column": write_dataset(root / "no_image_column", {
            "train": {"filename": [image["path"] for image in train_images], "labels": train_labels},
            "test": {"filename": [image["path"] for image in test_images], "labels": test_labels},
        }, {"filename": datasets.Value("string"), "labels": LABEL}),
        "no_label_column": write_dataset(root / "no_label_column", {
            "train": {"image": train_images}, "test": {"image": test_images},
        }, {"image": IMAGE}),
        "string_labels": write_dataset(root / "string_labels", {
            "train": {"image": train_images, "label": as_text(train_labels)},
            "test": {"image": test_images, "label": as_text(test_labels)},
        }, {"image": IMAGE, "label": datasets.Value("string")}),
        "label_out_of_range": write_dataset(root / "label_out_of_range", {
            "train": {"image": train_images, "labels": [2 if i == 3 else label for i, label in enumerate(train_labels)]},
            "test": labelled("test", 8),
        }, {"image": IMAGE, "labels": LABEL}),
        "unlabelled_test": write_dataset(root / "unlabelled_test", {
            "train": labelled("train", 16), "test": {"image": test_images, "labels": [-1] * len(test_images)},
        }, {"image": IMAGE, "labels": LABEL}),
        "empty_test": write_dataset(root / "empty_test", {
            "train": labelled("train", 16), "test": {"image": [], "labels": []},
        }, {"image": IMAGE, "labels": LABEL}),
        "one_class": write_dataset(root / "one_class", {
            "train": labelled("train", 12, label=0), "test": labelled("test", 8),
        }, {"image": IMAGE, "labels": LABEL}),
        "single_class_label": write_dataset(root / "single_class_label", {
            "train": {"image": train_images, "labels": [0] * len(train_images)},
            "test": {"image": test_images, "labels": [0] * len(test_images)},
        }, {"image": IMAGE, "labels": datasets.ClassLabel(names=["cat"])}),
        "class_missing_from_test": write_dataset(root / "class_missing_from_test", {
            "train": labelled("train", 16), "test": labelled("test", 6, label=0),
        }, {"image": IMAGE, "labels": LABEL}),
    }


# (dataset, phrases the one-line message must contain): what is wrong, and what to do about it.
DATASET_CASES = {
    "no_image_column": ["has no image column (Image feature) among ['filename', 'labels']", "set `image_column`"],
    "no_label_column": ["has no label column (ClassLabel feature) among ['image']", "class_encode_column", "`label_column`"],
    "string_labels": ["Label column 'label' is Value('string'), not a ClassLabel", "class_encode_column('label')"],
    "label_out_of_range": ["The train split has label values [2] outside 0..1 (classes ['cat', 'dog'])", "Fix or drop those rows"],
    "unlabelled_test": ["The test split has label values [-1] outside 0..1", "Fix or drop those rows"],
    "empty_test": ["has an empty split", 'Instruction "test" corresponds to no data', "Give every split images"],
    "one_class": ["The train split holds only one class (cat)", "at least two"],
    "single_class_label": ["Label column 'labels' has 1 class", "at least 2"],
    "class_missing_from_test": ["The test split has no images of class(es) ['dog']", "`max_test_samples`", "covers every class"],
}


@pytest.mark.parametrize("case", DATASET_CASES)
def test_bad_dataset_gives_one_clear_error(case, bad_datasets, tmp_path, capsys):
    message = user_error(capsys, "--dataset", bad_datasets[case], "--output_dir", str(tmp_path / "out"), *TINY_RUN)
    for phrase in DATASET_CASES[case]:
        assert phrase in message
    assert not (tmp_path / "out").exists()  # nothing was claimed for a run that never started


def test_dataset_path_that_does_not_exist(tmp_path, capsys):
    missing = str(tmp_path / "no" / "such" / "folder")
    message = user_error(capsys, "--dataset", missing, "--output_dir", str(tmp_path / "out"))
    assert f"Dataset folder '{missing}' does not exist" in message and "Give an existing folder or a Hub id" in message


def test_hub_dataset_that_cannot_be_found_offline(tmp_path, capsys):
    message = user_error(capsys, "--dataset", "nobody/no_such_dataset", "--output_dir", str(tmp_path / "out"))
    assert "Cannot load 'nobody/no_such_dataset'" in message and "Point `dataset` at a local copy" in message


@pytest.mark.parametrize("option", ["label_column", "image_column"])
def test_named_column_that_does_not_exist(option, tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, f"--{option}", "species", "--output_dir", str(tmp_path / "out"))
    assert "has no column 'species' (it has ['image', 'labels'])" in message and f"Set `{option}`" in message


def test_unknown_model_id_offline(tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, "--model", "timm/no_such_model", "--output_dir", str(tmp_path / "out"))
    assert "Cannot load 'timm/no_such_model'" in message and "unreachable" in message
    assert "Available offline: timm/tf_efficientnet_lite0.in1k" in message


def test_unknown_model_id_for_random_init(tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, "--model", "nobody/no_such_model", "--pretrained", "false",
                         "--output_dir", str(tmp_path / "out"))
    # Offline nothing can tell a misspelt id from one never cached: the message says what is missing and what builds offline.
    assert "'nobody/no_such_model'" in message and "unreachable" in message and "not in the local cache" in message
    assert "timm architecture name" in message


def test_unknown_model_id_online(tmp_path):
    """Against a Hub that answers (the local Hub server), an unknown id is 'not found', with no traceback."""
    from hub_server import LocalHub

    with LocalHub() as hub:
        result = run_command(*TINY_SAMPLE, "--model", "timm/no_such_model", "--output_dir", str(tmp_path / "out"),
                             env=hub.client_env(tmp_path / "hf_home"))
        asked = [request["path"] for request in hub.requests]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: 'timm/no_such_model' was not found on the Hub" in result.stderr and "Check the spelling" in result.stderr
    assert any("timm/no_such_model" in path for path in asked)  # it really asked that Hub


def test_misspelt_recipe_key_suggests_the_right_one(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {SAMPLE}\nnum_train_epoch: 3\n")
    message = user_error(capsys, str(recipe))
    assert message == f"error: Unknown recipe key `num_train_epoch` in {recipe}. Did you mean `num_train_epochs`?"
    message = user_error(capsys, str(recipe.with_name("none.yaml")))
    assert "not found" in message
    message = user_error(capsys, "--dataset", str(SAMPLE), "--learning_rat", "0.1")
    assert message == "error: Unknown option `--learning_rat`. Did you mean `learning_rate`?"


@pytest.mark.parametrize(("recipe_line", "expected"), [
    ("num_train_epochs: three", "Option `num_train_epochs`: invalid float value: 'three'"),
    ("pretrained: maybe", "Option `pretrained`: Truthy value expected: got maybe"),
    ("learning_rate: [0.1, 0.01]", "`learning_rate: [0.1, 0.01]` has the wrong type: `learning_rate` takes a single value"),
    ("eval_strategy: sometimes", "sometimes is not a valid IntervalStrategy, please select one of ['no', 'steps', 'epoch']"),
])
def test_wrong_type_in_recipe(recipe_line, expected, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {SAMPLE}\n{recipe_line}\n")
    assert expected in user_error(capsys, str(recipe))


def test_wrong_type_on_the_command_line(capsys):
    message = user_error(capsys, "--dataset", str(SAMPLE), "--per_device_train_batch_size", "big")
    assert message == ("error: Option `per_device_train_batch_size`: invalid int value: 'big'. "
                       "Fix it in the recipe or on the command line.")


def test_output_dir_of_a_different_run_is_refused_unless_overwrite(tmp_path, capsys):
    output_dir = tmp_path / "out"
    train_in_process(*TINY_SAMPLE, *TINY_RUN, "--output_dir", str(output_dir))
    (output_dir / "marker.txt").write_text("from the earlier run")
    message = user_error(capsys, *TINY_SAMPLE, *TINY_RUN, "--output_dir", str(output_dir), "--learning_rate", "0.01")
    assert f"{output_dir} already holds a different run (differs in: training.learning_rate)" in message
    assert "Pass `--overwrite` to replace it, or choose another `--output_dir`" in message
    assert (output_dir / "marker.txt").exists()

    (output_dir / "marker.txt").unlink()  # --overwrite deletes only a run's own files (test_output_dir.py)
    train_in_process(*TINY_SAMPLE, *TINY_RUN, "--output_dir", str(output_dir), "--learning_rate", "0.01", "--overwrite", "true")
    assert (output_dir / "model.safetensors").is_file()
    assert '"learning_rate": 0.01' in (output_dir / "run_config.json").read_text()


def test_output_dir_not_written_by_hf_transfer_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    message = user_error(capsys, *TINY_SAMPLE, "--output_dir", str(tmp_path))
    assert "is not empty and was not written by hf-transfer" in message and "`--overwrite`" in message


def test_resume_without_a_checkpoint(tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, "--output_dir", str(tmp_path / "out"), "--resume", "true")
    assert "`--resume` found no checkpoint" in message and "Run without `--resume`" in message
