"""What trains, side by side: head_only, last_n, full and staged + layer decay at the same budget.

Every run is `hf_transfer.pipeline.run` with the same data, epochs, learning rate, batch, seed and
starting weights (one local copy of the backbone with its new head, saved once); only the freeze
options differ. The feature cache is off, so head_only sees the same augmented images as the others.
Test accuracy is that of the best epoch by validation accuracy (the tool's default); the validation
accuracy after every epoch shows whether a strategy first collapses the pretrained features.

    # CPU, a stated subset at a reduced resolution
    python benchmarks/freeze_strategies.py --dataset ../shared/datasets/cats_vs_dogs \
        --max-train-samples 600 --max-test-samples 600 --image-size 128
    # GPU (Trainer uses CUDA by itself): the whole mirror at the model's own resolution
    python benchmarks/freeze_strategies.py --dataset ../shared/datasets/cifar10 --epochs 5 --bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import device, report
from transformers import TimmWrapperForImageClassification, set_seed

from hf_transfer.cli import setup_logging
from hf_transfer.data import load_image_dataset
from hf_transfer.models import data_config, load_model
from hf_transfer.options import DataArguments, ModelArguments
from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe

DEFAULT_STAGES = "[{at_epoch: 0, train: head}, {at_epoch: 1, train: 'last_n:2'}, {at_epoch: 2, train: all}]"


def starting_point(args, folder: Path) -> int:
    """The backbone with its new head, saved once so every strategy starts from the same weights.

    With `--image-size`, the saved preprocessing asks for that input size (timm CNNs work at any size).
    """
    data = DataArguments(dataset=args.dataset, max_train_samples=args.max_train_samples,
                         max_eval_samples=args.max_eval_samples, max_test_samples=args.max_test_samples)
    labels = load_image_dataset(data, seed=args.seed).labels
    set_seed(args.seed)
    model, processor = load_model(ModelArguments(model=args.model), labels)
    if args.image_size:
        if not isinstance(model, TimmWrapperForImageClassification) or model.timm_model.pretrained_cfg.get("fixed_input_size"):
            raise SystemExit(f"--image-size needs a timm model that accepts any input size; {args.model} does not.")
        cfg = model.config.pretrained_cfg
        cfg["input_size"] = [3, args.image_size, args.image_size]
        cfg.pop("test_input_size", None)
    model.save_pretrained(folder)
    return args.image_size or data_config(model, processor)["input_size"][-1]


def run_strategy(args, model_dir: Path, name: str, batchnorm: str, output_dir: Path) -> tuple[dict, dict]:
    """One run; returns the split sizes and its table row."""
    freeze = dict(freeze=name, batchnorm=batchnorm)
    if name == "staged":
        freeze.update(stages=args.stages, layer_decay=args.layer_decay)
    recipe = parse_recipe([], **freeze, **dict(
        dataset=args.dataset, model=str(model_dir), output_dir=str(output_dir), overwrite=True,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        max_test_samples=args.max_test_samples, feature_cache=False,
        num_train_epochs=args.epochs, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, dataloader_num_workers=args.workers,
        bf16=args.bf16, seed=args.seed, save_total_limit=1, disable_tqdm=True,
    ))
    started = time.perf_counter()
    results = run(recipe)
    wall = time.perf_counter() - started
    state = json.loads((output_dir / "trainer_state.json").read_text())
    by_step = {}
    for entry in state["log_history"]:
        if "eval_accuracy" in entry:
            by_step.setdefault(entry["step"], entry["eval_accuracy"])  # first: the epoch's own evaluation
    plan = json.loads((output_dir / "freeze_plan.json").read_text())
    return results["split_sizes"], {
        "strategy": name if name != "staged" else f"staged, layer_decay {args.layer_decay}",
        "batchnorm": batchnorm,
        "trainable params": plan["trainable_parameters"],
        "test acc %": 100 * results["test_accuracy"],
        "macro-F1": results["test_f1"],
        "val acc % by epoch": " / ".join(f"{100 * value:.1f}" for value in by_step.values()),
        "train s": results["train_runtime"],
        "wall s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="../shared/datasets/cats_vs_dogs", help="a Hub id or local folder (the offline mirrors)")
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--strategies", default="head_only,last_n:2,full,staged")
    parser.add_argument("--stages", default=DEFAULT_STAGES, help="for `staged`")
    parser.add_argument("--batchnorm", default="frozen,eval", help="BatchNorm modes to compare (head_only runs once: they are the same for it)")
    parser.add_argument("--layer-decay", type=float, default=0.7, help="for `staged`")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="dataloader_num_workers")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=200)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None, help="input size instead of the model's (CPU runs)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--name", default="freeze_strategies", help="results file: benchmarks/results/<name>.md")
    parser.add_argument("--note", action="append", default=[], help="extra line(s) for the results file")
    args = parser.parse_args()
    setup_logging(main_process=True)  # the freeze plan's audit tables go to the log

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "start"
        size = starting_point(args, model_dir)
        modes = args.batchnorm.split(",")
        for name in args.strategies.split(","):
            for batchnorm in modes[:1] if name == "head_only" else modes:
                output_dir = Path(scratch) / f"{name.replace(':', '_')}-{batchnorm}"
                sizes, row = run_strategy(args, model_dir, name, batchnorm, output_dir)
                rows.append(row)
                print(row, flush=True)
    dataset = args.dataset.rstrip("/").split("/")[-1]
    report(
        args.name,
        f"Freeze strategies at the same budget ({device().type}): {dataset}, {args.model}",
        rows,
        notes=[
            f"images: train {sizes['train']:,}, validation {sizes['validation']:,} (carved from train), "
            f"test {sizes['test']:,} (the `test` split); {size} px",
            f"{args.epochs} epochs, AdamW lr {args.lr} (linear decay, 10% warm-up), batch {args.batch_size}, "
            f"augmentation: random-resized-crop + flip, {'bf16' if args.bf16 else 'fp32'}, seed {args.seed}, feature cache off",
            f"staged: {args.stages}, layer_decay {args.layer_decay}",
            "batchnorm: frozen = statistics kept in frozen blocks, updated in trained ones; eval = kept everywhere",
            "test acc = best epoch by validation accuracy; wall s = the whole run (data checks, training, evaluations, test, saving)",
            *args.note,
        ],
    )


if __name__ == "__main__":
    main()
