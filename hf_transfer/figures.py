"""Figures drawn only when what they show has changed: a digest of each figure's inputs, kept in the PNG itself.

A rerun whose training curves, confusion matrix, Grad-CAM figure or contact sheet would show the same data as the figure
an earlier run left in the output folder keeps that file (linked into the new model repo) instead of drawing it again,
and so never imports matplotlib. The digest covers the figure's inputs, the code that draws it and matplotlib's version.
The earlier file is only read, never trusted blindly: a regular PNG (not a link) whose own metadata holds the digest.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

INPUTS_KEY = "hf_transfer inputs"  # the PNG text chunk holding the digest of what the figure shows
# The modules that draw figures: a change to any of them draws every figure again.
DRAWING_MODULES = ("figures.py", "plots.py", "explain.py", "data_check.py")


def draw(path: str | Path, kind: str, inputs, render: Callable[[Path, dict], object], previous: str | Path | None = None) -> Path:
    """The figure `kind` of `inputs` at `path`: `render(file, metadata)` draws it into `file` (a PNG, with `metadata` as
    its text), unless `previous` (default: `path` itself) is that figure drawn from the same inputs: then that file is
    kept, linked to `path` when it is elsewhere. Drawn into a temporary file and moved in whole."""
    path = Path(path)
    digest = inputs_digest(kind, inputs)
    previous = Path(previous) if previous is not None else path
    if drawn_from(previous) == digest:
        if os.path.abspath(previous) != os.path.abspath(path):
            _link(previous, path)
        logger.debug("%s unchanged: %s kept", kind, previous)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        render(staged, {INPUTS_KEY: digest})
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path


def inputs_digest(kind: str, inputs) -> str:
    """sha256 of the figure's kind, its inputs (JSON; bytes and numpy values by content) and the drawing code's version."""
    text = json.dumps([kind, inputs, _drawing_code()], sort_keys=True, default=_json_value)
    return hashlib.sha256(text.encode()).hexdigest()


def drawn_from(path: Path) -> str | None:
    """The inputs digest recorded in the PNG at `path`; None for anything else (missing, a link, not a PNG, no digest)."""
    if path.is_symlink() or not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path, formats=["PNG"]) as image:  # reads the chunks before the pixels: nothing is decoded
            value = image.info.get(INPUTS_KEY)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # Pillow's errors for a broken PNG
        return None
    return value if isinstance(value, str) else None


def image_content(cell) -> bytes | str:
    """What an image of a dataset shows, for a digest: a cell's bytes, or the bytes of the file it names (a folder's
    image can change under the same path)."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        cell = cell.get("path")
    if isinstance(cell, (str, os.PathLike)):
        try:
            return Path(cell).read_bytes()
        except OSError:
            return str(cell)
    tobytes = getattr(cell, "tobytes", None)  # a PIL image
    if callable(tobytes):
        return repr((cell.mode, cell.size)).encode() + tobytes()
    return repr(cell)


def file_digests(folder: Path, names) -> dict[str, str]:
    """sha256 of each file of `folder` whose name matches one of `names` (glob patterns)."""
    found = sorted({path for name in names for path in folder.glob(name) if path.is_file()})
    return {path.name: _file_sha256(path) for path in found}


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@functools.cache
def _drawing_code() -> dict:
    here = Path(__file__).parent
    try:
        matplotlib = importlib.metadata.version("matplotlib")
    except importlib.metadata.PackageNotFoundError:
        matplotlib = None
    return {"modules": {name: _file_sha256(here / name) for name in DRAWING_MODULES}, "matplotlib": matplotlib}


def _json_value(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    tolist = getattr(value, "tolist", None)  # numpy arrays and numbers
    if callable(tolist):
        return tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"a figure's inputs cannot hold a {type(value).__name__}")


def _link(source: Path, path: Path) -> None:
    """`path` as a second name of `source` (the file itself, untouched), or a copy where links are not possible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        os.link(source, path)
    except OSError:  # a file system without hard links
        shutil.copy2(source, path)
