"""The files of the model repo a run writes, each named once, and `RunFiles`, which reads them back."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

CONFIG = CONFIG_NAME  # config.json, with the label names: written by save_pretrained, published last
WEIGHTS = SAFE_WEIGHTS_NAME  # model.safetensors (timm's own key names for timm backbones)
PREPROCESSOR = "preprocessor_config.json"
MODEL_CARD = "README.md"
ALL_RESULTS = "all_results.json"
TEST_REPORT = "test_report.json"
TRAINER_STATE = "trainer_state.json"
FREEZE_PLAN = "freeze_plan.json"
RUN_CONFIG = "run_config.json"  # the resolved recipe by section; also marks the folder as a run's
RECIPE = "recipe.yaml"  # the same, as a recipe that reproduces the run
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
EXPLANATIONS_PNG = "explanations.png"
DATA_REPORT = "data_report.json"  # the data doctor's findings
DATA_SUSPECTS_PNG = "data_suspects.png"  # its contact sheet of the top suspects
# `hf-transfer select`: its report, its plot, and the recipe of the chosen backbone; a run trained from that recipe carries
# a copy of the report (its leaderboard, no local paths) into its model repo, for the card's "Why this backbone".
SELECTION = "selection.json"
SELECTION_MD = "selection.md"
SELECTION_PNG = "selection.png"
SELECTED_RECIPE = "recipe.selected.yaml"
STAGING = ".partial"  # the next model, assembled here and moved in
LOCK_FILE = ".hf_transfer.lock"  # the running run's flock
# `hf-transfer export`: the graphs where the Hugging Face ecosystem looks for them (Transformers.js, optimum's `subfolder`).
ONNX_DIR = "onnx"  # a run's folder, like checkpoints: `--overwrite` deletes it, a newly published model removes it
ONNX_MODEL = f"{ONNX_DIR}/model.onnx"  # fp32: preprocessed pixels in (`pixel_values`), `logits` out, any batch size
ONNX_INT8_MODEL = f"{ONNX_DIR}/model_quantized.onnx"  # int8, by onnxruntime's quantizer
EXPORT_REPORT = f"{ONNX_DIR}/export_report.json"  # the equivalence check and latency of each graph, and the weights it was made from
# The model itself, as `pipeline("image-classification")` loads it (with the sharded-weights names save_pretrained may use).
MODEL_FILES = (CONFIG, WEIGHTS, "model-*-of-*.safetensors", f"{WEIGHTS}.index.json", PREPROCESSOR)
# Every file a run writes: `--overwrite` deletes these only.
RUN_OUTPUTS = (*MODEL_FILES, MODEL_CARD, ALL_RESULTS, TEST_REPORT, TRAINER_STATE, FREEZE_PLAN, RUN_CONFIG, RECIPE, CURVES_PNG,
               CONFUSION_PNG, EXPLANATIONS_PNG, DATA_REPORT, DATA_SUSPECTS_PNG, SELECTION, LOCK_FILE)


def shareable_path(value: str, start: str | os.PathLike | None = None) -> str:
    """A local path as the model repo may name it (its files are published): an absolute one relative to `start` (the
    working directory), so that a recipe reproduces from there, or only its base name when the two share no folder but
    the root (`../../home/ana/pets` would spell out `/home/ana/pets`); a relative path or a Hub id stays as given."""
    if not isinstance(value, str) or not value or not Path(value).expanduser().is_absolute():
        return value
    absolute, start = os.path.abspath(Path(value).expanduser()), os.path.abspath(start or os.getcwd())
    shared = os.path.commonpath([absolute, start])
    if os.path.dirname(shared) == shared and start != shared:  # only the filesystem root in common
        return Path(absolute).name or value
    return Path(os.path.relpath(absolute, start)).as_posix()


def without_local_paths(values):
    """`values` (a run config: sections of options) with every absolute path made `shareable_path`."""
    if isinstance(values, dict):
        return {key: without_local_paths(value) for key, value in values.items()}
    if isinstance(values, (list, tuple)):
        return [without_local_paths(value) for value in values]
    return shareable_path(values)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _is_hub_id(value: str) -> bool:
    """`user/name` or a legacy `name`, as opposed to a local path (which the run may record relative)."""
    return value.count("/") <= 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()


class RunFiles:
    """The files a training run leaves in its output dir, read once (the card, the demo and push read them)."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.location = self.dir.resolve()  # the folder users load the model from; write_model_card may name another
        self.config = _read_json(self.dir / CONFIG)
        self.results = _read_json(self.dir / ALL_RESULTS)
        if self.config is None or self.results is None:
            raise FileNotFoundError(f"{self.dir} is not a finished training output dir: config.json and all_results.json are required "
                                    "(run `hf-transfer train ...` first).")
        self.state = _read_json(self.dir / TRAINER_STATE) or {}
        self.freeze_plan = _read_json(self.dir / FREEZE_PLAN)
        self.report = _read_json(self.dir / TEST_REPORT)
        self.run_config = _read_json(self.dir / RUN_CONFIG) or {}
        self.preprocessor = _read_json(self.dir / PREPROCESSOR)
        self.data_report = _read_json(self.dir / DATA_REPORT)  # None unless the run checked its data
        self.export_report = _read_json(self.dir / EXPORT_REPORT)  # None until `hf-transfer export`
        self.selection = _read_json(self.dir / SELECTION)  # None unless the run trained a recipe `hf-transfer select` wrote

    @property
    def labels(self) -> list[str]:
        if self.config.get("label_names"):  # timm layout
            return list(self.config["label_names"])
        id2label = self.config.get("id2label", {})
        return [id2label[key] for key in sorted(id2label, key=int)]

    @property
    def is_timm(self) -> bool:
        return self.config.get("model_type") == "timm_wrapper" or "architecture" in self.config

    @property
    def timm_loadable(self) -> bool:
        """timm.create_model('hf-hub:...') needs timm's own key names and no null model_args."""
        weights = self.dir / WEIGHTS
        null_model_args = "model_args" in self.config and self.config["model_args"] is None
        if not (self.is_timm and weights.is_file()) or null_model_args:
            return False
        with safe_open(weights, "pt") as tensors:
            return not any(key.startswith("timm_model.") for key in tensors.keys())

    @property
    def architecture(self) -> str:
        return self.config.get("architecture") or ", ".join(self.config.get("architectures", [])) or "unknown"

    @property
    def base_model(self) -> str | None:
        """A Hub id the weights started from; None for a random init or a local folder."""
        model_args = self.run_config.get("model", {})
        if model_args.get("pretrained") is False:
            return None
        requested = str(model_args.get("model") or "")
        if "/" in requested and _is_hub_id(requested):
            return requested
        return (self.config.get("pretrained_cfg") or {}).get("hf_hub_id")  # bare timm names resolve here

    @property
    def license(self) -> str | None:
        return (self.config.get("pretrained_cfg") or {}).get("license")

    @property
    def dataset(self) -> tuple[str, bool]:
        """(identifier, is a Hub id) of the training data; a local folder is named by its base name."""
        recorded = self.results.get("dataset") if isinstance(self.results, dict) else None
        if isinstance(recorded, dict) and recorded.get("name"):  # as the run found it (a run before it recorded this: guessed)
            return (recorded["name"], True) if recorded.get("on_hub") else (Path(recorded["name"]).name, False)
        requested = str(self.run_config.get("data", {}).get("dataset") or "")
        if not requested:
            return "unknown", False
        return (requested, True) if _is_hub_id(requested) else (Path(requested).name, False)

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.is_timm:
            size = (self.config.get("pretrained_cfg") or {}).get("input_size")
            return (size[1], size[2]) if size else None
        size = (self.preprocessor or {}).get("crop_size") if (self.preprocessor or {}).get("do_center_crop") else None
        size = size or (self.preprocessor or {}).get("size") or {}
        if "height" in size:
            return size["height"], size["width"]
        edge = size.get("shortest_edge")
        return (edge, edge) if edge else None


def write_json(path: Path, value, indent: int = 2) -> None:
    """`value` as JSON: numpy numbers as numbers, any other value JSON has no type for as its text."""
    path.write_text(json.dumps(value, indent=indent, default=_json_value))


def _json_value(value):
    item = getattr(value, "item", None)  # numpy scalars
    return item() if callable(item) and getattr(value, "shape", None) == () else str(value)
