"""Streaming against map-style on the same images: `streaming: true` in one and two processes, wall time, images/s, accuracy.

For one local mirror (cats-vs-dogs by default, or CIFAR-10) the script writes one dataset folder and trains on it three
times with `hf-transfer train`, each run in its own process, timed from start to finish:

- `map-style`: the train split read into the datasets cache, sampled by Trainer;
- `stream x1`: `streaming: true`, one process;
- `stream x2`: `streaming: true`, `accelerate launch --multi_gpu --num_processes 2` (on a CPU: two gloo processes with
  `OMP_NUM_THREADS=1` each, so that together they use the threads the one-process runs use).

The folder holds the mirror's train split less its first `--validation-images` images, as `--shards` parquet shards
(images dealt round-robin, so every shard holds both classes and two ranks get 4 shards each), those first images as a
named `validation` split, and a fixed test subset: `--test-images` images at seeded positions (numpy seed 0) of the
mirror's test split. Every run reads these very splits (no `max_*_samples`), so the accuracies are comparable.

Every run: ImageNet Lite0 weights, `head_only` with `feature_cache: false` (a stream cannot be cached), the default
augmentation, `--max-steps` steps of `--batch-size` images per process, evaluation and test once at the end.

    python benchmarks/streaming.py                                   # cats_vs_dogs, 60 steps of 16, 500 test images
    python benchmarks/streaming.py --dataset cifar10 --max-steps 40  # CIFAR-10

`images/s` is the training images over Trainer's `train_runtime` (all processes together); `wall_s` is the whole
command: start-up, data preparation, training, validation, test, saving and the model card.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import MIRRORS, REPO, load_average, report

PARQUET = {"cifar10": MIRRORS["cifar10"] / "plain_text", "cats_vs_dogs": MIRRORS["cats_vs_dogs"] / "data"}  # the splits' files
RUNS = ("map-style", "stream x1", "stream x2")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cats_vs_dogs", choices=sorted(MIRRORS))
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, in this order: {', '.join(RUNS)}")
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--shards", type=int, default=8, help="parquet shards of the train split (8: 4 per rank with 2 processes)")
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="the streaming runs' shuffle_buffer_size")
    parser.add_argument("--validation-images", type=int, default=50)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers per process")
    parser.add_argument("--work-dir", default="/tmp/hf_transfer_bench_streaming", help="the dataset folder, outputs, datasets cache")
    parser.add_argument("--name", default="streaming", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def write_dataset(name: str, folder: Path, options: argparse.Namespace) -> dict:
    """The mirror's images as train shards + named validation and test splits; returns the split sizes."""
    data = folder / "data"
    shutil.rmtree(folder, ignore_errors=True)
    data.mkdir(parents=True)
    mirror = PARQUET[name]
    train = pq.read_table(mirror / "train-00000-of-00001.parquet")
    test = pq.read_table(mirror / "test-00000-of-00001.parquet")
    validation = options.validation_images
    pq.write_table(train.slice(0, validation), data / "validation-00000-of-00001.parquet")
    rest = np.arange(validation, len(train))
    for index in range(options.shards):
        pq.write_table(train.take(rest[index::options.shards]), data / f"train-{index:05d}-of-{options.shards:05d}.parquet")
    chosen = np.sort(np.random.default_rng(0).permutation(len(test))[:options.test_images])
    pq.write_table(test.take(chosen), data / "test-00000-of-00001.parquet")
    return {"train": len(rest), "validation": validation, "test": len(chosen)}


def command(run: str, dataset: Path, output_dir: Path, options: argparse.Namespace) -> list[str]:
    recipe = [
        "--dataset", str(dataset), "--model", options.model, "--freeze", "head_only", "--feature_cache", "false",
        "--max_steps", str(options.max_steps), "--per_device_train_batch_size", str(options.batch_size),
        "--per_device_eval_batch_size", "64", "--learning_rate", str(options.lr), "--dataloader_num_workers", str(options.workers),
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "none",
        "--seed", "42", "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]
    if run != "map-style":
        recipe += ["--streaming", "true", "--shuffle_buffer_size", str(options.shuffle_buffer)]
    if run == "stream x2":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "recipes" / "finetune.py"), *recipe,
                "--ddp_find_unused_parameters", "false"]
    return [sys.executable, "-m", "hf_transfer.cli", "train", *recipe]


def one_run(run: str, dataset: Path, options: argparse.Namespace) -> dict:
    output_dir = Path(options.work_dir) / "outputs" / run.replace(" ", "_")
    shutil.rmtree(output_dir, ignore_errors=True)
    processes = 2 if run == "stream x2" else 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(Path(options.work_dir) / "datasets_cache")}
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"  # 2 processes x 1 thread: the threads one process uses on a 2-core machine
    env.pop("HF_TRANSFER_DEBUG", None)
    load = load_average()
    print(f"\n### {options.dataset}: {run}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command(run, dataset, output_dir, options), check=False, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{run} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    results = json.loads((output_dir / "all_results.json").read_text())
    images = options.max_steps * options.batch_size * processes
    row = {
        "dataset": options.dataset,
        "run": run,
        "processes": processes,
        "train_images_seen": images,
        "wall_s": wall,
        "train_s": results["train_runtime"],
        "images/s": images / results["train_runtime"],
        "test_accuracy": results["test_accuracy"],
        "eval_accuracy": results.get("eval_accuracy", ""),
        "read_by_rank": "/".join(str(count) for count in results.get("streaming", {}).get("images_read_by_rank", [])),
        "load_at_start": load,
    }
    print(f"### {run}: {wall:.0f} s, {row['images/s']:.1f} images/s, test accuracy {row['test_accuracy']:.4f}", flush=True)
    return row


def main() -> None:
    options = arguments()
    dataset = Path(options.work_dir) / options.dataset
    sizes = write_dataset(options.dataset, dataset, options)
    rows = [one_run(run, dataset, options) for run in options.runs.split(",")]
    mapped = next((row for row in rows if row["run"] == "map-style"), None)
    for row in rows:
        if mapped:
            row["gap_points"] = 100 * (row["test_accuracy"] - mapped["test_accuracy"])
    settings = (f"{options.model}, head_only, feature_cache false, {options.max_steps} steps x {options.batch_size} images per process, "
                f"lr {options.lr}, default augmentation, shuffle_buffer_size {options.shuffle_buffer}, "
                f"{options.workers} dataloader workers; "
                f"{PARQUET[options.dataset]}: train {sizes['train']} images in {options.shards} parquet shards, validation its first "
                f"{sizes['validation']}, test {sizes['test']} images at seeded positions (numpy seed 0) of the test split")
    columns = ["dataset", "run", "processes", "train_images_seen", "wall_s", "train_s", "images/s", "test_accuracy", "gap_points",
               "eval_accuracy", "read_by_rank", "load_at_start"]
    report(options.name, "Streaming vs map-style on the same images (head_only, uncached)", rows, [settings], columns)


if __name__ == "__main__":
    main()
