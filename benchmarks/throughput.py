"""Training throughput (images/s) of backbones as hf_transfer loads them, against the card's FLOP ceiling.

Random init, random images at the model's input size, bf16 autocast, AdamW: eager or `torch.compile`,
NCHW or channels_last. The ceiling is the measured bf16 matmul rate over the counted FLOPs of one
training step (3 x the forward FLOPs counted by torch's FlopCounterMode).

    python benchmarks/throughput.py                      # GPU: the three models, four variants each
    python benchmarks/throughput.py --batch-size 4 --steps 2 --variants eager   # CPU syntax check
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import Stopwatch, device, median, report, synchronize
from torch.utils.flop_counter import FlopCounterMode

from hf_transfer.models import load_model
from hf_transfer.options import ModelArguments

MODELS = ("tf_efficientnet_lite0", "resnet50", "vit_base_patch16_224")
VARIANTS = ("eager", "eager_cl", "compile", "compile_cl")
# A training step = forward + backward (gradients of inputs and of weights): about 3 forwards.
# For ViT-B/16 FlopCounterMode's own backward count agrees (3.0x); for Lite0 it gave 41x the forward,
# apparently counting the backward of grouped (depthwise) convolutions as dense ones.
TRAINING_TO_FORWARD = 3


def matmul_rate(size: int, repeats: int = 10) -> float:
    """FLOP/s of a size^3 bf16 matrix product on random data (mean of `repeats` after 3 warm-ups)."""
    target = device()
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=target, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    with Stopwatch() as watch:
        for _ in range(repeats):
            a @ b
    return 2 * size**3 * repeats / watch.seconds


def build(name: str, variant: str, num_labels: int):
    labels = [f"class_{index}" for index in range(num_labels)]
    model, _ = load_model(ModelArguments(model=name, pretrained=False), labels)
    model.to(device()).train()
    if variant.endswith("_cl"):
        model.to(memory_format=torch.channels_last)
    if variant.startswith("compile"):
        model.compile()
    return model


def batch(model, size: int, num_labels: int, channels_last: bool):
    _, height, width = model.config.pretrained_cfg["input_size"]
    images = torch.randn(size, 3, height, width, device=device())
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, num_labels, (size,), device=device())


def train_step(model, optimizer, images, labels) -> None:
    with torch.autocast(device().type, dtype=torch.bfloat16):
        loss = model(pixel_values=images, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def forward_flops_per_image(name: str, num_labels: int) -> float:
    """Forward FLOPs per image, counted on an eager copy with batch 2 (a multiply-add counts as 2)."""
    model = build(name, "eager", num_labels)
    images, labels = batch(model, 2, num_labels, channels_last=False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        with torch.autocast(device().type, dtype=torch.bfloat16):
            model(pixel_values=images, labels=labels)
    del model
    return counter.get_total_flops() / 2


def measure(name: str, variant: str, batch_size: int, warmup: int, steps: int, windows: int, num_labels: int) -> dict:
    model = build(name, variant, num_labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = batch(model, batch_size, num_labels, channels_last=variant.endswith("_cl"))
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Stopwatch() as first:  # includes compilation for the compiled variants
        for _ in range(warmup):
            train_step(model, optimizer, images, labels)
    times = []
    for _ in range(windows):
        with Stopwatch() as watch:
            for _ in range(steps):
                train_step(model, optimizer, images, labels)
        times.append(watch.seconds)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device().type == "cuda" else float("nan")
    del model, optimizer
    gc.collect()
    if device().type == "cuda":
        torch.cuda.empty_cache()
    return {
        "images_per_s": batch_size * steps / median(times),
        "step_ms": 1000 * median(times) / steps,
        "warmup_s": first.seconds,
        "peak_GiB": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--num-labels", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=8192)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True

    rate = matmul_rate(args.matmul_size)
    print(f"matmul ({args.matmul_size}^3, {'bf16' if device().type == 'cuda' else 'fp32'}): {rate / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for name in args.models.split(","):
        forward = forward_flops_per_image(name, args.num_labels)
        step = TRAINING_TO_FORWARD * forward
        ceiling = rate / step
        for variant in args.variants.split(","):
            result = measure(name, variant, args.batch_size, args.warmup, args.steps, args.windows, args.num_labels)
            row = {
                "model": name, "variant": variant, "batch": args.batch_size,
                "img/s": result["images_per_s"], "step ms": result["step_ms"],
                "GFLOP/img fwd": forward / 1e9, "GFLOP/img train": step / 1e9,
                "ceiling img/s": ceiling, "% of ceiling": 100 * result["images_per_s"] / ceiling,
                "achieved TFLOP/s": result["images_per_s"] * step / 1e12,
                "warm-up s": result["warmup_s"], "peak GiB": result["peak_GiB"],
            }
            rows.append(row)
            print(row, flush=True)
            synchronize()
    report(
        "throughput",
        f"Training throughput, bf16 autocast, random init ({device().type})",
        rows,
        notes=[
            f"matmul ceiling: {rate / 1e12:.1f} TFLOP/s measured in this run ({args.matmul_size}^3 product, random data)",
            "ceiling img/s = matmul rate / (3 x forward FLOPs per image counted by FlopCounterMode); a multiply-add = 2 FLOPs",
            f"{args.warmup} warm-up steps (compilation included in `warm-up s`), then median of {args.windows} windows of {args.steps} steps",
            "model = hf_transfer.models.load_model(pretrained=False): TimmWrapperForImageClassification, loss inside; AdamW",
        ],
    )


if __name__ == "__main__":
    main()
