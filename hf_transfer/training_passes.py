"""How the training passes ran: their precision, processes and machines, and the batch of each optimizer step, read
back from the trainer and accelerator that ran them (so `accelerate launch --mixed_precision bf16` shows, though the
recipe never says bf16, and a run that fell back to one process says so)."""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import DistributedType, gather_object


def describe_training_passes(trainer) -> dict:
    """For all_results.json (`training_passes`); every process of the run must call it (it counts the machines)."""
    accelerator, args, state = trainer.accelerator, trainer.args, trainer.state
    processes = accelerator.num_processes
    devices = max(1, args.n_gpu)  # GPUs one process drives itself (DataParallel); 1 under DDP, on a CPU or one GPU
    per_process = state.train_batch_size or args.train_batch_size  # what the train dataloader was built with
    return {
        "precision": _precision(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "gradient_scaler": type(accelerator.scaler).__name__ if accelerator.scaler is not None else None,
        "device": accelerator.device.type,
        "processes": processes,
        "machines": _machines(processes),
        "distributed": accelerator.distributed_type.value,
        "devices_per_process": devices,
        "per_device_train_batch_size": per_process // devices,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": per_process * args.gradient_accumulation_steps * processes,
    }


def _precision(accelerator) -> str:
    """In words: Accelerate runs autocast (`native_amp`) only where the device has it, and fp16 with a gradient scaler."""
    mixed = accelerator.mixed_precision
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"{mixed} (DeepSpeed's own mixed precision)" if mixed != "no" else "fp32"
    if mixed == "fp16" and accelerator.scaler is not None:
        return "fp16 autocast with a gradient scaler"
    if mixed in ("fp16", "bf16") and accelerator.native_amp:
        return f"{mixed} autocast"
    if mixed == "fp8":
        return "fp8"
    return "fp32"


def _machines(processes: int) -> int:
    """The machines of the run: one local main process each."""
    if processes == 1:
        return 1
    return sum(gather_object([PartialState().is_local_main_process]))

