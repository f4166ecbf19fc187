"""The optimizer and learning-rate schedule a recipe asks for, built as Trainer builds them, over the freeze plan's groups.

`Trainer.get_optimizer_cls_and_kwargs` turns `optim` / `optim_args` / `adam_*` into an optimizer class and its
arguments; we call it and hand the class the freeze plan's parameter groups (per-block learning rates, no weight
decay on norms and biases) instead of Trainer's two groups. Trainer has no step decay, the schedule of the classic
transfer-learning recipes (lr / 10 every few epochs), so `lr_scheduler_type: step` is added here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import SchedulerType

from .errors import HFTransferError

STEP = "step"
SCHEDULES = [scheduler.value for scheduler in SchedulerType] + [STEP]
STEP_DEFAULTS = {"step_size": 1, "gamma": 0.1}  # torch's StepLR has no default step_size; 1 epoch, / 10, as in its docs
# What `get_optimizer_cls_and_kwargs` returns in place of parameter groups: optimizers that cannot take the plan's groups.
_NOT_GROUPS = ("params", "model", "optimizer_dict")


class OptimizerError(HFTransferError, ValueError):
    """An `optim` that cannot run here or cannot take per-block parameter groups; the message names one that can."""


@dataclass
class HfTransferTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose `lr_scheduler_type` also takes `step` (lr x gamma every `step_size` epochs)."""

    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "Learning-rate schedule: any of Trainer's, or `step` (multiply by `gamma` every `step_size` epochs, "
                    "as torch's StepLR stepped once per epoch; set them with `lr_scheduler_kwargs: {step_size: 2, gamma: 0.1}`). "
                    "`warmup_steps` applies to every schedule.",
            "choices": SCHEDULES,
        },
    )

    def __post_init__(self):
        step = str(self.lr_scheduler_type) == STEP
        if step:  # TrainingArguments accepts only its own names; it checks nothing else about the schedule
            self.lr_scheduler_type = SchedulerType.CONSTANT.value
        super().__post_init__()
        if step:
            self.lr_scheduler_type = STEP
            unknown = set(self.lr_scheduler_kwargs or {}) - set(STEP_DEFAULTS)
            if unknown:
                raise ValueError(f"`lr_scheduler_type: step` takes `lr_scheduler_kwargs` {sorted(STEP_DEFAULTS)}, not {sorted(unknown)}.")
            kwargs = {**STEP_DEFAULTS, **(self.lr_scheduler_kwargs or {})}
            if not (isinstance(kwargs["step_size"], int) and kwargs["step_size"] >= 1 and 0 < kwargs["gamma"] <= 1):
                raise ValueError(f"`lr_scheduler_kwargs` for `step` need a whole `step_size` >= 1 (epochs) and 0 < `gamma` <= 1, not {kwargs}.")


def build_optimizer(args: TrainingArguments, model: torch.nn.Module, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer Trainer would build for `args`, over `groups` (each with its own `lr` and `weight_decay`)."""
    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError, RuntimeError) as error:  # a missing package (bitsandbytes, torchao...) or a bad optim_args
        raise OptimizerError(f"`optim: {args.optim.value}` cannot run here: {error} Use `optim: adamw_torch` or `sgd`.") from None
    if is_optimizer_factory(optimizer_cls) or any(key in kwargs for key in _NOT_GROUPS):
        raise OptimizerError(
            f"`optim: {args.optim.value}` builds its own parameter groups, so it cannot take the freeze plan's "
            "(per-block learning rates, frozen blocks left out). Use `adamw_torch`, `sgd`, `adafactor`, `adagrad` or `rmsprop`."
        )
    kwargs = {key: value for key, value in kwargs.items() if key != "lr"}  # each group has its own
    return optimizer_cls(groups, lr=args.learning_rate, **kwargs)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer as it ran: its class and the hyperparameters it holds (read back from the object)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    defaults = {key: value for key, value in optimizer.defaults.items() if isinstance(value, (int, float, str, bool, tuple, type(None)))}
    rates = sorted({group.get("initial_lr", group["lr"]) for group in optimizer.param_groups})  # before the schedule scaled them
    return {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "hyperparameters": defaults,
        "parameter_groups": len(optimizer.param_groups),
        "weight_decays": sorted({group.get("weight_decay", 0.0) for group in optimizer.param_groups}, reverse=True),
        "learning_rates": [rates[0], rates[-1]] if rates else [],
    }


def step_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, steps_per_epoch: int, step_size: int, gamma: float):
    """Linear warm-up, then lr x gamma ** (completed epochs // step_size): torch's StepLR stepped once per epoch."""

    def factor(step: int) -> float:
        if step < warmup_steps:  # as transformers' warm-up schedules
            return step / max(1, warmup_steps)
        return gamma ** ((step // steps_per_epoch) // step_size)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def describe_schedule(args: TrainingArguments, scheduler, num_training_steps: int) -> dict:
    """The schedule as it ran: its type, arguments, warm-up and the scheduler class that applied it."""
    kwargs = {**STEP_DEFAULTS, **(args.lr_scheduler_kwargs or {})} if args.lr_scheduler_type == STEP else (args.lr_scheduler_kwargs or {})
    lr_scheduler_type = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    return {
        "type": lr_scheduler_type,
        "kwargs": dict(kwargs),
        "warmup_steps": args.get_warmup_steps(num_training_steps),
        "class": type(scheduler).__name__,
    }
