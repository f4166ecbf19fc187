"""Load an image-classification dataset, find its columns, carve missing splits, attach transforms.

Images stay undecoded in the Arrow table (`Image(decode=False)`); every access decodes them
through `images.load_image`, so unreadable files are found once, counted and skipped.
Small images of one size can skip the CPU resize: see `device_resize`.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import timm.data
import torch
from datasets.data_files import FILES_TO_IGNORE, EmptyDatasetError
from torchvision import transforms as T

from .errors import DatasetError
from .escape import one_line
from .images import load_image, unreadable_reason
from .offline import hub_reachable, offline_mode
from .options import AUGMENTATIONS, LIMITS, DataArguments, number_text

logger = logging.getLogger(__name__)

_PREFERRED_IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
_PREFERRED_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


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

    _check_label_values({"train": train}, label_column, labels)  # before the stratified carving trips over a bad label
    splits = _carve_splits(raw, args, label_column, seed)
    limits = {split: getattr(args, option) for option, split in LIMITS.items()}
    splits = datasets.DatasetDict({
        name: split if limits[name] is None else split.shuffle(seed=seed).select(range(min(limits[name], len(split))))
        for name, split in splits.items()
    })
    _check_label_values(splits, label_column, labels)
    splits = splits.cast_column(image_column, datasets.Image(decode=False))
    splits, skipped = readable(splits, image_column, args)
    return PreparedData(splits, labels, image_column, label_column, skipped)


def find_columns(features: datasets.Features, args: DataArguments) -> tuple[str, str]:
    """The image and label columns: as the recipe names them, else found by feature type; the label must be a ClassLabel."""
    image_column = args.image_column or _find_column(features, datasets.Image, _PREFERRED_IMAGE_COLUMNS, "image", args)
    label_column = args.label_column or _find_column(features, datasets.ClassLabel, _PREFERRED_LABEL_COLUMNS, "label", args)
    for kind, column in (("image", image_column), ("label", label_column)):
        if column not in features:
            raise DatasetError(f"Dataset '{args.dataset}' has no column '{column}' (it has {list(features)}). Set `{kind}_column` to one of them.")
    _check_label_feature(features, label_column)
    return image_column, label_column


def readable(splits: datasets.DatasetDict, image_column: str, args: DataArguments) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    """`splits` without their unreadable images (or an error listing them, `skip_unreadable_images: false`), and the
    names of those skipped per split; every split must keep at least one image."""
    splits, skipped = _drop_unreadable(splits, image_column, args.skip_unreadable_images, _local_root(args.dataset))
    for name, split in splits.items():
        if len(split) == 0:
            raise DatasetError(f"The {name} split has no usable images ({len(skipped[name])} were unreadable). Give it readable images.")
    return splits, skipped


def _load(args: DataArguments) -> datasets.DatasetDict:
    local = Path(args.dataset).expanduser()
    if not local.exists() and (args.dataset.startswith((".", "/", "~")) or args.dataset.count("/") > 1):
        raise DatasetError(f"Dataset folder '{args.dataset}' does not exist. Give an existing folder or a Hub id such as `uoft-cs/cifar10`.")
    if local.is_file():
        raw = _load_file(local, args)
    elif local.is_dir():
        raw = _load_folder(local, args)
    elif hub_reachable():
        raw = datasets.load_dataset(args.dataset, args.dataset_config)
    else:
        raw = _load_from_cache(args)
    if args.train_split not in raw:
        raise DatasetError(f"Dataset '{args.dataset}' has no '{args.train_split}' split (it has {list(raw)}). Set `train_split`.")
    return raw


def _load_file(local: Path, args: DataArguments) -> datasets.DatasetDict:
    """One parquet file (one split of a Hub export, say) is the train split; validation and test are carved from it."""
    if local.suffix != ".parquet":
        raise DatasetError(
            f"Dataset '{args.dataset}' is a file, not a folder or a .parquet file. Give a folder (an image folder with one "
            "sub-folder per class, or a parquet export) or one .parquet file."
        )
    logger.info("Loading %s as the %s split; the splits it lacks are carved from it", local.name, args.train_split)
    return _prepare(file_builder(local, args), args)


def file_builder(local: Path, args: DataArguments):
    """The datasets builder that reads one parquet file as the train split."""
    return datasets.load_dataset_builder("parquet", data_files={args.train_split: [glob.escape(str(local.resolve()))]})


def _load_folder(local: Path, args: DataArguments) -> datasets.DatasetDict:
    builder = folder_builder(local, args)
    image_folder = builder.name == "imagefolder"
    raw = _prepare(builder, args)
    if image_folder:
        _log_class_counts(raw, args)
    return raw


def folder_builder(local: Path, args: DataArguments):
    """The datasets builder of a local folder (linked folders followed), its image-folder layout checked."""
    try:
        builder = datasets.load_dataset_builder(str(local), args.dataset_config)
    except EmptyDatasetError:
        builder = None
    if builder is None or builder.name == "imagefolder":
        links = _folder_links(local, args)
        _check_names(local, args)
        if links:
            logger.info("Following the linked folder(s) %s in %s", [link.as_posix() for link in links[:10]], args.dataset)
            data_files = _data_files_through_links(local, links)
            builder = datasets.load_dataset_builder(str(local), args.dataset_config, data_files=data_files) if data_files else None
    if builder is None:
        raise DatasetError(
            f"Dataset folder '{args.dataset}' holds no data files (no images, parquet, arrow, csv or json; hidden files and "
            f"folders do not count). Put the images in one folder per class ({local}/<class>/<image>, e.g. cat/1.jpg and "
            f"dog/2.jpg) or give a parquet export ({local}/data/train-00000-of-00001.parquet)."
        )
    if builder.name == "imagefolder":
        _check_image_folder_layout(local, builder, args)
    return builder


def _prepare(builder, args: DataArguments) -> datasets.DatasetDict:
    """What `datasets.load_dataset` does with a builder; a split whose files hold no rows gets a message."""
    try:
        builder.download_and_prepare()
        return builder.as_dataset()
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # datasets' words for a split whose files hold no rows
            raise
        raise DatasetError(
            f"Dataset folder '{args.dataset}' has an empty split (datasets says: {error}). Give every split images, "
            "or delete the empty split's files so that it is carved from train."
        ) from None


# datasets' file search (fsspec's glob) lists a symlinked folder as neither file nor folder and skips it, with no
# word: the class would be missing. Linked folders are found here and their files passed to datasets by name.
_SKIPPED_NAMES = (".", "__")  # datasets skips hidden files and folders and `__special__` folders too


def _folder_links(root: Path, args: DataArguments) -> list[Path]:
    """The links to folders under `root` (relative paths, links inside linked folders too); broken or looping ones refused."""
    root_real = root.resolve()
    links, pending, targets = [], [Path()], set()
    while pending:
        folder = pending.pop()
        with os.scandir(root / folder) as entries:
            for entry in entries:
                if entry.name.startswith(_SKIPPED_NAMES):
                    continue
                path = folder / entry.name
                if entry.is_symlink():
                    target = Path(os.path.realpath(root / path))
                    if not target.exists():
                        raise DatasetError(
                            f"The link '{path.as_posix()}' in dataset folder '{args.dataset}' points to '{target}', which does not "
                            "exist, so its images would be left out. Fix the link or remove it."
                        )
                    if target.is_dir():
                        _check_link_target(path, target, root_real, (root / folder).resolve(), targets, args)
                        links.append(path)
                        targets.add(target)
                if entry.is_dir():  # follows links
                    pending.append(path)
    return sorted(links)


# Names datasets' image folders cannot read (tried with datasets 5.2): fsspec's glob never matches a line break, so the
# folder or file is left out without a word; a backslash counts as a path separator when datasets compares the depths
# of the files, so no image gets a class.
_UNREADABLE_IN_NAMES = {"\n": ("a line break", "would be left out without a word"),
                        "\\": ("a backslash", "would make datasets drop the class of every image")}


def _check_names(root: Path, args: DataArguments) -> None:
    """Refuse a folder or file under `root` whose name datasets cannot read (a class folder named "cat\\n" by a script)."""
    for folder, folders, files in os.walk(root, followlinks=True):  # _folder_links has refused loops
        folders[:] = sorted(name for name in folders if not name.startswith(_SKIPPED_NAMES))  # sorted: the same one named each time
        files = sorted(name for name in files if not name.startswith(_SKIPPED_NAMES) and name not in FILES_TO_IGNORE)
        for name in folders + files:
            found = next((_UNREADABLE_IN_NAMES[part] for part in _UNREADABLE_IN_NAMES if part in name), None)
            if found:
                path = Path(folder, name)
                size = f" ({sum(len(inside) for _, _, inside in os.walk(path))} files)" if path.is_dir() else ""
                raise DatasetError(
                    f"Image folder '{args.dataset}': the {'folder' if size else 'file'} {path.relative_to(root).as_posix()!r}"
                    f"{size} has {found[0]} in its name, which datasets cannot read: it {found[1]}. Rename it."
                )


def _check_link_target(path: Path, target: Path, root_real: Path, parent_real: Path, targets: set, args: DataArguments) -> None:
    if target == root_real or root_real in target.parents:
        where = "points back into the dataset folder"
    elif target == parent_real or target in parent_real.parents:
        where = "points to a folder that holds it"
    elif target in targets:
        where = "points to a folder that another link already adds"
    else:
        return
    raise DatasetError(
        f"The folder link '{path.as_posix()}' in '{args.dataset}' {where} ('{target}'), so its images would be read twice "
        "or without end. Remove the link, or replace it with a copy of the images it should add."
    )


def _data_files_through_links(root: Path, links: list[Path]) -> dict[str, list[str]]:
    """Split patterns inferred by datasets' own rules over every file, linked ones included; linked files named one by one."""
    from fsspec.utils import glob_translate  # the translation fsspec's glob uses (fsspec >= 2023.12)

    files = []
    for folder, folders, names in os.walk(root, followlinks=True):  # _folder_links has refused loops
        folders[:] = [name for name in folders if not name.startswith(_SKIPPED_NAMES)]
        relative = Path(folder).relative_to(root)
        files += [(relative / name).as_posix() for name in names if not name.startswith(_SKIPPED_NAMES) and name not in FILES_TO_IGNORE]
    prefixes = tuple(f"{link.as_posix()}/" for link in links)
    matcher = lambda pattern: re.compile(glob_translate(pattern)).match

    def resolve(pattern: str) -> list[str]:
        matched = list(filter(matcher(pattern), files))
        if not matched:
            raise FileNotFoundError(pattern)
        return matched

    try:
        patterns = datasets.data_files._get_data_files_patterns(resolve)  # what `get_data_patterns` runs on the real files
    except FileNotFoundError:
        return {}
    data_files = {}
    for split, split_patterns in patterns.items():
        matchers = [matcher(pattern) for pattern in split_patterns]
        linked = [glob.escape(file) for file in files if file.startswith(prefixes) and any(match(file) for match in matchers)]
        data_files[split] = [*split_patterns, *linked]
    return data_files




def _check_image_folder_layout(root: Path, builder, args: DataArguments) -> None:
    """datasets' imagefolder takes classes from folder names only when every image sits at one depth and there are two or
    more such folders; otherwise it drops the labels without a word. Say which case it is and how to lay the folder out."""
    files = [Path(file) for split_files in builder.config.data_files.values() for file in split_files]
    if builder.config.drop_labels or any(file.name in builder.METADATA_FILENAMES for file in files):
        return  # labels come from a metadata file, or were not asked for
    images = [_relative_to(file, root) for file in files if file.suffix.lower() in builder.EXTENSIONS]
    if not images:
        return
    layout = f"{root}/<class>/<image> (with splits: {root}/train/<class>/<image>, {root}/test/<class>/<image>)"
    by_depth = {}
    for image in images:
        by_depth.setdefault(len(image.parts) - 1, []).append(image)
    if len(by_depth) > 1:
        found = ", ".join(f"{len(found)} {_depth_words(depth)} (e.g. '{found[0].as_posix()}')" for depth, found in sorted(by_depth.items()))
        raise DatasetError(
            f"Images in image folder '{args.dataset}' sit at different depths, so their classes cannot be read from folder "
            f"names: {found}. Put every image in a folder named after its class: {layout}."
        )
    folders = Counter(image.parent for image in images)
    if len({folder.name for folder in folders}) == 1:
        folder = next(iter(folders))
        if folder == Path():
            where = "directly in the folder, with no class folders"
        elif len(folders) == 1:
            where = f"in one folder ({folder.as_posix()!r})"
        else:  # train/cat and test/cat: one class, in several splits
            each = ", ".join(f"{found.as_posix()!r}: {count}" for found, count in sorted(folders.items()))
            where = f"in folders named {folder.name!r} ({each})"
        raise DatasetError(
            f"Image folder '{args.dataset}': all {len(images)} images are {where}, so there is nothing to tell apart. "
            f"Classification needs at least two class folders: {layout}."
        )


def _depth_words(depth: int) -> str:
    return {0: "directly in the folder", 1: "one folder down"}.get(depth, f"{depth} folders down")


def _relative_to(path: Path, root: Path) -> Path:
    for base in (Path(os.path.abspath(root)), root.resolve()):
        if path.is_relative_to(base):
            return path.relative_to(base)
    return Path(path.name)


def _log_class_counts(raw: datasets.DatasetDict, args: DataArguments) -> None:
    found = []
    for name, split in raw.items():
        column = args.label_column or next((c for c, f in split.features.items() if isinstance(f, datasets.ClassLabel)), None)
        if not isinstance(split.features.get(column), datasets.ClassLabel):
            continue
        counts = Counter(split[column])
        names = split.features[column].names
        found.append(f"{name}: {len(split)} images ({', '.join(f'{one_line(names[label])} {counts[label]}' for label in sorted(counts))})")
    logger.info("Image folder %s: %s", args.dataset, "; ".join(found))


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
        if name == "train" and not values:
            raise DatasetError("The train split is empty. Give it images, or raise `max_train_samples`.")
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
        train, test = _stratified_split(train, "test", args.test_size, label_column, seed)
    else:
        test = raw[test_name]
    if validation_name is None:
        carved_test = " (after carving the test split)" if test_name is None else ""
        train, validation = _stratified_split(train, "validation", args.validation_size, label_column, seed, carved_test)
    else:
        validation = raw[validation_name]
    splits = datasets.DatasetDict(train=train, validation=validation, test=test)
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
    counts = Counter(dataset[label_column])
    names = dataset.features[label_column].names
    single = [names[label] for label in sorted(counts) if counts[label] < 2]
    if single:
        classes = "Class" if len(single) == 1 else "Classes"
        which = "that class" if len(single) == 1 else "those classes"
        raise DatasetError(
            f"{classes} {single[:10]} {'has' if len(single) == 1 else 'have'} only 1 image in {source}, so `{option}` cannot "
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


def _drop_unreadable(splits, image_column, skip, root=None) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    skipped = {}
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
    if not skip and any(skipped.values()):
        listing = "\n".join(f"  {name}: {entry}" for name, entries in skipped.items() for entry in entries)
        raise DatasetError(f"Unreadable images (set `skip_unreadable_images: true` to skip them):\n{listing}")
    return splits, skipped


def image_name(cell, index) -> str:
    return (cell or {}).get("path") or f"#{index}"


def shareable_name(cell, index, root: Path | None) -> str:
    """The image's name as it may be published (all_results.json and the model card are pushed): its path relative to
    the local dataset folder `root`, the file name of any other absolute path, the stored relative path, or `#index`."""
    name = image_name(cell, index)
    path = Path(name)
    if not path.is_absolute():
        return name
    return (_relative_to(path, root) if root is not None else Path(path.name)).as_posix()


def _local_root(dataset: str) -> Path | None:
    local = Path(dataset).expanduser()
    return local.parent if local.is_file() else local if local.is_dir() else None


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
