"""`hf-transfer export`: a model folder's classifier as ONNX graphs (fp32, and int8 with `--int8`) in its `onnx/` folder, each
checked against the PyTorch model on the run's test split, with the figures and latencies in onnx/export_report.json and the card.

The flow, one call per stage: load the folder -> load the check and calibration images -> export (and quantize) into the
staging folder -> compare every graph with PyTorch -> time them -> decide, write the report, publish `onnx/`, update the card.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from transformers import TrainingArguments

from .backends import ModelFolder, TorchClassifier, measure_speed
from .card import describe_hardware, write_model_card
from .data import load_image_dataset
from .deploy_options import ExportArguments
from .errors import DatasetError, HFTransferError
from .explain import Logits
from .images import load_image
from .onnx_runtime import GRAPHS, INPUT, KEPT, OUTPUT, OnnxClassifier, weights_fingerprint
from .options import DataArguments
from .output_dir import OutputDirLock, disk_error
from .repo_files import ALL_RESULTS, EXPORT_REPORT, ONNX_DIR, RUN_CONFIG, STAGING

logger = logging.getLogger(__name__)

MIN_FP32_AGREEMENT = 0.999  # the fp32 graph computes what PyTorch computes: it may differ on 1 image in 1,000 at most
BATCH = 32  # images per forward pass of the check, and the batch of the throughput figure
EXPORT_HINT = ("The graphs are written into the model folder: give a local folder (`hf-transfer train` writes one; a Hub model "
               "downloads into one with `hf download <user/name> --local-dir <folder>`).")
SPEED_NAMES = {"pytorch": "PyTorch eager fp32", "pytorch_auto": "PyTorch, inference_precision: auto", "fp32": "ONNX fp32",
               "int8": "ONNX int8"}


class ExportError(HFTransferError):
    """A folder that cannot be exported, or a graph that failed its check; the message gives the figures and what to do."""


@dataclass
class CheckData:
    """The labelled images of the equivalence check (the run's test split, or a seeded sample of it) and of the int8
    calibration (a seeded sample of its training split), as undecoded cells; labels are the model's class ids."""

    test: list
    test_labels: list[int]
    test_size: int  # of the whole split the sample was drawn from
    calibration: list
    source: str  # the dataset, as the report may publish it
    seed: int


def export_model(args: ExportArguments) -> dict:
    """Export, check, report; raises ExportError when a graph is refused (the fp32 one: nothing is written)."""
    folder = ModelFolder.local(args.model, EXPORT_HINT)
    folder.check()
    lock = OutputDirLock(folder.path)  # no training run may publish into the folder meanwhile
    try:
        lock.acquire()
        report = _export(folder, args)
    except OSError as error:
        if (disk := disk_error(error, folder.path, writing=True)) is None:
            raise
        raise disk from error
    finally:
        shutil.rmtree(folder.path / STAGING, ignore_errors=True)
        lock.release()
    print(summary(report))
    if any(graph["status"] != KEPT for graph in report["graphs"].values()):
        raise ExportError(f"The int8 graph was refused, and kept out of {ONNX_DIR}/: {report['graphs']['int8']['reason']}. "
                          f"The fp32 graph passed and is in {GRAPHS['fp32']}. Pass --allow_accuracy_drop X to keep an int8 graph "
                          "that loses up to X points.")
    return report


def _export(folder: ModelFolder, args: ExportArguments) -> dict:
    model, processor = folder.torch_model(), folder.image_processor()
    labels = [model.config.id2label[index] for index in sorted(model.config.id2label)]
    data = check_data(folder, args, labels)
    staging = folder.path / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ONNX_DIR).mkdir(parents=True)
    example = pixels_of(processor, data.test[:2])
    opset = export_graph(model, example, staging / GRAPHS["fp32"], args.opset)
    graphs = {"fp32": {"file": GRAPHS["fp32"]}}
    if args.int8:
        method = quantize(staging / GRAPHS["fp32"], staging / GRAPHS["int8"], processor, data.calibration)
        graphs["int8"] = {"file": GRAPHS["int8"], "quantization": method}
    classifiers = {"pytorch": TorchClassifier(model),
                   "pytorch_auto": TorchClassifier(copy.deepcopy(model), "auto"),
                   **{name: OnnxClassifier(staging / graph["file"]) for name, graph in graphs.items()}}
    figures = compare(classifiers, batches(processor, data.test, data.test_labels))
    speed = speeds(classifiers, pixels_of(processor, (data.test * BATCH)[:BATCH]), figures)
    report = {
        "weights": weights_fingerprint(folder.path),
        "exporter": f"torch.onnx.export (dynamo), torch {torch.__version__}",
        "opset": opset,
        "input": {"name": INPUT, "shape": ["batch_size", *example.shape[1:]], "output": OUTPUT},
        "check": {"dataset": data.source, "split": "test", "images": len(data.test), "split_images": data.test_size,
                  "seed": data.seed, "pytorch_accuracy": figures["pytorch"]["accuracy"]},
        "graphs": {name: {**graph, **figures[name], **decide(name, figures, args), "size_mb": _megabytes(staging / graph["file"])}
                   for name, graph in graphs.items()},
        "speed": speed,
    }
    if report["graphs"]["fp32"]["status"] != KEPT:
        raise ExportError(f"The fp32 graph does not compute what the PyTorch model computes: {report['graphs']['fp32']['reason']}. "
                          "Nothing was written. Try another --opset, or report the architecture to torch's ONNX exporter.")
    for name, graph in report["graphs"].items():
        if graph["status"] != KEPT:
            (staging / graph["file"]).unlink()
    (staging / EXPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    publish_graphs(staging, folder.path)
    if (folder.path / ALL_RESULTS).is_file() and (folder.path / RUN_CONFIG).is_file():
        write_model_card(folder.path)  # a run's card gains its "Deployment" section
    return report


def check_data(folder: ModelFolder, args: ExportArguments, labels: list[str]) -> CheckData:
    """The run's own splits (its recipe's data options and seed, from run_config.json), or those of `--dataset`."""
    run_config = json.loads((folder.path / RUN_CONFIG).read_text()) if (folder.path / RUN_CONFIG).is_file() else None
    if args.dataset:
        data_args, seed = DataArguments(dataset=args.dataset), TrainingArguments.seed
    elif run_config is not None:
        data_args = DataArguments(**{**run_config["data"], "streaming": False})
        seed = run_config.get("training", {}).get("seed", TrainingArguments.seed)
    else:
        raise ExportError(f"{folder.name!r} was not written by `hf-transfer train` (it has no {RUN_CONFIG}), so there is no test split "
                          "to check the graphs on. Give labelled images: `--dataset <Hub id, folder or .parquet file>`.")
    try:
        data = load_image_dataset(data_args, seed=seed)
    except (DatasetError, OSError) as error:
        raise ExportError(f"The images to check the graphs on cannot be loaded: {error} Give them with `--dataset`.") from None
    unknown = [name for name in data.labels if name not in labels]
    if unknown:
        raise ExportError(f"The check images have classes {unknown[:5]} that the model does not know (it knows {labels[:10]}): "
                          "give `--dataset` with the model's classes.")
    test = data.splits["test"]
    test_size = len(test)
    if len(test) > args.check_images:
        test = test.shuffle(seed=seed).select(range(args.check_images))
    train = data.splits["train"].shuffle(seed=seed)
    calibration = list(train.select(range(min(args.calibration_images, len(train))))[data.image_column])
    identifier = str(data_args.dataset)
    source = Path(identifier).name if Path(identifier).expanduser().exists() else identifier  # no local path in the report
    return CheckData(list(test[data.image_column]), [labels.index(data.labels[label]) for label in test[data.label_column]], test_size,
                     calibration, source, seed)


def pixels_of(processor, cells: list) -> torch.Tensor:
    """The model's input for undecoded images, as `pipeline("image-classification")` prepares it (the folder's image processor)."""
    return processor(images=[load_image(cell) for cell in cells], return_tensors="pt")["pixel_values"]


def batches(processor, cells: list, labels: list[int]) -> Iterator[tuple[torch.Tensor, list[int]]]:
    for start in range(0, len(cells), BATCH):
        yield pixels_of(processor, cells[start:start + BATCH]), labels[start:start + BATCH]


def export_graph(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> int:
    """Write the fp32 graph of `model` (any batch size) to `path`; return its opset."""
    # torch.onnx.export(dynamo=True): the exporter torch maintains (its TorchScript one is deprecated), and it takes any
    # nn.Module, so timm and transformers backbones go the same way. optimum's exporter would need transformers < 4.58
    # (pip's dry run of optimum-onnx 0.1.0), and timm's onnx_export covers timm models only.
    try:
        program = torch.onnx.export(Logits(model).eval(), (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch_size", min=1)}},
                                    opset_version=opset, external_data=False)
        program.save(str(path), external_data=False)
    except Exception as error:  # the exporter raises many kinds (torch.export, onnxscript, version conversion)
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ExportError(f"torch's ONNX exporter cannot export {type(model).__name__}"
                          f"{f' at opset {opset}' if opset else ''}: {reason}") from None
    return next(entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import if entry.domain in ("", "ai.onnx"))


def quantize(source: Path, target: Path, processor, calibration: list) -> str:
    """int8 `target` from the fp32 graph `source` with onnxruntime's quantizer; returns, in one line, which method ran."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = (pixels_of(processor, calibration[start:start + BATCH]).numpy() for start in range(0, len(calibration), BATCH))

        def get_next(self):
            return next(({INPUT: pixels} for pixels in self.batches), None)

    with tempfile.TemporaryDirectory(prefix="hf_transfer_quantize_") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference and graph optimisation, as onnxruntime's docs ask first
        try:
            # QDQ: the format onnxruntime's CPU provider fuses into int8 kernels; signed per-channel weights, unsigned
            # activations (ReLU outputs are >= 0), ranges from MinMax over the calibration images.
            quantize_static(str(prepared), str(target), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            return (f"static: QDQ, per-channel int8 weights, uint8 activations, MinMax ranges from {len(calibration)} training "
                    "images (onnxruntime.quantization.quantize_static)")
        except Exception as error:  # an operator the static quantizer cannot calibrate or rewrite: weights-only, dynamic
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            logger.warning("Static int8 quantization failed (%s); quantizing dynamically instead.", reason)
            target.unlink(missing_ok=True)
            quantize_dynamic(str(prepared), str(target), per_channel=True, weight_type=QuantType.QInt8)
            return (f"dynamic: per-channel int8 weights, activations quantized at run time "
                    f"(onnxruntime.quantization.quantize_dynamic; static failed: {reason})")


def compare(classifiers: dict, check: Iterator[tuple[torch.Tensor, list[int]]]) -> dict[str, dict]:
    """One pass over the check images through every classifier: accuracy, and against PyTorch fp32 (`pytorch`) top-1
    agreement and the largest absolute logit difference."""
    counts = {name: {"correct": 0, "agree": 0, "difference": 0.0} for name in classifiers}
    images = 0
    for pixels, labels in check:
        reference = classifiers["pytorch"].logits(pixels)
        for name, classifier in classifiers.items():
            logits = reference if name == "pytorch" else classifier.logits(pixels.numpy() if name in GRAPHS else pixels)
            counts[name]["correct"] += int((logits.argmax(-1) == np.asarray(labels)).sum())
            counts[name]["agree"] += int((logits.argmax(-1) == reference.argmax(-1)).sum())
            counts[name]["difference"] = max(counts[name]["difference"], float(np.abs(logits - reference).max()))
        images += len(labels)
    return {name: {"accuracy": count["correct"] / images, "agreement": count["agree"] / images,
                   "max_abs_logit_difference": count["difference"], "images": images} for name, count in counts.items()}


def decide(name: str, figures: dict, args: ExportArguments) -> dict:
    """A graph's status: kept, or refused with the figures that refused it."""
    graph, reference = figures[name], figures["pytorch"]["accuracy"]
    if name == "fp32" and graph["agreement"] < MIN_FP32_AGREEMENT:
        return {"status": "refused", "reason": f"it agrees with PyTorch on {graph['agreement']:.2%} of {graph['images']} test images "
                                               f"(at least {MIN_FP32_AGREEMENT:.1%} needed), largest logit difference "
                                               f"{graph['max_abs_logit_difference']:.3g}"}
    drop = round(100 * (reference - graph["accuracy"]), 9)  # 100 * (0.90 - 0.885) is 1.5000000000000013
    if name == "int8" and drop > args.allow_accuracy_drop:
        return {"status": "refused", "reason": f"its test accuracy is {graph['accuracy']:.2%} against PyTorch's {reference:.2%} on "
                                               f"{graph['images']} images, {drop:.2f} points lower (allowed: {args.allow_accuracy_drop:g}); "
                                               f"top-1 agreement {graph['agreement']:.2%}"}
    return {"status": KEPT}


def speeds(classifiers: dict, batch: torch.Tensor, figures: dict) -> dict:
    """Batch-1 latency and batch-32 throughput of every classifier on this machine, with its check accuracy."""
    rows = []
    for name, classifier in classifiers.items():
        pixels = batch.numpy() if name in GRAPHS else batch
        rows.append({"model": SPEED_NAMES[name], **measure_speed(classifier, pixels[:1], pixels), "accuracy": figures[name]["accuracy"]})
    return {"machine": f"{describe_hardware()}, torch threads {torch.get_num_threads()}", "rows": rows}


def publish_graphs(staging: Path, folder: Path) -> None:
    """Replace `folder/onnx` by the staged one: the old graphs go only once the new ones are complete."""
    target, old = folder / ONNX_DIR, staging / f"old-{ONNX_DIR}"
    if target.is_symlink():
        raise ExportError(f"{ONNX_DIR}/ in the model folder is a symbolic link: remove it, then export again.")
    if target.exists():
        os.replace(target, old)
    os.replace(staging / ONNX_DIR, target)


def _megabytes(path: Path) -> float | None:
    return round(path.stat().st_size / 1e6, 2) if path.is_file() else None


def summary(report: dict) -> str:
    """What the export printed: each graph's check, then the speed table."""
    check = report["check"]
    lines = [f"Checked on {check['images']} test images of {check['dataset']} (of {check['split_images']}); PyTorch accuracy "
             f"{check['pytorch_accuracy']:.2%}."]
    for name, graph in report["graphs"].items():
        verdict = graph["status"] if graph["status"] == KEPT else f"REFUSED: {graph['reason']}"
        lines.append(f"  {graph['file']}: top-1 agreement with PyTorch {graph['agreement']:.2%}, largest logit difference "
                     f"{graph['max_abs_logit_difference']:.3g}, accuracy {graph['accuracy']:.2%}: {verdict}")
        if graph.get("quantization"):
            lines.append(f"    int8 quantization: {graph['quantization']}")
    lines.append(f"Speed on this machine ({report['speed']['machine']}):")
    for row in report["speed"]["rows"]:
        throughput = next(value for key, value in row.items() if key.startswith("images_per_second"))
        lines.append(f"  {row['model']:<36} {row['latency_ms_batch_1']:8.1f} ms at batch 1, {throughput:8.1f} images/s at batch {BATCH}")
    lines.append(f"Written: {EXPORT_REPORT}" + "".join(f", {graph['file']}" for graph in report["graphs"].values()
                                                      if graph["status"] == KEPT))
    return "\n".join(lines)
