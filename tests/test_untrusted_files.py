"""Files from the user's disk or another machine are untrusted: push uploads only the run's own regular files, the model
repo names no local path, a tampered feature cache is caught, a pickled model folder is refused by the demo, and a Hub
that fails mid-push ends in one line that says what was sent and that pushing again resumes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE, TINY_RUN, TINY_SAMPLE, run_command, user_error
from hub_server import HubError as ServerError
from hub_server import LocalHub
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_transfer.cli import run_training
from hf_transfer.feature_files import KEY_FILE, cache_root, load, store

pytestmark = pytest.mark.slow  # every test here trains a tiny model, or pushes one

TOKEN = "hf_untrusted_files_sentinel_789"


def _dataset_option(dataset: Path) -> tuple[str, ...]:
    """TINY_SAMPLE with another dataset folder."""
    options = list(TINY_SAMPLE)
    options[options.index("--dataset") + 1] = str(dataset)
    return tuple(options)


# --- one tiny run, its dataset and output folder under one absolute tmp path, HF_HOME under another ----------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """A head-only run on the feature cache, with the data doctor, checkpoints and the best one reloaded: every file a
    run writes that could name a local path."""
    work, home = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("home")
    dataset = work / "pets"
    shutil.copytree(SAMPLE, dataset)
    output_dir = work / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets")}
    process = run_command(*_dataset_option(dataset), *TINY_RUN, "--freeze", "head_only", "--num_train_epochs", "2",
                          "--save_strategy", "epoch", "--load_best_model_at_end", "true", "--output_dir", str(output_dir), env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    return {"work": work, "home": home, "dataset": dataset, "output_dir": output_dir, "env": env}


def test_no_file_of_the_model_repo_names_a_local_path(tiny_run):
    output_dir = tiny_run["output_dir"]
    results = json.loads((output_dir / "all_results.json").read_text())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert results["published_weights"]["kind"] == "best" and state["best_model_checkpoint"], "the run reloaded its best checkpoint"
    assert results["feature_cache"]["splits"] and (output_dir / "data_report.json").is_file(), "the cache and the doctor ran"
    roots = {tiny_run["work"], tiny_run["home"], Path(os.path.commonpath([tiny_run["work"], tiny_run["home"]]))}
    needles = {str(root) for root in roots} | {str(root.resolve()) for root in roots}
    files = [path for path in output_dir.iterdir() if path.is_file() and not path.name.startswith(".")]
    assert {"README.md", "all_results.json", "recipe.yaml", "run_config.json", "trainer_state.json", "data_report.json"} <= {
        path.name for path in files}
    for path in files:
        content = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in content, f"{path.name} names {needle}"
    # What they say instead: names relative to the folders the run used.
    assert state["best_model_checkpoint"] == f"checkpoint-{state['best_global_step']}"
    assert all(info["entry"].startswith(f"{split}-") for split, info in results["feature_cache"]["splits"].items())
    # The dataset and the model folder by their base names, or relative to the working directory (the checkout) where the two share a folder
    # below the root (a checkout under /tmp beside pytest's folders): never absolute.
    for named in (json.loads((output_dir / "run_config.json").read_text())["data"]["dataset"],
                  json.loads((output_dir / "data_report.json").read_text())["dataset"]):
        assert named == "pets" or (not Path(named).is_absolute() and (REPO / named).resolve() == tiny_run["dataset"].resolve())
    (model,) = re.findall(r'pipeline\("image-classification", model="([^"]+)"\)', (output_dir / "README.md").read_text())
    assert model == "run" or (not Path(model).is_absolute() and (REPO / model).resolve() == output_dir.resolve())


def test_the_run_itself_still_reads_its_best_checkpoint_from_the_output_folder(tiny_run):
    """Only the published trainer_state.json is rewritten: the checkpoint's own copy still names the folder Trainer used."""
    output_dir = tiny_run["output_dir"]
    checkpoint = sorted(output_dir.glob("checkpoint-*"))[-1]
    inner = json.loads((checkpoint / "trainer_state.json").read_text())
    assert Path(inner["best_model_checkpoint"]).parent == output_dir


def test_a_recipe_in_the_working_directory_reproduces_from_there(tmp_path):
    """A dataset folder below the working directory is recorded relative to it, and `train recipe.yaml` from there reruns it."""
    shutil.copytree(SAMPLE, tmp_path / "pets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("HF_TRANSFER_DEBUG", None)

    def train(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hf_transfer.cli", "train", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)

    first = train(*_dataset_option(tmp_path / "pets"), *TINY_RUN, "--output_dir", str(tmp_path / "outputs" / "first"))
    assert first.returncode == 0, first.stderr[-4000:]
    recipe = (tmp_path / "outputs" / "first" / "recipe.yaml").read_text()
    assert "dataset: pets\n" in recipe and "output_dir: outputs/first\n" in recipe and str(tmp_path) not in recipe
    second = train("outputs/first/recipe.yaml", "--output_dir", "outputs/second")
    assert second.returncode == 0, second.stderr[-4000:]
    weights = [(tmp_path / "outputs" / name / "model.safetensors").read_bytes() for name in ("first", "second")]
    assert weights[0] == weights[1], "the same run, bit for bit"


# --- what push uploads ------------------------------------------------------------------------------------------------
class FailingHub(LocalHub):
    """The loopback Hub, answering HTTP 500 to commits (`fail = "commit"`) or to the upload of one LFS object."""

    fail: str | None = None  # "commit", or the sha256 of the LFS object whose upload fails

    def commit(self, repo, branch, user, body):
        if self.fail == "commit":
            raise ServerError(500, "Internal Server Error")
        return super().commit(repo, branch, user, body)

    def lfs_receive(self, oid, nonce, chunks):
        if self.fail == oid:
            raise ServerError(500, "Internal Server Error")
        return super().lfs_receive(oid, nonce, chunks)


@pytest.fixture
def hub():
    """A Hub of its own per test: its object store is shared by all its repos, and each test counts its uploads."""
    with FailingHub(tokens={TOKEN: "user"}) as server:
        yield server


def _push(hub: LocalHub, run: Path, repo_id: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = hub.client_env(hf_home=tmp_path / "hf-home", token=TOKEN)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "hf_transfer.cli", "push", str(run), "--repo-id", repo_id, "--no-verify"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _one_error_line(process: subprocess.CompletedProcess) -> str:
    output = process.stdout + process.stderr
    assert TOKEN not in output, "the token was printed"
    assert process.returncode == 2 and "Traceback" not in output, output[-4000:]
    (message,) = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    return message


def _copy_run(tiny_run: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run["output_dir"], run, ignore=shutil.ignore_patterns("checkpoint-*"))
    return run


def _main_files(hub: LocalHub, repo_id: str) -> dict:
    repo = hub.repos[("model", repo_id)]
    return repo.commits[repo.branches["main"]].files


def test_push_refuses_a_link_and_uploads_only_the_runs_own_regular_files(hub, tiny_run, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the secret a link points to")
    run = _copy_run(tiny_run, tmp_path)
    (run / "notes.txt").symlink_to(secret)
    message = _one_error_line(_push(hub, run, "user/linked", tmp_path))
    assert "'notes.txt' is a symbolic link" in message and "push again" in message
    assert ("model", "user/linked") not in hub.repos, "refused before anything was sent"

    (run / "notes.txt").unlink()
    (run / "notes.txt").write_text("my own notes, not the run's")  # a regular file a run never writes
    process = _push(hub, run, "user/linked", tmp_path)
    assert process.returncode == 0, process.stderr[-4000:]
    assert "notes.txt" in process.stdout + process.stderr, "the user is told what stayed local"
    files = _main_files(hub, "user/linked")
    assert "notes.txt" not in files and {"model.safetensors", "README.md", "all_results.json"} <= set(files)
    for entry in files.values():
        assert b"the secret a link points to" not in hub.object_path(entry.sha256).read_bytes()

    (run / "README.md").unlink()
    (run / "README.md").symlink_to(secret)  # a file of the run's own list, replaced by a link
    message = _one_error_line(_push(hub, run, "user/linked", tmp_path))
    assert "'README.md' is a symbolic link" in message


def test_push_of_a_folder_not_written_by_a_run_says_so_in_one_line(hub, tmp_path):
    folder = tmp_path / "downloaded"
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
                       patch_size=16, num_labels=2)
    ViTForImageClassification(config).save_pretrained(folder)  # config.json and model.safetensors, no run files
    message = _one_error_line(_push(hub, folder, "user/downloaded", tmp_path))
    assert "not a finished training output dir" in message and "all_results.json" in message
    assert ("model", "user/downloaded") not in hub.repos


def test_a_server_error_on_the_commit_ends_in_one_line_and_pushing_again_resumes(hub, tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    hub.fail = "commit"
    try:
        message = _one_error_line(_push(hub, run, "user/commit-fails", tmp_path))
    finally:
        hub.fail = None
    assert "HTTP 500" in message and "user/commit-fails" in message and "nothing is committed" in message
    assert "run the same push again" in message.lower() and "resumes" in message
    uploads = len([r for r in hub.requests if r["path"].startswith("/lfs-upload/")])
    assert uploads, "the large files went up before the commit failed"

    process = _push(hub, run, "user/commit-fails", tmp_path)
    assert process.returncode == 0, process.stderr[-4000:]
    assert len([r for r in hub.requests if r["path"].startswith("/lfs-upload/")]) == uploads, "nothing sent twice"
    assert "model.safetensors" in _main_files(hub, "user/commit-fails")


def test_a_server_error_on_an_lfs_upload_ends_in_one_line_and_pushing_again_resumes(hub, tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    weights = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    hub.fail = weights
    try:
        message = _one_error_line(_push(hub, run, "user/lfs-fails", tmp_path))
    finally:
        hub.fail = None
    assert "HTTP 500" in message and "'model.safetensors'" in message and "nothing is committed" in message
    assert "resumes" in message
    sent = {r["path"].split("/")[2] for r in hub.requests if r["path"].startswith("/lfs-upload/") and r["status"] == 200}

    process = _push(hub, run, "user/lfs-fails", tmp_path)
    assert process.returncode == 0, process.stderr[-4000:]
    resent = [r["path"].split("/")[2] for r in hub.requests if r["path"].startswith("/lfs-upload/") and r["status"] == 200]
    assert resent.count(weights) == 1 and all(resent.count(oid) == 1 for oid in sent), "what the Hub stored is not sent again"
    assert _main_files(hub, "user/lfs-fails")["model.safetensors"].sha256 == weights


# --- a tampered feature cache --------------------------------------------------------------------------------------------
@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TRANSFER_DEBUG", raising=False)
    return tmp_path / "datasets"


CACHED = ("--freeze", "head_only", "--data_doctor", "false")


def _entry(split: str) -> Path:
    """The one cache entry of `split` (each run here caches each split once)."""
    (entry,) = cache_root().glob(f"{split}-*")
    return entry


def _tamper(entry: Path, labels=None, features=None) -> None:
    key = json.loads((entry / KEY_FILE).read_text())
    stored_features, stored_labels = load(entry)
    store(entry, stored_features if features is None else features, stored_labels if labels is None else labels, key)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_flipped_labels_in_a_cached_split_stop_the_run_in_one_line(split, cache_dir, tmp_path, capsys):
    options = [*TINY_SAMPLE, *TINY_RUN, *CACHED]
    run_training([*options, "--output_dir", str(tmp_path / "first")])
    entry = _entry(split)
    _, labels = load(entry)
    _tamper(entry, labels=1 - labels)  # every label flipped, the key file kept
    message = user_error(capsys, *options, "--output_dir", str(tmp_path / "second"))
    assert f"cached {split} features" in message and "labels" in message
    assert "feature_cache: false" in message and entry.name in message
    assert not (tmp_path / "second" / "model.safetensors").exists()


def test_other_features_in_a_cached_split_stop_the_run_in_one_line(cache_dir, tmp_path, capsys):
    options = [*TINY_SAMPLE, *TINY_RUN, *CACHED]
    run_training([*options, "--output_dir", str(tmp_path / "first")])
    entry = _entry("train")
    features, _ = load(entry)
    _tamper(entry, features=np.roll(features, 1, axis=0).astype(np.float32))  # each row holds another image's features
    message = user_error(capsys, *options, "--output_dir", str(tmp_path / "second"))
    assert "cached train features" in message and "not this model's" in message and entry.name in message


def test_augmented_views_are_checked_too(cache_dir, tmp_path, capsys):
    options = [*TINY_SAMPLE, *TINY_RUN, *CACHED, "--augmentation", "default", "--feature_cache_views", "2"]
    run_training([*options, "--output_dir", str(tmp_path / "first")])
    entry = _entry("train")
    again = run_training([*options, "--output_dir", str(tmp_path / "again")])  # an honest cache passes its check
    assert again["feature_cache"]["splits"]["train"]["hit"] and again["feature_cache"]["checks"]["train"]["mismatched"] == 0
    features, _ = load(entry)
    _tamper(entry, features=features[:, ::-1].astype(np.float32))  # the two views swapped: each still an image's own
    message = user_error(capsys, *options, "--output_dir", str(tmp_path / "second"))
    assert "cached train features" in message and "not this model's" in message


# --- a pickled model folder in the demo -------------------------------------------------------------------------------------
def test_demo_refuses_pickled_weights_that_would_run_code_in_one_line(tmp_path):
    class CreatesAFile:
        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return (open, (self.path, "w"))

    folder, sentinel = tmp_path / "model", tmp_path / "code_ran"
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
                       patch_size=16, num_labels=2)
    ViTForImageClassification(config).config.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.save({"vit.embeddings.cls_token": torch.zeros(1, 1, 32), "payload": CreatesAFile(str(sentinel))},
               folder / "pytorch_model.bin")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TRANSFER_DEBUG", None)
    process = subprocess.run([sys.executable, "-m", "hf_transfer.cli", "demo", str(folder)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=180)
    assert process.returncode == 2 and "Traceback" not in process.stderr, process.stderr[-4000:]
    (message,) = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert "Refusing to load" in message and "it would call `io.open`" in message and "safetensors" in message
    assert not sentinel.exists()
