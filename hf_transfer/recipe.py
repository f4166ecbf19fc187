"""Recipes: a YAML file whose keys are fields of the argument dataclasses, overridable as `--key value`.

    dataset: uoft-cs/cifar10          # DataArguments
    model: timm/resnet50.a1_in1k      # ModelArguments
    freeze: head_only                 # FreezeArguments (or a `freeze:` mapping, see below)
    num_train_epochs: 3               # any transformers.TrainingArguments field
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .data import DataArguments
from .errors import HFTransferError
from .freezing import FreezeArguments
from .models import ModelArguments


@dataclass
class RunArguments:
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir (after a crash or kill)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an output_dir that holds a different run."})
    feature_cache: bool = field(default=True, metadata={"help": "With a frozen backbone (head_only, batchnorm frozen): compute its features once, cache them, train the head on them."})
    feature_cache_views: int = field(default=0, metadata={"help": "Feature cache train views: 0 = un-augmented; K = K fixed augmented views per image, epoch e uses view e mod K."})


ARGUMENT_CLASSES = (DataArguments, ModelArguments, FreezeArguments, RunArguments, TrainingArguments)

# Defaults that suit image classification better than Trainer's generic ones; a recipe overrides any.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/run",
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "accuracy",
    "save_total_limit": 2,
    "remove_unused_columns": False,  # the transform needs the raw image column
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-3,
    "num_train_epochs": 3,
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    "report_to": "none",
    # Trainer's filter reads every step's loss on the host (a GPU sync per step); SafeTrainer stops on a NaN/inf loss instead.
    "logging_nan_inf_filter": False,
}


@dataclass
class Recipe:
    data: DataArguments
    model: ModelArguments
    freeze: FreezeArguments
    run: RunArguments
    training: TrainingArguments

    def to_dict(self) -> dict:
        """The resolved recipe by section; TrainingArguments only where they differ from default; no tokens."""
        resolved = {name: dataclasses.asdict(getattr(self, name)) for name in ("data", "model", "freeze", "run")}
        resolved["freeze"]["preset"] = self.freeze.preset
        resolved["training"] = {}
        for f in dataclasses.fields(TrainingArguments):
            value = getattr(self.training, f.name, None)
            # Compared with the declared defaults: building a TrainingArguments would reset accelerate's state.
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            plain = isinstance(value, (str, int, float, bool, list, type(None)))  # not the objects post-init derives
            if "token" not in f.name and f.init and plain and value != default:
                resolved["training"][f.name] = value
        return resolved


class RecipeError(HFTransferError, ValueError):
    """A recipe or command-line option that cannot be used; the message says what to write instead."""


def parser() -> HfArgumentParser:
    # No abbreviations: a misspelt `--num_train_epoch` must be reported, not silently completed.
    # exit_on_error=False: a wrong value becomes a RecipeError, not argparse's usage dump of every option.
    return HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False, exit_on_error=False)


def known_keys() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def _suggest(key: str) -> str:
    match = difflib.get_close_matches(key, known_keys(), n=1)
    return f" Did you mean `{match[0]}`?" if match else ""


def _flatten_freeze(values: dict) -> dict:
    """Accept the grouped form `freeze: {strategy, stages, batchnorm, layer_decay, patterns: {train, freeze}}`."""
    freeze = values.get("freeze")
    if not isinstance(freeze, dict):
        return values
    values = {**values, "freeze": freeze.get("strategy", "head_only")}
    for key in ("stages", "batchnorm", "layer_decay"):
        if key in freeze:
            values[key] = freeze[key]
    patterns = freeze.get("patterns") or {}
    values.update({f"{kind}_patterns": patterns[kind] for kind in ("train", "freeze") if kind in patterns})
    unknown = set(freeze) - {"strategy", "stages", "batchnorm", "layer_decay", "patterns"}
    if unknown:
        raise RecipeError(f"Unknown key(s) {sorted(unknown)} under `freeze:`; use strategy, stages, batchnorm, layer_decay, patterns.")
    return values


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe '{path}' not found. Pass a YAML file, e.g. recipes/quickstart.yaml.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe '{path}' must be a mapping of `key: value` lines.")
    values = _flatten_freeze(values)
    for key in values:
        if key not in known_keys():
            raise RecipeError(f"Unknown recipe key `{key}` in {path}.{_suggest(key)}")
    return values


def device_defaults(device_type: str, cpu_count: int | None, processes: int = 1) -> dict:
    """Defaults that depend on where training runs; a recipe or the command line overrides them.

    On CUDA, Trainer's `dataloader_num_workers: 0` decodes and resizes every batch in the training loop while
    the GPU waits (the loader was the bottleneck for Lite0 on an H100); on a CPU, workers only take its cores.
    The `processes` of one machine (`accelerate launch`) share its cores. Trainer copies each batch to the GPU
    with a blocking copy, which first waits for all the work queued so far (a sync per step); from pinned
    memory (Trainer's default) it can queue behind that work instead: `non_blocking`.
    """
    if device_type != "cuda":
        return {}
    return {"dataloader_num_workers": max(1, min(8, (cpu_count or 1) // processes)), "accelerator_config": {"non_blocking": True}}


def parse_recipe(argv: list[str] | None = None, **overrides) -> Recipe:
    """`[recipe.yaml] [--key value ...]` -> Recipe. Keyword overrides win over both."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: the fastest convolution algorithms are found once
    return parse_recipe_for("cuda" if cuda else "cpu", argv, **overrides)


def parse_recipe_for(device_type: str, argv: list[str] | None = None, **overrides) -> Recipe:
    """`parse_recipe` with the defaults of training on `device_type` ("cuda" or "cpu")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values = {**TRAINING_DEFAULTS, **device_defaults(device_type, os.cpu_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))}
    if argv and not argv[0].startswith("-"):
        values.update(load_yaml(argv.pop(0)))
    for key in overrides:
        if key not in known_keys():
            raise RecipeError(f"Unknown option `{key}`.{_suggest(key)}")
    values.update(_flatten_freeze(overrides))
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        # `accelerate launch --multi_gpu` with no GPU: run the processes on CPU with gloo instead of one each.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    arg_parser = parser()
    _check_single_values(arg_parser, values)
    arg_parser.set_defaults(**{k: _as_default(v) for k, v in values.items()})
    parsed, remaining = _parse(arg_parser, argv)
    if remaining:
        flag = remaining[0].lstrip("-").split("=")[0]
        raise RecipeError(f"Unknown option `{remaining[0]}`.{_suggest(flag)}")
    data, model, freeze, run, training = parsed
    if not data.dataset:
        raise RecipeError("No dataset given: set `dataset:` in the recipe or pass `--dataset <hub id or folder>`.")
    if training.push_to_hub and (training.hub_model_id or "").count("/") != 1:
        raise RecipeError("`push_to_hub: true` needs `hub_model_id: <user>/<name>`, the model repo to push to.")
    return Recipe(data, model, freeze, run, training)


def _as_default(value):
    # argparse type-converts string defaults only; lists (stages, patterns) pass through as they are.
    return value if isinstance(value, (list, dict, str)) or value is None else str(value)


def _check_single_values(arg_parser, values: dict) -> None:
    # argparse converts strings only: a YAML list or mapping for a number, bool or choice would pass unchecked.
    for key, value in values.items():
        action = arg_parser._option_string_actions.get(f"--{key}")
        if isinstance(value, (list, dict)) and action is not None and action.type is not str:
            raise RecipeError(f"`{key}: {value}` has the wrong type: `{key}` takes a single value, e.g. `{key}: {action.default}`.")


def _parse(arg_parser, argv):
    try:
        *parsed, remaining = arg_parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except argparse.ArgumentError as error:
        name = (error.argument_name or "").split("/")[0].lstrip("-")
        raise RecipeError(f"Option `{name}`: {error.message.rstrip('.')}. Fix it in the recipe or on the command line.") from None
    except (ValueError, TypeError) as error:
        raise RecipeError(str(error)) from None
    return parsed, remaining
