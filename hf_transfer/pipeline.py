"""The flow of a training run, one call per stage: prepare -> check_data -> choose -> fit -> write_model_repo.

    args = run_arguments(recipe, source)    # the run's TrainingArguments; where the output folder lives, probed once
    with holding_output_dir(args, ...):     # the folder's lock; one line for a full disk or Ctrl-C
        prepared = prepare(recipe, args)    # data source and data, model, transforms, freeze plan, precision, feature store
        with model_hooks(prepared):         # resize on the device; frozen passes in the precision `auto` chose
            checked = check_data(prepared)  # the data doctor, before any Trainer exists: the data minus what it excludes
            strategy = choose(...)          # the whole model on images | the head on cached features | head, then images
            fitted = strategy.fit(...)      # train, evaluate on validation, predict the test split
        results = write_model_repo(...)     # the model repo: weights, card, reports, plots (model_repo.py)

Pushing to the Hub happens after the run (hub.py), with a verification of the pushed copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from transformers import TrainingArguments, set_seed

from .blocks import find_head
from .callbacks import EarlyStopping, FreezeCallback
from .data import PreparedData, collate
from .data.device_resize import DeviceResize, transforms_for_run
from .data.source import MapSource, source_for
from .data_check import DataCheck, check_run_data, data_report, features_of, report_folder, summary_text, write_report
from .feature_store import FeatureStore
from .freezing import FreezePlan
from .memory_check import check_image_size
from .metrics import compute_metrics
from .model_repo import write_model_repo
from .models import check_model_available, data_config, load_model
from .nodes import output_is_node_local, placement, raise_together
from .optimization import build_optimizer
from .output_dir import check_output_dir, claim_output_dir, holding_output_dir
from .precision import FrozenPasses, Precision, resolve
from .progressive_resizing import ProgressiveResize, check_schedule
from .recipe import Recipe
from .strategies import cache_refusal, choose, tests_on_cache
from .trainer import SafeTrainer

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What a run trains, checked before anything is written: its data, model, preprocessing and plan."""

    recipe: Recipe
    config: dict  # the recipe resolved as the model repo publishes it (`Recipe.to_dict`), serialised once
    args: TrainingArguments  # the recipe's, as the run uses them (see `run_arguments`)
    source: MapSource  # where the data comes from: a dataset in hand or a stream
    data: PreparedData
    model: torch.nn.Module
    image_processor: object
    transforms: tuple  # (train, eval) CPU transforms
    device_step: DeviceResize | None  # resizes small images of one size on the training device, else None
    plan: FreezePlan
    precision: Precision  # what `inference_precision` decided for passes without gradients
    head: tuple[str, torch.nn.Module] | None  # the classifier module and its name (`blocks.find_head`)
    store: FeatureStore | None  # the backbone's features of each split, for the cached head and the data doctor
    cache_refusal: str | None  # why the head cannot train on cached features; None: it can (`strategies.cache_refusal`)


@dataclass
class Checked:
    """The data the run trains on: the prepared data, minus what the data doctor was asked to exclude."""

    data: PreparedData
    check: DataCheck | None  # the doctor's report, when it ran


def run(recipe: Recipe, callbacks: tuple = ()) -> dict:
    """Train, evaluate on the test split and write a complete model repo; returns all results. `callbacks`: more
    Trainer callbacks (the benchmarks' clocks)."""
    source = source_for(recipe)
    args = run_arguments(recipe, source)
    run_config = recipe.to_dict(local_paths=True)
    with holding_output_dir(args, run_config, recipe.run.overwrite):
        raise_together(check_output_dir, Path(args.output_dir), run_config, recipe.run)  # every machine's copy
        prepared = prepare(recipe, args, source)
        with model_hooks(prepared):
            checked = check_data(prepared)
            splits = source.splits(checked.data, prepared.transforms, args)
            trainer = build_trainer(recipe, args, prepared.model, prepared.image_processor, prepared.plan, splits,
                                    source.trainer_class, callbacks)
            strategy = choose(recipe, prepared, trainer, splits["test"])
            if args.should_save:  # the run is certain to start: only now may --overwrite clear the folder
                claim_output_dir(Path(args.output_dir), prepared.config, recipe.run.overwrite)
            fitted = strategy.fit(recipe.run.resume)
        return write_model_repo(prepared, checked, fitted)


def run_arguments(recipe: Recipe, source: MapSource | None = None) -> TrainingArguments:
    """The recipe's TrainingArguments as a run uses them (and as its data `source` needs them); a copy, so the recipe
    stays as given.

    `save_on_each_node` is set when the run's machines each have their own output folder (node-local disk), so each
    machine's main process writes its copy of every checkpoint and of the model repo."""
    args = copy.copy(recipe.training)
    args.save_on_each_node = output_is_node_local(Path(args.output_dir), args.save_on_each_node)  # every process asks
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    args.push_to_hub = False  # pushed once, after the run, with our card and a verification (cli, finetune)
    (source or source_for(recipe)).adjust_arguments(args)
    return args


def prepare(recipe: Recipe, args: TrainingArguments, source: MapSource | None = None, data: PreparedData | None = None) -> Prepared:
    """Data, model, transforms, freeze plan, precision and feature store, each checked before the next is loaded; `data`:
    data already in hand, instead of the recipe's source's."""
    check_model_available(recipe.model)  # before the dataset is read, which can take minutes
    raise_together(check_image_size, recipe, args.device)  # each machine's free memory
    set_seed(args.seed)
    source = source or source_for(recipe)
    # Each machine's main process first prepares (and checks the images of) its own datasets cache; one shared by
    # every machine is prepared once, by the main process, while the others wait.
    local_cache = placement(Path(datasets.config.HF_DATASETS_CACHE)).copies != 1
    if data is None:
        with args.main_process_first(local=local_cache, desc="dataset preparation"):
            data = source.load(args.seed)
    model, image_processor = load_model(recipe.model, data.labels)
    model.to(args.device)  # the data doctor's features are extracted before Trainer places the model
    config = data_config(model, image_processor)
    train_transform, eval_transform, device_step = transforms_for_run(recipe.data, data, config, args.device)
    if recipe.model.image_size_schedule:
        check_schedule(model, recipe.model.image_size_schedule, config["input_size"][1:])
    plan = FreezePlan(model, recipe.freezing, args.learning_rate)
    source.check_plan(plan)
    # Passes without gradients (extraction, evaluation, test) in bf16 + channels_last where the hardware has bf16.
    precision = resolve(recipe.run.inference_precision, args.device, model, fp16=args.fp16)
    head = find_head(model)
    cached = cache_refusal(recipe, plan, head)
    store = None  # for the cached head, and for the data doctor when it is asked to exclude images
    if head is not None and source.in_hand and (recipe.doctor.exclude_flagged or cached is None):
        store = FeatureStore(model, head[1], head[0], recipe.model, data, (train_transform, eval_transform), args,
                             recipe.run.feature_cache_views, precision=precision)
    return Prepared(recipe, recipe.to_dict(), args, source, data, model, image_processor, (train_transform, eval_transform),
                    device_step, plan, precision, head, store, cached)


@contextlib.contextmanager
def model_hooks(prepared: Prepared):
    """The hooks on the model while the run uses it: small images resized on the device, and passes without gradients
    run in the chosen precision (the classifier in float32). The freeze plan's own hooks live as long as training
    (`FreezeCallback`). All come off before the model repo is written."""
    with contextlib.ExitStack() as hooks:
        if prepared.device_step:
            hooks.enter_context(prepared.device_step.attached(prepared.model))
        hooks.enter_context(FrozenPasses(prepared.model, prepared.precision, head=prepared.head[1] if prepared.head else None))
        logger.info("Inference precision: %s", prepared.precision.describe())
        yield


def check_data(prepared: Prepared) -> Checked:
    """The data doctor on the prepared data: in a run whose head trains on cached features (`data_doctor`), and whenever
    `exclude_flagged` asks for exclusions; the data the run trains on is what stays."""
    cached = prepared.store is not None and prepared.cache_refusal is None
    if tests_on_cache(prepared):  # its test pass checks the cached test features against the full model: once, there
        prepared.store.checked_by_caller.add("test")
    check = check_run_data(prepared.recipe, prepared.data, prepared.store, cached, prepared.args)
    if check is None or not check.excluded:
        return Checked(prepared.data, check)
    prepared.store.keep(check.kept_rows())  # train on what is left, read from the whole split's cache entries
    return Checked(check.kept_data(), check)


def build_trainer(recipe: Recipe, args: TrainingArguments, model, image_processor, plan: FreezePlan, splits: dict,
                  trainer_class: type[SafeTrainer] = SafeTrainer, callbacks: tuple = ()) -> SafeTrainer:
    """The run's Trainer over `splits`: the recipe's optimizer over the plan's groups, its stages and early stopping."""
    own = [FreezeCallback(plan)]
    if recipe.model.image_size_schedule:
        own.append(ProgressiveResize(recipe.model.image_size_schedule))
    if recipe.run.early_stopping_patience:
        own.append(EarlyStopping(plan, recipe.run.early_stopping_patience, recipe.run.early_stopping_threshold))
    return trainer_class(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        data_collator=collate,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        optimizers=(build_optimizer(args, model, plan.parameter_groups(args.weight_decay)), None),
        callbacks=[*own, *callbacks],
        test_dataset=splits.get("test") if recipe.run.eval_test_each_epoch else None,
    )


def run_doctor(recipe: Recipe) -> dict:
    """`hf-transfer doctor`: the recipe's data and model prepared as a run prepares them, the data checked, the report and
    contact sheet written to `output_dir`, and a summary printed."""
    with report_folder(recipe) as folder:
        started = time.perf_counter()
        source = MapSource(recipe)
        prepared = prepare(recipe, run_arguments(recipe, source), source)
        with prepared.device_step.attached(prepared.model) if prepared.device_step else contextlib.nullcontext():
            report = data_report(recipe, prepared.data, features_of(recipe, prepared.store))
        report["timing"]["total_s"] = round(time.perf_counter() - started, 3)
        if PartialState().is_main_process:
            write_report(report, prepared.data, folder, recipe.doctor.doctor_sheet_size)
            print("\n" + summary_text(report, folder))
        return report
