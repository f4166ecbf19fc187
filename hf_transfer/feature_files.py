"""One entry of the feature cache on disk: a datasets folder of features and labels, float16 where that keeps every image's
features, written to a staging folder and renamed into place with its key written last."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np

KEY_FILE = "cache_key.json"  # written last: a folder without it is an unfinished extraction
FLOAT16_MAX = 65504.0
# Largest relative error (per image, L2) that float16 storage may add: its rounding is 2**-11 = 4.9e-4 per value in
# the normal range. Below 6.1e-5 values become subnormal and lose bits: pooled features of a random-init network
# (~1e-14) rounded to 0 and the cached head disagreed with the full model on 75% of test images.
FLOAT16_RTOL = 1e-3


def cache_root() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_transfer_features"


def relative_errors(approximate: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per image (rows of `(images, ..., dim)`): ||approximate - exact|| / max(||approximate||, ||exact||); 0 where both are 0."""
    approximate, exact = (np.asarray(array, dtype=np.float64).reshape(len(array), -1) for array in (approximate, exact))
    scale = np.maximum(np.linalg.norm(approximate, axis=1), np.linalg.norm(exact, axis=1))
    difference = np.linalg.norm(approximate - exact, axis=1)
    return np.divide(difference, scale, out=np.zeros_like(difference), where=scale > 0)


def storage_dtype(features: np.ndarray) -> str:
    """float16 where it keeps every image's features to FLOAT16_RTOL; float32 otherwise (overflow, tiny values)."""
    if not len(features) or not np.isfinite(features).all() or np.abs(features).max() >= FLOAT16_MAX:
        return "float32" if len(features) else "float16"
    return "float16" if relative_errors(features.astype(np.float16), features).max() <= FLOAT16_RTOL else "float32"


def store(path: Path, features: np.ndarray, labels: np.ndarray, key: dict) -> None:
    """Write `(images, views, dim)` features as a datasets folder, in `storage_dtype`."""
    dtype = storage_dtype(features)
    stored = features.astype(dtype)
    schema = datasets.Features({"features": datasets.Array2D(stored.shape[1:], dtype), "labels": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"features": stored, "labels": labels.astype(np.int64)}, features=schema)
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    rounding = float(np.abs(stored.astype(np.float32) - features).max()) if len(features) else 0.0
    relative = float(relative_errors(stored, features).max()) if len(features) else 0.0
    record = {**key, "dtype": dtype, "shape": list(stored.shape), "max_rounding_error": rounding, "max_relative_rounding_error": relative}
    (staging / KEY_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = datasets.load_from_disk(str(path)).data
    features = np.concatenate([chunk.to_numpy(zero_copy_only=False) for chunk in table.column("features").chunks])
    return features, table.column("labels").to_numpy().copy()  # writable, for torch


def folder_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
