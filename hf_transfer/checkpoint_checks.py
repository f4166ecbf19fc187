"""A checkpoint's files checked against each other and against the run before it is resumed from: one line naming a bad file.

They come from disk (another version, a copy, a hand edit), and Trainer and torch load them trusting that they belong
together: a trainer_state.json at `global_step: 1000000` "resumes" past the run's end and reports success, a malformed
RNG state ends in a raw ValueError, an `lr_lambdas` entry sets attributes on the schedule's function. Each problem is
one line naming the file, before Trainer reads any of them (the run's length once Trainer has counted it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import reprlib
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import OPTIMIZER, SCALER, SCHEDULER, TRAINER_PICKLES, TRAINER_STATE, CheckpointError, resume_files

PLATEAU_SCHEDULES = ("reduce_lr_on_plateau", "greedy")  # step once per evaluation, not once per optimizer step
PARAMETER_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # torch's Adam(W)/SGD state, shaped as its parameter


def _whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value) -> bool:
    """A whole number >= 0, and not a bool."""
    return _whole_number(value) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(check):
    return lambda value: value is None or check(value)


def _kind(*types):
    return lambda value: isinstance(value, types)


# TrainerState's fields as its JSON holds them: (check, what it must be). A field of a later transformers goes unchecked.
_STATE_FIELDS = {
    "epoch": (lambda value: _number(value) and value >= 0, "a number >= 0"),
    "global_step": (is_count, "a whole number >= 0"), "max_steps": (is_count, "a whole number >= 0"),
    "logging_steps": (_optional(_number), "a number"), "eval_steps": (_optional(_number), "a number"),
    "save_steps": (_optional(_number), "a number"), "train_batch_size": (_optional(is_count), "a whole number or null"),
    "num_train_epochs": (is_count, "a whole number >= 0"), "num_input_tokens_seen": (is_count, "a whole number >= 0"),
    "total_flos": (_number, "a number"), "log_history": (_kind(list), "a list"),
    "best_metric": (_optional(lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)), "a number or null"),
    "best_global_step": (_optional(is_count), "a whole number or null"), "best_model_checkpoint": (_optional(_kind(str)), "a path or null"),
    "is_local_process_zero": (_kind(bool), "true or false"), "is_world_process_zero": (_kind(bool), "true or false"),
    "is_hyper_param_search": (_kind(bool), "true or false"), "trial_name": (_optional(_kind(str)), "a name or null"),
    "trial_params": (_optional(_kind(dict)), "a mapping or null"), "stateful_callbacks": (_optional(_kind(dict)), "a mapping or null"),
}
# What GradScaler.load_state_dict reads, each a number.
_GRAD_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def checkpoint_refused(path: Path, checkpoint: Path, problem: str) -> CheckpointError:
    """The one line for a checkpoint file that cannot be resumed from: the file, what is wrong, what to do."""
    return CheckpointError(f"{path}: {problem}. Restore it, resume from an earlier checkpoint by deleting {checkpoint}, "
                           "or start again with `--overwrite`.")


def read_checkpoint_json(path: Path, checkpoint: Path, kind=dict):
    """The JSON file `path` of `checkpoint`, refused (naming both) when unreadable or not a `kind`."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise checkpoint_refused(path, checkpoint, f"unreadable ({reprlib.repr(str(error))})") from None
    if not isinstance(value, kind):
        raise checkpoint_refused(path, checkpoint, f"holds {type(value).__name__}, not a {kind.__name__}")
    return value


def check_checkpoint_files(checkpoint: Path, processes: int, optimizer: torch.optim.Optimizer | None = None,
                           steps_schedule_every_step: bool = True) -> dict:
    """Refuse `checkpoint` when its files are malformed or disagree with each other, or its optimizer state does not fit
    `optimizer`; return its trainer state. `processes`: how many resume state files it must hold (one per process)."""
    _refuse_trainer_pickles(checkpoint)
    state = _checked_trainer_state(checkpoint)
    step = state["global_step"]
    groups, saved = _checked_optimizer_groups(checkpoint, optimizer)
    scheduled = _checked_scheduler(checkpoint, step, len(groups), steps_schedule_every_step)
    _check_optimizer_state(checkpoint, groups, saved, optimizer, scheduled if steps_schedule_every_step else step)
    _check_scaler(checkpoint)
    for stem in resume_files(processes):
        _check_resume_state(checkpoint, stem, step)
    return state


def _refuse_trainer_pickles(checkpoint: Path) -> None:
    """Trainer loads its own pickles when it finds them in a checkpoint (the RNG file after ours, so it would win);
    hf-transfer writes none, so one there was put there by something else."""
    for path in sorted(checkpoint.iterdir()):
        if TRAINER_PICKLES.fullmatch(path.name):
            raise CheckpointError(f"{path}: a pickle, which Trainer would load on resume; hf-transfer writes none and never "
                                  f"loads one (this checkpoint's {OPTIMIZER}.safetensors and JSON files hold that state). "
                                  f"Delete it, or start again with `--overwrite`.")


def check_run_length(checkpoint: Path, state: dict, max_steps: int) -> None:
    """Refuse a checkpoint past the end of this run, or saved by a run of another length (another schedule)."""
    path = checkpoint / TRAINER_STATE
    if state["global_step"] > max_steps:
        raise checkpoint_refused(path, checkpoint, f"the checkpoint is at step {state['global_step']}, but this run has "
                                                   f"{max_steps} steps")
    if state.get("max_steps", max_steps) != max_steps:
        raise checkpoint_refused(path, checkpoint, f"the checkpoint was saved by a run of {state['max_steps']} steps, but this "
                                                   f"run has {max_steps} (its learning-rate schedule would change half-way)")


def _checked_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    state = read_checkpoint_json(path, checkpoint)
    known = {f.name for f in dataclasses.fields(TrainerState)}
    if unknown := sorted(str(key) for key in state if key not in known):
        names = ", ".join(f"`{reprlib.repr(name)[1:-1]}`" for name in unknown[:5])
        raise checkpoint_refused(path, checkpoint, f"unknown field(s) {names}, which Trainer cannot load")
    for name, (check, kind) in _STATE_FIELDS.items():
        if name in state and not check(state[name]):
            raise checkpoint_refused(path, checkpoint, f"`{name}` is {reprlib.repr(state[name])}, not {kind}")
    step = state.get("global_step")
    if step is None:
        raise checkpoint_refused(path, checkpoint, "it has no `global_step`")
    folder = checkpoint.name.rsplit("-", 1)
    if checkpoint.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and folder[1].isdigit() and int(folder[1]) != step:
        raise checkpoint_refused(path, checkpoint, f"`global_step` is {step}, but the checkpoint's folder says step {folder[1]}")
    if "max_steps" in state and step > state["max_steps"]:
        raise checkpoint_refused(path, checkpoint, f"`global_step` {step} is past the run's end, `max_steps` {state['max_steps']}")
    if (best := state.get("best_global_step")) is not None and best > step:
        raise checkpoint_refused(path, checkpoint, f"`best_global_step` {best} is after `global_step` {step}")
    # The best checkpoint is one saved at or before this one (best_global_step may be a later, unsaved evaluation's).
    named = Path(state.get("best_model_checkpoint") or f"{PREFIX_CHECKPOINT_DIR}-0").name.rsplit("-", 1)
    if not (named[0] == PREFIX_CHECKPOINT_DIR and named[-1].isdigit() and int(named[-1]) <= step):
        raise checkpoint_refused(path, checkpoint, f"`best_model_checkpoint` {reprlib.repr(state['best_model_checkpoint'])} is "
                                                   f"not a checkpoint saved by step {step}")
    for entry in state.get("log_history", []):
        if not isinstance(entry, dict) or not _optional(is_count)(entry.get("step")) or (entry.get("step") or 0) > step:
            raise checkpoint_refused(path, checkpoint, f"`log_history` holds {reprlib.repr(entry)}, not an entry up to step {step}")
    for name, saved in (state.get("stateful_callbacks") or {}).items():
        for entry in saved if isinstance(saved, list) else [saved]:
            if not (isinstance(entry, dict) and all(isinstance(entry.get(key, {}), dict) for key in ("args", "attributes"))):
                raise checkpoint_refused(path, checkpoint, f"`stateful_callbacks.{name}` is {reprlib.repr(entry)}, not "
                                                           "{args: {...}, attributes: {...}}")
    freeze = (state.get("stateful_callbacks") or {}).get("FreezeCallback")
    if isinstance(freeze, dict):  # what callbacks.FreezeCallback reads back: the steps at which stages began
        attributes = freeze.get("attributes", {})
        starts, reasons = attributes.get("stage_starts") or [], attributes.get("reasons") or {}
        if not (isinstance(starts, list) and all(_optional(is_count)(start) for start in starts) and isinstance(reasons, dict)
                and all(str(key).isdigit() and isinstance(reason, str) for key, reason in reasons.items())):
            raise checkpoint_refused(path, checkpoint, f"the freeze plan's saved stages {reprlib.repr(attributes)} are not "
                                                       "steps and reasons by stage")
    return state


def _checked_optimizer_groups(checkpoint: Path, optimizer: torch.optim.Optimizer | None) -> tuple[list[list[int]], dict]:
    """The parameter ids of each saved parameter group, checked against the run's optimizer, and the saved per-parameter
    values (`state`)."""
    path = checkpoint / f"{OPTIMIZER}.json"
    saved = read_checkpoint_json(path, checkpoint)
    groups = saved.get("param_groups")
    if not (isinstance(groups, list) and groups and all(isinstance(group, dict) and isinstance(group.get("params"), list)
                                                        and all(is_count(index) for index in group["params"]) for group in groups)):
        raise checkpoint_refused(path, checkpoint, "`param_groups` is not a list of groups with their parameters' numbers")
    ids = [list(group["params"]) for group in groups]
    flat = [index for group in ids for index in group]
    if len(set(flat)) != len(flat):
        raise checkpoint_refused(path, checkpoint, "a parameter is in two of its `param_groups`")
    if optimizer is not None:
        sizes, expected = [len(group) for group in ids], [len(group["params"]) for group in optimizer.param_groups]
        if sizes != expected:
            raise checkpoint_refused(path, checkpoint, f"its parameter groups hold {reprlib.repr(sizes)} parameters, this run's "
                                                       f"optimizer {reprlib.repr(expected)}: another model or freeze plan")
    state = saved.get("state")
    if not (isinstance(state, dict) and all(str(key).isdigit() and int(key) in set(flat) and isinstance(values, dict)
                                            for key, values in state.items())):
        raise checkpoint_refused(path, checkpoint, "`state` is not a mapping of its parameters' numbers to their values")
    return ids, state


def _checked_scheduler(checkpoint: Path, step: int, groups: int, every_step: bool) -> int:
    """The scheduler's step count, which a schedule stepped every optimizer step holds equal to `global_step`."""
    path = checkpoint / SCHEDULER
    saved = read_checkpoint_json(path, checkpoint)
    scheduled = saved.get("last_epoch")
    if not is_count(scheduled):
        raise checkpoint_refused(path, checkpoint, f"`last_epoch` is {reprlib.repr(scheduled)}, not a step count")
    if "_step_count" in saved and saved["_step_count"] != scheduled + 1:
        raise checkpoint_refused(path, checkpoint, f"`_step_count` {reprlib.repr(saved['_step_count'])} does not follow "
                                                   f"`last_epoch` {scheduled}")
    # Trainer skips the schedule's step only with the optimizer's, when fp16's loss scaler skips one (scaler.json).
    if every_step and (scheduled > step or (scheduled != step and not (checkpoint / SCALER).is_file())):
        raise checkpoint_refused(path, checkpoint, f"the learning-rate schedule is at step {scheduled}, but `global_step` is {step}")
    for name in ("base_lrs", "_last_lr", "lr_lambdas"):
        if name in saved and not (isinstance(saved[name], list) and len(saved[name]) == groups):
            raise checkpoint_refused(path, checkpoint, f"`{name}` does not hold one entry for each of the {groups} parameter groups")
    if any(entry not in (None, {}) for entry in saved.get("lr_lambdas", [])):  # LambdaLR sets these as attributes of its functions
        raise checkpoint_refused(path, checkpoint, f"`lr_lambdas` holds {reprlib.repr(saved['lr_lambdas'])}: attributes for the "
                                                   "schedule's functions, which hold none")
    return scheduled


def _check_optimizer_state(checkpoint: Path, groups: list[list[int]], scalars: dict, optimizer: torch.optim.Optimizer | None,
                           steps: int) -> None:
    """Each parameter's step count at most the schedule's (a parameter frozen for a while has fewer), and tensors shaped
    as their parameters (torch maps saved to current parameters by position); torch loads either without a check."""
    path = checkpoint / f"{OPTIMIZER}.safetensors"
    ids = [index for group in groups for index in group]
    parameters = dict(zip(ids, (parameter for group in optimizer.param_groups for parameter in group["params"]))) if optimizer else {}
    counts = [(index, values["step"], checkpoint / f"{OPTIMIZER}.json") for index, values in scalars.items() if "step" in values]
    try:
        with safe_open(path, "pt") as tensors:
            for key in tensors.keys():
                index, _, name = key.partition(".")
                if not (index.isdigit() and int(index) in ids and name):
                    raise checkpoint_refused(path, checkpoint, f"tensor {reprlib.repr(key)} is not `<parameter number>.<name>` "
                                                               "of one of its parameters")
                shape = tuple(tensors.get_slice(key).get_shape())
                if name == "step":
                    value = tensors.get_tensor(key)
                    counts.append((index, value.item() if value.numel() == 1 else None, path))
                elif name in PARAMETER_SHAPED and int(index) in parameters and shape != tuple(parameters[int(index)].shape):
                    raise checkpoint_refused(path, checkpoint, f"`{key}` has shape {list(shape)}, its parameter "
                                                               f"{list(parameters[int(index)].shape)}: another model")
    except (SafetensorError, OSError) as error:
        raise checkpoint_refused(path, checkpoint, f"unreadable ({reprlib.repr(str(error))})") from None
    for index, value, where in counts:
        if not (_number(value) and float(value).is_integer() and value >= 0):
            raise checkpoint_refused(where, checkpoint, f"parameter {index}'s optimizer step is {reprlib.repr(value)}, not a step count")
        if value > steps:
            raise checkpoint_refused(where, checkpoint, f"parameter {index}'s optimizer state is at step {value:g}, past the "
                                                        f"checkpoint's step {steps}")


def _check_scaler(checkpoint: Path) -> None:
    path = checkpoint / SCALER
    if path.is_file():
        saved = read_checkpoint_json(path, checkpoint)
        if not all(_number(saved.get(key)) for key in _GRAD_SCALER_KEYS) or not saved["scale"] > 0:
            raise checkpoint_refused(path, checkpoint, f"the loss scaler's state needs numbers {', '.join(_GRAD_SCALER_KEYS)} "
                                                       "(a scale > 0)")


def _check_resume_state(checkpoint: Path, stem: str, step: int) -> None:
    """RNG states that the generators accept (tried on fresh ones), and loss tallies that are numbers."""
    path = checkpoint / f"{stem}.safetensors"
    try:
        generators = safetensors.torch.load_file(path)
    except (SafetensorError, OSError) as error:
        raise checkpoint_refused(path, checkpoint, f"unreadable ({reprlib.repr(str(error))})") from None
    if "cpu" not in generators or any(not re.fullmatch(r"cpu|cuda\.\d+", key) for key in generators):
        raise checkpoint_refused(path, checkpoint, f"holds {reprlib.repr(sorted(generators))}, not `cpu` and `cuda.<index>` states")
    for key, tensor in generators.items():
        try:
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise ValueError("not a vector of bytes")
            if key == "cpu":
                torch.Generator().set_state(tensor)
            elif torch.cuda.is_available() and tensor.numel() != torch.cuda.get_rng_state(0).numel():
                raise ValueError(f"{tensor.numel()} bytes, not {torch.cuda.get_rng_state(0).numel()}")
        except (RuntimeError, ValueError, TypeError) as error:
            raise checkpoint_refused(path, checkpoint, f"`{key}` is not a state of torch's random generator "
                                                       f"({reprlib.repr(str(error))})") from None
    path = checkpoint / f"{stem}.json"
    saved = read_checkpoint_json(path, checkpoint)
    python, numpy_state = saved.get("python_random"), saved.get("numpy_random")
    try:
        version, internal, gauss = python
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, OverflowError):
        raise checkpoint_refused(path, checkpoint, f"`python_random` is {reprlib.repr(python)}, not a state of Python's "
                                                   "random generator") from None
    try:
        name, keys, *rest = numpy_state
        if not (isinstance(keys, list) and all(_whole_number(key) and 0 <= key < 2**32 for key in keys)):
            raise ValueError("keys out of range")
        np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), *rest))
    except (TypeError, ValueError, OverflowError, IndexError):
        raise checkpoint_refused(path, checkpoint, f"`numpy_random` is {reprlib.repr(numpy_state)}, not a state of numpy's "
                                                   "random generator") from None
    for key in ("loss_since_last_log", "loss_logged_total"):
        if not _number(saved.get(key)):
            raise checkpoint_refused(path, checkpoint, f"`{key}` is {reprlib.repr(saved.get(key))}, not a number")
    if not (is_count(saved.get("last_logged_step")) and saved["last_logged_step"] <= step):
        raise checkpoint_refused(path, checkpoint, f"`last_logged_step` is {reprlib.repr(saved.get('last_logged_step'))}, not a "
                                                   f"step up to the checkpoint's, {step}")


