"""Datasets bigger than the disk (`streaming: true`): the train split is read as a stream, never copied to disk.

Every rank reads its own shards (`split_dataset_by_node`); the shard order is shuffled every pass and images are
drawn from a seeded shuffle buffer, decoded on the fly with the map-style policy (`images.load_image`: unreadable
images are skipped and counted). Validation and test are small: named splits, or a number of images from the start
of the stream, read once into memory. A checkpoint holds each rank's stream position, shuffle buffer included, so
`--resume` continues with the very images an uninterrupted run would have read next.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import reprlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
import yaml
from accelerate.utils import gather_object
from datasets.distributed import split_dataset_by_node
from huggingface_hub import HfFileSystem
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback

from .checkpoint_checks import checkpoint_refused
from .checkpoints import CheckpointError
from .data import (
    _PREFERRED_LABEL_COLUMNS,
    DatasetError,
    PreparedData,
    _check_label_values,
    _existing_split,
    _local_root,
    collate,
    file_builder,
    find_columns,
    folder_builder,
    readable,
    shareable_name,
)
from .errors import HFTransferError
from .images import UnreadableImageError, load_image
from .offline import hub_reachable
from .options import DataArguments
from .schedules import STEP
from .trainer import SafeTrainer

logger = logging.getLogger(__name__)

STREAM_STATE = "stream_state"  # stream_state[_<rank>].safetensors (buffered image bytes) + .json (position, buffer rows)
SKIPPED = "skipped_images"  # the names of unreadable images met since the previous example, carried with each example
READ = "stream_read"  # (worker, pass, rows read by it) as of each example: what the run reports, read in any worker
FAILED = "stream_failed"  # a worker's one-line error, sent as an example: raised in a worker, it would reach Trainer as a traceback


class StreamingError(HFTransferError, ValueError):
    """A recipe option that a stream cannot honour; the message says what to set instead."""


# ---- options that a stream cannot honour, refused when the recipe is read ---------------------------------------

def check_recipe(data: DataArguments, freezing, run, doctor, training) -> None:
    """Refuse, with what to write instead, the options whose meaning needs the length of the train split."""
    if not data.streaming:
        return
    if doctor.exclude_flagged:
        raise StreamingError(
            f"`exclude_flagged: {doctor.exclude_flagged}` removes what the data doctor flags, and the doctor compares every image "
            "with every other on cached features, which a stream never holds. Check a sample with `hf-transfer doctor` "
            "(without `streaming`), or leave `exclude_flagged` unset."
        )
    if training.max_steps <= 0:
        raise StreamingError(
            "`streaming: true` needs `max_steps`: a stream's length is unknown until it has been read, so "
            "`num_train_epochs` cannot be turned into optimizer steps. Set `max_steps` (e.g. `max_steps: 5000`)."
        )
    if data.max_train_samples is not None:
        raise StreamingError(
            "`max_train_samples` truncates a split that is in hand; a stream has none to truncate (each pass would read "
            "other images). Leave it unset and shorten the run with `max_steps`, or turn `streaming` off."
        )
    if str(training.lr_scheduler_type) == STEP:
        raise StreamingError(
            "`lr_scheduler_type: step` decays the learning rate every `step_size` epochs; a stream has no epochs. "
            "Use a schedule in steps (e.g. `cosine` or `linear`), or turn `streaming` off."
        )
    if any(stage.get("at_epoch", 0) > 0 for stage in freezing.schedule()):
        raise StreamingError(
            "Stages that start `at_epoch` need epochs; a stream has none (the `fastai` preset is one). "
            "Start the stages `at_step` (e.g. `[{at_step: 0, train: head}, {at_step: 500, train: all}]`) or `at_plateau`."
        )


def check_feature_cache(recipe, plan) -> None:
    """The feature cache stores the features of every training image: a stream keeps none, so it cannot be used."""
    head_only_start = plan.stage_sets[0] == set(plan.blocks[-1].parameter_names)
    if recipe.data.streaming and recipe.run.feature_cache and head_only_start:
        raise StreamingError(
            "`feature_cache: true` (the default) computes and stores the backbone's features of every training image once; "
            "`streaming: true` reads images as they come and stores none. Set `feature_cache: false` to train the head "
            "on images from the stream (slower per step, nothing written to disk)."
        )


# ---- the data ------------------------------------------------------------------------------------------------

@dataclass
class StreamingData(PreparedData):
    """Validation and test in memory (`splits`), the train split as a stream; `skipped['train']` fills up in training."""

    train: datasets.IterableDataset  # the whole train stream, images undecoded, every rank's
    carved: frozenset  # keys (`image_key`) of the images carved for validation and test: never trained on
    shuffle_buffer_size: int = 1000
    seed: int = 42
    root: Path | None = None
    skip_unreadable: bool = True

    @property
    def sizes(self) -> dict:
        return {"train": None, **{name: len(split) for name, split in self.splits.items()}}  # None: a stream's length is unknown

    def train_stream(self, transform, rank: int, world_size: int, restore_position: bool) -> TrainStream:
        """This rank's share of the train stream, shards shuffled per pass (the same seed on every rank, so they stay disjoint)."""
        stream = self.train.shuffle(seed=self.seed, buffer_size=1)  # shard order only; the images go through our own buffer
        shards = stream.n_shards
        if world_size > 1:
            if stream.n_shards % world_size:
                logger.info("Streaming: %d shards do not divide among %d processes; each reads every shard and keeps "
                            "every %d-th image.", stream.n_shards, world_size, world_size)
            else:  # split_dataset_by_node's rule: whole shards to each process when they divide evenly
                shards //= world_size
            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        return TrainStream(stream, self, transform, rank, restore_position, shards)


def load_streaming_dataset(args: DataArguments) -> StreamingData:
    """The dataset as streams: columns from its features, validation and test read into memory, the train split left a stream."""
    builder = _builder(args)
    check_parquet_footers(builder, args)  # a corrupt shard would otherwise end the run when the stream reaches it
    raw = builder.as_streaming_dataset()
    if args.train_split not in raw:
        raise DatasetError(f"Dataset '{args.dataset}' has no '{args.train_split}' split (it has {list(raw)}). Set `train_split`.")
    train = raw[args.train_split]
    features = train.features
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

    train = undecoded(train)
    splits, carved = _evaluation_splits(raw, args, train, undecoded, schema)
    _check_label_values(splits, label_column, labels)
    splits, skipped = readable(splits, image_column, args)
    skipped["train"] = []
    return StreamingData(splits, labels, image_column, label_column, skipped, train=train,
                         carved=frozenset(image_key(row[image_column]) for row in carved),
                         shuffle_buffer_size=args.shuffle_buffer_size, root=_local_root(args.dataset),
                         skip_unreadable=args.skip_unreadable_images)


# webdataset's `.cls` / `.cls2` files are read as plain integers (datasets' `webdataset` builder infers no ClassLabel)
_NUMBER_LABEL_COLUMNS = ("cls", "cls2")


def _require_class_label(features: datasets.Features, args: DataArguments) -> None:
    """Refuse a stream whose labels are numbers without class names, showing the dataset card lines that name them.

    A map-style dataset can be class-encoded (`class_encode_column` reads every label first); a stream cannot, so the
    names must come from the dataset's features. For a local folder (parquet or webdataset .tar shards) datasets reads
    them from the folder's README.md, whose `dataset_info: features:` replace the inferred ones."""
    named = args.label_column or next((name for name in _PREFERRED_LABEL_COLUMNS if name in features), None)
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
    local = Path(args.dataset).expanduser()
    if not local.exists() and (args.dataset.startswith((".", "/", "~")) or args.dataset.count("/") > 1):
        raise DatasetError(f"Dataset folder '{args.dataset}' does not exist. Give an existing folder or a Hub id such as `uoft-cs/cifar10`.")
    if local.is_file():
        if local.suffix != ".parquet":
            raise DatasetError(f"Dataset '{args.dataset}' is a file, not a folder or a .parquet file. Give a folder or one .parquet file.")
        return file_builder(local, args)
    if local.is_dir():
        return folder_builder(local, args)
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
    root = _local_root(args.dataset)
    return shareable_name({"path": str(Path(file).resolve())}, 0, root.resolve() if root else None)


def _evaluation_splits(raw, args: DataArguments, train, undecoded, schema) -> tuple[datasets.DatasetDict, list[dict]]:
    """Validation and test in memory: named splits, or `test_size` then `validation_size` images from the stream's start."""
    names = {"test": _existing_split(raw, args.test_split, ("test",)),
             "validation": _existing_split(raw, args.validation_split, ("validation", "valid", "val"))}
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
        if name in counts:
            rows, start = head[start:start + counts[name]], start + counts[name]
            logger.info("Streaming: the %s split is the %d images at positions %d..%d of the train stream (never trained on).",
                        name, counts[name], start - counts[name], start - 1)
        else:
            limit = getattr(args, "max_eval_samples" if name == "validation" else "max_test_samples")
            stream = undecoded(raw[names[name]])
            rows = list(stream.take(limit) if limit else stream)
        splits[name] = datasets.Dataset.from_list(rows, features=schema)
    for name, option in (("validation", "max_eval_samples"), ("test", "max_test_samples")):
        limit = getattr(args, option)
        if limit is not None and len(splits[name]) > limit:  # the first images: a stream has no cheap random subset
            splits[name] = splits[name].select(range(limit))
    return datasets.DatasetDict(splits), head


def image_key(cell: dict) -> str:
    """What identifies an image in the stream: a hash of its bytes, or its path when it is stored as a file."""
    if cell.get("bytes") is not None:
        return hashlib.sha1(cell["bytes"]).hexdigest()
    return f"path:{cell.get('path')}"


# ---- the train stream --------------------------------------------------------------------------------------------

class _QuietBufferWarning(logging.Filter):
    """datasets warns that a resumed shuffle buffer lost its content; ours holds one image at a time (`buffer_size=1`,
    to shuffle the shard order only) and is empty at every saved position, so nothing is lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()


logging.getLogger("datasets.iterable_dataset").addFilter(_QuietBufferWarning())


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training examples, pass after pass without end (Trainer stops at `max_steps`).

    Each pass reads the rank's shards in a seeded order; rows go through a seeded buffer of `shuffle_buffer_size`
    (a random one leaves as each new one enters), are decoded as they leave, and unreadable ones are skipped and named.
    `snapshot()` is the position after the last example handed out; `resume_from` makes the next iteration start there."""

    def __init__(self, stream: datasets.IterableDataset, data: StreamingData, transform, rank: int, restore_position: bool,
                 shards: int):
        super().__init__()
        self.stream, self.data, self.transform, self.rank = stream, data, transform, rank
        self.shards = shards  # this rank's: each DataLoader worker reads whole shards, so more workers would read none
        self.restore_position = restore_position  # false when the recipe sets `ignore_data_skip: true`
        self.resume_from: dict | None = None
        self._live = None  # (pass, stream position, buffer, rng, rows read) as of the last example handed out
        self._pending: list[str] = []  # unreadable images met since the last example handed out

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        try:
            yield from self._examples(worker.id if worker else 0)
        except HFTransferError as error:
            if worker is None:
                raise
            yield {FAILED: str(error)}  # to the main process, which raises it (see `StreamLoader`)

    def _examples(self, worker: int):
        state, self.resume_from = self.resume_from, None
        pass_index = state["pass"] if state else 0
        read = state["read"] if state else 0  # rows read from the stream by this rank, every pass
        while True:
            stream = copy.deepcopy(self.stream)  # a fresh position: a loaded state would otherwise start every pass
            stream.set_epoch(pass_index)
            rng = np.random.default_rng([self.data.seed, self.rank, pass_index])
            buffer, position = [], stream.state_dict()
            if state:
                stream.load_state_dict(state["stream"])
                rng.bit_generator.state = state["rng"]
                buffer, position, state = state["buffer"], state["stream"], None
            read_in_pass = 0
            for row in _rows(stream):
                if image_key(row[self.data.image_column]) in self.data.carved:
                    continue
                read, read_in_pass, position = read + 1, read_in_pass + 1, stream.state_dict()
                if len(buffer) < self.data.shuffle_buffer_size:
                    buffer.append(row)
                    continue
                index = int(rng.integers(len(buffer)))
                leaving, buffer[index] = buffer[index], row
                self._live = (pass_index, position, buffer, rng, read)
                example = self._example(leaving, pass_index, read)
                if example is not None:
                    yield {**example, READ: (worker, pass_index, read)}
            while buffer:
                leaving = buffer.pop(int(rng.integers(len(buffer))))
                self._live = (pass_index, position, buffer, rng, read)
                example = self._example(leaving, pass_index, read)
                if example is not None:
                    yield {**example, READ: (worker, pass_index, read)}
            if read == 0:
                # Whether the stream holds any image to train on is decided once, for the whole stream, when it is
                # opened (`_evaluation_splits`); one worker's shards may hold only carved images while the others' do not.
                if torch.utils.data.get_worker_info() is not None:
                    return
                raise DatasetError(NOTHING_TO_TRAIN_ON)
            pass_index += 1

    def _example(self, row: dict, pass_index: int, read: int) -> dict | None:
        cell = row[self.data.image_column]
        try:
            image = load_image(cell)
        except UnreadableImageError as error:
            name = f"{shareable_name(cell, read - 1, self.data.root)}: {error.reason}"
            if not self.data.skip_unreadable:
                raise DatasetError(f"Unreadable image in the train stream (set `skip_unreadable_images: true` to skip it): {name}") from None
            if pass_index == 0:  # later passes meet the same images again
                self._pending.append(name)
            return None
        label = row[self.data.label_column]
        if label is None or not 0 <= label < len(self.data.labels):
            raise DatasetError(
                f"Image {shareable_name(cell, read - 1, self.data.root)} in the train stream has label {label}, outside "
                f"0..{len(self.data.labels) - 1} (classes {self.data.labels}). Fix or drop that row."
            )
        pending, self._pending = self._pending, []
        return {"pixel_values": self.transform(image), "labels": label, SKIPPED: pending}

    def snapshot(self) -> dict | None:
        """The position after the last example handed out (valid between examples; `None` before the first)."""
        if self._live is None:
            return None
        pass_index, position, buffer, rng, read = self._live
        return {"pass": pass_index, "stream": copy.deepcopy(position), "buffer": list(buffer),
                "rng": copy.deepcopy(rng.bit_generator.state), "read": read}


NOTHING_TO_TRAIN_ON = "The train stream holds no images besides those carved for validation and test. Give it images."


def _rows(stream: datasets.IterableDataset):
    """The stream's rows; a shard that cannot be read past its footer (checked before training) ends the run in one line."""
    rows = iter(stream)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as error:  # Arrow raises OSError for a page it cannot deserialize
            raise DatasetError(
                f"A shard of the train stream cannot be read: {reprlib.repr(str(error).strip().splitlines()[0])} (datasets logs "
                "which file). Copy that shard again, or move it out of the dataset."
            ) from None
        yield row


def stream_collate(examples: list[dict]) -> dict:
    failed = next((example[FAILED] for example in examples if FAILED in example), None)
    if failed is not None:
        return {FAILED: failed}
    skipped = [name for example in examples for name in example.pop(SKIPPED)]
    read = [example.pop(READ) for example in examples]
    return {**collate(examples), SKIPPED: skipped, READ: read}


class StreamLoader:
    """The train batches of a `TrainStream`, read by this process alone (accelerate would dispatch or re-shard them),
    remembering the stream position after the last batch handed out and the unreadable images met."""

    def __init__(self, dataset: TrainStream, args):
        self.dataset, self.workers = dataset, min(args.dataloader_num_workers, dataset.shards)
        if args.dataloader_num_workers:
            logger.info("Streaming: %d DataLoader worker%s (of the %d asked) for the %d shard%s this process reads: a worker "
                        "reads whole shards.", self.workers, "" if self.workers == 1 else "s", args.dataloader_num_workers,
                        dataset.shards, "" if dataset.shards == 1 else "s")
        else:
            logger.info("Streaming: the training process reads the stream itself (`dataloader_num_workers: 0`).")
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.per_device_train_batch_size, collate_fn=stream_collate, num_workers=self.workers,
            pin_memory=args.dataloader_pin_memory, prefetch_factor=args.dataloader_prefetch_factor if self.workers else None,
            persistent_workers=args.dataloader_persistent_workers and self.workers > 0,
        )
        self.skipped: list[str] = []
        self.position: dict | None = None
        self.read: dict[int, tuple[int, int]] = {}  # worker -> (pass, rows read) as of its last example handed out

    def __iter__(self):
        # The DataLoader draws a seed from the global RNG as it starts; an uninterrupted run starts it once, a resumed
        # one after restoring the RNG: without this, augmentations after a resume would differ from the run's own.
        rng = torch.random.get_rng_state()
        batches = iter(self.loader)
        torch.random.set_rng_state(rng)
        for batch in batches:
            if FAILED in batch:
                raise DatasetError(batch[FAILED])
            self.skipped += batch.pop(SKIPPED)
            self.read.update({worker: (pass_index, read) for worker, pass_index, read in batch.pop(READ)})
            if not self.workers:  # with workers the position lives in their processes (see `StreamingTrainer`)
                self.position = self.dataset.snapshot()
            yield batch
        raise DatasetError(NOTHING_TO_TRAIN_ON)  # an endless stream ends only when no worker has an image to train on


class StreamEpochs(TrainerCallback):
    """Trainer sees one endless epoch of `max_steps`; after a resume it counts its fraction from the resumed step.
    Set it from the step, as an uninterrupted run has it, so logs and checkpoints match."""

    def on_step_end(self, args, state, control, **kwargs):
        state.epoch = state.global_step / state.max_steps


class StreamingTrainer(SafeTrainer):
    """SafeTrainer on a `TrainStream`: its own loader, the stream position in every checkpoint, restored on resume."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(StreamEpochs())
        self._loader: StreamLoader | None = None
        self.stream_summary: dict | None = None

    def get_train_dataloader(self) -> StreamLoader:
        self._loader = StreamLoader(self.train_dataset, self.args)
        return self._loader

    def train(self, resume_from_checkpoint=None, **kwargs):
        output = super().train(resume_from_checkpoint, **kwargs)
        loader, data = self._loader, self.train_dataset.data
        data.skipped["train"] = gather_object(list(loader.skipped))  # every rank's, first pass only
        read = sum(count for _, count in loader.read.values())  # by every worker of this rank
        passes = max((pass_index for pass_index, _ in loader.read.values()), default=0) + 1
        self.stream_summary = {
            "shuffle_buffer_size": data.shuffle_buffer_size, "shards": self.train_dataset.stream.n_shards,
            "dataloader_num_workers": loader.workers,  # what read the stream: at most one per shard of a rank
            "images_read_by_rank": gather_object([read]), "passes_started_by_rank": gather_object([passes]),
            "position_in_checkpoints": loader.workers == 0,
        }
        return output

    def save_resume_state(self, output: Path) -> None:
        """SafeTrainer's, and this rank's stream position and shuffle buffer (written by every rank)."""
        super().save_resume_state(output)
        stem = output / self._stream_file()
        loader = self._loader
        if loader is None or loader.workers:
            _write_json(stem.with_suffix(".json"), {"position": None, "dataloader_num_workers": loader.workers if loader else None})
            return
        position = loader.position or {}
        buffer = position.get("buffer", [])
        image, label = self.train_dataset.data.image_column, self.train_dataset.data.label_column
        blobs = [row[image].get("bytes") or b"" for row in buffer]
        safetensors.torch.save_file({"bytes": torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8)},
                                    stem.with_suffix(".safetensors"))
        _write_json(stem.with_suffix(".json"), {
            "position": {key: position[key] for key in ("pass", "stream", "rng", "read")} if position else None,
            "buffer": [{"length": len(blob), "has_bytes": row[image].get("bytes") is not None, "path": row[image].get("path"),
                        "label": row[label]} for blob, row in zip(blobs, buffer)],
            "skipped": loader.skipped,
        })

    def restore_resume_state(self, checkpoint: Path) -> None:
        """Called before the train loader starts (`ignore_data_skip`: at the resumed epoch's start): the stream resumes
        from the checkpoint's position."""
        super().restore_resume_state(checkpoint)
        if not self.train_dataset.restore_position:
            logger.info("Streaming: `ignore_data_skip: true`: the stream starts again from its beginning.")
            return
        stem = checkpoint / self._stream_file()
        saved = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else None
        if saved is None or (saved["position"] is None and saved.get("dataloader_num_workers")):
            why = (f"read its stream in {saved['dataloader_num_workers']} DataLoader worker processes, whose positions a "
                   "checkpoint cannot hold" if saved else f"has no {stem.name}.json (not a streaming run's checkpoint)")
            raise CheckpointError(
                f"{checkpoint} {why}, so the stream cannot continue where it stopped. Start again with `--overwrite` and "
                "`dataloader_num_workers: 0` (resumable), or resume with `ignore_data_skip: true` to restart the stream."
            )
        self._loader.skipped = list(saved.get("skipped", []))
        if saved["position"] is None:  # saved before the first batch
            return
        image, label = self.train_dataset.data.image_column, self.train_dataset.data.label_column
        blob = safetensors.torch.load_file(stem.with_suffix(".safetensors"))["bytes"].numpy().tobytes()
        buffer, start = [], 0
        for row in saved["buffer"]:
            data, start = blob[start:start + row["length"]], start + row["length"]
            buffer.append({image: {"bytes": data if row["has_bytes"] else None, "path": row["path"]}, label: row["label"]})
        self.train_dataset.resume_from = {**saved["position"], "buffer": buffer}

    def _stream_file(self, rank: int | None = None) -> str:
        return STREAM_STATE if self.args.world_size <= 1 else f"{STREAM_STATE}_{self.args.process_index if rank is None else rank}"

    def check_checkpoint(self, checkpoint: Path) -> dict:
        """SafeTrainer's checks, and every rank's stream position (when it is restored): one line naming a bad file."""
        state = super().check_checkpoint(checkpoint)
        if self.train_dataset.restore_position:
            fresh = copy.deepcopy(self.train_dataset.stream).state_dict()
            for rank in range(self.args.world_size):
                check_stream_state(checkpoint, checkpoint / self._stream_file(rank), fresh, len(self.train_dataset.data.labels))
        return state


def check_stream_state(checkpoint: Path, stem: Path, fresh: dict, classes: int) -> None:
    """Refuse a saved stream position that `TrainStream` could not continue from: read from disk, it is checked before
    training starts, not met as a raw error (or silently shifted image bytes) at the first batch. `fresh` is the state
    of the stream at its start, whose layout datasets' state must keep."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        return  # StreamingTrainer.restore_resume_state says what a checkpoint without it means
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise checkpoint_refused(path, checkpoint, f"unreadable ({reprlib.repr(str(error))})") from None
    if not (isinstance(saved, dict) and "position" in saved):
        raise checkpoint_refused(path, checkpoint, "it is not a mapping with the stream's `position`")
    position = saved["position"]
    if position is None:
        return  # saved before the first batch (nothing to restore), or by DataLoader workers (restore_resume_state refuses it)
    if not (isinstance(position, dict) and all(_count(position.get(key)) for key in ("pass", "read"))):
        raise checkpoint_refused(path, checkpoint, f"`position` {reprlib.repr(position)} has no whole `pass` and `read` counts")
    stream = position.get("stream")
    if not (isinstance(stream, dict) and stream.get("epoch") == position["pass"] and _same_layout(stream, fresh)):
        raise checkpoint_refused(path, checkpoint, "`position.stream` is not a position of this dataset's stream in pass "
                                                   f"{position['pass']}")
    try:
        np.random.default_rng(0).bit_generator.state = position.get("rng")
    except (TypeError, ValueError, KeyError, AttributeError):
        raise checkpoint_refused(path, checkpoint, f"`position.rng` is {reprlib.repr(position.get('rng'))}, not a state of the "
                                                   "shuffle buffer's random generator") from None
    buffer, skipped = saved.get("buffer"), saved.get("skipped", [])
    if not (isinstance(buffer, list) and all(
            isinstance(row, dict) and _count(row.get("length")) and isinstance(row.get("has_bytes"), bool)
            and isinstance(row.get("path"), (str, type(None))) and _count(row.get("label")) and row["label"] < classes
            for row in buffer)):
        raise checkpoint_refused(path, checkpoint, f"`buffer` is not a list of images' lengths, paths and labels (0..{classes - 1})")
    if not (isinstance(skipped, list) and all(isinstance(name, str) for name in skipped)):
        raise checkpoint_refused(path, checkpoint, "`skipped` is not a list of image names")
    blob = stem.with_suffix(".safetensors")
    try:
        with safe_open(blob, "pt") as tensors:
            shape = tensors.get_slice("bytes").get_shape() if "bytes" in tensors.keys() else None
    except (SafetensorError, OSError) as error:
        raise checkpoint_refused(blob, checkpoint, f"unreadable ({reprlib.repr(str(error))})") from None
    held, needed = (shape[0] if shape and len(shape) == 1 else None), sum(row["length"] for row in buffer)
    if held != needed and not (needed == 0 and held == 1):  # an empty buffer is saved as one byte: safetensors holds no empty tensor
        raise checkpoint_refused(path, checkpoint, f"the buffer's images take {needed} bytes, but {blob.name} holds "
                                                   f"{'no byte vector' if held is None else held}")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _same_layout(saved, fresh, key: str = "") -> bool:
    """Whether a saved datasets stream state has the layout of the stream's state at its start: the same keys, lists and
    kinds of value. Where that holds null (no earlier position yet), a state of counts, flags and iterables' `type` names;
    what datasets keeps there beyond that, datasets reads."""
    if fresh is None:
        return saved is None or _plain_state(saved)
    if isinstance(fresh, dict):
        return isinstance(saved, dict) and saved.keys() == fresh.keys() and all(
            _same_layout(saved[name], fresh[name], name) for name in fresh)
    if isinstance(fresh, list):
        return isinstance(saved, list) and len(saved) == len(fresh) and all(
            _same_layout(item, template, key) for item, template in zip(saved, fresh))
    if isinstance(fresh, str):
        return saved == fresh if key == "type" else isinstance(saved, str)
    return type(saved) is type(fresh) and (not isinstance(saved, int) or isinstance(saved, bool) or saved >= 0)


def _plain_state(state, key: str = "") -> bool:
    if isinstance(state, dict):
        return all(_plain_state(value, name) for name, value in state.items())
    if isinstance(state, list):
        return all(_plain_state(value, key) for value in state)
    if isinstance(state, str):
        return key == "type"
    return state is None or isinstance(state, bool) or _count(state)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, default=_plain))


def _plain(value):
    """numpy integers in datasets' and numpy's states, as JSON numbers."""
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def steps_note(args) -> None:
    """Say what Trainer's `epoch` strategies mean on a stream: one epoch is the whole run."""
    epochs = [name for name in ("eval_strategy", "save_strategy", "logging_strategy") if str(getattr(getattr(args, name), "value", getattr(args, name))) == "epoch"]
    if epochs:
        logger.info("Streaming: a stream has no epochs, so %s `epoch` acts once, after `max_steps` (%d). Use `steps` and "
                    "`eval_steps`/`save_steps`/`logging_steps` for more often.", "/".join(epochs), args.max_steps)
