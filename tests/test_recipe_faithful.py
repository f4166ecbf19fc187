"""What the recipe says is what trains: every option takes effect (read back from the objects that ran it) or is refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from conftest import IMAGE, LABEL, QUICKSTART, REPO, SAMPLE, TINY_RUN, TINY_SAMPLE, tiny_run, train_in_process, user_error, write_dataset
from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification, pipeline

from hf_transfer.models import ModelNotAvailableError, load_model, save_model
from hf_transfer.options import ModelArguments
from hf_transfer.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("offline_hub")

# 8 training images in batches of 4: 2 optimizer steps per epoch; every step logged.
PER_STEP = ("--logging_strategy", "steps", "--logging_steps", "1", "--warmup_steps", "0")


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def logged_rates(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}


def test_sgd_with_momentum_is_what_trains_and_what_the_card_says(tmp_path):
    out = tiny_run(tmp_path / "sgd", "--optim", "sgd", "--optim_args", "momentum=0.9", "--freeze", "last_n:2", "--layer_decay", "0.5")
    optimizer = results(out)["optimizer"]
    assert optimizer["class"] == "torch.optim.sgd.SGD"
    assert optimizer["hyperparameters"]["momentum"] == 0.9
    low, high = optimizer["learning_rates"]
    assert high == pytest.approx(1e-3) and low == pytest.approx(1e-3 * 0.5 ** 2), "per-block layer-decayed rates kept"
    assert optimizer["weight_decays"] == [0.01, 0.0], "no weight decay on norms and biases"
    card = (out / "README.md").read_text()
    assert "`torch.optim.sgd.SGD`" in card and "momentum=0.9" in card and "AdamW" not in card


@pytest.mark.parametrize(("optim", "cls"), [
    ("adamw_torch", torch.optim.AdamW), ("adafactor", None), ("adagrad", torch.optim.Adagrad), ("rmsprop", torch.optim.RMSprop),
])
def test_every_optimizer_trainer_builds_takes_the_plans_groups(optim, cls, tmp_path):
    from hf_transfer.optimization import build_optimizer
    from hf_transfer.options import HfTransferTrainingArguments

    args = HfTransferTrainingArguments(output_dir=str(tmp_path), optim=optim, learning_rate=0.01, report_to="none")
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    groups = [{"params": list(model[0].parameters()), "lr": 0.001, "weight_decay": 0.0},
              {"params": list(model[1].parameters()), "lr": 0.01, "weight_decay": 0.1}]
    optimizer = build_optimizer(args, model, groups)
    assert cls is None or isinstance(optimizer, cls)
    assert [group["lr"] for group in optimizer.param_groups] == [0.001, 0.01]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.1]


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "lomo"])
def test_an_optimizer_that_cannot_run_here_is_refused_before_training(optim, tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, *TINY_RUN, "--output_dir", str(tmp_path / "out"), "--optim", optim)
    assert f"optim: {optim}" in message and "adamw_torch" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()
    from hf_transfer.optimization import OptimizerError, build_optimizer
    from hf_transfer.options import HfTransferTrainingArguments

    with pytest.raises(OptimizerError):
        build_optimizer(HfTransferTrainingArguments(output_dir=str(tmp_path), optim=optim, report_to="none"), torch.nn.Linear(2, 2), [])


def test_step_decay_divides_the_rate_every_step_size_epochs(tmp_path):
    out = tiny_run(tmp_path / "step", "--num_train_epochs", "4", "--learning_rate", "0.1", "--lr_scheduler_type", "step",
                "--lr_scheduler_kwargs", '{"step_size": 2, "gamma": 0.1}', "--optim", "sgd", *PER_STEP)
    rates = logged_rates(out)
    # Trainer logs at step k the rate step k used; step k lies in epoch (k - 1) // 2 (2 steps per epoch).
    assert rates == {k: pytest.approx(0.1 * 0.1 ** (((k - 1) // 2) // 2)) for k in range(1, 9)}
    schedule = results(out)["lr_scheduler"]
    assert schedule["type"] == "step" and schedule["kwargs"] == {"step_size": 2, "gamma": 0.1}
    assert "`step` with step_size=2, gamma=0.1 (step_size in epochs)" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["lr_scheduler_type"] == "step"


def test_trainer_schedules_keep_working(tmp_path):
    out = tiny_run(tmp_path / "cosine", "--num_train_epochs", "2", "--lr_scheduler_type", "cosine", *PER_STEP)
    rates = logged_rates(out)
    assert rates[1] > rates[2] > rates[3] and results(out)["lr_scheduler"]["type"] == "cosine"


def test_early_stopping_stops_when_validation_stops_improving_and_says_so(tmp_path):
    # A rate too small to change a prediction: validation accuracy never improves on the first evaluation.
    out = tiny_run(tmp_path / "early", "--num_train_epochs", "6", "--learning_rate", "1e-12", "--early_stopping_patience", "2")
    stopping = results(out)["early_stopping"]
    assert stopping["stopped_early"] and stopping["epoch"] == 3 and stopping["step"] == 6
    assert results(out)["published_weights"] == {"kind": "last", "step": 6, "epoch": 3.0}
    assert "stopped training at epoch 3 (step 6)" in (out / "README.md").read_text()


def test_head_until_plateau_then_unfreeze_at_a_lower_rate_in_one_run(tmp_path):
    stages = "[{at_epoch: 0, train: head}, {at_plateau: 1, train: all, lr_scale: 0.1}]"
    out = tiny_run(tmp_path / "plateau", "--freeze", "staged", "--stages", stages, "--num_train_epochs", "8", "--learning_rate", "1e-12",
                "--lr_scheduler_type", "constant", "--early_stopping_patience", "1", *PER_STEP)
    history = json.loads((out / "freeze_plan.json").read_text())["history"]
    assert [stage["train"] for stage in history] == ["head", "all"]
    # Evaluation 1 (step 2) sets the best; evaluation 2 (step 4) does not improve: the next stage starts at step 4.
    assert history[1]["started_at_step"] == 4 and history[1]["reason"].startswith("at_plateau 1") and history[1]["lr_scale"] == 0.1
    rates = logged_rates(out)
    # abs=0: pytest.approx's default absolute tolerance (1e-12) would make these two rates equal.
    assert rates[4] == pytest.approx(1e-12, abs=0) and rates[5] == pytest.approx(1e-13, abs=0), "lr x 0.1 from the stage on"
    # Early stopping counts only in the last stage: evaluation 3 (step 6) does not beat the best, so training ends there.
    assert results(out)["early_stopping"]["step"] == 6
    card = (out / "README.md").read_text()
    assert "at_plateau 1: validation accuracy did not improve" in card


def test_a_stage_with_an_unknown_key_is_refused_naming_the_key(tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, *TINY_RUN, "--output_dir", str(tmp_path / "out"), "--freeze", "staged",
                         "--stages", "[{at_epoch: 0, train: head}, {at_epoch: 1, train: all, lr: 0.1}]")
    assert "['lr']" in message and "lr_scale" in message


def test_plateau_stages_need_evaluations(tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, *TINY_RUN, "--output_dir", str(tmp_path / "out"), "--eval_strategy", "no",
                         "--freeze", "staged", "--stages", "[{at_epoch: 0, train: head}, {at_plateau: 2, train: all}]")
    assert "at_plateau" in message and "eval_strategy" in message


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A fine-tuned model folder for labels (cat, dog), saved as a run saves it."""
    model, processor = load_model(ModelArguments(model="test_efficientnet", pretrained=False), ["cat", "dog"])
    folder = tmp_path_factory.mktemp("finetuned") / "model"
    save_model(model, processor, folder)
    return folder


def head_of(model: TimmWrapperForImageClassification) -> torch.Tensor:
    return model.timm_model.get_classifier().weight.detach()


def test_head_rows_follow_label_names_not_positions(finetuned, caplog):
    saved = head_of(load_model(ModelArguments(model=str(finetuned)), ["cat", "dog"])[0])
    swapped = head_of(load_model(ModelArguments(model=str(finetuned)), ["dog", "cat"])[0])
    assert torch.equal(swapped, saved[[1, 0]]), "the row trained for `dog` must stay under `dog`"
    with caplog.at_level(logging.WARNING, logger="hf_transfer"):
        other = head_of(load_model(ModelArguments(model=str(finetuned)), ["car", "boat"])[0])
    assert not torch.equal(other, saved) and not torch.equal(other, saved[[1, 0]])
    assert "starts afresh" in caplog.text


def test_pretrained_false_builds_a_local_folder_with_fresh_weights(finetuned):
    saved = safetensors.torch.load_file(finetuned / "model.safetensors")
    fresh = load_model(ModelArguments(model=str(finetuned), pretrained=False), ["cat", "dog"])[0]
    assert not torch.equal(fresh.timm_model.conv_stem.weight, saved["conv_stem.weight"])
    assert type(fresh.timm_model).__name__ == "EfficientNet"


def test_card_says_which_weights_were_published(tmp_path):
    last = tiny_run(tmp_path / "last")
    card = (last / "README.md").read_text()
    assert "after the last training step (step 2" in card and "best checkpoint" not in card
    best = tiny_run(tmp_path / "best", "--num_train_epochs", "2", "--save_strategy", "epoch", "--load_best_model_at_end", "true")
    published = results(best)["published_weights"]
    assert published["kind"] == "best" and (best / published["checkpoint"]).is_dir()
    assert f"best checkpoint by validation accuracy (`{published['checkpoint']}`" in (best / "README.md").read_text()


def test_the_recipe_written_into_the_output_folder_reproduces_the_run_bit_for_bit(tmp_path):
    first = tiny_run(tmp_path / "first", "--num_train_epochs", "2", "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.01")
    written = yaml.safe_load((first / "recipe.yaml").read_text())
    assert written["load_best_model_at_end"] is False and written["optim"] == "sgd"
    assert json.loads((first / "run_config.json").read_text())["training"]["load_best_model_at_end"] is False
    train_in_process(str(first / "recipe.yaml"), "--output_dir", str(tmp_path / "second"))
    second = tmp_path / "second"
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    keys = ("test_accuracy", "test_loss", "eval_loss", "train_loss")
    assert {k: results(first)[k] for k in keys} == {k: results(second)[k] for k in keys}


def test_freeze_on_the_command_line_replaces_the_recipes_freeze_section():
    recipe = parse_recipe([str(REPO / "recipes" / "cats_vs_dogs.yaml"), "--freeze", "head_only"])
    assert recipe.freezing.freeze == "head_only" and recipe.freezing.stages is None and recipe.freezing.layer_decay is None
    staged = parse_recipe([str(REPO / "recipes" / "cats_vs_dogs.yaml"), "--freeze", "staged", "--stages", "[{at_epoch: 0, train: all}]"])
    assert staged.freezing.stages == [{"at_epoch": 0, "train": "all"}]


def test_image_size_reaches_training_the_saved_config_pipeline_and_timm(tmp_path):
    out = tiny_run(tmp_path / "small", "--image_size", "64")
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    classifier = pipeline("image-classification", model=str(out))
    assert classifier.image_processor.data_config["input_size"] == (3, 64, 64)
    assert timm.create_model(f"local-dir:{out}", pretrained=True).pretrained_cfg["input_size"] in ([3, 64, 64], (3, 64, 64))
    assert "64 x 64" in (out / "README.md").read_text()


def test_image_size_on_a_vit_resamples_position_embeddings_and_reloads(tmp_path):
    model, processor = load_model(ModelArguments(model="vit_tiny_patch16_224", pretrained=False, image_size=96), ["cat", "dog"])
    assert model(pixel_values=torch.zeros(1, 3, 96, 96)).logits.shape == (1, 2)
    save_model(model, processor, tmp_path / "vit")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    assert torch.equal(reloaded.timm_model.pos_embed, model.timm_model.pos_embed)


def test_drop_rate_is_applied_saved_and_reloaded(tmp_path):
    out = tiny_run(tmp_path / "dropout", "--drop_rate", "0.4", "--freeze", "head_only")
    assert json.loads((out / "config.json").read_text())["model_args"]["drop_rate"] == 0.4
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.timm_model.drop_rate == 0.4
    model.train()
    pixels = torch.rand(4, 3, 224, 224)
    assert not torch.equal(model(pixel_values=pixels).logits, model(pixel_values=pixels).logits), "dropout active in training"
    model.eval()
    assert torch.equal(model(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_drop_rate_on_a_model_without_classifier_dropout_is_refused(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=37)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    with pytest.raises(ModelNotAvailableError, match="drop_rate"):
        load_model(ModelArguments(model=str(folder), drop_rate=0.2), ["cat", "dog"])


def test_the_model_is_checked_before_the_dataset_is_read(tmp_path, capsys):
    # A dataset whose reading fails late (an unreadable image, with skipping off): the model's error must come first.
    broken = write_dataset(tmp_path / "broken", {"train": {"image": [{"bytes": b"not an image", "path": "x.jpg"}] * 4, "labels": [0, 1] * 2},
                                                  "test": {"image": [{"bytes": b"junk", "path": "y.jpg"}] * 2, "labels": [0, 1]}},
                           {"image": IMAGE, "labels": LABEL})
    message = user_error(capsys, "--dataset", broken, "--skip_unreadable_images", "false", "--model", "nobody/no_such_model",
                         "--output_dir", str(tmp_path / "out"))
    assert "nobody/no_such_model" in message


def test_random_init_offline_says_the_hub_is_unreachable(tmp_path, capsys):
    message = user_error(capsys, *TINY_SAMPLE, "--model", "google/vit-base-patch16-224", "--pretrained", "false",
                         "--output_dir", str(tmp_path / "out"))
    assert "unreachable" in message and "spelling" not in message


def test_the_python_api_prints_the_freeze_plan(tmp_path):
    code = (f"from hf_transfer import finetune; finetune({str(QUICKSTART)!r}, output_dir={str(tmp_path / 'api')!r}, "
            f"model='test_efficientnet', pretrained=False, max_train_samples=8, max_eval_samples=4, max_test_samples=16, "
            f"num_train_epochs=1, save_strategy='no', load_best_model_at_end=False, freeze='full', dataset={str(SAMPLE)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "Freeze plan, stage 0" in done.stderr and "trainable parameters:" in done.stderr


def test_cached_head_speed_is_not_reported_as_the_models(tmp_path):
    out = tiny_run(tmp_path / "cached", "--freeze", "head_only")
    found = results(out)
    assert "feature_cache" in found and "eval_samples_per_second" not in found
    assert "head_eval" in found["feature_cache"]
    card = (out / "README.md").read_text()
    assert "training images per second" not in card and "Inference on the test split (the full model on images)" in card


def test_help_lists_the_new_options():
    shown = subprocess.run([sys.executable, "-m", "hf_transfer.cli", "train", "--help"], capture_output=True, text=True, cwd=REPO).stdout
    for option in ("--image_size", "--drop_rate", "--early_stopping_patience", "--early_stopping_threshold", "--eval_test_each_epoch",
                   "--optim", "`step`", "lr_scale", "at_plateau"):
        assert option in shown, option
