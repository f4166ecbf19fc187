"""Backbone features of a dataset's splits, computed once per model, preprocessing and data, kept in the datasets cache.

The features are the input of the model's classifier (its pooled features). Keyed by model id, backbone weights,
preprocessing, dataset fingerprint, split, views and the precision of the pass (`precision.Precision`): a second run (or
`hf-transfer doctor`) skips extraction. Extraction runs in that precision (bf16 autocast and channels_last on hardware
that computes bf16 natively). The features of some rows of a split (`hf-transfer select`'s sample) are an entry of their
own, which a later extraction of the whole split reuses: those images pass through the model once. The cache is a folder
anyone with write access can change under its key: an entry read from it is checked first, every label against the
dataset and a seeded sample of its features against the model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .checksums import checksum
from .data import DecodedRows, SeededAugmentation, attach_transforms, collate
from .data.splits import label_values
from .errors import HFTransferError
from .feature_files import KEY_FILE, cache_root, folder_size, load, relative_errors, store
from .nodes import gather_rows, on_every_process, placement, raise_together
from .precision import Precision

logger = logging.getLogger(__name__)

# 2: the key names the precision of the pass; float32 storage where float16 would lose precision. 3: each augmented view is
# seeded per image (`SeededAugmentation`), so that a sample of it can be computed again to check an entry.
FORMAT_VERSION = 3

# Images of a split the model is checked on when its features come from the cache (a seeded sample, the same on every
# run with the same seed): a wrong cache (another model or preprocessing) differs on every image, and 64 images cost
# about a second of a 2-core CPU at Lite0's bf16 extraction rate (66 images/s at load average 4-5.6).
CHECK_IMAGES = 64
# Per-image relative error ||full - cached|| / ||cached|| of the head's input features above which the full model and
# the cache do not hold the same image's features. Measured on Lite0 and the cats-vs-dogs sample: bf16 passes with other
# batch sizes or thread counts give identical features (0), a bf16 and an fp32 pass differ by at most 0.07; a cache
# made without the centre crop differs by 0.37 (median), from ImageNet's instead of Lite0's normalisation by 0.53,
# another image's features by 1.2. Logits are compared too, but only to report flips: a near-tie flips under any noise.
FEATURE_RTOL = 0.2
ROWS_SUFFIX = re.compile(r"\.rows-[0-9a-f]{16}")  # an entry of some rows of a split: `<the split's entry>.rows-<their digest>`


class FeatureCacheMismatchError(HFTransferError, RuntimeError):
    """Cached features that are not this model's on this data: other labels, other features, or other predictions."""


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


def check_sample(images: int, seed: int) -> np.ndarray:
    """The rows of a split the model is checked on: CHECK_IMAGES of them, seeded, in order."""
    if images <= CHECK_IMAGES:
        return np.arange(images)
    return np.sort(np.random.default_rng(seed).choice(images, CHECK_IMAGES, replace=False))


@contextlib.contextmanager
def _random_state_kept():
    """The random generators as they were: reading the cache (hit or miss) must not change what training draws next."""
    python, legacy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python)
    np.random.set_state(legacy)


class FeatureStore:
    """The features of each split of `data` for `model` (whose classifier is `head`), extracted on a miss."""

    def __init__(self, model: nn.Module, head: nn.Module, head_name: str, model_args, data, transforms, args, views: int = 0, *,
                 precision: Precision):
        self.model, self.head, self.data, self.args, self.views = model, head, data, args, views
        self.train_transform, self.eval_transform = transforms
        self.precision = precision  # the recipe's `inference_precision`, as resolved for this device and model
        self.summary = {"splits": {}, "precision": self.precision.dtype, "channels_last": self.precision.channels_last}
        self.extracted: dict[str, float] = {}  # split -> seconds, for splits this run computed and stored
        self.computed: dict[str, int] = {}  # split -> images this run passed through the model to store it
        self.reused: dict[str, int] = {}  # split -> images whose features came from an entry of some of its rows
        self.kept: dict[str, np.ndarray] = {}  # split -> the rows served (see `keep`)
        self.checked: set[Path] = set()  # entries read from the cache and checked (`_check`)
        self.checked_by_caller: set[str] = set()  # splits whose features the run checks against the model itself
        self.decoded: dict[str, dict[int, object]] = {}  # split -> row -> its image, decoded once for every store (`select`)
        self.batch_seconds: list[float] = []  # the forward time of each full batch passed (`select`'s images/s)
        self.writer = placement(cache_root()).writer  # writes this machine's copy of the cache (every process asks)
        self.model_key = {
            "format": FORMAT_VERSION, "model": model_args.model, "revision": model_args.model_revision, "class": type(model).__name__,
            "weights": weights_digest(model, head_name), "columns": [data.image_column, data.label_column],
            "precision": self.precision.dtype,  # bf16 features differ from fp32 ones by up to a few percent
        }

    def with_views(self, views: int) -> FeatureStore:
        """The same model, data and preprocessing, caching `views` views of the train split (0: the images as they are),
        with a record of its own: the data doctor's view of a run's store."""
        sibling = copy.copy(self)
        sibling.views, sibling.extracted, sibling.summary = views, {}, {"splits": {}}
        sibling.computed, sibling.reused, sibling.batch_seconds = {}, {}, []
        return sibling

    def key(self, split: str, views: int) -> dict:
        return {**self.model_key, "transform": repr(self.train_transform if views else self.eval_transform), "views": views,
                "seed": self.args.seed if views else None, "dataset": self.data.splits[split]._fingerprint, "split": split}

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cache_root() / f"{key['split']}-{digest}"

    def rows_path(self, path: Path, rows: np.ndarray) -> Path:
        """The entry of `rows` of the split whose whole entry is `path`."""
        digest = hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]
        return path.with_name(f"{path.name}.rows-{digest}")

    def features(self, split: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The split's cached features, extracted first on a miss (train: K views when asked for); checked on a hit.

        `rows` (sorted, distinct): only the un-augmented features of these rows, read from the whole split's entry when
        there is one, else from an entry of their own (extracted on a miss), which a later extraction of the whole split
        reuses."""
        views = self.views if split == "train" else 0
        key = self.key(split, views)
        path = self.path(key)
        if rows is not None and not np.array_equal(rows, np.arange(len(self.data.splits[split]))):
            rows = np.asarray(rows, dtype=np.int64)
            if views or np.any(np.diff(rows) <= 0):
                raise ValueError("Rows of a split are served un-augmented, in increasing order, each once.")
            if split in self.extracted or on_every_process((path / KEY_FILE).is_file()):
                features, labels = self._entry(split, views, path, key)
                return features[rows], labels[rows]
            return self._entry(split, views, self.rows_path(path, rows), {**key, "rows": rows.tolist()}, rows)
        return self._entry(split, views, path, key)

    def _entry(self, split: str, views: int, path: Path, key: dict, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The features of the entry at `path` (of `rows` of the split, or of all of it), extracted on a miss, checked on a hit."""
        started = time.perf_counter()
        # A hit only when every machine's copy of the cache has the split (their fingerprints may differ): else all extract.
        hit = split not in self.extracted and on_every_process((path / KEY_FILE).is_file())
        if hit:
            logger.info("feature cache hit: skipping extraction of %s (%s)", split, path)
        elif split not in self.extracted:
            self._extract(split, views, path, key, rows)
            self.extracted[split] = time.perf_counter() - started
        features, labels = load(path)
        if hit and path not in self.checked:  # each machine checks its own copy; a failure on one stops them all
            raise_together(self._check, split, views, path, features, labels, rows)
            self.checked.add(path)
        self._record(split, path, time.perf_counter() - started, features)
        if split in self.kept:  # the split as this run trains or tests on it, after the data doctor's exclusions
            return features[self.kept[split]], labels[self.kept[split]]
        return features, labels

    def _check(self, split: str, views: int, path: Path, features: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Every label of the entry against the dataset's, and the features of CHECK_IMAGES seeded images (each in one seeded
        view) against the model's own: an entry changed under its key (flipped labels trained a 0%-accuracy model) stops the
        run. The test split's features are left to the run's own check when it has one (`checked_by_caller`). `rows`: the rows of
        the split an entry of some rows holds."""
        started = time.perf_counter()
        fix = (f"Delete {path.name} in {cache_root()} (the next run extracts it again), or set `feature_cache: false`.")
        expected = np.asarray(label_values(self.data.splits[split], self.data.label_column), dtype=np.int64)
        expected = expected if rows is None else expected[rows[rows < len(expected)]]
        wrong = int((labels != expected).sum()) if labels.shape == expected.shape else len(expected)
        if wrong:
            raise FeatureCacheMismatchError(f"The cached {split} features hold other labels than the dataset for {wrong} of "
                                            f"{len(expected)} images, so they are not this data's. {fix}")
        record = {"labels": len(expected)}
        if split not in self.checked_by_caller:
            sample = check_sample(len(labels), self.args.seed)
            seen = np.random.default_rng(self.args.seed).integers(max(views, 1), size=len(sample))  # the view checked per image
            computed = self._sample(split, views, sample if rows is None else rows[sample], seen)
            shape_ok = features.shape[1:] == (max(views, 1), computed.shape[-1])
            errors = relative_errors(computed, features[sample, seen].astype(np.float32)) if shape_ok else np.full(len(sample), np.inf)
            mismatched = int((errors > FEATURE_RTOL).sum())
            record.update(images=len(sample), mismatched=mismatched, max_feature_error=float(errors.max()) if len(sample) else 0.0)
            if mismatched:
                raise FeatureCacheMismatchError(
                    f"The cached {split} features are not this model's: on {mismatched} of {len(sample)} checked images they differ "
                    f"from the model's own features of the same image{' and view' if views else ''} by more than {FEATURE_RTOL} "
                    f"(relative error up to {errors.max():.2f}). {fix}")
        self.summary.setdefault("checks", {})[split] = {**record, "seconds": round(time.perf_counter() - started, 2)}

    def _sample(self, split: str, views: int, rows: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """The model's features of `rows` of `split`, row i in view `seen[i]` (the un-augmented image when `views` is 0)."""
        transform = self.train_transform if views else self.eval_transform
        dataset = attach_transforms(self.data, transform, transform)[split]
        computed = None
        with _random_state_kept():
            for view in np.unique(seen):
                chosen = np.flatnonzero(seen == view)
                source = SeededAugmentation(dataset, self.args.seed, int(view)) if views else dataset
                loader = DataLoader(Subset(source, rows[chosen].tolist()), batch_size=self.args.per_device_eval_batch_size,
                                    collate_fn=collate)
                features, _ = self._pass(loader, disable=True)
                computed = np.zeros((len(rows), features.shape[-1]), np.float32) if computed is None else computed
                computed[chosen] = features.numpy()
        return computed if computed is not None else np.zeros((0, 0), np.float32)

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
        if split in self.reused:  # the rest came from an earlier extraction of some of the split's rows
            record.update(reused_images=self.reused[split], extracted_images=self.computed[split])
        if extracted:
            record["images_per_second"] = round(self.computed.get(split, len(features)) * features.shape[1] / extracted, 1)
        self.summary["splits"][split] = record

    def _extract(self, split: str, views: int, path: Path, key: dict, rows: np.ndarray | None = None) -> None:
        """Each process extracts a contiguous shard of `rows` (default: the whole split); the shards are gathered in order
        over torch.distributed (machines need not share a disk) and each copy of the cache is stored by its one writer.
        The whole split, un-augmented, in one process: the rows that entries of some of its rows hold are read from them."""
        state = PartialState()
        transform = self.train_transform if views else self.eval_transform
        dataset = attach_transforms(self.data, transform, transform)[split]
        wanted = np.arange(len(dataset)) if rows is None else rows
        reused_rows, reused_features, reused_labels = np.zeros(0, dtype=np.int64), None, None
        if rows is None and not views and state.num_processes == 1:  # several processes: each would read its own copies
            reused_rows, reused_features, reused_labels = self._reusable(split, path)
        todo = np.setdiff1d(wanted, reused_rows) if len(reused_rows) else wanted
        # The rows `datasets.Dataset.shard(contiguous=True)` gives this process.
        shard = np.array_split(todo, state.num_processes)[state.process_index].tolist()
        started = time.perf_counter()
        per_view, labels = [], None
        with _random_state_kept():
            for view in range(max(views, 1) if len(todo) else 0):
                # Augmented views: each image seeded on its own, the same crops and flips on every extraction and check.
                source = (Subset(SeededAugmentation(dataset, self.args.seed, view), shard) if views
                          else self._rows(split, dataset, shard, transform))
                loader = DataLoader(source, batch_size=self.args.per_device_eval_batch_size, collate_fn=collate,
                                    num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
                description = f"Extracting {split} features" + (f" (view {view + 1}/{views})" if views else "")
                features, view_labels = self._pass(loader, description, disable=not state.is_main_process or self.args.disable_tqdm)
                per_view.append(features)
                labels = view_labels if labels is None else labels
        if len(todo):
            features, labels = gather_rows(torch.stack(per_view, dim=1)).numpy(), gather_rows(labels).numpy()
        else:  # every row came from entries of some rows
            features, labels = np.zeros((0, 1, reused_features.shape[-1]), np.float32), np.zeros(0, np.int64)
        self.computed[split] = len(features)
        if len(reused_rows):
            self.reused[split] = len(reused_rows)
            whole, whole_labels = np.zeros((len(dataset), *features.shape[1:]), np.float32), np.zeros(len(dataset), np.int64)
            whole[todo], whole_labels[todo] = features, labels
            whole[reused_rows], whole_labels[reused_rows] = reused_features, reused_labels
            features, labels = whole, whole_labels
        if self.writer:  # one process per copy of the cache: each machine's own, or one for a shared filesystem
            store(path, features, labels, key)
        if state.is_main_process:
            seconds = time.perf_counter() - started
            logger.info("feature cache: extracted %d %s image(s) x %d view(s) in %.1f s (%.1f images/s, %d process(es)) -> %s",
                        len(todo), split, max(views, 1), seconds, len(todo) * max(views, 1) / seconds, state.num_processes, path)
            if len(reused_rows):
                logger.info("feature cache: %d more %s image(s) read from entries of some of its rows (hf-transfer select)",
                            len(reused_rows), split)
        state.wait_for_everyone()

    def _rows(self, split: str, dataset, shard: list[int], transform) -> Dataset:
        """`shard` of the split's dataset (with `transform`), from the images `decoded` holds when it holds every one."""
        decoded = self.decoded.get(split, {})
        if shard and all(row in decoded for row in shard):
            labels = label_values(self.data.splits[split], self.data.label_column)
            return DecodedRows([decoded[row] for row in shard], [labels[row] for row in shard], transform)
        return dataset.select(shard) if len(shard) < len(dataset) else dataset

    def _reusable(self, split: str, path: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`(rows, features (rows, 1, dim), labels)` of the split whose whole entry is `path`, from the entries of some of its
        rows (`features(split, rows)`), each checked as a hit is (labels, and a seeded sample against the model)."""
        found: dict[int, tuple[np.ndarray, int]] = {}
        for entry in sorted(path.parent.glob(f"{path.name}.rows-*")):
            if not ROWS_SUFFIX.fullmatch(entry.name[len(path.name):]) or not (entry / KEY_FILE).is_file():
                continue  # not an entry of rows, or one being written
            rows = np.asarray(json.loads((entry / KEY_FILE).read_text()).get("rows") or [], dtype=np.int64)
            if self.rows_path(path, rows) != entry or not len(rows) or rows.min() < 0 or rows.max() >= len(self.data.splits[split]):
                continue  # its record names other rows than its name, or rows the split does not have
            features, labels = load(entry)
            self._check(split, 0, entry, features, labels, rows)
            for position, row in enumerate(rows.tolist()):
                found.setdefault(row, (features[position], int(labels[position])))
        if not found:
            return np.zeros(0, dtype=np.int64), None, None
        rows = np.asarray(sorted(found), dtype=np.int64)
        return rows, np.stack([found[row][0] for row in rows.tolist()]), np.asarray([found[row][1] for row in rows.tolist()])

    def _pass(self, loader: DataLoader, description: str = "", disable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's input features (float32, CPU) and the labels of every batch of `loader`, in the run's precision."""
        self.model.eval()
        memory_format = torch.channels_last if self.precision.channels_last else torch.contiguous_format
        if self.precision.channels_last:
            self.model.to(memory_format=memory_format)  # exact; a run's model already is (precision.FrozenPasses)
        labels = []
        with FeatureCapture(self.head) as capture, torch.inference_mode(), self.precision.autocast():
            for batch in tqdm(loader, desc=description, disable=disable):
                pixels = batch["pixel_values"].to(self.args.device, non_blocking=True)
                if pixels.is_floating_point() and pixels.ndim == 4:  # uint8 images are resized first (`resize_on_device`)
                    pixels = pixels.contiguous(memory_format=memory_format)
                started = time.perf_counter()
                self.model(pixel_values=pixels)  # the capture's copy to the CPU waits for the device
                if len(pixels) == self.args.per_device_eval_batch_size:
                    self.batch_seconds.append(time.perf_counter() - started)
                labels.append(batch["labels"])
        return capture.features(), torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)

    def has(self, split: str) -> bool:
        return on_every_process((self.path(self.key(split, 0)) / KEY_FILE).is_file())

    def save(self, split: str, features: np.ndarray, labels: np.ndarray, seconds: float) -> None:
        """Store un-augmented features computed in another pass (the full model's test pass, `seconds` long), once per copy of the cache."""
        if split in self.kept:  # a subset must not be stored under the whole split's key (the doctor cached it anyway)
            raise RuntimeError(f"The {split} features of a run with excluded images cannot be stored as the whole split's.")
        if self.writer:
            store(self.path(self.key(split, 0)), features[:, None, :], labels, self.key(split, 0))
        PartialState().wait_for_everyone()
        self.extracted[split] = seconds

    def total_size(self) -> None:
        self.summary["bytes"] = sum(split["bytes"] for split in self.summary["splits"].values())
