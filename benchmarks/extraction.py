"""Feature extraction at the CPU's bf16 rate: the bare model's forward in four precisions / layouts against
hf_transfer's cold-cache extraction before and after `inference_precision`, in one run, variants alternating.

Part `rates`: rounds of two processes, one per OMP_WAIT_POLICY (not set: libgomp's default, as before hf_transfer set
it; PASSIVE: what importing hf_transfer now sets when it is unset), alternating which goes first. Each process warms
up, then runs every variant once on the same images and weights (order rotated by round):

- bare model, `fp32` / `fp32 channels_last` / `bf16` / `bf16 channels_last`: the timm model's forward on
  preprocessed tensors already in memory (batch `--batch-size`, inference mode), no decoding.
- `before`: `FeatureStore` as it was at commit BEFORE (read with `git show`; fp32, NCHW), extracting `--images` test
  images into an empty cache (decoding and preprocessing included, in the main thread, as a run does on a CPU).
- `auto`: today's `FeatureStore` on a model prepared as a run prepares it (`precision.FrozenPasses`, `auto`).

Part `workers`: today's `FeatureStore` extracting `--images` test images into an empty cache with `dataloader_num_workers`
0, 1 and 2, in one process, alternating over `--rounds` rounds: what loader processes beside the model's threads cost or buy
on this machine.

Part `accuracy`: `hf_transfer.pipeline.run` of a cached `head_only` recipe end to end, cold cache, once with
`inference_precision: fp32` and once with `auto`, on the same data: wall time, extraction rate, test accuracy.

    python benchmarks/extraction.py --part rates --dataset cats_vs_dogs --images 256 --rounds 4
    python benchmarks/extraction.py --part workers --dataset cifar10 --images 512 --batch-size 128 --rounds 3
    python benchmarks/extraction.py --part accuracy --dataset cats_vs_dogs      # the whole mirror: 1,800 / 200 / 2,000
"""

from __future__ import annotations

import hf_transfer  # noqa: F401 - first: it sets OMP_WAIT_POLICY (when unset) before torch loads

# isort: split
import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import datasets
import torch
from common import MIRRORS, REPO, VALIDATION_SIZE, device, load_average, median, offline_logging, report

from hf_transfer import feature_store
from hf_transfer.blocks import find_head
from hf_transfer.data import load_image_dataset
from hf_transfer.data.device_resize import transforms_for_run
from hf_transfer.images import load_image
from hf_transfer.models import data_config, load_model
from hf_transfer.pipeline import run, run_arguments
from hf_transfer.precision import FrozenPasses, Precision, resolve
from hf_transfer.recipe import parse_recipe

BEFORE = "92fc9a8"  # the last commit before `inference_precision`
BARE = {"bare fp32": (False, False), "bare fp32 channels_last": (False, True), "bare bf16": (True, False),
        "bare bf16 channels_last": (True, True)}
BEFORE_NAME, AUTO_NAME = f"before ({BEFORE}: fp32, NCHW)", "auto (today's FeatureStore)"
# "": libgomp's default, as before hf_transfer set one (threads spin, then sleep); hf_transfer sets PASSIVE when unset.
POLICIES = {"not set (spin)": "", "PASSIVE (hf_transfer's default)": "PASSIVE"}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="rates", choices=("rates", "workers", "accuracy", "round"), help="`round`: one process of `rates`")
    parser.add_argument("--round-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default="cats_vs_dogs", choices=list(MIRRORS))
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--images", type=int, default=256, help="rates: test images each extraction variant extracts per round")
    parser.add_argument("--batch-size", type=int, default=32, help="rates: the bare model's batch and the extraction's eval batch")
    parser.add_argument("--rounds", type=int, default=4, help="rates: rounds (one process per OMP_WAIT_POLICY each)")
    parser.add_argument("--epochs", type=int, default=5, help="accuracy: head epochs")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--cache-dir", default="/tmp/hf_transfer_bench_extraction_cache", help="a datasets cache for this benchmark only")
    parser.add_argument("--name", default="extraction", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


# --- part `rates` ----------------------------------------------------------------------------------------------------
def feature_store_before():
    """hf_transfer/feature_store.py as it was at BEFORE, as a module of the installed package (its relative imports work)."""
    source = subprocess.run(["git", "show", f"{BEFORE}:hf_transfer/feature_store.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType("hf_transfer._feature_store_before")
    module.__package__ = "hf_transfer"
    exec(compile(source, f"{BEFORE}:hf_transfer/feature_store.py", "exec"), module.__dict__)  # noqa: S102 - our own file at BEFORE
    return module


class Extraction:
    """One extraction variant: a FeatureStore over the first `images` test images, timed extracting into an empty cache."""

    def __init__(self, store_class, model, recipe, data, transforms, precision: Precision | None):
        found = find_head(model)
        extra = {} if precision is None else {"precision": precision}
        self.store = store_class(model, found[1], found[0], recipe.model, data, transforms, run_arguments(recipe), **extra)

    def round(self, cache: Path) -> float:
        shutil.rmtree(cache, ignore_errors=True)
        datasets.config.HF_DATASETS_CACHE = str(cache)  # an empty cache: a cold extraction
        self.store.summary = {"splits": {}}
        getattr(self.store, "extracted", {}).clear()
        started = time.perf_counter()
        features, _ = self.store.features("test")
        return len(features) / (time.perf_counter() - started)


class Bare:
    """The bare timm model on a batch already in memory."""

    def __init__(self, timm_model, pixels: torch.Tensor, bf16: bool, channels_last: bool, batches: int):
        self.model = copy.deepcopy(timm_model).eval()
        format_ = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=format_)
        self.pixels, self.bf16, self.batches = pixels.contiguous(memory_format=format_), bf16, batches

    def round(self, _cache: Path) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            started = time.perf_counter()
            for _ in range(self.batches):
                self.model(self.pixels)
            return self.batches * len(self.pixels) / (time.perf_counter() - started)


def one_round(options: argparse.Namespace) -> None:
    """In this process (one OMP_WAIT_POLICY): a warm-up batch per bare variant, then every variant once, order rotated."""
    recipe = parse_recipe([], dataset=str(MIRRORS[options.dataset]), model=options.model, freeze="head_only",
                          augmentation="none", validation_size=VALIDATION_SIZE[options.dataset], max_test_samples=options.images,
                          per_device_eval_batch_size=options.batch_size, output_dir=tempfile.mkdtemp(), seed=42)
    data = load_image_dataset(recipe.data, seed=42)
    data.splits = datasets.DatasetDict({"test": data.splits["test"]})
    plain, processor = load_model(recipe.model, data.labels)
    plain.eval()
    transforms = transforms_for_run(recipe.data, data, data_config(plain, processor), torch.device("cpu"))[:2]
    hooked = copy.deepcopy(plain)
    auto = resolve("auto", "cpu", hooked)
    FrozenPasses(hooked, auto, head=find_head(hooked)[1])
    cells = data.splits["test"].select(range(options.batch_size))[data.image_column]
    pixels = torch.stack([transforms[1](load_image(cell)) for cell in cells])
    batches = max(options.images // options.batch_size, 1)
    contenders = {name: Bare(plain.timm_model, pixels, *setting, batches) for name, setting in BARE.items()}
    for bare in contenders.values():  # oneDNN builds its kernels for each shape, dtype and layout on first use
        bare.batches, _ = 1, bare.round(Path())
        bare.batches = batches
    contenders[BEFORE_NAME] = Extraction(feature_store_before().FeatureStore, copy.deepcopy(plain), recipe, data, transforms, None)
    contenders[AUTO_NAME] = Extraction(feature_store.FeatureStore, hooked, recipe, data, transforms, auto)
    names = list(contenders)
    shift = options.round_index % len(names)
    speeds = {name: contenders[name].round(Path(options.cache_dir)) for name in names[shift:] + names[:shift]}
    shutil.rmtree(options.cache_dir, ignore_errors=True)
    print("RESULT " + json.dumps({"speeds": speeds, "auto": auto.describe(), "load": os.getloadavg()[0]}), flush=True)


def rates(options: argparse.Namespace) -> None:
    """Rounds of one process per OMP_WAIT_POLICY, alternating; medians over rounds; ratios within a round."""
    results = {policy: [] for policy in POLICIES}
    for round_index in range(options.rounds):
        order = list(POLICIES)[round_index % 2:] + list(POLICIES)[:round_index % 2]
        for policy in order:
            command = [sys.executable, __file__, "--part", "round", "--round-index", str(round_index), "--dataset", options.dataset,
                       "--model", options.model, "--images", str(options.images), "--batch-size", str(options.batch_size),
                       "--cache-dir", options.cache_dir]
            done = subprocess.run(command, env={**os.environ, "OMP_WAIT_POLICY": POLICIES[policy]}, capture_output=True, text=True,
                                  check=True)
            found = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
            results[policy].append(found)
            print(f"round {round_index + 1}, {policy}, load {found['load']:.1f}: "
                  + ", ".join(f"{name} {speed:.1f}" for name, speed in found["speeds"].items()), flush=True)
    today, ours = list(POLICIES)
    rows = []
    for policy in POLICIES:
        for name in results[policy][0]["speeds"]:
            speeds = [found["speeds"][name] for found in results[policy]]
            row = {"OMP_WAIT_POLICY": policy, "variant": name, "median img/s": median(speeds),
                   "min..max img/s": f"{min(speeds):.1f}..{max(speeds):.1f}"}
            if name not in BARE:
                row["x before (today)"] = median([mine["speeds"][name] / base["speeds"][BEFORE_NAME]
                                                  for mine, base in zip(results[policy], results[today])])
            row["/ bare bf16 cl, same process"] = median([found["speeds"][name] / found["speeds"]["bare bf16 channels_last"]
                                                          for found in results[policy]])
            rows.append(row)
    loads = [f"{found['load']:.1f}" for policy in POLICIES for found in results[policy]]
    report(options.name, f"Feature extraction rates ({options.dataset}, {options.model.split('/')[-1]}, {device()})", rows, notes=[
        f"{options.images} test images per extraction (cold cache: decoded, transformed, extracted, stored, loaded), eval batch "
        f"{options.batch_size}; bare model: {max(options.images // options.batch_size, 1)} x {options.batch_size} preprocessed "
        "images in memory, inference mode",
        f"`before`: FeatureStore at {BEFORE} (fp32, NCHW); `auto`: today's FeatureStore, decided: {results[ours][0]['auto']}",
        f"{options.rounds} rounds; each round one process per OMP_WAIT_POLICY (alternating which goes first), each with a warm-up "
        "batch per bare variant, then every variant once (order rotated by round)",
        f"`x before (today)`: per round, this variant over `before` in the `{today}` process of the same round, then the median",
        f"load average (1 min) at the end of each process: {', '.join(loads)}",
        f"targets: `auto` ({ours}) >= 3x `before` ({today}), and >= 70% of bare bf16 channels_last in the same process",
    ], columns=["OMP_WAIT_POLICY", "variant", "median img/s", "min..max img/s", "x before (today)", "/ bare bf16 cl, same process"])


# --- part `workers` --------------------------------------------------------------------------------------------------
WORKERS = (0, 1, 2)


def workers(options: argparse.Namespace) -> None:
    """Cold extractions with each number of loader processes, alternating; median over rounds."""
    recipe = parse_recipe([], dataset=str(MIRRORS[options.dataset]), model=options.model, freeze="head_only",
                          validation_size=VALIDATION_SIZE[options.dataset], max_test_samples=options.images,
                          per_device_eval_batch_size=options.batch_size, output_dir=tempfile.mkdtemp(), seed=42)
    data = load_image_dataset(recipe.data, seed=42)
    data.splits = datasets.DatasetDict({"test": data.splits["test"]})
    model, processor = load_model(recipe.model, data.labels)
    transforms = transforms_for_run(recipe.data, data, data_config(model, processor), torch.device("cpu"))[:2]
    precision = resolve("auto", "cpu", model)
    FrozenPasses(model, precision, head=find_head(model)[1])
    extraction = Extraction(feature_store.FeatureStore, model, recipe, data, transforms, precision)
    extraction.round(Path(options.cache_dir))  # warm-up: oneDNN builds its kernels for each shape on first use
    speeds = {count: [] for count in WORKERS}
    for round_index in range(options.rounds):
        shift = round_index % len(WORKERS)
        for count in WORKERS[shift:] + WORKERS[:shift]:
            extraction.store.args.dataloader_num_workers = count
            speeds[count].append(extraction.round(Path(options.cache_dir)))
            print(f"round {round_index + 1}, {count} worker(s): {speeds[count][-1]:.1f} img/s, load {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(options.cache_dir, ignore_errors=True)
    rows = [{"dataloader_num_workers": count, "median img/s": median(found), "min..max img/s": f"{min(found):.1f}..{max(found):.1f}",
             "x 2 workers": median([mine / base for mine, base in zip(found, speeds[2])])} for count, found in speeds.items()]
    report(options.name, f"Extraction with loader processes ({options.dataset}, {options.model.split('/')[-1]}, {device()}, "
                         f"torch threads {torch.get_num_threads()})", rows, notes=[
        f"{options.images} test images per extraction (cold cache: decoded, transformed, extracted, stored, loaded), eval batch "
        f"{options.batch_size}, {precision.describe()}; {options.rounds} rounds, the order rotated by round, after one warm-up",
        "`x 2 workers`: per round, over the 2-worker extraction of the same round, then the median",
    ])


# --- part `accuracy` -------------------------------------------------------------------------------------------------
def accuracy(options: argparse.Namespace) -> None:
    rows = []
    for precision in ("fp32", "auto"):
        cache = Path(options.cache_dir)
        shutil.rmtree(cache, ignore_errors=True)
        datasets.config.HF_DATASETS_CACHE = str(cache)
        output_dir = Path(tempfile.mkdtemp())
        recipe = parse_recipe(
            [], dataset=str(MIRRORS[options.dataset]), model=options.model, freeze="head_only", augmentation="none",
            validation_size=VALIDATION_SIZE[options.dataset], max_train_samples=options.max_train_samples,
            max_eval_samples=options.max_eval_samples, max_test_samples=options.max_test_samples, num_train_epochs=options.epochs,
            per_device_train_batch_size=64, per_device_eval_batch_size=options.batch_size, inference_precision=precision,
            output_dir=str(output_dir), overwrite=True, disable_tqdm=True, seed=42,
        )
        load_start = load_average()
        started = time.perf_counter()
        results = run(recipe)
        wall = time.perf_counter() - started
        splits = results["feature_cache"]["splits"]
        extracted = sum(split["images"] * split["views"] for split in splits.values())
        seconds = sum(split["seconds"] for split in splits.values())
        rows.append({
            "inference_precision": precision, "decided": f"{results['inference_precision']['dtype']}"
                                                         f"{', channels_last' if results['inference_precision']['channels_last'] else ''}",
            "train/val/test": "/".join(str(results["split_sizes"][s]) for s in ("train", "validation", "test")),
            "wall_s": wall, "extraction img/s": extracted / seconds, "test_accuracy": results["test_accuracy"],
            "eval_accuracy": results["eval_accuracy"], "check": f"{results['feature_cache']['test_check']['images']} images, "
                                                              f"max feature error {results['feature_cache']['test_check']['max_feature_error']:.1e}",
            "load at start": load_start,
        })
        shutil.rmtree(output_dir, ignore_errors=True)
    shutil.rmtree(options.cache_dir, ignore_errors=True)
    gap = 100 * (rows[1]["test_accuracy"] - rows[0]["test_accuracy"])
    report(options.name, f"Cached head_only end to end: fp32 vs auto ({options.dataset}, {options.model.split('/')[-1]}, {device()})", rows, notes=[
        f"head_only, {options.epochs} epochs, augmentation none, eval batch {options.batch_size}, cold cache for each run",
        f"test accuracy auto - fp32: {gap:+.2f} points (target: within 0.3); wall-time ratio fp32 / auto: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}",
    ])


def main() -> None:
    options = arguments()
    offline_logging()
    {"rates": rates, "round": one_round, "workers": workers, "accuracy": accuracy}[options.part](options)


if __name__ == "__main__":
    main()
