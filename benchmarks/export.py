"""Deployment speed on this machine: PyTorch eager fp32, PyTorch with `inference_precision: auto`, and the ONNX fp32 and int8
graphs of `hf-transfer export` on onnxruntime's CPU provider, side by side in one process, with the accuracy of each on the
same test images; then `hf-transfer predict` on a whole test split against the throughput of its backend.

For each setting it trains a model the way a user would (`hf_transfer.pipeline.run` of a recipe), exports it (`export_model`,
--int8: the export's own equivalence check included), then:

- accuracy: every test image decoded once and preprocessed by the folder's image processor; each batch of 32 through all four
  classifiers (`hf_transfer.export.compare`);
- speed: rounds alternating the four classifiers (order rotated every round, one warm-up round): batch-1 latency (median of
  `--calls` calls) and batch-32 throughput (median of 3 calls) on the same preprocessed test images in memory;
- predict (`--predict`): `hf_transfer.predict.predict` on the whole test split with each backend (torch with `auto`, onnx,
  onnx-int8), its images/s (decoding, preprocessing, writing the CSV included) over the backend's own batch-32 throughput.

Settings: `lite0-224` is the quickstart recipe (EfficientNet-Lite0 at 224 px, head trained on the repo's 112 photos), tested on the
cats-vs-dogs mirror's 2,000 test photos; `lite0-cifar` is Lite0 at the CIFAR-10 CPU recipe's 128 px (benchmarks/cifar10_cpu.py),
its head trained on `--cifar-train` CIFAR-10 images (the feature cache), tested on all 10,000 test images.
Targets on the 2-core CPU: int8 batch-1 latency <= 0.5x PyTorch eager fp32 with accuracy within 1 point; predict on the 10,000
CIFAR-10 test images at >= 90% of its backend's measured throughput.

    python benchmarks/export.py                                   # both settings, predict on CIFAR-10: ~25 min on 2 cores
    python benchmarks/export.py --settings lite0-224 --no-predict
"""

from __future__ import annotations

import hf_transfer  # noqa: F401 - first: it sets OMP_WAIT_POLICY (when unset) before torch loads, as the CLI does

# isort: split
import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import datasets
from common import MIRRORS, REPO, alternating_rounds, load_average, offline_logging, report
from torch.utils.data import DataLoader

from hf_transfer.backends import GraphClassifier, ModelFolder, TorchClassifier
from hf_transfer.deploy_options import ExportArguments, PredictArguments
from hf_transfer.export import compare, export_model, pixels_of
from hf_transfer.pipeline import run
from hf_transfer.predict import DecodePool, batch_plan, list_images, predict
from hf_transfer.recipe import parse_recipe

SETTINGS = {
    "lite0-224": {"recipe": REPO / "recipes" / "quickstart.yaml", "options": {}, "test": ("cats_vs_dogs", "test", "image", "labels")},
    "lite0-cifar": {"recipe": REPO / "recipes" / "cifar10.yaml",
                    "options": {"image_size": 128, "num_train_epochs": 3, "validation_size": 1000, "data_doctor": False,
                                "save_strategy": "no", "load_best_model_at_end": False, "per_device_eval_batch_size": 64,
                                "dataloader_num_workers": 0},
                    "test": ("cifar10", "test", "img", "label")},
}
NAMES = {"pytorch": "PyTorch eager fp32", "pytorch_auto": "PyTorch, inference_precision: auto", "fp32": "ONNX fp32 (onnxruntime CPU)",
         "int8": "ONNX int8 (onnxruntime CPU)"}
BACKEND_OF = {"pytorch_auto": "torch", "fp32": "onnx", "int8": "onnx-int8"}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--cifar-train", type=int, default=10000, help="lite0-cifar: training images of the head")
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds after the warm-up round")
    parser.add_argument("--calls", type=int, default=20, help="batch-1 calls per round (their median is the round's latency)")
    parser.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True, help="time `predict` on lite0-cifar's test split")
    parser.add_argument("--workers", default="1", help="predict: decode processes to try, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--name", default="export", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


class Speed:
    """One classifier's round: batch-1 latency (median of `calls`) and batch-32 throughput (median of 3)."""

    def __init__(self, classifier, one, batch, calls: int):
        self.classifier, self.one, self.batch, self.calls = classifier, one, batch, calls
        self.latencies, self.throughputs = [], []

    def round(self) -> float:
        started = time.perf_counter()
        times = []
        for _ in range(self.calls):
            start = time.perf_counter()
            self.classifier.logits(self.one)
            times.append(time.perf_counter() - start)
        self.latencies.append(1000 * statistics.median(times))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            self.classifier.logits(self.batch)
            times.append(time.perf_counter() - start)
        self.throughputs.append(len(self.batch) / statistics.median(times))
        return time.perf_counter() - started


def train_and_export(setting: dict, workdir: Path, options: argparse.Namespace) -> tuple[Path, dict]:
    extra = dict(setting["options"])
    if "cifar" in str(setting["recipe"]):
        extra.update(dataset=str(MIRRORS["cifar10"]), max_train_samples=options.cifar_train)
    recipe = parse_recipe([str(setting["recipe"])], output_dir=str(workdir / "model"), disable_tqdm=True, **extra)
    started = time.perf_counter()
    run(recipe)
    trained = time.perf_counter() - started
    started = time.perf_counter()
    export_report = export_model(ExportArguments(model=str(workdir / "model"), int8=True))
    return workdir / "model", {"train_s": trained, "export_s": time.perf_counter() - started, "report": export_report}


def test_images(setting: dict) -> tuple[list, list[int], list[str]]:
    mirror, split, image_column, label_column = setting["test"]
    dataset = datasets.load_dataset(str(MIRRORS[mirror]), split=split).cast_column(image_column, datasets.Image(decode=False))
    return list(dataset[image_column]), list(dataset[label_column]), dataset.features[label_column].names


def measure(name: str, setting: dict, options: argparse.Namespace) -> None:
    offline_logging()
    with tempfile.TemporaryDirectory(prefix="hf_transfer_bench_export_") as scratch:
        folder_path, made = train_and_export(setting, Path(scratch), options)
        folder = ModelFolder.local(str(folder_path))
        model, processor = folder.torch_model(), folder.image_processor()
        labels = [model.config.id2label[index] for index in sorted(model.config.id2label)]
        classifiers = {"pytorch": TorchClassifier(model), "pytorch_auto": TorchClassifier(copy.deepcopy(model), "auto"),
                       "fp32": GraphClassifier(folder, "onnx"), "int8": GraphClassifier(folder, "onnx-int8")}
        cells, truth, names = test_images(setting)
        truth = [labels.index(names[label]) for label in truth]
        started = time.perf_counter()
        figures = compare(classifiers, ((pixels_of(processor, cells[i:i + 32]), truth[i:i + 32]) for i in range(0, len(cells), 32)))
        accuracy_s = time.perf_counter() - started
        batch = pixels_of(processor, cells[:32])
        speeds = {key: Speed(classifier, (batch if key.startswith("pytorch") else batch.numpy())[:1],
                             batch if key.startswith("pytorch") else batch.numpy(), options.calls)
                  for key, classifier in classifiers.items()}
        loads = []
        alternating_rounds(speeds, options.rounds, after_round=lambda _: loads.append(load_average().split(" / ")[0]))
        for speed in speeds.values():  # the warm-up round is not counted
            speed.latencies, speed.throughputs = speed.latencies[1:], speed.throughputs[1:]
        rows = []
        eager = statistics.median(speeds["pytorch"].latencies)
        for key, speed in speeds.items():
            latency = statistics.median(speed.latencies)
            rows.append({"model": NAMES[key], "latency ms (batch 1)": latency, "x eager fp32 latency": latency / eager,
                         "latency min..max": f"{min(speed.latencies):.1f}..{max(speed.latencies):.1f}",
                         "images/s (batch 32)": statistics.median(speed.throughputs),
                         "img/s min..max": f"{min(speed.throughputs):.0f}..{max(speed.throughputs):.0f}",
                         "test accuracy": figures[key]["accuracy"], "top-1 agreement with eager fp32": figures[key]["agreement"]})
        int8, fp32 = rows[3], rows[0]
        verdict = (f"int8 batch-1 latency {int8['x eager fp32 latency']:.2f}x eager fp32 (target <= 0.5), accuracy "
                   f"{100 * (int8['test accuracy'] - fp32['test accuracy']):+.2f} points (target within 1)")
        check = made["report"]["graphs"]["int8"]
        report(options.name, f"Deployment speed: {name} ({labels[:3]}... {len(labels)} classes), this machine", rows, notes=[
            f"trained in {made['train_s']:.0f} s ({setting['recipe'].name} {setting['options'] or ''}), exported with --int8 in "
            f"{made['export_s']:.0f} s; int8: {check['quantization']}",
            f"accuracy: {len(cells)} test images of the {setting['test'][0]} mirror, decoded once, each batch of 32 through all four "
            f"({accuracy_s:.0f} s)",
            f"speed: {options.rounds} rounds after a warm-up round, order rotated; per round batch-1 latency = median of "
            f"{options.calls} calls, batch-32 throughput = median of 3 calls; 1-min load average after each round: {', '.join(loads)}",
            f"`auto` decided: {classifiers['pytorch_auto'].precision.describe()}",
            verdict,
        ])
        if options.predict and "cifar" in name:
            predict_rows(folder_path, rows, options, labels)


def predict_rows(folder: Path, rows: list[dict], options: argparse.Namespace, labels: list[str]) -> None:
    """`predict` on the whole CIFAR-10 test split with each backend, against that backend's batch-32 throughput above."""
    measured = {NAMES[key]: row["images/s (batch 32)"] for key, row in zip(NAMES, rows)}
    found = []
    for workers in (int(value) for value in options.workers.split(",")):
        for key, backend in BACKEND_OF.items():
            with tempfile.TemporaryDirectory() as out:
                result = predict(PredictArguments(model=str(folder), images=str(MIRRORS["cifar10"]), split="test", backend=backend,
                                                  output=str(Path(out) / "p.csv"), num_workers=workers))
            found.append({"backend": backend, "decode processes": workers, "images": result["images"],
                          "predict images/s": result["images_per_second"], "backend images/s (batch 32, above)": measured[NAMES[key]],
                          "predict / backend": result["images_per_second"] / measured[NAMES[key]], "accuracy": result["accuracy"],
                          "load (1 min)": load_average().split(" / ")[0]})
    pool = decode_only(folder, labels, found[0]["images"])
    report(options.name, "hf-transfer predict on all of CIFAR-10's test split, this machine", found, notes=[
        f"the decode pool alone (1 process: read, decode, the image processor; no model): {pool:.0f} images/s, i.e. "
        f"{1000 / pool:.2f} core-ms per image beside the model's own",
        "predict's images/s: from its first batch to its last chunk written (decoding, preprocessing, scores, CSV included; "
        "loading the model and listing the split not)",
        "target: predict / backend >= 0.9 (the pipeline around the model costs <= 10%)",
    ])


def decode_only(folder: Path, labels: list[str], count: int) -> float:
    """Images/s of predict's decode pool with one worker process and no model: what the pipeline around the model costs."""
    images = list_images(str(MIRRORS["cifar10"]), "test", labels)
    pool = DecodePool(images, ModelFolder.local(str(folder)).image_processor())
    loader = DataLoader(pool, batch_sampler=batch_plan(0, count, 32, 1024), num_workers=1, collate_fn=lambda batch: batch)
    started = time.perf_counter()
    decoded = sum(len(batch.indices) for batch in loader)
    return decoded / (time.perf_counter() - started)


def main() -> None:
    options = arguments()
    for name in options.settings.split(","):
        measure(name, SETTINGS[name], options)


if __name__ == "__main__":
    main()
