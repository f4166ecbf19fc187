"""Accuracy and time-to-accuracy of hf_transfer's fine-tuning on the dataset mirrors.

Each run is hf_transfer's own flow (load_image_dataset -> load_model -> FreezePlan -> Trainer with
its callbacks), built here so that a timer callback can see every epoch: the test split is
evaluated after each epoch and the first epoch at or above `--target` gives the time-to-accuracy.
No model selection uses the test split: the schedule is fixed and the last epoch is reported.

    # CPU, a stated subset (2 cores cannot fine-tune 50,000 images at 224 px)
    python benchmarks/accuracy.py --dataset ../shared/datasets/cifar10 --models tf_efficientnet_lite0 \
        --strategies head_only,fastai,full --max-train-samples 1000 --max-test-samples 500 --epochs 2
    # GPU, full CIFAR-10, 32 px images upsampled on the device
    python benchmarks/accuracy.py --dataset /tmp/cifar10 --strategies full --epochs 10 --device-resize
"""

from __future__ import annotations

import argparse
import tempfile
import time

import datasets
import torch
from common import device, report
from transformers import TrainerCallback

from hf_transfer.models import data_config, load_model
from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe


class EpochClock(TrainerCallback):
    """Wall-clock of every epoch's training and of each evaluation, from the start of `train()`."""

    def __init__(self):
        self.start = None
        self.training_seconds = 0.0
        self.evaluations: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.start is None:  # set earlier when feature extraction counts too
            self.start = time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.training_seconds += time.perf_counter() - self.epoch_start  # before this epoch's evaluation

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append({"epoch": state.epoch, "seconds": time.perf_counter() - self.start, **(metrics or {})})

    def time_to(self, target: float) -> tuple[float | None, float | None]:
        for evaluation in self.evaluations:
            if evaluation.get("eval_accuracy", 0) >= target:
                return evaluation["seconds"], evaluation["epoch"]
        return None, None


def recipe_for(args, model: str, strategy: str, output_dir: str):
    overrides = dict(
        dataset=args.dataset, model=model, freeze=strategy, output_dir=output_dir,
        validation_split=args.eval_split or None, num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        dataloader_num_workers=args.workers, eval_strategy="epoch", save_strategy="no",
        load_best_model_at_end=False, lr_scheduler_type=args.scheduler,
        label_smoothing_factor=args.label_smoothing, bf16=args.bf16, seed=args.seed,
        dataloader_persistent_workers=args.workers > 0,  # no worker restart (and re-fork) every epoch
    )
    overrides.update(image_size=args.image_size, resize_on_device="true" if args.device_resize else "false")
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples", "augmentation"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.layer_decay is not None and strategy not in ("head_only",):
        overrides["layer_decay"] = args.layer_decay
    return parse_recipe([], **overrides)


def run_one(args, model_name: str, strategy: str) -> dict:
    """One fine-tuning run as `hf-transfer train` runs it (feature cache included, channels_last where `inference_precision:
    auto` chooses it), timed per epoch."""
    with tempfile.TemporaryDirectory() as output_dir:
        recipe = recipe_for(args, model_name, strategy, output_dir)
        clock = EpochClock()
        started = clock.start = time.perf_counter()
        results = run(recipe, callbacks=(clock,))
        train_wall = clock.evaluations[-1]["seconds"] if clock.evaluations else time.perf_counter() - started
        cache = "feature_cache" in results
        test, sizes = results, results["split_sizes"]
        model, processor = load_model(recipe.model, ["unused", "unused"])
        config = data_config(model, processor)
    seconds_to_target, epoch_to_target = clock.time_to(args.target)
    _, height, _ = config["input_size"]
    return {
        "model": model_name.removeprefix("timm/").removesuffix(".in1k"),
        "strategy": strategy + (" (cache)" if cache else ""),
        "train imgs": sizes["train"],
        "test imgs": sizes["test"],
        "px": height,
        "epochs": args.epochs,
        "test acc %": 100 * test["test_accuracy"],
        "macro-F1": test["test_f1"],
        "best epoch acc %": 100 * max((e.get("eval_accuracy", 0) for e in clock.evaluations), default=0),
        f"time to {100 * args.target:g}% (s)": "-" if seconds_to_target is None else f"{seconds_to_target:.0f} (ep {epoch_to_target:.0f})",
        "wall s": train_wall,
        "img/s": sizes["train"] * args.epochs / train_wall,
        "img/s, epochs only": sizes["train"] * args.epochs / clock.training_seconds if clock.training_seconds and not cache else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="../shared/datasets/cifar10")
    parser.add_argument("--models", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--strategies", default="head_only,fastai,full", help="freeze strategies or presets (fastai = staged)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layer-decay", type=float, default=None)
    parser.add_argument("--scheduler", default="linear")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=0, help="dataloader_num_workers (Trainer's default is 0)")
    parser.add_argument("--eval-split", default="test", help="evaluated after each epoch, for time-to-accuracy (\"\": carve a validation split)")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--augmentation", default=None)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--device-resize", action="store_true", help="send 32 px images, upsample on the device (`resize_on_device: true`)")
    parser.add_argument("--image-size", type=int, default=None, help="train and test at this size instead of the model's (CPU runs)")
    parser.add_argument("--bf16", action="store_true", default=torch.cuda.is_available())
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--name", default="accuracy", help="results file: benchmarks/results/<name>.md")
    parser.add_argument("--note", action="append", default=[], help="extra line(s) for the results file")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution kernels once
    # A fresh datasets cache, so that head_only always pays for its feature extraction (no hit from an earlier run).
    scratch = tempfile.TemporaryDirectory(prefix="hf_transfer_bench_")
    datasets.config.HF_DATASETS_CACHE = scratch.name
    if args.max_eval_samples is None and args.eval_split == "test":
        args.max_eval_samples = args.max_test_samples  # the per-epoch test evaluation uses the same images

    rows = []
    for model_name in args.models.split(","):
        for strategy in args.strategies.split(","):
            row = run_one(args, model_name, strategy)
            rows.append(row)
            print(row, flush=True)
    path = "device-resize (`resize_on_device: true`): workers decode the 32 px images and shift (reflect, 1/8 of the side) + flip them; resize, centre crop and normalisation run on the device, batched" if args.device_resize \
        else "hf_transfer's data path: decode + timm transforms to the model's input size on the CPU (random-resized-crop + flip)"
    report(
        args.name,
        f"Fine-tuning accuracy and time-to-accuracy ({device().type}): {args.dataset.rstrip('/').split('/')[-1]}",
        rows,
        notes=[
            path,
            f"AdamW lr {args.lr}, {args.scheduler} schedule with hf_transfer's 10% warm-up, batch {args.batch_size}, "
            f"label smoothing {args.label_smoothing}, layer decay {args.layer_decay}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
            f"dataloader_num_workers {args.workers}, channels_last as `inference_precision: auto` decides",
            f"`{args.eval_split or 'validation (carved)'}` split evaluated after every epoch (time-to-accuracy, wall-clock from the start of train(), "
            "evaluations included); test acc = last epoch, no model selection",
            "wall s = from the start of training to the end of the last epoch's evaluation (head_only: feature extraction included); "
            "img/s = training images x epochs / wall s (`epochs only`: evaluations and extraction left out); setup = dataset preparation + model load (not in wall s)",
            *args.note,
        ],
    )


if __name__ == "__main__":
    main()
