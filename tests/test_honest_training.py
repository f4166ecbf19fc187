"""How training ran is an option like any other: it takes effect or is refused, and the card and all_results.json say
what ran (precision, processes, batches, learning rates, losses), read back from the objects that ran it.

Refusals of `optim_args` and `lr_scheduler_kwargs` are cases of tests/bad_recipes.py; the runs here are tiny (8 train
images of the shipped sample, a random-init test network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, TINY_RUN, TINY_SAMPLE, launch_processes, save_timm_model, tiny_run, user_error

from hf_transfer.optimization import build_optimizer, describe_optimizer
from hf_transfer.options import HfTransferTrainingArguments
from hf_transfer.precision import native_bf16

pytestmark = pytest.mark.usefixtures("offline_hub")

# 8 training images in batches of 4: 2 optimizer steps per epoch; every step logged.
PER_STEP = ("--logging_strategy", "steps", "--logging_steps", "1", "--warmup_steps", "0")


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def card_table(output_dir: Path, title: str) -> list[dict[str, str]]:
    """The rows of the card's markdown table that follows the line starting with `title`, by column header."""
    lines = (output_dir / "README.md").read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(title))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif table:
            break
    headers, rows = table[0], table[2:]
    return [dict(zip(headers, row)) for row in rows]


def number(cell: str) -> float:
    return float(cell)


def exactly(expected, rel: float = 1e-6):
    """pytest.approx without its absolute tolerance of 1e-12, which would make 1e-12 and 1e-13 equal."""
    return pytest.approx(expected, rel=rel, abs=0)


# ---- fp16 on a CPU ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["recipe", "accelerate_launch"])
def test_fp16_on_a_cpu_is_refused_naming_bf16_where_the_cpu_has_it(how, tmp_path, capsys, monkeypatch):
    # Accelerate has fp16 autocast and its gradient scaler only on accelerators: on a CPU `fp16` would train in fp32.
    if how == "recipe":
        asked = ("--fp16", "true")
    else:  # what `accelerate launch --mixed_precision fp16` passes on
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        asked = ()
    message = user_error(capsys, *TINY_SAMPLE, *TINY_RUN, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *asked)
    assert "fp16" in message and "CPU" in message and "fp32" in message
    has_bf16, hardware = native_bf16("cpu")
    assert ("bf16" in message) == has_bf16, hardware
    assert not (tmp_path / "out").exists()


# ---- what the optimizer ran with -------------------------------------------------------------------------------------


def test_the_reported_weight_decay_is_the_groups_not_the_optimizers_default(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))

    def described(optim: str, decays: tuple[float, float]) -> dict:
        args = HfTransferTrainingArguments(output_dir=str(tmp_path), optim=optim, report_to="none")
        groups = [{"params": list(part.parameters()), "lr": 0.01, "weight_decay": decay} for part, decay in zip(model, decays)]
        return describe_optimizer(build_optimizer(args, model, groups))["hyperparameters"]

    assert described("adamw_torch", (0.0, 0.0))["weight_decay"] == 0.0, "AdamW's default is 0.01; every group ran with 0"
    assert described("sgd", (0.01, 0.01))["weight_decay"] == 0.01, "SGD's default is 0; every group ran with 0.01"
    assert described("sgd", (0.01, 0.0))["weight_decay"] == [0.01, 0.0], "groups that differ: each value that ran"


# ---- a staged run: learning rates per stage, per-epoch loss and rate, the curves' marks, the training passes ----------


STAGES = "[{at_epoch: 0, train: head}, {at_epoch: 1, train: all, lr_scale: 0.1}]"


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory) -> Path:
    """Head for an epoch (on cached features), then everything at a tenth of the rate; a rate too small to change a
    prediction, so validation never improves and early stopping (patience 1, counted in the last stage) ends it at epoch 2."""
    return tiny_run(tmp_path_factory.mktemp("staged") / "out", "--freeze", "staged", "--stages", STAGES, "--learning_rate", "1e-12",
                 "--lr_scheduler_type", "constant", "--num_train_epochs", "4", "--early_stopping_patience", "1",
                 "--eval_test_each_epoch", "true", *PER_STEP)


def test_each_stage_says_the_rate_its_blocks_started_with(staged_run):
    history = json.loads((staged_run / "freeze_plan.json").read_text())["history"]
    assert [stage["train"] for stage in history] == ["head", "all"]
    first, second = history[0]["learning_rates"], history[1]["learning_rates"]
    assert set(first) == {"head"} and len(second) > 1
    assert first["head"] == exactly(1e-12) and all(rate == exactly(1e-13) for rate in second.values())
    logged = {entry["step"]: entry["learning_rate"] for entry in log_history(staged_run) if "learning_rate" in entry}
    assert logged[3] == exactly(1e-13), "the log of stage 1's first step (step 3) gives the rate it ran at"
    rows = card_table(staged_run, "Stages as they ran")
    assert [row["learning rate at its first step"] for row in rows] == ["1e-12", "1e-13"]
    card = (staged_run / "README.md").read_text()
    assert "stage 1 (`all`) 1e-13 at its first step" in card, "the procedure names the rate the last stage ran at"


def test_the_per_epoch_table_gives_each_epochs_learning_rate(staged_run):
    rates = {entry["step"]: entry["learning_rate"] for entry in log_history(staged_run) if "learning_rate" in entry}
    rows = card_table(staged_run, "Per epoch")
    assert [row["step"] for row in rows] == ["2", "4"]
    assert [number(row["learning rate"]) for row in rows] == exactly([rates[2], rates[4]], rel=1e-3)
    assert [number(row["learning rate"]) for row in rows] == exactly([1e-12, 1e-13]), "lr x 0.1 from stage 1 on"


def test_training_curves_mark_the_stage_switch_the_early_stop_and_test_accuracy(staged_run, tmp_path):
    from hf_transfer.plots import curve_marks, plot_training_curves, training_curves_figure

    plan = json.loads((staged_run / "freeze_plan.json").read_text())
    stopping = results(staged_run)["early_stopping"]
    assert stopping["stopped_early"] and stopping["step"] == 4
    marks = curve_marks(plan, stopping)
    assert marks == [(2, "stage 1: all"), (4, "early stop")]
    figure = training_curves_figure(log_history(staged_run), marks)
    for axis in figure.axes:
        lines = {line.get_label(): line for line in axis.get_lines()}
        assert list(lines["stage 1: all"].get_xdata()) == [1.0, 1.0], "at the end of epoch 1 (step 2)"
        assert list(lines["early stop"].get_xdata()) == [2.0, 2.0]
    metric_lines = {line.get_label(): line for line in figure.axes[1].get_lines()}
    tested = [entry["test_accuracy"] for entry in log_history(staged_run) if "test_accuracy" in entry]
    assert list(metric_lines["test accuracy"].get_ydata()) == tested and len(tested) == 2
    # The figure the run wrote is this one, marks included.
    unmarked = plot_training_curves(log_history(staged_run), tmp_path / "unmarked.png")
    marked = plot_training_curves(log_history(staged_run), tmp_path / "marked.png", marks)
    written = (staged_run / "training_curves.png").read_bytes()
    assert written == marked.read_bytes() and written != unmarked.read_bytes()


def test_a_one_process_run_says_its_precision_and_batches(staged_run):
    passes = results(staged_run)["training_passes"]
    assert passes == {"precision": "fp32", "mixed_precision": "no", "gradient_scaler": None, "device": "cpu", "processes": 1,
                      "machines": 1, "distributed": "NO", "devices_per_process": 1, "per_device_train_batch_size": 4,
                      "gradient_accumulation_steps": 1, "effective_batch_size": 4}
    card = (staged_run / "README.md").read_text()
    assert ("- Training passes: fp32 on cpu, 1 process on 1 machine; effective batch 4 "
            "(4 per device x 1 accumulation step x 1 process)") in card


# ---- the step schedule: what the blocks ran at when it fell -------------------------------------------------------------


@pytest.fixture(scope="module")
def step_run(tmp_path_factory) -> Path:
    """Three epochs of step decay (/10 after each) on a test network with real activations (its BatchNorm statistics set from
    photos), so that the losses of an epoch's two steps differ."""
    model = save_timm_model(tmp_path_factory.mktemp("model") / "effnet", "test_efficientnet")
    return tiny_run(tmp_path_factory.mktemp("step") / "out", "--model", str(model), "--pretrained", "true", "--num_train_epochs", "3",
                 "--learning_rate", "0.001", "--weight_decay", "0", "--lr_scheduler_type", "step",
                 "--lr_scheduler_kwargs", '{"step_size": 1, "gamma": 0.1}', *PER_STEP)


def test_the_per_epoch_training_loss_is_the_mean_of_the_epochs_steps(step_run):
    losses = {entry["step"]: entry["loss"] for entry in log_history(step_run) if "loss" in entry}
    rows = card_table(step_run, "Per epoch")
    assert [row["step"] for row in rows] == ["2", "4", "6"]
    for row in rows:
        end = int(row["step"])
        assert abs(losses[end - 1] - losses[end]) > 1e-2 * losses[end], "the two steps' losses tell mean and last apart"
        mean = (losses[end - 1] + losses[end]) / 2
        assert number(row["training loss"]) == pytest.approx(mean, rel=6e-4), "the epoch's mean, not its last step's loss"


def test_the_blocks_table_shows_the_rate_the_step_schedule_fell_to(step_run):
    rows = card_table(step_run, "Blocks (final stage)")
    trained = [row for row in rows if row["trainable"] == "yes"]
    assert trained and all(row["learning rate at the stage's first step"] == "0.001" for row in trained)
    assert all(row["at its last step"] == "1e-05" for row in trained), "lr x 0.1 after epochs 1 and 2"
    epochs = card_table(step_run, "Per epoch")
    assert [number(row["learning rate"]) for row in epochs] == exactly([1e-3, 1e-4, 1e-5])


def test_the_step_schedule_is_reported_as_what_applies_it(step_run):
    schedule = results(step_run)["lr_scheduler"]
    assert schedule["class"] == "torch.optim.lr_scheduler.LambdaLR"
    assert "applied per optimizer step by `torch.optim.lr_scheduler.LambdaLR`" in (step_run / "README.md").read_text()


def test_weight_decay_zero_is_reported_as_zero(step_run):
    optimizer = results(step_run)["optimizer"]
    assert optimizer["class"] == "torch.optim.adamw.AdamW"
    assert optimizer["hyperparameters"]["weight_decay"] == 0.0 and optimizer["weight_decays"] == [0.0]


# ---- only evaluations during training count ---------------------------------------------------------------------------


def test_evaluating_the_final_model_starts_no_plateau_stage(tmp_path):
    # One epoch: one evaluation during training sets the best; the evaluation after training must not count as a second.
    out = tiny_run(tmp_path / "plateau", "--freeze", "staged", "--stages", "[{at_epoch: 0, train: head}, {at_plateau: 1, train: all}]",
                "--learning_rate", "1e-12", "--save_strategy", "epoch", "--load_best_model_at_end", "true")
    saved = json.loads((out / "trainer_state.json").read_text())["stateful_callbacks"]["FreezeCallback"]["attributes"]
    assert saved["stage_starts"] == [0, None] and saved["reasons"] == {"0": "at_epoch 0"}
    assert [stage["train"] for stage in json.loads((out / "freeze_plan.json").read_text())["history"]] == ["head"]


def test_a_run_that_trains_every_epoch_was_not_stopped_early(tmp_path):
    # Validation never improves (a rate too small to change a prediction): evaluation 2, at the last step, is the first
    # without improvement, one short of patience 2. Trainer is ending there anyway, which is no early stop; the evaluation
    # of the final model after training would be the second, and must not count.
    out = tiny_run(tmp_path / "early", "--num_train_epochs", "2", "--learning_rate", "1e-12", "--early_stopping_patience", "2")
    stopping = results(out)["early_stopping"]
    assert not stopping["stopped_early"], stopping
    assert "was on but did not stop training" in (out / "README.md").read_text()


# ---- two processes, bf16 from `accelerate launch` ----------------------------------------------------------------------


def test_a_two_process_bf16_run_states_its_precision_processes_and_effective_batch(tmp_path):
    out = tmp_path / "run"
    command = [
        "--dataset", str(SAMPLE), "--model", "test_efficientnet", "--pretrained", "false", "--freeze", "full",
        "--output_dir", str(out), "--validation_size", "4", "--max_train_samples", "16", "--max_eval_samples", "4",
        "--max_test_samples", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--num_train_epochs", "1", "--save_strategy", "no", "--load_best_model_at_end", "false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    done = launch_processes(*command, env=env, mixed_precision="bf16", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    passes = results(out)["training_passes"]
    assert passes == {"precision": "bf16 autocast", "mixed_precision": "bf16", "gradient_scaler": None, "device": "cpu",
                      "processes": 2, "machines": 1, "distributed": "MULTI_CPU", "devices_per_process": 1,
                      "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "effective_batch_size": 8}
    recipe = json.loads((out / "run_config.json").read_text())["training"]
    assert not recipe.get("bf16") and not recipe.get("fp16"), "the recipe never said bf16: the launcher did"
    card = (out / "README.md").read_text()
    assert ("- Training passes: bf16 autocast on cpu, 2 processes (MULTI_CPU) on 1 machine; effective batch 8 "
            "(2 per device x 2 accumulation steps x 2 processes)") in card


def test_a_run_that_logs_nothing_is_published_without_training_curves(tmp_path):
    run = tiny_run(tmp_path / "run", "--logging_strategy", "no", "--eval_strategy", "no")
    assert (run / "model.safetensors").is_file() and not (run / "training_curves.png").exists()
    card = (run / "README.md").read_text()
    assert "training_curves.png" not in card and "Training curves" not in card
