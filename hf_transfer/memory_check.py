"""Refuse an `image_size` that cannot train here before any data is read: the memory its passes need, from the model built on
the meta device."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .blocks import discover_blocks
from .models import ModelNotAvailableError, data_config, hub_model_id, label_maps, random_init

logger = logging.getLogger(__name__)

# The largest `image_size` accepted, whatever the memory: 4 x the largest input of any pretrained timm model (1024 px, the
# SAM and Sapiens ViTs), 16 x its pixels. An 8192 px run crashed (a segfault in the convolutions, after a minute).
MAX_IMAGE_SIZE = 4096


def check_image_size(recipe, device, available: int | None = None) -> None:
    """Refuse an `image_size` beyond MAX_IMAGE_SIZE, or whose passes cannot fit in the `available` bytes of `device`
    (default: what is free there now), naming the largest size that fits.

    The need is a lower bound, from the architecture built on the meta device (no memory, no weights read) at its own
    input size: weights, gradients of what the freeze plan trains, and per image the activations a training step keeps
    for its backward pass (or the largest layer of a pass without gradients: evaluation, a frozen backbone), scaled by
    the area to `image_size` (convolutions and patch tokens grow with it; attention faster)."""
    size = recipe.model.image_size
    if not size:
        return
    need = _memory_at(recipe)  # None when the architecture does not run on the meta device: only the bound applies
    if need is not None and available is None:
        available = _available_memory(torch.device(device))

    def fits(side: int) -> bool:
        return side <= MAX_IMAGE_SIZE and (need is None or need(side) <= available)

    if fits(size):
        return
    largest = next((side for side in range(min(size, MAX_IMAGE_SIZE) // 32 * 32, 31, -32) if fits(side)), None)
    where = "the GPU's free memory" if torch.device(device).type == "cuda" else "the free memory (RAM)"
    if size > MAX_IMAGE_SIZE:
        why = f"is over {MAX_IMAGE_SIZE} px, 4 x the largest input pretrained image models take (1024 px)"
    else:
        why = (f"needs at least {need(size) / 2**30:.1f} GiB for batches of {need.batch} at {size} x {size} px (the model's "
               f"own size is {need.native} px), more than {where} ({available / 2**30:.1f} GiB)")
    if largest is None:
        fix = f"No size from 32 px fits in {where}: pick a smaller model or free memory."
    elif need is not None and not need(min(size, MAX_IMAGE_SIZE)) <= available:
        fix = f"Set `image_size` to at most {largest} (what {where} holds for batches of {need.batch}), or lower `{need.option}`."
    else:
        fix = f"Set `image_size` to at most {largest}."
    raise ModelNotAvailableError(f"`image_size: {size}` {why}. {fix}")


@dataclass
class _Need:
    """Bytes a run needs at `image_size` s: `fixed` + `per_area` x (s / native)^2, the most in batches of `batch` (`option`)."""

    fixed: float
    per_area: float
    native: int
    option: str
    batch: int

    def __call__(self, size: int) -> float:
        return self.fixed + self.per_area * (size / self.native) ** 2


def _memory_at(recipe) -> _Need | None:
    args = recipe.model
    model_id = args.model if Path(args.model).is_dir() else hub_model_id(args.model)
    with torch.device("meta"):  # shapes only: nothing is allocated, no weights are read
        # Two labels: the head's size barely counts, and the labels are not known before the dataset is read.
        model, image_processor = random_init(model_id, label_maps(["0", "1"]), args.drop_rate, args.model_revision, args.trust_remote_code)
    native = data_config(model, image_processor)["input_size"][1]
    parameters = dict(model.named_parameters())
    trained = set().union(*(_trained_in(stage["train"], model, parameters) for stage in recipe.freezing.schedule))
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in trained)
    try:
        kept, largest = _activations(model, native)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:  # an operation with no meta kernel
        logger.info("image_size: no memory estimate for %s (%s); only the %d px bound applies.", type(model).__name__, error,
                    MAX_IMAGE_SIZE)
        return None
    weights = sum(p.numel() * p.element_size() for p in parameters.values())
    gradients = sum(parameters[name].numel() * parameters[name].element_size() for name in trained)
    half = 0.5  # bf16/fp16 values are half as large (autocast keeps some fp32: still a lower bound)
    passes = {  # option: bytes per area of a batch
        "per_device_train_batch_size": max(kept, largest) * (half if recipe.training.bf16 or recipe.training.fp16 else 1),
        "per_device_eval_batch_size": largest * (1 if recipe.run.inference_precision == "fp32" else half),
    }
    option = max(passes, key=lambda name: getattr(recipe.training, name) * passes[name])
    batch = getattr(recipe.training, option)
    return _Need(weights + gradients, batch * passes[option], native, option, batch)


def _trained_in(target: str, model: nn.Module, parameters: dict) -> set[str]:
    """The parameters a stage's `train` target trains, as FreezePlan resolves head | all | last_n:<k> (FreezePlan itself
    hooks and checksums the weights, which a meta model has none of); `patterns` counts as the head: a lower bound."""
    blocks = discover_blocks(model)
    head = set(blocks[-1].parameter_names)
    if target == "all":
        return set(parameters)
    if target.startswith("last_n:"):
        count = int(target.split(":", 1)[1])
        return head.union(*(block.parameter_names for block in blocks[:-1][-count:] if count))
    return head


def _activations(model: nn.Module, size: int) -> tuple[int, int]:
    """Bytes per image at `size` px: what a training step keeps for its backward pass (autograd's saved tensors, less the
    weights), and the largest input + output of one layer in a pass without gradients."""
    weights = {id(parameter) for parameter in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor):
        if id(tensor) not in weights:
            kept[id(tensor)] = tensor.numel() * tensor.element_size()  # by tensor: one saved by two layers counts once
        return tensor

    pixels = torch.zeros(1, 3, size, size, device="meta")
    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(pixel_values=pixels)
    layers = []

    def measure(module, inputs, output):
        tensors = [t for t in (*inputs, *(output if isinstance(output, (tuple, list)) else [output])) if torch.is_tensor(t)]
        layers.append(sum(t.numel() * t.element_size() for t in tensors))

    hooks = [module.register_forward_hook(measure) for module in model.modules() if not next(module.children(), None)]
    try:
        with torch.no_grad():
            model.eval()(pixel_values=pixels)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return sum(kept.values()), max(layers, default=0)


def _available_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device, or free RAM shared by this machine's processes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # installed with accelerate

    return psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
