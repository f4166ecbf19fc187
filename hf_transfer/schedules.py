"""The learning-rate schedules a recipe can name: Trainer's, plus `step` (the classic lr / 10 every few epochs), what
each takes in `lr_scheduler_kwargs`, and the check that those build and run.

Trainer has no step decay, the schedule of the classic transfer-learning recipes, so `lr_scheduler_type: step` is
added here (`SafeTrainer.create_scheduler` builds it).
"""

from __future__ import annotations

import inspect
import json
import reprlib

import torch
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, GreedyLR, get_scheduler
from transformers.trainer_utils import SchedulerType

from .errors import RecipeError, did_you_mean

STEP = "step"
SCHEDULES = [scheduler.value for scheduler in SchedulerType] + [STEP]
STEP_DEFAULTS = {"step_size": 1, "gamma": 0.1}  # torch's StepLR has no default step_size; 1 epoch, / 10, as in its docs


# What a schedule's function takes that Trainer itself passes (from `warmup_steps` and the run's length), or that would
# break resuming (`last_epoch`): never from `lr_scheduler_kwargs`.
_SET_BY_TRAINER = {"optimizer": None, "num_warmup_steps": "warmup_steps", "num_training_steps": "num_train_epochs / max_steps",
                   "last_epoch": None}
# The schedules whose function passes `**kwargs` on to a class: that class's arguments are the ones they take.
_SCHEDULE_CLASSES = {SchedulerType.REDUCE_ON_PLATEAU.value: torch.optim.lr_scheduler.ReduceLROnPlateau,
                     SchedulerType.GREEDY.value: GreedyLR}


def schedule_kwargs_taken(lr_scheduler_type: str) -> list[str] | None:
    """The `lr_scheduler_kwargs` keys a schedule takes, in its signature's order; None when its signature does not say."""
    if lr_scheduler_type == STEP:
        return list(STEP_DEFAULTS)
    function = _SCHEDULE_CLASSES.get(lr_scheduler_type) or TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(lr_scheduler_type)]
    parameters = inspect.signature(function).parameters.values()
    if any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters):
        return None
    # transformers' get_scheduler calls `constant` and `constant_with_warmup` without the kwargs: their signatures take none.
    return [parameter.name for parameter in parameters if parameter.name not in _SET_BY_TRAINER and parameter.name != "verbose"]


def check_schedule_kwargs(lr_scheduler_type: str, kwargs: dict | None) -> None:
    """Every key of `lr_scheduler_kwargs` is one the schedule takes, and the schedule builds and runs with their values:
    checked when the recipe is read, not at the first training step (a raw TypeError from get_scheduler)."""
    if not kwargs:
        return
    taken = schedule_kwargs_taken(lr_scheduler_type)
    for key in kwargs:
        if taken is not None and key not in taken:
            trainer = f" (set from `{_SET_BY_TRAINER[key]}`)" if _SET_BY_TRAINER.get(key) else ""
            if not taken:
                raise RecipeError(f"`lr_scheduler_type: {lr_scheduler_type}` takes no `lr_scheduler_kwargs`, not `{key}`{trainer}: "
                                 "remove them.")
            raise RecipeError(f"`lr_scheduler_type: {lr_scheduler_type}` takes `lr_scheduler_kwargs` {', '.join(taken)}, "
                             f"not `{key}`{trainer}.{did_you_mean(key, taken)}")
    if lr_scheduler_type == STEP:
        step = {**STEP_DEFAULTS, **kwargs}
        size, gamma = step["step_size"], step["gamma"]
        number = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1 and number and 0 < gamma <= 1):
            raise RecipeError(f"`lr_scheduler_kwargs` for `step` need a whole `step_size` >= 1 (epochs) and 0 < `gamma` <= 1, not {step}.")
    for tried in [{key: value} for key, value in kwargs.items()] + [kwargs]:
        error = _schedule_error(lr_scheduler_type, tried)
        if error:
            shown = ", ".join(f"{key}={value!r}" for key, value in tried.items())
            raise RecipeError(f"`lr_scheduler_kwargs` `{shown}` cannot be used by `lr_scheduler_type: {lr_scheduler_type}`: {error}.")


def _schedule_error(lr_scheduler_type: str, kwargs: dict) -> str | None:
    """What goes wrong when the schedule is built with `kwargs` over a few steps of a stand-in optimizer; None if nothing."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    try:
        if lr_scheduler_type == STEP:
            scheduler = step_schedule(optimizer, 2, 1, **{**STEP_DEFAULTS, **kwargs})
        else:
            scheduler = get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=2, num_training_steps=10,
                                      scheduler_specific_kwargs=dict(kwargs))
        for step in range(11):
            for factor in getattr(scheduler, "lr_lambdas", []):
                float(factor(step))
    except Exception as error:  # noqa: BLE001 - whatever the schedule raises is the user's answer, in one line
        return f"{type(error).__name__}: {str(error).rstrip('.')}"
    return None


def schedule_kwargs_mapping(value, lr_scheduler_type: str):
    """`lr_scheduler_kwargs` as a mapping: a YAML mapping from a recipe, or JSON text from the command line."""
    example = '{"step_size": 2, "gamma": 0.1}' if lr_scheduler_type == STEP else '{"num_cycles": 0.5}'
    taken = schedule_kwargs_taken(lr_scheduler_type) if lr_scheduler_type in SCHEDULES else None
    takes = f" `lr_scheduler_type: {lr_scheduler_type}` takes {', '.join(taken) or 'none'}." if taken is not None else ""
    parsed = value
    if isinstance(value, str):
        try:  # as TrainingArguments reads it (JSON from a `{`), which then converts "true" and number strings itself
            parsed = json.loads(value) if value.startswith("{") else value
        except ValueError as error:
            raise ValueError(f"`lr_scheduler_kwargs` is not valid JSON ({error}): write a mapping such as `{example}`.{takes}") from None
    if parsed is not None and not isinstance(parsed, dict):
        raise ValueError(f"`lr_scheduler_kwargs` must be a mapping such as `{example}` (JSON on the command line, a YAML "
                         f"mapping in a recipe), not {reprlib.repr(value)}.{takes}")
    return value


def step_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float):
    """Linear warm-up, then lr x gamma ** (completed epochs // step_size): the rate torch's StepLR gives when stepped once
    per epoch, applied per optimizer step by a LambdaLR. A LambdaLR, as Trainer's own schedules: its closed form resumes
    bit-exactly, and a stage's `lr_scale` scales its base rates (FreezePlan.scale_learning_rates); StepLR multiplies the
    current rate, and has no warm-up."""

    def factor(step: int) -> float:
        if step < warmup_steps:  # as transformers' warm-up schedules
            return step / max(1, warmup_steps)
        return gamma ** ((step // steps_per_epoch) // step_size)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def describe_schedule(args, scheduler, num_training_steps: int) -> dict:
    """The schedule as it ran: its type, arguments, warm-up and the scheduler class that applied it."""
    kwargs = {**STEP_DEFAULTS, **(args.lr_scheduler_kwargs or {})} if args.lr_scheduler_type == STEP else (args.lr_scheduler_kwargs or {})
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the real one
    return {
        "type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "kwargs": dict(kwargs),
        "warmup_steps": args.get_warmup_steps(num_training_steps),
        "class": f"{type(scheduler).__module__}.{type(scheduler).__qualname__}",
    }
