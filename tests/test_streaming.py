"""`streaming: true`: parquet shards read as a stream by one and two processes, the same accuracy as the map-style run on
the same photos, a killed run resumed from its saved stream position to the very same weights, webdataset .tar shards,
and what is refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from conftest import CLASSES, IMAGE, REPO, SAMPLE, labelled, launch_processes, sample_rows, train_command, user_error, write_dataset

from hf_transfer.data.source import StreamSource
from hf_transfer.data.stream import image_key, load_streaming_dataset
from hf_transfer.data.train_stream import train_stream
from hf_transfer.options import DataArguments
from hf_transfer.trainer import last_complete_checkpoint

pytestmark = pytest.mark.usefixtures("offline_hub")

SHARDS = 4
TINY = ("--model", "test_efficientnet", "--pretrained", "false", "--freeze", "full", "--per_device_eval_batch_size", "8",
        "--max_test_samples", "16", "--load_best_model_at_end", "false", "--report_to", "none", "--seed", "0")


def shards(folder: Path, train_images: int = 112) -> str:
    """The sample's first `train_images` train photos as 4 parquet shards (row 5 a truncated JPEG) and its test split."""
    data = folder / "data"
    data.mkdir(parents=True)
    train = pq.read_table(SAMPLE / "data" / "train-00000-of-00001.parquet")
    rows = train.slice(0, train_images).to_pylist()
    rows[5]["image"]["bytes"] = rows[5]["image"]["bytes"][:300]
    for index in range(SHARDS):
        pq.write_table(pa.Table.from_pylist(rows[index::SHARDS], schema=train.schema),
                       data / f"train-{index:05d}-of-{SHARDS:05d}.parquet")
    pq.write_table(pq.read_table(SAMPLE / "data" / "test-00000-of-00001.parquet"), data / "test-00000-of-00001.parquet")
    return str(folder)


@pytest.fixture(autouse=True)
def no_pause_when_a_stream_closes(monkeypatch):
    # datasets sleeps 5 s whenever a parquet stream closes (a pass ends, a loop breaks), against an Arrow crash at
    # interpreter exit (config.SLEEP_TIME_ON_THREADS_SHUTDOWN); this process lives on, so its tests skip the pause.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _environment(tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env.pop("HF_TRANSFER_DEBUG", None)
    return env


# ---- what a stream cannot do is refused, naming what to set -----------------------------------------------------

def test_options_a_stream_cannot_honour_are_refused(capsys, tmp_path):
    stream = ("--dataset", str(SAMPLE), "--streaming", "true", *TINY, "--output_dir", str(tmp_path / "run"))
    assert "needs `max_steps`" in user_error(capsys, *stream)
    assert "`validation_size: 0.1` is a fraction" in user_error(capsys, *stream, "--max_steps", "2")
    assert "`max_train_samples`" in user_error(capsys, *stream, "--max_steps", "2", "--max_train_samples", "8")
    assert "`lr_scheduler_type: step`" in user_error(capsys, *stream, "--max_steps", "2", "--lr_scheduler_type", "step")
    assert "`at_epoch`" in user_error(capsys, *stream, "--max_steps", "2", "--freeze", "fastai")
    assert "`image_size_schedule`" in user_error(capsys, *stream, "--max_steps", "2", "--image_size_schedule", "96")
    assert "which a stream never holds" in user_error(capsys, *stream, "--max_steps", "2", "--exclude_flagged", "leaks")
    message = user_error(capsys, *stream, "--max_steps", "2", "--validation_size", "8", "--freeze", "head_only")
    assert "Set `feature_cache: false`" in message
    plain = write_dataset(tmp_path / "ints", {"train": labelled("train", 8)},
                          {"image": IMAGE, "labels": datasets.Value("int64")})
    message = user_error(capsys, "--dataset", plain, "--streaming", "true", *TINY, "--max_steps", "2", "--validation_size", "2",
                         "--test_size", "2", "--output_dir", str(tmp_path / "ints_run"))
    assert "not a ClassLabel" in message


# ---- ranks read disjoint shards; carved images are never trained on ----------------------------------------------

def test_two_ranks_read_disjoint_shards_and_skip_the_carved_images(tmp_path):
    data = load_streaming_dataset(DataArguments(dataset=shards(tmp_path / "shards"), streaming=True, validation_size=8,
                                                shuffle_buffer_size=4))
    assert data.sizes == {"train": None, "validation": 8, "test": 96}
    identify = lambda image: image.tobytes()[:4096]  # noqa: E731 - the decoded pixels name the photo
    served = []
    for rank in (0, 1):
        first_pass = set()
        for example in train_stream(data, identify, rank, 2, restore_position=True):  # endless: up to its first repeat
            if example["pixel_values"] in first_pass:
                break
            first_pass.add(example["pixel_values"])
        served.append(first_pass)
    assert not served[0] & served[1], "the ranks read disjoint shards"
    assert len(served[0] | served[1]) == 103, "every photo once, less the 8 carved and the unreadable one"
    carved = {image_key(cell) for cell in data.splits["validation"]["image"]}
    assert carved == data.carved and len(carved) == 8


def test_the_shuffle_buffer_size_sets_how_far_ahead_an_image_can_be_drawn(tmp_path):
    dataset = shards(tmp_path / "shards", train_images=24)
    identify = lambda image: hashlib.sha256(image.tobytes()).hexdigest()[:12]  # noqa: E731 - the decoded pixels name the photo

    def first_pass(buffer: int) -> list[str]:
        data = load_streaming_dataset(DataArguments(dataset=dataset, streaming=True, validation_size=4, shuffle_buffer_size=buffer))
        stream = iter(train_stream(data, identify, 0, 1, restore_position=True))
        return [next(stream)["pixel_values"] for _ in range(19)]  # 24 photos less the 4 carved and the unreadable one

    passes = {buffer: first_pass(buffer) for buffer in (1, 4, 32)}
    stream_order = {image: position for position, image in enumerate(passes[1])}  # a buffer of one hands out the stream as read
    assert len(stream_order) == 19 and all(sorted(order) == sorted(passes[1]) for order in passes.values())
    earlier = {buffer: max(stream_order[image] - position for position, image in enumerate(order)) for buffer, order in passes.items()}
    assert passes[4] != passes[1] and earlier[4] <= 3, "an image leaves a buffer of 4 at most 3 places before it was read"
    assert earlier[32] > 3, "a buffer larger than the pass can hand out any image first"


def test_the_run_seed_orders_the_stream(tmp_path):
    """The recipe's `seed` reaches the stream: the shard order and the shuffle buffer's draws follow it."""
    dataset = shards(tmp_path / "shards", train_images=24)
    identify = lambda image: hashlib.sha256(image.tobytes()).hexdigest()[:12]  # noqa: E731 - the decoded pixels name the photo

    def first_pass(seed: int) -> list[str]:
        source = StreamSource(SimpleNamespace(data=DataArguments(dataset=dataset, streaming=True, validation_size=4,
                                                                 shuffle_buffer_size=4)))
        stream = iter(train_stream(source.load(seed), identify, 0, 1, restore_position=True))
        return [next(stream)["pixel_values"] for _ in range(19)]  # 24 photos less the 4 carved and the unreadable one

    orders = {seed: first_pass(seed) for seed in (0, 1)}
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1], "another seed, another order of the same photos"
    assert first_pass(0) == orders[0], "the same seed, the same order"


def test_named_validation_and_test_splits_leave_the_whole_stream_to_train_on(tmp_path):
    dataset = shards(tmp_path / "shards", train_images=24)
    validation = pq.read_table(SAMPLE / "data" / "train-00000-of-00001.parquet").slice(100, 8)  # photos the 24 do not hold
    pq.write_table(validation, Path(dataset) / "data" / "validation-00000-of-00001.parquet")
    data = load_streaming_dataset(DataArguments(dataset=dataset, streaming=True))
    assert data.sizes == {"train": None, "validation": 8, "test": 96}
    assert not data.carved, "nothing is carved from the stream when both splits are named"


# ---- one process: the same accuracy as the map-style run on the same photos --------------------------------------

def test_streaming_run_reaches_the_map_style_accuracy(tmp_path):
    from hf_transfer import finetune

    dataset = shards(tmp_path / "shards")
    common = dict(dataset=dataset, model="timm/tf_efficientnet_lite0.in1k", freeze="head_only", feature_cache=False,
                  validation_size=16, max_steps=12, per_device_train_batch_size=16, learning_rate=3e-3, max_test_samples=48,
                  eval_strategy="no", save_strategy="no", load_best_model_at_end=False, seed=42, disable_tqdm=True)
    streamed = finetune(**common, streaming=True, shuffle_buffer_size=32, output_dir=str(tmp_path / "streamed"))
    mapped = finetune(**common, output_dir=str(tmp_path / "mapped"))
    print(f"test accuracy: streamed {streamed['test_accuracy']:.4f}, map-style {mapped['test_accuracy']:.4f}")
    assert streamed["test_accuracy"] >= 0.85 and mapped["test_accuracy"] >= 0.85
    assert abs(streamed["test_accuracy"] - mapped["test_accuracy"]) <= 0.0625  # 3 of the 48 test photos
    assert streamed["skipped_images"]["train"] == mapped["skipped_images"]["train"] == 1
    assert streamed["split_sizes"]["train"] is None and streamed["streaming"]["images_read_by_rank"][0] >= 12 * 16
    card = (tmp_path / "streamed" / "README.md").read_text()
    assert "| train | streamed | 1 |" in card


# ---- two processes ------------------------------------------------------------------------------------------------

def test_two_process_streaming_run(tmp_path):
    out = tmp_path / "run"
    command = [
        "--dataset", shards(tmp_path / "shards", train_images=40), "--streaming", "true", *TINY, "--output_dir", str(out),
        "--validation_size", "8", "--per_device_train_batch_size", "4", "--max_steps", "6", "--shuffle_buffer_size", "4",
        "--eval_strategy", "no", "--save_strategy", "no", "--ddp_find_unused_parameters", "false",
    ]
    result = launch_processes(*command, env=_environment(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((out / "all_results.json").read_text())
    read = results["streaming"]["images_read_by_rank"]
    assert len(read) == 2 and all(count >= 6 * 4 for count in read), read
    assert results["skipped_images"]["train"] == 1, "the truncated photo is met by one rank and counted once"
    ranks = json.loads((out / "freeze_plan.json").read_text())["integrity"]["parameter_checksums_by_rank"]
    assert len(ranks) == 2 and ranks[0] == ranks[1], "both ranks hold the same weights"


# ---- a killed run resumes from the saved stream position ---------------------------------------------------------

def test_killed_streaming_run_resumes_to_identical_weights(tmp_path):
    # 24 photos, 4 carved for validation: 20 a pass, batches of 2, 16 steps: the run goes into its second pass,
    # with checkpoints mid-pass (steps 4, 8) and across the pass boundary (12) where the buffer holds photos of both.
    dataset = shards(tmp_path / "shards", train_images=24)

    def command(output_dir: Path, *extra: str) -> list[str]:
        return train_command("--dataset", dataset, "--streaming", "true", *TINY,
                "--validation_size", "4", "--per_device_train_batch_size", "2", "--max_steps", "16", "--shuffle_buffer_size", "6",
                "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "10", "--logging_strategy", "steps",
                "--logging_steps", "2", "--eval_strategy", "no", "--output_dir", str(output_dir), *extra)

    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    env = _environment(tmp_path)
    reference = subprocess.Popen(command(uninterrupted), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(interrupted), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while last_complete_checkpoint(interrupted) is None or last_complete_checkpoint(interrupted).name == "checkpoint-4":
        assert victim.poll() is None, "the run ended before its second checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (interrupted / "model.safetensors").exists()
    step = int(last_complete_checkpoint(interrupted).name.split("-")[1])
    assert step in (8, 12), step

    resumed = subprocess.run(command(interrupted, "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    weights = [safetensors.torch.load_file(folder / "model.safetensors") for folder in (uninterrupted, interrupted)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 50
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0]), "the resumed run read what the other read"
    timing = ("runtime", "per_second")
    history = [[{key: value for key, value in entry.items() if not any(word in key for word in timing)}
                for entry in json.loads((folder / "trainer_state.json").read_text())["log_history"]]
               for folder in (uninterrupted, interrupted)]
    assert history[0] == history[1]
    results = [json.loads((folder / "all_results.json").read_text()) for folder in (uninterrupted, interrupted)]
    assert results[0]["skipped_images"] == results[1]["skipped_images"] == {"test": 0, "validation": 0, "train": 1}
    assert results[0]["streaming"]["passes_started_by_rank"] == [2]


# ---- webdataset .tar shards: numbers for labels are refused with the dataset card that names them ----------------

def webdataset_shards(folder: Path, train_images: int = 40) -> str:
    """The sample's first train photos as 4 webdataset shards (`<key>.jpg` + `<key>.cls`, the label as a number) and
    16 test photos as one `test` shard: what a webdataset export looks like with no dataset card."""
    folder.mkdir(parents=True)

    def write(name: str, rows: list[dict]) -> None:
        with tarfile.open(folder / name, "w") as tar:
            for index, row in enumerate(rows):
                for extension, data in (("jpg", row["image"]["bytes"]), ("cls", str(row["labels"]).encode())):
                    member = tarfile.TarInfo(f"{name.split('.')[0]}_{index:04d}.{extension}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))

    train = sample_rows("train")[:train_images]
    for index in range(SHARDS):
        write(f"train-{index:05d}.tar", train[index::SHARDS])
    write("test-00000.tar", sample_rows("test")[:16])
    return str(folder)


def test_webdataset_shards_stream_once_their_card_names_the_classes(capsys, tmp_path):
    from hf_transfer import finetune

    dataset = webdataset_shards(tmp_path / "tars")
    options = ("--dataset", dataset, "--streaming", "true", *TINY, "--max_steps", "6", "--validation_size", "4",
               "--per_device_train_batch_size", "4", "--shuffle_buffer_size", "4", "--output_dir", str(tmp_path / "refused"))
    message = user_error(capsys, *options)
    assert "Label column 'cls' of the stream is Value('int64'), not a ClassLabel" in message
    assert f"a README.md in '{dataset}'" in message
    card = re.search(r"`---`, `(.*?)` and `---`", message).group(1)  # the lines the message says to write, as it gives them
    names = card.replace("<name of class 0>", CLASSES[0]).replace("<name of class 1>", CLASSES[1])
    (tmp_path / "tars" / "README.md").write_text(f"---\n{names}\n---\n")

    results = finetune(dataset=dataset, streaming=True, model="test_efficientnet", pretrained=False, freeze="full",
                       max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=8, validation_size=4,
                       shuffle_buffer_size=4, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                       report_to="none", seed=0, disable_tqdm=True, output_dir=str(tmp_path / "run"))
    assert results["split_sizes"] == {"train": None, "validation": 4, "test": 16}
    assert results["streaming"]["images_read_by_rank"][0] >= 6 * 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["label_names"] == CLASSES
