"""Feature cache against the uncached Trainer path: `head_only` for 10 epochs on the same data, end to end.

Each run is `hf_transfer.pipeline.run` as `hf-transfer train` calls it (data, model, training, test, saving),
timed from start to finish. Three runs per dataset: uncached (`feature_cache: false`), cached with an empty
cache (extraction included), cached again (cache hit). Both paths train on un-augmented images
(`augmentation: none`), so they solve the same problem and their accuracies must agree.

    python benchmarks/feature_cache.py                              # GPU: full CIFAR-10 and cats-vs-dogs mirrors
    python benchmarks/feature_cache.py --datasets cats_vs_dogs --max-train-samples 400 --max-eval-samples 100 \
        --max-test-samples 400 --workers 2                          # CPU: a stated subset
    python benchmarks/feature_cache.py --datasets cifar10 --paths cached,cached_again --max-train-samples 1000 \
        --max-eval-samples 200 --max-test-samples 500 --epochs 5   # a warm rerun against the first run

`warm / cold` is each run's wall time over the `cached` (empty cache) run's. `check_s` is the full model's pass that
checks the cache (every test image when the run extracts them, else a seeded sample); `figure_s` the Grad-CAM figure
that `write_model_repo` draws for the card (part of every run, cached or not).
"""

from __future__ import annotations

import hf_transfer  # noqa: F401 - first: it sets OMP_WAIT_POLICY (when unset) before torch loads, as `hf-transfer train` does

# isort: split
import argparse
import os
import shutil
import time
from pathlib import Path

import datasets
from common import MIRRORS, REPO, VALIDATION_SIZE, Stopwatch, device, load_average, offline_logging, report

from hf_transfer import model_repo
from hf_transfer.feature_files import cache_root
from hf_transfer.feature_store import CHECK_IMAGES
from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cifar10,cats_vs_dogs", help="comma-separated: cifar10, cats_vs_dogs")
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--paths", default="uncached,cached,cached_again", help="which runs, in this order")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default: 256 on a GPU, 64 on a CPU")
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers; default: cores - 2 on a GPU, 2 on a CPU")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both paths (GPU)")
    parser.add_argument("--inference-precision", default="auto", choices=("auto", "fp32", "bf16"), help="the recipe's inference_precision")
    parser.add_argument("--cache-dir", default="/tmp/hf_transfer_bench_datasets_cache", help="a datasets cache for this benchmark only")
    parser.add_argument("--output-root", default=str(REPO / "outputs" / "bench_feature_cache"))
    parser.add_argument("--name", default="feature_cache", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def backbone_passes(sizes: dict, epochs: int, path: str, hits: bool) -> int:
    """Images that go through the backbone in one run: every epoch for uncached, once per split for cached (a warm
    run: only the test images that check the cache)."""
    if path == "uncached":
        return epochs * (sizes["train"] + sizes["validation"]) + sizes["validation"] + sizes["test"]
    if hits:
        return min(sizes["test"], CHECK_IMAGES)
    return sizes["test"] + sizes["train"] + sizes["validation"]


def one_run(name: str, mirror: Path, path: str, options: argparse.Namespace) -> dict:
    cuda = device().type == "cuda"
    output_dir = Path(options.output_root) / f"{name}-{path}"
    recipe = parse_recipe(
        [],
        dataset=str(mirror), model=options.model, freeze="head_only", augmentation="none",
        validation_size=VALIDATION_SIZE[name], max_train_samples=options.max_train_samples,
        max_eval_samples=options.max_eval_samples, max_test_samples=options.max_test_samples,
        num_train_epochs=options.epochs, learning_rate=options.lr, per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.eval_batch_size or (256 if cuda else 64),
        dataloader_num_workers=options.workers if options.workers is not None else (max((os.cpu_count() or 4) - 2, 1) if cuda else 2),
        bf16=options.bf16, feature_cache=path != "uncached", output_dir=str(output_dir), overwrite=True,
        disable_tqdm=True, seed=42, inference_precision=options.inference_precision,
    )
    if path == "cached":
        shutil.rmtree(cache_root(), ignore_errors=True)  # an empty cache: extraction is timed too
    print(f"\n### {name}: {path} run on {device()} ({mirror})", flush=True)
    figure = FigureClock()
    load = load_average()
    with Stopwatch() as watch, figure:
        results = run(recipe)
    cache = results.get("feature_cache", {})
    hits = bool(cache) and all(split["hit"] for split in cache["splits"].values() if split["images"])
    extraction = sum(split["seconds"] for split in cache.get("splits", {}).values() if not split["hit"])
    passes = backbone_passes(results["split_sizes"], options.epochs, path, hits)
    row = {
        "dataset": name,
        "run": path,
        "train/val/test": "/".join(str(results["split_sizes"][s]) for s in ("train", "validation", "test")),
        "wall_s": watch.seconds,
        "backbone_passes": passes,
        "test_accuracy": results["test_accuracy"],
        "eval_accuracy": results["eval_accuracy"],
        "cache_accuracy": results.get("test_cache_accuracy", ""),
        "cache_MB": cache["bytes"] / 2**20 if cache else "",
        "extraction_s": extraction if cache else "",
        "check_s": cache["test_check"]["seconds"] if cache.get("test_check") else "",
        "checked_images": cache["test_check"]["images"] if cache.get("test_check") else "",
        "figure_s": figure.seconds,
        "precision": results["inference_precision"]["dtype"] if results.get("inference_precision") else "",
        "load_at_start": load,
    }
    print(f"### {name}: {path} done in {watch.seconds:.1f} s, test accuracy {results['test_accuracy']:.4f}", flush=True)
    return row


class FigureClock:
    """Times `save_explanation_figure` (the card's Grad-CAM figure) inside a run, by wrapping model_repo's reference to it."""

    def __enter__(self):
        self.seconds, self.original = 0.0, getattr(model_repo, "save_explanation_figure", None)
        if self.original is not None:
            def timed(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return self.original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started

            model_repo.save_explanation_figure = timed
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            model_repo.save_explanation_figure = self.original


def main() -> None:
    options = arguments()
    offline_logging()
    datasets.config.HF_DATASETS_CACHE = options.cache_dir
    rows, notes = [], []
    for name in options.datasets.split(","):
        runs = [one_run(name, MIRRORS[name], path, options) for path in options.paths.split(",")]
        uncached = next((row for row in runs if row["run"] == "uncached"), None)
        cold = next((row for row in runs if row["run"] == "cached"), None)
        for row in runs:
            if cold:
                row["warm / cold"] = row["wall_s"] / cold["wall_s"]
            if uncached:
                row["speedup"] = uncached["wall_s"] / row["wall_s"]
                row["accuracy_gap_points"] = 100 * (row["test_accuracy"] - uncached["test_accuracy"])
        rows += runs
        notes += estimate(name, runs, options.epochs)
    columns = ["dataset", "run", "train/val/test", "wall_s", "speedup", "warm / cold", "test_accuracy", "accuracy_gap_points",
               "cache_accuracy", "eval_accuracy", "cache_MB", "extraction_s", "check_s", "checked_images", "figure_s", "precision",
               "backbone_passes", "load_at_start"]
    settings = (f"{options.model}, head_only, {options.epochs} epochs, lr {options.lr}, batch {options.batch_size}, "
                f"augmentation none, {'bf16' if options.bf16 else 'fp32'}, inference_precision {options.inference_precision}, device {device()}, "
                f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY') or 'not set'}")
    report(options.name, "Feature cache vs uncached Trainer (head_only, end to end)", rows, [settings, *notes], columns)


def estimate(name: str, runs: list[dict], epochs: int) -> list[str]:
    """Subsets only: the full mirror's backbone passes x the extraction rate measured here (fixed costs left out)."""
    full = {"cifar10": {"train": 45000, "validation": 5000, "test": 10000}, "cats_vs_dogs": {"train": 1800, "validation": 200, "test": 2000}}[name]
    cached = next((row for row in runs if row["run"] == "cached"), None)
    if cached is None or cached["train/val/test"] == "/".join(str(size) for size in full.values()):
        return []
    extracted = sum(int(size) for size in cached["train/val/test"].split("/")[:2])
    per_pass = cached["extraction_s"] / extracted
    minutes = {path: backbone_passes(full, epochs, path, hits=False) * per_pass / 60 for path in ("uncached", "cached")}
    return [f"estimate for the full {name} mirror here, at the {1 / per_pass:.1f} images/s extraction rate measured: "
            f"uncached {minutes['uncached']:,.0f} min, cached {minutes['cached']:,.0f} min (extraction + test pass)"]


if __name__ == "__main__":
    main()
