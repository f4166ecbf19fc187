"""Every rule that ties options of several sections together, checked once when a recipe is read, before anything runs.

Each option alone is checked by its dataclass (`options.py`); what a data source cannot honour is said by the source
(`data.check_options`).
"""

from __future__ import annotations

import os

from .errors import RecipeError


def check_recipe(recipe, device_type: str) -> None:
    """Refuse, with what to write instead, a recipe whose options cannot go together on `device_type`."""
    from .data.source import source_for
    from .optimization import check_optim_args
    from .schedules import check_schedule_kwargs
    from .selection_report import check_selection

    data, freezing, run, training = recipe.data, recipe.freezing, recipe.run, recipe.training
    check_schedule_kwargs(getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type), training.lr_scheduler_kwargs)
    if not data.dataset:
        raise RecipeError("No dataset given: set `dataset:` in the recipe or pass `--dataset <hub id or folder>`.")
    if training.push_to_hub and (training.hub_model_id or "").count("/") != 1:
        raise RecipeError("`push_to_hub: true` needs `hub_model_id: <user>/<name>`, the model repo to push to.")
    _check_evaluation_needs(freezing, run, training)
    if run.resume and run.overwrite:
        raise RecipeError(f"`--resume` and `--overwrite` cannot go together: `--resume` continues the run in {training.output_dir} "
                          "from its last complete checkpoint; `--overwrite` deletes that run to start a new one. Pass one of them.")
    if training.num_train_epochs == 0 and training.max_steps <= 0:
        raise RecipeError("`num_train_epochs: 0` trains nothing: give a number of epochs > 0, e.g. 3, or a `max_steps` > 0.")
    _check_training_precision(device_type, training)
    check_optim_args(training)
    source_for(recipe).check_options()
    check_selection(recipe)


def _check_evaluation_needs(freezing, run, training) -> None:
    """Options that act on evaluations need evaluations, and a metric to watch."""
    plateaus = any("at_plateau" in stage for stage in freezing.schedule)
    needs = [name for name, used in (
        ("`at_plateau` stages", plateaus),
        ("`early_stopping_patience`", run.early_stopping_patience),
        ("`eval_test_each_epoch`", run.eval_test_each_epoch),
    ) if used]
    if needs and training.eval_strategy == "no":
        raise RecipeError(f"{' and '.join(needs)} need evaluations during training, but `eval_strategy` is `no`. Set `eval_strategy: epoch`.")
    if run.early_stopping_patience is not None and run.early_stopping_patience < 1:
        raise RecipeError(f"`early_stopping_patience` counts evaluations without improvement; it must be >= 1, not {run.early_stopping_patience}.")
    if (plateaus or run.early_stopping_patience) and not training.metric_for_best_model:
        raise RecipeError("`at_plateau` stages and early stopping watch `metric_for_best_model`; set it (e.g. `accuracy` or `loss`).")


def _check_training_precision(device_type: str, training) -> None:
    """fp16 training on a CPU: Accelerate turns on fp16 autocast and its gradient scaler only on accelerators
    (Accelerator.__init__ skips `device.type == "cpu"`), so the run would train in fp32 while its recipe says fp16."""
    import torch

    from .precision import native_bf16

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
