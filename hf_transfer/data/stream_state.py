"""The checks of a streaming run's saved position (`stream_state[_<rank>].json` and `.safetensors` in a checkpoint): a
position `TrainStream` could not continue from is refused, naming the file, before training starts."""

from __future__ import annotations

import reprlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from ..checkpoint_checks import checkpoint_refused, is_count, read_checkpoint_json


def check_stream_state(checkpoint: Path, stem: Path, fresh: dict, classes: int) -> None:
    """Refuse, before training, a saved position `TrainStream` could not continue from (not a raw error, or silently
    shifted image bytes, at the first batch); `fresh` is the stream's state at its start, whose layout it must keep."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        return  # StreamingTrainer.restore_resume_state says what a checkpoint without it means
    saved = read_checkpoint_json(path, checkpoint, object)
    if not (isinstance(saved, dict) and "position" in saved):
        raise checkpoint_refused(path, checkpoint, "it is not a mapping with the stream's `position`")
    position = saved["position"]
    if position is None:
        return  # saved before the first batch (nothing to restore), or by DataLoader workers (restore_resume_state refuses it)
    if not (isinstance(position, dict) and all(is_count(position.get(key)) for key in ("pass", "read"))):
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
            isinstance(row, dict) and is_count(row.get("length")) and isinstance(row.get("has_bytes"), bool)
            and isinstance(row.get("path"), (str, type(None))) and is_count(row.get("label")) and row["label"] < classes
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
    return state is None or isinstance(state, bool) or is_count(state)

