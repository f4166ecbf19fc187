"""Progressive resizing (fastai's habit): the first epochs train on smaller images, the last ones at the run's input size.

The preprocessing is unchanged: each training batch is resized down on the training device, with antialiasing, just
before the model's forward pass. Evaluation, test, feature extraction and the saved model use the full input size.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.nn import functional as F
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .checkpoints import CheckpointError
from .errors import RecipeError

logger = logging.getLogger(__name__)


def check_schedule(model: torch.nn.Module, sizes: list[int], input_size: tuple[int, int]) -> None:
    """Refuse a schedule whose sizes exceed the model's `input_size` (height, width), or that the model cannot take (a
    fixed position embedding): one image at the smallest size goes through the model, without gradients."""
    largest = min(input_size)
    if max(sizes) > largest:
        raise RecipeError(f"`image_size_schedule: {sizes}` goes above the run's input size ({largest} px): progressive resizing "
                          f"trains the first epochs on smaller images. Use sizes of at most {largest}, or raise `image_size`.")
    parameter = next(model.parameters())
    probe = torch.zeros(1, 3, min(sizes), min(sizes), device=parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values=probe)
    except Exception as error:  # noqa: BLE001 - whatever the model raises, the schedule cannot apply to it
        raise RecipeError(f"`image_size_schedule`: {type(model).__name__} cannot take {min(sizes)} x {min(sizes)} images "
                          f"({str(error).splitlines()[0][:200]}). Leave `image_size_schedule` unset.") from None
    finally:
        model.train(was_training)


class ProgressiveResize(TrainerCallback, ExportableState):
    """Resizes every training batch of epoch e (counted from 1) to `sizes[e - 1]` px square while the schedule lasts, and
    records the size the model saw in each epoch (`trained`, kept in checkpoints so a resumed run reports every epoch)."""

    def __init__(self, sizes: list[int]):
        self.sizes = list(sizes)
        self.trained: dict[str, list[int]] = {}  # epoch ("1", "2", ...) -> [height, width] of the training batches
        self._epoch = 1
        self._handle = None

    def state(self) -> dict:
        return {"args": {"sizes": self.sizes}, "attributes": {"trained": self.trained}}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):  # a resumed run: the epochs before the checkpoint
            self.trained = _checked_record(saved.get("attributes", {}).get("trained") or {})
        self._handle = model.register_forward_pre_hook(self._resize, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        # Trainer sets `state.epoch` to epoch + (step + 1) / steps_in_epoch after each step: e exactly as epoch e + 1 begins.
        self._epoch = math.floor(state.epoch + 1e-6) + 1

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _resize(self, module, args, kwargs):
        if not module.training:
            return None
        pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        if self._epoch <= len(self.sizes):
            size = self.sizes[self._epoch - 1]
            if tuple(pixels.shape[-2:]) != (size, size):
                channels_last = pixels.dim() == 4 and pixels.is_contiguous(memory_format=torch.channels_last)
                pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                if channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                if "pixel_values" in kwargs:
                    kwargs["pixel_values"] = pixels
                else:
                    args = (pixels, *args[1:])
        if str(self._epoch) not in self.trained:
            self.trained[str(self._epoch)] = list(pixels.shape[-2:])
            logger.info("Progressive resizing: epoch %d trains on %d x %d images.", self._epoch, *pixels.shape[-2:])
        return args, kwargs


def _checked_record(record) -> dict[str, list[int]]:
    """A checkpoint's record of the sizes trained (a file from disk): epoch numbers to [height, width], else refused."""
    try:
        checked = {str(int(epoch)): [int(height), int(width)] for epoch, (height, width) in record.items()}
        if all(int(epoch) >= 1 and min(size) >= 1 for epoch, size in checked.items()):
            return checked
    except (AttributeError, TypeError, ValueError):
        pass
    raise CheckpointError("The checkpoint's trainer_state.json holds a malformed `ProgressiveResize` record of the image "
                          "sizes trained; resume from another checkpoint or start the run again.")


def describe_sizes(trained: dict[str, list[int]]) -> list[dict]:
    """Consecutive epochs at one size, for all_results.json and the card: [{"epochs": [1, 2], "size": [96, 96]}, ...]."""
    runs: list[dict] = []
    for epoch, size in sorted(((int(epoch), size) for epoch, size in trained.items())):
        if runs and runs[-1]["size"] == size and runs[-1]["epochs"][1] == epoch - 1:
            runs[-1]["epochs"][1] = epoch
        else:
            runs.append({"epochs": [epoch, epoch], "size": size})
    return runs
