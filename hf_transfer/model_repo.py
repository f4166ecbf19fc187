"""The model repo a run writes: the weights and image processor, `all_results.json` (what ran, read back from the objects
that ran it), the reports, plots and model card, assembled in a staging folder and published with `config.json` last.

A kill while saving never leaves a folder that loads half a model (`output_dir.publish`).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .callbacks import EarlyStopping
from .card import describe_hardware, write_model_card
from .explain import ExplainError, choose_examples, save_explanation_figure
from .figures import draw, file_digests, image_content
from .images import load_image
from .metrics import test_report
from .models import save_model
from .optimization import describe_optimizer
from .output_dir import publish
from .plots import curve_marks, has_curves, plot_confusion_matrix, plot_training_curves
from .progressive_resizing import ProgressiveResize, describe_sizes
from .recipe import recipe_yaml
from .repo_files import (
    ALL_RESULTS,
    CONFUSION_PNG,
    CURVES_PNG,
    EXPLANATIONS_PNG,
    FREEZE_PLAN,
    MODEL_FILES,
    RECIPE,
    RUN_CONFIG,
    STAGING,
    TEST_REPORT,
    TRAINER_STATE,
    shareable_path,
    write_json,
)
from .schedules import describe_schedule
from .selection_report import carry_selection
from .training_passes import describe_training_passes

logger = logging.getLogger(__name__)


def write_model_repo(prepared, checked, fitted) -> dict:
    """All results, and (main process) the model repo: weights, reports, plots and card, staged then published."""
    trainer, data, test_output, args = fitted.trainer, checked.data, fitted.test_output, prepared.args
    for split, metrics in (("train", fitted.train_metrics), ("eval", fitted.eval_metrics), ("test", test_output.metrics)):
        trainer.log_metrics(split, metrics)
    results = run_results(prepared, checked, fitted)
    output_dir = Path(args.output_dir)
    if args.should_save:  # the main process; with node-local output folders, each machine's
        staging = output_dir / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        # Not trainer.save_model: timm backbones are saved in timm's own layout, so that timm.create_model loads them too.
        save_model(prepared.model, prepared.image_processor, staging)
        report = test_report(np.argmax(test_output.predictions, axis=-1), test_output.label_ids, data.labels)
        write_json(staging / ALL_RESULTS, results)
        write_json(staging / TEST_REPORT, report)
        write_json(staging / RUN_CONFIG, prepared.config)
        (staging / RECIPE).write_text(recipe_yaml(prepared.config))
        carry_selection(prepared.recipe, staging)  # trained from recipe.selected.yaml: the card's "Why this backbone"
        published_state(trainer.state, output_dir).save_to_json(str(staging / TRAINER_STATE))
        prepared.plan.save(staging / FREEZE_PLAN)
        # The figures: each kept from the model repo it replaces when it would show the same (an identical rerun).
        if checked.check:
            checked.check.write(staging, previous=output_dir)
        marks = curve_marks({"history": prepared.plan.history}, results["early_stopping"])  # stage switches, the early stop
        if has_curves(trainer.state.log_history):
            plot_training_curves(trainer.state.log_history, staging / CURVES_PNG, marks, previous=output_dir / CURVES_PNG)
        else:
            logger.info("No training curves: the run logged no loss and no evaluation (`logging_strategy` and `eval_strategy` are `no`).")
        plot_confusion_matrix(report["confusion_matrix"], data.labels, staging / CONFUSION_PNG, previous=output_dir / CONFUSION_PNG)
        draw_explanations(staging, data.splits["test"][data.image_column], test_output.label_ids,
                          np.argmax(test_output.predictions, axis=-1), previous=output_dir / EXPLANATIONS_PNG)
        write_model_card(staging, final_dir=output_dir)  # staged too: published with the model, before config.json
        publish(staging, output_dir)
    if trainer.is_world_process_zero():
        _print_next_steps(output_dir, results, copies=args.save_on_each_node)
    trainer.accelerator.wait_for_everyone()
    return results


def draw_explanations(model_dir: Path, images, labels, predictions, previous: Path | None = None) -> None:
    """The Grad-CAM figure of the model in `model_dir` on test images (true `labels`, `predictions`), into that folder;
    kept from `previous` when it shows the same model files, images, labels and predictions (`figures.draw`)."""
    shown = [[(image_content(images[index]), int(labels[index]), int(predictions[index])) for index in group]
             for group in choose_examples(labels, predictions)]
    inputs = {"model": file_digests(model_dir, MODEL_FILES), "correct and misclassified": shown}
    try:
        draw(model_dir / EXPLANATIONS_PNG, "explanations", inputs, lambda file, metadata: save_explanation_figure(
            model_dir, images, labels, predictions, file, load_image=load_image, metadata=metadata), previous)
    except ExplainError as error:  # a backbone with no feature map or patch tokens: the card goes without the figure
        logger.warning("No class-activation figure: %s", error)


def run_results(prepared, checked, fitted) -> dict:
    """`all_results.json`: the metrics, and how the run went, read from the objects that ran it."""
    trainer, data, recipe = fitted.trainer, checked.data, prepared.recipe
    early_stopping, resizing = _callback(trainer, EarlyStopping), _callback(trainer, ProgressiveResize)
    return {
        **fitted.train_metrics, **fitted.eval_metrics, **fitted.test_output.metrics,
        # Whether the data came from the Hub, decided where its path was read: the card links a Hub id, names a folder.
        "dataset": {"name": shareable_path(recipe.data.dataset), "on_hub": not Path(recipe.data.dataset).expanduser().exists()},
        "split_sizes": data.sizes,
        "hardware": describe_hardware(),
        "skipped_images": {name: len(entries) for name, entries in data.skipped.items()},
        "skipped_image_examples": {name: entries[:20] for name, entries in data.skipped.items()},
        "resized_on_device": prepared.device_step is not None,  # what `resize_on_device: auto` decided
        "inference_precision": prepared.precision.as_dict(),  # what `inference_precision: auto` decided
        "training_passes": describe_training_passes(trainer),  # precision, processes, machines and batches, as they ran
        "optimizer": describe_optimizer(trainer.optimizer),
        "lr_scheduler": describe_schedule(prepared.args, trainer.lr_scheduler, trainer.state.max_steps),
        "early_stopping": early_stopping.summary() if early_stopping else None,
        # the size each epoch's training batches had, as the model saw them (`image_size_schedule`)
        "image_sizes_trained": describe_sizes(resizing.trained) if resizing else None,
        "published_weights": published_weights(trainer),
        **({"feature_cache": fitted.feature_cache} if fitted.feature_cache else {}),
        **({"data_doctor": checked.check.results()} if checked.check else {}),
        **prepared.source.report(trainer),
    }


def _callback(trainer, kind: type):
    return next((callback for callback in trainer.callback_handler.callbacks if isinstance(callback, kind)), None)


def published_weights(trainer) -> dict:
    """Which weights the model repo holds, as the trainer left them: the best checkpoint it reloaded, or the last step's."""
    if trainer.reloaded_best:
        return {"kind": "best", "checkpoint": Path(trainer.reloaded_best).name, "step": trainer.state.best_global_step,
                "metric": trainer.args.metric_for_best_model, "value": trainer.state.best_metric}
    return {"kind": "last", "step": trainer.state.global_step, "epoch": trainer.state.epoch}


def published_state(state, output_dir: Path):
    """Trainer's state as the model repo publishes it: the best checkpoint named relative to the output folder (Trainer
    records the path it saved to, and reloads the best model from there: its own copies in the checkpoints keep it)."""
    state = copy.copy(state)
    if state.best_model_checkpoint:
        state.best_model_checkpoint = Path(os.path.relpath(state.best_model_checkpoint, output_dir)).as_posix()
    return state


def _print_next_steps(output_dir: Path, results: dict, copies: bool = False) -> None:
    where = " on every machine (node-local disks)" if copies else ""
    print(f"\nTest accuracy {results['test_accuracy']:.2%}, macro-F1 {results['test_f1']:.4f} on {results['split_sizes']['test']} images.\n"
          f"Model saved to {output_dir}/{where} (model card: {output_dir}/README.md). Use it with:\n"
          f"  from transformers import pipeline\n"
          f"  classifier = pipeline('image-classification', model='{output_dir}')\n"
          f"  classifier('cat.jpg')\n"
          f"Share it:   hf-transfer push {output_dir} --repo-id <user>/<name>\n"
          f"Try it:     hf-transfer demo {output_dir}\n"
          f"Deploy it:  hf-transfer export {output_dir} --int8   then   hf-transfer predict {output_dir} <images>\n")
