"""The train split of a stream, read by one process: its shards in a seeded order every pass, a seeded shuffle buffer,
images decoded on the fly with the map-style policy (unreadable ones skipped and counted), and its own loader and
Trainer, which save each process's position (shuffle buffer included) in every checkpoint, so `--resume` continues with
the very images an uninterrupted run would have read next."""

from __future__ import annotations

import copy
import json
import logging
import reprlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import safetensors.torch
import torch
from accelerate.utils import gather_object
from datasets.distributed import split_dataset_by_node
from transformers import TrainerCallback

from ..checkpoints import CheckpointError
from ..errors import DatasetError, HFTransferError
from ..images import UnreadableImageError, load_image
from ..repo_files import write_json
from ..trainer import SafeTrainer
from .splits import shareable_name
from .stream import StreamingData, image_key
from .stream_state import check_stream_state
from .transforms import collate

logger = logging.getLogger(__name__)

STREAM_STATE = "stream_state"  # stream_state[_<rank>].safetensors (buffered image bytes) + .json (position, buffer rows)
SKIPPED = "skipped_images"  # the names of unreadable images met since the previous example, carried with each example
READ = "stream_read"  # (worker, pass, rows read by it) as of each example: what the run reports, read in any worker
FAILED = "stream_failed"  # a worker's one-line error, sent as an example: raised in a worker, it would reach Trainer as a traceback


def train_stream(data: StreamingData, transform, rank: int, world_size: int, restore_position: bool) -> TrainStream:
    """This rank's share of the train stream, shards shuffled per pass (the same seed on every rank, so they stay disjoint)."""
    stream = data.train.shuffle(seed=data.seed, buffer_size=1)  # shard order only; the images go through our own buffer
    shards = stream.n_shards
    if world_size > 1:
        if stream.n_shards % world_size:
            logger.info("Streaming: %d shards do not divide among %d processes; each reads every shard and keeps "
                        "every %d-th image.", stream.n_shards, world_size, world_size)
        else:  # split_dataset_by_node's rule: whole shards to each process when they divide evenly
            shards //= world_size
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return TrainStream(stream, data, transform, rank, restore_position, shards)


# datasets warns that a resumed shuffle buffer lost its content; ours holds one image at a time (`buffer_size=1`, to
# shuffle the shard order only) and is empty at every saved position, so nothing is lost.
logging.getLogger("datasets.iterable_dataset").addFilter(lambda record: "shuffle buffer" not in record.getMessage())


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training examples, pass after pass without end (Trainer stops at `max_steps`). `snapshot()` is the
    position after the last example handed out; `resume_from` makes the next iteration start there."""

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
            for leaving, read, position in self._shuffled(stream, buffer, rng, read, position):
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

    def _shuffled(self, stream: datasets.IterableDataset, buffer: list, rng, read: int, position: dict):
        """The rows leaving `buffer` (a random one as each new one enters, then the rest), with the rows read and position."""
        for row in _rows(stream):
            if image_key(row[self.data.image_column]) in self.data.carved:
                continue
            read, position = read + 1, stream.state_dict()
            if len(buffer) < self.data.shuffle_buffer_size:
                buffer.append(row)
                continue
            index = int(rng.integers(len(buffer)))
            leaving, buffer[index] = buffer[index], row
            yield leaving, read, position
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer)))), read, position

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
    try:
        yield from stream
    except (pa.ArrowException, OSError) as error:  # Arrow raises OSError for a page it cannot deserialize
        raise DatasetError(
            f"A shard of the train stream cannot be read: {reprlib.repr(str(error).strip().splitlines()[0])} (datasets logs "
            "which file). Copy that shard again, or move it out of the dataset."
        ) from None


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
        with torch.random.fork_rng(devices=[]):
            batches = iter(self.loader)
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
            write_json(stem.with_suffix(".json"), {"position": None, "dataloader_num_workers": loader.workers if loader else None}, indent=1)
            return
        position = loader.position or {}
        buffer = position.get("buffer", [])
        image, label = self.train_dataset.data.image_column, self.train_dataset.data.label_column
        blobs = [row[image].get("bytes") or b"" for row in buffer]
        safetensors.torch.save_file({"bytes": torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8)},
                                    stem.with_suffix(".safetensors"))
        write_json(stem.with_suffix(".json"), indent=1, value={
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
