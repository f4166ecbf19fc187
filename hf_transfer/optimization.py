"""The optimizer a recipe asks for, built as Trainer builds it, over the freeze plan's parameter groups; its checks and report.

`Trainer.get_optimizer_cls_and_kwargs` turns `optim` / `optim_args` / `adam_*` into an optimizer class and its
arguments; we call it and hand the class the freeze plan's parameter groups (per-block learning rates, no weight
decay on norms and biases) instead of Trainer's two groups. The schedules are in `schedules.py`.
"""

from __future__ import annotations

import copy
import inspect
import reprlib

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_optimizer import is_optimizer_factory

from .errors import HFTransferError, did_you_mean

# What `get_optimizer_cls_and_kwargs` returns in place of parameter groups: optimizers that cannot take the plan's groups.
_NOT_GROUPS = ("params", "model", "optimizer_dict")


class OptimizerError(HFTransferError, ValueError):
    """An `optim` that cannot run here or cannot take per-block parameter groups; the message names one that can."""


# Keys every parameter group sets for itself (per-block rates, no decay on norms and biases): an optimizer-wide value
# from `optim_args` would be overridden, so it is refused with the recipe option to set instead.
_SET_PER_GROUP = {"lr": "learning_rate", "weight_decay": "weight_decay"}


def check_optim_args(args: TrainingArguments) -> None:
    """`optim_args` as Trainer.get_optimizer_cls_and_kwargs reads them for `optim`: each pair well formed, each key one
    that reaches the optimizer class (Trainer's handlers take the keys they know and drop the rest without a word), and
    the class built with the values. Checked when the recipe is read, before any data loads."""
    if not args.optim_args:
        return
    name = getattr(args.optim, "value", args.optim)
    base = _optimizer_or_error(args, None)
    if isinstance(base, str) or is_optimizer_factory(base[0]) or any(key in base[1] for key in _NOT_GROUPS):
        return  # cannot run here, or builds its own groups: build_optimizer says so with the model at hand
    optimizer_cls, base_kwargs = base
    described = _class_name(optimizer_cls)
    taken = _optim_args_taken(args, optimizer_cls, base_kwargs)
    takes = f"`optim: {name}` takes {', '.join(taken)}" if taken else f"Trainer passes no `optim_args` to `optim: {name}` ({described})"
    pairs = {}
    for item in args.optim_args.replace(" ", "").split(","):  # as transformers' _parse_optim_args splits them
        key, equals, value = item.partition("=")
        if not (key and equals and value) or "=" in value:
            example = f"{taken[0]}=<value>" if taken else "key=value"
            raise OptimizerError(f"`optim_args: {reprlib.repr(args.optim_args)}`: {reprlib.repr(item)} is not a `key=value` pair. "
                                 f"Write comma-separated pairs, e.g. `optim_args: {example}`; {takes}.")
        pairs[key] = value
    for key, value in pairs.items():
        if key in _SET_PER_GROUP:
            raise OptimizerError(f"`optim_args` key `{key}` would not take effect: every parameter group sets its own. "
                                 f"Set `{_SET_PER_GROUP[key]}: {value}` instead.")
        if key not in taken:
            if not taken:
                adam = " Set Adam's betas and eps with `adam_beta1`, `adam_beta2`, `adam_epsilon`." if "betas" in base_kwargs else ""
                raise OptimizerError(f"{takes}: remove `{key}` from `optim_args`.{adam}")
            raise OptimizerError(f"`optim_args` key `{key}` is not an option of `optim: {name}` ({described}).{did_you_mean(key, taken)} "
                                 f"It takes {', '.join(taken)}.")
    for tried in [{key: value} for key, value in pairs.items()] + [pairs]:
        shown = ",".join(f"{key}={value}" for key, value in tried.items())
        error = _optimizer_or_error(args, shown, build=True)
        if isinstance(error, str):
            keys = ", ".join(f"`{key}`" for key in tried)
            raise OptimizerError(f"`optim_args` `{shown}` cannot be used by `optim: {name}` ({described}): {error}. "
                                 f"Fix the value of {keys} in `optim_args`.")


def _optimizer_or_error(args: TrainingArguments, optim_args: str | None, build: bool = False):
    """(class, kwargs) as Trainer builds them with `optim_args`, the class also instantiated when `build`; or the error."""
    trial = copy.copy(args)
    trial.optim_args = optim_args
    stand_in = torch.nn.Linear(2, 2)
    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trial, stand_in)
        if build:
            optimizer_cls(list(stand_in.parameters()), **kwargs)
    except Exception as error:  # noqa: BLE001 - a missing package, a value Trainer cannot convert, one the class refuses
        return str(error).rstrip(".")
    return optimizer_cls, kwargs


def _optim_args_taken(args: TrainingArguments, optimizer_cls, base_kwargs: dict) -> list[str]:
    """The arguments of `optimizer_cls` that Trainer passes on from `optim_args` for this `optim`: those that change (or
    fail) what it builds when given alone."""
    taken = []
    for parameter in inspect.signature(optimizer_cls).parameters:
        if parameter in ("params", "self", *_SET_PER_GROUP):
            continue
        found = _optimizer_or_error(args, f"{parameter}=1")
        if isinstance(found, str) or found[1] != base_kwargs:
            taken.append(parameter)
    return taken


def _class_name(cls) -> str:
    """`torch.optim.SGD` rather than its defining module's `torch.optim.sgd.SGD`, where torch.optim exports it."""
    return f"torch.optim.{cls.__name__}" if getattr(torch.optim, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__qualname__}"


def build_optimizer(args: TrainingArguments, model: torch.nn.Module, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer Trainer would build for `args`, over `groups` (each with its own `lr` and `weight_decay`)."""
    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError, RuntimeError) as error:  # a missing package (bitsandbytes, torchao...) or a bad optim_args
        raise OptimizerError(f"`optim: {args.optim.value}` cannot run here: {error} Use `optim: adamw_torch` or `sgd`.") from None
    if is_optimizer_factory(optimizer_cls) or any(key in kwargs for key in _NOT_GROUPS):
        raise OptimizerError(f"`optim: {args.optim.value}` builds its own parameter groups, so it cannot take the freeze plan's "
                             "(per-block learning rates, frozen blocks left out). Use `adamw_torch`, `sgd`, `adafactor`, `adagrad` "
                             "or `rmsprop`.")
    kwargs = {key: value for key, value in kwargs.items() if key != "lr"}  # each group has its own
    return optimizer_cls(groups, lr=args.learning_rate, **kwargs)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer as it ran: its class and the hyperparameters it holds (read back from the object)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    rates = sorted({group.get("initial_lr", group["lr"]) for group in optimizer.param_groups})  # before the schedule scaled them
    return {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "hyperparameters": _group_values(optimizer),
        "parameter_groups": len(optimizer.param_groups),
        "weight_decays": sorted({group.get("weight_decay", 0.0) for group in optimizer.param_groups}, reverse=True),
        "learning_rates": [rates[0], rates[-1]] if rates else [],
    }


def _group_values(optimizer: torch.optim.Optimizer) -> dict:
    """Each hyperparameter as the parameter groups ran with it (the optimizer's `defaults` are only what a group without
    its own value would get): one value where all groups agree, else each value, largest first. `lr` is the groups'
    rate before the schedule scaled it."""
    values = {}
    for key, default in optimizer.defaults.items():
        if not isinstance(default, (int, float, str, bool, tuple, type(None))):
            continue
        found = list(dict.fromkeys(group.get("initial_lr", group["lr"]) if key == "lr" else group.get(key, default)
                                   for group in optimizer.param_groups))
        numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in found)
        values[key] = found[0] if len(found) == 1 else (sorted(found, reverse=True) if numbers else found)
    return values
