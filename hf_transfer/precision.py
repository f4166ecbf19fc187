"""Which precision and memory format frozen passes (feature extraction, evaluation, test, inference) run in on this machine.

`inference_precision: auto` runs every pass that computes no gradient under bf16 autocast where the hardware
computes bf16 natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16 support), and convolutional
backbones in channels_last memory format everywhere, training included (a resumed run gives its optimizer state the same
layout: checkpoints._match_parameter_layouts). Bare `tf_efficientnet_lite0` at 224 px, batch 32, on a
2-core AMD EPYC with AVX512-BF16 shared with other jobs: fp32 21 img/s, channels_last 34, bf16 44, bf16 +
channels_last 71 (medians, benchmarks/results/extraction.md). Training keeps the recipe's own precision (`bf16` / `fp16`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import asdict, dataclass

import torch
from torch import nn

try:
    from .errors import HFTransferError
except ImportError:  # shipped to a Space as hf_transfer_precision.py (hf_transfer/demo.py), where no CLI reads errors
    class HFTransferError(Exception):
        """Stands in for hf_transfer.errors.HFTransferError on a Space."""

logger = logging.getLogger(__name__)

CHOICES = ("auto", "fp32", "bf16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A model counts as convolutional from this many 2-d convolutions: ResNet-18 has 20, ConvNeXt-T 22, Lite0 49; ViT, DeiT
# and Swin have 1 (the patch embedding). channels_last speeds up convolutions and changes no result beyond rounding.
MIN_CONVOLUTIONS = 8


class PrecisionError(HFTransferError, ValueError):
    """An `inference_precision` that is not one of CHOICES."""


@dataclass(frozen=True)
class Precision:
    """What frozen passes run in: `dtype` (bf16, fp16 or fp32 autocast) and channels_last; `reason` says why."""

    option: str  # what the recipe asked for: auto, fp32 or bf16
    dtype: str  # what runs: "bf16", "fp16" (auto on hardware without bf16, training in fp16) or "fp32"
    channels_last: bool
    device: str  # torch device type the decision was made for
    reason: str

    def as_dict(self) -> dict:
        """For `all_results.json`: what `inference_precision` decided, and why, with the line the card prints."""
        return {**asdict(self), "description": self.describe()}

    def describe(self) -> str:
        """One line for the model card and the log."""
        compute = {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "fp32": "fp32"}[self.dtype]
        layout = ", channels_last" if self.channels_last else ""
        return f"{compute}{layout} ({self.reason})"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast of a frozen pass; fp32 turns off any outer autocast (Trainer's `bf16` / `fp16`)."""
        if self.dtype in DTYPES:
            return torch.autocast(self.device, dtype=DTYPES[self.dtype])
        return torch.autocast(self.device, enabled=False)


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` computes bf16 in hardware, with the reason in words."""
    kind = torch.device(device).type
    if kind == "cuda":
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(torch.device(device))
        return supported, f"{name} {'has' if supported else 'has no'} native bf16"
    if kind == "cpu":
        features = [name for name, check in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported),
                                             ("AMX", torch.cpu._is_amx_tile_supported)) if check()]
        return bool(features), f"CPU with {' and '.join(features)}" if features else "CPU without AVX512-BF16 or AMX"
    return False, f"{kind}: bf16 speed not established"  # MPS and others: fp32, the safe default


def channels_last_helps(device: torch.device | str, model: nn.Module) -> bool:
    """channels_last speeds up `model` on `device`: a CNN (see MIN_CONVOLUTIONS; not a transformer with a convolutional
    patch embedding) on a CPU or CUDA GPU."""
    convolutions = sum(isinstance(module, nn.Conv2d) for module in model.modules())
    return torch.device(device).type in ("cpu", "cuda") and convolutions >= MIN_CONVOLUTIONS


def resolve(option: str, device: torch.device | str, model: nn.Module, fp16: bool = False) -> Precision:
    """The precision of frozen passes for `option` on `device`; `fp16`: the run trains in fp16 autocast."""
    if option not in CHOICES:
        raise PrecisionError(f"`inference_precision` must be one of {', '.join(CHOICES)}, not {option!r}.")
    native, hardware = native_bf16(device)
    if option == "bf16":
        if not native:
            logger.warning("inference_precision: bf16 on a %s: bf16 is emulated there and can be slower than fp32.", hardware)
        dtype, reason = "bf16", f"asked for; {hardware}"
    elif option == "fp32":
        dtype, reason = "fp32", "asked for"
    elif native:
        dtype, reason = "bf16", f"auto: {hardware}"
    elif fp16:
        dtype, reason = "fp16", f"auto: {hardware}; the run trains in fp16"
    else:
        dtype, reason = "fp32", f"auto: {hardware}"
    return Precision(option, dtype, channels_last_helps(device, model), torch.device(device).type, reason)


class FrozenPasses:
    """Forward hooks that run `model` in `precision` whenever it is in eval mode with gradients off (Trainer's
    evaluation and prediction, pipelines, feature extraction); training and gradient passes (Grad-CAM) are untouched.

    `head` (the classifier) runs in float32 on float32 inputs: a sliver of the compute, and the logits then equal the
    cached-features head's on the same features. `remove()` takes the hooks off (the memory format stays: it is exact)."""

    def __init__(self, model: nn.Module, precision: Precision, head: nn.Module | None = None):
        self.model, self.precision = model, precision
        self._local = threading.local()  # the open autocast of each thread's pass (a demo serves requests in threads)
        if precision.channels_last:
            model.to(memory_format=torch.channels_last)
        self.handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, always_call=True),  # also when the forward raises
        ]
        if head is not None and precision.dtype != "fp32":
            self.handles += [head.register_forward_pre_hook(self._enter_head, with_kwargs=True),
                             head.register_forward_hook(self._exit_head, always_call=True)]

    @property
    def _open(self) -> list:
        return vars(self._local).setdefault("open", [])

    @property
    def _head_open(self) -> list:
        return vars(self._local).setdefault("head_open", [])

    def _enter(self, module, args, kwargs):
        if module.training or torch.is_grad_enabled():  # not a frozen pass
            self._open.append(None)
            return None
        context = self.precision.autocast()
        context.__enter__()
        self._open.append(context)
        if self.precision.channels_last:
            args = tuple(_channels_last(value) for value in args)
            kwargs = {key: _channels_last(value) for key, value in kwargs.items()}
        return args, kwargs

    def _exit(self, module, args, output):
        context = self._open.pop()
        if context is None:
            return None
        context.__exit__(None, None, None)
        if isinstance(output, torch.Tensor):  # a bare timm model's logits
            return _float32(output)
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dtype != torch.float32:
            output.logits = logits.float()
        return output

    def _enter_head(self, module, args, kwargs):
        active = bool(self._open) and self._open[-1] is not None
        self._head_open.append(torch.autocast(self.precision.device, enabled=False) if active else None)
        if not active:
            return None
        self._head_open[-1].__enter__()
        return tuple(_float32(value) for value in args), {key: _float32(value) for key, value in kwargs.items()}

    def _exit_head(self, module, args, output):
        context = self._head_open.pop()
        if context is not None:
            context.__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> FrozenPasses:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _channels_last(value):
    if isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _float32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def prepare_for_inference(model: nn.Module, option: str = "auto") -> Precision:
    """Run `model` (e.g. a `pipeline`'s `.model`) in the precision `option` decides for its device; returns the decision.

        classifier = pipeline("image-classification", model=...)
        precision = prepare_for_inference(classifier.model)   # bf16 + channels_last on a CPU with AVX512-BF16
    """
    try:
        from .blocks import find_head  # here, not above: options.py reads CHOICES, and `train --help` loads no timm
    except ImportError:  # on a Space, as hf_transfer_precision.py
        from hf_transfer_blocks import find_head

    precision = resolve(option, next(model.parameters()).device, model)
    head = find_head(model)
    FrozenPasses(model, precision, head=head[1] if head else None)
    logger.info("Inference precision: %s", precision.describe())
    return precision
