"""Shared fixtures: real photos from the repo's cats-vs-dogs sample and one trained quickstart model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants as hub_constants
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "recipes" / "data" / "cats_vs_dogs_sample"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def sample_rows(split: str) -> list[dict]:
    """Rows of the shipped sample: {'image': {'bytes', 'path'}, 'labels': 0 (cat) | 1 (dog)}."""
    return pq.read_table(SAMPLE / "data" / f"{split}-00000-of-00001.parquet").to_pylist()


@pytest.fixture(scope="session")
def test_photos() -> list[tuple[Image.Image, str]]:
    """Held-out photos (never trained on) with their true label name."""
    names = ("cat", "dog")
    return [(Image.open(io.BytesIO(row["image"]["bytes"])), names[row["labels"]]) for row in sample_rows("test")[:12]]


@pytest.fixture(scope="session")
def quickstart_model_dir(tmp_path_factory) -> Path:
    """The README's main job, run once for the whole session (about a minute on 2 cores)."""
    from hf_transfer import finetune

    output_dir = tmp_path_factory.mktemp("quickstart") / "model"
    finetune(str(QUICKSTART), output_dir=str(output_dir))
    assert json.loads((output_dir / "all_results.json").read_text())["test_accuracy"] > 0.5
    return output_dir


# A random-init test network and a handful of images: a run that gets past the checks takes seconds.
TINY_RUN = ("--model", "test_efficientnet", "--pretrained", "false", "--freeze", "full", "--validation_size", "4",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--num_train_epochs", "1",
            "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none")
TINY_SAMPLE = ("--dataset", str(SAMPLE), "--max_train_samples", "8", "--max_eval_samples", "4", "--max_test_samples", "16")
CLASSES = ["cat", "dog"]


def run_command(*argv: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`hf-transfer train ...` in its own process, offline unless `env` says otherwise."""
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TRANSFER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hf_transfer.cli", "train", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def user_error(capsys, *argv: str) -> str:
    """Run `hf-transfer train ...` here; assert it stops with exit code 2 and no traceback; return the message."""
    from hf_transfer.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["train", *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert "Traceback" not in err
    message = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]  # after any progress bar
    assert len(message) == 1, err
    return message[0]


@pytest.fixture
def offline_hub(monkeypatch):
    """No Hub for this test: huggingface_hub answers as with HF_HUB_OFFLINE=1, and the reachability probe is reset."""
    monkeypatch.delenv("HF_TRANSFER_DEBUG", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    from hf_transfer import offline

    offline.hub_reachable.cache_clear()
    yield
    offline.hub_reachable.cache_clear()


def write_dataset(folder: Path, splits: dict[str, dict[str, list]], features: dict) -> str:
    """Write a Hub-layout parquet dataset; label values are stored as given, even out of the ClassLabel's range."""
    stored = {name: datasets.Value("int64") if isinstance(feature, datasets.ClassLabel) else feature
              for name, feature in features.items()}
    for split, columns in splits.items():
        table = datasets.Dataset.from_dict(columns, features=datasets.Features(stored)).data
        dataset = datasets.Dataset(table, info=datasets.DatasetInfo(features=datasets.Features(features)))
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return str(folder)


def photos(split: str, count: int, label: int | None = None) -> tuple[list[dict], list[int]]:
    rows = [row for row in sample_rows(split) if label is None or row["labels"] == label][:count]
    return [row["image"] for row in rows], [row["labels"] for row in rows]


def labelled(split: str, count: int, label: int | None = None) -> dict:
    images, labels = photos(split, count, label)
    return {"image": images, "labels": labels}


IMAGE, LABEL = datasets.Image(), datasets.ClassLabel(names=CLASSES)
