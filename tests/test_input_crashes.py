"""Inputs that used to crash a run or the demo: a stream stored as one parquet file read by two loader workers, a corrupt
parquet shard among streamed ones, an `image_size` no memory holds, and an image 39,000,000 pixels wide and one high.
Each now trains, or stops with one `error: ...` line before anything is read, or is skipped and counted."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import gradio as gr
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    IMAGE,
    LABEL,
    REPO,
    SAMPLE,
    TINY_RUN,
    labelled,
    launch_processes,
    run_command,
    training_error,
    user_error,
    write_dataset,
)
from hub_server import LocalHub
from PIL import Image

from hf_transfer.data.stream import load_streaming_dataset
from hf_transfer.data.train_stream import StreamLoader, train_stream
from hf_transfer.demo import load_app
from hf_transfer.errors import DatasetError
from hf_transfer.images import MAX_ASPECT_RATIO, UnreadableImageError, load_image, unreadable_reason
from hf_transfer.memory_check import MAX_IMAGE_SIZE, check_image_size
from hf_transfer.options import DataArguments, HfTransferTrainingArguments
from hf_transfer.output_dir import LOCK_FILE
from hf_transfer.recipe import parse_recipe_for

pytestmark = pytest.mark.usefixtures("offline_hub")

STREAM = ("--model", "test_efficientnet", "--pretrained", "false", "--freeze", "full", "--per_device_eval_batch_size", "8",
          "--max_test_samples", "16", "--load_best_model_at_end", "false", "--report_to", "none", "--seed", "0",
          "--streaming", "true", "--validation_size", "4", "--per_device_train_batch_size", "2", "--max_steps", "4",
          "--shuffle_buffer_size", "4", "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true")


@pytest.fixture(autouse=True)
def no_pause_when_a_stream_closes(monkeypatch):
    # datasets sleeps 5 s whenever a parquet stream closes, against an Arrow crash at interpreter exit
    # (config.SLEEP_TIME_ON_THREADS_SHUTDOWN); this process lives on, so its tests skip the pause.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _environment(tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env.pop("HF_TRANSFER_DEBUG", None)
    return env


def train_shards(folder: Path, shards: int, train_images: int = 24) -> str:
    """The sample's first train photos as `shards` parquet files (the Hub's layout) and 16 test photos as one."""
    data = folder / "data"
    data.mkdir(parents=True)
    rows = pq.read_table(SAMPLE / "data" / "train-00000-of-00001.parquet").slice(0, train_images)
    for index in range(shards):
        pq.write_table(pa.Table.from_pylist(rows.to_pylist()[index::shards], schema=rows.schema),
                       data / f"train-{index:05d}-of-{shards:05d}.parquet")
    pq.write_table(pq.read_table(SAMPLE / "data" / "test-00000-of-00001.parquet").slice(0, 16), data / "test-00000-of-00001.parquet")
    return str(folder)


# ---- a stream stored as one parquet file per split, read with `dataloader_num_workers: 2` --------------------------

def test_one_parquet_file_streamed_with_two_workers_trains_with_one(tmp_path):
    out = tmp_path / "run"
    result = run_command("--dataset", train_shards(tmp_path / "one", shards=1), *STREAM, "--dataloader_num_workers", "2",
                         "--output_dir", str(out), env=_environment(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "1 DataLoader worker (of the 2 asked)" in result.stderr, result.stderr[-3000:]
    summary = json.loads((out / "all_results.json").read_text())["streaming"]
    assert summary["shards"] == 1 and summary["dataloader_num_workers"] == 1, summary
    # 19 photos a pass (24 less the 4 carved and none unreadable): the worker's reads reach the summary, 4 steps of 2 at least
    assert summary["images_read_by_rank"][0] >= 8, summary


def test_one_parquet_file_streamed_by_two_processes_with_two_workers_each(tmp_path):
    out = tmp_path / "run"
    command = [
        "--dataset", train_shards(tmp_path / "one", shards=1), *STREAM, "--dataloader_num_workers", "2",
        "--ddp_find_unused_parameters", "false", "--output_dir", str(out),
    ]
    result = launch_processes(*command, env=_environment(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads((out / "all_results.json").read_text())["streaming"]
    assert summary["dataloader_num_workers"] == 1, summary
    assert len(summary["images_read_by_rank"]) == 2 and all(read >= 8 for read in summary["images_read_by_rank"]), summary


def test_a_worker_whose_shard_holds_only_carved_images_leaves_the_stream_to_the_others(tmp_path):
    """Two shards, two workers: the first shard holds just the 4 images carved for validation, so the worker that reads
    it has nothing to train on. The stream as a whole has (the other shard): the run goes on with the other worker."""
    data_folder = tmp_path / "two" / "data"
    data_folder.mkdir(parents=True)
    train = pq.read_table(SAMPLE / "data" / "train-00000-of-00001.parquet")
    pq.write_table(train.slice(0, 4), data_folder / "train-00000-of-00002.parquet")  # the stream's start: carved
    pq.write_table(train.slice(4, 8), data_folder / "train-00001-of-00002.parquet")
    pq.write_table(pq.read_table(SAMPLE / "data" / "test-00000-of-00001.parquet").slice(0, 16), data_folder / "test-00000-of-00001.parquet")
    data = load_streaming_dataset(DataArguments(dataset=str(data_folder.parent), streaming=True, validation_size=4,
                                                shuffle_buffer_size=2))
    loader = _loader(data, tmp_path, workers=2)
    assert loader.workers == 2
    batches = iter(loader)
    labels = [label for _ in range(8) for label in next(batches)["labels"].tolist()]  # two passes over the 8 photos
    assert sorted(labels) == sorted(train.slice(4, 8).column("labels").to_pylist() * 2)


def _loader(data, tmp_path: Path, workers: int) -> StreamLoader:
    args = HfTransferTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                                       dataloader_num_workers=workers, dataloader_pin_memory=False, report_to="none")
    return StreamLoader(train_stream(data, _no_pixels, 0, 1, restore_position=True), args)


def test_an_error_in_a_loader_worker_arrives_as_its_one_line(tmp_path):
    """`skip_unreadable_images: false` and a truncated photo, read by a worker: the message, not a worker's traceback."""
    folder = Path(train_shards(tmp_path / "one", shards=1, train_images=12))
    shard = folder / "data" / "train-00000-of-00001.parquet"
    rows = pq.read_table(shard).to_pylist()
    rows[8]["image"]["bytes"] = rows[8]["image"]["bytes"][:300]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    data = load_streaming_dataset(DataArguments(dataset=str(folder), streaming=True, validation_size=4, skip_unreadable_images=False))
    with pytest.raises(DatasetError) as error:
        list(_loader(data, tmp_path, workers=1))
    assert str(error.value).startswith("Unreadable image in the train stream (set `skip_unreadable_images: true` to skip it): ")
    assert "\n" not in str(error.value), str(error.value)


def test_a_stream_with_nothing_to_train_on_read_by_workers_says_so_in_one_line(tmp_path):
    """The 4 photos carved for validation and one more, a copy of one of them: no worker has anything to train on
    (a copy of a carved image is never trained on), and the loader says so."""
    folder = Path(train_shards(tmp_path / "copies", shards=1, train_images=4))
    shard = folder / "data" / "train-00000-of-00001.parquet"
    rows = pq.read_table(shard)
    pq.write_table(pa.concat_tables([rows, rows.slice(1, 1)]), shard)
    data = load_streaming_dataset(DataArguments(dataset=str(folder), streaming=True, validation_size=4))
    with pytest.raises(DatasetError) as error:
        list(_loader(data, tmp_path, workers=1))
    assert str(error.value) == "The train stream holds no images besides those carved for validation and test. Give it images."


def test_an_empty_parquet_shard_is_refused_before_training(tmp_path):
    folder = Path(train_shards(tmp_path / "empty", shards=2, train_images=12))
    shard = folder / "data" / "train-00001-of-00002.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 0), shard)  # datasets' stream ends in an ArrowInvalid on it
    with pytest.raises(DatasetError, match=r"'data/train-00001-of-00002.parquet' .* cannot be read: it holds no rows"):
        load_streaming_dataset(DataArguments(dataset=str(folder), streaming=True, validation_size=4))


def _no_pixels(image) -> torch.Tensor:
    return torch.zeros(1)


# ---- a corrupt parquet shard among the streamed ones ---------------------------------------------------------------

def test_a_corrupt_parquet_shard_is_refused_before_training_naming_it(capsys, tmp_path):
    dataset = train_shards(tmp_path / "four", shards=4)
    shard = Path(dataset) / "data" / "train-00002-of-00004.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted copy: no footer
    out = tmp_path / "run"
    message = user_error(capsys, "--dataset", dataset, *STREAM, "--output_dir", str(out))
    assert "'data/train-00002-of-00004.parquet'" in message and "corrupt" in message, message
    assert not out.exists() or not any(out.iterdir()), "nothing written: refused before training"
    with pytest.raises(DatasetError, match="train-00002-of-00004"):
        load_streaming_dataset(DataArguments(dataset=dataset, streaming=True, validation_size=4))


def test_a_corrupt_hub_shard_is_refused_reading_only_the_footers(tmp_path):
    """Through the Hub's file system (the local test Hub): each shard's footer is read with a ranged request (206),
    never the whole file, and the corrupt shard is named by its path in the repository."""
    dataset = Path(train_shards(tmp_path / "ds", shards=2, train_images=112))
    shard = dataset / "data" / "train-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code = ("import sys\nfrom huggingface_hub import HfApi\nfrom hf_transfer.errors import DatasetError\nfrom hf_transfer.options import DataArguments\n"
            "from hf_transfer.data.stream import load_streaming_dataset\n"
            "HfApi().create_repo('user/ds', repo_type='dataset')\n"
            "HfApi().upload_folder(repo_id='user/ds', repo_type='dataset', folder_path=sys.argv[1])\n"
            "print('uploaded', flush=True)\n"
            "try:\n    load_streaming_dataset(DataArguments(dataset='user/ds', streaming=True, validation_size=4))\n"
            "except DatasetError as error:\n    print('refused:', error)\n")
    with LocalHub() as hub:
        env = {**hub.client_env(tmp_path / "hf", token="hf_user"), "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", code, str(dataset)], env=env, capture_output=True, text=True, timeout=300)
        requests = list(hub.requests)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: Parquet shard 'data/train-00001-of-00002.parquet' of dataset 'user/ds' cannot be read" in done.stdout, done.stdout
    reads = [request for request in requests if request["method"] == "GET" and request["path"].endswith(".parquet")]
    assert {Path(request["path"]).name for request in reads} >= {"train-00000-of-00002.parquet", "train-00001-of-00002.parquet"}
    assert all(request["status"] == 206 for request in reads), reads


def test_a_shard_corrupt_past_its_footer_ends_the_run_in_one_line(capsys, tmp_path):
    """Its footer reads, so it passes the check; a data page does not: the run stops when the stream reaches it."""
    dataset = train_shards(tmp_path / "two", shards=2)
    shard = Path(dataset) / "data" / "train-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[4:1004] = bytes(1000)  # the first data page's header, zeroed
    shard.write_bytes(bytes(data))
    message = training_error(capsys, "--dataset", dataset, *STREAM, "--output_dir", str(tmp_path / "run"))
    assert "A shard of the train stream cannot be read" in message and "Copy that shard again" in message, message


def test_a_corrupt_test_shard_is_refused_too(tmp_path):
    dataset = train_shards(tmp_path / "four", shards=2)
    (Path(dataset) / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    with pytest.raises(DatasetError, match="'data/test-00000-of-00001.parquet'"):
        load_streaming_dataset(DataArguments(dataset=dataset, streaming=True, validation_size=4))


# ---- image_size: refused before the dataset is read when no memory holds a training batch -----------------------

def _recipe(*options: str):
    return parse_recipe_for("cpu", ["--dataset", str(SAMPLE), *TINY_RUN, *options])


def test_image_size_8192_is_refused_before_the_dataset_is_read(capsys, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no_such_dataset"  # reading the dataset would fail: the size is refused first
    message = user_error(capsys, "--dataset", str(missing), *TINY_RUN, "--image_size", "8192", "--output_dir", str(out))
    assert "`image_size: 8192`" in message and "no_such_dataset" not in message, message
    assert re.search(r"Set `image_size` to at most \d+", message), message
    assert not (out / LOCK_FILE).exists(), "the lock file is gone after the refusal"


def test_the_largest_size_offered_fits_and_the_next_does_not():
    available = 2 * 2**30  # a machine with 2 GiB free
    with pytest.raises(Exception) as refused:
        check_image_size(_recipe("--image_size", "4096"), "cpu", available=available)
    largest = int(re.search(r"at most (\d+)", str(refused.value)).group(1))
    assert 160 < largest < 4096
    check_image_size(_recipe("--image_size", str(largest)), "cpu", available=available)
    with pytest.raises(Exception, match=f"at most {largest}"):
        check_image_size(_recipe("--image_size", str(largest + 32)), "cpu", available=available)
    # Twice the batch: the largest size shrinks by about sqrt(2), as activations grow with the area.
    with pytest.raises(Exception) as refused:
        check_image_size(_recipe("--image_size", "4096", "--per_device_train_batch_size", "8"), "cpu", available=available)
    halved = int(re.search(r"at most (\d+)", str(refused.value)).group(1))
    assert abs(halved - largest / 2**0.5) <= 48, (halved, largest)


def test_a_frozen_backbone_needs_no_training_activations():
    """`head_only` trains the head on features computed without gradients: a size too large to train the whole
    network at fits."""
    available = 2 * 2**30
    with pytest.raises(Exception) as refused:
        check_image_size(_recipe("--image_size", "4096"), "cpu", available=available)
    too_large_to_train = int(re.search(r"at most (\d+)", str(refused.value)).group(1)) + 256
    check_image_size(_recipe("--image_size", str(too_large_to_train), "--freeze", "head_only"), "cpu", available=available)


def test_a_hard_upper_bound_whatever_the_memory():
    with pytest.raises(Exception, match=f"at most {MAX_IMAGE_SIZE}"):
        check_image_size(_recipe("--image_size", str(MAX_IMAGE_SIZE + 1), "--freeze", "head_only"), "cpu", available=2**50)
    check_image_size(_recipe("--image_size", str(MAX_IMAGE_SIZE), "--freeze", "head_only"), "cpu", available=2**50)


# ---- an image 39,000,000 pixels wide and one high (under the 40-megapixel limit) ----------------------------------

@pytest.fixture(scope="module")
def long_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (39_000_000, 1), (200, 100, 50)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 200_000  # a small upload
    return buffer.getvalue()


def test_an_image_far_longer_than_wide_is_unreadable_with_a_reason(long_png):
    with pytest.raises(UnreadableImageError, match=r"aspect ratio 39,000,000:1 \(39,000,000 x 1 pixels\)"):
        load_image(long_png)
    for size in ((MAX_ASPECT_RATIO + 1, 1), (1, MAX_ASPECT_RATIO + 1), (3 * MAX_ASPECT_RATIO + 3, 3)):
        assert "aspect ratio" in unreadable_reason(_png(size)), size
    for size in ((MAX_ASPECT_RATIO, 1), (1, MAX_ASPECT_RATIO), (3 * MAX_ASPECT_RATIO, 3)):
        assert load_image(_png(size)).size == size


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_demo_answers_one_line_to_it(long_png, tmp_path):
    app = load_app()
    upload = tmp_path / "long.png"
    upload.write_bytes(long_png)
    with pytest.raises(gr.Error) as error:
        app.read_upload({"path": str(upload)}, tmp_path)
    assert "\n" not in error.value.message and "aspect ratio 39,000,000:1" in error.value.message, error.value.message


def test_a_training_folder_skips_and_counts_it(long_png, tmp_path):
    """In the test split it used to end the run (an OverflowError resizing it for evaluation); in the train split each
    epoch decoded 117 MB of it for a random crop."""
    train, test = labelled("train", 16), labelled("test", 8)
    train["image"][3] = {"bytes": long_png, "path": "train/long.png"}
    test["image"][2] = {"bytes": long_png, "path": "test/long.png"}
    dataset = write_dataset(tmp_path / "folder", {"train": train, "test": test}, {"image": IMAGE, "labels": LABEL})
    out = tmp_path / "run"
    result = run_command("--dataset", dataset, *TINY_RUN, "--output_dir", str(out), env=_environment(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["skipped_images"] == {"train": 1, "validation": 0, "test": 1}, results["skipped_images"]
    assert results["skipped_image_examples"]["test"] == ["test/long.png: aspect ratio 39,000,000:1 (39,000,000 x 1 pixels) "
                                                         f"> limit {MAX_ASPECT_RATIO}:1"], results["skipped_image_examples"]
