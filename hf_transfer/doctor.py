"""Check a dataset before training: label issues, copies and leaks, class balance, from cached backbone features.

`hf-transfer doctor RECIPE.yaml` (and a run whose features are cached, unless `data_doctor: false`) reads the backbone's
pooled features of every split from the feature cache (extracting them on a miss), and writes `data_report.json` and a
contact sheet of the top suspects (`data_suspects.png`). Nothing is dropped or relabelled unless `exclude_flagged` says so.

- Label issues: out-of-fold class probabilities of a logistic-regression probe (stratified K-fold, seeded) on the features
  of all splits together, passed to `cleanlab.filter.find_label_issues`; ranked by cleanlab's self-confidence score.
- Copies: two signals. Cosine similarity of power-normalised features (signed square root, then unit length) at or above
  `doctor_duplicate_threshold`, unless that threshold means nothing on this data (too many images have a neighbour
  above it: images unlike the backbone's, which all look alike to it); and a perceptual hash of the grayscale image
  (`imagehash.phash`), which colour mode, re-encoding and resizing barely move. Pairs within one split are
  near-duplicates, pairs across splits leaks; pairs join into groups (a copy of a copy is a copy). A group whose images
  carry more than one label is a label problem too.
- Class balance: images per class per split, and training classes with fewer than `doctor_min_class_images`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import set_seed

from .cached_head import head_module
from .data import PreparedData, _local_root, load_image_dataset, shareable_name
from .device_resize import transforms_for_run
from .errors import DoctorError
from .escape import one_line, plot_text
from .feature_store import FeatureStore
from .freezing import discover_blocks
from .models import data_config, load_model
from .options import EXCLUDE_CHOICES, REPORT_OPTIONS, SPLIT_ORDER, DoctorArguments
from .precision import resolve
from .repo_files import DATA_REPORT, DATA_SUSPECTS_PNG, shareable_path, without_local_paths

logger = logging.getLogger(__name__)

# Every pair is compared up to this many images (4,020 Lite0 features: 0.4 s on 2 busy cores). Beyond, all pairs cost
# n^2 x dim (CIFAR-10's 60,000 x 1280: 128 s) and an inverted-file index compares each image with those in 8 of sqrt(n)
# cells instead: 29 s, and 811 of the 813 pairs the exhaustive search finds (benchmarks/doctor.py --check-ivf).
EXACT_PAIRS_UP_TO = 10_000
IVF_PROBES = 8
# The probe's inverse regularisation: on Lite0 features of the cats-vs-dogs mirror with 2% of the labels flipped, C=0.01 puts
# 74 of the 80 flipped labels in the top 80, C=0.1 65 and C=1 61 (benchmarks/doctor.py --probe-c).
PROBE_C = 0.01
# Below this out-of-fold probe accuracy the summary warns that flagged labels are mostly hard images: with Lite0 on
# CIFAR-10 (78%) only 15% of the flagged images were planted flips, against 87% on cats vs dogs (99.3%) (benchmarks/doctor.py).
WEAK_PROBE = 0.9
NEIGHBOURS = 20  # each image's most similar images that are checked: bounds memory when thousands of copies exist
# The features stop telling copies apart when more than this share of the images has a neighbour at or above the
# threshold: 0.1% on the cats-vs-dogs mirror, 0.5% on 11,000 CIFAR-10 images, 100% on noise images (which gave 20,705
# false leaks); above it, copies come from the perceptual hash alone (benchmarks/doctor.py --dataset noise).
MAX_SHARE_ABOVE_THRESHOLD = 0.1
# Hamming distance of two 64-bit pHashes at or below which the images are copies. On the cats-vs-dogs mirror copies in
# CMYK, grayscale, palette, RGBA and 16-bit, at half the side or JPEG 30 are within 4 (most 0 or 2), distinct photos at
# 10 or more; on CIFAR-10's 32 px images 401 pairs are within 4, 5 of them with different labels (benchmarks/doctor.py).
HASH_RADIUS = 4
HASH_DECODE_SIDE = 128  # JPEGs decode at 1/2-1/8 scale down to this side: a 4000 px photo in ms; the hash moves by 0-2 bits
EXHAUSTIVE_HASHES_UP_TO = 100_000  # distinct hashes compared all with all (CIFAR-10's 60,000: 3 s, 16 s on 2 busy cores)


# --- features ---------------------------------------------------------------------------------------------------------
def split_features(recipe, data: PreparedData | None = None, store: FeatureStore | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{split: (features (images, dim) float32, labels)}`: the backbone's un-augmented pooled features of every split,
    read from the feature cache, extracted into it on a miss (the same cache entries a `head_only` run reads).

    In a run, pass its `store`; alone (`hf-transfer doctor`), the data and model are loaded as a run loads them."""
    return _features(recipe, data, store)[0]


def _features(recipe, data: PreparedData | None, store: FeatureStore | None) -> tuple[dict, dict]:
    """`split_features`, and the store's record of each split (cache hit, seconds)."""
    if store is not None:
        return _store_features(store)
    args = copy.copy(recipe.training)
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    if data is None:
        with args.main_process_first(desc="dataset preparation"):
            data = load_image_dataset(recipe.data, seed=args.seed)
    set_seed(args.seed)  # as a run does before it loads the model: a `pretrained: false` model gets the run's weights
    model, image_processor = load_model(recipe.model, data.labels)
    train_transform, eval_transform, device_step = transforms_for_run(recipe.data, data, data_config(model, image_processor), args.device)
    model.to(args.device)
    hook = device_step.attach(model) if device_step else None  # small images of one size: resized on the device, as in a run
    try:
        return _store_features(doctor_store(recipe, data, model, (train_transform, eval_transform), args))
    finally:
        if hook:
            hook.remove()


def doctor_store(recipe, data: PreparedData, model, transforms, args) -> FeatureStore:
    """A feature store of un-augmented features for `model` (on its device, with any device-resize hook attached) and the
    run's `(train, eval)` transforms: the entries a `head_only` run of the same recipe reads."""
    found = head_module(model, sorted(discover_blocks(model)[-1].parameter_names))
    if found is None:
        raise DoctorError(f"The data doctor needs the pooled features that feed the classifier of `{recipe.model.model}`, but its head's "
                          "parameters do not form one module. Choose another model, or set `data_doctor: false`.")
    head_name, head = found
    precision = resolve(recipe.run.inference_precision, args.device, model, fp16=args.fp16)  # as a run of the recipe decides
    return FeatureStore(model, head, head_name, recipe.model, data, transforms, args, precision=precision)


def _store_features(store: FeatureStore) -> tuple[dict, dict]:
    if store.views:  # a run that trains on augmented views: the doctor looks at the images as they are
        store = copy.copy(store)
        store.views, store.summary, store.extracted = 0, {"splits": {}}, {}  # a record of its own
    found = {}
    for split in store.data.splits:
        features, labels = store.features(split)
        found[split] = (features[:, 0].astype(np.float32), labels)
    return found, {split: {"hit": record["hit"], "seconds": record["seconds"]} for split, record in store.summary["splits"].items()}


# --- the checks (numpy in, plain Python out) --------------------------------------------------------------------------
def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 42) -> np.ndarray:
    """`(images, classes present)` probabilities, each image's from a probe that never saw it: standardised features and a
    multinomial logistic regression (scikit-learn), stratified K-fold, seeded. Columns follow `np.unique(labels)`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # tol 1e-3, 100 iterations: on all 60,000 CIFAR-10 features 28 s instead of 64 s (1e-4, 300), the same accuracy and ranking.
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=100, tol=1e-3))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # One BLAS thread: on a busy 2-core machine the 5 folds on all 60,000 CIFAR-10 images took 64 s with 1 thread, 321 s with 2.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)  # the ranking, not the optimum, is what counts
        return cross_val_predict(probe, features, labels, cv=splitter, method="predict_proba")


def find_label_issues(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 42) -> dict:
    """Images whose given label is likely wrong, most likely first: `{"ranked": [(image, suggested, its probability,
    label quality)], "checked": mask, "skipped_classes": [...]}`. Label quality is cleanlab's self-confidence (the probe's
    probability of the given label): lower is more suspect. Classes with fewer than `folds` images are not checked
    (their images are left out of the probe too): the probe could not learn them out of fold."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    classes, counts = np.unique(labels, return_counts=True)
    kept_classes = classes[counts >= folds]
    checked = np.isin(labels, kept_classes)
    result = {"ranked": [], "checked": checked, "skipped_classes": [int(c) for c in classes[counts < folds]], "probe_accuracy": None}
    if len(kept_classes) < 2:
        return result
    compact = np.searchsorted(kept_classes, labels[checked])
    probabilities = out_of_fold_probabilities(features[checked], compact, folds, seed)
    issues = cleanlab_issues(compact, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(compact, probabilities, method="self_confidence")
    rows = np.flatnonzero(checked)
    suggested = probabilities.argmax(axis=1)
    result["probe_accuracy"] = float(np.mean(suggested == compact))  # out of fold, against the given labels
    result["ranked"] = [
        (int(rows[i]), int(kept_classes[suggested[i]]), float(probabilities[i, suggested[i]]), float(quality[i])) for i in issues
    ]
    return result


def power_normalised(features: np.ndarray) -> np.ndarray:
    """Signed square root, then unit length: damps the few large activations that dominate raw pooled features, which
    separates copies from distinct photos better (Lite0, cats vs dogs, at 0.90: copies resized to half the side 63% found
    against 25% on raw features, JPEG-30 re-encodes 100% against 88%; closest distinct photos 0.889 against 0.880)."""
    rooted = np.sign(features) * np.sqrt(np.abs(features, dtype=np.float32))
    return rooted / np.maximum(np.linalg.norm(rooted, axis=1, keepdims=True), 1e-12)


def similar_pairs(features: np.ndarray, threshold: float, neighbours: int = NEIGHBOURS,
                  exact_up_to: int = EXACT_PAIRS_UP_TO, seed: int = 42) -> np.ndarray:
    """Pairs `(i, j, cosine)` with i < j and cosine similarity of power-normalised features >= threshold, most similar
    first, from each image's `neighbours` most similar images (`nearest_neighbours`)."""
    unit = np.ascontiguousarray(power_normalised(features), dtype=np.float32)
    if len(unit) < 2:
        return np.zeros((0, 3))
    return _pairs_at(*nearest_neighbours(unit, neighbours, exact_up_to, seed), threshold)


def nearest_neighbours(unit: np.ndarray, neighbours: int = NEIGHBOURS, exact_up_to: int = EXACT_PAIRS_UP_TO,
                       seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """`(similarity, found)`, each `(images, neighbours + 1)`: every row's most similar rows of `unit` (unit-length
    vectors, at least 2), itself included, by inner product (faiss). Up to `exact_up_to` images every pair is compared
    (`IndexFlatIP`); beyond, an inverted-file index (`IndexIVFFlat`, sqrt(n) k-means cells, 8 searched per image)
    compares each image with the images of its 8 nearest cells, at full width. `found` is -1 where fewer were found."""
    import faiss

    count, width = unit.shape
    if count > exact_up_to:
        cells = int(math.sqrt(count))  # faiss wants >= 39 training points per cell: true from 1,521 images on
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.niter = seed, 10
        # k-means on 64 images per cell, 10 rounds: 1.4 s instead of 12 s on all 60,000 CIFAR-10 images, 25 rounds
        sample = np.random.default_rng(seed).choice(count, min(count, 64 * cells), replace=False)
        index.train(unit[np.sort(sample)])
        index.nprobe = min(IVF_PROBES, cells)
    else:
        index = faiss.IndexFlatIP(width)
    index.add(unit)
    return index.search(unit, min(neighbours + 1, count))  # +1: an image finds itself (or a tie with a copy)


def _pairs_at(similarity: np.ndarray, found: np.ndarray, threshold: float) -> np.ndarray:
    """The `(i, j, cosine)` pairs (i < j, most similar first) of a neighbour search at or above `threshold`."""
    rows = np.repeat(np.arange(len(found)), found.shape[1])
    similarity, found = similarity.ravel(), found.ravel()
    keep = (similarity >= threshold) & (found != rows) & (found >= 0)
    pairs = np.sort(np.stack([rows[keep], found[keep]], axis=1), axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # (i, j) and (j, i) once
    similarity = np.minimum(similarity[keep][first].astype(np.float64), 1.0)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -similarity))  # most similar first; ties in index order
    return np.column_stack([pairs[order], similarity[order]])


def image_hashes(data: PreparedData) -> dict[str, np.ndarray]:
    """Split -> `(images, 8)` uint8: each image's 64-bit perceptual hash (`imagehash.phash`: the 8 x 8 lowest DCT
    frequencies of the grayscale image at 32 x 32) of the image as a run decodes it. Computed with `datasets.map`, so
    the datasets cache keeps them by the split's fingerprint: a second check reads them back."""
    found = {}
    for split, rows in data.splits.items():
        hashed = rows.select_columns([data.image_column]).map(
            _hash_batch, batched=True, batch_size=256, fn_kwargs={"column": data.image_column}, remove_columns=[data.image_column],
            features=datasets.Features({"phash": datasets.Value("binary")}), desc=f"Hashing {split} images",
        )
        found[split] = np.frombuffer(b"".join(hashed["phash"]), dtype=np.uint8).reshape(len(rows), 8)
    return found


def _hash_batch(batch: dict, column: str) -> dict:
    return {"phash": [image_hash(cell) for cell in batch[column]]}


def image_hash(cell: dict) -> bytes:
    """The 8-byte pHash of an image cell (`{"bytes", "path"}`), decoded as `images.load_image` decodes it."""
    import imagehash
    from PIL import Image

    from .images import load_image

    with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]) as image:
        image.draft("RGB", (HASH_DECODE_SIDE, HASH_DECODE_SIDE))  # JPEG only; others decode whole
        return np.packbits(imagehash.phash(load_image(image)).hash).tobytes()


def hash_pairs(hashes: np.ndarray, radius: int = HASH_RADIUS, candidates: np.ndarray | None = None,
               exhaustive_up_to: int = EXHAUSTIVE_HASHES_UP_TO) -> np.ndarray:
    """Pairs `(i, j)`, i < j, of rows of `hashes` (`(images, 8)` uint8) within Hamming distance `radius`. Rows with the
    very same hash are each paired with the first of them only (thousands of blank images stay thousands of pairs); the
    distinct hashes are compared all with all up to `exhaustive_up_to` of them (faiss `IndexBinaryFlat`, O(n^2)), and
    beyond only as the `candidates` pairs (the feature neighbours) ask."""
    import faiss

    count = len(hashes)
    _, first, inverse = np.unique(np.ascontiguousarray(hashes).view(np.uint64).ravel(), return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    repeated = np.flatnonzero(first[inverse] != np.arange(count))
    found = [np.stack([first[inverse[repeated]], repeated], axis=1)]
    if len(first) <= exhaustive_up_to:
        index = faiss.IndexBinaryFlat(64)
        distinct = np.ascontiguousarray(hashes[first])
        index.add(distinct)
        limits, _, near = index.range_search(distinct, radius + 1)  # faiss keeps distances below its radius
        found.append(first[np.stack([np.repeat(np.arange(len(first)), np.diff(limits).astype(np.int64)), near.astype(np.int64)], axis=1)])
    elif candidates is not None:
        near = first[inverse[candidates]]  # each candidate as the first row of its hash
        found.append(near[hamming(hashes[near[:, 0]], hashes[near[:, 1]]) <= radius])
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0).reshape(-1, 2)


def hamming(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bits that differ between rows of two `(n, 8)` uint8 hash arrays."""
    return np.unpackbits(np.bitwise_xor(first, second), axis=1).sum(axis=1).astype(np.int64)


def find_copies(features: np.ndarray, hashes: np.ndarray | None, threshold: float, seed: int = 42,
                neighbours: int = NEIGHBOURS, exact_up_to: int = EXACT_PAIRS_UP_TO) -> dict:
    """Copies among the rows: `pairs` `(i, j)` (i < j, most similar first) with their `cosine` and `hash_distance` (-1
    without hashes), `group` (each row's group of copies, transitively; -1 for a row with none) and how the features
    were judged (`calibration`).

    A pair is a copy when its features are at or above `threshold` (only where the features tell images apart: at most
    MAX_SHARE_ABOVE_THRESHOLD of the rows have a neighbour that close), or its hashes within HASH_RADIUS bits."""
    unit = np.ascontiguousarray(power_normalised(features), dtype=np.float32)
    count = len(unit)
    found_pairs, calibration = [np.zeros((0, 2), dtype=np.int64)], {"images": count}
    candidates = None
    if count >= 2:
        similarity, found = nearest_neighbours(unit, neighbours, exact_up_to, seed)
        others = (found != np.arange(count)[:, None]) & (found >= 0)
        nearest = np.where(others, similarity, -np.inf).max(axis=1)
        share = float(np.mean(nearest >= threshold))
        meaningful = share <= MAX_SHARE_ABOVE_THRESHOLD
        calibration.update(features_meaningful=meaningful, share_with_a_neighbour_above_threshold=round(share, 4),
                           median_nearest_neighbour=round(float(np.median(nearest[np.isfinite(nearest)])), 4))
        if meaningful:
            found_pairs.append(_pairs_at(similarity, found, threshold)[:, :2].astype(np.int64))
        candidates = np.stack([np.repeat(np.arange(count), found.shape[1]), found.ravel()], axis=1)
        candidates = candidates[others.ravel()]
    else:
        calibration.update(features_meaningful=True, share_with_a_neighbour_above_threshold=0.0, median_nearest_neighbour=None)
    calibration.update(hash="imagehash.phash (64 bits, grayscale)" if hashes is not None else None, hash_radius=HASH_RADIUS)
    if hashes is not None:
        found_pairs.append(hash_pairs(hashes, HASH_RADIUS, candidates))
    pairs = np.unique(np.sort(np.concatenate(found_pairs), axis=1), axis=0).reshape(-1, 2)
    cosine = np.minimum(np.einsum("ij,ij->i", unit[pairs[:, 0]], unit[pairs[:, 1]]).astype(np.float64), 1.0)
    distance = hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]]) if hashes is not None else np.full(len(pairs), -1)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], distance, -cosine))  # most similar first; ties in index order
    return {"pairs": pairs[order], "cosine": cosine[order], "hash_distance": distance[order],
            "group": copy_groups(pairs, count), "calibration": calibration}


def copy_groups(pairs: np.ndarray, count: int) -> np.ndarray:
    """Each row's group (connected components of the `pairs` graph, numbered from 0), -1 for a row in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    paired, group = np.zeros(count, dtype=bool), np.full(count, -1)
    paired[pairs.ravel()] = True
    group[paired] = np.unique(component[paired], return_inverse=True)[1]
    return group


def class_balance(labels: dict[str, np.ndarray], classes: list[str], minimum: int) -> dict:
    """Images per class per split, the largest-to-smallest class ratio, and training classes under `minimum` images."""
    counts = {split: {name: int(n) for name, n in zip(classes, np.bincount(values, minlength=len(classes)))}
              for split, values in labels.items()}
    ratio = {split: (max(per.values()) / min(per.values())) if min(per.values()) else None for split, per in counts.items()}
    below = [{"split": "train", "class": name, "images": n} for name, n in counts.get("train", {}).items() if n < minimum]
    below += [{"split": split, "class": name, "images": 0} for split, per in counts.items() if split != "train"
              for name, n in per.items() if n == 0]
    return {"images_per_class": counts, "largest_to_smallest": ratio, "minimum": minimum, "below_minimum": below}


def diagnose(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[str],
             names: dict[str, list[str]] | None = None, options: DoctorArguments | None = None, seed: int = 42,
             hashes: dict[str, np.ndarray] | None = None) -> dict:
    """The data report: `features[split]` `(images, dim)`, `labels[split]` class ids, `classes` their names, `names[split]`
    each image's path relative to the dataset (or `#index`), `hashes[split]` their perceptual hashes (`image_hashes`;
    without them copies come from the features alone)."""
    options = options or DoctorArguments()
    splits = [split for split in SPLIT_ORDER if split in features] + [split for split in features if split not in SPLIT_ORDER]
    names = names or {split: [f"#{index}" for index in range(len(features[split]))] for split in splits}
    where = [(split, index) for split in splits for index in range(len(features[split]))]
    pooled = np.concatenate([features[split] for split in splits]).astype(np.float32)
    pooled_labels = np.concatenate([labels[split] for split in splits]).astype(np.int64)
    timing = {}

    def image(row: int) -> dict:
        split, index = where[row]
        return {"split": split, "index": index, "image": names[split][index], "label": classes[pooled_labels[row]]}

    started = time.perf_counter()
    found = find_label_issues(pooled, pooled_labels, options.doctor_folds, seed)
    timing["label_issues_s"] = round(time.perf_counter() - started, 3)
    label_issues = [{**image(row), "suggested_label": classes[suggested], "suggested_probability": round(probability, 4),
                     "label_quality": round(quality, 4)} for row, suggested, probability, quality in found["ranked"]]

    started = time.perf_counter()
    pooled_hashes = np.concatenate([hashes[split] for split in splits]) if hashes is not None else None
    copies = find_copies(pooled, pooled_hashes, options.doctor_duplicate_threshold, seed)
    timing["near_duplicates_s"] = round(time.perf_counter() - started, 3)
    near_duplicates, leaks = [], []
    for (first, second), cosine, distance in zip(copies["pairs"].tolist(), copies["cosine"], copies["hash_distance"]):
        pair = {"similarity": round(float(cosine), 4), "hash_distance": None if distance < 0 else int(distance),
                "images": [image(first), image(second)]}
        (near_duplicates if where[first][0] == where[second][0] else leaks).append(pair)
    groups = _groups(copies["group"], image, classes)
    conflicting = [group for group in groups if len(group["labels"]) > 1]

    balance = class_balance({split: labels[split] for split in splits}, classes, options.doctor_min_class_images)
    return {
        "images": {split: len(features[split]) for split in splits},
        "classes": list(classes),
        "settings": {"folds": options.doctor_folds, "seed": seed, "duplicate_threshold": options.doctor_duplicate_threshold,
                     "min_class_images": options.doctor_min_class_images, "probe": f"StandardScaler + LogisticRegression(C={PROBE_C})",
                     "label_issue_method": "cleanlab.filter.find_label_issues (prune_by_noise_rate), ranked by self_confidence",
                     "similarity": "cosine of signed-square-root, unit-length backbone features"},
        "summary": _summary_counts(label_issues, near_duplicates, leaks, balance, splits, found, groups, conflicting, copies),
        "label_issues": label_issues,
        "conflicting_labels": conflicting,
        "near_duplicates": near_duplicates,
        "leaks": leaks,
        "copy_groups": groups,
        "copies": copies["calibration"],
        "class_balance": balance,
        "timing": timing,
    }


def _groups(group: np.ndarray, image, classes: list[str]) -> list[dict]:
    """The groups of copies, largest first: their images (in split order) and the labels they carry (class order)."""
    rows = np.flatnonzero(group >= 0)
    members = np.split(rows[np.argsort(group[rows], kind="stable")], np.cumsum(np.bincount(group[rows]))[:-1]) if len(rows) else []
    found = []
    for member_rows in sorted(members, key=lambda found_rows: (-len(found_rows), found_rows[0])):
        images = [image(int(row)) for row in member_rows]
        images.sort(key=lambda found_image: (_split_rank(found_image["split"]), found_image["index"]))
        labels = {found_image["label"] for found_image in images}
        found.append({"images": images, "labels": [name for name in classes if name in labels],
                      "splits": list(dict.fromkeys(found_image["split"] for found_image in images))})
    return found


def _summary_counts(label_issues, near_duplicates, leaks, balance, splits, found, groups, conflicting, copies) -> dict:
    by_split = {split: sum(issue["split"] == split for issue in label_issues) for split in splits}
    crossings = {}
    for pair in leaks:
        first, second = sorted((image["split"] for image in pair["images"]), key=_split_rank)
        crossings.setdefault(f"{first}-{second}", []).append(pair)
    leak_counts = {}
    for crossing, pairs in crossings.items():
        later = crossing.split("-")[1]
        leak_counts[crossing] = {
            "pairs": len(pairs),
            # how many images of the later split (the one that measures) have a copy in the earlier one
            f"{later}_images": len({image["index"] for pair in pairs for image in pair["images"] if image["split"] == later}),
        }
    return {
        "label_issues": len(label_issues),
        "label_issues_by_split": by_split,
        "label_check_skipped_classes": found["skipped_classes"],
        "probe_accuracy": None if found["probe_accuracy"] is None else round(found["probe_accuracy"], 4),
        "near_duplicate_pairs": len(near_duplicates),
        "near_duplicate_pairs_by_split": {split: sum(pair["images"][0]["split"] == split for pair in near_duplicates) for split in splits},
        "leak_pairs": len(leaks),
        "leaks_by_splits": leak_counts,
        "copy_groups": len(groups),
        "images_in_copy_groups": sum(len(group["images"]) for group in groups),
        "conflicting_label_groups": len(conflicting),
        "conflicting_label_images": sum(len(group["images"]) for group in conflicting),
        "features_meaningful": copies["calibration"]["features_meaningful"],
        "classes_below_minimum": len(balance["below_minimum"]),
    }


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


# --- what to exclude --------------------------------------------------------------------------------------------------
def flagged_indices(report: dict, exclude_flagged: str | None, splits: list[str] | tuple[str, ...] = ("train",)) -> dict[str, list[int]]:
    """`{split: sorted indices}` to remove for `exclude_flagged` (leaks | label_issues | both), from `splits` only.

    Leaks: every image of a group of copies that is in an earlier split of train < validation < test than the group's
    latest (that one measures the model), when its split is in `splits`. Label issues: the image itself, and every image
    of a group of copies that carries more than one label."""
    if exclude_flagged is None:
        return {}
    if exclude_flagged not in EXCLUDE_CHOICES:
        raise DoctorError(f"`exclude_flagged: {exclude_flagged}` is not one of {' | '.join(EXCLUDE_CHOICES)}.")
    flagged: dict[str, set[int]] = {}
    chosen = []
    if exclude_flagged in ("label_issues", "both"):
        chosen += report["label_issues"] + [image for group in report["conflicting_labels"] for image in group["images"]]
    if exclude_flagged in ("leaks", "both"):
        for group in report["copy_groups"]:
            latest = max(_split_rank(split) for split in group["splits"])
            chosen += [image for image in group["images"] if _split_rank(image["split"]) < latest]
    for image in chosen:
        if image["split"] in splits:
            flagged.setdefault(image["split"], set()).add(image["index"])
    return {split: sorted(indices) for split, indices in flagged.items()}


def exclude(data: PreparedData, flagged: dict[str, list[int]], option: str = "exclude_flagged") -> PreparedData:
    """`data` without the flagged images (`flagged_indices`); the report's indices refer to `data` as given. Refused when
    a split would lose every image of a class it has (as at load time: no class without training images, and none the
    test cannot measure); `option` names what asked for the exclusions in that message."""
    splits = dict(data.splits)
    for split, indices in flagged.items():
        if not indices:
            continue
        drop = set(indices)
        kept = [index for index in range(len(splits[split])) if index not in drop]
        labels = np.asarray(splits[split][data.label_column])
        had, keeps = (np.bincount(values, minlength=len(data.labels)) for values in (labels, labels[kept]))
        emptied = [f"{data.labels[label]!r} ({had[label]} of {had[label]})" for label in np.flatnonzero((had > 0) & (keeps == 0))]
        if emptied:
            role = ("a model cannot learn a class it has no training images of" if split == "train"
                    else "its accuracy could not be measured there")
            raise DoctorError(
                f"`{option}` would remove every {split} image of class{'es' if len(emptied) > 1 else ''} {', '.join(emptied)}: {role}. "
                f"Remove those copies from the later split instead, exclude from fewer splits (`exclude_flagged_from`), or unset "
                f"`exclude_flagged`; `hf-transfer doctor` lists the flagged images in {DATA_REPORT}."
            )
        splits[split] = splits[split].select(kept)
    return dataclasses.replace(data, splits=datasets.DatasetDict(splits))


# --- reading it ---------------------------------------------------------------------------------------------------------
def summary_text(report: dict, folder: str | Path | None = None) -> str:
    """A few lines for the terminal: counts and the top findings."""
    counts, total = report["summary"], sum(report["images"].values())
    where = f" ({Path(folder) / DATA_REPORT}, {Path(folder) / DATA_SUSPECTS_PNG})" if folder else ""
    per_split = ", ".join(f"{split} {n}" for split, n in counts["label_issues_by_split"].items() if n)
    lines = [f"Data doctor{where}: {total:,} images ({', '.join(f'{s} {n:,}' for s, n in report['images'].items())})",
             f"  label issues: {counts['label_issues']} likely wrong label(s){f' ({per_split})' if per_split else ''}"]
    accuracy = counts.get("probe_accuracy")
    if accuracy is not None and accuracy < WEAK_PROBE:
        lines.append(f"    the probe is right on only {accuracy:.1%} of the images (out of fold): many flagged images will be hard "
                     "rather than mislabelled; read the list from the top")
    for issue in report["label_issues"][:3]:
        lines.append(f"    {_where(issue)} labelled {one_line(issue['label'])}, looks like {one_line(issue['suggested_label'])} "
                     f"(p={issue['suggested_probability']:.2f})")
    lines.append(f"  near-duplicates within a split: {counts['near_duplicate_pairs']} pair(s)")
    lines += [_pair_line(pair) for pair in report["near_duplicates"][:2]]
    leaks = []
    for crossing, values in counts["leaks_by_splits"].items():
        earlier, later = crossing.split("-")
        leaks.append(f"{crossing}: {values['pairs']} pair(s), {values[f'{later}_images']} {later} image(s) with a copy in {earlier}")
    crossings = " (" + "; ".join(leaks) + ")" if leaks else ""
    lines.append(f"  leaks across splits: {counts['leak_pairs']} pair(s){crossings}")
    lines += [_pair_line(pair) for pair in report["leaks"][:3]]
    lines += _copy_lines(report)
    balance = report["class_balance"]
    for split, per in balance["images_per_class"].items():
        shown = ", ".join(f"{one_line(name)} {n}" for name, n in list(per.items())[:10]) + (", ..." if len(per) > 10 else "")
        ratio = balance["largest_to_smallest"][split]
        lines.append(f"  {split}: {shown}" + (f" (largest/smallest {ratio:.1f})" if ratio and ratio > 1.5 else ""))
    below = balance["below_minimum"]
    lines.append(f"  classes under {balance['minimum']} training images (or absent from an evaluation split): "
                 + (", ".join(f"{one_line(b['class'])} ({b['split']}: {b['images']})" for b in below[:10]) if below else "none"))
    if counts["label_check_skipped_classes"]:
        lines.append(f"  not label-checked (fewer images than folds): classes {counts['label_check_skipped_classes']}")
    return "\n".join(lines)


def _pair_line(pair: dict) -> str:
    first, second = pair["images"]
    labels = f"; labelled {one_line(first['label'])} and {one_line(second['label'])}" if first["label"] != second["label"] else ""
    distance = f", hash distance {pair['hash_distance']}" if pair.get("hash_distance") is not None else ""
    return f"    {_where(first)} ~ {_where(second)} (cosine {pair['similarity']:.3f}{distance}{labels})"


def _copy_lines(report: dict) -> list[str]:
    """Groups of copies, those whose images carry different labels (a label problem), and whether the features counted."""
    counts, copies = report["summary"], report["copies"]
    lines = [f"  copies: {counts['copy_groups']} group(s) of 2 or more images ({counts['images_in_copy_groups']} images)"]
    if not copies["features_meaningful"]:
        lines.append(f"    the backbone's features do not tell these images apart ({copies['share_with_a_neighbour_above_threshold']:.0%} "
                     f"have a neighbour at cosine >= {report['settings']['duplicate_threshold']}; the median nearest neighbour is at "
                     f"{copies['median_nearest_neighbour']:.3f}): copies come from the perceptual hash alone")
    lines.append(f"  copies with different labels: {counts['conflicting_label_groups']} group(s), {counts['conflicting_label_images']} "
                 "image(s)" + (": at least one label in each group is wrong" if counts["conflicting_label_groups"] else ""))
    for group in report["conflicting_labels"][:3]:
        one_each = [next(image for image in group["images"] if image["label"] == label) for label in group["labels"]]
        shown = (one_each + [image for image in group["images"] if image not in one_each])[:3]
        lines.append("    " + " ~ ".join(f"{_where(image)} labelled {one_line(image['label'])}" for image in shown)
                     + (f" (+{len(group['images']) - len(shown)} more)" if len(group["images"]) > len(shown) else ""))
    return lines


def _where(image: dict) -> str:
    name = "" if image["image"] == f"#{image['index']}" else f" {one_line(image['image'])}"
    return f"{image['split']} #{image['index']}{name}"


# --- writing it -------------------------------------------------------------------------------------------------------
def image_names(data: PreparedData, dataset: str) -> dict[str, list[str]]:
    """Each image's path relative to the local dataset folder (or its stored path, or `#index`), per split."""
    root = _local_root(dataset)
    names = {}
    for split, rows in data.splits.items():
        cells = rows.select_columns([data.image_column]).with_format("arrow")[:][data.image_column]  # no image decoded
        paths = cells.combine_chunks().field("path").to_pylist() if len(cells) else []
        names[split] = [shareable_name({"path": path}, index, root) for index, path in enumerate(paths)]
    return names


def write_report(report: dict, data: PreparedData, folder: str | Path, sheet_size: int = 24) -> Path:
    """`data_report.json` and the contact sheet `data_suspects.png` in `folder` (each written whole, then moved in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = {**report, "contact_sheet": DATA_SUSPECTS_PNG}
    staged = folder / f".{DATA_REPORT}.tmp{os.getpid()}"
    staged.write_text(json.dumps(report, indent=2))
    os.replace(staged, folder / DATA_REPORT)
    suspects = [(_cell(data, issue), _suspect_caption(issue)) for issue in report["label_issues"][:sheet_size]]
    leaks = [([_cell(data, image) for image in pair["images"]], _leak_caption(pair)) for pair in report["leaks"][:8]]
    staged = folder / f".{DATA_SUSPECTS_PNG}.tmp{os.getpid()}.png"
    plot_suspects(suspects, leaks, staged)
    os.replace(staged, folder / DATA_SUSPECTS_PNG)
    return folder / DATA_REPORT


def _suspect_caption(issue: dict) -> str:
    return (f"{plot_text(_where(issue))}\ngiven: {plot_text(issue['label'])}\n"
            f"suggested: {plot_text(issue['suggested_label'])} ({issue['suggested_probability']:.2f})")


def _leak_caption(pair: dict) -> str:
    first, second = pair["images"]
    labels = f"\nlabelled {plot_text(first['label'])} and {plot_text(second['label'])}" if first["label"] != second["label"] else ""
    return f"{plot_text(_where(first))}\n~ {plot_text(_where(second))}\ncosine {pair['similarity']:.3f}{labels}"


def _cell(data: PreparedData, image: dict):
    return data.splits[image["split"]][image["index"]][data.image_column]


def plot_suspects(suspects: list, leaks: list, path: str | Path, columns: int = 6) -> Path:
    """A contact sheet: `suspects` as `(image cell, caption)` (the likely wrong labels), then `leaks` as `([cell, cell],
    caption)`, each pair side by side. Unreadable cells show as an empty frame with the caption."""
    import matplotlib

    matplotlib.use("Agg")  # files only, as in plots.py
    import matplotlib.pyplot as plt

    panels = [([cell], caption) for cell, caption in suspects] + list(leaks)
    columns = max(2, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.0 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (cells, caption) in zip(axes.flat, panels):
        ax.imshow(_thumbnails(cells))
        ax.set_title(caption, fontsize=7, color="firebrick" if len(cells) > 1 else "black")
    if not panels:
        axes[0, 0].text(0, 0.5, "No label issues or leaks found.", fontsize=12)
    heading = f"Likely wrong labels: {len(suspects)} shown" + (f"; leaks across splits (red): {len(leaks)} shown" if leaks else "")
    fig.suptitle(heading, fontsize=11)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def _thumbnails(cells: list, side: int = 160) -> np.ndarray:
    """The images side by side, each fitted in `side` x `side` on white."""
    from PIL import Image, ImageOps

    from .images import UnreadableImageError, load_image

    canvas = Image.new("RGB", (side * len(cells) + 4 * (len(cells) - 1), side), "white")
    for position, cell in enumerate(cells):
        try:
            image = load_image(cell)
        except UnreadableImageError:
            continue
        image = ImageOps.contain(image, (side, side))  # small images (CIFAR's 32 px) scaled up too
        canvas.paste(image, (position * (side + 4) + (side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(canvas)


# --- the command ------------------------------------------------------------------------------------------------------
def check_data(recipe, data: PreparedData, store: FeatureStore | None = None, options: DoctorArguments | None = None) -> dict:
    """The report of a recipe's data (`diagnose` on `split_features`), with how long the features took."""
    options = options or recipe.doctor
    started = time.perf_counter()
    found, cache = _features(recipe, data, store)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    with recipe.training.main_process_first(desc="image hashes"):
        hashes = image_hashes(data)
    hashing = time.perf_counter() - started
    report = diagnose({split: f for split, (f, _) in found.items()}, {split: y for split, (_, y) in found.items()},
                      data.labels, image_names(data, recipe.data.dataset), options, recipe.training.seed, hashes)
    report["timing"]["features_s"], report["timing"]["hashes_s"] = round(seconds, 3), round(hashing, 3)
    # Published with the model: local folders as the run config names them (`shareable_path`).
    report["dataset"], report["model"] = shareable_path(recipe.data.dataset), shareable_path(recipe.model.model)
    report["feature_cache"] = cache
    return report


def run_doctor(recipe, options: DoctorArguments | None = None) -> dict:
    """`hf-transfer doctor`: check the recipe's data, write the report and contact sheet to `output_dir`, print a summary."""
    from accelerate import PartialState

    from .output_dir import RUN_CONFIG, OutputDirLock, check_place

    options = options or recipe.doctor
    folder = Path(recipe.training.output_dir)
    state = PartialState()
    lock = None
    if state.is_main_process:
        check_place(folder, recipe.to_dict(local_paths=True), overwrite=False)  # never into the dataset's folder or the home folder
        if (folder / RUN_CONFIG).is_file():  # a run's folder: its report must be the one the run's card describes
            previous, now = (_report_settings(config) for config in (without_local_paths(json.loads((folder / RUN_CONFIG).read_text())),
                                                                     recipe.to_dict()))
            differ = sorted(key for key in set(previous) | set(now) if previous.get(key) != now.get(key))
            if differ:
                raise DoctorError(
                    f"{folder} holds a run whose data and data report were made with other options (differs in: "
                    f"{', '.join(differ[:8])}): a report written there would replace the one its model card describes. "
                    "Choose another `--output_dir`, or give the run's options."
                )
        lock = OutputDirLock(folder)
        lock.acquire()  # not while a training run writes there
    try:
        started = time.perf_counter()
        with recipe.training.main_process_first(desc="dataset preparation"):
            data = load_image_dataset(recipe.data, seed=recipe.training.seed)
        report = check_data(recipe, data, options=options)
        report["timing"]["total_s"] = round(time.perf_counter() - started, 3)
        if state.is_main_process:
            write_report(report, data, folder, options.doctor_sheet_size)
            print("\n" + summary_text(report, folder))
        return report
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.release()


def _report_settings(config: dict) -> dict:
    """What a data report depends on, from a resolved recipe (`Recipe.to_dict`, as in run_config.json): the data, the
    model, the checks' options, the seed of the probe's folds and the precision of the features."""
    sections = {section: config.get(section) or {} for section in ("data", "model", "doctor", "run", "training")}
    return {
        **{f"{section}.{key}": value for section in ("data", "model") for key, value in sections[section].items()},
        **{f"doctor.{key}": sections["doctor"].get(key) for key in REPORT_OPTIONS},
        "training.seed": sections["training"].get("seed"), "run.inference_precision": sections["run"].get("inference_precision"),
    }


# --- in a training run ------------------------------------------------------------------------------------------------
@dataclass
class DataCheck:
    """A training run's data check: the report on the data as loaded, and the images `exclude_flagged` removes."""

    report: dict
    data: PreparedData  # as loaded: the report's indices refer to it
    excluded: dict[str, list[int]]  # split -> indices removed before training
    options: DoctorArguments
    _kept: PreparedData | None = dataclasses.field(default=None, repr=False)

    def kept_data(self) -> PreparedData:
        """The data without the excluded images; refused when a split would lose every image of a class (`exclude`)."""
        if self._kept is None:
            self._kept = exclude(self.data, self.excluded, f"exclude_flagged: {self.options.exclude_flagged}")
        return self._kept

    def kept_rows(self) -> dict[str, np.ndarray]:
        """Split -> the indices that stay, for the splits that lose images."""
        return {split: np.setdiff1d(np.arange(len(self.data.splits[split])), indices)
                for split, indices in self.excluded.items() if indices}

    def results(self) -> dict:
        """For all_results.json (`data_doctor`) and the card: counts, and what was excluded."""
        counts = self.report["summary"]
        return {
            "label_issues": counts["label_issues"], "near_duplicate_pairs": counts["near_duplicate_pairs"],
            "leak_pairs": counts["leak_pairs"], "classes_below_minimum": counts["classes_below_minimum"],
            "copy_groups": counts["copy_groups"], "conflicting_label_groups": counts["conflicting_label_groups"],
            "exclude_flagged": self.options.exclude_flagged,
            "excluded": {split: len(indices) for split, indices in self.excluded.items() if indices},
            "seconds": self.report["timing"].get("total_s"),
        }

    def write(self, folder: Path) -> None:
        write_report(self.report, self.data, folder, self.options.doctor_sheet_size)


def check_run_data(recipe, data: PreparedData, store: FeatureStore | None, model, transforms, args) -> DataCheck | None:
    """The data doctor at the start of a run: on the run's feature cache when it has one (`data_doctor`), and always when
    `exclude_flagged` asks for exclusions (then on a store of its own). None when neither applies."""
    options = recipe.doctor
    if not (options.exclude_flagged or (options.data_doctor and store is not None)):
        return None
    started = time.perf_counter()
    report = check_data(recipe, data, store or doctor_store(recipe, data, model, transforms, args), options)
    report["timing"]["total_s"] = round(time.perf_counter() - started, 3)
    check = DataCheck(report, data, flagged_indices(report, options.exclude_flagged, options.excluded_splits()), options)
    if check.excluded:
        check.kept_data()  # refused now, before training, when a split would lose every image of a class
    if args.process_index == 0:
        logger.info("\n%s", summary_text(report))
        if check.excluded:
            logger.info("exclude_flagged: %s: removed %s before training", options.exclude_flagged,
                        ", ".join(f"{count} {split} image(s)" for split, count in check.results()["excluded"].items()))
    return check
