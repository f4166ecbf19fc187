"""How training ran is an option like any other: it takes effect or is refused, and the card and all_results.json say
what ran (precision, processes, batches, learning rates, losses), read back from the objects that ran it.

Refusals of `optim_args` and `lr_scheduler_kwargs` are cases of tests/bad_recipes.py; the runs here are tiny (8 train
images of the shipped sample, a random-init test network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE, TINY_RUN, TINY_SAMPLE, save_timm_model, user_error

from hf_transfer.cli import main
from hf_transfer.optimization import HfTransferTrainingArguments, build_optimizer, describe_optimizer
from hf_transfer.precision import native_bf16

pytestmark = pytest.mark.usefixtures("offline_hub")

# 8 training images in batches of 4: 2 optimizer steps per epoch; every step logged.
PER_STEP = ("--logging_strategy", "steps", "--logging_steps", "1", "--warmup_steps", "0")


def train(output_dir: Path, *options: str) -> Path:
    main(["train", *TINY_SAMPLE, *TINY_RUN, "--output_dir", str(output_dir), *options])
    return output_dir


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


# ---- a staged run: learning rates per stage, per-epoch loss and rate, the curves' marks, the training passes ----------


STAGES = "[{at_epoch: 0, train: head}, {at_epoch: 1, train: all, lr_scale: 0.1}]"


# ---- the step schedule: what the blocks ran at when it fell -------------------------------------------------------------


# ---- only evaluations during training count ---------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluating_the_final_model_starts_no_plateau_stage(tmp_path):
    # One epoch: one evaluation during training sets the best; the evaluation after training must not count as a second.
    out = train(tmp_path / "plateau", "--freeze", "staged", "--stages", "[{at_epoch: 0, train: head}, {at_plateau: 1, train: all}]",
                "--learning_rate", "1e-12", "--save_strategy", "epoch", "--load_best_model_at_end", "true")
    saved = json.loads((out / "trainer_state.json").read_text())["stateful_callbacks"]["FreezeCallback"]["attributes"]
    assert saved["stage_starts"] == [0, None] and saved["reasons"] == {"0": "at_epoch 0"}
    assert [stage["train"] for stage in json.loads((out / "freeze_plan.json").read_text())["history"]] == ["head"]


@pytest.mark.slow
def test_a_run_that_trains_every_epoch_was_not_stopped_early(tmp_path):
    # Validation never improves (a rate too small to change a prediction): evaluation 2, at the last step, is the first
    # without improvement, one short of patience 2. Trainer is ending there anyway, which is no early stop; the evaluation
    # of the final model after training would be the second, and must not count.
    out = train(tmp_path / "early", "--num_train_epochs", "2", "--learning_rate", "1e-12", "--early_stopping_patience", "2")
    stopping = results(out)["early_stopping"]
    assert not stopping["stopped_early"], stopping
    assert "was on but did not stop training" in (out / "README.md").read_text()


# ---- two processes, bf16 from `accelerate launch` ----------------------------------------------------------------------
