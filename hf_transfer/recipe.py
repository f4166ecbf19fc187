"""Recipes: a YAML file whose keys are fields of the argument dataclasses, overridable as `--key value`.

    dataset: uoft-cs/cifar10          # DataArguments
    model: timm/resnet50.a1_in1k      # ModelArguments
    freeze: head_only                 # FreezeArguments (or a `freeze:` mapping, see below)
    num_train_epochs: 3               # any transformers.TrainingArguments field
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import reprlib
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .errors import RecipeError, did_you_mean
from .options import (
    ARGUMENT_CLASSES,
    TRAINING_DEFAULTS,
    DataArguments,
    DoctorArguments,
    FreezeArguments,
    HfTransferTrainingArguments,
    ModelArguments,
    RunArguments,
)
from .recipe_yaml import RecipeYAMLError, read_recipe_file
from .repo_files import without_local_paths

RUN_RECIPE_HEADER = "# The resolved recipe of this run. Reproduce it with: hf-transfer train recipe.yaml --output_dir <another folder>\n"


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

    def to_yaml(self, header: str = RUN_RECIPE_HEADER, local_paths: bool = False) -> str:
        """A recipe that reproduces this run: `hf-transfer train <it> --output_dir <another>`, under `header` (comment
        lines); local folders as given with `local_paths` (a recipe that stays on this machine)."""
        return recipe_yaml(self.to_dict(local_paths), header)


def recipe_yaml(sections: dict, header: str = RUN_RECIPE_HEADER) -> str:
    """`Recipe.to_yaml` of a recipe already resolved by `Recipe.to_dict`, as a run serialises its recipe once."""
    flat = {}
    for section in ("data", "model", "freeze", "run", "doctor", "training"):
        values = dict(sections[section])
        if section == "freeze":  # the preset's name, so that its derived settings (fastai's lr spread) come back
            values["freeze"] = values.pop("preset") or values["freeze"]
        if section == "run":  # what to do with the folder, not how to train
            values.pop("resume"), values.pop("overwrite")
        flat.update(values)
    return header + yaml.safe_dump(flat, sort_keys=False)


def parser() -> HfArgumentParser:
    # No abbreviations: a misspelt `--num_train_epoch` must be reported, not silently completed.
    # exit_on_error=False: a wrong value becomes a RecipeError, not argparse's usage dump of every option.
    return HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False, exit_on_error=False)


def known_keys() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


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
            raise RecipeError(f"Unknown key(s) {unknown} under `{where}:`.{did_you_mean(unknown[0], keys)} Use {', '.join(keys)}.")
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
            raise RecipeError(f"Unknown recipe key `{key}` in {path}.{did_you_mean(key, known_keys())}")
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
    """`[recipe.yaml] [--key value ...]` -> Recipe, checked (`validation.check_recipe`). Keyword overrides win over both."""
    import torch  # not for `--help`: which device trains decides some defaults

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: the fastest convolution algorithms are found once
    return parse_recipe_for("cuda" if cuda else "cpu", argv, **overrides)


def parse_recipe_for(device_type: str, argv: list[str] | None = None, **overrides) -> Recipe:
    """`parse_recipe` with the defaults of training on `device_type` ("cuda" or "cpu")."""
    from .validation import check_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    values = {**TRAINING_DEFAULTS, **device_defaults(device_type, os.cpu_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))}
    if argv and not argv[0].startswith("-"):
        from_file = load_yaml(argv.pop(0))
        if _given("freeze", argv, overrides):  # a new strategy on the command line replaces the recipe's whole freeze section
            from_file = {key: value for key, value in from_file.items() if key not in FREEZE_SECTION}
        values.update(from_file)
    for key in overrides:
        if key not in known_keys():
            raise RecipeError(f"Unknown option `{key}`.{did_you_mean(key, known_keys())}")
    values.update(_flatten_freeze(overrides))
    if "LOCAL_RANK" in os.environ and device_type != "cuda":
        # `accelerate launch --multi_gpu` with no GPU: run the processes on CPU with gloo instead of one each.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    _check_single_values(values)
    arg_parser = parser()
    arg_parser.set_defaults(**{k: _as_default(v) for k, v in values.items()})
    parsed, remaining = _parse(arg_parser, argv)
    if remaining:
        flag = remaining[0].lstrip("-").split("=")[0]
        raise RecipeError(f"Unknown option `{remaining[0]}`.{did_you_mean(flag, known_keys())}")
    recipe = Recipe(*parsed)
    check_recipe(recipe, device_type)
    return recipe


FREEZE_SECTION = [f.name for f in dataclasses.fields(FreezeArguments) if f.name != "freeze"]


def _given(key: str, argv: list[str], overrides: dict) -> bool:
    return key in overrides or any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in argv)


def _as_default(value):
    # argparse type-converts string defaults only; lists (stages, patterns) pass through as they are.
    return value if isinstance(value, (list, dict, str)) or value is None else str(value)


def _check_single_values(values: dict) -> None:
    """argparse converts strings only: a YAML list, mapping or null (`dataset: [a, b]`, `freeze:`) is checked here, against
    the option's annotation, before it reaches the dataclasses."""
    accepts, defaults = _accepted_kinds(), _declared_defaults()
    for key, value in values.items():
        if key not in accepts:
            continue
        example = TRAINING_DEFAULTS.get(key, defaults.get(key))
        example = "" if example in (None, "") else f", e.g. `{key}: {str(example).lower() if isinstance(example, bool) else example}`"
        if isinstance(value, (list, dict)) and type(value) not in accepts[key]:
            kind = "list" if isinstance(value, list) else "mapping"
            raise RecipeError(f"`{key}: {reprlib.repr(value)}` has the wrong type: `{key}` takes a single value, not a {kind}{example}.")
        if value is None and type(None) not in accepts[key]:
            raise RecipeError(f"`{key}` is empty (`{key}:` with no value): give it a value{example}, or delete the line.")


@functools.lru_cache(maxsize=1)
def _declared_defaults() -> dict:
    return {f.name: f.default for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@functools.lru_cache(maxsize=1)
def _accepted_kinds() -> dict[str, set[type]]:
    """Which of list, dict and None each option's annotation admits (`dataset: str` admits none of them)."""
    accepts = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            hint = hints[f.name]
            options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            accepts[f.name] = {typing.get_origin(option) or option for option in options} & {list, dict, type(None)}
            if f.default is None:  # `dataset: str = None`: unset until a recipe names one
                accepts[f.name].add(type(None))
    accepts["stages"].add(list)  # a YAML list in a recipe, a YAML string on the command line: FreezeArguments reads both
    return accepts


def _parse(arg_parser, argv):
    try:
        *parsed, remaining = arg_parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except argparse.ArgumentError as error:
        name = (error.argument_name or "").split("/")[0].lstrip("-")
        raise RecipeError(f"Option `{name}`: {error.message.rstrip('.')}. Fix it in the recipe or on the command line.") from None
    except (ValueError, TypeError) as error:
        raise RecipeError(str(error)) from None
    return parsed, remaining
