"""The whole flow, one call per stage: build (data, model, plan, trainer) -> fit -> write the model repo.

The final model is assembled in a staging folder and moved into `output_dir` with
`config.json` last, so a kill while saving never leaves a folder that loads half a model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import PredictionOutput

from . import streaming
from .cached_head import CachedHeadTraining
from .callbacks import EarlyStopping, FreezeCallback
from .card import describe_hardware, write_model_card
from .data import PreparedData, attach_transforms, collate, load_image_dataset
from .device_resize import DeviceResize, transforms_for_run
from .doctor import DataCheck, check_run_data
from .explain import ExplainError, save_explanation_figure
from .freezing import FreezePlan
from .images import load_image
from .metrics import compute_metrics, test_report
from .models import check_image_size, check_model_available, data_config, load_model, save_model
from .nodes import output_is_node_local, placement, raise_together
from .optimization import build_optimizer, describe_optimizer
from .output_dir import check_output_dir, claim_output_dir, holding_output_dir, publish
from .plots import curve_marks, plot_confusion_matrix, plot_training_curves
from .precision import FrozenPasses, Precision, classifier_of, resolve
from .recipe import Recipe
from .repo_files import (
    ALL_RESULTS,
    CONFUSION_PNG,
    CURVES_PNG,
    EXPLANATIONS_PNG,
    FREEZE_PLAN,
    RECIPE,
    RUN_CONFIG,
    STAGING,
    TEST_REPORT,
    TRAINER_STATE,
    shareable_path,
)
from .schedules import describe_schedule
from .trainer import SafeTrainer
from .training_passes import describe_training_passes

logger = logging.getLogger(__name__)


@dataclass
class Built:
    """What `build` makes from a recipe: everything `fit` trains and `write_model_repo` saves."""

    recipe: Recipe
    args: TrainingArguments  # the recipe's, as the run uses them (Trainer never pushes; pinned memory only on CUDA)
    data: PreparedData
    model: torch.nn.Module
    image_processor: object
    splits: dict
    plan: FreezePlan
    trainer: SafeTrainer
    callbacks: list
    cache: CachedHeadTraining | None  # the head trains on cached features when the backbone is frozen
    device_step: DeviceResize | None  # resizes small images of one size on the device
    device_hook: object | None  # the forward pre-hook that runs `device_step`; removed before saving
    precision: Precision  # what `inference_precision` decided for passes without gradients
    data_check: DataCheck | None = None  # the data doctor's report, and what `exclude_flagged` removed

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


@dataclass
class Fitted:
    """What training and testing produced."""

    trainer: SafeTrainer  # the one whose optimizer, schedule and state the results describe
    train_metrics: dict
    eval_metrics: dict
    test_output: PredictionOutput


@holding_output_dir
def run(recipe: Recipe) -> dict:
    """Train, evaluate on the test split and write a complete model repo; returns all results."""
    built = build(recipe)
    fitted = fit(built)
    return write_model_repo(built, fitted)


def build(recipe: Recipe, claim: bool = True) -> Built:
    """Data, model, transforms, freeze plan, optimizer and trainer, checked before anything is written.

    With `claim`, the output folder is then claimed for the run (`--overwrite` clears it only now)."""
    args = run_arguments(recipe)
    raise_together(check_output_dir, Path(args.output_dir), recipe.to_dict(local_paths=True), recipe.run)  # each machine's copy checked
    check_model_available(recipe.model)  # before the dataset is read, which can take minutes
    raise_together(check_image_size, recipe, args.device)  # each machine's free memory
    set_seed(args.seed)

    # Each machine's main process first prepares (and checks the images of) its own datasets cache; one shared by
    # every machine is prepared once, by the main process, while the others wait.
    local_cache = placement(Path(datasets.config.HF_DATASETS_CACHE)).copies != 1
    with args.main_process_first(local=local_cache, desc="dataset preparation"):
        data = streaming.load_streaming_dataset(recipe.data) if recipe.data.streaming else load_image_dataset(recipe.data, seed=args.seed)
    model, image_processor = load_model(recipe.model, data.labels)
    train_transform, eval_transform, device_step = transforms_for_run(
        recipe.data, data, data_config(model, image_processor), args.device
    )
    transforms = (train_transform, eval_transform)
    # Small images of one size reach the model as uint8 at their own size; this hook resizes them on the device.
    device_hook = device_step.attach(model) if device_step else None
    plan = FreezePlan(model, recipe.freezing, args.learning_rate)
    streaming.check_feature_cache(recipe, plan)
    # Passes without gradients (extraction, evaluation, test) in bf16 + channels_last where the hardware has bf16.
    precision = resolve(recipe.run.inference_precision, args.device, model, fp16=args.fp16)
    splits, trainer, cache = _train_on(recipe, args, data, model, image_processor, transforms, plan, precision)
    # The data doctor on the cached features (or on features of its own when `exclude_flagged` asks for exclusions).
    data_check = check_run_data(recipe, data, cache.store if cache else None, model, transforms, args)
    if data_check and data_check.excluded:  # train on what is left, read from the same cache entries
        data = data_check.kept_data()
        if cache:
            cache.store.keep(data_check.kept_rows())
        splits, trainer, cache = _train_on(recipe, args, data, model, image_processor, transforms, plan, precision,
                                           cache.store if cache else None)
    FrozenPasses(model, precision, head=cache.head if cache else classifier_of(model))
    logger.info("Inference precision: %s", precision.describe())
    if claim and args.should_save:  # the run is certain to start: only now may --overwrite clear the folder
        claim_output_dir(Path(args.output_dir), recipe.to_dict(), recipe.run.overwrite)
    return Built(recipe, args, data, model, image_processor, splits, plan, trainer, trainer.callback_handler.callbacks, cache,
                 device_step, device_hook, precision, data_check)


def _train_on(recipe: Recipe, args, data, model, image_processor, transforms, plan: FreezePlan, precision: Precision, store=None):
    """The splits, trainer and (frozen backbone) feature cache of a run over `data`; the cache reads `store` when given."""
    splits = attach_transforms(data, *transforms)
    if recipe.data.streaming:  # this rank's share of the train stream; validation and test are in memory
        splits = {**splits, "train": data.train_stream(transforms[0], args.process_index, args.world_size,
                                                    not recipe.training.ignore_data_skip)}  # the user's, not run_arguments' own
    trainer = build_trainer(recipe, args, model, image_processor, splits, plan)
    # With a fully frozen backbone the head trains on features computed once; None otherwise.
    cache = CachedHeadTraining.for_run(recipe, plan, trainer, data, transforms, precision, store=store)
    return splits, trainer, cache


def run_arguments(recipe: Recipe) -> TrainingArguments:
    """The recipe's TrainingArguments as a run uses them; a copy, so the recipe stays as given.

    `save_on_each_node` is set when the run's machines each have their own output folder (node-local disk), so each
    machine's main process writes its copy of every checkpoint and of the model repo."""
    args = copy.copy(recipe.training)
    args.save_on_each_node = output_is_node_local(Path(args.output_dir), args.save_on_each_node)
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    args.push_to_hub = False  # pushed once, after the run, with our card and a verification (cli, finetune)
    if recipe.data.streaming:  # the stream restores its own position on resume; Trainer would re-read every batch to skip it
        args.ignore_data_skip = True
        streaming.steps_note(args)
    return args


def build_trainer(recipe: Recipe, args: TrainingArguments, model, image_processor, splits, plan: FreezePlan) -> SafeTrainer:
    """The SafeTrainer of a run: the recipe's optimizer over the plan's groups, its stages and early stopping."""
    callbacks = [FreezeCallback(plan)]
    if recipe.run.early_stopping_patience:
        callbacks.append(EarlyStopping(plan, recipe.run.early_stopping_patience, recipe.run.early_stopping_threshold))
    trainer_class = streaming.StreamingTrainer if recipe.data.streaming else SafeTrainer
    return trainer_class(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        data_collator=collate,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        optimizers=(build_optimizer(args, model, plan.parameter_groups(args.weight_decay)), None),
        callbacks=callbacks,
        test_dataset=splits.get("test") if recipe.run.eval_test_each_epoch else None,
    )


def fit(built: Built) -> Fitted:
    """Train (on images, or the head on cached features), evaluate on validation, predict the test split."""
    resume = True if built.recipe.run.resume else None
    trainer = built.trainer
    if built.cache is None:
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
        eval_metrics = trainer.evaluate()
        test_output = trainer.predict(built.splits["test"], metric_key_prefix="test")
    else:
        train_metrics, eval_metrics, test_output = built.cache.run(built.splits["test"], resume)
        trainer = built.cache.trainer_that_finished
    for split, metrics in (("train", train_metrics), ("eval", eval_metrics), ("test", test_output.metrics)):
        trainer.log_metrics(split, metrics)
    if built.device_hook:
        built.device_hook.remove()  # the saved model takes images preprocessed as usual (pipeline, timm)
    return Fitted(trainer, train_metrics, eval_metrics, test_output)


def write_model_repo(built: Built, fitted: Fitted) -> dict:
    """All results, and (main process) the model repo: weights, reports, plots and card, staged then published."""
    trainer, data, test_output = fitted.trainer, built.data, fitted.test_output
    early_stopping = next((callback for callback in built.callbacks if isinstance(callback, EarlyStopping)), None)
    results = {
        **fitted.train_metrics, **fitted.eval_metrics, **test_output.metrics,
        # Whether the data came from the Hub, decided where its path was read: the card links a Hub id, names a folder.
        "dataset": {"name": shareable_path(built.recipe.data.dataset),
                    "on_hub": not Path(built.recipe.data.dataset).expanduser().exists()},
        "split_sizes": data.sizes,
        "hardware": describe_hardware(),
        "skipped_images": {name: len(entries) for name, entries in data.skipped.items()},
        "skipped_image_examples": {name: entries[:20] for name, entries in data.skipped.items()},
        "resized_on_device": built.device_step is not None,  # what `resize_on_device: auto` decided
        "inference_precision": built.precision.as_dict(),  # what `inference_precision: auto` decided
        "training_passes": describe_training_passes(trainer),  # precision, processes, machines and batches, as they ran
        "optimizer": describe_optimizer(trainer.optimizer),
        "lr_scheduler": describe_schedule(built.args, trainer.lr_scheduler, trainer.state.max_steps),
        "early_stopping": early_stopping.summary() if early_stopping else None,
        "published_weights": published_weights(trainer),
        **({"feature_cache": built.cache.summary} if built.cache else {}),
        **({"data_doctor": built.data_check.results()} if built.data_check else {}),
        **({"streaming": trainer.stream_summary} if getattr(trainer, "stream_summary", None) else {}),
    }
    if built.args.should_save:  # the main process; with node-local output folders, each machine's
        output_dir = built.output_dir
        staging = output_dir / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        # Not trainer.save_model: it also pickles the TrainingArguments, and we write only safetensors.
        save_model(built.model, built.image_processor, staging)
        report = test_report(np.argmax(test_output.predictions, axis=-1), test_output.label_ids, data.labels)
        _write_json(staging / ALL_RESULTS, results)
        _write_json(staging / TEST_REPORT, report)
        _write_json(staging / RUN_CONFIG, built.recipe.to_dict())
        (staging / RECIPE).write_text(built.recipe.to_yaml())
        published_state(trainer.state, output_dir).save_to_json(str(staging / TRAINER_STATE))
        built.plan.save(staging / FREEZE_PLAN)
        if built.data_check:
            built.data_check.write(staging)
        marks = curve_marks({"history": built.plan.history}, results["early_stopping"])  # stage switches, the early stop
        plot_training_curves(trainer.state.log_history, staging / CURVES_PNG, marks)
        plot_confusion_matrix(report["confusion_matrix"], data.labels, staging / CONFUSION_PNG)
        try:
            save_explanation_figure(staging, data.splits["test"][data.image_column], test_output.label_ids,
                                    np.argmax(test_output.predictions, axis=-1), staging / EXPLANATIONS_PNG, load_image=load_image)
        except ExplainError as error:  # a backbone with no feature map or patch tokens: the card goes without the figure
            logger.warning("No class-activation figure: %s", error)
        write_model_card(staging, final_dir=output_dir)  # staged too: published with the model, before config.json
        publish(staging, output_dir)
    if trainer.is_world_process_zero():
        _print_next_steps(built.output_dir, results, copies=built.args.save_on_each_node)
    trainer.accelerator.wait_for_everyone()
    return results


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


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


def _print_next_steps(output_dir: Path, results: dict, copies: bool = False) -> None:
    where = " on every machine (node-local disks)" if copies else ""
    print(
        f"\nTest accuracy {results['test_accuracy']:.2%}, macro-F1 {results['test_f1']:.4f} "
        f"on {results['split_sizes']['test']} images.\n"
        f"Model saved to {output_dir}/{where} (model card: {output_dir}/README.md). Use it with:\n"
        f"  from transformers import pipeline\n"
        f"  classifier = pipeline('image-classification', model='{output_dir}')\n"
        f"  classifier('cat.jpg')\n"
        f"Share it:   hf-transfer push {output_dir} --repo-id <user>/<name>\n"
        f"Try it:     hf-transfer demo {output_dir}\n"
    )
