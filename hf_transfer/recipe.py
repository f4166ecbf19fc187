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
import functools
import math
import os
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser

from .data import DataArguments
from .doctor_options import DoctorArguments
from .errors import HFTransferError
from .freezing import FreezeArguments
from .models import ModelArguments
from .optimization import HfTransferTrainingArguments, check_optim_args
from .precision import CHOICES as PRECISIONS
from .precision import native_bf16
from .recipe_yaml import RecipeYAMLError, read_recipe_file
from .repo_files import without_local_paths
from .streaming import check_recipe as check_streaming


@dataclass
class RunArguments:
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir (after a crash or kill)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an output_dir that holds a different run."})
    feature_cache: bool = field(default=True, metadata={"help": "With a frozen backbone (head_only, batchnorm frozen): compute its features once, cache them, train the head on them."})
    feature_cache_views: int = field(default=0, metadata={"help": "Feature cache train views: 0 = un-augmented; K = K fixed augmented views per image, epoch e uses view e mod K."})
    inference_precision: str = field(
        default="auto",
        metadata={"help": "Precision of passes without gradients (feature extraction, evaluation, test): `auto` = bf16 autocast where "
                          "the CPU or GPU computes bf16 natively, else fp32 (the decision goes into all_results.json); `fp32`; `bf16`.",
                  "choices": list(PRECISIONS)},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": (
            "Stop once `metric_for_best_model` has not improved for this many evaluations (Trainer's EarlyStoppingCallback). "
            "In a staged plan it counts in the last stage only."
        )},
    )
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "How much `metric_for_best_model` must improve to count as better."})
    eval_test_each_epoch: bool = field(
        default=False,
        metadata={"help": "Also score the test split after every evaluation (`test_*` in the log and the card's per-epoch table); "
                          "the best checkpoint is still chosen on the validation split."},
    )


ARGUMENT_CLASSES = (DataArguments, ModelArguments, FreezeArguments, RunArguments, DoctorArguments, HfTransferTrainingArguments)

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
    freezing: FreezeArguments
    run: RunArguments
    doctor: DoctorArguments
    training: HfTransferTrainingArguments

    def to_dict(self, local_paths: bool = False) -> dict:
        """The resolved recipe by section; TrainingArguments where they differ from Trainer's defaults or are ours
        (TRAINING_DEFAULTS, which a later version of hf_transfer may change); no tokens. Absolute paths (dataset, model and
        output folders) as the model repo may publish them (`repo_files.shareable_path`) unless `local_paths`: for the
        checks of where the run writes."""
        # Sections named as in run_config.json: `freeze` holds the FreezeArguments.
        resolved = {section: dataclasses.asdict(arguments) for section, arguments in (
            ("data", self.data), ("model", self.model), ("freeze", self.freezing), ("run", self.run), ("doctor", self.doctor))}
        resolved["freeze"]["preset"] = self.freezing.preset
        resolved["training"] = {}
        for f in dataclasses.fields(HfTransferTrainingArguments):
            value = getattr(self.training, f.name, None)
            value = getattr(value, "value", value)  # Trainer's str enums (`IntervalStrategy.EPOCH`) as their plain value
            # Compared with the declared defaults: building a TrainingArguments would reset accelerate's state.
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            plain = isinstance(value, (str, int, float, bool, list, dict, type(None)))  # not the objects post-init derives
            ours = f.name in TRAINING_DEFAULTS or f.name == "seed"
            if "token" not in f.name and f.init and plain and (value != default or ours):
                resolved["training"][f.name] = value
        return resolved if local_paths else without_local_paths(resolved)

    def to_yaml(self) -> str:
        """A recipe that reproduces this run: `hf-transfer train <it> --output_dir <another>`."""
        sections = self.to_dict()
        flat = {}
        for section in ("data", "model", "freeze", "run", "doctor", "training"):
            values = dict(sections[section])
            if section == "freeze":  # the preset's name, so that its derived settings (fastai's lr spread) come back
                values["freeze"] = values.pop("preset") or values["freeze"]
            if section == "run":  # what to do with the folder, not how to train
                values.pop("resume"), values.pop("overwrite")
            flat.update(values)
        header = "# The resolved recipe of this run. Reproduce it with: hf-transfer train recipe.yaml --output_dir <another folder>\n"
        return header + yaml.safe_dump(flat, sort_keys=False)


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
    patterns = freeze.get("patterns") or {}
    if not isinstance(patterns, dict):
        raise RecipeError("`freeze.patterns` must be a mapping such as `patterns: {train: ['*.blocks.5.*'], freeze: ['*stem*']}`, "
                          f"not {reprlib.repr(patterns)}.")
    # Every key must be known: a misspelt one would be dropped silently (`froze:` under patterns froze nothing).
    for where, found, keys in (("freeze", freeze, ("strategy", "stages", "batchnorm", "layer_decay", "patterns")),
                               ("freeze.patterns", patterns, ("train", "freeze"))):
        unknown = sorted(str(key) for key in set(found) - set(keys))
        if unknown:
            match = difflib.get_close_matches(unknown[0], keys, n=1)
            hint = f" Did you mean `{match[0]}`?" if match else ""
            raise RecipeError(f"Unknown key(s) {unknown} under `{where}:`.{hint} Use {', '.join(keys)}.")
    values = {**values, "freeze": freeze.get("strategy", "head_only")}
    for key in ("stages", "batchnorm", "layer_decay"):
        if key in freeze:
            values[key] = freeze[key]
    values.update({f"{kind}_patterns": patterns[kind] for kind in ("train", "freeze") if kind in patterns})
    return values


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe '{path}' not found. Pass a YAML file, e.g. recipes/quickstart.yaml.")
    try:
        values = read_recipe_file(path) or {}  # bounded, no duplicate keys: recipe_yaml.py
    except RecipeYAMLError as error:
        raise RecipeError(str(error)) from None
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe '{path}' must be a mapping of `key: value` lines.")
    values = _flatten_freeze(values)
    for key in values:
        if key not in known_keys():
            raise RecipeError(f"Unknown recipe key `{key}` in {path}.{_suggest(str(key))}")
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
        from_file = load_yaml(argv.pop(0))
        if _given("freeze", argv, overrides):  # a new strategy on the command line replaces the recipe's whole freeze section
            from_file = {key: value for key, value in from_file.items() if key not in FREEZE_SECTION}
        values.update(from_file)
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
    data, model, freezing, run, doctor, training = parsed
    if not data.dataset:
        raise RecipeError("No dataset given: set `dataset:` in the recipe or pass `--dataset <hub id or folder>`.")
    if training.push_to_hub and (training.hub_model_id or "").count("/") != 1:
        raise RecipeError("`push_to_hub: true` needs `hub_model_id: <user>/<name>`, the model repo to push to.")
    _check_evaluation_needs(freezing, run, training)
    _check_combinations(run, training)
    _check_training_precision(device_type, training)
    check_optim_args(training)
    check_streaming(data, freezing, run, doctor, training)
    return Recipe(data, model, freezing, run, doctor, training)


def _check_evaluation_needs(freezing: FreezeArguments, run: RunArguments, training) -> None:
    """Options that act on evaluations need evaluations, and a metric to watch."""
    needs = [name for name, used in (
        ("`at_plateau` stages", any("at_plateau" in stage for stage in freezing.schedule())),
        ("`early_stopping_patience`", run.early_stopping_patience),
        ("`eval_test_each_epoch`", run.eval_test_each_epoch),
    ) if used]
    if needs and training.eval_strategy == "no":
        raise RecipeError(f"{' and '.join(needs)} need evaluations during training, but `eval_strategy` is `no`. Set `eval_strategy: epoch`.")
    if run.early_stopping_patience is not None and run.early_stopping_patience < 1:
        raise RecipeError(f"`early_stopping_patience` counts evaluations without improvement; it must be >= 1, not {run.early_stopping_patience}.")
    watches_metric = any("at_plateau" in stage for stage in freezing.schedule()) or run.early_stopping_patience
    if watches_metric and not training.metric_for_best_model:
        raise RecipeError("`at_plateau` stages and early stopping watch `metric_for_best_model`; set it (e.g. `accuracy` or `loss`).")


FREEZE_SECTION = [f.name for f in dataclasses.fields(FreezeArguments) if f.name != "freeze"]


def _given(key: str, argv: list[str], overrides: dict) -> bool:
    return key in overrides or any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in argv)


def _as_default(value):
    # argparse type-converts string defaults only; lists (stages, patterns) pass through as they are.
    return value if isinstance(value, (list, dict, str)) or value is None else str(value)


def _check_single_values(arg_parser, values: dict) -> None:
    # argparse converts strings only: a YAML list, mapping or null (`dataset: [a, b]`, `freeze:`) would reach the dataclasses unchecked.
    accepts = _accepted_kinds()
    for key, value in values.items():
        action = arg_parser._option_string_actions.get(f"--{key}")
        if action is None:
            continue
        example = TRAINING_DEFAULTS.get(key, action.default)
        example = "" if example in (None, "") else f", e.g. `{key}: {str(example).lower() if isinstance(example, bool) else example}`"
        if isinstance(value, (list, dict)) and type(value) not in accepts.get(key, (list, dict)):
            kind = "list" if isinstance(value, list) else "mapping"
            raise RecipeError(f"`{key}: {reprlib.repr(value)}` has the wrong type: `{key}` takes a single value, not a {kind}{example}.")
        if value is None and type(None) not in accepts.get(key, (type(None),)):
            raise RecipeError(f"`{key}` is empty (`{key}:` with no value): give it a value{example}, or delete the line.")
    for key, (allowed, requirement) in VALUE_RANGES.items():
        action = arg_parser._option_string_actions[f"--{key}"]
        action.type = _in_range(action.type, allowed, requirement)


# Values that would train nothing, or not what was asked, and that neither argparse nor TrainingArguments refuses
# (TrainingArguments refuses only warmup_steps < 0, without saying what to write). Checked as argparse converts each
# value: recipe and command line get one message, and a value on the command line replaces a bad one in the recipe.
VALUE_RANGES = {
    "learning_rate": (lambda v: 0 < v < math.inf, "give a number > 0, e.g. 1e-3 (0 or less trains nothing)"),
    "num_train_epochs": (lambda v: 0 <= v < math.inf, "give a number of epochs > 0, e.g. 3"),  # 0: see _check_combinations
    "max_steps": (lambda v: v > 0 or v == -1, ("give a number of steps > 0, or -1 to train for `num_train_epochs` "
                                               "(Trainer would silently ignore it and train every epoch)")),
    "per_device_train_batch_size": (lambda v: v >= 1, "give a batch size >= 1, e.g. 32"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "give a batch size >= 1, e.g. 64"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "give a whole number >= 1 (1 = no accumulation)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "give a number >= 0, e.g. 0.01 (0 = none)"),
    "warmup_steps": (lambda v: 0 <= v < math.inf, "give a fraction of the training steps below 1 (e.g. 0.1) or a number of steps >= 1"),
}


def _in_range(convert, allowed, requirement):
    def checked(text: str):
        value = convert(text)
        if not allowed(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {requirement}")
        return value

    checked.__name__ = getattr(convert, "__name__", "value")  # argparse names the type: `invalid float value: 'three'`
    return checked


@functools.lru_cache(maxsize=1)
def _accepted_kinds() -> dict[str, set[type]]:
    """Which of list, dict and None each option's annotation admits (`dataset: str` admits none of them)."""
    accepts = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            accepts[f.name] = {typing.get_origin(option) or option for option in options} & {list, dict, type(None)}
            if f.default is None:  # `dataset: str = None`: unset until a recipe names one
                accepts[f.name].add(type(None))
    accepts["stages"].add(list)  # a YAML list in a recipe, a YAML string on the command line: FreezeArguments reads both
    return accepts


def _check_combinations(run: RunArguments, training) -> None:
    """Options that are each valid but cannot go together, refused before any data or model loads."""
    if run.resume and run.overwrite:
        raise RecipeError(f"`--resume` and `--overwrite` cannot go together: `--resume` continues the run in {training.output_dir} "
                          "from its last complete checkpoint; `--overwrite` deletes that run to start a new one. Pass one of them.")
    if training.num_train_epochs == 0 and training.max_steps <= 0:
        raise RecipeError("`num_train_epochs: 0` trains nothing: give a number of epochs > 0, e.g. 3, or a `max_steps` > 0.")


def _check_training_precision(device_type: str, training) -> None:
    """fp16 training on a CPU: Accelerate turns on fp16 autocast and its gradient scaler only on accelerators
    (Accelerator.__init__ skips `device.type == "cpu"`), so the run would train in fp32 while its recipe says fp16."""
    if training.mixed_precision != "fp16":  # `fp16: true`, or `accelerate launch --mixed_precision fp16`
        return
    forced = training.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not forced and (device_type != "cpu" or torch.backends.mps.is_available()):
        return
    asked = "`fp16: true`" if training.fp16 else "`--mixed_precision fp16` (accelerate launch)"
    has_bf16, hardware = native_bf16("cpu")
    instead = (f"Use `bf16: true` (or `--mixed_precision bf16`) instead: this {hardware} computes bf16 natively"
               if has_bf16 else f"Remove it to train in fp32 as it would anyway (this {hardware} would only emulate bf16)")
    raise RecipeError(f"{asked} on a CPU would change nothing: Accelerate has fp16 mixed precision (autocast with a gradient "
                      f"scaler) only on GPUs, so the run would train in fp32. {instead}.")


def _parse(arg_parser, argv):
    try:
        *parsed, remaining = arg_parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except argparse.ArgumentError as error:
        name = (error.argument_name or "").split("/")[0].lstrip("-")
        raise RecipeError(f"Option `{name}`: {error.message.rstrip('.')}. Fix it in the recipe or on the command line.") from None
    except (ValueError, TypeError) as error:
        raise RecipeError(str(error)) from None
    return parsed, remaining
