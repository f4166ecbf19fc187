"""Trainer callbacks that carry out a recipe's schedule: freeze-plan stages and stage-aware early stopping."""

from __future__ import annotations

import contextlib
import math

from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import has_length

from .freezing import FreezePlan


def metric_key(metric_for_best_model: str | None) -> str:
    """The logged name of `metric_for_best_model` (`accuracy` is logged as `eval_accuracy`)."""
    name = metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"


class FreezeCallback(TrainerCallback, ExportableState):
    """Moves the plan through its stages at the declared epoch, step or plateau (also after `--resume`), and applies
    each stage's `lr_scale`. The steps at which plateau stages began are saved in every checkpoint's trainer state.
    Each stage's record in the plan's history gets the rate each of its blocks had at the stage's first optimizer step
    (`learning_rates`) and at its last (`learning_rates_at_last_step`), read from the optimizer's groups."""

    def __init__(self, plan: FreezePlan):
        self.plan = plan
        self.training = False  # only evaluations during training count (not that of the final model after it)
        self._trained_blocks: tuple[int | None, set[str]] = (None, set())
        self._hooks = contextlib.ExitStack()  # the plan's hooks on the model, from the start of training to its end

    def state(self) -> dict:
        return {"args": {}, "attributes": {"stage_starts": self.plan.stage_starts, "reasons": self.plan.reasons}}

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        self._hooks.close()

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.training = True
        # Under DDP every rank's reducer expects a gradient for every parameter it registered, every step.
        if args.world_size == 1:
            self.plan.skip_waiting_backward = True
        self._hooks.enter_context(self.plan.attached())
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict) and saved.get("attributes", {}).get("stage_starts"):  # a resumed run: its plateau decisions
            self.plan.stage_starts = saved["attributes"]["stage_starts"]
            self.plan.reasons.update({int(index): reason for index, reason in saved["attributes"]["reasons"].items()})
        batches = len(train_dataloader) if train_dataloader is not None and has_length(train_dataloader) else None  # a stream has none
        # Trainer's own count of optimizer steps per epoch (a last partial accumulation still steps).
        steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps) if batches else state.max_steps
        self.plan.set_steps_per_epoch(max(steps_per_epoch, 1), state.max_steps)
        self._sync(state, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync(state, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.plan.drop_waiting_gradients()
        if optimizer is not None and self.plan.history:
            self._record_rates(optimizer, self.plan.history[-1])

    def _record_rates(self, optimizer, stage: dict) -> None:
        """The rate each block this stage trains is about to step with (the groups of one block share it)."""
        if self._trained_blocks[0] != self.plan.stage_index:
            self._trained_blocks = (self.plan.stage_index, {block.name for block in self.plan.blocks
                                                            if self.plan.active.intersection(block.parameter_names)})
        rates = {group["block"]: group["lr"] for group in optimizer.param_groups if group.get("block") in self._trained_blocks[1]}
        stage.setdefault("learning_rates", rates)
        stage["learning_rates_at_last_step"] = rates
        stage.setdefault("logged_rate_block", optimizer.param_groups[0].get("block"))  # Trainer logs the first group's rate

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = metric_key(args.metric_for_best_model)
        if self.training and metrics and key in metrics:  # not the test split's metrics (`eval_test_each_epoch`)
            self.plan.observe(key.removeprefix("eval_"), metrics[key], bool(args.greater_is_better), state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.plan.verify(state.global_step)

    def _sync(self, state, optimizer=None, lr_scheduler=None, **kwargs):
        index = self.plan.stage_for_step(state.global_step)
        if index != self.plan.stage_index:
            self.plan.enter_stage(index, step=state.global_step)
            if optimizer is not None and lr_scheduler is not None:
                self.plan.scale_learning_rates(optimizer, lr_scheduler)
                _last_rates_follow_the_groups(optimizer, lr_scheduler)


def _last_rates_follow_the_groups(optimizer, scheduler) -> None:
    """Trainer logs a step's rate from `lr_scheduler.get_last_lr()`, which torch's schedulers set only when they step: after
    a stage rescaled the groups' rates, the log of its first step would show the rate before the scaling. `_last_lr` is
    the private attribute get_last_lr() returns (torch has no public way to set it); it is saved with the scheduler."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in getattr(optimizer, "optimizer", optimizer).param_groups]


class EarlyStopping(EarlyStoppingCallback):
    """Trainer's early stopping, counted only in the last stage of a plan that waits for plateaus (an earlier plateau
    starts the next stage instead); records when and why it stopped, for the card and all_results.json."""

    def __init__(self, plan: FreezePlan, patience: int, threshold: float):
        super().__init__(early_stopping_patience=patience, early_stopping_threshold=threshold)
        self.plan = plan
        self.stopped: dict | None = None
        self.training = False  # the evaluation of the final model, after training, stops nothing

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        return super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        key = metric_key(args.metric_for_best_model)
        if not self.training or not metrics or key not in metrics:
            return  # the test split's per-epoch metrics are never a stopping signal
        if self.plan.waits_for_plateau or not self.plan.in_last_stage:
            self.early_stopping_patience_counter = 0
            return
        super().on_evaluate(args, state, control, metrics, **kwargs)
        # Not `control.should_training_stop` alone: Trainer sets it before the evaluation of the last step.
        if self.early_stopping_patience_counter >= self.early_stopping_patience and self.stopped is None:
            self.stopped = {
                "epoch": state.epoch, "step": state.global_step,
                "reason": f"validation {key.removeprefix('eval_')} did not improve by more than {self.early_stopping_threshold} "
                          f"on its best ({state.best_metric:.4g}) for {self.early_stopping_patience} evaluation(s)",
            }

    def summary(self) -> dict:
        return {"patience": self.early_stopping_patience, "threshold": self.early_stopping_threshold,
                "stopped_early": self.stopped is not None, **(self.stopped or {})}
