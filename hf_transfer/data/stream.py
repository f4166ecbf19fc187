"""Datasets bigger than the disk (`streaming: true`): validation and test in memory, the train split left a stream, never
copied to disk; its shards' footers checked first; and the options a stream cannot honour, refused. The train stream
itself (shards per process, the shuffle buffer, checkpointed positions) is `train_stream.py`."""

from __future__ import annotations

import hashlib
import logging
import reprlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from huggingface_hub import HfFileSystem

from ..errors import DatasetError, HFTransferError
from ..offline import hub_reachable
from ..options import DataArguments
from ..schedules import STEP
from .folders import local_builder
from .splits import (
    PREFERRED_LABEL_COLUMNS,
    PreparedData,
    check_label_values,
    existing_split,
    find_columns,
    local_path,
    local_root,
    readable,
    shareable_name,
)

logger = logging.getLogger(__name__)


class StreamingError(HFTransferError, ValueError):
    """A recipe option that a stream cannot honour; the message says what to set instead."""


def check_options(recipe) -> None:
    """Refuse, with what to write instead, the options whose meaning needs the length of the train split."""
    data, freezing, doctor, training = recipe.data, recipe.freezing, recipe.doctor, recipe.training
    refusals = [
        (doctor.exclude_flagged,
         f"`exclude_flagged: {doctor.exclude_flagged}` removes what the data doctor flags, and the doctor compares every image "
         "with every other on cached features, which a stream never holds. Check a sample with `hf-transfer doctor` "
         "(without `streaming`), or leave `exclude_flagged` unset."),
        (training.max_steps <= 0,
         "`streaming: true` needs `max_steps`: a stream's length is unknown until it has been read, so "
         "`num_train_epochs` cannot be turned into optimizer steps. Set `max_steps` (e.g. `max_steps: 5000`)."),
        (data.max_train_samples is not None,
         "`max_train_samples` truncates a split that is in hand; a stream has none to truncate (each pass would read "
         "other images). Leave it unset and shorten the run with `max_steps`, or turn `streaming` off."),
        (str(training.lr_scheduler_type) == STEP,
         "`lr_scheduler_type: step` decays the learning rate every `step_size` epochs; a stream has no epochs. "
         "Use a schedule in steps (e.g. `cosine` or `linear`), or turn `streaming` off."),
        (any(stage.get("at_epoch", 0) > 0 for stage in freezing.schedule),
         "Stages that start `at_epoch` need epochs; a stream has none (the `fastai` preset is one). "
         "Start the stages `at_step` (e.g. `[{at_step: 0, train: head}, {at_step: 500, train: all}]`) or `at_plateau`."),
        (recipe.model.image_size_schedule,
         "`image_size_schedule` gives each epoch its training image size; a stream has no epochs. Leave it unset, "
         "or turn `streaming` off."),
    ]
    for refused, message in refusals:
        if refused:
            raise StreamingError(message)


def check_plan(recipe, plan) -> None:
    """The feature cache stores the features of every training image: a stream keeps none, so it cannot be used."""
    head_only_start = plan.stage_sets[0] == set(plan.blocks[-1].parameter_names)
    if recipe.run.feature_cache and head_only_start:
        raise StreamingError(
            "`feature_cache: true` (the default) computes and stores the backbone's features of every training image once; "
            "`streaming: true` reads images as they come and stores none. Set `feature_cache: false` to train the head "
            "on images from the stream (slower per step, nothing written to disk)."
        )


@dataclass
class StreamingData(PreparedData):
    """Validation and test in memory (`splits`), the train split as a stream; `skipped['train']` fills up in training."""

    train: datasets.IterableDataset  # the whole train stream, images undecoded, every rank's
    carved: frozenset  # keys (`image_key`) of the images carved for validation and test: never trained on
    shuffle_buffer_size: int = 1000
    seed: int = 42  # the run's: the shard order of each pass and the shuffle buffer's draws
    root: Path | None = None
    skip_unreadable: bool = True

    @property
    def sizes(self) -> dict:
        return {"train": None, **{name: len(split) for name, split in self.splits.items()}}  # None: a stream's length is unknown


def load_streaming_dataset(args: DataArguments, seed: int = 42) -> StreamingData:
    """The dataset as streams: columns from its features, validation and test read into memory, the train split left a stream."""
    builder = _builder(args)
    check_parquet_footers(builder, args)  # a corrupt shard would otherwise end the run when the stream reaches it
    raw = builder.as_streaming_dataset()
    if args.train_split not in raw:
        raise DatasetError(f"Dataset '{args.dataset}' has no '{args.train_split}' split (it has {list(raw)}). Set `train_split`.")
    features = raw[args.train_split].features
    if features is None:
        raise DatasetError(
            f"The stream of '{args.dataset}' does not say its features (column types), so there are no class names. Stream a "
            "dataset whose features are known (a Hub or parquet export with a ClassLabel column, or an image folder), "
            "or turn `streaming` off."
        )
    _require_class_label(features, args)
    image_column, label_column = find_columns(features, args)
    labels = features[label_column].names
    schema = datasets.Features({image_column: datasets.Image(decode=False), label_column: features[label_column]})

    def undecoded(stream: datasets.IterableDataset) -> datasets.IterableDataset:
        return stream.select_columns([image_column, label_column]).cast(schema)

    train = undecoded(raw[args.train_split])
    splits, carved = _evaluation_splits(raw, args, train, undecoded, schema)
    check_label_values(splits, label_column, labels)
    splits, skipped = readable(splits, image_column, args)
    skipped["train"] = []
    return StreamingData(splits, labels, image_column, label_column, skipped, train=train,
                         carved=frozenset(image_key(row[image_column]) for row in carved),
                         shuffle_buffer_size=args.shuffle_buffer_size, seed=seed, root=local_root(args.dataset),
                         skip_unreadable=args.skip_unreadable_images)


# webdataset's `.cls` / `.cls2` files are read as plain integers (datasets' `webdataset` builder infers no ClassLabel)
_NUMBER_LABEL_COLUMNS = ("cls", "cls2")


def _require_class_label(features: datasets.Features, args: DataArguments) -> None:
    """Refuse a stream whose labels are numbers without class names, showing the dataset card lines that name them: a
    stream cannot be class-encoded (that reads every label first), so the names must come from the dataset's features,
    which for a local folder (parquet or webdataset .tar shards) datasets reads from its README.md."""
    named = args.label_column or next((name for name in PREFERRED_LABEL_COLUMNS if name in features), None)
    if named is None and any(isinstance(feature, datasets.ClassLabel) for feature in features.values()):
        return
    column = named or next((name for name in _NUMBER_LABEL_COLUMNS if name in features), None) or next(
        (name for name, feature in features.items()
         if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")) and not name.startswith("__")), None)
    if column is None or column not in features or isinstance(features[column], datasets.ClassLabel):
        return  # no number column to name, or the label is a ClassLabel: the usual checks speak
    declared = datasets.Features({
        name: datasets.ClassLabel(names=["<name of class 0>", "<name of class 1>"]) if name == column else feature
        for name, feature in features.items() if not name.startswith("__")  # webdataset's __key__ / __url__: not data
    })
    card = yaml.safe_dump({"dataset_info": {"features": declared._to_yaml_list()}}, default_flow_style=True, sort_keys=False,
                          width=10**6).strip()  # one line: the error message is one line
    local = Path(args.dataset).expanduser()
    where = (f"a README.md in '{local}'" if local.is_dir() else
             f"a README.md in a folder that holds '{local.name}' (then stream the folder)" if local.is_file() else None)
    fix = (f"Give it class names in the dataset's features: {where} whose first three lines are `---`, `{card}` and `---` "
           "(one names entry per class, in label order; datasets reads these features instead of inferring them)."
           if where else
           f"Give it class names: `dataset.class_encode_column('{column}')` (or cast it to a ClassLabel) on a map-style copy, "
           "then push that, or stream a local copy whose README.md declares the features.")
    raise DatasetError(
        f"Label column '{column}' of the stream is {features[column]!r}, not a ClassLabel, so there are no class names "
        f"(webdataset `.cls` files and integer columns hold numbers only), and a stream cannot be class-encoded: that "
        f"reads every label before training. {fix}"
    )


def _builder(args: DataArguments) -> datasets.DatasetBuilder:
    """The datasets builder of the stream (what `load_dataset(..., streaming=True)` streams from)."""
    local = local_path(args.dataset)
    if local.is_file() or local.is_dir():
        return local_builder(local, args)
    if not hub_reachable():
        raise DatasetError(
            f"Cannot stream '{args.dataset}': the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1), and a stream is read "
            "from the Hub as it trains. Point `dataset` at a local copy (parquet shards, an image folder or webdataset .tar "
            "shards), or turn `streaming` off to train on the datasets cache."
        )
    return datasets.load_dataset_builder(args.dataset, args.dataset_config)


# A corrupt shard is refused, not skipped: a shard is thousands of images (a whole class, perhaps), a missing footer is
# almost always an interrupted download or copy that copying again repairs, and a run on what is left would train on
# other data than the recipe names. A footer is a few kB at the end of its file (a ranged read or two per Hub shard).
def check_parquet_footers(builder: datasets.DatasetBuilder, args: DataArguments) -> None:
    """Refuse, naming it, a parquet shard whose footer (schema, row groups) cannot be read: Hub shards through the
    fsspec file system the stream reads them with (HfFileSystem), reading the footer only."""
    files = [str(file) for split in (builder.config.data_files or {}).values() for file in split if str(file).endswith(".parquet")]
    with ThreadPoolExecutor(max_workers=min(16, len(files) or 1)) as pool:  # remote footers: one round trip each
        failures = [(file, reason) for file, reason in zip(files, pool.map(_footer_problem, files)) if reason is not None]
    if failures:
        file, reason = failures[0]
        others = f" ({len(failures) - 1} more shard(s) too)" if len(failures) > 1 else ""
        raise DatasetError(
            f"Parquet shard {_shard_name(file, args)!r} of dataset '{args.dataset}' cannot be read{others}: {reason}. A stream "
            "would fail when it reaches it. Copy it again (an interrupted download or copy leaves a file without its footer), "
            "or move it out of the dataset."
        )


def _footer_problem(file: str) -> str | None:
    """Why the parquet `file` cannot be streamed, read from its footer; None when it can."""
    try:
        filesystem, path = fsspec.core.url_to_fs(file)
        with filesystem.open(path, "rb") as handle:  # pyarrow reads the footer from the end: the last 64 kB at most
            rows = pq.ParquetFile(handle).metadata.num_rows
    except (pa.ArrowException, OSError) as error:  # Arrow raises OSError for a footer it cannot deserialize
        return reprlib.repr(str(error).strip().split("\n")[0])
    # datasets' parquet stream reads in batches of the first row group's size: 0 rows end it in an ArrowInvalid
    return "it holds no rows, and datasets cannot stream an empty parquet file" if rows == 0 else None


def _shard_name(file: str, args: DataArguments) -> str:
    """A shard as the user knows it: its path in the dataset folder or Hub repo (no local path beyond the dataset)."""
    if file.startswith("hf://"):
        return HfFileSystem().resolve_path(file).path_in_repo
    root = local_root(args.dataset)
    return shareable_name({"path": str(Path(file).resolve())}, 0, root.resolve() if root else None)


def _evaluation_splits(raw, args: DataArguments, train, undecoded, schema) -> tuple[datasets.DatasetDict, list[dict]]:
    """Validation and test in memory: named splits, or `test_size` then `validation_size` images from the stream's start."""
    names = {name: existing_split(raw, args, name) for name in ("test", "validation")}
    counts = {}
    for name, present in names.items():
        size = getattr(args, f"{name}_size")
        if present is None and size < 1:
            raise DatasetError(
                f"`{name}_size: {size:g}` is a fraction of the train split, whose length a stream does not know. Give a number "
                f"of images taken from the start of the stream (e.g. `{name}_size: 500`), or name a {name} split (`{name}_split`)."
            )
        if present is None:
            counts[name] = int(size)
    wanted = sum(counts.values())
    head = list(islice(iter(train), wanted + 1)) if wanted else []  # one more: training needs an image left over
    if wanted and len(head) <= wanted:  # with both splits named nothing is carved (an empty train stream is caught later)
        raise DatasetError(
            f"The train stream holds {len(head)} images; carving {wanted} for "
            f"{' and '.join(f'{name} ({count})' for name, count in counts.items())} leaves none to train on. "
            "Lower `validation_size`/`test_size`, or name validation and test splits."
        )
    head, splits, start = head[:wanted], {}, 0
    for name in ("test", "validation"):
        limit = getattr(args, "max_eval_samples" if name == "validation" else "max_test_samples")
        if name in counts:
            rows, start = head[start:start + counts[name]], start + counts[name]
            logger.info("Streaming: the %s split is the %d images at positions %d..%d of the train stream (never trained on).",
                        name, counts[name], start - counts[name], start - 1)
        else:
            stream = undecoded(raw[names[name]])
            rows = list(stream.take(limit) if limit else stream)
        splits[name] = datasets.Dataset.from_list(rows[:limit], features=schema)  # the first images: no cheap random subset in a stream
    return datasets.DatasetDict(splits), head


def image_key(cell: dict) -> str:
    """What identifies an image in the stream: a hash of its bytes, or its path when it is stored as a file."""
    if cell.get("bytes") is not None:
        return hashlib.sha1(cell["bytes"]).hexdigest()
    return f"path:{cell.get('path')}"


def steps_note(args) -> None:
    """Say what Trainer's `epoch` strategies mean on a stream: one epoch is the whole run."""
    epochs = [name for name in ("eval_strategy", "save_strategy", "logging_strategy") if str(getattr(getattr(args, name), "value", getattr(args, name))) == "epoch"]
    if epochs:
        logger.info("Streaming: a stream has no epochs, so %s `epoch` acts once, after `max_steps` (%d). Use `steps` and "
                    "`eval_steps`/`save_steps`/`logging_steps` for more often.", "/".join(epochs), args.max_steps)
