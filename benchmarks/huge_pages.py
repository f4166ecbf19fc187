"""torch's CPU allocations on transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`) or not, side by side: images/s of Lite0's
forward pass without gradients (as extraction and evaluation run it) and of its training steps, with the page faults each
costs.

A batch's activations (128 images at 224 px: about 100 MB per tensor in bf16) are larger than glibc's largest heap block,
so every one is a fresh mmap, faulted in 4 KB at a time and returned on free. c10 reads THP_MEM_ALLOC_ENABLE once, at its
first allocation, so each variant runs in its own process; rounds alternate which goes first.

    python benchmarks/huge_pages.py                      # 4 rounds
    python benchmarks/huge_pages.py --rounds 2 --forward-batches 4 --train-steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from common import load_average, median, offline_logging, report

VARIANTS = {"4 KB pages (THP_MEM_ALLOC_ENABLE=0)": "0", "huge pages (THP_MEM_ALLOC_ENABLE=1)": "1"}
MODEL = "timm/tf_efficientnet_lite0.in1k"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--forward-batches", type=int, default=6, help="timed forward batches of 128 images at 224 px")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps of 64 images at 128 px")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="huge_pages", help="results file: benchmarks/results/<name>.md")
    return parser.parse_args()


def timed(work, repeats: int) -> tuple[float, int]:
    """Seconds of the fastest of `repeats` calls of `work` (after one untimed), and the minor page faults of all of them."""
    work()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def child(options: argparse.Namespace) -> None:
    """In this process (one variant): Lite0 as hf_transfer loads it, bf16 autocast and channels_last."""
    import hf_transfer  # noqa: F401 - first, as `hf-transfer` does: its thread and page policies before torch loads

    # isort: split
    import torch

    from hf_transfer.models import load_model
    from hf_transfer.options import ModelArguments

    torch.manual_seed(0)
    model, _ = load_model(ModelArguments(model=MODEL), [str(index) for index in range(10)])
    model = model.to(memory_format=torch.channels_last)
    found = {}
    model.eval()
    pixels = torch.randn(128, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(pixel_values=pixels)

    seconds, faults = timed(forward, options.forward_batches)
    found["forward images/s"], found["forward faults per batch"] = 128 / seconds, faults / options.forward_batches
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels, labels = torch.randn(64, 3, 128, 128).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (64,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds, faults = timed(step, options.train_steps)
    found["training images/s"], found["training faults per step"] = 64 / seconds, faults / options.train_steps
    found["max RSS MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(found), flush=True)


def main() -> None:
    options = arguments()
    offline_logging()
    if options.child:
        return child(options)
    results = {name: [] for name in VARIANTS}
    for round_index in range(options.rounds):
        names = list(VARIANTS)[round_index % 2:] + list(VARIANTS)[:round_index % 2]
        for name in names:
            command = [sys.executable, __file__, "--child", "--forward-batches", str(options.forward_batches), "--train-steps",
                       str(options.train_steps)]
            done = subprocess.run(command, env={**os.environ, "THP_MEM_ALLOC_ENABLE": VARIANTS[name]}, capture_output=True,
                                  text=True, check=True)
            found = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
            results[name].append(found)
            print(f"round {round_index + 1}, {name}: " + ", ".join(f"{key} {value:,.1f}" for key, value in found.items()), flush=True)
    base, huge = list(VARIANTS)
    rows = []
    for name, found in results.items():
        row = {"allocations": name, **{key: median([one[key] for one in found]) for key in found[0]}}
        for key in ("forward images/s", "training images/s"):
            row[f"{key.split()[0]} x 4 KB"] = median([one[key] / other[key] for one, other in zip(found, results[base])])
        rows.append(row)
    report(options.name, "torch's CPU allocations on huge pages (Lite0, bf16 autocast, channels_last)", rows, notes=[
        f"forward: batches of 128 at 224 px, inference mode, the fastest of {options.forward_batches}; training: steps of 64 at "
        f"128 px, every block trains (AdamW), the fastest of {options.train_steps}; one process per variant and round, "
        f"{options.rounds} rounds alternating which goes first; medians over rounds, ratios within a round",
        f"transparent_hugepage: {open('/sys/kernel/mm/transparent_hugepage/enabled').read().strip()}; load average after: "
        f"{load_average()}",
    ])


if __name__ == "__main__":
    main()
