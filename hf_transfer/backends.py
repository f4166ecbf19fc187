"""The model folder `export` and `predict` read, and the classifiers they run on it behind one interface (preprocessed pixels
in, logits out): the PyTorch model in a chosen precision, or a checked onnxruntime graph; and the speed of each."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from .errors import HFTransferError
from .onnx_runtime import GRAPHS, OnnxClassifier, checked_graph
from .precision import prepare_for_inference
from .repo_files import CONFIG, EXPORT_REPORT, PREPROCESSOR, WEIGHTS

# `--backend` -> the export report's name of the graph it runs.
GRAPH_OF_BACKEND = {"onnx": "fp32", "onnx-int8": "int8"}
MODEL_HINT = ("Give a model folder (`hf-transfer train` writes config.json, model.safetensors and preprocessor_config.json "
              "there) or a Hub model id (user/name).")


class ModelFolderError(HFTransferError):
    """A model folder or Hub id that cannot be served; the message says what to give instead."""


@dataclass
class ModelFolder:
    """A local model folder: the user's own, or a Hub snapshot whose files link into `links_into` (the Hub cache's blobs)."""

    path: Path
    name: str  # as messages and the output name it: the folder's base name or the Hub id
    links_into: Path | None = None

    @classmethod
    def resolve(cls, model: str, backend: str = "torch") -> ModelFolder:
        """`model` as a local folder, downloading a Hub id's files for `backend` (only those; never pickles)."""
        path = Path(model).expanduser()
        if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
            return cls.local(model)
        try:
            validate_repo_id(model)
        except HFValidationError:
            raise ModelFolderError(f"The model folder {model!r} does not exist. {MODEL_HINT}") from None
        graphs = [GRAPHS[GRAPH_OF_BACKEND[backend]], EXPORT_REPORT] if backend in GRAPH_OF_BACKEND else []
        try:
            snapshot = Path(snapshot_download(model, allow_patterns=[CONFIG, PREPROCESSOR, "*.safetensors", f"{WEIGHTS}.index.json",
                                                                     *graphs]))
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise ModelFolderError(f"There is no folder {model!r} here, and the Hub has no model repo {model!r} (or it is private "
                                   f"and your token cannot read it). {MODEL_HINT}") from None
        except LocalEntryNotFoundError:
            raise ModelFolderError(f"There is no folder {model!r} here, and {model!r} could not be downloaded from the Hub (offline, "
                                   f"or unreachable) nor found in the local cache. {MODEL_HINT}") from None
        return cls(snapshot, model, links_into=snapshot.parent.parent / "blobs")

    @classmethod
    def local(cls, model: str, hint: str = MODEL_HINT) -> ModelFolder:
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelFolderError(f"The model folder {model!r} does not exist. {hint}")
        if not path.is_dir() or not (path / CONFIG).is_file():
            raise ModelFolderError(f"{model!r} is not a model folder: it has no {CONFIG}. {hint}")
        return cls(path, path.resolve().name)

    def check(self) -> None:
        """Weights (safetensors only: nothing is unpickled) and an image processor, or one line saying which is missing."""
        if not any(self.path.glob("*.safetensors")):
            raise ModelFolderError(f"{self.name!r} has no safetensors weights ({WEIGHTS}); only safetensors are loaded, as pickled "
                                   "weights can run code. Save the model with `save_pretrained` (safetensors is its default).")
        if not (self.path / PREPROCESSOR).is_file():
            raise ModelFolderError(
                f"{self.name!r} has no image processor ({PREPROCESSOR}), which says how images are resized and normalised for this "
                "model. Save it beside the model: `AutoImageProcessor.from_pretrained(<base model>).save_pretrained(<folder>)` "
                "(`hf-transfer train` writes it).")

    def config(self):
        return AutoConfig.from_pretrained(self.path, local_files_only=True)

    def image_processor(self):
        """The image processor `pipeline("image-classification", model=folder)` loads."""
        try:
            return AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelFolderError(f"The image processor of {self.name!r} ({PREPROCESSOR}) cannot be loaded: "
                                   f"{str(error).splitlines()[0][:300]}") from None

    def torch_model(self) -> torch.nn.Module:
        try:
            model = AutoModelForImageClassification.from_pretrained(self.path, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ModelFolderError(f"{self.name!r} does not load as an image classifier: {str(error).splitlines()[0][:300]}") from None
        return model.eval()


class TorchClassifier:
    """The PyTorch model; with `precision` (auto, fp32, bf16) its frozen passes run as `inference_precision` decides, as in
    training (hf_transfer/precision.py); without, eager fp32 as loaded."""

    def __init__(self, model: torch.nn.Module, precision: str | None = None):
        self.model = model.eval()
        self.precision = prepare_for_inference(model, precision) if precision else None

    def logits(self, pixels) -> np.ndarray:
        with torch.inference_mode():
            return self.model(pixel_values=torch.as_tensor(pixels)).logits.float().numpy()

    def describe(self) -> str:
        return f"PyTorch, {self.precision.describe()}" if self.precision else "PyTorch, eager fp32"


class GraphClassifier(OnnxClassifier):
    """A graph `hf-transfer export` checked against the folder's weights, on onnxruntime's CPU provider."""

    def __init__(self, folder: ModelFolder, backend: str):
        path, self.entry = checked_graph(folder.path, GRAPH_OF_BACKEND[backend], folder.links_into)
        super().__init__(path, folder.links_into)
        self.backend = backend

    def describe(self) -> str:
        name = {"onnx": "fp32 ONNX", "onnx-int8": "int8 ONNX"}[self.backend]
        return f"{name} ({GRAPHS[GRAPH_OF_BACKEND[self.backend]]}) on onnxruntime's CPU provider"


def measure_speed(classifier, one: np.ndarray, batch: np.ndarray, runs_one: int = 10, runs_batch: int = 3) -> dict:
    """Batch-1 latency (median ms over `runs_one` calls) and throughput at `len(batch)` (images/s, median of `runs_batch`
    calls), after a warm-up call of each shape (oneDNN and onnxruntime prepare their kernels on first use)."""
    def seconds(pixels, runs):
        classifier.logits(pixels)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            classifier.logits(pixels)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"latency_ms_batch_1": 1000 * seconds(one, runs_one),
            f"images_per_second_batch_{len(batch)}": len(batch) / seconds(batch, runs_batch)}
