"""Image decoding policy: every input becomes a fully decoded 8-bit RGB PIL image,
or an UnreadableImageError that says what is wrong with it."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A datasets Image cell read with decode=False ({"bytes": ..., "path": ...}), raw bytes, a path or an image.
ImageInput = Union[Image.Image, bytes, str, os.PathLike, dict[str, Any]]

BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white

# The longest side may be this many times the shortest, at most. A model's preprocessing resizes the shortest side to its
# input size (224-1024 px), so the longest becomes up to this many times that: at 100, a 1024 px model's resize makes
# 1024 x 102,400 px (315 MB as RGB); a 39,000,000 x 1 image (under the pixel limit) would make more pixels than Pillow
# can address. 100:1 still admits panoramas (360 degree ones are about 10:1), receipts, long screenshots, spectrograms.
# With the pixel limit it bounds each side too: at most sqrt(limit x 100), 94,600 px at Pillow's default limit.
MAX_ASPECT_RATIO = 100

# Leading bytes, to name the format when Pillow cannot even parse the header.
_IMAGE_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"BM": "BMP",
                     b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
_OTHER_SIGNATURES = {b"%PDF": "a PDF document", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive",
                     b"version https://git-lfs": "a Git LFS pointer: the real file was never downloaded"}
_TEXT_BYTES = frozenset(range(32, 256)) - {127} | set(b"\t\n\r\f")


class UnreadableImageError(ValueError):
    """An image that cannot be used: `reason` says why, `source` names the file when known."""

    def __init__(self, reason: str, source: str | None = None):
        super().__init__(reason, source)  # both in args, so the error survives pickling between processes
        self.reason, self.source = reason, source

    def __str__(self) -> str:
        return f"{self.reason} ({self.source})" if self.source else self.reason


def load_image(value: ImageInput) -> Image.Image:
    """Fully decode `value`, apply its EXIF orientation and return it as RGB; raise UnreadableImageError."""
    image = value if isinstance(value, Image.Image) else None
    data, source = (None, getattr(value, "filename", None) or None) if image is not None else _read(value)
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; _check_size makes that an error too.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if image is None:
                image = Image.open(io.BytesIO(data))
            _check_size(image, source)
            image.load()  # decode every byte now, so truncation shows here and not in a training step
            return convert_to_rgb(ImageOps.exif_transpose(image))
        except (UnreadableImageError, MemoryError):
            raise
        except UnidentifiedImageError:
            raise UnreadableImageError(_unidentified_reason(data), source) from None
        except Image.DecompressionBombError as error:
            raise UnreadableImageError(f"decompression bomb: {error}", source) from None
        except Exception as error:  # Pillow plugins raise OSError, SyntaxError, ValueError, EOFError... on bad data
            truncated = isinstance(error, EOFError) or "truncat" in str(error).lower()
            image_format = (image.format if image is not None else None) or _signature_format(data) or "image"
            raise UnreadableImageError(f"{'truncated' if truncated else 'corrupt'} {image_format}: {error}",
                                       source) from error


def unreadable_reason(value: ImageInput) -> str | None:
    """Why `value` cannot be used as an image, or None when it decodes; meant for dataset filters."""
    try:
        load_image(value)
    except UnreadableImageError as error:
        return error.reason
    return None


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float greyscale rescaled, transparency composited onto white."""
    if image.mode == "La":  # premultiplied alpha, which Pillow converts only to LA
        image = image.convert("LA")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Fixed scales, not per-image stretching, so brightness stays comparable across a dataset:
        # integer modes hold 16-bit samples (0..65535), float mode holds intensities in 0..1.
        scale = 255.0 if image.mode == "F" else 255 / 65535
        values = np.nan_to_num(np.asarray(image, dtype=np.float64) * scale, nan=0.0)
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), "L")
    if image.has_transparency_data:  # RGBA, LA, PA, palette or colour-key transparency
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # Pillow's CMYK, P, L, 1, YCbCr conversions


def _read(value: bytes | str | os.PathLike | dict[str, Any]) -> tuple[bytes, str | None]:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"], value.get("path")
        if value.get("path") is None:
            raise UnreadableImageError("image cell has neither bytes nor path")
        value = value["path"]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    try:
        return Path(value).read_bytes(), str(value)
    except FileNotFoundError:
        raise UnreadableImageError("file not found", str(value)) from None
    except OSError as error:
        raise UnreadableImageError(f"cannot read file: {error.strerror}", str(value)) from None


def _check_size(image: Image.Image, source: str | None) -> None:
    """Refuse, from the header alone, what would exhaust memory when decoded or resized."""
    limit, pixels = Image.MAX_IMAGE_PIXELS, image.width * image.height
    if limit and pixels > limit:
        raise UnreadableImageError(f"decompression bomb: {pixels:,} pixels > limit {limit:,}", source)
    long, short = max(image.size), min(image.size)
    if long > MAX_ASPECT_RATIO * short:  # also a side of 0 pixels
        raise UnreadableImageError(f"aspect ratio {long / max(short, 1):,.0f}:1 ({image.width:,} x {image.height:,} pixels) "
                                   f"> limit {MAX_ASPECT_RATIO}:1", source)


def _unidentified_reason(data: bytes) -> str:
    if not data:
        return "empty file"
    image_format = _signature_format(data)
    if image_format:
        return f"corrupt {image_format}: Pillow cannot parse its header"
    for signature, what in _OTHER_SIGNATURES.items():
        if data.startswith(signature):
            return f"not an image (looks like {what})"
    head = data[:1024].lower()
    if b"<html" in head or b"<!doctype html" in head:
        return "not an image (looks like HTML, e.g. a saved error page)"
    if b"<svg" in head:
        return "not an image (looks like SVG: vector images are not supported)"
    if set(head) <= _TEXT_BYTES:
        return "not an image (looks like text)"
    return f"not an image (unrecognised format, starts with {data[:8].hex(' ')})"


def _signature_format(data: bytes | None) -> str | None:
    if data and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in _IMAGE_SIGNATURES.items() if data and data.startswith(signature)), None)
