"""Load an image-classification dataset, find its columns, carve missing splits, attach transforms.

Images stay undecoded in the Arrow table (`Image(decode=False)`); every access decodes them
through `images.load_image`, so unreadable files are found once, counted and skipped.
Small images of one size can skip the CPU resize: see `device_resize`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import timm.data
import torch
from torchvision import transforms as T

from .errors import HFTransferError
from .images import load_image, unreadable_reason
from .offline import hub_reachable, offline_mode

logger = logging.getLogger(__name__)

AUGMENTATIONS = ("default", "none", "randaugment", "trivialaugment")
RESIZE_ON_DEVICE = ("auto", "true", "false")
_PREFERRED_IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
_PREFERRED_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


@dataclass
class DataArguments:
    dataset: str = field(
        default=None,
        metadata={"help": "A Hub dataset id (`uoft-cs/cifar10`) or a local folder (parquet export or image folder)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name, if it has several."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; found by feature type when unset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (a ClassLabel); found by feature type when unset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(default=None, metadata={"help": "Validation split; `validation`/`valid`/`val` if present, else carved from train."})
    test_split: str | None = field(default=None, metadata={"help": "Held-out test split; `test` if present, else carved from train."})
    validation_size: float = field(default=0.1, metadata={"help": "Fraction (<1) or number of train images carved out for validation when there is no such split."})
    test_size: float = field(default=0.1, metadata={"help": "Fraction (<1) or number of train images carved out for test when there is no such split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the train split to this many images (debugging, quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation split to this many images."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate the test split to this many images."})
    augmentation: str = field(default="default", metadata={"help": f"Train-time augmentation: {' | '.join(AUGMENTATIONS)}. `default` = random-resized-crop + flip."})
    crop_min_scale: float = field(default=0.35, metadata={"help": "Smallest area fraction kept by the random-resized-crop."})
    skip_unreadable_images: bool = field(default=True, metadata={"help": "Skip (and count) images that cannot be decoded; false = stop and list them."})
    resize_on_device: str = field(
        default="auto",
        metadata={"help": (
            "Send images of one size to the training device at that size and resize, crop and normalise them there, batched "
            "(the CPU only decodes): auto = on a CUDA device when the images are smaller than the model's input (CIFAR's 32 px) "
            "| true | false. `default` augmentation is then a random shift by 1/8 of the side (reflect padding) + flip."
        )},
    )

    def __post_init__(self):
        self.resize_on_device = str(self.resize_on_device).lower()  # YAML `true` arrives as True or "True"
        if self.resize_on_device not in RESIZE_ON_DEVICE:
            raise ValueError(f"`resize_on_device: {self.resize_on_device}` is not one of {' | '.join(RESIZE_ON_DEVICE)}.")


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


class DatasetError(HFTransferError, ValueError):
    """A dataset that cannot be used as it is; the message says how to fix it."""


def load_image_dataset(args: DataArguments, seed: int = 42) -> PreparedData:
    raw = _load(args)
    train = raw[args.train_split]
    image_column = args.image_column or _find_column(train.features, datasets.Image, _PREFERRED_IMAGE_COLUMNS, "image", args)
    label_column = args.label_column or _find_column(train.features, datasets.ClassLabel, _PREFERRED_LABEL_COLUMNS, "label", args)
    for kind, column in (("image", image_column), ("label", label_column)):
        if column not in train.features:
            raise DatasetError(f"Dataset '{args.dataset}' has no column '{column}' (it has {list(train.features)}). Set `{kind}_column` to one of them.")
    _check_label_feature(train.features, label_column)
    labels = train.features[label_column].names

    _check_label_values({"train": train}, label_column, labels)  # before the stratified carving trips over a bad label
    splits = _carve_splits(raw, args, label_column, seed)
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_test_samples}
    splits = datasets.DatasetDict({
        name: split if limits[name] is None else split.shuffle(seed=seed).select(range(min(limits[name], len(split))))
        for name, split in splits.items()
    })
    _check_label_values(splits, label_column, labels)
    splits = splits.cast_column(image_column, datasets.Image(decode=False))
    splits, skipped = _drop_unreadable(splits, image_column, args.skip_unreadable_images)
    for name, split in splits.items():
        if len(split) == 0:
            raise DatasetError(f"The {name} split has no usable images ({len(skipped[name])} were unreadable). Give it readable images.")
    return PreparedData(splits, labels, image_column, label_column, skipped)


def _load(args: DataArguments) -> datasets.DatasetDict:
    local = Path(args.dataset).expanduser()
    if not local.exists() and (args.dataset.startswith((".", "/", "~")) or args.dataset.count("/") > 1):
        raise DatasetError(f"Dataset folder '{args.dataset}' does not exist. Give an existing folder or a Hub id such as `uoft-cs/cifar10`.")
    if local.exists():
        try:
            raw = datasets.load_dataset(str(local), args.dataset_config)
        except ValueError as error:
            if "corresponds to no data" not in str(error):  # datasets' words for a split whose files hold no rows
                raise
            raise DatasetError(
                f"Dataset folder '{args.dataset}' has an empty split (datasets says: {error}). Give every split images, "
                "or delete the empty split's files so that it is carved from train."
            ) from None
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


def _find_column(features, feature_type, preferred, kind, args) -> str:
    candidates = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    named = next((name for name in preferred if name in features), None)
    if not candidates and kind == "label" and named:
        _check_label_feature(features, named)  # a `label` column of strings or plain ints: say so
    if not candidates:
        hint = (
            "cast the label column with `dataset.class_encode_column(...)` or set `label_column`"
            if kind == "label" else "set `image_column`"
        )
        raise DatasetError(f"Dataset '{args.dataset}' has no {kind} column ({feature_type.__name__} feature) among {list(features)}: {hint}.")
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


def _check_label_values(splits, label_column, labels) -> None:
    for name, split in splits.items():
        values = set(split[label_column])
        out_of_range = sorted(value for value in values if not 0 <= value < len(labels))
        if out_of_range:
            raise DatasetError(
                f"The {name} split has label values {out_of_range[:5]} outside 0..{len(labels) - 1} "
                f"(classes {labels}). Fix or drop those rows, or re-encode the column with `class_encode_column`."
            )
        missing = [labels[index] for index in range(len(labels)) if index not in values]
        if name == "train" and len(values) < 2:
            raise DatasetError(f"The train split holds only one class ({labels[values.pop()]}); classification needs at least two.")
        if name == "test" and missing:
            raise DatasetError(
                f"The test split has no images of class(es) {missing}, so their accuracy cannot be measured. "
                "Raise `max_test_samples`, or give a test split (or `test_size`) that covers every class."
            )


def _existing_split(raw, requested, defaults) -> str | None:
    if requested:
        if requested not in raw:
            raise DatasetError(f"Split '{requested}' does not exist; the dataset has {list(raw)}.")
        return requested
    return next((name for name in defaults if name in raw), None)


def _carve_splits(raw, args, label_column, seed) -> datasets.DatasetDict:
    """Use the dataset's own validation/test splits; carve what is missing from train, stratified."""
    train = raw[args.train_split]
    test_name = _existing_split(raw, args.test_split, ("test",))
    validation_name = _existing_split(raw, args.validation_split, ("validation", "valid", "val"))
    if test_name is None:
        train, test = _stratified_split(train, args.test_size, label_column, seed)
    else:
        test = raw[test_name]
    if validation_name is None:
        train, validation = _stratified_split(train, args.validation_size, label_column, seed)
    else:
        validation = raw[validation_name]
    splits = datasets.DatasetDict(train=train, validation=validation, test=test)
    for name, split in splits.items():
        if len(split) == 0:
            raise DatasetError(f"The {name} split is empty. Give a non-empty split or a larger `{name}_size`.")
    return splits


def _stratified_split(dataset, size, label_column, seed):
    size = int(size) if size >= 1 else size
    parts = dataset.train_test_split(test_size=size, stratify_by_column=label_column, seed=seed)
    return parts["train"], parts["test"]


def _drop_unreadable(splits, image_column, skip) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    skipped = {}
    for name, split in splits.items():
        reasons = split.select_columns([image_column]).map(
            lambda batch: {"reason": [unreadable_reason(cell) for cell in batch[image_column]]},
            batched=True, remove_columns=[image_column], desc=f"Checking {name} images",
        )["reason"]
        bad = [index for index, reason in enumerate(reasons) if reason]
        skipped[name] = [f"{image_name(split[index][image_column], index)}: {reasons[index]}" for index in bad]
        if bad:
            logger.warning("Skipping %d unreadable image(s) in %s, e.g. %s", len(bad), name, skipped[name][0])
            splits[name] = split.select(sorted(set(range(len(split))) - set(bad)))
    if not skip and any(skipped.values()):
        listing = "\n".join(f"  {name}: {entry}" for name, entries in skipped.items() for entry in entries)
        raise DatasetError(f"Unreadable images (set `skip_unreadable_images: true` to skip them):\n{listing}")
    return splits, skipped


def image_name(cell, index) -> str:
    return (cell or {}).get("path") or f"#{index}"


def check_augmentation(augmentation: str) -> None:
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation '{augmentation}'; choose one of {AUGMENTATIONS}.")


def build_transforms(data_config: dict, augmentation: str = "default", crop_min_scale: float = 0.35):
    """Train and eval transforms from the model's data config; augmentation is train-only."""
    check_augmentation(augmentation)
    eval_transform = timm.data.create_transform(**data_config, is_training=False)
    if augmentation == "none":
        return eval_transform, eval_transform
    primary, _, final = timm.data.create_transform(
        **data_config, is_training=True, scale=(crop_min_scale, 1.0), color_jitter=None, separate=True
    )
    extra = {"randaugment": [T.RandAugment()], "trivialaugment": [T.TrivialAugmentWide()]}.get(augmentation, [])
    return T.Compose([*primary.transforms, *extra, *final.transforms]), eval_transform


def attach_transforms(data: PreparedData, train_transform, eval_transform) -> datasets.DatasetDict:
    """Decode and transform lazily, batch by batch, never materialising decoded images."""

    def transformer(transform):
        def apply(batch):
            return {
                "pixel_values": [transform(load_image(cell)) for cell in batch[data.image_column]],
                "labels": batch[data.label_column],
            }
        return apply

    return datasets.DatasetDict({
        name: split.with_transform(transformer(train_transform if name == "train" else eval_transform))
        for name, split in data.splits.items()
    })


def collate(examples) -> dict[str, torch.Tensor]:
    pixels = [example["pixel_values"] for example in examples]
    shapes = {tuple(pixel.shape) for pixel in pixels}
    if len(shapes) > 1:  # only images resized on the device keep their own size
        raise DatasetError(
            f"Images of different sizes {sorted(shapes)[:3]} in one batch: `resize_on_device` needs one image size. "
            "Set `resize_on_device: false` to resize every image on the CPU."
        )
    return {
        "pixel_values": torch.stack(pixels),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }
