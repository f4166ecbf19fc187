"""The whole flow: data -> model -> freeze plan -> Trainer -> test -> a model repo on disk.

The final model is assembled in a staging folder and moved into `output_dir` with
`config.json` last, so a kill while saving never leaves a folder that loads half a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from .cache import FeatureCache
from .card import describe_hardware, write_model_card
from .checkpoints import SafeTrainer, last_complete_checkpoint
from .data import attach_transforms, collate, load_image_dataset
from .device_resize import transforms_for_run
from .errors import HFTransferError
from .freezing import FreezeCallback, FreezePlan
from .hub import share
from .metrics import compute_metrics, test_report
from .models import data_config, load_model, save_model
from .plots import plot_confusion_matrix, plot_training_curves
from .recipe import Recipe, RunArguments

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
MOVABLE = {"training.output_dir", "training.logging_dir"}


class OutputDirError(HFTransferError, RuntimeError):
    """The output folder holds something this run must not overwrite."""


def run(recipe: Recipe) -> dict:
    """Train, evaluate on the test split and write a complete model repo; returns all results."""
    args = recipe.training
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    # We push once, at the end, with our card and a verification; Trainer must not push checkpoints.
    push_requested, args.push_to_hub = args.push_to_hub, False
    output_dir = Path(args.output_dir)
    run_config = recipe.to_dict()
    check_output_dir(output_dir, run_config, recipe.run)
    set_seed(args.seed)

    with args.main_process_first(desc="dataset preparation"):
        data = load_image_dataset(recipe.data, seed=args.seed)
    model, image_processor = load_model(recipe.model, data.labels)
    train_transform, eval_transform, device_step = transforms_for_run(
        recipe.data, data, data_config(model, image_processor), args.device
    )
    splits = attach_transforms(data, train_transform, eval_transform)
    # Small images of one size reach the model as uint8 at their own size; this hook resizes them on the device.
    device_hook = device_step.attach(model) if device_step else None
    plan = FreezePlan(model, recipe.freeze, args.learning_rate)
    optimizer = torch.optim.AdamW(
        plan.parameter_groups(args.weight_decay), lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    if args.should_save:
        claim_output_dir(output_dir, run_config, recipe.run.overwrite)
    trainer = SafeTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=collate,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        optimizers=(optimizer, None),
        callbacks=[FreezeCallback(plan)],
    )

    resume = True if recipe.run.resume else None
    # With a fully frozen backbone the head trains on features computed once; None otherwise.
    cache = FeatureCache.for_run(recipe, plan, trainer, data, (train_transform, eval_transform))
    if cache is None:
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
        eval_metrics = trainer.evaluate()
        test_output = trainer.predict(splits["test"], metric_key_prefix="test")
    else:
        train_metrics, eval_metrics, test_output = cache.run(splits["test"], resume)
    for split, metrics in (("train", train_metrics), ("eval", eval_metrics), ("test", test_output.metrics)):
        trainer.log_metrics(split, metrics)

    if device_hook:
        device_hook.remove()  # the saved model takes images preprocessed as usual (pipeline, timm)
    results = {
        **train_metrics, **eval_metrics, **test_output.metrics,
        "split_sizes": data.sizes,
        "hardware": describe_hardware(),
        "skipped_images": {name: len(entries) for name, entries in data.skipped.items()},
        "skipped_image_examples": {name: entries[:20] for name, entries in data.skipped.items()},
        "resized_on_device": device_step is not None,  # what `resize_on_device: auto` decided
        **({"feature_cache": cache.summary} if cache else {}),
    }
    if trainer.is_world_process_zero():
        staging = output_dir / ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        # Not trainer.save_model: it also pickles the TrainingArguments, and we write only safetensors.
        save_model(model, image_processor, staging)
        report = test_report(np.argmax(test_output.predictions, axis=-1), test_output.label_ids, data.labels)
        _write_json(staging / "all_results.json", results)
        _write_json(staging / "test_report.json", report)
        _write_json(staging / RUN_CONFIG, run_config)
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        plan.save(staging / "freeze_plan.json")
        plot_training_curves(trainer.state.log_history, staging / "training_curves.png")
        plot_confusion_matrix(report["confusion_matrix"], data.labels, staging / "confusion_matrix.png")
        publish(staging, output_dir)
        write_model_card(output_dir)  # after the move, so the card names the folder users load
        _print_next_steps(output_dir, results)
        if push_requested:
            share(output_dir, args.hub_model_id, private=bool(args.hub_private_repo), revision=args.hub_revision)
    trainer.accelerator.wait_for_everyone()
    return results


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


def check_output_dir(output_dir: Path, run_config: dict, options: RunArguments) -> None:
    """Refuse, before any work, to mix two different runs in one folder."""
    config_file = output_dir / RUN_CONFIG
    if options.overwrite:
        return
    if config_file.exists():
        previous, now = _flatten(json.loads(config_file.read_text())), _flatten(run_config)
        # Run options and the folder's own path (it may have been moved) do not make it another run.
        changed = sorted(k for k in set(previous) | set(now) if k not in MOVABLE and not k.startswith("run.") and previous.get(k) != now.get(k))
        if changed:
            raise OutputDirError(
                f"{output_dir} already holds a different run (differs in: {', '.join(changed[:8])}). "
                "Pass `--overwrite` to replace it, or choose another `--output_dir`."
            )
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise OutputDirError(
            f"{output_dir} is not empty and was not written by hf-transfer. Pass `--overwrite` to replace it, "
            "or choose another `--output_dir`."
        )
    if options.resume and last_complete_checkpoint(output_dir) is None:
        raise OutputDirError(f"`--resume` found no checkpoint in {output_dir}. Run without `--resume` to start fresh.")


def claim_output_dir(output_dir: Path, run_config: dict, overwrite: bool) -> None:
    """Record which run the folder holds, once data and model have loaded and training is about to start."""
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / RUN_CONFIG, run_config)


def _flatten(sections: dict) -> dict:
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def publish(staging: Path, output_dir: Path) -> None:
    """Move the staged files in; config.json goes last, so the folder never loads a mix of two models."""
    (output_dir / "config.json").unlink(missing_ok=True)
    files = sorted(staging.iterdir(), key=lambda path: path.name == "config.json")
    for path in files:
        target = output_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()


def _print_next_steps(output_dir: Path, results: dict) -> None:
    print(
        f"\nTest accuracy {results['test_accuracy']:.2%}, macro-F1 {results['test_f1']:.4f} "
        f"on {results['split_sizes']['test']} images.\n"
        f"Model saved to {output_dir}/ (model card: {output_dir}/README.md). Use it with:\n"
        f"  from transformers import pipeline\n"
        f"  classifier = pipeline('image-classification', model='{output_dir}')\n"
        f"  classifier('cat.jpg')\n"
        f"Share it:   hf-transfer push {output_dir} --repo-id <user>/<name>\n"
        f"Try it:     hf-transfer demo {output_dir}\n"
    )
