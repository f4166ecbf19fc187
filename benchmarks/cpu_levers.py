"""The CPU levers of a CIFAR-10 run, each alone and combined, side by side in one invocation: seconds per training step.

Each variant is a real run (`pipeline.run`, as `hf-transfer train` does) of `recipes/cifar10.yaml` on the CIFAR-10 mirror
with the settings of `cifar10_cpu.py` (Lite0 `full`, 128 px, bf16 + channels_last, batch 64) and one change:

- `last_n:11`: the stem and the first three stages (6 of Lite0's 17 blocks, 1.6% of its parameters, the high-resolution
  ones) stay frozen: no backward pass through them;
- `image_size_schedule` at 96 or 112 px: the epoch's batches resized down on the device (progressive resizing);
- `torch_compile: true` (Trainer's own option: inductor on the CPU);
- `bf16: false`: fp32 training (channels_last stays);
- `dataloader_num_workers` 1 or 0 instead of the recipe's 2: fewer processes decoding beside the training one.

The time per optimizer step is the median over the steps after the first `--warmup` (data loading included); the
compile variant's first steps (its compile time) are reported apart. A last row times the forward pass of the blocks
`last_n:11` keeps frozen, alone (no gradients, bf16 + channels_last, a batch of 64 at 128 px): the most a cache of their
output (a "frozen trunk cache") could save per step, before what filling it costs.

    python benchmarks/cpu_levers.py                        # every variant, 40 steps each
    python benchmarks/cpu_levers.py --variants today,last_n:11 --steps 30
"""

from __future__ import annotations

import hf_transfer  # noqa: F401 - first: it sets OMP_WAIT_POLICY (when unset) before torch loads, as `hf-transfer train` does

# isort: split
import argparse
import statistics
import tempfile
import time

from cifar10_cpu import DEFAULTS
from common import MIRRORS, REPO, load_average, offline_logging, report
from transformers import TrainerCallback

from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe

VARIANTS = {
    "today": {},
    "bf16 false": {"bf16": "false"},
    "torch_compile": {"torch_compile": "true"},
    "image_size_schedule 112": {"image_size_schedule": "112"},
    "image_size_schedule 96": {"image_size_schedule": "96"},
    "last_n:11": {"freeze": "last_n:11"},
    "last_n:11 + image_size_schedule 112": {"freeze": "last_n:11", "image_size_schedule": "112"},
    "last_n:11 + image_size_schedule 96": {"freeze": "last_n:11", "image_size_schedule": "96"},
    "last_n:11 + dataloader_num_workers 1": {"freeze": "last_n:11", "dataloader_num_workers": "1"},
    "last_n:11 + dataloader_num_workers 0": {"freeze": "last_n:11", "dataloader_num_workers": "0"},
}


class StepClock(TrainerCallback):
    """Wall seconds of every optimizer step (from one step's end to the next: data loading included)."""

    def __init__(self):
        self.ends = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.ends, self.ends[1:])]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"which, in this order: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--name", default="cpu_levers", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def measure(changes: dict, steps: int, warmup: int) -> dict:
    batch = int(DEFAULTS["per_device_train_batch_size"])
    chosen = {**DEFAULTS, "num_train_epochs": "1", "max_train_samples": str(batch * steps), "max_eval_samples": "64",
              "max_test_samples": "64", "eval_strategy": "no", "logging_strategy": "no", **changes}
    with tempfile.TemporaryDirectory() as output_dir:
        argv = [str(REPO / "recipes" / "cifar10.yaml"), "--dataset", str(MIRRORS["cifar10"]), "--output_dir", output_dir,
                "--disable_tqdm", "true", *[token for key, value in chosen.items() for token in (f"--{key}", *value.split())]]
        clock = StepClock()
        run(parse_recipe(argv), callbacks=(clock,))
    seconds = clock.seconds()
    steady = statistics.median(seconds[warmup:])
    return {"s_per_step": round(steady, 3), "images_per_s": round(batch / steady, 1), "first_steps_s": round(sum(seconds[:warmup]), 1),
            "steps": len(seconds), "load": load_average()}


def frozen_forward(steps: int, warmup: int) -> dict:
    """Seconds of the forward pass of Lite0's stem and first three stages (what `last_n:11` keeps frozen) on one batch."""
    import torch
    from timm.models import create_model

    batch, size = int(DEFAULTS["per_device_train_batch_size"]), int(DEFAULTS["image_size"])
    model = create_model("tf_efficientnet_lite0", pretrained=False).to(memory_format=torch.channels_last).eval()
    trunk = torch.nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:3])
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    seconds = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(steps):
            started = time.perf_counter()
            trunk(images)
            seconds.append(time.perf_counter() - started)
    steady = statistics.median(seconds[warmup:])
    return {"variant": "frozen blocks' forward alone (stem + 3 stages)", "s_per_step": round(steady, 3),
            "images_per_s": round(batch / steady, 1), "first_steps_s": round(sum(seconds[:warmup]), 1), "steps": steps, "load": load_average()}


def main() -> None:
    options = arguments()
    offline_logging()
    rows = []
    for name in options.variants.split(","):
        print(f"\n### {name}", flush=True)
        rows.append({"variant": name, **measure(VARIANTS[name], options.steps, options.warmup)})
        print(rows[-1], flush=True)
    rows.append(frozen_forward(options.steps, options.warmup))
    base = next((row for row in rows if row["variant"] == "today"), None)
    for row in rows:
        row["speed-up"] = round(base["s_per_step"] / row["s_per_step"], 2) if base else ""
    report(options.name, "CPU levers, each alone and combined: seconds per training step (CIFAR-10, Lite0, 128 px, batch 64)", rows,
           notes=[f"{options.steps} steps per variant, median after the first {options.warmup} (`first_steps_s`: their sum, compile "
                  f"time included); settings of cifar10_cpu.py otherwise"],
           columns=["variant", "s_per_step", "images_per_s", "speed-up", "first_steps_s", "steps", "load"])


if __name__ == "__main__":
    main()
