"""What the processes of a run that may span several machines settle over torch.distributed, never through a disk:
which process writes each folder, shared yes/no answers, and gathered tensors.

A run on N machines (`accelerate launch --num_machines N`) names one path for its output folder and its datasets cache;
on each machine that path is either node-local disk or a shared filesystem, and nothing in the path says which. Each
machine's main process drops a probe file there; the probes a machine sees are the machines it shares the folder with,
and the lowest rank among them writes that copy: one writer per copy, never two on one copy.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather, gather_object

from .errors import HFTransferError

PROBE = ".hf_transfer_probe"
# Rows gathered per collective call: a device buffer of about 64 MiB per process (1.3 GB of ImageNet features at once
# would not fit beside a model on every GPU).
GATHER_BYTES = 64 * 2**20


class MachinesError(HFTransferError, RuntimeError):
    """The machines of a multi-machine run disagree on a folder, or an option contradicts how they share it."""


@dataclass(frozen=True)
class Placement:
    """How the run's machines see one folder."""

    writer: bool  # this process writes the copy of the folder that it sees
    machines: int  # machines in the run (one main process each)
    copies: int  # separate copies of the folder among them: 1 when shared by all, `machines` when node-local

    @property
    def node_local(self) -> bool:
        return self.machines > 1 and self.copies == self.machines


def placement(folder: Path) -> Placement:
    """How `folder` is placed across the run's machines; every process of the run must call this, in the same order."""
    state = PartialState()
    if state.num_processes == 1:
        return Placement(writer=True, machines=1, copies=1)
    token = broadcast_object_list([uuid.uuid4().hex])[0]  # the main process's: stale probes of a killed run never count
    place = next(path for path in (folder, *folder.parents) if path.is_dir())  # the folder's disk, before it exists
    probe = place / f"{PROBE}-{token}-{state.process_index}"
    seen: list[int] = []
    if state.is_local_main_process:
        try:
            probe.touch()
        except OSError:  # a folder this process cannot write: writing the real files there will say so
            pass
    state.wait_for_everyone()
    if state.is_local_main_process:
        seen = sorted(int(path.name.rsplit("-", 1)[1]) for path in place.glob(f"{PROBE}-{token}-*")) or [state.process_index]
        state.wait_for_everyone()
        probe.unlink(missing_ok=True)
    else:
        state.wait_for_everyone()
    groups = [group for group in gather_object([seen]) if group]  # one per machine; after every probe is gone
    return Placement(writer=bool(seen) and seen[0] == state.process_index, machines=len(groups),
                     copies=len({tuple(group) for group in groups}))


def output_is_node_local(output_dir: Path, save_on_each_node: bool) -> bool:
    """Whether each machine keeps its own copy of the output folder (TrainingArguments.save_on_each_node).

    Detected; `save_on_each_node: true` in a recipe only asserts it, and is refused where the folder is shared."""
    where = placement(output_dir)
    if where.machines <= 1:
        return save_on_each_node
    if where.copies == 1 and save_on_each_node:
        raise MachinesError(
            f"`save_on_each_node: true`, but {output_dir} is one folder shared by all {where.machines} machines: each "
            "machine's main process would write the same checkpoints and model at once. Remove `save_on_each_node` "
            "(hf-transfer detects a shared or node-local `output_dir`), or give an `output_dir` on node-local disk."
        )
    if not where.node_local and where.copies != 1:
        raise MachinesError(
            f"{output_dir} is shared by some of the {where.machines} machines but not all ({where.copies} separate copies): "
            "give an `output_dir` that is either on every machine's own disk or on one filesystem all of them share."
        )
    return where.node_local


def raise_together(check, *args) -> None:
    """Run `check(*args)` on every process; if it fails on any, raise the first failure on all of them.

    Each machine checks its own disk (node-local folders can differ): a check that failed on one machine alone would
    leave the others waiting for it at their next collective step."""
    try:
        check(*args)
        failure = None
    except HFTransferError as error:
        failure = error
    if PartialState().num_processes > 1:
        failure = next((error for error in gather_object([failure]) if error is not None), None)
    if failure is not None:
        raise failure


def on_every_process(flag: bool) -> bool:
    """True when `flag` is true on every process (each may read its own machine's disk)."""
    if PartialState().num_processes == 1:
        return flag
    return all(gather_object([bool(flag)]))


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's `rows` (CPU, any length), concatenated in rank order, on every process."""
    state = PartialState()
    if state.num_processes == 1:
        return rows
    lengths = gather(torch.tensor([len(rows)], device=state.device)).tolist()
    longest, shape = max(lengths), rows.shape[1:]
    padded = rows.new_zeros((longest, *shape))  # collectives need one size on every process
    padded[: len(rows)] = rows
    step = max(1, GATHER_BYTES // max(1, padded[:1].numel() * padded.element_size()))
    blocks = [gather(padded[start:start + step].to(state.device)).cpu().view(state.num_processes, -1, *shape)
              for start in range(0, longest, step)]
    joined = torch.cat(blocks, dim=1) if blocks else padded.new_zeros((state.num_processes, 0, *shape))
    return torch.cat([joined[rank, :length] for rank, length in enumerate(lengths)])
