"""Check a dataset before training: label issues, near-duplicates and leaks, class balance, from cached backbone features.

`hf-transfer doctor RECIPE.yaml` (and a run whose features are cached, unless `data_doctor: false`) reads the backbone's
pooled features of every split from the feature cache (extracting them on a miss), and writes `data_report.json` and a
contact sheet of the top suspects (`data_suspects.png`). Nothing is dropped or relabelled unless `exclude_flagged` says so.

- Label issues: out-of-fold class probabilities of a logistic-regression probe (stratified K-fold, seeded) on the features
  of all splits together, passed to `cleanlab.filter.find_label_issues`; ranked by cleanlab's self-confidence score.
- Near-duplicates and leaks: cosine similarity of power-normalised features (signed square root, then unit length), every
  pair at or above `doctor_duplicate_threshold`; pairs within one split are near-duplicates, pairs across splits leaks.
- Class balance: images per class per split, and training classes with fewer than `doctor_min_class_images`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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

from .cached_head import head_module
from .data import PreparedData, _local_root, load_image_dataset, shareable_name
from .device_resize import transforms_for_run
from .doctor_options import EXCLUDE_CHOICES, SPLIT_ORDER, DoctorArguments, DoctorError
from .feature_store import FeatureStore
from .freezing import discover_blocks
from .models import data_config, load_model
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
    first, from each image's `neighbours` most similar images (faiss). Up to `exact_up_to` images every pair is compared
    (`IndexFlatIP`); beyond, an inverted-file index (`IndexIVFFlat`, sqrt(n) k-means cells, 8 searched per image)
    compares each image with the images of its 8 nearest cells, at full width."""
    import faiss

    unit = np.ascontiguousarray(power_normalised(features), dtype=np.float32)
    count, width = unit.shape
    if count < 2:
        return np.zeros((0, 3))
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
    similarity, found = index.search(unit, min(neighbours + 1, count))  # +1: an image finds itself (or a tie with a copy)
    rows = np.repeat(np.arange(count), found.shape[1])
    similarity, found = similarity.ravel(), found.ravel()
    keep = (similarity >= threshold) & (found != rows) & (found >= 0)
    pairs = np.sort(np.stack([rows[keep], found[keep]], axis=1), axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # (i, j) and (j, i) once
    similarity = np.minimum(similarity[keep][first].astype(np.float64), 1.0)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -similarity))  # most similar first; ties in index order
    return np.column_stack([pairs[order], similarity[order]])


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
             names: dict[str, list[str]] | None = None, options: DoctorArguments | None = None, seed: int = 42) -> dict:
    """The data report: `features[split]` `(images, dim)`, `labels[split]` class ids, `classes` their names, `names[split]`
    each image's path relative to the dataset (or `#index`)."""
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
    pairs = similar_pairs(pooled, options.doctor_duplicate_threshold, seed=seed)
    timing["near_duplicates_s"] = round(time.perf_counter() - started, 3)
    near_duplicates, leaks = [], []
    for first, second, similarity in pairs:
        pair = {"similarity": round(float(similarity), 4), "images": [image(int(first)), image(int(second))]}
        same_split = where[int(first)][0] == where[int(second)][0]
        (near_duplicates if same_split else leaks).append(pair)

    balance = class_balance({split: labels[split] for split in splits}, classes, options.doctor_min_class_images)
    return {
        "images": {split: len(features[split]) for split in splits},
        "classes": list(classes),
        "settings": {"folds": options.doctor_folds, "seed": seed, "duplicate_threshold": options.doctor_duplicate_threshold,
                     "min_class_images": options.doctor_min_class_images, "probe": f"StandardScaler + LogisticRegression(C={PROBE_C})",
                     "label_issue_method": "cleanlab.filter.find_label_issues (prune_by_noise_rate), ranked by self_confidence",
                     "similarity": "cosine of signed-square-root, unit-length backbone features"},
        "summary": _summary_counts(label_issues, near_duplicates, leaks, balance, splits, found),
        "label_issues": label_issues,
        "near_duplicates": near_duplicates,
        "leaks": leaks,
        "class_balance": balance,
        "timing": timing,
    }


def _summary_counts(label_issues, near_duplicates, leaks, balance, splits, found) -> dict:
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
        "classes_below_minimum": len(balance["below_minimum"]),
    }


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


# --- what to exclude --------------------------------------------------------------------------------------------------
def flagged_indices(report: dict, exclude_flagged: str | None, splits: list[str] | tuple[str, ...] = ("train",)) -> dict[str, list[int]]:
    """`{split: sorted indices}` to remove for `exclude_flagged` (leaks | label_issues | both), from `splits` only.

    A leak removes the copy in the earlier split of train < validation < test (the later one measures the model), when
    that split is in `splits`; a label issue removes the image itself."""
    if exclude_flagged is None:
        return {}
    if exclude_flagged not in EXCLUDE_CHOICES:
        raise DoctorError(f"`exclude_flagged: {exclude_flagged}` is not one of {' | '.join(EXCLUDE_CHOICES)}.")
    flagged: dict[str, set[int]] = {}
    if exclude_flagged in ("label_issues", "both"):
        for issue in report["label_issues"]:
            if issue["split"] in splits:
                flagged.setdefault(issue["split"], set()).add(issue["index"])
    if exclude_flagged in ("leaks", "both"):
        for pair in report["leaks"]:
            earlier = min(pair["images"], key=lambda image: _split_rank(image["split"]))
            if earlier["split"] in splits:
                flagged.setdefault(earlier["split"], set()).add(earlier["index"])
    return {split: sorted(indices) for split, indices in flagged.items()}


def exclude(data: PreparedData, flagged: dict[str, list[int]]) -> PreparedData:
    """`data` without the flagged images (`flagged_indices`); the report's indices refer to `data` as given."""
    splits = dict(data.splits)
    for split, indices in flagged.items():
        if indices:
            drop = set(indices)
            splits[split] = splits[split].select([index for index in range(len(splits[split])) if index not in drop])
            if len(splits[split]) == 0:
                raise DoctorError(f"`exclude_flagged` would remove every image of the {split} split. Check data_report.json.")
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
        lines.append(f"    {_where(issue)} labelled {issue['label']}, looks like {issue['suggested_label']} "
                     f"(p={issue['suggested_probability']:.2f})")
    lines.append(f"  near-duplicates within a split: {counts['near_duplicate_pairs']} pair(s)")
    lines += [f"    {_where(pair['images'][0])} ~ {_where(pair['images'][1])} (cosine {pair['similarity']:.3f})"
              for pair in report["near_duplicates"][:2]]
    leaks = []
    for crossing, values in counts["leaks_by_splits"].items():
        earlier, later = crossing.split("-")
        leaks.append(f"{crossing}: {values['pairs']} pair(s), {values[f'{later}_images']} {later} image(s) with a copy in {earlier}")
    crossings = " (" + "; ".join(leaks) + ")" if leaks else ""
    lines.append(f"  leaks across splits: {counts['leak_pairs']} pair(s){crossings}")
    lines += [f"    {_where(pair['images'][0])} ~ {_where(pair['images'][1])} (cosine {pair['similarity']:.3f})"
              for pair in report["leaks"][:3]]
    balance = report["class_balance"]
    for split, per in balance["images_per_class"].items():
        shown = ", ".join(f"{name} {n}" for name, n in list(per.items())[:10]) + (", ..." if len(per) > 10 else "")
        ratio = balance["largest_to_smallest"][split]
        lines.append(f"  {split}: {shown}" + (f" (largest/smallest {ratio:.1f})" if ratio and ratio > 1.5 else ""))
    below = balance["below_minimum"]
    lines.append(f"  classes under {balance['minimum']} training images (or absent from an evaluation split): "
                 + (", ".join(f"{b['class']} ({b['split']}: {b['images']})" for b in below[:10]) if below else "none"))
    if counts["label_check_skipped_classes"]:
        lines.append(f"  not label-checked (fewer images than folds): classes {counts['label_check_skipped_classes']}")
    return "\n".join(lines)


def _where(image: dict) -> str:
    name = "" if image["image"] == f"#{image['index']}" else f" {image['image']}"
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
    return f"{_where(issue)}\ngiven: {issue['label']}\nsuggested: {issue['suggested_label']} ({issue['suggested_probability']:.2f})"


def _leak_caption(pair: dict) -> str:
    return f"{_where(pair['images'][0])}\n~ {_where(pair['images'][1])}\ncosine {pair['similarity']:.3f}"


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
    report = diagnose({split: f for split, (f, _) in found.items()}, {split: y for split, (_, y) in found.items()},
                      data.labels, image_names(data, recipe.data.dataset), options, recipe.training.seed)
    report["timing"]["features_s"] = round(seconds, 3)
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
        if (folder / RUN_CONFIG).is_file():  # a run's folder: its report must describe the data and model it trained on
            previous, now = without_local_paths(json.loads((folder / RUN_CONFIG).read_text())), recipe.to_dict()
            differ = [section for section in ("data", "model") if previous.get(section) != now[section]]
            if differ:
                raise DoctorError(f"{folder} holds a run with other {' and '.join(differ)} options: a data report there would not "
                                  "describe what it trained on. Choose another `--output_dir`.")
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


# --- in a training run ------------------------------------------------------------------------------------------------
@dataclass
class DataCheck:
    """A training run's data check: the report on the data as loaded, and the images `exclude_flagged` removes."""

    report: dict
    data: PreparedData  # as loaded: the report's indices refer to it
    excluded: dict[str, list[int]]  # split -> indices removed before training
    options: DoctorArguments

    def kept_data(self) -> PreparedData:
        return exclude(self.data, self.excluded)

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
    if args.process_index == 0:
        logger.info("\n%s", summary_text(report))
        if check.excluded:
            logger.info("exclude_flagged: %s: removed %s before training", options.exclude_flagged,
                        ", ".join(f"{count} {split} image(s)" for split, count in check.results()["excluded"].items()))
    return check
