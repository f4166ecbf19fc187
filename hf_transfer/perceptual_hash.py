"""Perceptual hashes of a dataset's images, and the pairs of them within a Hamming radius: the data doctor's second
signal for copies, which colour mode, re-encoding and resizing barely move (`doctor.find_copies` joins it to the
features' similarity)."""

from __future__ import annotations

import io

import datasets
import numpy as np

from .data import PreparedData

# Hamming distance of two 64-bit pHashes at or below which the images are copies. On the cats-vs-dogs mirror copies in
# CMYK, grayscale, palette, RGBA and 16-bit, at half the side or JPEG 30 are within 4 (most 0 or 2), distinct photos at
# 10 or more; on CIFAR-10's 32 px images 401 pairs are within 4, 5 of them with different labels (benchmarks/doctor.py).
HASH_RADIUS = 4
HASH_DECODE_SIDE = 128  # JPEGs decode at 1/2-1/8 scale down to this side: a 4000 px photo in ms; the hash moves by 0-2 bits
EXHAUSTIVE_HASHES_UP_TO = 100_000  # distinct hashes compared all with all (CIFAR-10's 60,000: 3 s, 16 s on 2 busy cores)


def image_hashes(data: PreparedData) -> dict[str, np.ndarray]:
    """Split -> `(images, 8)` uint8: each image's 64-bit perceptual hash (`imagehash.phash`: the 8 x 8 lowest DCT
    frequencies of the grayscale image at 32 x 32) of the image as a run decodes it. Computed with `datasets.map`, so
    the datasets cache keeps them by the split's fingerprint: a second check reads them back."""
    found = {}
    for split, rows in data.splits.items():
        hashed = rows.select_columns([data.image_column]).map(
            _hash_batch, batched=True, batch_size=256, fn_kwargs={"column": data.image_column}, remove_columns=[data.image_column],
            features=datasets.Features({"phash": datasets.Value("binary")}), desc=f"Hashing {split} images",
        )
        found[split] = np.frombuffer(b"".join(hashed["phash"]), dtype=np.uint8).reshape(len(rows), 8)
    return found


def _hash_batch(batch: dict, column: str) -> dict:
    return {"phash": [image_hash(cell) for cell in batch[column]]}


def image_hash(cell: dict) -> bytes:
    """The 8-byte pHash of an image cell (`{"bytes", "path"}`), decoded as `images.load_image` decodes it."""
    import imagehash
    from PIL import Image

    from .images import load_image

    with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]) as image:
        image.draft("RGB", (HASH_DECODE_SIDE, HASH_DECODE_SIDE))  # JPEG only; others decode whole
        return np.packbits(imagehash.phash(load_image(image)).hash).tobytes()


def hash_pairs(hashes: np.ndarray, radius: int = HASH_RADIUS, candidates: np.ndarray | None = None,
               exhaustive_up_to: int = EXHAUSTIVE_HASHES_UP_TO) -> np.ndarray:
    """Pairs `(i, j)`, i < j, of rows of `hashes` (`(images, 8)` uint8) within Hamming distance `radius`. Rows with the
    very same hash are each paired with the first of them only (thousands of blank images stay thousands of pairs); the
    distinct hashes are compared all with all up to `exhaustive_up_to` of them (faiss `IndexBinaryFlat`, O(n^2)), and
    beyond only as the `candidates` pairs (the feature neighbours) ask."""
    import faiss

    count = len(hashes)
    _, first, inverse = np.unique(np.ascontiguousarray(hashes).view(np.uint64).ravel(), return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    repeated = np.flatnonzero(first[inverse] != np.arange(count))
    found = [np.stack([first[inverse[repeated]], repeated], axis=1)]
    if len(first) <= exhaustive_up_to:
        index = faiss.IndexBinaryFlat(64)
        distinct = np.ascontiguousarray(hashes[first])
        index.add(distinct)
        limits, _, near = index.range_search(distinct, radius + 1)  # faiss keeps distances below its radius
        found.append(first[np.stack([np.repeat(np.arange(len(first)), np.diff(limits).astype(np.int64)), near.astype(np.int64)], axis=1)])
    elif candidates is not None:
        near = first[inverse[candidates]]  # each candidate as the first row of its hash
        found.append(near[hamming(hashes[near[:, 0]], hashes[near[:, 1]]) <= radius])
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0).reshape(-1, 2)


def hamming(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bits that differ between rows of two `(n, 8)` uint8 hash arrays."""
    return np.unpackbits(np.bitwise_xor(first, second), axis=1).sum(axis=1).astype(np.int64)
