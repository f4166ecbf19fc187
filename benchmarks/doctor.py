"""Data doctor: precision and recall of its label-issue and leak checks on a mirror with planted problems, and its time.

1. `hf-transfer doctor` on the clean mirror (`hf_transfer.pipeline.run_doctor`), timed; run again when the first run had to
   extract the features, so the table also has the warm-cache time. Its findings are the mirror's own problems.
2. Planted problems on the same cached features: `--flip` of every split's labels changed to another class (seeded), and
   `--leaks` test images copied into train as an exact copy, a copy resized to 3/4 of the side (JPEG 90) or a JPEG
   re-encoded at quality 50, in turn; `--colour-copies` more, saved in another colour mode (CMYK JPEG, grayscale PNG,
   palette PNG, RGBA PNG, 16-bit grayscale PNG) in turn. The copies' features come from the same backbone and
   preprocessing (`split_features` on a dataset of the copies), their perceptual hashes from `image_hashes`; the
   mirror's features are not extracted again.
3. `diagnose` on the planted data. Label issues: precision and recall of the flagged images against the flipped ones
   (flagged images that were not flipped but are flagged on the clean mirror too are the mirror's own, counted apart).
   Leaks: a planted copy counts as found when its pair with its source is a leak; any other pair with a copy is false,
   unless the clean mirror pairs that image with the copy's source (a duplicate of the source). The clean mirror's own
   pairs are listed, not judged: look at its contact sheet.
4. `--calibrate N`: every kind of copy (resized to 7/8 ... 1/2 of the side, JPEG 75 ... 30) of N test images against its
   source, and the mirror's most similar pairs of its own images: how `doctor_duplicate_threshold` was chosen.

    python benchmarks/doctor.py --dataset cats_vs_dogs --calibrate 60 --probe-c 0.01,0.1,1 --check-ivf   # 2,000 + 2,000 photos
    python benchmarks/doctor.py --dataset cifar10 --check-ivf     # all 60,000 images; the first run extracts them (hours on 2 cores)
    python benchmarks/doctor.py --dataset noise   # 500 classes of noise images (generated once): every pair it reports is false
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import datasets
import numpy as np
from common import MIRRORS, REPO, VALIDATION_SIZE, offline_logging, report
from PIL import Image

from hf_transfer import data_check, doctor, options, perceptual_hash
from hf_transfer.data import PreparedData, load_image_dataset
from hf_transfer.data.source import MapSource
from hf_transfer.images import load_image
from hf_transfer.pipeline import prepare, run_arguments, run_doctor
from hf_transfer.recipe import parse_recipe

# Copies: (scale of the side, JPEG quality); quality None = the same bytes.
COPIES = {"exact": (1.0, None), "resized": (0.75, 90), "reencoded": (1.0, 50), "half": (0.5, 90)}
CALIBRATION = {"exact": (1.0, None), "resized 7/8": (0.875, 90), "resized 3/4": (0.75, 90), "resized 5/8": (0.625, 90),
               "resized 1/2": (0.5, 90), "JPEG 75": (1.0, 75), "JPEG 50": (1.0, 50), "JPEG 40": (1.0, 40), "JPEG 30": (1.0, 30)}
COPIES.update(CALIBRATION)
KINDS = ("exact", "resized", "reencoded", "half")
# Copies in another colour mode: (mode, format); 16-bit is grayscale with 16-bit samples.
COLOUR_COPIES = {"cmyk": ("CMYK", "JPEG"), "gray": ("L", "PNG"), "palette": ("P", "PNG"), "rgba": ("RGBA", "PNG"),
                 "16-bit": ("I;16", "PNG")}
NOISE = {"classes": 500, "train": 2, "validation": 1, "test": 1, "side": 32}  # images per class and split



def _features(recipe, data) -> dict:
    """The doctor's features of `data`, prepared as `hf-transfer doctor` prepares the recipe's."""
    return data_check.split_features(prepare(recipe, run_arguments(recipe), MapSource(recipe), data).store)

def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cats_vs_dogs", choices=sorted(MIRRORS) + ["noise"])
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--flip", type=float, default=0.02, help="fraction of every split's labels changed to another class")
    parser.add_argument("--leaks", type=int, default=20, help="test images copied into train")
    parser.add_argument("--kinds", default="exact,resized,reencoded",
                        help=f"copies planted in turn, among {', '.join(KINDS)} (half: resized to 1/2 of the side)")
    parser.add_argument("--colour-copies", type=int, default=20,
                        help=f"more test images copied into train in another colour mode ({', '.join(COLOUR_COPIES)} in turn)")
    parser.add_argument("--max-train", type=int, help="only this many train images (and --max-test test images): a subset")
    parser.add_argument("--max-test", type=int)
    parser.add_argument("--max-validation", type=int)
    parser.add_argument("--calibrate", type=int, default=0,
                        help="also measure the similarity of copies (resized, re-encoded) of this many test images to their source")
    parser.add_argument("--probe-c", default="", help="also rank the flipped labels with these probe C values, e.g. 0.01,0.1,1")
    parser.add_argument("--check-ivf", action="store_true",
                        help="compare the inverted-file search with the exhaustive one (minutes at 60k)")
    parser.add_argument("--seed", type=int, default=0, help="which labels flip and which images are copied")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default="/tmp/hf_transfer_bench_doctor_cache", help="a datasets cache for this benchmark only")
    parser.add_argument("--output-root", default=str(REPO / "outputs" / "bench_doctor"))
    parser.add_argument("--name", default="doctor", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def copy_of(cell: dict, kind: str) -> dict:
    """A copy of the image: `exact` (same bytes), resized by a scale and saved as JPEG at a quality (`COPIES`), or saved in
    another colour mode (`COLOUR_COPIES`)."""
    if kind in COLOUR_COPIES:
        mode, kind_format = COLOUR_COPIES[kind]
        image = load_image(cell)
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)  # 16-bit samples
        else:
            image = image.convert(mode)  # palette: Pillow's web palette with dithering
        buffer = io.BytesIO()
        image.save(buffer, kind_format, **({"quality": 95} if kind_format == "JPEG" else {}))
        return {"bytes": buffer.getvalue(), "path": None}
    scale, quality = COPIES[kind]
    if quality is None:
        return {"bytes": cell["bytes"], "path": None}
    image = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
    if scale != 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return {"bytes": buffer.getvalue(), "path": None}


def copy_features(recipe, data: PreparedData, sources: list[int], kinds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features and perceptual hashes of copies of test rows `sources` (`kinds[i]` of `sources[i]`), from the recipe's
    backbone and preprocessing."""
    test = data.splits["test"]
    cells = [copy_of(test[row][data.image_column], kind) for row, kind in zip(sources, kinds)]
    labels = [test[row][data.label_column] for row in sources]
    features = datasets.Features({data.image_column: datasets.Image(decode=False),
                                  data.label_column: datasets.ClassLabel(names=data.labels)})
    split = datasets.Dataset.from_dict({data.image_column: cells, data.label_column: labels}, features=features)
    copies = PreparedData(datasets.DatasetDict(train=split), data.labels, data.image_column, data.label_column, {})
    return _features(recipe, copies)["train"][0], perceptual_hash.image_hashes(copies)["train"]


def timed_doctor(recipe) -> list[dict]:
    """`run_doctor` as the command runs it, twice: the first run computes what is not cached yet (features, hashes), the
    second is warm."""
    runs = []
    for attempt in range(2):
        started = time.perf_counter()
        found = run_doctor(recipe)
        runs.append({"report": found, "seconds": time.perf_counter() - started, "attempt": attempt})
    return runs


def planted_copies(recipe, data: PreparedData, count: int, kinds: list[str], colour: int, rng) -> tuple[list[int], list[str], tuple]:
    """Test rows copied, the kind of each copy, and the copies' features and hashes: `count` of `kinds`, then `colour`
    in another colour mode, each of a different test image."""
    sources = sorted(rng.choice(len(data.splits["test"]), count + colour, replace=False).tolist())
    rng.shuffle(sources)
    planted_kinds = [kinds[index % len(kinds)] for index in range(count)] + [list(COLOUR_COPIES)[index % len(COLOUR_COPIES)]
                                                                             for index in range(colour)]
    return sources, planted_kinds, copy_features(recipe, data, sources, planted_kinds)


def calibrate(recipe, data: PreparedData, features: dict, count: int, rng) -> list[dict]:
    """Cosine similarity (as the doctor measures it) of every kind of copy of `count` test images to its source."""
    sources = sorted(rng.choice(len(data.splits["test"]), count, replace=False).tolist())
    kinds = list(CALIBRATION)
    found = copy_features(recipe, data, [row for row in sources for _ in kinds], kinds * count)[0].reshape(count, len(kinds), -1)
    originals = features["test"][0][sources]
    threshold, rows = options.DUPLICATE_THRESHOLD, []
    for position, kind in enumerate(kinds):
        similarity = np.sum(doctor.power_normalised(found[:, position]) * doctor.power_normalised(originals), axis=1)
        raw = np.sum(unit(found[:, position]) * unit(originals), axis=1)  # without the signed square root
        rows.append({"copy": kind, "images": count, "min": similarity.min(), "p10": np.quantile(similarity, 0.1),
                     "median": np.median(similarity), f"found at {threshold}": np.mean(similarity >= threshold),
                     "raw features: min": raw.min(), "raw: found": np.mean(raw >= threshold)})
    return rows


def unit(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def flip_labels(labels: np.ndarray, fraction: float, classes: int, rng) -> tuple[np.ndarray, np.ndarray]:
    flipped = np.sort(rng.choice(len(labels), round(fraction * len(labels)), replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes  # always another class
    return noisy, flipped


def key(image: dict) -> tuple[str, int]:
    return image["split"], image["index"]


def noise_dataset(root: Path) -> Path:
    """`NOISE["classes"]` classes of uniform RGB noise images (seeded), as a parquet dataset with all three splits, written
    once (a second run reads the same files, so the feature cache hits): images unlike ImageNet, all distinct."""
    folder = root / "noise_dataset"
    if (folder / "data" / "test-00000-of-00001.parquet").is_file():
        return folder
    rng, side = np.random.default_rng(0), NOISE["side"]
    classes = datasets.ClassLabel(names=[f"noise{number}" for number in range(NOISE["classes"])])
    features = datasets.Features({"image": datasets.Image(), "label": classes})
    for split in ("train", "validation", "test"):
        images, labels = [], []
        for label in range(NOISE["classes"]):
            for _ in range(NOISE[split]):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
                images.append({"bytes": buffer.getvalue(), "path": None})
                labels.append(label)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def main() -> None:
    options = arguments()
    offline_logging()
    datasets.config.HF_DATASETS_CACHE = options.cache_dir
    rng = np.random.default_rng(options.seed)
    dataset = noise_dataset(Path(options.output_root)) if options.dataset == "noise" else MIRRORS[options.dataset]
    recipe = parse_recipe(
        [], dataset=str(dataset), model=options.model, validation_size=VALIDATION_SIZE.get(options.dataset, 0.1),
        per_device_eval_batch_size=options.eval_batch_size, dataloader_num_workers=options.workers,
        output_dir=str(Path(options.output_root) / options.dataset), seed=42, disable_tqdm=True,
        max_train_samples=options.max_train, max_eval_samples=options.max_validation, max_test_samples=options.max_test,
    )
    runs = timed_doctor(recipe)
    clean = runs[-1]["report"]

    data = load_image_dataset(recipe.data, seed=recipe.training.seed)
    features = _features(recipe, data)
    hashes = perceptual_hash.image_hashes(data)
    names = data_check.image_names(data, recipe.data.dataset)
    kinds = options.kinds.split(",")
    sources, planted_kinds, (copy_features, copy_hashes) = planted_copies(recipe, data, options.leaks, kinds, options.colour_copies, rng)
    planted_features = {split: values for split, (values, _) in features.items()}
    planted_labels = {}
    flipped = {}
    for split, (_, labels) in features.items():
        planted_labels[split], flipped[split] = flip_labels(labels, options.flip, len(data.labels), rng)
    first_copy = len(planted_features["train"])
    planted_features["train"] = np.concatenate([planted_features["train"], copy_features])
    planted_labels["train"] = np.concatenate([planted_labels["train"], features["test"][1][sources]])
    planted_hashes = {**hashes, "train": np.concatenate([hashes["train"], copy_hashes])}
    names = {**names, "train": names["train"] + [f"copy-{index}" for index in range(len(sources))]}
    started = time.perf_counter()
    planted = doctor.diagnose(planted_features, planted_labels, data.labels, names, seed=recipe.training.seed, hashes=planted_hashes)
    analysis_seconds = time.perf_counter() - started

    # label issues
    truth = {(split, int(index)) for split, indices in flipped.items() for index in indices}
    flagged = [key(issue) for issue in planted["label_issues"]]
    own = {key(issue) for issue in clean["label_issues"]}
    hits = truth & set(flagged)
    others = [image for image in flagged if image not in truth]
    top = set(flagged[:len(truth)])
    # leaks: a planted copy is found when it is in one group of copies with its source
    copy_rows = {first_copy + number: (sources[number], kind) for number, kind in enumerate(planted_kinds)}
    group_of = {key(image): number for number, group in enumerate(planted["copy_groups"]) for image in group["images"]}
    all_kinds = list(dict.fromkeys(planted_kinds))
    found_kinds = {kind: 0 for kind in all_kinds}
    for row, (source, kind) in copy_rows.items():
        copy_group = group_of.get(("train", row))
        found_kinds[kind] += copy_group is not None and copy_group == group_of.get(("test", source))
    # A copy may also group with an image that the clean mirror groups with its source (a duplicate of the source): not false.
    clean_groups = [{key(image) for image in group["images"]} for group in clean["copy_groups"]]
    false_members = []
    for group in planted["copy_groups"]:
        members = {key(image) for image in group["images"]}
        copies = [row for split, row in members if split == "train" and row in copy_rows]
        allowed = set()
        for row in copies:
            source = ("test", copy_rows[row][0])
            allowed |= {("train", row), source} | next((known for known in clean_groups if source in known), set())
        if copies:
            false_members += sorted(members - allowed)
    found = sum(found_kinds.values())
    planted_per_kind = {kind: planted_kinds.count(kind) for kind in all_kinds}
    colour = [kind for kind in all_kinds if kind in COLOUR_COPIES]
    sizes = "/".join(str(len(features[split][0])) for split in ("train", "validation", "test"))
    row = {
        "dataset": options.dataset,
        "train/val/test": sizes,
        "flipped": len(truth),
        "flagged": len(flagged),
        "label_precision": len(hits) / max(len(flagged), 1),
        "label_recall": len(hits) / max(len(truth), 1),
        "top_k_precision": len(truth & top) / max(len(truth), 1),
        "flagged_not_flipped (of which the mirror's own)": f"{len(others)} ({sum(image in own for image in others)})",
        "planted_leaks": len(sources),
        "leaks_found": found,
        "leak_recall": found / max(len(sources), 1),
        "colour_mode_recall": sum(found_kinds[kind] for kind in colour) / max(sum(planted_per_kind[kind] for kind in colour), 1),
        "by_kind": ", ".join(f"{kind} {found_kinds[kind]}/{planted_per_kind[kind]}" for kind in all_kinds),
        "false_images_grouped_with_copies": len(false_members),
        "mirror_leaks": clean["summary"]["leak_pairs"],
        "mirror_near_duplicates": clean["summary"]["near_duplicate_pairs"],
        "mirror_copy_groups (images)": f"{clean['summary']['copy_groups']} ({clean['summary']['images_in_copy_groups']})",
        "mirror_groups_with_two_labels": clean["summary"]["conflicting_label_groups"],
        "features_meaningful": clean["copies"]["features_meaningful"],
        "doctor_s (first run)": runs[0]["seconds"],
        "doctor_s (warm)": runs[-1]["seconds"],
        "label_check_s": runs[-1]["report"]["timing"]["label_issues_s"],
        "duplicates_s": runs[-1]["report"]["timing"]["near_duplicates_s"],
        "hashes_s (warm)": runs[-1]["report"]["timing"]["hashes_s"],
        "analysis_s (planted)": analysis_seconds,
    }
    subset = f"; a subset: {sizes} images" if options.max_train or options.max_test or options.max_validation else ""
    settings = (f"{options.model}, seed {options.seed}; flip {options.flip:.0%} of every split; {options.leaks} test images copied into "
                f"train ({', '.join(kinds)} in turn) and {options.colour_copies} more in another colour mode ({', '.join(COLOUR_COPIES)}); "
                f"threshold {options.DUPLICATE_THRESHOLD}, pHash radius {perceptual_hash.HASH_RADIUS}, probe C {doctor.PROBE_C}, "
                f"{options.DoctorArguments().doctor_folds} folds{subset}")
    timing = ("doctor_s: `run_doctor` on the clean mirror, end to end (data preparation, features, hashes, checks, report, contact "
              "sheet); the first run computes what is not cached yet, warm = the second, features read from the feature cache and "
              "hashes from the datasets cache")
    own_findings = (f"the clean mirror's own findings: {clean['summary']['label_issues']} label issue(s), "
                    f"{clean['summary']['near_duplicate_pairs']} near-duplicate pair(s) within a split, "
                    f"{clean['summary']['leak_pairs']} leak pair(s), {clean['summary']['copy_groups']} group(s) of copies, "
                    f"{clean['summary']['conflicting_label_groups']} with two labels; features "
                    f"{'meaningful' if clean['copies']['features_meaningful'] else 'NOT meaningful'} ("
                    f"{clean['copies']['share_with_a_neighbour_above_threshold']:.1%} of the images have a neighbour at or above the "
                    f"threshold, median nearest neighbour {clean['copies']['median_nearest_neighbour']}){_top(clean)}")
    notes = [settings, timing, own_findings]
    notes += [f"falsely grouped with a copy: {split} {names[split][index]}" for split, index in false_members[:5]]
    if options.probe_c:
        notes.append("probe C sweep (flipped labels in the top k, k = flipped): " + probe_sweep(planted_features, planted_labels, truth,
                                                                                          options.probe_c, recipe.training.seed))
    if options.check_ivf:
        notes.append(check_ivf(planted_features))
    report(options.name, f"Data doctor on {options.dataset}: planted label flips and copies", [row], notes)
    if options.calibrate:
        rows = calibrate(recipe, data, features, options.calibrate, rng)
        own = data_check.image_names(data, recipe.data.dataset)
        report(options.name, f"Copies vs their source on {options.dataset}: cosine similarity of power-normalised features", rows,
               [f"{options.model}; the most similar pairs of the mirror's own images: {closest_pairs(features, own)}",
                f"on raw features (no signed square root): {closest_pairs(features, own, power=False)}"])


def _top(found: dict) -> str:
    issues = "; ".join(f"{issue['split']} {issue['image']} labelled {issue['label']}, suggested {issue['suggested_label']} "
                       f"({issue['suggested_probability']:.2f})" for issue in found["label_issues"][:5])
    pairs = "; ".join(f"{_name(pair['images'][0])} ~ {_name(pair['images'][1])} ({pair['similarity']:.3f})"
                      for pair in (found["leaks"] + found["near_duplicates"])[:5])
    return (f". Top label issues: {issues}" if issues else "") + (f". Top pairs: {pairs}" if pairs else "")


def _name(image: dict) -> str:
    return f"{image['split']} {image['image']}" + ("" if image["image"].startswith("#") else f" (#{image['index']})")


def closest_pairs(features: dict, names: dict, count: int = 8, power: bool = True) -> str:
    """The mirror's most similar pairs of images, duplicates or not, with their names; `power=False`: on raw features."""
    import faiss

    where = [(split, index) for split in features for index in range(len(features[split][0]))]
    pooled = np.concatenate([values for values, _ in features.values()])
    pooled = np.ascontiguousarray(doctor.power_normalised(pooled) if power else unit(pooled), dtype=np.float32)
    index = faiss.IndexFlatIP(pooled.shape[1])
    index.add(pooled)
    similarity, found = index.search(pooled, 2)
    pairs = {(min(row, int(other)), max(row, int(other))): float(value)
             for row, (others, values) in enumerate(zip(found, similarity)) for other, value in zip(others, values) if other != row}
    nearest = sorted(pairs.items(), key=lambda item: -item[1])[:count]
    named = [[f"{where[row][0]} {names[where[row][0]][where[row][1]]}" for row in pair] for pair, _ in nearest]
    return "; ".join(f"{first} ~ {second} ({value:.3f})" for (first, second), (_, value) in zip(named, nearest))


def probe_sweep(features: dict, labels: dict, truth: set, values: str, seed: int) -> str:
    splits = list(features)
    pooled = np.concatenate([features[split] for split in splits])
    pooled_labels = np.concatenate([labels[split] for split in splits])
    where = [(split, index) for split in splits for index in range(len(features[split]))]
    results, default = [], doctor.PROBE_C
    try:
        for value in values.split(","):
            doctor.PROBE_C = float(value)
            started = time.perf_counter()
            ranked = doctor.find_label_issues(pooled, pooled_labels, seed=seed)["ranked"]
            top = {where[row] for row, *_ in ranked[:len(truth)]}
            results.append(f"C={value}: {len(top & truth)}/{len(truth)} ({time.perf_counter() - started:.1f} s)")
    finally:
        doctor.PROBE_C = default
    return ", ".join(results)


def check_ivf(features: dict) -> str:
    pooled = np.concatenate(list(features.values()))
    started = time.perf_counter()
    inverted = doctor.similar_pairs(pooled, options.DUPLICATE_THRESHOLD, exact_up_to=0)
    inverted_s = time.perf_counter() - started
    started = time.perf_counter()
    exhaustive = doctor.similar_pairs(pooled, options.DUPLICATE_THRESHOLD, exact_up_to=len(pooled))
    exhaustive_s = time.perf_counter() - started
    pairs = {tuple(pair) for pair in exhaustive[:, :2].astype(int)}
    found = pairs & {tuple(pair) for pair in inverted[:, :2].astype(int)}
    return (f"inverted-file search vs exhaustive on {len(pooled):,} images: {len(found)}/{len(pairs)} pairs "
            f"({inverted_s:.1f} s vs {exhaustive_s:.1f} s)")


if __name__ == "__main__":
    main()
