"""Backbone features of a dataset's splits, computed once per model, preprocessing and data, kept in the datasets cache.

The features are the input of the model's classifier (its pooled features). Keyed by model id, backbone weights,
preprocessing, dataset fingerprint, split, views and the precision of the pass (`precision.Precision`): a second
run (or `hf-transfer doctor`) skips extraction. Extraction runs in that precision (bf16 autocast and channels_last
on hardware that computes bf16 natively).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import set_seed

from .checksums import checksum
from .data import attach_transforms, collate
from .nodes import gather_rows, on_every_process, placement
from .precision import Precision

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the key names the precision of the pass; float32 storage where float16 would lose precision
KEY_FILE = "cache_key.json"  # written last: a folder without it is an unfinished extraction
FLOAT16_MAX = 65504.0
# Largest relative error (per image, L2) that float16 storage may add: its rounding is 2**-11 = 4.9e-4 per value in
# the normal range. Below 6.1e-5 values become subnormal and lose bits: pooled features of a random-init network
# (~1e-14) rounded to 0 and the cached head disagreed with the full model on 75% of test images.
FLOAT16_RTOL = 1e-3


def cache_root() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_transfer_features"


def weights_digest(model: nn.Module, head_name: str) -> str:
    """A hash of every backbone tensor (weights and BatchNorm statistics), head excluded."""
    return checksum({name: tensor for name, tensor in model.state_dict().items() if not name.startswith(head_name + ".")})


class FeatureCapture:
    """Records the input of `head` (the pooled backbone features) for every forward pass inside the block."""

    def __init__(self, head: nn.Module, gather=None):
        self.head, self.gather, self.batches = head, gather, []

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._record)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _record(self, _module, inputs):
        features = inputs[0].detach()
        if features.ndim != 2:
            raise RuntimeError(f"The head's input has shape {tuple(features.shape)}, not (batch, features): no pooled features to cache.")
        # Under several processes, gather in the same order as Trainer gathers the logits.
        self.batches.append((self.gather(features) if self.gather else features).float().cpu())

    def features(self) -> torch.Tensor:
        return torch.cat(self.batches)


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


class FeatureStore:
    """The features of each split of `data` for `model` (whose classifier is `head`), extracted on a miss."""

    def __init__(self, model: nn.Module, head: nn.Module, head_name: str, model_args, data, transforms, args, views: int = 0, *,
                 precision: Precision):
        self.model, self.head, self.data, self.args, self.views = model, head, data, args, views
        self.train_transform, self.eval_transform = transforms
        self.precision = precision  # the recipe's `inference_precision`, as resolved for this device and model
        self.summary = {"splits": {}, "precision": self.precision.dtype, "channels_last": self.precision.channels_last}
        self.extracted: dict[str, float] = {}  # split -> seconds, for splits this run computed and stored
        self.kept: dict[str, np.ndarray] = {}  # split -> the rows served (see `keep`)
        self.writer = placement(cache_root()).writer  # writes this machine's copy of the cache (every process asks)
        self.model_key = {
            "format": FORMAT_VERSION,
            "model": model_args.model,
            "revision": model_args.model_revision,
            "class": type(model).__name__,
            "weights": weights_digest(model, head_name),
            "columns": [data.image_column, data.label_column],
            "precision": self.precision.dtype,  # bf16 features differ from fp32 ones by up to a few percent
        }

    def key(self, split: str, views: int) -> dict:
        transform = self.train_transform if views else self.eval_transform
        return {
            **self.model_key,
            "transform": repr(transform),
            "views": views,
            "seed": self.args.seed if views else None,
            "dataset": self.data.splits[split]._fingerprint,
            "split": split,
        }

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cache_root() / f"{key['split']}-{digest}"

    def features(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's cached features, extracted first on a miss (train: K views when asked for)."""
        views = self.views if split == "train" else 0
        key = self.key(split, views)
        path = self.path(key)
        started = time.perf_counter()
        # A hit only when every machine's copy of the cache has the split (their fingerprints may differ): else all extract.
        if split not in self.extracted and on_every_process((path / KEY_FILE).is_file()):
            logger.info("feature cache hit: skipping extraction of %s (%s)", split, path)
        elif split not in self.extracted:
            self._extract(split, views, path, key)
            self.extracted[split] = time.perf_counter() - started
        features, labels = load(path)
        self._record(split, path, time.perf_counter() - started, features)
        if split in self.kept:  # the split as this run trains or tests on it, after the data doctor's exclusions
            return features[self.kept[split]], labels[self.kept[split]]
        return features, labels

    def keep(self, rows: dict[str, np.ndarray]) -> None:
        """Serve only `rows` of each split named (the images `exclude_flagged` left), from the whole split's cache entry:
        its key stays the data as loaded, so excluding images costs no second extraction."""
        self.kept.update(rows)

    def _record(self, split: str, path: Path, seconds: float, features: np.ndarray) -> None:
        """`seconds`: extraction (or, for a split saved from another pass, that pass) and loading; loading alone on a hit."""
        extracted = self.extracted.get(split)
        record = {
            "hit": extracted is None, "seconds": round(seconds if extracted is None else max(seconds, extracted), 2),
            "images": len(features), "views": features.shape[1], "dtype": str(features.dtype), "bytes": folder_size(path),
            "entry": path.name,  # under `cache_root()`: all_results.json is published, and names no local path
        }
        if extracted:
            record["images_per_second"] = round(len(features) * features.shape[1] / extracted, 1)
        self.summary["splits"][split] = record

    def _extract(self, split: str, views: int, path: Path, key: dict) -> None:
        """Each process extracts a contiguous shard; the shards are gathered in order over torch.distributed (machines
        need not share a disk) and each copy of the cache is stored by its one writer."""
        state = PartialState()
        transform = self.train_transform if views else self.eval_transform
        dataset = attach_transforms(self.data, transform, transform)[split]
        shard = dataset.shard(state.num_processes, state.process_index, contiguous=True) if state.num_processes > 1 else dataset
        loader = DataLoader(
            shard, batch_size=self.args.per_device_eval_batch_size, collate_fn=collate,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        started = time.perf_counter()
        per_view, labels = [], []
        self.model.eval()
        memory_format = torch.channels_last if self.precision.channels_last else torch.contiguous_format
        if self.precision.channels_last:
            self.model.to(memory_format=memory_format)  # exact; a run's model already is (precision.FrozenPasses)
        for view in range(max(views, 1)):
            if views:
                set_seed(self.args.seed + view)  # fixed views: the same crops and flips on every extraction
            description = f"Extracting {split} features" + (f" (view {view + 1}/{views})" if views else "")
            with FeatureCapture(self.head) as capture, torch.inference_mode(), self.precision.autocast():
                for batch in tqdm(loader, desc=description, disable=not state.is_main_process or self.args.disable_tqdm):
                    pixels = batch["pixel_values"].to(self.args.device, non_blocking=True)
                    if pixels.is_floating_point() and pixels.ndim == 4:  # uint8 images are resized first (`resize_on_device`)
                        pixels = pixels.contiguous(memory_format=memory_format)
                    self.model(pixel_values=pixels)
                    if view == 0:
                        labels.append(batch["labels"])
            per_view.append(capture.features())
        features = gather_rows(torch.stack(per_view, dim=1))
        labels = gather_rows(torch.cat(labels))
        if self.writer:  # one process per copy of the cache: each machine's own, or one for a shared filesystem
            store(path, features.numpy(), labels.numpy(), key)
        if state.is_main_process:
            seconds = time.perf_counter() - started
            logger.info(
                "feature cache: extracted %d %s image(s) x %d view(s) in %.1f s (%.1f images/s, %d process(es)) -> %s",
                len(features), split, max(views, 1), seconds, len(features) * max(views, 1) / seconds, state.num_processes, path,
            )
        state.wait_for_everyone()

    def has(self, split: str) -> bool:
        return on_every_process((self.path(self.key(split, 0)) / KEY_FILE).is_file())

    def save(self, split: str, features: np.ndarray, labels: np.ndarray, seconds: float) -> None:
        """Store un-augmented features computed in another pass (the full model's test pass, `seconds` long), once per
        copy of the cache."""
        if split in self.kept:  # a subset must not be stored under the whole split's key (the doctor cached it anyway)
            raise RuntimeError(f"The {split} features of a run with excluded images cannot be stored as the whole split's.")
        if self.writer:
            store(self.path(self.key(split, 0)), features[:, None, :], labels, self.key(split, 0))
        PartialState().wait_for_everyone()
        self.extracted[split] = seconds

    def total_size(self) -> None:
        self.summary["bytes"] = sum(split["bytes"] for split in self.summary["splits"].values())
