"""Shared fixtures: real photos from the repo's cats-vs-dogs sample and one trained quickstart model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
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
