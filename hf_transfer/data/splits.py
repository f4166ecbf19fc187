"""A dataset's three splits, map-style: loaded from the Hub, the datasets cache or a local folder, columns found by feature
type, labels checked, missing splits carved (stratified, seeded), unreadable images found once, counted and skipped.

Images stay undecoded in the Arrow table (`Image(decode=False)`); every access decodes them through `images.load_image`."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..errors import DatasetError
from ..images import unreadable_reason
from ..offline import hub_reachable, offline_mode
from ..options import LIMITS, DataArguments, number_text
from .folders import load_local, relative_to

logger = logging.getLogger(__name__)

PREFERRED_IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
PREFERRED_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


@dataclass
class PreparedData:
    """What the rest of the flow needs: three splits, the label names and what was skipped."""

    splits: datasets.DatasetDict
    labels: list[str]
    image_column: str
    label_column: str
    skipped: dict[str, list[str]]

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def load_image_dataset(args: DataArguments, seed: int = 42) -> PreparedData:
    raw = _load(args)
    train = raw[args.train_split]
    image_column, label_column = find_columns(train.features, args)
    labels = train.features[label_column].names

    check_label_values({"train": train}, label_column, labels)  # before the stratified carving trips over a bad label
    splits = _carve_splits(raw, args, label_column, seed)
    limits = {split: getattr(args, option) for option, split in LIMITS.items()}
    splits = datasets.DatasetDict({
        name: split if limits[name] is None else split.shuffle(seed=seed).select(range(min(limits[name], len(split))))
        for name, split in splits.items()
    })
    check_label_values(splits, label_column, labels)
    splits = splits.cast_column(image_column, datasets.Image(decode=False))
    splits, skipped = readable(splits, image_column, args)
    return PreparedData(splits, labels, image_column, label_column, skipped)


def find_columns(features: datasets.Features, args: DataArguments) -> tuple[str, str]:
    """The image and label columns: as the recipe names them, else found by feature type; the label must be a ClassLabel."""
    image_column = args.image_column or _find_column(features, datasets.Image, PREFERRED_IMAGE_COLUMNS, "image", args.dataset)
    label_column = args.label_column or _find_column(features, datasets.ClassLabel, PREFERRED_LABEL_COLUMNS, "label", args.dataset)
    for kind, column in (("image", image_column), ("label", label_column)):
        if column not in features:
            raise DatasetError(f"Dataset '{args.dataset}' has no column '{column}' (it has {list(features)}). Set `{kind}_column` to one of them.")
    _check_label_feature(features, label_column)
    return image_column, label_column


def readable(splits: datasets.DatasetDict, image_column: str, args: DataArguments) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    """`splits` without their unreadable images (or an error listing them, `skip_unreadable_images: false`), and the
    names of those skipped per split; every split must keep at least one image."""
    skipped, root = {}, local_root(args.dataset)
    for name, split in splits.items():
        if len(split) == 0:  # `map` over no rows returns no `reason` column
            skipped[name] = []
            continue
        reasons = split.select_columns([image_column]).map(
            lambda batch: {"reason": [unreadable_reason(cell) for cell in batch[image_column]]},
            batched=True, remove_columns=[image_column], desc=f"Checking {name} images",
        )["reason"]
        bad = [index for index, reason in enumerate(reasons) if reason]
        skipped[name] = [f"{shareable_name(split[index][image_column], index, root)}: {reasons[index]}" for index in bad]
        if bad:
            logger.warning("Skipping %d unreadable image(s) in %s, e.g. %s", len(bad), name, skipped[name][0])
            splits[name] = split.select(sorted(set(range(len(split))) - set(bad)))
    if not args.skip_unreadable_images and any(skipped.values()):
        listing = "\n".join(f"  {name}: {entry}" for name, entries in skipped.items() for entry in entries)
        raise DatasetError(f"Unreadable images (set `skip_unreadable_images: true` to skip them):\n{listing}")
    for name, split in splits.items():
        if len(split) == 0:
            raise DatasetError(f"The {name} split has no usable images ({len(skipped[name])} were unreadable). Give it readable images.")
    return splits, skipped


def local_path(dataset: str) -> Path:
    """The `dataset` option as a local path (which may not exist: then it names a Hub dataset); a path that cannot be a Hub
    id (`./x`, `/x`, `~/x`, `a/b/c`) must exist."""
    local = Path(dataset).expanduser()
    if not local.exists() and (dataset.startswith((".", "/", "~")) or dataset.count("/") > 1):
        raise DatasetError(f"Dataset folder '{dataset}' does not exist. Give an existing folder or a Hub id such as `uoft-cs/cifar10`.")
    return local


def _load(args: DataArguments) -> datasets.DatasetDict:
    local = local_path(args.dataset)
    if local.is_file() or local.is_dir():
        raw = load_local(local, args)
    elif hub_reachable():
        raw = datasets.load_dataset(args.dataset, args.dataset_config)
    else:
        raw = _load_from_cache(args)
    if args.train_split not in raw:
        raise DatasetError(f"Dataset '{args.dataset}' has no '{args.train_split}' split (it has {list(raw)}). Set `train_split`.")
    return raw


def _load_from_cache(args: DataArguments) -> datasets.DatasetDict:
    try:
        with offline_mode():
            return datasets.load_dataset(args.dataset, args.dataset_config)
    except (ConnectionError, FileNotFoundError) as error:
        raise DatasetError(
            f"Cannot load '{args.dataset}': the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1) and the dataset "
            f"is not in the datasets cache ({error.__class__.__name__}). Point `dataset` at a local copy instead, "
            "e.g. a parquet export with the Hub layout or an image folder."
        ) from None


def _find_column(features, feature_type, preferred, kind, dataset: str) -> str:
    candidates = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    if not candidates:
        named = next((name for name in preferred if name in features), None)
        if kind == "label" and named:
            _check_label_feature(features, named)  # a `label` column of strings or plain ints: say so
        hint = ("cast the label column with `dataset.class_encode_column(...)` or set `label_column`" if kind == "label"
                else "set `image_column`")
        raise DatasetError(f"Dataset '{dataset}' has no {kind} column ({feature_type.__name__} feature) among {list(features)}: {hint}.")
    return next((name for name in preferred if name in candidates), candidates[0])


def _check_label_feature(features, label_column) -> None:
    feature = features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise DatasetError(
            f"Label column '{label_column}' is {feature!r}, not a ClassLabel, so there are no class names. "
            f"Encode it first: `dataset = dataset.class_encode_column('{label_column}')`, then save or push that dataset."
        )
    if feature.num_classes < 2:
        raise DatasetError(f"Label column '{label_column}' has {feature.num_classes} class; classification needs at least 2.")


def label_values(split: datasets.Dataset, label_column: str) -> list[int]:
    """The split's labels, read as one Arrow column: iterating `split[label_column]` reads them row by row (0.28 s for
    CIFAR-10's 50,000 train labels, 0.8 ms as a column), and a run reads them before and after carving its splits."""
    return split.with_format("arrow", columns=[label_column])[label_column].to_pylist()


def check_label_values(splits, label_column, labels) -> None:
    for name, split in splits.items():
        values = set(label_values(split, label_column))
        out_of_range = sorted(value for value in values if not 0 <= value < len(labels))
        if out_of_range:
            raise DatasetError(
                f"The {name} split has label values {out_of_range[:5]} outside 0..{len(labels) - 1} "
                f"(classes {labels}). Fix or drop those rows, or re-encode the column with `class_encode_column`."
            )
        missing = [labels[index] for index in range(len(labels)) if index not in values]
        if name == "train" and not values:
            raise DatasetError("The train split is empty. Give it images, or raise `max_train_samples`.")
        if name == "train" and len(values) < 2:
            raise DatasetError(f"The train split holds only one class ({labels[values.pop()]}); classification needs at least two.")
        if name == "test" and missing:
            raise DatasetError(
                f"The test split has no images of class(es) {missing}, so their accuracy cannot be measured. "
                "Raise `max_test_samples`, or give a test split (or `test_size`) that covers every class."
            )


# The names a dataset's own held-out splits go by when the recipe names none (`validation_split`, `test_split`).
HELD_OUT_NAMES = {"test": ("test",), "validation": ("validation", "valid", "val")}


def existing_split(raw, args: DataArguments, kind: str) -> str | None:
    """The dataset's own `kind` split ("test" or "validation"): the one the recipe names (which must exist), else the
    first of HELD_OUT_NAMES present; None when there is none, to be carved from train."""
    requested = getattr(args, f"{kind}_split")
    if requested:
        if requested not in raw:
            raise DatasetError(f"Split '{requested}' does not exist; the dataset has {list(raw)}.")
        return requested
    return next((name for name in HELD_OUT_NAMES[kind] if name in raw), None)


def _carve_splits(raw, args, label_column, seed) -> datasets.DatasetDict:
    """Use the dataset's own validation/test splits; carve what is missing from train, stratified."""
    names = {name: existing_split(raw, args, name) for name in ("test", "validation")}
    train, held_out, carved_before = raw[args.train_split], {}, ""
    for name, present in names.items():
        if present is None:
            train, held_out[name] = _stratified_split(train, name, getattr(args, f"{name}_size"), label_column, seed, carved_before)
            carved_before = " (after carving the test split)"
        else:
            held_out[name] = raw[present]
    splits = datasets.DatasetDict(train=train, validation=held_out["validation"], test=held_out["test"])
    for name, split in splits.items():
        if len(split) == 0:
            raise DatasetError(f"The {name} split is empty. Give a non-empty split or a larger `{name}_size`.")
    return splits


def _stratified_split(dataset, name, size, label_column, seed, carved_before=""):
    """Carve `name` from train with `train_test_split`, after checking what its stratification needs (one image of every
    class on each side), so that a failure names the option the user set rather than datasets' `test_size`."""
    option, total = f"{name}_size", len(dataset)
    count = math.ceil(size * total) if size < 1 else int(size)  # datasets' own rounding of a fraction (scikit-learn's)
    source = f"the train split{carved_before}"
    if count >= total:
        raise DatasetError(
            f"`{option}: {number_text(size)}` asks for {count} images but the train split has only {total}{carved_before}. "
            f"Lower `{option}` (a fraction such as 0.1, or fewer than {total} images), or give the dataset a {name} split."
        )
    counts = Counter(label_values(dataset, label_column))
    names = dataset.features[label_column].names
    single = [names[label] for label in sorted(counts) if counts[label] < 2]
    if single:
        classes, has, which = ("Class", "has", "that class") if len(single) == 1 else ("Classes", "have", "those classes")
        raise DatasetError(
            f"{classes} {single[:10]} {has} only 1 image in {source}, so `{option}` cannot "
            f"carve a stratified {name} split (it needs one image of each class there and one left for training). "
            f"Add images of {which}, or give the dataset a {name} split."
        )
    if count < len(counts):
        fraction = math.ceil(len(counts) / total * 100) / 100
        raise DatasetError(
            f"`{option}: {number_text(size)}` carves {count} of the {total} images in {source} for {len(counts)} classes; a "
            f"stratified split needs one of each. Set `{option}` to at least {len(counts)} (images) or {fraction:g} (a fraction)."
        )
    if total - count < len(counts):
        raise DatasetError(
            f"`{option}: {number_text(size)}` leaves {total - count} images in {source} for {len(counts)} classes; training needs one "
            f"of each. Set `{option}` to at most {total - len(counts)}, or add images."
        )
    parts = dataset.train_test_split(test_size=count, stratify_by_column=label_column, seed=seed)
    return parts["train"], parts["test"]


def image_name(cell, index) -> str:
    return (cell or {}).get("path") or f"#{index}"


def shareable_name(cell, index, root: Path | None) -> str:
    """The image's name as it may be published (all_results.json and the model card are pushed): its path relative to
    the local dataset folder `root`, the file name of any other absolute path, the stored relative path, or `#index`."""
    name = image_name(cell, index)
    path = Path(name)
    if not path.is_absolute():
        return name
    return (relative_to(path, root) if root is not None else Path(path.name)).as_posix()


def local_root(dataset: str) -> Path | None:
    """The local folder image names are relative to: the dataset's folder or its parquet file's; None for a Hub dataset."""
    local = Path(dataset).expanduser()
    return local.parent if local.is_file() else local if local.is_dir() else None


