"""The whole flow: data -> model -> freeze plan -> Trainer -> test -> a model repo on disk.

The final model is assembled in a staging folder and moved into `output_dir` with
`config.json` last, so a kill while saving never leaves a folder that loads half a model.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from .cached_head import CachedHeadTraining
from .card import describe_hardware, write_model_card
from .checkpoints import SafeTrainer
from .data import attach_transforms, collate, load_image_dataset
from .device_resize import transforms_for_run
from .callbacks import EarlyStopping, FreezeCallback
from .freezing import FreezePlan
from .hub import share
from .metrics import compute_metrics, test_report
from .models import check_model_available, data_config, load_model, save_model
from .optimization import build_optimizer, describe_optimizer, describe_schedule
from .output_dir import RUN_CONFIG, check_output_dir, claim_output_dir, holding_output_dir, publish
from .plots import plot_confusion_matrix, plot_training_curves
from .recipe import Recipe

logger = logging.getLogger(__name__)

RECIPE = "recipe.yaml"


@holding_output_dir
def run(recipe: Recipe) -> dict:
    """Train, evaluate on the test split and write a complete model repo; returns all results."""
    run_config = recipe.to_dict()
    args = copy.copy(recipe.training)  # the recipe stays as given
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    # We push once, at the end, with our card and a verification; Trainer must not push checkpoints.
    push_requested, args.push_to_hub = args.push_to_hub, False
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, run_config, recipe.run)
    check_model_available(recipe.model)  # before the dataset is read, which can take minutes
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
    optimizer = build_optimizer(args, model, plan.parameter_groups(args.weight_decay))
    callbacks = [FreezeCallback(plan)]
    if recipe.run.early_stopping_patience:
        callbacks.append(EarlyStopping(plan, recipe.run.early_stopping_patience, recipe.run.early_stopping_threshold))
    trainer = SafeTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=collate,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        optimizers=(optimizer, None),
        callbacks=callbacks,
        test_dataset=splits["test"] if recipe.run.eval_test_each_epoch else None,
    )

    resume = True if recipe.run.resume else None
    # With a fully frozen backbone the head trains on features computed once; None otherwise.
    cache = CachedHeadTraining.for_run(recipe, plan, trainer, data, (train_transform, eval_transform))
    if args.should_save:  # the run is certain to start: only now may --overwrite clear the folder
        claim_output_dir(output_dir, run_config, recipe.run.overwrite)
    if cache is None:
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
        eval_metrics = trainer.evaluate()
        test_output = trainer.predict(splits["test"], metric_key_prefix="test")
    else:
        train_metrics, eval_metrics, test_output = cache.run(splits["test"], resume)
        trainer = cache.trainer_that_finished  # whose optimizer, schedule and state the results describe
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
        "optimizer": describe_optimizer(trainer.optimizer),
        "lr_scheduler": describe_schedule(args, trainer.lr_scheduler, trainer.state.max_steps),
        "early_stopping": callbacks[-1].summary() if isinstance(callbacks[-1], EarlyStopping) else None,
        "published_weights": published_weights(trainer),
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
        (staging / RECIPE).write_text(recipe.to_yaml())
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        plan.save(staging / "freeze_plan.json")
        plot_training_curves(trainer.state.log_history, staging / "training_curves.png")
        plot_confusion_matrix(report["confusion_matrix"], data.labels, staging / "confusion_matrix.png")
        write_model_card(staging, final_dir=output_dir)  # staged too: published with the model, before config.json
        publish(staging, output_dir)
        _print_next_steps(output_dir, results)
        if push_requested:
            share(output_dir, args.hub_model_id, private=bool(args.hub_private_repo), revision=args.hub_revision)
    trainer.accelerator.wait_for_everyone()
    return results


def published_weights(trainer) -> dict:
    """Which weights the model repo holds, as the trainer left them: the best checkpoint it reloaded, or the last step's."""
    if trainer.reloaded_best:
        return {"kind": "best", "checkpoint": Path(trainer.reloaded_best).name, "step": trainer.state.best_global_step,
                "metric": trainer.args.metric_for_best_model, "value": trainer.state.best_metric}
    return {"kind": "last", "step": trainer.state.global_step, "epoch": trainer.state.epoch}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


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
