"""Serve a graph that `hf-transfer export` wrote and checked: find it, confirm it was made from the weights beside it, open it
without following links, and turn its logits into the scores `pipeline("image-classification")` gives.

`hf-transfer predict` and the demo use it; `hf-transfer push --space` ships it to a Space as hf_transfer_onnx_runtime.py
(hf_transfer/demo.py), next to hf_transfer_repo_files.py, where no other hf_transfer module exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

try:
    from .errors import HFTransferError
    from .repo_files import EXPORT_REPORT, ONNX_INT8_MODEL, ONNX_MODEL, WEIGHTS
except ImportError:  # on a Space: shipped as hf_transfer_onnx_runtime.py, with hf_transfer_repo_files.py beside it
    from hf_transfer_repo_files import EXPORT_REPORT, ONNX_INT8_MODEL, ONNX_MODEL, WEIGHTS

    class HFTransferError(Exception):
        """Stands in for hf_transfer.errors.HFTransferError on a Space."""


GRAPHS = {"fp32": ONNX_MODEL, "int8": ONNX_INT8_MODEL}  # each graph's file, by the precision the export report names it
INPUT, OUTPUT = "pixel_values", "logits"  # the names transformers' models and Transformers.js use
KEPT = "kept"  # an export report's status of a graph that passed its check


class OnnxModelError(HFTransferError):
    """A graph that cannot be served: none exported, refused by its check, from other weights, a link, or not ONNX."""


def read_regular_file(path: Path, links_into: Path | None = None) -> bytes:
    """The bytes of the regular file `path`. A link is followed only when it leads into `links_into` (the Hub cache keeps a
    snapshot's files as links to its own blobs); a link elsewhere, a folder, a FIFO or a device is refused."""
    path = Path(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if links_into is None or not target.is_relative_to(os.path.realpath(links_into)):
            raise OnnxModelError(f"{_shown(path)} is a symbolic link: model files are read only from regular files in the model "
                                 "folder. Put the file itself there.")
        path = target
    try:  # O_NOFOLLOW: a link swapped in after the check is not followed either; O_NONBLOCK: a FIFO does not stall the open
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OnnxModelError(f"{_shown(path)} does not exist.") from None
    except OSError as error:
        raise OnnxModelError(f"Cannot read {_shown(path)}: {error.strerror}.") from None
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OnnxModelError(f"{_shown(path)} is not a regular file.")
        return file.read()


def _shown(path: Path) -> str:
    """A model file as messages name it: `onnx/model.onnx` in its folder (the folder is the user's own argument)."""
    return repr(Path(path).parent.name + "/" + Path(path).name) if Path(path).parent.name == "onnx" else repr(Path(path).name)


def weight_files(folder: Path, links_into: Path | None = None) -> list[str]:
    """The safetensors files holding the folder's weights: `model.safetensors`, or the shards its index names."""
    index = Path(folder) / f"{WEIGHTS}.index.json"
    if not index.exists():
        return [WEIGHTS]
    try:
        shards = sorted(set(json.loads(read_regular_file(index, links_into))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise OnnxModelError(f"{index.name!r} is not a weights index (no `weight_map`).") from None
    if any(not isinstance(name, str) or Path(name).name != name for name in shards):
        raise OnnxModelError(f"{index.name!r} names weights outside the model folder.")
    return shards


def weights_fingerprint(folder: Path, links_into: Path | None = None) -> dict[str, str]:
    """sha256 of each weights file (for one file, the Hub's LFS id of it): which weights a graph was exported from."""
    fingerprint = {}
    for name in weight_files(folder, links_into):
        if not (Path(folder) / name).exists():
            raise OnnxModelError(f"The model folder has no {name!r}: there are no weights to check the graphs against.")
        fingerprint[name] = hashlib.sha256(read_regular_file(Path(folder) / name, links_into)).hexdigest()
    return fingerprint


def read_export_report(folder: Path, links_into: Path | None = None) -> dict | None:
    """The folder's onnx/export_report.json, or None when it has none."""
    path = Path(folder) / EXPORT_REPORT
    if not path.exists() and not path.is_symlink():
        return None
    try:
        report = json.loads(read_regular_file(path, links_into))
    except ValueError:
        raise OnnxModelError(f"{_shown(path)} is not valid JSON: export again with `hf-transfer export <model folder>`.") from None
    if not isinstance(report, dict) or not isinstance(report.get("graphs"), dict):
        raise OnnxModelError(f"{_shown(path)} is not an export report: export again with `hf-transfer export <model folder>`.")
    return report


def checked_graph(folder: Path, precision: str, links_into: Path | None = None) -> tuple[Path, dict]:
    """The `precision` ("fp32" | "int8") graph of `folder` and its export report entry, when `hf-transfer export` checked it
    against the very weights in the folder; otherwise OnnxModelError saying what to do."""
    report = read_export_report(folder, links_into)
    flag = " --int8" if precision == "int8" else ""
    if report is None:
        raise OnnxModelError(f"The model has no exported graphs ({EXPORT_REPORT} is missing). "
                             f"Export them first: `hf-transfer export <model folder>{flag}`.")
    entry = report["graphs"].get(precision)
    if not isinstance(entry, dict):
        raise OnnxModelError(f"The model has no {precision} graph. Export it: `hf-transfer export <model folder>{flag}`.")
    if entry.get("status") != KEPT:
        raise OnnxModelError(f"The {precision} graph did not pass its check at export ({entry.get('status')}), so it was not kept. "
                             "See onnx/export_report.json.")
    if report.get("weights") != weights_fingerprint(folder, links_into):
        raise OnnxModelError(f"The graphs in onnx/ were exported from other weights than the folder's {', '.join(weight_files(folder, links_into))}. "
                             f"Export again: `hf-transfer export <model folder>{flag}`.")
    return Path(folder) / GRAPHS[precision], entry


class OnnxClassifier:
    """One graph in an onnxruntime CPU session: `logits(pixels)` for a float32 batch (N, channels, rows, columns)."""

    def __init__(self, path: Path, links_into: Path | None = None):
        import onnxruntime
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        graph = read_regular_file(path, links_into)  # from bytes: a graph naming external data files finds none
        options = onnxruntime.SessionOptions()
        # Idle threads sleep instead of spinning, as torch's do under hf_transfer's OMP_WAIT_POLICY=PASSIVE: on 2 cores the
        # decode pool needs the core a spinning thread would hold (benchmarks/results/export.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        errors = (state.Fail, state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument, state.NoSuchFile,
                  state.RuntimeException, state.NotImplemented)
        try:
            self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except errors as error:
            raise OnnxModelError(f"{_shown(path)} is not a graph onnxruntime can load ({str(error).splitlines()[0][:300]}). "
                                 "Export it again: `hf-transfer export <model folder>`.") from None
        inputs, outputs = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT] or OUTPUT not in outputs:
            raise OnnxModelError(f"{_shown(path)} takes {inputs[:3]} and gives {outputs[:3]}, not `{INPUT}` and `{OUTPUT}`: it was "
                                 "not written by `hf-transfer export`. Export again.")

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(pixels, dtype=np.float32)})[0]


def class_scores(logits: np.ndarray, num_labels: int, problem_type: str | None = None) -> np.ndarray:
    """Scores from logits (N, classes) as `pipeline("image-classification")` computes them by default (transformers'
    ImageClassificationPipeline.postprocess): sigmoid for multi-label or single-output models, softmax otherwise."""
    logits = np.asarray(logits, dtype=np.float32)
    if problem_type == "regression":
        return logits
    if problem_type == "multi_label_classification" or num_labels == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k_ids(scores: np.ndarray, k: int) -> list[list[int]]:
    """Each row's `k` best class ids, best first; ties keep class order, as the pipeline's stable sort does."""
    order = np.argsort(-np.asarray(scores), axis=-1, kind="stable")
    return order[:, :min(k, order.shape[-1])].tolist()
