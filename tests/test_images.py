"""The decoding policy on a corpus of real bad and odd files: each is rejected with a reason that names
the problem, or comes back as RGB with the right pixels, whatever form the input takes."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bad_images import build_corpus
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from hf_transfer.images import UnreadableImageError, convert_to_rgb, load_image, unreadable_reason

# corrupt_exif.jpg makes Pillow warn while it reads the EXIF block; that file is meant to be odd.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")

_CORPUS = tempfile.TemporaryDirectory(prefix="bad_images_")  # removed when the test session ends
CORPUS = Path(_CORPUS.name)
CASES = build_corpus(CORPUS)
UNREADABLE = [case for case in CASES if case.kind == "unreadable"]
READABLE = [case for case in CASES if case.kind == "readable"]


def _input_forms(path: Path) -> dict[str, object]:
    """The same file as every kind of value load_image accepts."""
    data = path.read_bytes()
    return {"str path": str(path), "Path": path, "bytes": data,
            "cell with bytes": {"bytes": data, "path": path.name}, "cell with path": {"bytes": None, "path": str(path)}}


def _assert_pixels(image: Image.Image, case) -> None:
    assert image.mode == "RGB"
    got = np.asarray(image)
    assert got.shape == case.expected.shape, case.description
    error = np.abs(got.astype(int) - case.expected.astype(int))
    mean_error = case.max_error if case.mean_error is None else case.mean_error
    assert error.max() <= case.max_error and error.mean() <= mean_error, (case.description, error.max(), error.mean())


def test_corpus_covers_many_real_problems():
    assert len(UNREADABLE) >= 25 and len(READABLE) >= 25
    assert len({case.filename for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", UNREADABLE, ids=lambda case: case.filename)
def test_unreadable_file_is_rejected_with_a_specific_reason(case):
    path = CORPUS / case.filename
    for form, value in _input_forms(path).items():
        with pytest.raises(UnreadableImageError) as caught:
            load_image(value)
        assert case.reason in caught.value.reason, (form, str(caught.value))
        assert unreadable_reason(value) == caught.value.reason, form
    with pytest.raises(UnreadableImageError) as caught:
        load_image(path)
    assert caught.value.source == str(path) and str(caught.value) == f"{caught.value.reason} ({path})"


@pytest.mark.parametrize("case", READABLE, ids=lambda case: case.filename)
def test_readable_file_comes_back_rgb_with_correct_pixels(case):
    path = CORPUS / case.filename
    for form, value in _input_forms(path).items():
        _assert_pixels(load_image(value), case)
        assert unreadable_reason(value) is None, form
    with Image.open(path) as opened:  # a lazily opened PIL image: decoded, oriented and converted too
        _assert_pixels(load_image(opened), case)


def test_lazily_opened_truncated_image_is_rejected():
    with Image.open(CORPUS / "truncated.jpg") as opened:  # Pillow opens it: the header is intact
        with pytest.raises(UnreadableImageError, match="truncated JPEG"):
            load_image(opened)


def test_decompression_bomb_limit_is_pillows_setting(monkeypatch):
    photo = CORPUS / "photo.jpg"  # 274x256 = 70,144 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # between 1x and 2x the limit Pillow only warns
    assert unreadable_reason(photo) == "decompression bomb: 70,144 pixels > limit 50,000"
    with pytest.warns(Image.DecompressionBombWarning):
        opened = Image.open(photo)  # the warning a caller could easily miss
    with opened, pytest.raises(UnreadableImageError, match="70,144 pixels > limit 50,000"):
        load_image(opened)
    assert load_image(CORPUS / "one_pixel.png").size == (1, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit Pillow refuses to open it
    assert unreadable_reason(photo).startswith("decompression bomb: Image size (70144 pixels)")


def test_missing_file_and_empty_cell():
    missing = CORPUS / "no_such_file.jpg"
    assert unreadable_reason(missing) == "file not found"
    assert unreadable_reason({"bytes": None, "path": str(missing)}) == "file not found"
    assert unreadable_reason({"bytes": None, "path": None}) == "image cell has neither bytes nor path"
    assert unreadable_reason(CORPUS).startswith("cannot read file")  # a folder


def test_error_survives_pickling_between_worker_processes():
    error = pickle.loads(pickle.dumps(UnreadableImageError("truncated JPEG", "cat.1.jpg")))
    assert (error.reason, error.source, str(error)) == ("truncated JPEG", "cat.1.jpg", "truncated JPEG (cat.1.jpg)")


# (mode, fill value, expected RGB): every mode Pillow can hold, with hand-computed results.
MODE_TABLE = [
    ("1", 1, (255, 255, 255)), ("L", 77, (77, 77, 77)), ("P", 0, (0, 0, 0)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)), ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
    ("CMYK", (0, 0, 0, 128), (127, 127, 127)), ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
    ("F", 0.5, (128, 128, 128)), ("F", 7.0, (255, 255, 255)), ("I", 65535, (255, 255, 255)),
    ("I", 257, (1, 1, 1)), ("I;16", 32896, (128, 128, 128)), ("I;16B", 65535, (255, 255, 255)),
    ("I;16L", 514, (2, 2, 2)), ("I;16N", 1000, (4, 4, 4)),
    ("LA", (50, 0), (255, 255, 255)), ("LA", (50, 255), (50, 50, 50)), ("La", (100, 128), (227, 227, 227)),
    ("PA", (0, 0), (255, 255, 255)), ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)), ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
    ("RGBa", (10, 20, 30, 255), (10, 20, 30)), ("RGBX", (10, 20, 30, 0), (10, 20, 30)),
    ("RGB", (1, 2, 3), (1, 2, 3)), ("YCbCr", (255, 128, 128), (255, 255, 255)),
    ("HSV", (0, 255, 255), (255, 0, 0)), ("LAB", (255, 128, 128), (255, 255, 255)),
]


@pytest.mark.parametrize(("mode", "fill", "expected"), MODE_TABLE, ids=lambda value: str(value))
def test_convert_to_rgb_handles_every_pillow_mode(mode, fill, expected):
    converted = convert_to_rgb(Image.new(mode, (3, 2), fill))
    assert converted.mode == "RGB" and converted.size == (3, 2)
    assert np.abs(np.asarray(converted).astype(int) - expected).max() <= 1


def test_every_pillow_mode_is_in_the_table():
    assert {mode for mode, _, _ in MODE_TABLE} == set(Image.MODES)


def test_dataset_filter_flags_exactly_the_bad_images():
    """What the data stage does: a datasets Image(decode=False) column, one reason per row."""
    paths = [str(CORPUS / case.filename) for case in CASES]
    by_path = Dataset.from_dict({"image": paths}).cast_column("image", ImageFeature(decode=False))
    embedded = Dataset.from_dict(
        {"image": [{"bytes": Path(path).read_bytes(), "path": Path(path).name} for path in paths]},
        features=Features({"image": ImageFeature(decode=False)}))
    for dataset in (by_path, embedded):
        reasons = dataset.map(lambda batch: {"reason": [unreadable_reason(cell) for cell in batch["image"]]},
                              batched=True)["reason"]
        flagged = {case.filename: reason for case, reason in zip(CASES, reasons) if reason is not None}
        assert set(flagged) == {case.filename for case in UNREADABLE}
        assert all(case.reason in flagged[case.filename] for case in UNREADABLE)
        kept = dataset.filter(lambda cell: unreadable_reason(cell) is None, input_columns="image")
        assert len(kept) == len(READABLE)


def test_images_decoded_by_datasets_are_not_rotated_twice():
    """datasets' own decoding already applies EXIF orientation; load_image must not apply it again."""
    readable = Dataset.from_dict({"image": [str(CORPUS / case.filename) for case in READABLE]})
    decoded = readable.cast_column("image", ImageFeature())
    for case, image in zip(READABLE, decoded["image"]):
        _assert_pixels(load_image(image), case)
