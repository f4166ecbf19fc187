"""Local dataset files and folders as datasets builders: one parquet file, a parquet export, or an image folder with one
sub-folder per class, its links followed and its layout and names checked (datasets would drop what it cannot read)."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections import Counter
from pathlib import Path

import datasets
from datasets.data_files import FILES_TO_IGNORE, EmptyDatasetError

from ..errors import DatasetError
from ..escape import one_line
from ..options import DataArguments

logger = logging.getLogger(__name__)


def local_builder(local: Path, args: DataArguments) -> datasets.DatasetBuilder:
    """The datasets builder of `local`: a folder, or one parquet file (a Hub export's split, say) read as the train split."""
    if local.is_dir():
        return folder_builder(local, args.dataset, args.dataset_config)
    if local.suffix != ".parquet":
        raise DatasetError(
            f"Dataset '{args.dataset}' is a file, not a folder or a .parquet file. Give a folder (an image folder with one "
            "sub-folder per class, or a parquet export) or one .parquet file."
        )
    return datasets.load_dataset_builder("parquet", data_files={args.train_split: [glob.escape(str(local.resolve()))]})


def load_local(local: Path, args: DataArguments) -> datasets.DatasetDict:
    """The splits of the local folder or parquet file `local`; the splits a parquet file lacks are carved from it."""
    builder = local_builder(local, args)
    if local.is_file():
        logger.info("Loading %s as the %s split; the splits it lacks are carved from it", local.name, args.train_split)
    raw = _prepare(builder, args.dataset)
    if builder.name == "imagefolder":
        _log_class_counts(raw, args.dataset, args.label_column)
    return raw


def folder_builder(local: Path, dataset: str, config: str | None):
    """The datasets builder of the local folder `dataset` (linked folders followed), its image-folder layout checked."""
    try:
        builder = datasets.load_dataset_builder(str(local), config)
    except EmptyDatasetError:
        builder = None
    if builder is None or builder.name == "imagefolder":
        links = _folder_links(local, dataset)
        _check_names(local, dataset)
        if links:
            logger.info("Following the linked folder(s) %s in %s", [link.as_posix() for link in links[:10]], dataset)
            data_files = _data_files_through_links(local, links)
            builder = datasets.load_dataset_builder(str(local), config, data_files=data_files) if data_files else None
    if builder is None:
        raise DatasetError(
            f"Dataset folder '{dataset}' holds no data files (no images, parquet, arrow, csv or json; hidden files and "
            f"folders do not count). Put the images in one folder per class ({local}/<class>/<image>, e.g. cat/1.jpg and "
            f"dog/2.jpg) or give a parquet export ({local}/data/train-00000-of-00001.parquet)."
        )
    if builder.name == "imagefolder":
        _check_image_folder_layout(local, builder, dataset)
    return builder


def _prepare(builder, dataset: str) -> datasets.DatasetDict:
    """What `datasets.load_dataset` does with a builder; a split whose files hold no rows gets a message."""
    try:
        builder.download_and_prepare()
        return builder.as_dataset()
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # datasets' words for a split whose files hold no rows
            raise
        raise DatasetError(
            f"Dataset folder '{dataset}' has an empty split (datasets says: {error}). Give every split images, "
            "or delete the empty split's files so that it is carved from train."
        ) from None


# datasets' file search (fsspec's glob) lists a symlinked folder as neither file nor folder and skips it, with no
# word: the class would be missing. Linked folders are found here and their files passed to datasets by name.
_SKIPPED_NAMES = (".", "__")  # datasets skips hidden files and folders and `__special__` folders too


def _folder_links(root: Path, dataset: str) -> list[Path]:
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
                            f"The link '{path.as_posix()}' in dataset folder '{dataset}' points to '{target}', which does not "
                            "exist, so its images would be left out. Fix the link or remove it."
                        )
                    if target.is_dir():
                        _check_link_target(path, target, root_real, (root / folder).resolve(), targets, dataset)
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


def _check_names(root: Path, dataset: str) -> None:
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
                    f"Image folder '{dataset}': the {'folder' if size else 'file'} {path.relative_to(root).as_posix()!r}"
                    f"{size} has {found[0]} in its name, which datasets cannot read: it {found[1]}. Rename it."
                )


def _check_link_target(path: Path, target: Path, root_real: Path, parent_real: Path, targets: set, dataset: str) -> None:
    if target == root_real or root_real in target.parents:
        where = "points back into the dataset folder"
    elif target == parent_real or target in parent_real.parents:
        where = "points to a folder that holds it"
    elif target in targets:
        where = "points to a folder that another link already adds"
    else:
        return
    raise DatasetError(
        f"The folder link '{path.as_posix()}' in '{dataset}' {where} ('{target}'), so its images would be read twice "
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


def _check_image_folder_layout(root: Path, builder, dataset: str) -> None:
    """datasets' imagefolder takes classes from folder names only when every image sits at one depth and there are two or
    more such folders; otherwise it drops the labels without a word. Say which case it is and how to lay the folder out."""
    files = [Path(file) for split_files in builder.config.data_files.values() for file in split_files]
    if builder.config.drop_labels or any(file.name in builder.METADATA_FILENAMES for file in files):
        return  # labels come from a metadata file, or were not asked for
    images = [relative_to(file, root) for file in files if file.suffix.lower() in builder.EXTENSIONS]
    if not images:
        return
    layout = f"{root}/<class>/<image> (with splits: {root}/train/<class>/<image>, {root}/test/<class>/<image>)"
    by_depth = {}
    for image in images:
        by_depth.setdefault(len(image.parts) - 1, []).append(image)
    if len(by_depth) > 1:
        found = ", ".join(f"{len(found)} {_depth_words(depth)} (e.g. '{found[0].as_posix()}')" for depth, found in sorted(by_depth.items()))
        raise DatasetError(
            f"Images in image folder '{dataset}' sit at different depths, so their classes cannot be read from folder "
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
            f"Image folder '{dataset}': all {len(images)} images are {where}, so there is nothing to tell apart. "
            f"Classification needs at least two class folders: {layout}."
        )


def _depth_words(depth: int) -> str:
    return {0: "directly in the folder", 1: "one folder down"}.get(depth, f"{depth} folders down")


def relative_to(path: Path, root: Path) -> Path:
    for base in (Path(os.path.abspath(root)), root.resolve()):
        if path.is_relative_to(base):
            return path.relative_to(base)
    return Path(path.name)


def _log_class_counts(raw: datasets.DatasetDict, dataset: str, label_column: str | None) -> None:
    found = []
    for name, split in raw.items():
        column = label_column or next((c for c, f in split.features.items() if isinstance(f, datasets.ClassLabel)), None)
        if not isinstance(split.features.get(column), datasets.ClassLabel):
            continue
        counts = Counter(split[column])
        names = split.features[column].names
        found.append(f"{name}: {len(split)} images ({', '.join(f'{one_line(names[label])} {counts[label]}' for label in sorted(counts))})")
    logger.info("Image folder %s: %s", dataset, "; ".join(found))
