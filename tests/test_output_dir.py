"""The output folder loses nothing and leaks nothing: `--overwrite` deletes only an earlier run's own files and only once
the new run starts, two runs never share a folder, the card is published with the model, and a folder that is a file,
read-only or on a full disk, Ctrl-C, and a checkpoint with a file missing each end in one clear line.

The full and read-only disks are real: a 64 KiB tmpfs and a read-only bind mount, each made in a private mount
namespace (`unshare -rm`) that ends with the run, so nothing is left mounted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, SAMPLE, TINY_RUN, TINY_SAMPLE, run_command, sample_rows, train_command, trains, user_error
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from hf_transfer.cli import main
from hf_transfer.repo_files import shareable_path
from hf_transfer.trainer import CheckpointError, SafeTrainer, last_complete_checkpoint

pytestmark = pytest.mark.usefixtures("offline_hub")

# The tiny run for 2 epochs of 4 steps (8 photos in batches of 2), with checkpoints at steps 3, 6 and 8 (the end).
CHECKPOINTED = (*TINY_SAMPLE, *TINY_RUN, "--per_device_train_batch_size", "2", "--num_train_epochs", "2",
                "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "5", "--seed", "0")
LOCK = ".hf_transfer.lock"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run with its checkpoints, written once; tests work on copies."""
    output_dir = tmp_path_factory.mktemp("finished") / "out"
    result = run_command(*CHECKPOINTED, "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(output_dir.glob("checkpoint-*"))) >= 2, sorted(output_dir.iterdir())
    return output_dir


def _copy(finished_run: Path, target: Path) -> Path:
    shutil.copytree(finished_run, target, symlinks=True)
    return target


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes: to show that nothing was touched."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


def _environment() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TRANSFER_DEBUG", None)
    return env


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _wait_for_complete_checkpoint(process: subprocess.Popen, output_dir: Path, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while (checkpoint := last_complete_checkpoint(output_dir)) is None:
        assert process.poll() is None, "the run ended before it saved a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    return checkpoint


# ---- --overwrite ----------------------------------------------------------------------------------
def test_overwrite_deletes_only_a_runs_own_files_and_only_once_the_new_run_starts(finished_run, tmp_path, capsys):
    output_dir = _copy(finished_run, tmp_path / "out")
    before = _tree(output_dir)
    # The model does not load: the run never starts, so the previous model stays whole.
    message = user_error(capsys, *CHECKPOINTED, "--output_dir", str(output_dir), "--overwrite", "true",
                         "--model", "timm/no_such_model", "--pretrained", "true")
    assert "Cannot load 'timm/no_such_model'" in message
    assert _tree(output_dir) == before

    (output_dir / "notes.txt").write_text("the user's own notes")
    message = user_error(capsys, *CHECKPOINTED, "--output_dir", str(output_dir), "--overwrite", "true", "--learning_rate", "0.01")
    assert f"{output_dir} holds files that hf-transfer did not write: notes.txt." in message
    assert "`--overwrite` deletes only what an earlier run wrote" in message
    assert _tree(output_dir) == {**before, "notes.txt": _tree(output_dir)["notes.txt"]}

    (output_dir / "notes.txt").unlink()
    main(["train", *CHECKPOINTED, "--output_dir", str(output_dir), "--overwrite", "true", "--learning_rate", "0.01",
          "--save_strategy", "no"])
    assert not list(output_dir.glob("checkpoint-*"))  # the earlier run's checkpoints went with it
    assert json.loads((output_dir / "run_config.json").read_text())["training"]["learning_rate"] == 0.01
    assert "| training | learning_rate | 0.01 |" in (output_dir / "README.md").read_text()
    assert not (output_dir / LOCK).exists()  # the lock goes with the run


def test_resume_with_overwrite_is_refused_and_keeps_everything(finished_run, tmp_path, capsys):
    output_dir = _copy(finished_run, tmp_path / "out")
    before = _tree(output_dir)
    message = user_error(capsys, *CHECKPOINTED, "--output_dir", str(output_dir), "--resume", "true", "--overwrite", "true")
    assert f"`--resume` continues the run in {output_dir} from its last complete checkpoint" in message
    assert "`--overwrite` deletes that run to start a new one" in message and "Pass one of them" in message
    assert _tree(output_dir) == before


@pytest.mark.parametrize("place", ["symlink", "home", "holds_the_dataset"])
def test_overwrite_refuses_folders_it_must_not_clear(place, finished_run, tmp_path, capsys, monkeypatch):
    """Each of these folders holds a finished run and would otherwise be cleared by `--overwrite`."""
    output_dir = _copy(finished_run, tmp_path / "out")
    argv = [*CHECKPOINTED, "--overwrite", "true", "--learning_rate", "0.01"]
    if place == "symlink":
        target, output_dir = output_dir, tmp_path / "link"
        output_dir.symlink_to(target)
        expected = [f"{output_dir} is a symbolic link (to {target})", f"pass the folder itself, `--output_dir {target}`"]
    elif place == "home":
        monkeypatch.setenv("HOME", str(output_dir))
        target, expected = output_dir, [f"{output_dir} is your home folder", "choose another `--output_dir`"]
    else:
        target, dataset = output_dir, output_dir / "data"
        shutil.copytree(SAMPLE, dataset)
        argv += ["--dataset", str(dataset)]
        expected = [f"{output_dir} holds the dataset {dataset}", "choose an `--output_dir` outside it"]
    before = _tree(target)
    message = user_error(capsys, *argv, "--output_dir", str(output_dir))
    for phrase in expected:
        assert phrase in message
    assert _tree(target) == before


def test_output_dir_inside_an_image_folder_dataset_is_refused(tmp_path, capsys):
    """The plots written there would be read as images of the dataset the next time it loads."""
    dataset = tmp_path / "photos"
    for split, count in (("train", 8), ("test", 4)):
        for label, name in enumerate(("cat", "dog")):
            folder = dataset / split / name
            folder.mkdir(parents=True)
            for row in [row for row in sample_rows(split) if row["labels"] == label][:count]:
                (folder / Path(row["image"]["path"]).name).write_bytes(row["image"]["bytes"])
    before = _tree(dataset)
    output_dir = dataset / "model"
    message = user_error(capsys, *TINY_RUN, "--dataset", str(dataset), "--output_dir", str(output_dir))
    assert f"{output_dir} is inside the dataset folder {dataset}" in message and "outside it" in message
    assert _tree(dataset) == before and not output_dir.exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    output_file = tmp_path / "model.txt"
    output_file.write_text("a file")
    message = user_error(capsys, *TINY_SAMPLE, *TINY_RUN, "--output_dir", str(output_file))
    assert f"{output_file} is a file, not a folder" in message and "choose another `--output_dir`" in message
    assert output_file.read_text() == "a file"


# ---- read-only and full disks ---------------------------------------------------------------------
def _in_mount_namespace(script: str) -> subprocess.CompletedProcess:
    """Run the shell `script` in a private mount namespace, whose mounts end with it."""
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                          env=_environment(), capture_output=True, text=True, timeout=600, check=False)


@trains
def _train(*argv: str) -> str:
    return shlex.join(train_command(*argv))


def test_read_only_output_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    result = _in_mount_namespace(f"set -e; mount --bind {folder} {folder}; mount -o remount,bind,ro {folder}; "
                                 f"exec {_train(*TINY_SAMPLE, *TINY_RUN, '--output_dir', str(folder / 'out'))}")
    assert result.returncode == 2, result.stderr[-3000:]
    message = _one_error_line(result.stderr)
    assert f"Cannot write to {folder / 'out'}: read-only file system" in message and "choose a writable `--output_dir`" in message
    assert not list(folder.iterdir())


@pytest.mark.parametrize("disk", ["full_from_the_start", "full_when_the_model_is_saved"])
def test_full_disk(disk, tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    # 64 KiB holds the lock and run_config.json, not the 400 KiB model; `dd` fills the rest for the first case.
    setup = f"mount -t tmpfs -o size=64k tmpfs {mount}"
    if disk == "full_from_the_start":
        setup += f"; dd if=/dev/zero of={mount}/filler bs=4k count=64 2>/dev/null || true"
    output_dir = mount / "out"
    result = _in_mount_namespace(f"{setup}; {_train(*TINY_SAMPLE, *TINY_RUN, '--output_dir', str(output_dir))}; "
                                 f"echo exit=$?; ls -A {mount} {output_dir} 2>&1 || true")
    assert "exit=2" in result.stdout, result.stdout + result.stderr[-3000:]
    message = _one_error_line(result.stderr)
    assert "No space left on the device" in message and "Free some space" in message
    listing = set(result.stdout.split("exit=2", 1)[1].split())  # `ls -A` of the disk, then of the output folder
    if disk == "full_from_the_start":
        assert str(output_dir) in message and "out" not in listing  # it stopped before it claimed anything
    else:
        assert f"{output_dir}/.partial" in message  # the staged model did not fit
        assert {".partial", "config.json", LOCK}.isdisjoint(listing) and "run_config.json" in listing  # no half model, nothing left


def test_disk_full_during_training_then_resume_once_there_is_space(finished_run, tmp_path):
    """A 2 MiB disk holds the first checkpoint (1.3 MB: weights and two Adam moments) but not the second."""
    mount, output_dir = tmp_path / "disk", tmp_path / "disk" / "out"
    mount.mkdir()
    train = _train(*CHECKPOINTED, "--output_dir", str(output_dir))
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "resumed")}
    result = _in_mount_namespace(f"mount -t tmpfs -o size=2m tmpfs {mount}; {train} 2> {logs['first']}; echo first=$?; "
                                 f"mount -o remount,size=64m {mount}; {train} --resume true 2> {logs['resumed']}; echo resumed=$?; "
                                 f"cp {output_dir}/model.safetensors {tmp_path}")  # the disk goes with the namespace
    first, resumed = (log.read_text() for log in logs.values())
    assert "first=2" in result.stdout and "resumed=0" in result.stdout, result.stdout[-2000:] + first[-3000:] + resumed[-3000:]
    message = _one_error_line(first)
    assert f"No space left on the device holding {output_dir}" in message
    assert f"run the same command with `--resume` to continue from the last complete checkpoint, {output_dir}/checkpoint-3" in message
    assert f"{output_dir}/checkpoint-6 lacks optimizer.safetensors" in resumed and f": resuming from {output_dir}/checkpoint-3" in resumed
    expected, continued = _weights(finished_run), _weights(tmp_path)  # the same as a run that never ran out of space
    assert expected.keys() == continued.keys() and all(torch.equal(expected[name], continued[name]) for name in expected)


# ---- two runs, one folder -------------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_run_releases_it(tmp_path, capsys):
    output_dir = tmp_path / "out"
    first = subprocess.Popen(train_command(*CHECKPOINTED, "--num_train_epochs", "20", "--output_dir", str(output_dir)),
                             cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_complete_checkpoint(first, output_dir)
        message = user_error(capsys, *CHECKPOINTED, "--num_train_epochs", "20", "--output_dir", str(output_dir))
        assert f"{output_dir} is in use by another hf-transfer run (pid {first.pid} on {socket.gethostname()}, started " in message
        assert "Wait for it to finish, or choose another `--output_dir`" in message
        assert first.poll() is None, "the first run must still be running"
    finally:
        first.kill()
    assert first.wait() == -signal.SIGKILL
    # The kill released the lock (its file stays behind, unlocked): the next run takes the folder.
    main(["train", *CHECKPOINTED, "--output_dir", str(output_dir), "--overwrite", "true", "--save_strategy", "no"])
    assert (output_dir / "config.json").is_file() and not (output_dir / LOCK).exists()


# ---- the card travels with the model --------------------------------------------------------------
KILL_AFTER_CONFIG_MOVED = """
import os, signal, sys
real_replace = os.replace
def replace(source, target, *args, **kwargs):
    real_replace(source, target, *args, **kwargs)
    if os.path.basename(target) == "config.json" and ".partial" in str(source):
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after the model's config.json is in place
os.replace = replace
from hf_transfer.cli import main
main(sys.argv[1:])
"""


def test_the_card_is_published_with_the_model(finished_run, tmp_path):
    output_dir = _copy(finished_run, tmp_path / "out")
    previous_card = (output_dir / "README.md").read_text()
    assert "| training | learning_rate | 0.001 |" in previous_card
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CONFIG_MOVED, "train", *CHECKPOINTED, "--output_dir",
                             str(output_dir), "--overwrite", "true", "--learning_rate", "0.01", "--save_strategy", "no"],
                            cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (output_dir / "config.json").is_file()  # the new model is published...
    card = (output_dir / "README.md").read_text()  # ...and its card with it, naming the folder users load
    assert "| training | learning_rate | 0.01 |" in card
    # The folder as the run (working directory REPO) names it on a published card, not the staging folder.
    assert f'pipeline("image-classification", model="{shareable_path(str(output_dir.resolve()), REPO)}")' in card
    assert ".partial" not in card


# ---- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_stops_with_one_line_and_the_run_resumes(tmp_path):
    output_dir = tmp_path / "out"
    argv = (*CHECKPOINTED, "--num_train_epochs", "3", "--output_dir", str(output_dir))  # 12 steps: 9 left after the first checkpoint
    # Ctrl-C's default action, as in a terminal: a shell's background job (`pytest ... &`) starts with SIGINT ignored, the
    # run would inherit that, finish and exit 0 (it did, in two full suite runs started so).
    run = subprocess.Popen(train_command(*argv), cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_complete_checkpoint(run, output_dir)
    assert run.poll() is None, "the run ended before it could be interrupted"
    run.send_signal(signal.SIGINT)
    stderr = run.stderr.read()
    # Ended by SIGINT, as Python ends on an uncaught Ctrl-C: the shell sees 130 and stops a script or loop running it.
    assert run.wait(timeout=120) == -signal.SIGINT, stderr[-3000:]
    message = _one_error_line(stderr)
    match = re.fullmatch(r"error: interrupted; the last complete checkpoint, (.+), is kept: run the same command with `--resume` "
                         r"to continue from it\.", message)
    assert match, message
    assert Path(match[1]).parent == output_dir and Path(match[1]) == last_complete_checkpoint(output_dir)
    assert not (output_dir / LOCK).exists() and not (output_dir / ".partial").exists()
    main(["train", *argv, "--resume", "true"])
    assert (output_dir / "model.safetensors").is_file()


# ---- a checkpoint with a file missing --------------------------------------------------------------
def test_resume_skips_a_checkpoint_with_a_file_missing_and_continues_exactly(finished_run, tmp_path):
    output_dir = _copy(finished_run, tmp_path / "out")
    newest, older = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))[-2:][::-1]
    (newest / "optimizer.safetensors").unlink()
    for name in ("model.safetensors", "config.json", "README.md"):
        (output_dir / name).unlink()  # so the resumed run must publish its own
    resumed = run_command(*CHECKPOINTED, "--output_dir", str(output_dir), "--resume", "true")  # a process, as the reference
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{newest} lacks optimizer.safetensors: resuming from {older}" in resumed.stderr
    expected, resumed = _weights(finished_run), _weights(output_dir)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_resume_names_the_missing_files_when_no_checkpoint_is_complete(finished_run, tmp_path, capsys):
    output_dir = _copy(finished_run, tmp_path / "out")
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    (checkpoints[-1] / "resume_state.json").unlink()
    for checkpoint in checkpoints[:-1]:
        (checkpoint / "scheduler.json").unlink()
    before = _tree(output_dir)
    message = user_error(capsys, *CHECKPOINTED, "--output_dir", str(output_dir), "--resume", "true")
    assert f"`--resume` found no complete checkpoint in {output_dir}: {checkpoints[-1].name} lacks resume_state.json" in message
    assert f"{checkpoints[0].name} lacks scheduler.json" in message
    assert "was not written by hf-transfer" not in message
    assert _tree(output_dir) == before


def test_a_chosen_checkpoint_with_a_file_missing_is_named(finished_run, tmp_path):
    first = min(finished_run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    checkpoint = shutil.copytree(first, tmp_path / first.name)
    (checkpoint / "optimizer.json").unlink()
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=2))
    trainer = SafeTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True))
    with pytest.raises(CheckpointError, match=re.escape(f"{checkpoint} lacks optimizer.json, so it cannot be resumed from")):
        trainer.train(resume_from_checkpoint=str(checkpoint))
