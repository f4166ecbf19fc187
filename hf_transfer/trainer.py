"""SafeTrainer: Trainer checkpoints made only of safetensors and JSON, that resume exactly and never hold NaN weights.

Trainer pickles the optimizer, scheduler, RNG states and arguments (`*.pt`, `*.pth`, `*.bin`); here the
tensors go to safetensors and everything else to JSON, so loading a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import re
import reprlib
from pathlib import Path

import datasets
import numpy as np
import safetensors.torch
import torch
from accelerate.utils import DistributedType, gather_object
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .errors import HFTransferError
from .models import save_pretrained
from .schedules import STEP, STEP_DEFAULTS, step_schedule

logger = logging.getLogger(__name__)

OPTIMIZER = "optimizer"  # optimizer.safetensors (state tensors) + optimizer.json (param groups, scalars)
SCHEDULER = "scheduler.json"
SCALER = "scaler.json"
TRAINING_ARGS = "training_args.json"
TRAINER_STATE = "trainer_state.json"  # written last by Trainer: a checkpoint without it is incomplete
_REPLICATED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # one process or DDP


class NonFiniteLossError(HFTransferError, RuntimeError):
    """Training diverged; the last good checkpoint is kept."""


class CheckpointError(HFTransferError, RuntimeError):
    """A checkpoint that cannot be resumed from safely; the message says what to do."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint folders in `output_dir`, newest first."""
    found = [path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.name.rsplit("-", 1)[1].isdigit()]
    return sorted((path for path in found if path.is_dir()), key=lambda path: int(path.name.rsplit("-", 1)[1]), reverse=True)


def last_complete_checkpoint(output_dir: str | Path, processes: int | None = None) -> Path | None:
    """The newest checkpoint holding every file a resume reads (a kill or a full disk while saving leaves one that does not)."""
    return next((path for path in checkpoints(output_dir) if not missing_files(path, processes)), None)


def newest_checkpoint_on_every_process(output_dir: str | Path, processes: int) -> Path | None:
    """The newest checkpoint complete in every process's view of `output_dir`: with node-local output folders a kill
    can leave one machine's copy a checkpoint behind, and all processes must resume from the same step."""
    steps = [int(path.name.rsplit("-", 1)[1]) for path in checkpoints(output_dir) if not missing_files(path, processes)]
    if processes > 1:
        steps = sorted(set.intersection(*(set(found) for found in gather_object([steps]))), reverse=True)
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{steps[0]}" if steps else None


def missing_files(checkpoint: Path, processes: int | None = None) -> list[str]:
    """The files a resume reads that `checkpoint` lacks, or holds cut short; [] for a complete checkpoint.

    Each process resumes from its own RNG state: `processes` is how many will resume; None accepts any full set."""
    present = {path.name for path in checkpoint.iterdir()} if checkpoint.is_dir() else set()
    if (checkpoint / SAFE_WEIGHTS_INDEX_NAME).is_file():
        try:
            shards = sorted(set(json.loads((checkpoint / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            shards = [f"{SAFE_WEIGHTS_INDEX_NAME} (unreadable)"]
    else:
        shards = [SAFE_WEIGHTS_NAME]
    if processes is None:
        ranks = sorted(int(name[len("resume_state_"):-len(".json")]) for name in present if re.fullmatch(r"resume_state_\d+\.json", name))
        processes = ranks[-1] + 1 if ranks else 1
    rng_states = ["resume_state"] if processes <= 1 else [f"resume_state_{rank}" for rank in range(processes)]
    needed = [*shards, f"{OPTIMIZER}.safetensors", f"{OPTIMIZER}.json", SCHEDULER, *(f"{stem}.{suffix}" for stem in rng_states
              for suffix in ("safetensors", "json")), TRAINER_STATE]
    missing = []
    for name in needed:
        if name not in present:
            missing.append(name)
        elif not (_whole_safetensors if name.endswith(".safetensors") else _whole_json)(checkpoint / name):
            missing.append(f"{name} (cut short)")
    return missing


def _whole_safetensors(path: Path) -> bool:
    """The header parses and the file is as long as the header says (8-byte length, JSON header, tensor data)."""
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        return path.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def describe_incomplete(checkpoint: Path, missing: list[str], name_only: bool = False) -> str:
    pickled = f"{OPTIMIZER}.safetensors" in missing and (checkpoint / "optimizer.pt").is_file()
    why = " (it holds a pickled optimizer.pt: written by another Trainer, and hf-transfer never loads pickles)" if pickled else ""
    return f"{checkpoint.name if name_only else checkpoint} lacks {', '.join(missing)}{why}"


def no_complete_checkpoint(output_dir: str | Path, processes: int | None = None) -> str:
    """The message for `--resume` when no checkpoint in `output_dir` can be resumed from."""
    found = checkpoints(output_dir)
    if not found:
        return f"`--resume` found no checkpoint in {output_dir}. Run without `--resume` to start fresh."
    details = "; ".join(describe_incomplete(path, missing_files(path, processes), name_only=True) for path in found[:5])
    return (f"`--resume` found no complete checkpoint in {output_dir}: {details}. Restore the missing files, or start again "
            "without `--resume` (and with `--overwrite`, which deletes these checkpoints).")


# ---- a checkpoint's files, checked against each other and against the run before resuming ---------------------------
# They come from disk (another version, a copy, a hand edit), and Trainer and torch load them trusting that they belong
# together: a trainer_state.json at `global_step: 1000000` "resumes" past the run's end and reports success, a malformed
# RNG state ends in a raw ValueError, an `lr_lambdas` entry sets attributes on the schedule's function. Each problem is
# one line naming the file, before Trainer reads any of them (the run's length once Trainer has counted it).
PLATEAU_SCHEDULES = ("reduce_lr_on_plateau", "greedy")  # step once per evaluation, not once per optimizer step
PARAMETER_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # torch's Adam(W)/SGD state, shaped as its parameter


def _whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value) -> bool:
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
    "global_step": (_count, "a whole number >= 0"), "max_steps": (_count, "a whole number >= 0"),
    "logging_steps": (_optional(_number), "a number"), "eval_steps": (_optional(_number), "a number"),
    "save_steps": (_optional(_number), "a number"), "train_batch_size": (_optional(_count), "a whole number or null"),
    "num_train_epochs": (_count, "a whole number >= 0"), "num_input_tokens_seen": (_count, "a whole number >= 0"),
    "total_flos": (_number, "a number"), "log_history": (_kind(list), "a list"),
    "best_metric": (_optional(lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)), "a number or null"),
    "best_global_step": (_optional(_count), "a whole number or null"), "best_model_checkpoint": (_optional(_kind(str)), "a path or null"),
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


def _read_json(path: Path, checkpoint: Path, kind=dict):
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
    state = _checked_trainer_state(checkpoint)
    step = state["global_step"]
    groups, saved = _checked_optimizer_groups(checkpoint, optimizer)
    scheduled = _checked_scheduler(checkpoint, step, len(groups), steps_schedule_every_step)
    _check_optimizer_state(checkpoint, groups, saved, optimizer, scheduled if steps_schedule_every_step else step)
    _check_scaler(checkpoint)
    for stem in (["resume_state"] if processes <= 1 else [f"resume_state_{rank}" for rank in range(processes)]):
        _check_resume_state(checkpoint, stem, step)
    return state


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
    state = _read_json(path, checkpoint)
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
        if not isinstance(entry, dict) or not _optional(_count)(entry.get("step")) or (entry.get("step") or 0) > step:
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
        if not (isinstance(starts, list) and all(_optional(_count)(start) for start in starts) and isinstance(reasons, dict)
                and all(str(key).isdigit() and isinstance(reason, str) for key, reason in reasons.items())):
            raise checkpoint_refused(path, checkpoint, f"the freeze plan's saved stages {reprlib.repr(attributes)} are not "
                                                       "steps and reasons by stage")
    return state


def _checked_optimizer_groups(checkpoint: Path, optimizer: torch.optim.Optimizer | None) -> tuple[list[list[int]], dict]:
    """The parameter ids of each saved parameter group, checked against the run's optimizer, and the saved per-parameter
    values (`state`)."""
    path = checkpoint / f"{OPTIMIZER}.json"
    saved = _read_json(path, checkpoint)
    groups = saved.get("param_groups")
    if not (isinstance(groups, list) and groups and all(isinstance(group, dict) and isinstance(group.get("params"), list)
                                                        and all(_count(index) for index in group["params"]) for group in groups)):
        raise checkpoint_refused(path, checkpoint, "`param_groups` is not a list of groups with their parameters' numbers")
    ids = [[index for index in group["params"]] for group in groups]
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
    saved = _read_json(path, checkpoint)
    scheduled = saved.get("last_epoch")
    if not _count(scheduled):
        raise checkpoint_refused(path, checkpoint, f"`last_epoch` is {reprlib.repr(scheduled)}, not a step count")
    if "_step_count" in saved and saved["_step_count"] != scheduled + 1:
        raise checkpoint_refused(path, checkpoint, f"`_step_count` {reprlib.repr(saved['_step_count'])} does not follow "
                                                   f"`last_epoch` {scheduled}")
    # Trainer skips the schedule's step only with the optimizer's, when fp16's loss scaler skips one (scaler.json).
    skips = (checkpoint / SCALER).is_file()
    if every_step and (scheduled > step or (scheduled != step and not skips)):
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
        saved = _read_json(path, checkpoint)
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
    saved = _read_json(path, checkpoint)
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
    if not (_count(saved.get("last_logged_step")) and saved["last_logged_step"] <= step):
        raise checkpoint_refused(path, checkpoint, f"`last_logged_step` is {reprlib.repr(saved.get('last_logged_step'))}, not a "
                                                   f"step up to the checkpoint's, {step}")


class LogAsAsked(TrainerCallback):
    """Trainer takes `logging_steps` back from a resumed checkpoint's state, so a resumed run would go on logging at the
    old rate: a resumed run may log at another (output_dir.SAME_RUN_CHANGES), and its own arguments set it."""

    def on_train_begin(self, args, state, control, **kwargs):
        asked = TrainerState()
        asked.compute_steps(args, state.max_steps)  # Trainer's own reading of `logging_steps` (a fraction of the run, or steps)
        state.logging_steps = asked.logging_steps


class SeededAugmentation(torch.utils.data.Dataset):
    """The train split, with each image's random augmentation drawn from its own seed (run seed, epoch, row).

    Loading data then never advances the global RNGs, so a resumed run sees the same augmentations and
    the model's own randomness (dropout, drop-path) continues from the checkpoint's RNG state, whatever
    the prefetching or the number of dataloader workers.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with _seeded_rngs(int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])):
            return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)  # CPU only: transforms run on CPU, CUDA RNG stays untouched
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


# Private Trainer methods SafeTrainer overrides, and private attributes it reads or sets: Trainer has no public hook for
# checkpoint file formats, RNG/loss-tally restore, a lazy NaN check or gradient clipping over the optimizer's list.
# Tested with transformers 5.23-5.24 (pyproject.toml bounds it); tests/test_trainer_api.py fails, naming the method,
# when one disappears or changes its parameters.
PRIVATE_OVERRIDES = {
    "_run_epoch": ["self", "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch", "trial",
                   "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained", "steps_trained_in_current_epoch"],
    "_maybe_log_save_evaluate": ["self", "tr_loss", "grad_norm", "model", "trial", "epoch", "ignore_keys_for_eval", "start_time",
                                 "learning_rate"],
    "_clip_grad_norm": ["self", "model"], "_get_grad_norm": ["self", "model", "grad_norm"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"], "_load_best_model": ["self"],
    "_save_checkpoint": ["self", "model", "trial"], "_save": ["self", "output_dir", "state_dict"],
    "_save_optimizer_and_scheduler": ["self", "output_dir"], "_save_scaler": ["self", "output_dir"],
    "_save_rng_state": ["self", "output_dir"], "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_load_scaler": ["self", "checkpoint"], "_load_rng_state": ["self", "checkpoint"],
    "_finalize_training": ["self", "trial", "num_train_samples", "start_time"],
}
PRIVATE_ATTRIBUTES = ("_tr_loss", "_total_loss_scalar", "_globalstep_last_logged", "_created_lr_scheduler")


class SafeTrainer(Trainer):
    """A Trainer whose checkpoints hold only safetensors + JSON, that resumes exactly, stops on NaN/inf, and runs the
    recipe's `step` schedule and per-epoch test scores. It overrides the private methods in PRIVATE_OVERRIDES and uses
    the private attributes in PRIVATE_ATTRIBUTES."""

    def __init__(self, *args, test_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Scored after every evaluation during training (`eval_test_each_epoch`); never used to choose a checkpoint.
        self.test_dataset = test_dataset
        self.steps_per_epoch: int | None = None
        self.reloaded_best: str | None = None  # the checkpoint `load_best_model_at_end` reloaded, once it has
        self._training = False
        persistent_workers = self.args.dataloader_num_workers > 0 and self.args.dataloader_persistent_workers
        # Random augmentations run in the transforms of a `datasets` split; persistent workers never see a new epoch.
        if isinstance(self.train_dataset, datasets.Dataset) and not persistent_workers:
            self.train_dataset = SeededAugmentation(self.train_dataset, self.args.seed)
        self._resumed = False
        self._resuming: tuple[Path, dict] | None = None  # the checkpoint train() resumes from, and its checked trainer state
        self.add_callback(LogAsAsked())
        self._pending_loss: PendingLoss | None = None
        self._parameter_count: tuple[torch.nn.Module, int] | None = None

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:  # Trainer would take the newest checkpoint, even a half-written one
            resume_from_checkpoint = str(self._newest_complete_checkpoint())
        elif resume_from_checkpoint and (missing := missing_files(Path(resume_from_checkpoint), self.args.world_size)):
            raise CheckpointError(f"{describe_incomplete(Path(resume_from_checkpoint), missing)}, so it cannot be resumed from. "
                                  "Restore the missing files, or resume from another checkpoint.")
        self._resuming = None
        if resume_from_checkpoint:  # its files checked before Trainer loads any; its length once the run's is known
            checkpoint = Path(resume_from_checkpoint)
            self._resuming = (checkpoint, self.check_checkpoint(checkpoint))
        self._pending_loss = None
        self._training = True
        try:
            return super().train(resume_from_checkpoint, **kwargs)
        finally:
            self._training = False

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self.steps_per_epoch = values[1]  # num_update_steps_per_epoch, for the `step` schedule
        if self._resuming is not None:  # before Trainer restores its state: a checkpoint past the end would "finish" at once
            check_run_length(*self._resuming, max_steps=values[-1])
        return values

    def check_checkpoint(self, checkpoint: Path) -> dict:
        """Refuse a checkpoint whose files are malformed, disagree with each other or do not fit this run's optimizer
        (`check_checkpoint_files`); its trainer state. Subclasses that save more files check them too."""
        schedule = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        return check_checkpoint_files(checkpoint, self.args.world_size, self.optimizer,
                                      steps_schedule_every_step=schedule not in PLATEAU_SCHEDULES)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedules, plus `step` (lr x gamma every `step_size` epochs, after the warm-up)."""
        if self.lr_scheduler is None and self.args.lr_scheduler_type == STEP:
            kwargs = {**STEP_DEFAULTS, **(self.args.lr_scheduler_kwargs or {})}
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = step_schedule(optimizer or self.optimizer, warmup, self.steps_per_epoch or 1, **kwargs)
            self._created_lr_scheduler = True  # as Trainer.create_scheduler: rebuilt if train() runs again
        return super().create_scheduler(num_training_steps, optimizer)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self._training and self.test_dataset is not None and eval_dataset is None and metric_key_prefix == "eval":
            super().evaluate(self.test_dataset, ignore_keys, metric_key_prefix="test")  # logged beside the epoch's validation
        return metrics

    def _newest_complete_checkpoint(self) -> Path:
        processes = self.args.world_size
        complete = newest_checkpoint_on_every_process(self.args.output_dir, processes)
        if complete is None:
            if last_complete_checkpoint(self.args.output_dir, processes) is not None:
                raise CheckpointError(
                    f"`--resume`: no checkpoint is complete in every machine's copy of {self.args.output_dir} (this machine's "
                    "newest complete one is not on another's disk). Copy a complete checkpoint to every machine, or start "
                    "again with `--overwrite`."
                )
            raise CheckpointError(no_complete_checkpoint(self.args.output_dir, processes))
        for newer in checkpoints(self.args.output_dir):
            if newer == complete:
                break
            missing = missing_files(newer, processes)
            logger.warning("%s: resuming from %s", describe_incomplete(newer, missing) if missing else
                           f"{newer} is not complete on every machine", complete)
        return complete

    def _run_epoch(self, model, epoch, *args, **kwargs):
        if isinstance(self.train_dataset, SeededAugmentation):
            self.train_dataset.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    # ---- stopping on a NaN / inf loss, without a host-device synchronisation per step -------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            # Why one step late: reading this loss now would make the CPU wait for the GPU to finish the
            # forward pass, and the GPU then wait for the CPU, every step. The previous step's loss was
            # copied to the host behind its own forward pass, a backward and an optimizer step ago, so
            # reading it stalls nothing; a diverging run still stops at the next step, before its backward
            # pass, and every log, evaluation and save checks the latest loss first.
            self._raise_if_loss_was_not_finite()
            self._pending_loss = PendingLoss(output[0] if return_outputs else output, self.state.global_step + 1)
        return output

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self.control.should_log or self.control.should_evaluate or self.control.should_save:
            self._raise_if_loss_was_not_finite()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _raise_if_loss_was_not_finite(self) -> None:
        pending, self._pending_loss = self._pending_loss, None
        if pending is not None and not math.isfinite(loss := pending.value()):
            raise NonFiniteLossError(f"Loss became {loss} at step {pending.step}. {self._advice()}")

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate (6 x input size x parameters), with the parameters counted once, not every step."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None or self._parameter_count[0] is not self.model:
            self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._parameter_count[1]

    # Trainer collects the gradients to clip by walking every module of the model each step; the optimizer
    # holds the same ones in a list (frozen parameters have none). DeepSpeed, FSDP and XLA keep Trainer's way.
    def _clip_grad_norm(self, model):
        if self.accelerator.distributed_type not in _REPLICATED:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._optimized_parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.accelerator.distributed_type in _REPLICATED:  # no clipping: the norm, for the log
            grad_norm = self.accelerator.clip_grad_norm_(self._optimized_parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _optimized_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for group in self.optimizer.param_groups for parameter in group["params"]]

    def _advice(self) -> str:
        kept = last_complete_checkpoint(self.args.output_dir)
        return (
            "Lower `learning_rate` (or use `bf16` instead of `fp16`) and start again with `--overwrite`; "
            + (f"the last good checkpoint, {kept}, is kept." if kept else "no checkpoint had been saved yet.")
        )

    # ---- loading weights ---------------------------------------------------------------------
    # Trainer reloads with load_state_dict(strict=False) on the names save_pretrained writes, which
    # for some architectures (ViT in transformers 5) are legacy names: those layers would silently
    # keep their last-epoch values. from_pretrained maps the names, so reload through it.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model_to_save()
        if not isinstance(model, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self.model_to_save()
        if not isinstance(model, PreTrainedModel):
            super()._load_best_model()
            self.reloaded_best = self.state.best_model_checkpoint
            return
        logger.info("Loading the best model from %s (%s).", self.state.best_model_checkpoint, self.state.best_metric)
        load_weights(model, self.state.best_model_checkpoint)
        self.reloaded_best = self.state.best_model_checkpoint

    # ---- saving --------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        # --resume would continue from whatever is saved, so a NaN or inf weight must never get there.
        if not all(torch.isfinite(tensor).all() for tensor in model.state_dict().values()):
            raise NonFiniteLossError(f"Weights became NaN or inf at step {self.state.global_step}, so they were not saved. {self._advice()}")
        super()._save_checkpoint(model, trial)

    def model_to_save(self) -> torch.nn.Module:
        """The model that checkpoints hold, and that resuming and best-model reloading load into."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Model, processor and arguments; the arguments as JSON (tokens masked), not `training_args.bin`."""
        if not self.args.should_save:
            return
        output = Path(output_dir or self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        model = self.model_to_save()
        if isinstance(model, PreTrainedModel):
            save_pretrained(model, output, state_dict=state_dict)  # also on a machine's main process (save_on_each_node)
        else:
            model.save_pretrained(output, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output)
        (output / TRAINING_ARGS).write_text(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        _save_tensors_and_json(self.optimizer.state_dict(), Path(output_dir) / OPTIMIZER)
        _write_json(Path(output_dir) / SCHEDULER, self.lr_scheduler.state_dict())

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            _write_json(Path(output_dir) / SCALER, scaler.state_dict())

    def _save_rng_state(self, output_dir: str) -> None:
        """RNG states and the loss not yet logged, per process: what an exact continuation needs.

        Every process's, gathered over torch.distributed and written by each process that saves, so every copy of
        the checkpoint (one per machine with node-local output folders) holds every process's state."""
        generators = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            generators.update({f"cuda.{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())})
        numpy_state = np.random.get_state()
        state = (generators, {
            "python_random": random.getstate(),
            "numpy_random": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "loss_since_last_log": self._tr_loss.item(),
            "loss_logged_total": self._total_loss_scalar,
            "last_logged_step": self._globalstep_last_logged,
        })
        states = gather_object([state]) if self.args.world_size > 1 else [state]
        if not self.args.should_save:
            return
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        for rank, (generators, values) in enumerate(states):
            safetensors.torch.save_file(generators, output / f"{self._resume_file(rank)}.safetensors")
            _write_json(output / f"{self._resume_file(rank)}.json", values)

    def _resume_file(self, rank: int | None = None) -> str:
        return "resume_state" if self.args.world_size <= 1 else f"resume_state_{self.args.process_index if rank is None else rank}"

    # ---- resuming ------------------------------------------------------------------------------
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        if not (folder / f"{OPTIMIZER}.safetensors").is_file() and (folder / "optimizer.pt").is_file():
            raise CheckpointError(
                f"{folder} has no {OPTIMIZER}.safetensors: it was not written by hf-transfer, which never loads "
                "pickled optimizer states (optimizer.pt). Start again with `--overwrite`."
            )
        state = _load_tensors_and_json(folder / OPTIMIZER, "cpu")
        for saved, current in zip(state["param_groups"], self.optimizer.param_groups):
            saved.update({key: tuple(saved[key]) for key, value in current.items() if isinstance(value, tuple)})
        self.optimizer.load_state_dict(state)
        _match_parameter_layouts(self.optimizer)
        self.lr_scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text()))

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / SCALER).is_file():
            scaler.load_state_dict(json.loads((Path(checkpoint) / SCALER).read_text()))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Trainer calls this right before the first step after the checkpoint."""
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        generators = safetensors.torch.load_file(folder / f"{self._resume_file()}.safetensors")
        saved = json.loads((folder / f"{self._resume_file()}.json").read_text())
        torch.random.set_rng_state(generators["cpu"])
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"cuda.{index}" in generators:
                torch.cuda.set_rng_state(generators[f"cuda.{index}"], device=index)
        version, internal, gauss = saved["python_random"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, *rest = saved["numpy_random"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        # The loss tallies as they stood, so logged losses and train_loss match an uninterrupted run.
        self._tr_loss = torch.tensor(saved["loss_since_last_log"], device=self.args.device)
        self._total_loss_scalar = saved["loss_logged_total"]
        self._globalstep_last_logged = saved["last_logged_step"]
        self._resumed = True

    def _finalize_training(self, trial, num_train_samples, start_time):
        self._raise_if_loss_was_not_finite()  # the last step's, when nothing logged or saved after it
        output = super()._finalize_training(trial, num_train_samples, start_time)
        if not self._resumed:
            return output
        # Trainer divides by the steps of this call only; the restored loss total covers the whole run.
        train_loss = self._total_loss_scalar / max(self.state.global_step, 1)
        output.metrics["train_loss"] = train_loss
        if self.state.log_history and "train_loss" in self.state.log_history[-1]:
            self.state.log_history[-1]["train_loss"] = train_loss
        return output._replace(training_loss=train_loss)


class PendingLoss:
    """A training step's loss on its way to the host. On CUDA it is copied into pinned memory behind the
    step's kernels, and the event says when it has landed; on the CPU there is nothing to wait for (other
    devices read it where it is, when asked: a step late, so their wait is short)."""

    def __init__(self, loss: torch.Tensor, step: int):
        self.step, self.copied = step, None
        loss = loss.detach()
        if loss.is_cuda:
            loss = loss.to("cpu", non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        self.loss = loss

    def value(self) -> float:
        if self.copied is not None:
            self.copied.synchronize()
        return self.loss.float().mean().item()  # the mean: one value per GPU under DataParallel


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimizer state tensor its parameter's memory format (channels_last for a CNN's weights): the
    update's kernels take another code path, with other rounding, when the two layouts differ, so a resumed run would
    drift from the uninterrupted one (weights 1e-2 apart after 5 Adam steps of test_efficientnet)."""
    for parameter, values in optimizer.state.items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.stride() != parameter.stride():
                values[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def load_weights(model: PreTrainedModel, checkpoint: str) -> None:
    saved = type(model).from_pretrained(checkpoint, config=model.config)
    model.load_state_dict(saved.state_dict(), strict=True)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1))


def _save_tensors_and_json(state_dict: dict, stem: Path) -> None:
    """An optimizer state dict: tensors to `<stem>.safetensors`, everything else to `<stem>.json`."""
    tensors, scalars = {}, {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    safetensors.torch.save_file(tensors, f"{stem}.safetensors")
    _write_json(Path(f"{stem}.json"), {"param_groups": state_dict["param_groups"], "state": scalars})


def _load_tensors_and_json(stem: Path, device: str) -> dict:
    saved = json.loads(Path(f"{stem}.json").read_text())
    state = {int(param_id): values for param_id, values in saved["state"].items()}
    for key, tensor in safetensors.torch.load_file(f"{stem}.safetensors", device=device).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    return {"state": state, "param_groups": saved["param_groups"]}
