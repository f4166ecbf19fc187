"""A checkpoint's own files: what a complete one holds, and the optimizer, schedule, loss scaler, RNG states and loss tallies
written as safetensors + JSON and read back.

Trainer pickles these (`optimizer.pt`, `scheduler.pt`, `scaler.pt`, `rng_state.pth`, `training_args.bin`); here the
tensors go to safetensors and everything else to JSON, so loading a checkpoint can never run code.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from accelerate.utils import gather_object
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .errors import HFTransferError
from .repo_files import write_json

logger = logging.getLogger(__name__)

OPTIMIZER = "optimizer"  # optimizer.safetensors (state tensors) + optimizer.json (param groups, scalars)
SCHEDULER = "scheduler.json"
SCALER = "scaler.json"
TRAINING_ARGS = "training_args.json"
TRAINER_STATE = "trainer_state.json"  # written last by Trainer: a checkpoint without it is incomplete
RESUME_STATE = "resume_state"  # resume_state[_<rank>].safetensors (torch RNG states) + .json (Python/numpy RNG, loss tallies)
# What Trainer writes and, finding it in a checkpoint it resumes from, loads: a pickle (rng_state_<rank>.pth per process).
TRAINER_PICKLES = re.compile(r"optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|training_args\.bin")


class CheckpointError(HFTransferError, RuntimeError):
    """A checkpoint that cannot be resumed from safely; the message says what to do."""


# ---- which checkpoints there are, and which are complete ------------------------------------------------------------

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


def resume_files(processes: int) -> list[str]:
    """The stems of the resume state files: one per process that resumes."""
    return [RESUME_STATE] if processes <= 1 else [f"{RESUME_STATE}_{rank}" for rank in range(processes)]


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
        ranks = sorted(int(name[len(RESUME_STATE) + 1:-len(".json")]) for name in present
                       if re.fullmatch(rf"{RESUME_STATE}_\d+\.json", name))
        processes = ranks[-1] + 1 if ranks else 1
    needed = [*shards, f"{OPTIMIZER}.safetensors", f"{OPTIMIZER}.json", SCHEDULER,
              *(f"{stem}.{suffix}" for stem in resume_files(processes) for suffix in ("safetensors", "json")), TRAINER_STATE]
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


def checkpoint_to_resume(output_dir: str | Path, processes: int) -> Path:
    """What `--resume` continues from: the newest checkpoint complete on every machine (Trainer would take the newest,
    even a half-written one); newer incomplete ones are named in a warning."""
    complete = newest_checkpoint_on_every_process(output_dir, processes)
    if complete is None:
        if last_complete_checkpoint(output_dir, processes) is not None:
            raise CheckpointError(f"`--resume`: no checkpoint is complete in every machine's copy of {output_dir} (this "
                                  "machine's newest complete one is not on another's disk). Copy a complete checkpoint to every "
                                  "machine, or start again with `--overwrite`.")
        raise CheckpointError(no_complete_checkpoint(output_dir, processes))
    for newer in checkpoints(output_dir):
        if newer == complete:
            break
        missing = missing_files(newer, processes)
        logger.warning("%s: resuming from %s", describe_incomplete(newer, missing) if missing else
                       f"{newer} is not complete on every machine", complete)
    return complete


# ---- writing and reading them ---------------------------------------------------------------------------------------

def save_optimizer_and_scheduler(folder: Path, optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
    """The optimizer's state (tensors to safetensors, the rest to JSON), the schedule's and the loss scaler's (JSON)."""
    state_dict, tensors, scalars = optimizer.state_dict(), {}, {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    safetensors.torch.save_file(tensors, folder / f"{OPTIMIZER}.safetensors")
    write_json(folder / f"{OPTIMIZER}.json", {"param_groups": state_dict["param_groups"], "state": scalars}, indent=1)
    write_json(folder / SCHEDULER, scheduler.state_dict(), indent=1)
    if scaler is not None:
        write_json(folder / SCALER, scaler.state_dict(), indent=1)


def load_optimizer_and_scheduler(folder: Path, optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
    saved = json.loads((folder / f"{OPTIMIZER}.json").read_text())
    state = {int(param_id): values for param_id, values in saved["state"].items()}
    for key, tensor in safetensors.torch.load_file(folder / f"{OPTIMIZER}.safetensors", device="cpu").items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    for group, current in zip(saved["param_groups"], optimizer.param_groups):  # JSON has lists where torch had tuples (betas)
        group.update({key: tuple(group[key]) for key, value in current.items() if isinstance(value, tuple)})
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    _match_parameter_layouts(optimizer)
    scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text()))
    if scaler is not None and (folder / SCALER).is_file():
        scaler.load_state_dict(json.loads((folder / SCALER).read_text()))


def rng_states() -> tuple[dict, dict]:
    """This process's RNG states: torch's (tensors) and Python's and numpy's (JSON values)."""
    generators = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        generators.update({f"cuda.{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())})
    numpy_state = np.random.get_state()
    return generators, {"python_random": random.getstate(),
                        "numpy_random": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}


def save_resume_states(folder: Path, states: list[tuple[dict, dict]]) -> None:
    """Every process's (generators, values), one file pair per process: each resumes from its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (generators, values) in zip(resume_files(len(states)), states):
        safetensors.torch.save_file(generators, folder / f"{stem}.safetensors")
        write_json(folder / f"{stem}.json", values, indent=1)


def load_resume_state(folder: Path, stem: str) -> dict:
    """Set this process's RNGs to the saved states; the saved values (loss tallies included)."""
    generators = safetensors.torch.load_file(folder / f"{stem}.safetensors")
    saved = json.loads((folder / f"{stem}.json").read_text())
    torch.random.set_rng_state(generators["cpu"])
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda.{index}" in generators:
            torch.cuda.set_rng_state(generators[f"cuda.{index}"], device=index)
    version, internal, gauss = saved["python_random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = saved["numpy_random"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return saved


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

