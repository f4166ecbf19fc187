"""Progressive resizing (`image_size_schedule`): each epoch trains at its size, evaluation at the input size, and the
run's files say what ran; sizes the run cannot take are refused before anything trains."""

import json
import shutil

import pytest
import torch
from conftest import SAMPLE, TINY_RUN, save_timm_model, tiny_run, user_error
from transformers import ViTConfig, ViTForImageClassification

from hf_transfer.errors import RecipeError
from hf_transfer.options import ModelArguments
from hf_transfer.progressive_resizing import ProgressiveResize, check_schedule, describe_sizes


def _inner_model_inputs(shapes: list):
    """Record (training mode, (height, width)) of every input the timm network inside the wrapper receives: what the model
    computes on, after any hook on the wrapper."""
    import timm.models.efficientnet as efficientnet

    def record(module, args):
        if isinstance(module, efficientnet.EfficientNet):
            shapes.append((module.training, tuple(args[0].shape[-2:])))

    return torch.nn.modules.module.register_module_forward_pre_hook(record)


def test_each_epoch_trains_at_its_size_and_evaluation_at_the_input_size(tmp_path, caplog):
    caplog.set_level("INFO", logger="hf_transfer.progressive_resizing")
    shapes: list = []
    handle = _inner_model_inputs(shapes)
    try:
        run = tiny_run(tmp_path / "run", "--image_size", "64", "--image_size_schedule", "32", "48", "--num_train_epochs", "3",
                       "--per_device_train_batch_size", "2", "--max_train_samples", "12")
    finally:
        handle.remove()
    shapes = [(training, size) for training, size in shapes if size != (160, 160)]  # the memory check's probes, before the run
    trained = [size for training, size in shapes if training]
    per_epoch = len(trained) // 3
    assert per_epoch >= 2 and trained == [(32, 32)] * per_epoch + [(48, 48)] * per_epoch + [(64, 64)] * per_epoch
    # evaluation, test and explanations at the input size; once 32 px: the schedule's check, before the run
    assert [size for training, size in shapes if not training].count((32, 32)) == 1
    assert {size for training, size in shapes if not training} == {(64, 64), (32, 32)}
    results = json.loads((run / "all_results.json").read_text())
    assert results["image_sizes_trained"] == [{"epochs": [1, 1], "size": [32, 32]}, {"epochs": [2, 2], "size": [48, 48]},
                                              {"epochs": [3, 3], "size": [64, 64]}]
    card = (run / "README.md").read_text()
    assert "| progressive resizing | epoch 1 at 32 x 32; epoch 2 at 48 x 48; epoch 3 at 64 x 64 (" in card
    assert json.loads((run / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 64, 64]  # the saved model
    assert [record.getMessage() for record in caplog.records if record.name == "hf_transfer.progressive_resizing"] == [
        f"Progressive resizing: epoch {epoch} trains on {size} x {size} images." for epoch, size in ((1, 32), (2, 48), (3, 64))]


def test_a_run_without_a_schedule_says_nothing_of_it(run_dir):
    assert json.loads((run_dir / "all_results.json").read_text())["image_sizes_trained"] is None
    assert "progressive resizing" not in (run_dir / "README.md").read_text()


@pytest.mark.parametrize("schedule", [[], [0], [96, "a"], [True]])
def test_malformed_schedules_are_refused(schedule):
    with pytest.raises(ValueError, match="`image_size_schedule` must be a list of whole numbers"):
        ModelArguments(image_size_schedule=schedule)


def test_sizes_above_the_input_size_are_refused(capsys, tmp_path):
    message = user_error(capsys, "--dataset", str(SAMPLE), *TINY_RUN, "--image_size", "64", "--image_size_schedule", "32", "96",
                         "--output_dir", str(tmp_path / "run"))
    assert "goes above the run's input size (64 px)" in message
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_model_of_one_input_size_is_refused():
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64, num_labels=2))
    with pytest.raises(RecipeError, match="cannot take 16 x 16 images"):
        check_schedule(vit, [16], (32, 32))
    assert vit.training  # the probe leaves the model as it found it


def test_a_model_that_takes_smaller_images_passes_the_check(tmp_path):
    from conftest import load

    model = load(save_timm_model(tmp_path / "effnet", "test_efficientnet", image_size=64))
    model.eval()
    check_schedule(model, [32, 48], (64, 64))
    assert not model.training


def test_consecutive_epochs_at_one_size_are_told_once():
    assert describe_sizes({"1": [32, 32], "2": [32, 32], "3": [64, 64], "4": [64, 64]}) == [
        {"epochs": [1, 2], "size": [32, 32]}, {"epochs": [3, 4], "size": [64, 64]}]


def test_a_resumed_run_reports_the_epochs_before_its_checkpoint(tmp_path):
    options = ("--image_size", "64", "--image_size_schedule", "32", "48", "--num_train_epochs", "3", "--max_train_samples", "12",
               "--save_strategy", "epoch", "--save_total_limit", "2")
    run = tiny_run(tmp_path / "run", *options)
    finished = json.loads((run / "all_results.json").read_text())["image_sizes_trained"]
    last = max(run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    shutil.rmtree(last)  # as if the run had stopped during its third epoch
    tiny_run(tmp_path / "run", *options, "--resume", "true")
    assert json.loads((run / "all_results.json").read_text())["image_sizes_trained"] == finished
    assert [part["epochs"] for part in finished] == [[1, 1], [2, 2], [3, 3]]


def test_a_malformed_record_in_a_checkpoint_is_refused():
    from transformers import TrainerState

    from hf_transfer.checkpoints import CheckpointError

    state = TrainerState(stateful_callbacks={"ProgressiveResize": {"args": {}, "attributes": {"trained": {"one": "<b>"}}}})
    with pytest.raises(CheckpointError, match="malformed `ProgressiveResize` record"):
        ProgressiveResize([32]).on_train_begin(None, state, None, model=torch.nn.Linear(1, 1))
