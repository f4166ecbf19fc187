"""Builds a corpus of real bad and odd image files (the dirty data found in scraped datasets), each
with the outcome the decoding policy must give: an error naming the problem, or exact RGB pixels."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
PHOTOS = ("cat.1.jpg", "dog.2.jpg")  # real JPEGs from the cats_vs_dogs mirror (see fixtures/README.md)
WHITE = 255.0


@dataclass(frozen=True)
class Case:
    filename: str
    kind: str  # "unreadable" or "readable"
    description: str
    reason: str | None = None  # unreadable: a phrase the error message must contain
    expected: np.ndarray | None = None  # readable: the RGB pixels load_image must return
    max_error: int = 0  # largest per-value difference allowed (rounding, lossy re-encoding)
    mean_error: float | None = None  # mean difference allowed; defaults to max_error


def build_corpus(folder: str | Path) -> list[Case]:
    """Write every case's file into `folder` and return the cases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for filename, data, case in _unreadable() + _readable():
        (folder / filename).write_bytes(data)
        cases.append(case)
    return cases


# ---------------------------------------------------------------- helpers

def _photo_bytes(index: int = 0) -> bytes:
    return (FIXTURES / PHOTOS[index]).read_bytes()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk, to get headers Pillow's encoder refuses to write."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + extra + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _chunk_offsets(png: bytes, kind: bytes) -> tuple[int, int]:
    """Where the first `kind` chunk's data starts, and where its CRC starts."""
    start = png.index(kind) + 4
    return start, start + struct.unpack(">I", png[start - 8: start - 4])[0]


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Insert an APP1 (EXIF) segment right after SOI: the compressed pixels stay byte for byte the same."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing in float: out = colour * a + white * (1 - a)."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb.astype(np.float64) * a + WHITE * (1 - a)).astype(np.uint8)


def _cmyk_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Full grey-component replacement (K carries the darkness), unlike Pillow's K=0 conversion."""
    rgb = rgb.astype(np.float64)
    black = 255 - rgb.max(axis=2)
    ink = (255 - rgb - black[..., None]) * 255 / np.maximum(255 - black, 1)[..., None]
    return np.dstack([ink, black]).round().astype(np.uint8)


# ---------------------------------------------------------------- unreadable files

def _unreadable() -> list[tuple[str, bytes, Case]]:
    photo = _photo_bytes()
    png = _encode(Image.open(io.BytesIO(photo)), "PNG")
    corrupt_idat = bytearray(png)
    corrupt_idat[_chunk_offsets(png, b"IDAT")[0] + 100] ^= 0xFF  # one damaged byte in the deflate stream
    bad_ihdr_crc = bytearray(png)
    bad_ihdr_crc[29] ^= 0xFF  # the IHDR checksum
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("cat.jpg", photo)
    crop = Image.open(io.BytesIO(photo)).crop((0, 0, 64, 64))
    bomb_rows = zlib.compressobj(9)  # a valid all-black 10000x10000 1-bit PNG: 100 MP in 12 KB
    bomb_idat = b"".join(bomb_rows.compress(bytes(1 + 10000 // 8)) for _ in range(10000)) + bomb_rows.flush()
    rng = np.random.default_rng(0)

    def case(filename: str, data: bytes, reason: str, description: str):
        return filename, bytes(data), Case(filename, "unreadable", description, reason=reason)

    def truncated(image_format: str) -> bytes:
        data = _encode(crop, image_format)
        return data[: len(data) // 2]

    return [
        case("truncated.jpg", photo[: len(photo) // 2], "truncated JPEG", "download cut in half"),
        case("zero_filled_tail.jpg", photo[: len(photo) // 2] + bytes(len(photo) - len(photo) // 2),
             "truncated JPEG", "preallocated file whose second half was never written"),
        case("jpeg_headers_only.jpg", photo[:600], "truncated JPEG", "markers and tables, no scan data"),
        case("jpeg_soi_only.jpg", photo[:20], "corrupt JPEG", "JPEG signature and a partial APP0 only"),
        case("empty.jpg", b"", "empty file", "zero-byte file"),
        case("notes.jpg", b"These are my holiday pictures, see attachment.\n", "looks like text",
             "plain text named .jpg"),
        case("error_page.png", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
             b"<body><h1>Not Found</h1></body></html>\n", "looks like HTML", "HTML error page saved as .png"),
        case("access_denied.jpg", b'{"error": "AccessDenied", "message": "Request has expired"}',
             "looks like text", "JSON error body from an object store"),
        case("lfs_pointer.jpg", b"version https://git-lfs.github.com/spec/v1\noid sha256:"
             + b"4d7a2146" * 8 + b"\nsize 24320\n", "Git LFS pointer", "Git LFS pointer instead of the file"),
        case("document.jpg", _encode(crop, "PDF"), "PDF", "real PDF holding the photo, named .jpg"),
        case("archive.png", zipped.getvalue(), "zip archive", "zip archive named .png"),
        case("compressed.jpg", gzip.compress(photo, mtime=0), "gzip archive", "gzipped JPEG named .jpg"),
        case("random.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "unrecognised format",
             "random bytes"),
        case("drawing.jpg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
             b'height="10"><rect width="10" height="10" fill="red"/></svg>\n', "SVG", "SVG drawing named .jpg"),
        case("truncated.png", png[: len(png) // 2], "truncated PNG", "PNG cut in half"),
        case("png_header_only.png", png[:40], "corrupt PNG", "PNG signature and IHDR, nothing else"),
        case("bad_ihdr_crc.png", bad_ihdr_crc, "corrupt PNG", "PNG whose IHDR checksum is wrong"),
        case("corrupt_idat.png", corrupt_idat, "corrupt PNG", "PNG with a damaged deflate stream"),
        case("zero_width.png", _png(0, 4, 8, 0, zlib.compress(bytes(4))), "corrupt PNG",
             "PNG whose header says 0 pixels wide"),
        case("truncated.gif", truncated("GIF"), "truncated GIF", "GIF cut in half"),
        case("truncated.webp", truncated("WEBP"), "WEBP", "WebP cut in half"),
        case("truncated.bmp", truncated("BMP"), "truncated BMP", "BMP cut in half"),
        case("truncated.tif", truncated("TIFF"), "truncated TIFF", "TIFF cut in half"),
        case("bomb_100mp.png", _png(10000, 10000, 1, 0, bomb_idat), "decompression bomb",
             "valid 10000x10000 PNG, over MAX_IMAGE_PIXELS (Pillow would only warn)"),
        case("bomb_header_400mp.png", _png(20000, 20000, 8, 0, zlib.compress(b"\0")), "decompression bomb",
             "tiny PNG whose header claims 20000x20000"),
    ]


# ---------------------------------------------------------------- readable files

def _readable() -> list[tuple[str, bytes, Case]]:
    photo, second_photo = _photo_bytes(0), _photo_bytes(1)
    pixels = _pixels(photo)
    crop = pixels[:48, :64]
    png = _encode(Image.fromarray(crop), "PNG")
    bad_idat_crc = bytearray(png)
    bad_idat_crc[_chunk_offsets(png, b"IDAT")[1]] ^= 0xFF  # Pillow skips IDAT checksums: the pixels are intact
    orientation = Image.Exif()
    orientation[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    broken_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 20
    ramp = np.arange(0, 65536, 64).reshape(32, 32)  # 16-bit samples that are not multiples of 257
    ramp_8bit = np.round(ramp * 255 / 65535)
    odd_ints = np.array([[0, 257, 32768, 65535, 70000, -5]], dtype=np.int32)  # >65535 and <0 clip
    floats = np.array([[0.0, 0.25, 0.5, 1.0, -0.5, 1.5, np.nan]], dtype=np.float32)
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))
    checkerboard = (np.indices((16, 16)).sum(axis=0) % 2).astype(bool)
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [250, 250, 0]], dtype=np.uint8)
    indices = (np.indices((16, 16)).sum(axis=0) % 4).astype(np.uint8)
    palette_alpha = np.array([0, 128, 255, 64], dtype=np.uint8)
    alpha_ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))
    key = crop.copy()
    key[:8, :8] = (1, 2, 3)  # the colour-key colour, declared transparent by tRNS
    quantized = Image.fromarray(crop).quantize(64)
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((220, 20, 60), (20, 220, 60), (20, 60, 220))]

    def palette_image(alpha: bytes | None) -> Image.Image:
        image = Image.fromarray(indices, "P")
        image.putpalette(palette.tobytes())
        if alpha is not None:
            image.info["transparency"] = alpha
        return image

    def case(filename: str, data: bytes, expected: np.ndarray, description: str, max_error: int = 0,
             mean_error: float | None = None):
        expected = np.asarray(expected, dtype=np.uint8)
        return filename, bytes(data), Case(filename, "readable", description, expected=expected,
                                           max_error=max_error, mean_error=mean_error)

    return [
        case("photo.jpg", photo, pixels, "the unmodified photo"),
        case("photo_second.jpg", second_photo, _pixels(second_photo), "a second unmodified photo"),
        case("png_named.jpg", png, crop, "PNG bytes behind a .jpg name"),
        case("exif_orientation_6.jpg", _with_app1(photo, orientation.tobytes()), np.rot90(pixels, k=-1),
             "EXIF orientation 6: displayed rotated 90 degrees clockwise"),
        case("corrupt_exif.jpg", _with_app1(photo, broken_exif), pixels, "unparsable EXIF block, pixels fine"),
        case("garbage_tail.jpg", photo + b"\x00\x00garbage after EOI" * 20, pixels, "bytes after the JPEG end"),
        case("progressive.jpg", _encode(Image.fromarray(pixels), "JPEG", quality=95, progressive=True), pixels,
             "progressive JPEG re-encoding", max_error=16, mean_error=1),
        case("grey.jpg", _encode(Image.fromarray(pixels).convert("L"), "JPEG", quality=95),
             _grey(np.round(pixels @ np.array([0.299, 0.587, 0.114]))), "greyscale JPEG",
             max_error=8, mean_error=1),
        case("cmyk.jpg", _encode(Image.fromarray(_cmyk_from_rgb(pixels), "CMYK"), "JPEG", quality=95), pixels,
             "CMYK JPEG (Adobe, inverted) with a real black channel", max_error=16, mean_error=1),
        case("cmyk.tif", _encode(Image.fromarray(_cmyk_from_rgb(crop), "CMYK"), "TIFF"), crop,
             "CMYK TIFF", max_error=1),
        case("grey.png", _encode(Image.fromarray(gradient), "PNG"), _grey(gradient), "8-bit greyscale PNG"),
        case("grey16.png", _encode(Image.fromarray(ramp.astype(np.uint16)), "PNG"), _grey(ramp_8bit),
             "16-bit greyscale PNG ramp, scaled (not clipped) to 8 bits"),
        case("grey16.tif", _encode(Image.fromarray(ramp.astype(np.uint16)), "TIFF"), _grey(ramp_8bit),
             "16-bit greyscale TIFF"),
        case("int32.tif", _encode(Image.fromarray(odd_ints), "TIFF"), _grey([[0, 1, 128, 255, 255, 0]]),
             "32-bit integer TIFF read as 16-bit samples, out of range clipped"),
        case("float.tif", _encode(Image.fromarray(floats), "TIFF"), _grey([[0, 64, 128, 255, 0, 255, 0]]),
             "float TIFF: 0..1 intensities, out of range clipped, NaN black"),
        case("rgb48.png", _png(4, 4, 16, 2, zlib.compress(b"".join(
            b"\x00" + (ramp[:4, :12] + 100).astype(">u2")[y].tobytes() for y in range(4)))),
             np.round((ramp[:4, :12] + 100).reshape(4, 4, 3) / 257), "48-bit RGB PNG", max_error=1),
        case("bilevel.png", _encode(Image.fromarray(checkerboard), "PNG"), _grey(checkerboard * 255),
             "1-bit PNG"),
        case("bilevel_g4.tif", _encode(Image.fromarray(checkerboard), "TIFF", compression="group4"),
             _grey(checkerboard * 255), "1-bit CCITT group 4 TIFF (fax)"),
        case("one_pixel.png", _encode(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"), [[[12, 34, 56]]],
             "1x1 image"),
        case("palette.png", _encode(palette_image(None), "PNG"), palette[indices], "palette PNG, opaque"),
        case("palette_alpha.png", _encode(palette_image(palette_alpha.tobytes()), "PNG"),
             _over_white(palette[indices], palette_alpha[indices]), "palette PNG with tRNS alphas",
             max_error=1),
        case("palette_transparent.gif", _encode(palette_image(None), "GIF", transparency=0),
             np.where((indices == 0)[..., None], 255, palette[indices]), "GIF with a transparent index"),
        case("colour_key.png", _encode(Image.fromarray(key), "PNG", transparency=(1, 2, 3)),
             np.where((key == (1, 2, 3)).all(axis=2)[..., None], 255, key), "RGB PNG with a tRNS colour key"),
        case("rgba.png", _encode(Image.fromarray(np.dstack([crop, alpha_ramp]), "RGBA"), "PNG"),
             _over_white(crop, alpha_ramp), "RGBA PNG with an alpha ramp", max_error=1),
        case("la.png", _encode(Image.fromarray(np.dstack([gradient, gradient[::-1]]), "LA"), "PNG"),
             _over_white(_grey(gradient), gradient[::-1]), "greyscale + alpha PNG", max_error=1),
        case("single_frame.gif", _encode(quantized, "GIF"),
             np.array(quantized.getpalette(), dtype=np.uint8).reshape(-1, 3)[np.asarray(quantized)],
             "64-colour GIF"),
        case("animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
             np.asarray(frames[0]), "3-frame GIF: first frame"),
        case("lossless.webp", _encode(Image.fromarray(crop), "WEBP", lossless=True), crop, "lossless WebP"),
        case("lossy.webp", _encode(Image.fromarray(pixels), "WEBP", quality=90), pixels, "lossy WebP",
             max_error=32, mean_error=3),
        case("animated.webp", _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                                      lossless=True), np.asarray(frames[0]), "animated WebP: first frame"),
        case("rgb.bmp", _encode(Image.fromarray(crop), "BMP"), crop, "24-bit BMP"),
        case("icon.ico", _encode(Image.fromarray(crop[:32, :32]), "ICO", sizes=[(32, 32)]), crop[:32, :32],
             "Windows icon"),
        case("bad_idat_crc.png", bad_idat_crc, crop, "PNG with a wrong IDAT checksum (Pillow ignores it)"),
    ]
