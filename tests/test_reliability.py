"""Interrupted and failed runs: a SIGKILLed run resumes to the very same weights and losses, a kill while
publishing never leaves half a model, a diverging run stops at the next step (without a host-device sync
per step) and keeps its last good checkpoint, and a dataset with unreadable files still trains (skipping
and counting them) or, if asked, stops and lists them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import traceback
from pathlib import Path

import pytest
import safetensors.torch
import torch
from bad_images import build_corpus
from conftest import REPO, TINY_RUN, TINY_SAMPLE, sample_rows, sample_tensors, train_command, train_in_process, training_error, trains
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification, TrainerCallback

from hf_transfer.callbacks import FreezeCallback
from hf_transfer.cli import main
from hf_transfer.data import collate
from hf_transfer.freezing import FreezePlan
from hf_transfer.models import load_model
from hf_transfer.output_dir import publish
from hf_transfer.recipe import parse_recipe
from hf_transfer.trainer import NonFiniteLossError, SafeTrainer, last_complete_checkpoint

pytestmark = pytest.mark.usefixtures("offline_hub")

# 8 training photos in batches of 2 for 2 epochs: 8 steps, a checkpoint at steps 3 and 6 (both mid-epoch),
# a logged loss every 2 steps, so a resumed run must also restore the loss not yet logged.
RESUMABLE_RUN = (
    *TINY_SAMPLE, *TINY_RUN, "--validation_size", "8", "--per_device_train_batch_size", "2", "--num_train_epochs", "2",
    "--save_strategy", "steps", "--save_steps", "3", "--logging_strategy", "steps", "--logging_steps", "2", "--seed", "0",
)
TIMING = ("runtime", "per_second")  # the only things allowed to differ between two runs


def _command(output_dir: Path, *extra: str) -> list[str]:
    return train_command(*RESUMABLE_RUN, "--output_dir", str(output_dir), *extra)


def _environment() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TRANSFER_DEBUG", None)
    return env


def _without_timing(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if not any(word in key for word in TIMING)}


def _wait_for_complete_checkpoint(process: subprocess.Popen, output_dir: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while last_complete_checkpoint(output_dir) is None:
        assert process.poll() is None, "the run ended before it saved a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def test_run_killed_mid_epoch_resumes_to_identical_weights_and_losses(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    log = (tmp_path / "interrupted.log").open("w")
    reference = subprocess.Popen(_command(uninterrupted), cwd=REPO, env=_environment(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_command(interrupted), cwd=REPO, env=_environment(), stdout=log, stderr=log)
    _wait_for_complete_checkpoint(victim, interrupted)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (interrupted / "model.safetensors").exists()  # it really died before the end

    checkpoint = last_complete_checkpoint(interrupted)
    step = int(checkpoint.name.split("-")[1])
    assert step in (3, 6), step  # mid-epoch: 4 steps per epoch
    assert {path.suffix for path in checkpoint.iterdir()} <= {".safetensors", ".json"}  # no pickle anywhere
    # A tracer in the checkpoint's state: only a run that really resumed from it carries it to the end.
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["log_history"][0]["resumed_from"] = step
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    # A kill while saving the next checkpoint leaves it half-written: --resume must pass it over.
    half_written = interrupted / f"checkpoint-{step + 1}"
    half_written.mkdir()
    shutil.copy(checkpoint / "model.safetensors", half_written)

    resumed = subprocess.run(_command(interrupted, "--resume"), cwd=REPO, env=_environment(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    history = [json.loads((folder / "trainer_state.json").read_text())["log_history"] for folder in (uninterrupted, interrupted)]
    assert history[1][0].pop("resumed_from") == step
    assert [_without_timing(entry) for entry in history[1]] == [_without_timing(entry) for entry in history[0]]
    losses = [entry["loss"] for entry in history[0] if "loss" in entry]
    assert len(losses) == 4 and all(isinstance(loss, float) for loss in losses)  # steps 2, 4, 6, 8

    weights = [safetensors.torch.load_file(folder / "model.safetensors") for folder in (uninterrupted, interrupted)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 50
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    results = [_without_timing(json.loads((folder / "all_results.json").read_text())) for folder in (uninterrupted, interrupted)]
    assert results[0] == results[1]  # test/eval metrics and the whole-run train_loss


def _tiny_timm_model(labels: list[str], seed: int) -> TimmWrapperForImageClassification:
    torch.manual_seed(seed)
    config = TimmWrapperConfig(architecture="test_efficientnet", num_labels=len(labels),
                               id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    return TimmWrapperForImageClassification(config)


def _publish_killed_before_operation(staging: Path, output_dir: Path, operation: int) -> bool:
    """Publish in a forked child that SIGKILLs itself right before its `operation`-th file operation.

    Returns whether the kill happened (False: publish finished first)."""
    pid = os.fork()
    if pid == 0:  # the child: count unlink/replace/rmdir calls, die at the chosen one
        done = [0]

        def lethal(original):
            def operation_or_death(*args, **kwargs):
                if done[0] == operation:
                    os.kill(os.getpid(), signal.SIGKILL)
                done[0] += 1
                return original(*args, **kwargs)
            return operation_or_death

        os.unlink, os.replace, os.rmdir = lethal(os.unlink), lethal(os.replace), lethal(os.rmdir)
        try:
            publish(staging, output_dir)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_kill_at_any_point_of_publishing_never_leaves_half_a_model(tmp_path):
    old, new = _tiny_timm_model(["cat", "dog"], seed=1), _tiny_timm_model(["kitten", "puppy", "chick"], seed=2)
    previous_run, staged = tmp_path / "previous", tmp_path / "staged"
    old.save_pretrained(previous_run)
    (previous_run / "all_results.json").write_text('{"run": "old"}')
    new.save_pretrained(staged)
    (staged / "all_results.json").write_text('{"run": "new"}')
    (staged / "README.md").write_text("# new model")

    outcomes = []
    for operation in range(20):
        output_dir = tmp_path / f"killed_before_{operation}"
        shutil.copytree(previous_run, output_dir)
        shutil.copytree(staged, output_dir / ".partial")
        killed = _publish_killed_before_operation(output_dir / ".partial", output_dir, operation)
        try:
            loaded = AutoModelForImageClassification.from_pretrained(output_dir)
        except (OSError, ValueError) as error:  # a clean refusal: the folder has no config.json while files move
            assert "config.json" in str(error)
            outcomes.append("refused")
        else:
            expected = new if loaded.config.num_labels == 3 else old
            assert all(torch.equal(tensor, expected.state_dict()[name]) for name, tensor in loaded.state_dict().items())
            outcomes.append("new" if expected is new else "old")
        if not killed:
            break
    # Killed before anything happened: the old model; while files move: refused; once config.json is in: the new one.
    first_new = outcomes.index("new")
    assert outcomes == ["old"] + ["refused"] * (first_new - 1) + ["new"] * (len(outcomes) - first_new), outcomes
    assert first_new >= 4  # unlink config.json, then model.safetensors, README.md, all_results.json moved before it
    assert not (tmp_path / f"killed_before_{len(outcomes) - 1}" / ".partial").exists()


def test_diverging_run_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    output_dir = tmp_path / "out"
    message = training_error(capsys, *RESUMABLE_RUN, "--learning_rate", "1e6", "--save_steps", "1",
                         "--output_dir", str(output_dir))
    assert "Lower `learning_rate` (or use `bf16` instead of `fp16`) and start again with `--overwrite`" in message
    assert "Loss became nan at step" in message or "Loss became inf at step" in message or "Weights became NaN or inf" in message
    kept = last_complete_checkpoint(output_dir)
    assert kept is not None and f"the last good checkpoint, {kept}, is kept." in message
    for name, tensor in safetensors.torch.load_file(kept / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name
    assert not (output_dir / "config.json").exists()  # no final model was published


class Photos(torch.utils.data.Dataset):
    """16 real photos (64 px); the `poisoned`-th one fetched, if any, turns to NaN. Records how many were fetched."""

    def __init__(self, poisoned: int | None = None):
        self.poisoned, self.fetched = poisoned, 0
        self.pixels, self.labels = sample_tensors()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        self.fetched += 1
        pixels = torch.full_like(self.pixels[index], float("nan")) if self.fetched == self.poisoned else self.pixels[index]
        return {"pixel_values": pixels, "labels": self.labels[index]}


@trains
def _trainer(output_dir: Path, photos: Photos, *callbacks: TrainerCallback) -> SafeTrainer:
    """What pipeline.run builds, on the recipe defaults (log and save once per epoch): one photo per step."""
    recipe = parse_recipe([], dataset="in-memory", model="test_efficientnet", pretrained=False, freeze="full",
                          output_dir=str(output_dir), per_device_train_batch_size=1, num_train_epochs=1,
                          eval_strategy="no", load_best_model_at_end=False, dataloader_num_workers=0, disable_tqdm=True)
    model, _ = load_model(recipe.model, ["cat", "dog"])
    plan = FreezePlan(model, recipe.freezing, recipe.training.learning_rate)
    return SafeTrainer(model=model, args=recipe.training, train_dataset=photos, data_collator=collate,
                       callbacks=[FreezeCallback(plan), *callbacks])


def test_a_nan_loss_stops_the_run_at_the_next_step_not_at_the_end_of_the_epoch(tmp_path):
    photos = Photos(poisoned=4)  # one photo per step, no workers: the 4th photo fetched is step 4's
    with pytest.raises(NonFiniteLossError, match="Loss became nan at step 4. Lower `learning_rate`") as stopped:
        _trainer(tmp_path / "out", photos).train()
    assert "no checkpoint had been saved yet" in str(stopped.value)
    # Checked one step late, during step 5; the loader also fetches one batch ahead. Not 16: the epoch's end.
    assert photos.fetched <= 6, photos.fetched
    assert last_complete_checkpoint(tmp_path / "out") is None


class HostReads(TorchFunctionMode):
    """Every read of a tensor's value by the host: on a GPU each one waits for all the work queued so far."""

    READS = frozenset({"__bool__", "item", "__float__", "__int__", "__index__", "tolist", "numpy"})

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append((args[0], traceback.extract_stack(limit=8)[:-1]))
        return func(*args, **(kwargs or {}))


class WatchSteps(TrainerCallback):
    """Records host reads from the end of step 2 to the end of step 6."""

    def __init__(self):
        self.mode = HostReads()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.mode.__enter__()
        elif state.global_step == 6:
            self.mode.__exit__(None, None, None)


def test_training_steps_read_no_tensor_value_on_the_host_except_the_previous_steps_loss(tmp_path):
    """A GPU cannot be watched here; a read of a tensor's value by the host is what would stop it."""
    watch = WatchSteps()
    trainer = _trainer(tmp_path / "out", Photos(), watch)
    trainer.train()
    counters = {id(state["step"]) for state in trainer.optimizer.state.values()}  # kept on the host by torch
    late_loss_reads = 0
    for tensor, stack in watch.mode.reads:
        if id(tensor) in counters:
            continue
        where = "\n".join(f"{frame.filename}:{frame.lineno} {frame.name}" for frame in stack)
        assert any(frame.name == "value" and frame.filename.endswith("trainer.py") for frame in stack), where
        late_loss_reads += 1
    assert late_loss_reads == 4  # steps 3 to 6 each checked the loss of the step before: a copy on the host already


# ---- a dataset with unreadable files ---------------------------------------------------------------
BAD_IN_TRAIN = {"cat": ["truncated.jpg", "empty.jpg", "notes.jpg", "bomb_100mp.png"], "dog": ["error_page.png", "lfs_pointer.jpg"]}
BAD_IN_TEST = {"dog": ["document.jpg"]}


@pytest.fixture(scope="module")
def folder_with_bad_images(tmp_path_factory) -> Path:
    """An image folder (train/ and test/, one sub-folder per class) of real photos plus corpus files that cannot be decoded."""
    root = tmp_path_factory.mktemp("imagefolder")
    corpus = root / "corpus"
    build_corpus(corpus)
    for split, count, bad in (("train", 8, BAD_IN_TRAIN), ("test", 4, BAD_IN_TEST)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            rows = [row for row in sample_rows(split) if row["labels"] == label][:count]
            for row in rows:
                (folder / Path(row["image"]["path"]).name).write_bytes(row["image"]["bytes"])
            for filename in bad.get(name, []):
                shutil.copy(corpus / filename, folder / f"bad_{filename}")
    return root / "data"


def test_run_over_unreadable_images_skips_counts_and_reports_them(folder_with_bad_images, tmp_path, capfd, caplog):
    output_dir = tmp_path / "out"
    train_in_process("--dataset", str(folder_with_bad_images), "--output_dir", str(output_dir), *TINY_RUN)

    results = json.loads((output_dir / "all_results.json").read_text())
    skipped, examples = results["skipped_images"], results["skipped_image_examples"]
    assert skipped["train"] + skipped["validation"] == sum(map(len, BAD_IN_TRAIN.values()))
    assert skipped["test"] == 1
    named = {Path(entry.split(":")[0]).name for entries in examples.values() for entry in entries}
    assert named == {f"bad_{name}" for names in (*BAD_IN_TRAIN.values(), *BAD_IN_TEST.values()) for name in names}
    assert "bad_bomb_100mp.png: decompression bomb" in " ".join(sum(examples.values(), []))
    # Only the readable photos reached the model: 16 for train + validation, 8 for test.
    sizes = results["split_sizes"]
    assert sizes["train"] + sizes["validation"] == 16 and sizes["test"] == 8
    assert "7 image(s) could not be decoded and were left out" in (output_dir / "README.md").read_text()
    logged = caplog.text + capfd.readouterr().err
    assert "Skipping 1 unreadable image(s) in test" in logged


def test_skip_unreadable_images_false_stops_and_lists_every_file(folder_with_bad_images, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--dataset", str(folder_with_bad_images), "--output_dir", str(tmp_path / "out"),
              "--skip_unreadable_images", "false", *TINY_RUN])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    assert "Unreadable images (set `skip_unreadable_images: true` to skip them)" in err
    for name in (*sum(BAD_IN_TRAIN.values(), []), *BAD_IN_TEST["dog"]):
        assert f"bad_{name}" in err
    assert "bad_document.jpg: not an image (looks like a PDF document)" in err
    assert not (tmp_path / "out").exists()
