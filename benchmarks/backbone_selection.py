"""How well `hf-transfer select` predicts, and what it costs (issue 23). Not named select.py: a script folder on sys.path
would shadow the standard library's `select` module (subprocess imports it).

On each mirror: `select` with the offline candidates on a cold feature cache (timed), then for every candidate a real
`head_only` run (the head on cached features, the recipe's epochs) and a short `full` run (every block trains, 1 epoch),
both tested on the same test images. Spearman's rho of the ranking by LogME and by probe accuracy against each run's test
accuracy. The `head_only` runs read the features `select` extracted (warm start: `reused_images` in the table).

    python benchmarks/backbone_selection.py                                   # both mirrors, the sizes below
    python benchmarks/backbone_selection.py --datasets cats_vs_dogs --skip-full --max-test-samples 500
    python benchmarks/backbone_selection.py --datasets cifar10 --select-only --max-train-samples all --max-eval-samples all
        # the cold `select` alone, as `hf-transfer select recipes/cifar10.yaml --dataset <the mirror>` runs it

Sizes (defaults, for 2 shared CPU cores): `select` samples 2,000 of `--max-train-samples` 4,000 train images (and 500 of
`--max-eval-samples` 500 validation images); the `head_only` runs train on those 4,000 for the recipe's epochs; the `full`
runs on the first `--full-train-samples` 1,000 for 1 epoch; all test on `--max-test-samples` 1,000 test images. Models at
their own resolution.
"""

from __future__ import annotations

# isort: split
import argparse
import json
import shutil
import time
from pathlib import Path

import datasets
from common import MIRRORS, REPO, load_average, offline_logging, report
from scipy.stats import spearmanr

from hf_transfer import selection as selection_module
from hf_transfer.offline import OFFLINE_WEIGHTS
from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe
from hf_transfer.select_options import SelectArguments
from hf_transfer.selection import run_select

RECIPES = {"cifar10": REPO / "recipes" / "cifar10.yaml", "cats_vs_dogs": REPO / "recipes" / "cats_vs_dogs.yaml"}


def limit(value: str) -> int | None:
    return None if value == "all" else int(value)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cats_vs_dogs,cifar10", help="comma-separated: cifar10, cats_vs_dogs")
    parser.add_argument("--candidates", default=",".join(OFFLINE_WEIGHTS), help="comma-separated model ids")
    parser.add_argument("--sample", type=int, default=2000, help="select's --sample")
    parser.add_argument("--max-train-samples", type=limit, default=4000, help="the train split of select and the head_only runs (all: whole)")
    parser.add_argument("--max-eval-samples", type=limit, default=500)
    parser.add_argument("--max-test-samples", type=limit, default=1000)
    parser.add_argument("--full-train-samples", type=int, default=1000, help="train images of the 1-epoch full runs")
    parser.add_argument("--full-epochs", type=float, default=1)
    parser.add_argument("--skip-full", action="store_true", help="no full runs")
    parser.add_argument("--select-only", action="store_true", help="no head_only or full runs: the cold select, timed")
    parser.add_argument("--decode-per-candidate", action="store_true", help="each candidate decodes the sample itself (as "
                        "over select's memory bound for the decoded sample), to time what decoding once saves")
    parser.add_argument("--cache-dir", default="/tmp/hf_transfer_bench_select_cache", help="emptied first: a cold cache")
    parser.add_argument("--output-root", default=str(REPO / "outputs" / "bench_select"))
    parser.add_argument("--name", default="select", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def overrides(name: str, options: argparse.Namespace, **more) -> dict:
    return {"dataset": str(MIRRORS[name]), "max_train_samples": options.max_train_samples, "max_eval_samples": options.max_eval_samples,
            "max_test_samples": options.max_test_samples, "disable_tqdm": True, **more}


def one_dataset(name: str, options: argparse.Namespace) -> tuple[list[dict], list[str]]:
    output = Path(options.output_root) / name
    recipe = parse_recipe([str(RECIPES[name])], **overrides(name, options))
    started = time.perf_counter()
    selection = run_select(recipe, SelectArguments(options.candidates, options.sample, "best", None, str(output / "select")))
    select_seconds = time.perf_counter() - started
    rows = []
    for candidate in (row for row in selection["candidates"] if row["status"] == "measured"):
        model = candidate["model"]
        row = {"dataset": name, "model": model, "LogME": candidate["logme"], "probe": candidate["probe_accuracy"],
               "images/s": candidate["images_per_second"], "timed on": candidate.get("timed_on"), "select_s": candidate["seconds"]}
        if options.select_only:
            rows.append(row)
            continue
        head = run(parse_recipe([str(RECIPES[name])], **overrides(
            name, options, model=model, freeze="head_only", output_dir=str(output / "head_only" / model.replace("/", "_")),
            overwrite=True, save_strategy="no", load_best_model_at_end=False, data_doctor=False)))
        train_cache = head["feature_cache"]["splits"]["train"]
        row.update(head_only_test=head["test_accuracy"], head_only_s=round(head["train_runtime"], 1),
                   reused=train_cache.get("reused_images", 0), extracted=train_cache.get("extracted_images", 0))
        if not options.skip_full:
            full = run(parse_recipe([str(RECIPES[name])], **overrides(
                name, options, model=model, freeze="full", num_train_epochs=options.full_epochs, max_train_samples=options.full_train_samples,
                output_dir=str(output / "full" / model.replace("/", "_")), overwrite=True, save_strategy="no",
                load_best_model_at_end=False, data_doctor=False, eval_strategy="no")))
            row.update(full_test=full["test_accuracy"], full_s=round(full["train_runtime"], 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    notes = [(f"select: {selection['sample']['train_images']:,} of {selection['sample']['train_split']:,} train and "
             f"{selection['sample']['validation_images']:,} validation images, {len(rows)} candidates measured "
             f"(+ the random-init reference: probe {selection['reference']['probe_accuracy']}), cold cache: "
             f"{select_seconds:.0f} s, of which the reference {selection['reference']['seconds']:.0f} s (load average after: "
             f"{load_average()}); " + ("the sample decoded once for every candidate" if selection["sample"].get("decoded_once")
                                       else "each candidate decoded the sample itself"))]
    for truth in ("head_only_test", "full_test"):
        if all(truth in row for row in rows) and len(rows) > 2:
            for score in ("LogME", "probe"):
                rho = spearmanr([row[score] for row in rows], [row[truth] for row in rows]).statistic
                notes.append(f"Spearman's rho, {score} vs {truth}: {rho:.2f} ({len(rows)} candidates)")
    return rows, notes


def main() -> None:
    options = arguments()
    offline_logging()
    if options.decode_per_candidate:
        selection_module.DECODED_BYTES = 0
    rows, notes = [], []
    for name in options.datasets.split(","):
        cache = Path(options.cache_dir) / name
        shutil.rmtree(cache, ignore_errors=True)  # cold: no features, no prepared dataset
        datasets.config.HF_DATASETS_CACHE = str(cache)
        found, said = one_dataset(name, options)
        rows += found
        notes += [f"{name}: {line}" for line in said]
    if not options.select_only:
        notes += [(f"head_only: the recipe's epochs on {options.max_train_samples or 'all'} train images; full: {options.full_epochs:g} "
                  f"epoch on {options.full_train_samples:,}; test on {options.max_test_samples or 'all'} (validation "
                  f"{options.max_eval_samples or 'all'}); no checkpoints, the last epoch's model tested; `reused`/`extracted`: the "
                  "head_only run's train features read from select's sample / computed by the run")]
    title = "hf-transfer select alone, cold (issue 23)" if options.select_only else "hf-transfer select against real runs (issue 23)"
    report(options.name, title, rows, notes)


if __name__ == "__main__":
    main()
