"""A resumed run is one run: `--resume` refuses options that would change what trains, and a checkpoint whose files
disagree with each other or with the run (a step past the run's end, a malformed RNG state, a scheduler at another step)
ends in one line naming the file, on every path that reads checkpoints (images, the cached head, its hand-over
checkpoint, a stream), with nothing of the run's earlier output touched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import safetensors.torch
import torch
from conftest import SAMPLE, TINY_RUN, TINY_SAMPLE, run_command, user_error

from hf_transfer.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("offline_hub")

# 8 photos in batches of 2 for 2 epochs: 8 steps, a checkpoint after each epoch (steps 4 and 8).
EPOCHS = (*TINY_SAMPLE, *TINY_RUN, "--per_device_train_batch_size", "2", "--num_train_epochs", "2", "--save_strategy", "epoch",
          "--save_total_limit", "5", "--seed", "0")
CACHED = (*EPOCHS, "--freeze", "head_only", "--data_doctor", "false")  # the head trains on cached features (HeadTrainer)
# Stage 1 (the head, on cached features) hands over at step 4 to stage 2, which trains everything on images.
STAGED = (*EPOCHS, "--freeze", "staged", "--stages", "[{at_epoch: 0, train: head}, {at_epoch: 1, train: all}]",
          "--data_doctor", "false")
# 6 steps of a stream of the sample's photos, a checkpoint every 2 steps holding the stream's position and buffer.
STREAM = ("--dataset", str(SAMPLE), "--streaming", "true", "--model", "test_efficientnet", "--pretrained", "false",
          "--freeze", "full", "--validation_size", "4", "--max_test_samples", "8", "--per_device_train_batch_size", "2",
          "--per_device_eval_batch_size", "8", "--max_steps", "6", "--shuffle_buffer_size", "4", "--save_strategy", "steps",
          "--save_steps", "2", "--save_total_limit", "5", "--eval_strategy", "no", "--load_best_model_at_end", "false",
          "--report_to", "none", "--seed", "0")


def _finished(tmp_path_factory, name: str, argv: tuple) -> Path:
    output_dir = tmp_path_factory.mktemp(name) / "out"
    result = run_command(*argv, "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    return _finished(tmp_path_factory, "image", EPOCHS)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> Path:
    output_dir = _finished(tmp_path_factory, "cached", CACHED)
    assert "feature_cache" in json.loads((output_dir / "all_results.json").read_text())  # it really trained on the cache
    return output_dir


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory) -> Path:
    output_dir = _finished(tmp_path_factory, "staged", STAGED)
    assert "head_stage" in json.loads((output_dir / "all_results.json").read_text())["feature_cache"]
    return output_dir


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory) -> Path:
    return _finished(tmp_path_factory, "stream", STREAM)


@pytest.fixture
def quick_stream_close(monkeypatch):
    # datasets sleeps 5 s whenever a parquet stream closes (config.SLEEP_TIME_ON_THREADS_SHUTDOWN), against an Arrow crash
    # at interpreter exit; this process lives on.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _tree(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _interrupted_at(finished: Path, output_dir: Path, step: int) -> Path:
    """A copy of a finished run as a kill after `step` would have left it: later checkpoints and the model gone."""
    shutil.copytree(finished, output_dir)
    for checkpoint in output_dir.glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    for name in ("model.safetensors", "config.json", "README.md", "all_results.json"):
        (output_dir / name).unlink()
    return output_dir / f"checkpoint-{step}"


def _refused(capsys, argv: tuple, output_dir: Path) -> str:
    """`--resume` into `output_dir`: one `error:` line, exit 2, and every file as it was (run_config.json may record the
    `--resume` and the folder's new place, and nothing else)."""
    before = _tree(output_dir)
    config = json.loads((output_dir / "run_config.json").read_text())
    message = user_error(capsys, *argv, "--output_dir", str(output_dir), "--resume", "true")
    after = _tree(output_dir)
    assert {name: digest for name, digest in after.items() if name != "run_config.json"} == \
           {name: digest for name, digest in before.items() if name != "run_config.json"}
    now = json.loads((output_dir / "run_config.json").read_text())
    changed = {(section, key) for section in config for key in config[section] if config[section][key] != now[section].get(key)}
    assert changed <= {("run", "resume"), ("training", "output_dir")} and now.keys() == config.keys()
    return message


# ---- the options of a resumed run ---------------------------------------------------------------------------------

def _claimed_folder(tmp_path: Path, argv: tuple) -> Path:
    """A folder that a run of `argv` claimed (its run_config.json), with nothing else: the options are compared first."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    recipe = parse_recipe([*argv, "--output_dir", str(output_dir)])
    (output_dir / "run_config.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))
    return output_dir


@pytest.mark.parametrize(("option", "value", "key", "was"), [
    ("feature_cache", "false", "run.feature_cache", "True"),
    ("feature_cache_views", "3", "run.feature_cache_views", "0"),
    ("inference_precision", "bf16", "run.inference_precision", "'auto'"),
    ("early_stopping_patience", "2", "run.early_stopping_patience", "None"),
    ("exclude_flagged", "leaks", "doctor.exclude_flagged", "None"),
    ("doctor_duplicate_threshold", "0.5", "doctor.doctor_duplicate_threshold", "0.9"),
    ("augmentation", "none", "data.augmentation", "'default'"),
    ("save_strategy", "steps", "training.save_strategy", "'epoch'"),
])
def test_resume_refuses_an_option_that_changes_what_trains(option, value, key, was, tmp_path, capsys):
    output_dir = _claimed_folder(tmp_path, EPOCHS)
    before = _tree(output_dir)
    message = user_error(capsys, *EPOCHS, "--output_dir", str(output_dir), "--resume", "true", f"--{option}", value)
    assert message.startswith(f"error: `--resume` continues the run in {output_dir}, which was trained with other options "
                              f"({key}: {was} in the folder, ")
    assert "pass them as before, or start again with `--overwrite`" in message
    assert _tree(output_dir) == before


def test_resume_may_change_how_the_run_logs_and_then_trains_the_same_weights(image_run, tmp_path):
    output_dir = tmp_path / "out"
    _interrupted_at(image_run, output_dir, 4)
    resumed = run_command(*EPOCHS, "--output_dir", str(output_dir), "--resume", "true", "--logging_strategy", "steps",
                          "--logging_steps", "1", "--disable_tqdm", "true", "--doctor_sheet_size", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, weights = (safetensors.torch.load_file(folder / "model.safetensors") for folder in (image_run, output_dir))
    assert expected.keys() == weights.keys() and all(torch.equal(expected[name], weights[name]) for name in expected)
    logged = [entry["step"] for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert logged == [4, 5, 6, 7, 8]  # once an epoch before the resume, every step after it: the new option took effect
    assert "logging_steps: 1" in (output_dir / "recipe.yaml").read_text()


# ---- a checkpoint's files, checked before it is resumed from ------------------------------------------------------

def _global_step(value: int):
    def change(state):
        state["global_step"] = value
    return change


def _past_the_end(checkpoint: Path) -> Path:
    """checkpoint-4 as a checkpoint of a run of 1,000,000 steps, its files agreeing with each other."""
    moved = checkpoint.rename(checkpoint.with_name("checkpoint-1000000"))
    _edit_json(moved / "trainer_state.json", lambda state: state.update(global_step=1000000, max_steps=1000000))
    _edit_json(moved / "scheduler.json", lambda scheduler: scheduler.update(last_epoch=1000000, _step_count=1000001))
    return moved


def _numpy_keys_cut(values):
    values["numpy_random"][1] = values["numpy_random"][1][:10]


def _optimizer_ahead(checkpoint: Path) -> None:
    tensors = safetensors.torch.load_file(checkpoint / "optimizer.safetensors")
    tensors["0.step"] = torch.tensor(5.0)
    safetensors.torch.save_file(tensors, checkpoint / "optimizer.safetensors")


def _short_torch_state(checkpoint: Path) -> None:
    safetensors.torch.save_file({"cpu": torch.zeros(16, dtype=torch.uint8)}, checkpoint / "resume_state.safetensors")


# (what is done to checkpoint-4, the file the message names, words it says)
TAMPERED = {
    "global_step_past_the_folders": (lambda c: _edit_json(c / "trainer_state.json", _global_step(1000000)), "trainer_state.json",
                                     "`global_step` is 1000000, but the checkpoint's folder says step 4"),
    "past_the_runs_end": (_past_the_end, "trainer_state.json", "step 1000000, but this run has 8 steps"),
    "numpy_state_cut": (lambda c: _edit_json(c / "resume_state.json", _numpy_keys_cut), "resume_state.json", "`numpy_random`"),
    "python_state_wrong": (lambda c: _edit_json(c / "resume_state.json", lambda v: v.update(python_random=[3, [1, 2], None])),
                           "resume_state.json", "`python_random`"),
    "torch_state_short": (_short_torch_state, "resume_state.safetensors", "`cpu`"),
    "scheduler_behind": (lambda c: _edit_json(c / "scheduler.json", lambda s: s.update(last_epoch=2, _step_count=3)),
                         "scheduler.json", "step 2, but `global_step` is 4"),
    "scheduler_sets_attributes": (lambda c: _edit_json(c / "scheduler.json", lambda s: s["lr_lambdas"].__setitem__(0, {"x": 1})),
                                  "scheduler.json", "`lr_lambdas`"),
    "optimizer_ahead": (_optimizer_ahead, "optimizer.safetensors", "step 5"),
    "epoch_not_a_number": (lambda c: _edit_json(c / "trainer_state.json", lambda s: s.update(epoch="two")), "trainer_state.json",
                           "`epoch`"),
    "unknown_state_field": (lambda c: _edit_json(c / "trainer_state.json", lambda s: s.update(surprise=1)), "trainer_state.json",
                            "`surprise`"),
    "loss_tally_not_a_number": (lambda c: _edit_json(c / "resume_state.json", lambda v: v.update(loss_logged_total="x")),
                                "resume_state.json", "`loss_logged_total`"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_checkpoint_is_refused_naming_its_file(case, image_run, tmp_path, capsys):
    tamper, name, words = TAMPERED[case]
    output_dir = tmp_path / "out"
    checkpoint = _interrupted_at(image_run, output_dir, 4)
    checkpoint = tamper(checkpoint) or checkpoint
    message = _refused(capsys, EPOCHS, output_dir)
    assert f"{checkpoint / name}: " in message and words in message, message
    assert "Restore it, resume from an earlier checkpoint by deleting" in message


def test_the_cached_heads_checkpoint_is_checked(cached_run, tmp_path, capsys):
    output_dir = tmp_path / "out"
    checkpoint = _interrupted_at(cached_run, output_dir, 4)
    _edit_json(checkpoint / "trainer_state.json", _global_step(1000000))
    message = _refused(capsys, CACHED, output_dir)
    assert f"{checkpoint / 'trainer_state.json'}: `global_step` is 1000000, but the checkpoint's folder says step 4" in message


def test_the_hand_over_checkpoint_of_a_staged_cached_run_is_checked(staged_run, tmp_path, capsys):
    output_dir = tmp_path / "out"
    checkpoint = _interrupted_at(staged_run, output_dir, 4)  # the images stage resumes from the hand-over at step 4
    _edit_json(checkpoint / "resume_state.json", _numpy_keys_cut)
    message = _refused(capsys, STAGED, output_dir)
    assert f"{checkpoint / 'resume_state.json'}: `numpy_random`" in message


def _buffer_longer(values):
    values["buffer"][0]["length"] += 1000


def _rng_junk(values):
    values["position"]["rng"] = {"bit_generator": "PCG64", "state": "junk"}


@pytest.mark.parametrize(("tamper", "words"), [(_buffer_longer, "the buffer's images"), (_rng_junk, "`position.rng`")],
                         ids=["buffer_past_its_bytes", "rng_malformed"])
def test_the_stream_position_is_checked(tamper, words, stream_run, tmp_path, capsys, quick_stream_close):
    output_dir = tmp_path / "out"
    checkpoint = _interrupted_at(stream_run, output_dir, 4)
    _edit_json(checkpoint / "stream_state.json", tamper)
    message = _refused(capsys, STREAM, output_dir)
    assert f"{checkpoint / 'stream_state.json'}: " in message and words in message, message
