"""All of CIFAR-10 on the CPU against the clock: the accuracy an end-to-end run reaches, and when.

Runs `recipes/cifar10.yaml` on the CIFAR-10 mirror (45,000 train / 5,000 validation / 10,000 test) with the options
given on the command line (default: Lite0 fine-tuned `full` at 128 px in bf16 autocast + channels_last, 2.6 epochs: the
earlier settings, 90.01% in 27.6 to 29.8 minutes), evaluating on the validation split every `--eval-every` steps, and
records wall time from the start (data loading included) at every evaluation: the curve of accuracy against time, then
the test accuracy of the final model and where the time went. Targets on the 2-core CPU: >= 90% test accuracy in
<= 1/1.8 of the default settings' time, and >= 92% within 30 minutes.

    python benchmarks/cifar10_cpu.py                                                        # the default settings above
    python benchmarks/cifar10_cpu.py --set freeze=last_n:11 --set num_train_epochs=2.3      # recipes/cifar10_cpu.yaml's
    python benchmarks/cifar10_cpu.py --set freeze=last_n:11 --set "image_size_schedule=96 112"
"""

from __future__ import annotations

import hf_transfer  # noqa: F401 - first: it sets OMP_WAIT_POLICY (when unset) before torch loads, as `hf-transfer train` does

# isort: split
import argparse
import tempfile
import time

from common import MIRRORS, REPO, load_average, offline_logging, report
from transformers import TrainerCallback

from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe

DEFAULTS = {"freeze": "full", "image_size": "128", "bf16": "true", "use_cpu": "true", "num_train_epochs": "2.6", "learning_rate": "1e-3",
            "per_device_train_batch_size": "64", "warmup_steps": "70", "lr_scheduler_type": "cosine",
            "save_strategy": "no", "load_best_model_at_end": "false", "data_doctor": "false", "augmentation": "default"}


class Clock(TrainerCallback):
    """Wall seconds since `start` and validation accuracy at every evaluation; when training began and ended, and the
    seconds its evaluations took (Trainer's `eval_runtime`)."""

    def __init__(self, start: float):
        self.start, self.points = start, []
        self.train_begin = self.train_end = None
        self.evaluating = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.perf_counter() - self.start

    def on_train_end(self, args, state, control, **kwargs):
        self.train_end = time.perf_counter() - self.start

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_accuracy" in metrics:
            self.points.append((time.perf_counter() - self.start, state.global_step, state.epoch, metrics["eval_accuracy"]))
            if self.train_end is None:
                self.evaluating += metrics.get("eval_runtime", 0.0)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe option over the defaults; a list as space-separated values (image_size_schedule='96 112')")
    parser.add_argument("--eval-every", type=int, default=500, help="optimizer steps between validation evaluations")
    parser.add_argument("--name", default="cifar10_cpu", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def main() -> None:
    options = arguments()
    offline_logging()
    chosen = {**DEFAULTS, "eval_strategy": "steps", "eval_steps": str(options.eval_every), "logging_steps": str(options.eval_every),
              **dict(item.split("=", 1) for item in options.set)}
    with tempfile.TemporaryDirectory() as output_dir:
        argv = [str(REPO / "recipes" / "cifar10.yaml"), "--dataset", str(MIRRORS["cifar10"]), "--output_dir", output_dir,
                "--disable_tqdm", "true", *[token for key, value in chosen.items() for token in (f"--{key}", *value.split())]]
        start = time.perf_counter()
        clock = Clock(start)
        results = run(parse_recipe(argv), callbacks=(clock,))
        wall = time.perf_counter() - start
    rows = [{"wall_s": round(seconds), "step": step, "epoch": round(epoch, 2), "validation_accuracy": accuracy}
            for seconds, step, epoch, accuracy in clock.points]
    rows.append({"wall_s": round(wall), "step": results.get("train_steps", ""), "epoch": chosen["num_train_epochs"],
                 "validation_accuracy": "", "test_accuracy": results["test_accuracy"]})
    settings = ", ".join(f"{key} {value}" for key, value in chosen.items())
    report(options.name, "All of CIFAR-10 on this machine: accuracy against wall time", rows, notes=[
        f"{settings}; Lite0 ImageNet weights; wall time from the start of the run (dataset preparation included)",
        f"test accuracy {results['test_accuracy']:.4f} on {results['split_sizes']['test']} images after {wall / 60:.1f} min "
        f"(target: >= 0.90 within 30 min); load average at the end {load_average()}",
        f"inference precision: {results['inference_precision']['description']}",
        f"where the time went: {where_time_went(clock, results, wall)}",
    ], columns=["wall_s", "step", "epoch", "validation_accuracy", "test_accuracy"])


def where_time_went(clock: Clock, results: dict, wall: float) -> str:
    """Seconds of data and model preparation, of training steps, of evaluations during training, of the final validation
    and test passes (Trainer's `eval_runtime` and `test_runtime`), and of writing the model repo (the rest)."""
    final = results.get("eval_runtime", 0.0) + results.get("test_runtime", 0.0)
    parts = {"preparation": clock.train_begin, "training steps": clock.train_end - clock.train_begin - clock.evaluating,
             "evaluations during training": clock.evaluating, "final validation and test": final,
             "writing the model repo": wall - clock.train_end - final}
    return ", ".join(f"{name} {seconds:.0f} s ({seconds / wall:.0%})" for name, seconds in parts.items())


if __name__ == "__main__":
    main()
