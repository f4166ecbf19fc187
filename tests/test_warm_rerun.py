"""A warm rerun does only the work whose inputs changed: the command imports no figure or deployment stack, each figure is
drawn again only when what it shows changed, and the cached test features are checked once.

Whether a figure was drawn again is read from the file itself (its inode, modification time and bytes), never from timing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, photos, save_timm_model, side_by_side
from PIL import Image

from hf_transfer.data_check import plot_suspects
from hf_transfer.figures import INPUTS_KEY, drawn_from
from hf_transfer.plots import plot_confusion_matrix, plot_training_curves

NOT_FOR_TRAINING = ("matplotlib", "cv2", "pytorch_grad_cam", "gradio", "onnx", "onnxruntime")
HISTORY = [
    {"loss": 0.9, "epoch": 1.0, "step": 2}, {"eval_loss": 0.8, "eval_accuracy": 0.5, "eval_f1": 0.4, "eval_runtime": 0.12, "epoch": 1.0, "step": 2},
    {"loss": 0.6, "epoch": 2.0, "step": 4}, {"eval_loss": 0.7, "eval_accuracy": 0.75, "eval_f1": 0.7, "eval_runtime": 0.11, "epoch": 2.0, "step": 4},
    {"train_runtime": 3.2, "train_loss": 0.75, "epoch": 2.0, "step": 4},
]


def imported_after(*codes: str) -> list[list[str]]:
    """For each of `codes`, the modules of NOT_FOR_TRAINING (and timm, datasets) that a fresh interpreter holds after
    running it; the interpreters side by side."""
    watched = (*NOT_FOR_TRAINING, "timm", "datasets")
    listings = [f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))" for code in codes]
    loaded = []
    for shown in side_by_side(*([sys.executable, "-c", listing] for listing in listings), cwd=REPO):
        assert shown.returncode == 0, shown.stderr[-3000:]
        loaded.append(json.loads(shown.stdout.strip().splitlines()[-1]))
    return loaded


def state(path: Path) -> tuple:
    """What changes when a file is written again: its inode, modification time and bytes."""
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, path.read_bytes()


# ---- imports ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """What each entry point imports, its interpreter beside the others'."""
    entries = {
        "train": "import hf_transfer.cli, hf_transfer.hub, hf_transfer.pipeline",  # what `train` imports before the flow runs
        "cli": "import hf_transfer.cli",
        "train --help": "from hf_transfer.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass",
    }
    return dict(zip(entries, imported_after(*entries.values())))


def test_the_train_command_imports_no_figure_or_deployment_stack(loaded):
    # What `hf-transfer train` imports before it runs the flow (cli.run_training): matplotlib, OpenCV and grad-cam load
    # only when a figure is drawn, gradio and onnx never.
    assert not set(loaded["train"]) & set(NOT_FOR_TRAINING), f"the training command imports {loaded['train']}"


def test_the_cli_and_train_help_import_no_figure_stack_or_model_zoo(loaded):
    assert loaded["cli"] == []
    assert loaded["train --help"] == [], f"`hf-transfer train --help` imports {loaded['train --help']}"


# ---- figures ---------------------------------------------------------------------------------------------------------
def test_an_unchanged_confusion_matrix_is_kept_and_a_changed_one_drawn_again(tmp_path):
    path = tmp_path / "confusion_matrix.png"
    plot_confusion_matrix([[3, 1], [0, 4]], ["cat", "dog"], path)
    drawn = state(path)
    plot_confusion_matrix([[3, 1], [0, 4]], ["cat", "dog"], path)
    assert state(path) == drawn, "the same matrix: the file is not written again"
    plot_confusion_matrix([[3, 1], [1, 3]], ["cat", "dog"], path)
    assert state(path)[2] != drawn[2], "another matrix: drawn again"
    renamed = state(path)
    plot_confusion_matrix([[3, 1], [1, 3]], ["cat", "wolf"], path)
    assert state(path)[2] != renamed[2], "another class name: drawn again"


def test_training_curves_are_drawn_again_for_a_value_or_a_mark_not_for_timings(tmp_path):
    path = tmp_path / "training_curves.png"
    plot_training_curves(HISTORY, path)
    drawn = state(path)
    timed_again = [{**entry, **{key: value * 2 for key, value in entry.items() if key.endswith("runtime")}} for entry in HISTORY]
    plot_training_curves(timed_again, path)
    assert state(path) == drawn, "a rerun's other timings are not on the figure: kept"
    plot_training_curves(HISTORY, path, marks=[(2, "stage 1: all")])
    marked = state(path)
    assert marked[2] != drawn[2], "a stage switch is drawn"
    changed = [dict(entry) for entry in HISTORY]
    changed[2]["loss"] = 0.55
    plot_training_curves(changed, path, marks=[(2, "stage 1: all")])
    assert state(path)[2] != marked[2], "another loss: drawn again"


def test_a_figure_of_the_same_inputs_is_taken_from_the_earlier_folder_as_the_same_file(tmp_path):
    published, staging = tmp_path / "run", tmp_path / "run" / ".partial"
    plot_confusion_matrix([[5, 0], [2, 3]], ["cat", "dog"], published / "confusion_matrix.png")
    earlier = state(published / "confusion_matrix.png")
    plot_confusion_matrix([[5, 0], [2, 3]], ["cat", "dog"], staging / "confusion_matrix.png", previous=published / "confusion_matrix.png")
    assert os.path.samefile(staging / "confusion_matrix.png", published / "confusion_matrix.png")
    plot_confusion_matrix([[4, 1], [2, 3]], ["cat", "dog"], staging / "other.png", previous=published / "confusion_matrix.png")
    assert not os.path.samefile(staging / "other.png", published / "confusion_matrix.png")
    assert state(published / "confusion_matrix.png") == earlier, "the earlier figure is only read"
    assert drawn_from(staging / "other.png") not in (None, drawn_from(published / "confusion_matrix.png"))


def test_an_earlier_file_counts_only_as_a_png_holding_the_digest_and_not_through_a_link(tmp_path):
    source = plot_confusion_matrix([[2, 0], [0, 2]], ["cat", "dog"], tmp_path / "drawn.png")
    digest = drawn_from(source)
    assert digest and Image.open(source).info[INPUTS_KEY] == digest
    link = tmp_path / "link.png"
    link.symlink_to(source)
    assert drawn_from(link) is None
    plot_confusion_matrix([[2, 0], [0, 2]], ["cat", "dog"], tmp_path / "from_link.png", previous=link)
    assert not os.path.samefile(tmp_path / "from_link.png", source), "drawn, not taken through the link"
    plain = tmp_path / "plain.png"
    Image.open(source).save(plain)  # the same picture, without the digest
    assert drawn_from(plain) is None
    (tmp_path / "text.png").write_text("not a picture")
    assert drawn_from(tmp_path / "text.png") is None and drawn_from(tmp_path / "missing.png") is None


def test_the_contact_sheet_is_drawn_again_when_an_image_or_a_caption_changes(tmp_path):
    cells, _ = photos("train", 3)
    path = tmp_path / "data_suspects.png"
    plot_suspects([(cells[0], "train #0\ngiven: cat"), (cells[1], "train #1\ngiven: dog")], [], path)
    drawn = state(path)
    plot_suspects([(dict(cells[0]), "train #0\ngiven: cat"), (dict(cells[1]), "train #1\ngiven: dog")], [], path)
    assert state(path) == drawn
    plot_suspects([(cells[0], "train #0\ngiven: cat"), (cells[2], "train #1\ngiven: dog")], [], path)
    other_image = state(path)
    assert other_image[2] != drawn[2]
    plot_suspects([(cells[0], "train #0\ngiven: cat"), (cells[2], "train #1\ngiven: bird")], [], path)
    assert state(path)[2] != other_image[2]


def test_an_image_of_a_folder_changed_under_the_same_path_draws_the_sheet_again(tmp_path):
    cells, _ = photos("train", 2)
    image = tmp_path / "images" / "a.jpg"
    image.parent.mkdir()
    image.write_bytes(cells[0]["bytes"])
    path = tmp_path / "data_suspects.png"
    plot_suspects([({"bytes": None, "path": str(image)}, "a.jpg")], [], path)
    drawn = state(path)
    image.write_bytes(cells[1]["bytes"])
    plot_suspects([({"bytes": None, "path": str(image)}, "a.jpg")], [], path)
    assert state(path)[2] != drawn[2]


def test_the_grad_cam_figure_is_drawn_again_for_other_weights_or_predictions_only(tmp_path):
    from hf_transfer.model_repo import draw_explanations

    model_dir = save_timm_model(tmp_path / "model", "test_efficientnet")
    images, labels = photos("test", 8)
    predictions = [1 - label if index % 3 == 0 else label for index, label in enumerate(labels)]
    draw_explanations(model_dir, images, labels, predictions)
    figure = model_dir / "explanations.png"
    drawn = state(figure)
    draw_explanations(model_dir, images, labels, list(predictions))
    assert state(figure) == drawn
    predictions[1] = 1 - predictions[1]
    draw_explanations(model_dir, images, labels, predictions)
    assert state(figure)[:2] != drawn[:2], "another prediction: drawn again"
    again = state(figure)
    save_timm_model(tmp_path / "model", "test_efficientnet", drop_rate=0.5)  # the same weights, another config.json
    draw_explanations(model_dir, images, labels, predictions)
    assert state(figure)[:2] != again[:2], "another model folder: drawn again"


# ---- a warm rerun, end to end ----------------------------------------------------------------------------------------
FIGURES = ["training_curves.png", "confusion_matrix.png", "explanations.png", "data_suspects.png"]


@pytest.fixture(scope="module")
def rerun(cache_dir, tmp_path_factory) -> tuple[Path, dict, dict]:
    """A cached head_only run with the data doctor, then the same command again into the same folder: the folder, each
    figure's `state` after the first run, and the second run's results."""
    from hf_transfer import finetune

    folder = tmp_path_factory.mktemp("warm") / "run"
    options = dict(dataset=str(SAMPLE), model="test_convnext", pretrained=False, freeze="head_only", validation_size=16,
                   max_train_samples=32, max_test_samples=16, num_train_epochs=2, per_device_train_batch_size=16,
                   learning_rate=3e-3, augmentation="none", save_strategy="no", load_best_model_at_end=False,
                   output_dir=str(folder), disable_tqdm=True)
    finetune(**options)
    first = {name: state(folder / name) for name in FIGURES}
    return folder, first, finetune(**options)


def test_an_identical_rerun_keeps_every_figure(rerun):
    folder, first, _ = rerun
    assert {name: state(folder / name) for name in FIGURES} == first
    assert not (folder / ".partial").exists()


def test_an_identical_rerun_checks_the_cached_test_features_once(rerun):
    folder, _, results = rerun
    cache = results["feature_cache"]
    assert all(split["hit"] for split in cache["splits"].values())
    # The data doctor read the test features first: their labels are checked there, their features once, by the test pass.
    assert cache["checks"]["test"] == {"labels": 16, "seconds": cache["checks"]["test"]["seconds"]}
    assert cache["test_check"]["images"] == 16 and cache["test_check"]["agreement"] == 1.0
    assert {split: check["images"] for split, check in cache["checks"].items() if "images" in check} == {"train": 32, "validation": 16}
    assert json.loads((folder / "all_results.json").read_text())["feature_cache"]["checks"] == cache["checks"]
