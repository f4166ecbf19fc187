"""Two 'machines' on one host: `accelerate launch --num_machines 2 --machine_rank {0,1}`, one CPU process each (gloo),
with node-local caches and output folders (each machine its own) or one shared set, against a one-machine run; and
three, two of them sharing a folder, which is refused.

The quickstart recipe with a random-init test EfficientNet at 32 px: head_only (on the feature cache), staged (a
cached head stage, then images) and full fine-tuning. Two processes on one machine or on two see the same batches, so
their accuracies agree; every machine's model repo loads with `pipeline`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FINETUNE, LAUNCH, QUICKSTART, REPO, SAMPLE, free_port, save_timm_model, trains
from transformers import pipeline

from hf_transfer.feature_files import KEY_FILE

# 32 training images in batches of 2 x 4: 4 optimizer steps an epoch, 8 in all; 16 test images, so one image is 1/16.
TINY = ["--max_train_samples", "32", "--max_test_samples", "16", "--validation_size", "8", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--augmentation", "none",
        "--save_strategy", "epoch", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
FREEZES = {
    "head_only": ["--freeze", "head_only"],
    "staged": ["--freeze", "staged", "--batchnorm", "frozen", "--stages", "[{at_step: 0, train: head}, {at_step: 3, train: 'last_n:2'}]"],
    "full": ["--freeze", "full", "--learning_rate", "0.01"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_timm_model(tmp_path_factory.mktemp("model") / "test_efficientnet", "test_efficientnet")


def _env(home: Path) -> dict:
    """A machine's own HF_HOME and datasets cache (node-local disk)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(home / "hf_home"),
            "HF_DATASETS_CACHE": str(home / "datasets")}


def _options(model_dir: Path, freeze: str, *extra: str) -> list[str]:
    return [str(QUICKSTART), "--dataset", str(SAMPLE), "--model", str(model_dir), *TINY, *FREEZES[freeze], *extra]


@trains
def one_machine(tmp_path: Path, options: list[str]) -> Path:
    out = tmp_path / "one" / "out"
    launch = [*LAUNCH, "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())]  # other runs may hold 29500
    result = subprocess.run([*launch, FINETUNE, *options, "--output_dir", str(out)], check=False, cwd=REPO,
                            env=_env(tmp_path / "one"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def launch_two_machines(tmp_path: Path, options: list[str], shared: bool) -> tuple[list[Path], list[int], list[str]]:
    """Launch machine ranks 0 and 1 at once: each machine's output folder (the same one when `shared`), exit codes, logs."""
    return launch_machines(options, [tmp_path / ("shared" if shared else f"machine{rank}") for rank in range(2)])


@trains
def launch_machines(options: list[str], homes: list[Path]) -> tuple[list[Path], list[int], list[str]]:
    """One machine per home, one process each, launched at once; a home named twice is a disk those machines share."""
    port, machines = free_port(), []
    for rank, home in enumerate(homes):
        home.mkdir(exist_ok=True)  # a machine's own disk exists before the run; only its sub-folders are made by it
        launch = [*LAUNCH, "--num_processes", str(len(homes)), "--num_machines", str(len(homes)), "--machine_rank", str(rank),
                  "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), FINETUNE, *options,
                  "--output_dir", str(home / "out")]
        machines.append(subprocess.Popen(launch, cwd=REPO, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for machine in machines:
            logs.append(machine.communicate(timeout=600)[0])
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()
    return [home / "out" for home in homes], [machine.returncode for machine in machines], logs


def two_machines(tmp_path: Path, options: list[str], shared: bool) -> list[Path]:
    outs, codes, logs = launch_two_machines(tmp_path, options, shared)
    for rank, (code, log) in enumerate(zip(codes, logs)):
        assert code == 0, f"machine {rank}:\n{log[-6000:]}\nmachine {1 - rank}:\n{logs[1 - rank][-6000:]}"
    return outs


def _results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def _check_repo(out: Path, reference: dict, photo: Path) -> dict:
    results = _results(out)
    assert results["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1 / 16), "within one test image"
    assert results["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3), "the same batches, the same training"
    assert not list(out.glob(".hf_transfer*probe*")) and not (out / ".hf_transfer.lock").exists()
    classifier = pipeline("image-classification", model=str(out))
    assert {guess["label"] for guess in classifier(str(photo))} == {"cat", "dog"}
    return results


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from conftest import sample_rows

    path = tmp_path_factory.mktemp("photo") / "cat.jpg"
    path.write_bytes(sample_rows("test")[0]["image"]["bytes"])
    return path


@pytest.fixture(scope="module")
def one_machine_run(tmp_path_factory, model_dir):
    """The one-machine two-process run of each recipe, run once for both layouts: its output folder."""
    runs = {}

    def run(freeze: str) -> Path:
        if freeze not in runs:
            runs[freeze] = one_machine(tmp_path_factory.mktemp(f"one-{freeze}"), _options(model_dir, freeze))
        return runs[freeze]

    return run


@pytest.mark.parametrize("freeze", ["head_only", "staged", "full"])
def test_two_machines_with_node_local_disks(tmp_path, model_dir, photo, one_machine_run, freeze):
    options = _options(model_dir, freeze)
    reference = _results(one_machine_run(freeze))
    outs = two_machines(tmp_path, options, shared=False)
    for rank, out in enumerate(outs):
        results = _check_repo(out, reference, photo)
        assert sorted(path.name for path in out.glob("checkpoint-*")) == sorted(
            path.name for path in one_machine_run(freeze).glob("checkpoint-*")), f"machine {rank} keeps every checkpoint"
        for checkpoint in out.glob("checkpoint-*"):
            assert {f"resume_state_{r}.json" for r in range(2)} <= {p.name for p in checkpoint.iterdir()}, "resumable here"
        if freeze != "full":
            cache = results["feature_cache"]["splits"]
            assert cache["train"]["images"] == 32 and not cache["train"]["hit"]
            cached = (out.parent / "datasets" / "hf_transfer_features")
            assert any((folder / KEY_FILE).is_file() for folder in cached.iterdir()), f"machine {rank} has its own cache copy"
            assert not list(cached.glob("*.parts")) and not list(cached.glob("*.tmp*"))


@pytest.mark.parametrize("freeze", ["head_only", "staged", "full"])
def test_two_machines_sharing_one_cache_and_output_folder(tmp_path, model_dir, photo, one_machine_run, freeze):
    options = _options(model_dir, freeze)
    reference = _results(one_machine_run(freeze))
    (out, same) = two_machines(tmp_path, options, shared=True)
    assert out == same
    _check_repo(out, reference, photo)
    assert sorted(path.name for path in out.glob("checkpoint-*")) == sorted(
        path.name for path in one_machine_run(freeze).glob("checkpoint-*"))
    cached = tmp_path / "shared" / "datasets" / "hf_transfer_features"
    if freeze != "full":
        # Train, validation and test: the data doctor reads every split (without it, staged caches no test features).
        assert len([folder for folder in cached.iterdir() if (folder / KEY_FILE).is_file()]) == 3, "one copy of each"
        assert not [folder for folder in cached.iterdir() if not (folder / KEY_FILE).is_file()], "no staging left behind"


@pytest.mark.parametrize("freeze", ["staged", "full"])
def test_resume_on_node_local_disks_after_one_machine_lost_its_last_checkpoint(tmp_path, model_dir, photo, freeze):
    """As if killed while machine 1 was saving checkpoint-8: both continue from checkpoint-4, the newest both hold
    (staged: past the hand-over checkpoint-3 of its cached head stage)."""
    options = _options(model_dir, freeze)
    first = two_machines(tmp_path, options, shared=False)
    finished = _results(first[0])
    saved = (first[0] / "checkpoint-8" / "trainer_state.json").stat().st_mtime_ns
    shutil.rmtree(first[1] / "checkpoint-8")
    (first[1] / "config.json").unlink()  # and the model repo was never published there
    again = two_machines(tmp_path, [*options, "--resume"], shared=False)
    for out in again:
        _check_repo(out, finished, photo)
        assert (out / "checkpoint-8").is_dir()
    assert (again[0] / "checkpoint-8" / "trainer_state.json").stat().st_mtime_ns != saved, "machine 0 trained steps 5-8 again"
    assert _results(again[1])["test_accuracy"] == finished["test_accuracy"]
    assert _results(again[1])["train_loss"] == pytest.approx(finished["train_loss"], rel=1e-4), "continued exactly"


def test_save_on_each_node_with_a_shared_output_folder_is_refused(tmp_path, model_dir):
    options = _options(model_dir, "full", "--max_steps", "1", "--save_on_each_node", "true")
    (out, _), codes, logs = launch_two_machines(tmp_path, options, shared=True)
    assert codes == [1, 1], logs  # torchrun's exit code for a process that exited with 2, hf-transfer's for a user error
    for log in logs:
        assert ("\n" + log).count("\nerror: `save_on_each_node: true`, but") == 1 and "shared by all 2 machines" in log, log[-3000:]
        assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, "one line, no traceback"
    assert not out.exists(), "refused before anything was written"


def test_an_output_folder_shared_by_some_machines_but_not_all_is_refused(tmp_path, model_dir):
    options = _options(model_dir, "full", "--max_steps", "1")
    shared, own = tmp_path / "shared", tmp_path / "machine2"
    outs, codes, logs = launch_machines(options, [shared, shared, own])  # machines 0 and 1 share a disk, machine 2 has its own
    assert codes == [1, 1, 1], logs
    for log in logs:
        assert ("\n" + log).count("\nerror: ") == 1 and "is shared by some of the 3 machines but not all (2 separate copies)" in log, log[-3000:]
        assert not any(f"[rank{rank}]: Traceback" in log for rank in range(3)), "one line, no traceback from the run"
    assert not any(out.exists() for out in outs), "refused before anything was written"
