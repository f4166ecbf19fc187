"""The options of `hf-transfer export` and `hf-transfer predict`, and their command lines; light enough for `--help`."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HFTransferError

BACKENDS = ("torch", "onnx", "onnx-int8")  # PyTorch; the checked fp32 graph onnx/model.onnx; the checked int8 graph
OUTPUT_FORMATS = (".csv", ".parquet")


class DeployOptionError(HFTransferError, ValueError):
    """An export or predict option that cannot apply; the message says which values can."""


@dataclass
class ExportArguments:
    model: str = field(metadata={"positional": True, "help": (
        "A model folder written by `hf-transfer train` (or any image-classification folder with config.json, safetensors "
        "weights and preprocessor_config.json, with --dataset).")})
    int8: bool = field(default=False, metadata={"help": (
        "Also write onnx/model_quantized.onnx: onnxruntime's static int8 quantization (QDQ, per-channel weights) calibrated on a "
        "seeded sample of the run's training split; dynamic quantization when static fails. Refused when its test accuracy "
        "falls more than --allow_accuracy_drop points below the PyTorch model's.")})
    opset: int | None = field(default=None, metadata={"help": "ONNX opset of the graphs (default: torch's exporter's own)."})
    allow_accuracy_drop: float = field(default=1.0, metadata={"help": (
        "Points of test accuracy the int8 graph may lose against the PyTorch model before it is refused.")})
    check_images: int = field(default=2000, metadata={"help": (
        "Test images of the equivalence check: the whole test split up to this many, else a seeded sample of this many.")})
    calibration_images: int = field(default=256, metadata={"help": "Training images the int8 calibration sees (a seeded sample)."})
    dataset: str | None = field(default=None, metadata={"help": (
        "Labelled images to check and calibrate on instead of the run's own dataset (a Hub id, a local folder or a .parquet "
        "file, as `hf-transfer train` reads it; its test split checks, its train split calibrates). Needed for a folder that "
        "`hf-transfer train` did not write.")})

    def __post_init__(self):
        if not self.allow_accuracy_drop >= 0:  # also NaN
            raise DeployOptionError(f"`--allow_accuracy_drop {self.allow_accuracy_drop:g}`: give points of accuracy >= 0, e.g. 1.")
        for option in ("check_images", "calibration_images"):
            if getattr(self, option) < 1:
                raise DeployOptionError(f"`--{option} {getattr(self, option)}` holds no images: give a number >= 1.")
        if self.opset is not None and self.opset < 1:
            raise DeployOptionError(f"`--opset {self.opset}` is not an ONNX opset: leave it unset, or give e.g. 18.")


@dataclass
class PredictArguments:
    model: str = field(metadata={"positional": True, "help": "A model folder (`hf-transfer train`'s output) or a Hub model id."})
    images: str = field(metadata={"positional": True, "help": (
        "What to label: a folder (searched recursively; an image in <folder>/<class>/... whose <class> is one of the model's has it as its true "
        "label), a glob ('photos/**/*.jpg'), a .parquet file, a text file of image paths (one per line, relative to the file), "
        "or with --split a Hub dataset id or local dataset folder.")})
    output: str = field(default="predictions.csv", metadata={"help": (
        "Where the predictions go, one row per image: .csv or .parquet. Written in chunks: an interrupted run continues with --resume.")})
    top_k: int = field(default=5, metadata={"help": "Labels (and scores) per image, best first; at most the model's number of classes."})
    backend: str = field(default="torch", metadata={"choices": list(BACKENDS), "help": (
        "torch: the PyTorch model, in --inference_precision; onnx / onnx-int8: the graph `hf-transfer export` wrote and checked "
        "(onnx/model.onnx, onnx/model_quantized.onnx), on onnxruntime's CPU provider.")})
    split: str | None = field(default=None, metadata={"help": "The split of a dataset given as images (e.g. test)."})
    inference_precision: str | None = field(default=None, metadata={"help": (
        "torch backend: auto (default: bf16 autocast where the hardware computes bf16 natively, channels_last for CNNs), fp32 or "
        "bf16, as in training. The onnx backends run their graph's own precision.")})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    num_workers: int = field(default=1, metadata={"help": (
        "Processes of the decode pool, which read, decode and preprocess the next batches while the model runs; 0 decodes in "
        "the main process.")})
    chunk_size: int = field(default=1024, metadata={"help": (
        "Images per chunk appended to the output: an interrupted run keeps every finished chunk and redoes at most one.")})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run that writes to --output, after its last finished chunk."})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise DeployOptionError(f"`--backend {self.backend}` is not one of {' | '.join(BACKENDS)}.")
        if Path(self.output).suffix.lower() not in OUTPUT_FORMATS:
            raise DeployOptionError(f"`--output {self.output}`: the file name must end in {' or '.join(OUTPUT_FORMATS)} (the format).")
        for option in ("top_k", "batch_size", "chunk_size"):
            if getattr(self, option) < 1:
                raise DeployOptionError(f"`--{option} {getattr(self, option)}`: give a number >= 1.")
        if self.num_workers < 0:
            raise DeployOptionError(f"`--num_workers {self.num_workers}`: give 0 (decode in the main process) or more processes.")
        if self.inference_precision is not None and self.backend != "torch":
            raise DeployOptionError(f"`--inference_precision` applies to `--backend torch`; the {self.backend} backend runs its graph's "
                                    "own precision. Leave it unset, or use `--backend torch`.")


def _truthy(value: str) -> bool:
    if str(value).lower() in ("true", "yes", "1"):
        return True
    if str(value).lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def command_parser(prog: str, description: str, options: type) -> argparse.ArgumentParser:
    """An argparse parser of the dataclass `options`: its positional fields first, then `--field value` (a bool also as a
    bare `--field`). Hand-written because transformers' HfArgumentParser would import transformers for `--help`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(options)
    for option in dataclasses.fields(options):
        kind = hints[option.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # `int | None` -> int
        help_text = option.metadata.get("help", "")
        if option.metadata.get("positional"):
            parser.add_argument(option.name, help=help_text)
        elif base is bool:
            parser.add_argument(f"--{option.name}", type=_truthy, nargs="?", const=True, default=option.default, help=help_text)
        else:
            default = f" (default: {option.default})" if option.default is not None else ""
            parser.add_argument(f"--{option.name}", type=base, default=option.default, choices=option.metadata.get("choices"),
                                help=help_text + default)
    return parser


def parse_options(parser: argparse.ArgumentParser, options: type, argv: list[str]):
    """`options` from `argv`; argparse's own usage errors exit with code 2 as usual."""
    return options(**vars(parser.parse_args(argv)))
