"""Training on a CPU in bf16 + channels_last against fp32: step rate (alternating rounds) and test accuracy.

Part `steps`: hf_transfer's Trainer path of `overhead.py` (TrainerPath: recipe defaults, FreezePlan, SafeTrainer; 32 px
uint8 images upsampled on the device) for `--freeze` full / last_n, in fp32 NCHW, fp32 channels_last and bf16 autocast
+ channels_last, the variants alternating round by round (order rotated), medians over rounds.

Part `accuracy`: `hf_transfer.pipeline.run` end to end, fp32 and then `bf16: true`, same data, seed and schedule:
test accuracy and wall time. Both runs keep the default `inference_precision: auto` (evaluation and test in bf16 on
a CPU with AVX512-BF16), so the difference is the training precision alone.

    python benchmarks/training_precision.py --part steps --freeze full --rounds 5
    python benchmarks/training_precision.py --part accuracy --freeze full --max-train-samples 1000 --max-test-samples 1000
    python benchmarks/training_precision.py --part accuracy --freeze last_n:11 --image-size 128 --batch-size 64 --epochs 1 \
        --max-train-samples 10000 --max-eval-samples 500 --max-test-samples 10000 --seeds 42,43,44
"""

from __future__ import annotations

import hf_transfer  # noqa: F401 - first: it sets OMP_WAIT_POLICY (when unset) before torch loads, as `hf-transfer train` does

# isort: split
import argparse
import functools
import os
import tempfile
import time

import datasets
import overhead
import torch
from common import MIRRORS, VALIDATION_SIZE, alternating_rounds, device, load_average, median, offline_logging, report
from overhead import Images, TrainerPath

from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe

VARIANTS = {"fp32": (False, False), "fp32 channels_last": (False, True), "bf16 channels_last": (True, True)}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="steps", choices=("steps", "accuracy"))
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--freeze", default="full", help="full or last_n:K")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's input size")
    parser.add_argument("--warmup", type=int, default=2, help="steps: untimed steps per round")
    parser.add_argument("--steps", type=int, default=6, help="steps: timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dataset", default="cifar10", choices=list(MIRRORS))
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--max-eval-samples", type=int, default=200)
    parser.add_argument("--max-test-samples", type=int, default=1000)
    parser.add_argument("--seeds", default="42", help="accuracy: comma-separated seeds, fp32 then bf16 for each")
    parser.add_argument("--name", default="training_precision")
    return parser.parse_args()


# TrainingArguments refuses `bf16: true` without a GPU unless `use_cpu: true` (CPU autocast); a recipe says so itself.
CPU = {} if torch.cuda.is_available() else {"use_cpu": True}


def steps(options: argparse.Namespace) -> None:
    overhead.parse_recipe = functools.partial(overhead.parse_recipe, **CPU)  # TrainerPath builds its recipe there
    labels = [f"class_{index}" for index in range(10)]
    generator = torch.Generator().manual_seed(42)
    count = options.batch_size * (options.warmup + options.steps)
    dataset = Images(torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator),
                     torch.randint(0, 10, (count,), generator=generator))
    contenders = {}
    for name, (bf16, channels_last) in VARIANTS.items():
        settings = argparse.Namespace(**vars(options), bf16=bf16, channels_last=channels_last, seed=42, clock="wall")
        contenders[name] = TrainerPath(settings, dataset, labels, clip=True)
    names = list(contenders)
    loads = []

    def progress(seconds: dict) -> None:
        loads.append(os.getloadavg()[0])
        print(f"round {len(loads)}, load {loads[-1]:.1f}: " + ", ".join(f"{name} {1000 * seconds[name][-1]:.0f} ms" for name in names),
              flush=True)

    seconds = alternating_rounds(contenders, options.rounds, options.steps, progress)
    rows = []
    for name in names:
        speedups = [base / mine for mine, base in zip(seconds[name], seconds[names[0]])]
        rows.append({"variant": name, "median step ms": 1000 * median(seconds[name]), "img/s": options.batch_size / median(seconds[name]),
                     "x fp32 (median of rounds)": median(speedups), "min..max x": f"{min(speedups):.2f}..{max(speedups):.2f}"})
    report(options.name, f"Training step rate by precision ({device().type}, {options.model.split('/')[-1]}, {options.freeze})", rows, notes=[
        f"hf_transfer's Trainer path (overhead.py's TrainerPath), batch {options.batch_size}, 32 px uint8 images upsampled on the device, "
        f"random-init weights, {options.warmup} untimed + {options.steps} timed steps per round, {options.rounds} rounds after a warm-up "
        "round, order rotated",
        f"load average (1 min) after each round: {', '.join(f'{load:.1f}' for load in loads)}",
        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY') or 'not set'}",
    ])


def accuracy(options: argparse.Namespace) -> None:
    rows = []
    datasets.config.HF_DATASETS_CACHE = tempfile.mkdtemp()
    seeds = [int(seed) for seed in options.seeds.split(",")]
    for seed in seeds:
        for bf16 in (False, True):
            with tempfile.TemporaryDirectory() as output_dir:
                recipe = parse_recipe(
                    [], dataset=str(MIRRORS[options.dataset]), model=options.model, freeze=options.freeze,
                    validation_size=VALIDATION_SIZE[options.dataset], max_train_samples=options.max_train_samples,
                    max_eval_samples=options.max_eval_samples, max_test_samples=options.max_test_samples, num_train_epochs=options.epochs,
                    learning_rate=options.lr, per_device_train_batch_size=options.batch_size, image_size=options.image_size, bf16=bf16, **CPU,
                    save_strategy="no", load_best_model_at_end=False, output_dir=output_dir, disable_tqdm=True, seed=seed,
                )
                load = load_average()
                started = time.perf_counter()
                results = run(recipe)
                rows.append({"seed": seed, "training": "bf16 autocast" if bf16 else "fp32", "freeze": options.freeze,
                             "train/val/test": "/".join(str(results["split_sizes"][s]) for s in ("train", "validation", "test")),
                             "wall_s": time.perf_counter() - started, "train_runtime_s": results["train_runtime"],
                             "test_accuracy": results["test_accuracy"], "eval_accuracy": results["eval_accuracy"],
                             "train_loss": results["train_loss"], "load at start": load})
    gaps = [100 * (bf16["test_accuracy"] - fp32["test_accuracy"]) for fp32, bf16 in zip(rows[::2], rows[1::2])]
    speed = median([fp32["train_runtime_s"] / bf16["train_runtime_s"] for fp32, bf16 in zip(rows[::2], rows[1::2])])
    report(options.name, f"Training precision: test accuracy ({options.dataset}, {options.model.split('/')[-1]}, {options.freeze})", rows, notes=[
        f"{options.epochs:g} epochs, lr {options.lr}, batch {options.batch_size}, image size {options.image_size or 'the model’s'}, "
        "channels_last in both (the model's memory format for a CNN), inference_precision auto in both, "
        f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY') or 'not set'}",
        f"test accuracy bf16 - fp32 by seed: {', '.join(f'{gap:+.2f}' for gap in gaps)} points (mean {sum(gaps) / len(gaps):+.2f}); "
        f"train_runtime fp32 / bf16 (median over seeds): {speed:.2f}",
    ])


def main() -> None:
    options = arguments()
    offline_logging()
    steps(options) if options.part == "steps" else accuracy(options)


if __name__ == "__main__":
    main()
