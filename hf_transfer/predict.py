"""`hf-transfer predict`: label every image of a folder, glob, parquet file, dataset or list of paths with a model folder or Hub
model, batched behind a decode pool, into a CSV or parquet file written in chunks that an interrupted run resumes from.

The flow, one call per stage: resolve the model -> open its backend -> list the images -> open the output (or resume it) ->
predict chunk by chunk -> summarise (accuracy and confusion matrix where the images have true labels).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from sklearn.metrics import confusion_matrix
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .backends import GraphClassifier, ModelFolder, TorchClassifier
from .deploy_options import PredictArguments
from .errors import PredictError
from .images import UnreadableImageError, load_image
from .onnx_runtime import class_scores, top_k_ids
from .predictions_file import PredictionsFile

IMAGE_SUFFIXES = frozenset(ImageFolder.EXTENSIONS)  # what `hf-transfer train` reads from an image folder


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during predict; the message says how to continue. A KeyboardInterrupt still, so nothing swallows it."""


def predict(args: PredictArguments) -> dict:
    """Label `args.images` with `args.model` into `args.output`; returns the summary it prints."""
    folder = ModelFolder.resolve(args.model, args.backend)
    model = open_model(folder, args)
    images = list_images(args.images, args.split, model.labels)
    output = PredictionsFile(Path(args.output), columns(model, args.top_k, images), fingerprint(args, images), len(images), args.resume)
    print(f"Predicting {len(images)} images of {images.description} with {model.classifier.describe()}"
          f" (batch {args.batch_size}, {args.num_workers or 'no'} decode process{'es' if args.num_workers != 1 else ''})"
          + (f"; resuming after {output.rows_done}" if output.rows_done else ""))
    if output.complete:
        print(f"{args.output} is complete: nothing to resume.")
    run = {} if output.complete else predict_into(images, model, output, args)
    output.finish()
    result = {**summarize(output.read(), model.labels), **run, "output": str(args.output), "backend": args.backend}
    print(describe(result, model.labels))
    return result


# ---- the model ------------------------------------------------------------------------------------------------------
@dataclass
class OpenModel:
    """A backend with what turns its logits into the pipeline's scores: labels by class id, and the image processor."""

    classifier: object  # backends.TorchClassifier or backends.GraphClassifier: `logits(pixels)`, `describe()`
    processor: object
    labels: list[str]
    problem_type: str | None


def open_model(folder: ModelFolder, args: PredictArguments) -> OpenModel:
    folder.check()
    config = folder.config()
    labels = [config.id2label[index] for index in sorted(config.id2label)]
    classifier = (TorchClassifier(folder.torch_model(), args.inference_precision or "auto") if args.backend == "torch"
                  else GraphClassifier(folder, args.backend))
    return OpenModel(classifier, folder.image_processor(), labels, config.problem_type)


# ---- the images -----------------------------------------------------------------------------------------------------
@dataclass
class Images:
    """What to label, in a fixed order: a name for each (its path, or its index in a dataset), the image (a path, or a datasets
    cell read when needed) and its true label where the input has one."""

    names: list[str]
    cells: Sequence
    true_labels: list[str] | None
    description: str
    passed_over: list[str] = field(default_factory=list)  # files that are not images by name

    def __len__(self) -> int:
        return len(self.names)


def list_images(images: str, split: str | None, labels: list[str]) -> Images:
    """`images` as the option's help describes it; true labels from a dataset's ClassLabel column, or from folder names."""
    path = Path(images).expanduser()
    if split is not None:
        return _dataset_images(images, split)
    if path.is_dir():
        files = [file for file in sorted(path.rglob("*")) if not file.is_dir()]  # a FIFO or broken link named .jpg: a row saying so
        return _file_images([file for file in files if file.suffix.lower() in IMAGE_SUFFIXES], path, labels, f"the folder {images!r}",
                            passed_over=[file.relative_to(path).as_posix() for file in files if file.suffix.lower() not in IMAGE_SUFFIXES])
    if path.is_file() and path.suffix.lower() == ".parquet":
        return _table_images(datasets.Dataset.from_parquet(str(path)), f"the parquet file {path.name!r}")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return _file_images([path], path.parent, labels, f"the image {path.name!r}")
    if path.is_file():
        return _listed_images(path, labels)
    if glob.has_magic(images):
        matches = [Path(match) for match in sorted(glob.glob(images, recursive=True)) if not Path(match).is_dir()]
        root = Path(images.split("*")[0].split("?")[0].split("[")[0])
        root = root if root.is_dir() else root.parent
        if not matches:
            raise PredictError(f"No file matches {images!r}. Check the pattern (quote it, so that the shell does not expand it).")
        return _file_images(matches, root, labels, f"the pattern {images!r}")
    raise PredictError(f"{images!r} is not a folder, file or pattern here. Give a folder of images, a glob, a .parquet file, a text "
                       "file of image paths, or a dataset (Hub id or folder) with `--split`.")


def _file_images(files: list[Path], root: Path, labels: list[str], description: str, passed_over=()) -> Images:
    if not files:
        hint = (" It holds parquet files: if it is a dataset, pass `--split` (e.g. --split test)."
                if any(file.endswith(".parquet") for file in passed_over) else "")
        raise PredictError(f"{description} holds no images (files ending in .jpg, .png, ... as `hf-transfer train` reads them).{hint}")
    names = [(file.relative_to(root) if file.is_relative_to(root) else file).as_posix() for file in files]
    # Images filed in a folder named after one of the model's classes (<root>/<class>/..., as for training) have that true label.
    true = _true_labels([name.split("/")[0] if "/" in name else None for name in names], labels)
    return Images(names, [str(file) for file in files], true, description, list(passed_over))


def _true_labels(folders: list[str | None], labels: list[str]) -> list[str | None] | None:
    """The class each image's folder names, where it names one of the model's; None when no image has one."""
    true = [folder if folder in labels else None for folder in folders]
    return true if any(true) else None


def _listed_images(list_file: Path, labels: list[str]) -> Images:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PredictError(f"{list_file.name!r} is neither an image, a .parquet file nor a text file of image paths.") from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise PredictError(f"The list {list_file.name!r} names no images: give one image path per line.")
    files = [Path(entry).expanduser() if Path(entry).expanduser().is_absolute() else list_file.parent / entry for entry in entries]
    true = _true_labels([file.parent.name for file in files], labels)
    return Images(entries, [str(file) for file in files], true, f"the list {list_file.name!r}")


def _dataset_images(name: str, split: str) -> Images:
    try:
        dataset = datasets.load_dataset(name, split=split)
    except ValueError as error:  # an unknown split
        raise PredictError(f"The dataset {name!r} cannot give the split {split!r}: {str(error).splitlines()[0][:300]}") from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise PredictError(f"The dataset {name!r} cannot be loaded ({type(error).__name__}): give a Hub dataset id, a local dataset "
                           "folder, or a folder of images without `--split`.") from None
    return _table_images(dataset, f"{name!r} ({split} split)")


def _table_images(dataset: datasets.Dataset, description: str) -> Images:
    image_columns = [column for column, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise PredictError(f"{description} has no image column (datasets Image feature) among {list(dataset.features)[:10]}.")
    label_columns = [column for column, feature in dataset.features.items() if isinstance(feature, datasets.ClassLabel)]
    dataset = dataset.cast_column(image_columns[0], datasets.Image(decode=False))
    true = None
    if label_columns:
        names = dataset.features[label_columns[0]].names
        true = [names[value] if value is not None and 0 <= value < len(names) else None for value in dataset[label_columns[0]]]
    # datasets' lazy Column: each image is read from the dataset when a decode worker needs it, not all held in memory
    return Images([str(index) for index in range(len(dataset))], dataset[image_columns[0]], true, description)


# ---- the decode pool ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A batch as the decode pool hands it over: every index, the pixels of those that decoded, the reasons of the others."""

    indices: list[int]
    decoded: list[int]
    pixels: torch.Tensor | None
    reasons: dict[int, str]
    process: int  # the id of the process that decoded it


class DecodePool(torch.utils.data.Dataset):
    """Batches of the model's input, made in DataLoader worker processes: each image read and decoded as in training
    (hf_transfer/images.py), then preprocessed by the model's image processor, as `pipeline("image-classification")` does.
    An image that cannot be used becomes its reason."""

    def __init__(self, images: Images, processor):
        self.cells, self.processor = images.cells, processor

    def __len__(self) -> int:
        return len(self.cells)

    def __getitems__(self, indices: list[int]) -> Batch:  # torch's DataLoader fetches a whole batch through this
        decoded, reasons = {}, {}
        for index in indices:
            try:
                decoded[index] = load_image(_regular_file(self.cells[index]))
            except UnreadableImageError as error:
                reasons[index] = error.reason
        pixels = None
        if decoded:
            try:
                pixels = self._preprocess(list(decoded.values()))
            except Exception:  # one image the processor cannot take: find it, so the others still get predictions
                kept = {}
                for index, image in decoded.items():
                    try:
                        kept[index] = self._preprocess([image])
                    except Exception as error:  # the processor's own errors vary by processor (ValueError, RuntimeError, ...)
                        reasons[index] = f"cannot be preprocessed: {str(error).splitlines()[0][:200]}"
                decoded = dict.fromkeys(kept)
                pixels = torch.cat(list(kept.values())) if kept else None
        return Batch(list(indices), list(decoded), pixels, reasons, os.getpid())

    def _preprocess(self, images: list) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


def _regular_file(cell):
    """A path is read only when it names a regular file: reading a FIFO or a device would wait forever or never end."""
    if isinstance(cell, str):
        try:
            mode = os.stat(cell).st_mode
        except OSError:
            return cell  # load_image names what is wrong (not found, no permission)
        if not stat.S_ISREG(mode):
            raise UnreadableImageError("not a regular file", cell)
    return cell


def _unwrap(batch: Batch) -> Batch:
    return batch


def batch_plan(start: int, total: int, batch_size: int, chunk_size: int) -> list[list[int]]:
    """Index batches from `start` on; no batch spans two chunks, so every chunk ends on a batch."""
    plan = []
    for chunk_start in range(start - start % chunk_size, total, chunk_size):
        chunk_end = min(chunk_start + chunk_size, total)
        first = max(chunk_start, start)
        plan += [list(range(index, min(index + batch_size, chunk_end))) for index in range(first, chunk_end, batch_size)]
    return plan


def predict_into(images: Images, model: OpenModel, output: PredictionsFile, args: PredictArguments) -> dict:
    """Predict every image after the output's last finished chunk, appending each chunk as it finishes."""
    plan = batch_plan(output.rows_done, len(images), args.batch_size, args.chunk_size)
    loader = DataLoader(DecodePool(images, model.processor), batch_sampler=plan, num_workers=args.num_workers, collate_fn=_unwrap,
                        prefetch_factor=2 if args.num_workers else None)
    k = min(args.top_k, len(model.labels))
    rows, processes, predicted = [], set(), 0
    start = time.perf_counter()
    bar = tqdm(total=len(images), initial=output.rows_done, unit="img", desc="Predicting", dynamic_ncols=True)
    try:
        for batch in loader:
            rows += _rows(batch, model, images, k)
            processes.add(batch.process)
            predicted += len(batch.indices)
            bar.update(len(batch.indices))
            end = batch.indices[-1] + 1
            if end % args.chunk_size == 0 or end == len(images):
                output.append(rows)
                rows = []
    except KeyboardInterrupt:
        raise PredictInterrupted(f"interrupted; {output.path} holds the first {output.rows_done} of {len(images)} predictions: run the "
                                 "same command with `--resume` to continue after them.") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return {"predicted_now": predicted, "seconds": seconds, "images_per_second": predicted / seconds if seconds else None,
            "batches": len(plan), "decode_processes": len(processes - {os.getpid()}) if args.num_workers else 0}


def _rows(batch: Batch, model: OpenModel, images: Images, k: int) -> list[list]:
    scores = {}
    if batch.pixels is not None:
        logits = model.classifier.logits(batch.pixels.numpy() if isinstance(model.classifier, GraphClassifier) else batch.pixels)
        probabilities = class_scores(logits, len(model.labels), model.problem_type)
        scores = {index: (probabilities[row], best) for row, (index, best) in enumerate(zip(batch.decoded, top_k_ids(probabilities, k)))}
    rows = []
    for index in batch.indices:
        truth = [images.true_labels[index]] if images.true_labels is not None else []
        if index in scores:
            values, best = scores[index]
            predictions = [value for class_id in best for value in (model.labels[class_id], float(values[class_id]))]
            rows.append([images.names[index], *predictions, *truth, None])
        else:
            rows.append([images.names[index], *[None] * (2 * k), *truth, batch.reasons.get(index, "unknown")])
    return rows


def columns(model: OpenModel, k: int, images: Images) -> list[str]:
    k = min(k, len(model.labels))
    ranked = [name for rank in range(1, k + 1) for name in (f"label_{rank}", f"score_{rank}")]
    return ["image", *ranked, *(["true_label"] if images.true_labels is not None else []), "error"]


def fingerprint(args: PredictArguments, images: Images) -> str:
    """What an output's rows depend on: a resumed run must match it, or its rows would mix two runs."""
    settings = {"model": args.model, "backend": args.backend, "top_k": args.top_k, "inference_precision": args.inference_precision,
                "images": args.images, "split": args.split, "names": hashlib.sha256("\n".join(images.names).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---- the summary ----------------------------------------------------------------------------------------------------
def summarize(rows: list[dict], labels: list[str]) -> dict:
    """Counts, and where the images have true labels that the model knows, accuracy and the confusion matrix."""
    unreadable = [row for row in rows if row.get("error")]
    scored = [(row["true_label"], row["label_1"]) for row in rows if row.get("true_label") in labels and not row.get("error")]
    summary = {"images": len(rows), "unreadable": len(unreadable), "unreadable_examples": [(row["image"], row["error"]) for row in unreadable[:5]],
               "with_true_label": len(scored), "unknown_true_labels": sorted({row["true_label"] for row in rows if row.get("true_label")
                                                                              and row["true_label"] not in labels})[:10]}
    if scored:
        truth, predicted = zip(*scored)
        summary["accuracy"] = float(np.mean(np.asarray(truth) == np.asarray(predicted)))
        summary["confusion_matrix"] = confusion_matrix(truth, predicted, labels=labels).tolist()
    return summary


def _label(name: str, width: int = 12) -> str:
    shown = name if name.isprintable() else repr(name)
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def describe(summary: dict, labels: list[str]) -> str:
    """What predict prints at the end."""
    lines = [f"Predicted {summary['images']} images into {summary['output']} ({summary['unreadable']} unreadable)"
             + (f"; {summary['images_per_second']:.1f} images/s for the {summary['predicted_now']} of this run"
                if summary.get("images_per_second") else "") + "."]
    lines += [f"  unreadable: {name!r}: {reason}" for name, reason in summary["unreadable_examples"]]
    if summary["unknown_true_labels"]:
        lines.append(f"True labels the model does not know (not scored): {', '.join(map(repr, summary['unknown_true_labels']))}.")
    if "accuracy" in summary:
        lines.append(f"Accuracy {summary['accuracy']:.2%} on {summary['with_true_label']} images with a true label.")
        matrix = summary["confusion_matrix"]
        if len(labels) <= 20:
            width = max(6, *(len(_label(label)) for label in labels))
            lines.append("Confusion matrix (rows: true label, columns: predicted):")
            lines.append(" " * (width + 2) + " ".join(f"{_label(label):>{width}}" for label in labels))
            lines += [f"  {_label(label):<{width}}" + " ".join(f"{count:>{width}}" for count in row) for label, row in zip(labels, matrix)]
        else:
            mistakes = sorted(((matrix[i][j], labels[i], labels[j]) for i in range(len(labels)) for j in range(len(labels)) if i != j),
                              reverse=True)[:10]
            lines.append("Most frequent mistakes (true -> predicted): " + "; ".join(
                f"{_label(true)} -> {_label(predicted)}: {count}" for count, true, predicted in mistakes if count))
    return "\n".join(lines)
