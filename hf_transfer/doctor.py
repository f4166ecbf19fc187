"""The data doctor's checks, on backbone features: label issues, copies and leaks, class balance.

`hf-transfer doctor RECIPE.yaml` (and a run whose features are cached, unless `data_doctor: false`) reads the backbone's
pooled features of every split from the feature cache (extracting them on a miss); `data_check.py` turns what these
checks find into `data_report.json`, a summary and a contact sheet of the top suspects (`data_suspects.png`). Nothing is
dropped or relabelled unless `exclude_flagged` says so.

- Label issues: out-of-fold class probabilities of a logistic-regression probe (stratified K-fold, seeded) on the features
  of all splits together, passed to `cleanlab.filter.find_label_issues`; ranked by cleanlab's self-confidence score.
- Copies: cosine similarity of power-normalised features at or above `doctor_duplicate_threshold` (unless too many
  images have a neighbour that close: images unlike the backbone's all look alike to it), and a perceptual hash of the
  grayscale image (`imagehash.phash`), which colour mode, re-encoding and resizing barely move. Pairs within one split
  are near-duplicates, across splits leaks; pairs join into groups (a copy of a copy is a copy), and a group carrying
  more than one label is a label problem too.
- Class balance: images per class per split, and training classes with fewer than `doctor_min_class_images`.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from .options import SPLIT_ORDER, DoctorArguments
from .perceptual_hash import HASH_RADIUS, hamming, hash_pairs

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


# --- the checks (numpy in, plain Python out) --------------------------------------------------------------------------
def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 42) -> np.ndarray:
    """`(images, classes present)` probabilities (columns in `np.unique(labels)` order), each image's from a probe that never saw it."""
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


def probed_classes(labels: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classes the out-of-fold probe can learn (at least `folds` images each), the mask of their images, and those
    images' labels as positions among these classes."""
    classes, counts = np.unique(labels, return_counts=True)
    kept = classes[counts >= folds]
    checked = np.isin(labels, kept)
    return kept, checked, np.searchsorted(kept, labels[checked])


def out_of_fold_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 42) -> tuple[float | None, int, list | None]:
    """`(accuracy, images, [low, high])`: the probe's out-of-fold accuracy (`out_of_fold_probabilities`) on the images of the
    classes it can learn (`probed_classes`), how many those are, and the 95% Wilson interval of the accuracy (honest near 0
    and 1, where the normal approximation claims too much). None without two such classes."""
    from scipy.stats import binomtest

    kept, checked, compact = probed_classes(labels, folds)
    if len(kept) < 2:
        return None, int(checked.sum()), None
    right = int((out_of_fold_probabilities(features[checked], compact, folds, seed).argmax(axis=1) == compact).sum())
    interval = binomtest(right, len(compact)).proportion_ci(method="wilson")
    return round(right / len(compact), 4), len(compact), [round(float(interval.low), 4), round(float(interval.high), 4)]


def find_label_issues(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 42) -> dict:
    """Images whose given label is likely wrong, most likely first: `{"ranked": [(image, suggested, its probability,
    label quality)], "checked": mask, "skipped_classes": [...]}`. Label quality is cleanlab's self-confidence (the probe's
    probability of the given label): lower is more suspect. Classes with fewer than `folds` images are not checked
    (their images are left out of the probe too): the probe could not learn them out of fold."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    kept_classes, checked, compact = probed_classes(labels, folds)
    result = {"ranked": [], "checked": checked, "skipped_classes": [int(c) for c in np.setdiff1d(labels, kept_classes)],
              "probe_accuracy": None}
    if len(kept_classes) < 2:
        return result
    probabilities = out_of_fold_probabilities(features[checked], compact, folds, seed)
    issues = cleanlab_issues(compact, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(compact, probabilities, method="self_confidence")
    rows = np.flatnonzero(checked)
    suggested = probabilities.argmax(axis=1)
    result["probe_accuracy"] = float(np.mean(suggested == compact))  # out of fold, against the given labels
    result["ranked"] = [(int(rows[i]), int(kept_classes[suggested[i]]), float(probabilities[i, suggested[i]]), float(quality[i]))
                        for i in issues]
    return result


def power_normalised(features: np.ndarray) -> np.ndarray:
    """Signed square root, then unit length: damps the few large activations that dominate raw pooled features, which
    separates copies from distinct photos better (Lite0, cats vs dogs, at 0.90: copies resized to half the side 63% found
    against 25% on raw features, JPEG-30 re-encodes 100% against 88%; closest distinct photos 0.889 against 0.880)."""
    rooted = np.sign(features) * np.sqrt(np.abs(features, dtype=np.float32))
    return rooted / np.maximum(np.linalg.norm(rooted, axis=1, keepdims=True), 1e-12)


def similar_pairs(features: np.ndarray, threshold: float, exact_up_to: int = EXACT_PAIRS_UP_TO, seed: int = 42) -> np.ndarray:
    """Pairs `(i, j, cosine)` with i < j and cosine similarity of power-normalised features >= threshold, most similar
    first, from each image's NEIGHBOURS most similar images (`nearest_neighbours`)."""
    unit = np.ascontiguousarray(power_normalised(features), dtype=np.float32)
    if len(unit) < 2:
        return np.zeros((0, 3))
    return _pairs_at(*nearest_neighbours(unit, exact_up_to, seed), threshold)


def nearest_neighbours(unit: np.ndarray, exact_up_to: int = EXACT_PAIRS_UP_TO, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """`(similarity, found)`, each `(images, NEIGHBOURS + 1)`: every row's most similar rows of `unit` (unit-length
    vectors, at least 2), itself included, by inner product (faiss): every pair up to `exact_up_to` images, beyond that
    each image's rows in its IVF_PROBES nearest of sqrt(n) k-means cells, at full width. `found` is -1 where fewer were found."""
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
    return index.search(unit, min(NEIGHBOURS + 1, count))  # +1: an image finds itself (or a tie with a copy)


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


def find_copies(features: np.ndarray, hashes: np.ndarray | None, threshold: float, seed: int = 42) -> dict:
    """Copies among the rows: `pairs` `(i, j)` (i < j, most similar first) with their `cosine` and `hash_distance` (-1
    without hashes), `group` (each row's group of copies, transitively; -1 for a row with none) and how the features
    were judged (`calibration`).

    A pair is a copy when its features are at or above `threshold` (only where the features tell images apart: at most
    MAX_SHARE_ABOVE_THRESHOLD of the rows have a neighbour that close), or its hashes within HASH_RADIUS bits."""
    unit = np.ascontiguousarray(power_normalised(features), dtype=np.float32)
    count = len(unit)
    found_pairs, candidates = [np.zeros((0, 2), dtype=np.int64)], None
    calibration = {"images": count, "features_meaningful": True, "share_with_a_neighbour_above_threshold": 0.0,
                   "median_nearest_neighbour": None}
    if count >= 2:
        similarity, found = nearest_neighbours(unit, seed=seed)
        others = (found != np.arange(count)[:, None]) & (found >= 0)
        nearest = np.where(others, similarity, -np.inf).max(axis=1)
        share = float(np.mean(nearest >= threshold))
        meaningful = share <= MAX_SHARE_ABOVE_THRESHOLD
        calibration.update(features_meaningful=meaningful, share_with_a_neighbour_above_threshold=round(share, 4),
                           median_nearest_neighbour=round(float(np.median(nearest[np.isfinite(nearest)])), 4))
        if meaningful:
            found_pairs.append(_pairs_at(similarity, found, threshold)[:, :2].astype(np.int64))
        candidates = np.stack([np.repeat(np.arange(count), found.shape[1]), found.ravel()], axis=1)[others.ravel()]
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
    paired, group = np.isin(np.arange(count), pairs), np.full(count, -1)
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

    def image(row: int) -> dict:
        split, index = where[row]
        return {"split": split, "index": index, "image": names[split][index], "label": classes[pooled_labels[row]]}

    started = time.perf_counter()
    found = find_label_issues(pooled, pooled_labels, options.doctor_folds, seed)
    labelled = time.perf_counter()
    pooled_hashes = np.concatenate([hashes[split] for split in splits]) if hashes is not None else None
    copies = find_copies(pooled, pooled_hashes, options.doctor_duplicate_threshold, seed)
    timing = {"label_issues_s": round(labelled - started, 3), "near_duplicates_s": round(time.perf_counter() - labelled, 3)}

    label_issues = [{**image(row), "suggested_label": classes[suggested], "suggested_probability": round(probability, 4),
                     "label_quality": round(quality, 4)} for row, suggested, probability, quality in found["ranked"]]
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
        "label_issues": label_issues, "conflicting_labels": conflicting, "near_duplicates": near_duplicates, "leaks": leaks,
        "copy_groups": groups, "copies": copies["calibration"], "class_balance": balance, "timing": timing,
    }


def _groups(group: np.ndarray, image, classes: list[str]) -> list[dict]:
    """The groups of copies, largest first: their images (in split order) and the labels they carry (class order)."""
    rows = np.flatnonzero(group >= 0)
    members = np.split(rows[np.argsort(group[rows], kind="stable")], np.cumsum(np.bincount(group[rows]))[:-1]) if len(rows) else []
    found = []
    for member_rows in sorted(members, key=lambda found_rows: (-len(found_rows), found_rows[0])):
        images = [image(int(row)) for row in member_rows]
        images.sort(key=lambda found_image: (split_rank(found_image["split"]), found_image["index"]))
        labels = {found_image["label"] for found_image in images}
        found.append({"images": images, "labels": [name for name in classes if name in labels],
                      "splits": list(dict.fromkeys(found_image["split"] for found_image in images))})
    return found


def _summary_counts(label_issues, near_duplicates, leaks, balance, splits, found, groups, conflicting, copies) -> dict:
    crossings = {}
    for pair in leaks:
        first, second = sorted((image["split"] for image in pair["images"]), key=split_rank)
        crossings.setdefault((first, second), []).append(pair)
    leak_counts = {}
    for (earlier, later), pairs in crossings.items():
        # how many images of the later split (the one that measures) have a copy in the earlier one
        copied = {image["index"] for pair in pairs for image in pair["images"] if image["split"] == later}
        leak_counts[f"{earlier}-{later}"] = {"pairs": len(pairs), f"{later}_images": len(copied)}
    return {
        "label_issues": len(label_issues),
        "label_issues_by_split": {split: sum(issue["split"] == split for issue in label_issues) for split in splits},
        "label_check_skipped_classes": found["skipped_classes"],
        "probe_accuracy": None if found["probe_accuracy"] is None else round(found["probe_accuracy"], 4),
        "near_duplicate_pairs": len(near_duplicates),
        "near_duplicate_pairs_by_split": {split: sum(pair["images"][0]["split"] == split for pair in near_duplicates) for split in splits},
        "leak_pairs": len(leaks), "leaks_by_splits": leak_counts,
        "copy_groups": len(groups), "images_in_copy_groups": sum(len(group["images"]) for group in groups),
        "conflicting_label_groups": len(conflicting), "conflicting_label_images": sum(len(group["images"]) for group in conflicting),
        "features_meaningful": copies["calibration"]["features_meaningful"], "classes_below_minimum": len(balance["below_minimum"]),
    }


def split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)
