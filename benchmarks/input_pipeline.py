"""Input pipeline: decode + transform rate (images/s) of hf_transfer's loader against the model's step rate.

Loader paths, each through a torch DataLoader with hf_transfer's collate:
- `cpu-resize`: hf_transfer's own (decode, timm transforms to the model's input size, on the CPU).
- `device-resize`: hf_transfer's `resize_on_device` path: the CPU decodes at the images' own size
  (32 px for CIFAR-10) and shifts/flips them there; the upsampling to the input size, the crop and
  the normalisation run on the device (`hf_transfer.data.device_resize.DeviceResize`), timed separately (`device resize img/s`).
Model rates, on random tensors at the input size: a full fine-tuning step and a frozen-backbone
forward (what the feature cache's extraction needs), at the same batch and precision.

    python benchmarks/input_pipeline.py --dataset ../shared/datasets/cifar10 --images 1000 --workers 0,2
"""

from __future__ import annotations

import argparse
import time

import torch
from common import Stopwatch, device, median, report
from torch.utils.data import DataLoader

from hf_transfer.data import attach_transforms, build_transforms, collate, load_image_dataset
from hf_transfer.data.device_resize import DeviceResize, device_transforms
from hf_transfer.images import load_image
from hf_transfer.models import data_config, load_model
from hf_transfer.options import DataArguments, ModelArguments


def loader_rates(dataset, batch_size: int, workers: int) -> tuple[float, float]:
    """Images/s of one pass: with worker start-up (Trainer restarts workers every epoch unless
    `dataloader_persistent_workers`) and in steady state (from the first batch on)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    next(iter(DataLoader(dataset, batch_size=batch_size, collate_fn=collate)))  # warm caches and lazy imports
    start = time.perf_counter()
    batches = iter(loader)
    first = len(next(batches)["labels"])
    steady_start = time.perf_counter()
    rest = sum(len(batch["labels"]) for batch in batches)
    end = time.perf_counter()
    return (first + rest) / (end - start), rest / (end - steady_start)


def model_rates(model, config: dict, batch_size: int, bf16: bool, channels_last: bool, steps: int) -> dict:
    """Images/s of a full training step and of an inference forward, on random tensors."""
    model.to(device())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    _, height, width = config["input_size"]
    images = torch.randn(batch_size, 3, height, width, device=device())
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, model.config.num_labels, (batch_size,), device=device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = dict(device_type=device().type, dtype=torch.bfloat16, enabled=bf16)

    def train_step():
        with torch.autocast(**autocast):
            loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with torch.inference_mode(), torch.autocast(**autocast):
            model(pixel_values=images)

    rates = {}
    for name, step, mode in (("train step", train_step, True), ("frozen forward", forward, False)):
        model.train(mode)
        step()  # warm-up (cudnn autotuning, allocations)
        times = []
        for _ in range(3):
            with Stopwatch() as watch:
                for _ in range(steps):
                    step()
            times.append(watch.seconds)
        rates[name] = batch_size * steps / median(times)
    return rates


def device_resize_rate(config: dict, batch_size: int, source: int, steps: int = 20) -> float:
    resize = DeviceResize(config)
    batch = torch.randint(0, 256, (batch_size, 3, source, source), dtype=torch.uint8)
    if device().type == "cuda":
        batch = batch.pin_memory()
    resize(batch.to(device()))
    with Stopwatch() as watch:
        for _ in range(steps):
            resize(batch.to(device(), non_blocking=True))
    return batch_size * steps / watch.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="../shared/datasets/cifar10")
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--images", type=int, default=1000, help="train images decoded per measurement")
    parser.add_argument("--workers", default="0,2", help="dataloader_num_workers values; 0 is Trainer's default")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", default=torch.cuda.is_available())
    parser.add_argument("--channels-last", action="store_true", default=torch.cuda.is_available())
    parser.add_argument("--device-resize", action="store_true", default=None, help="also measure the device-resize path (default: when images are small)")
    parser.add_argument("--source-size", type=int, default=32, help="image size of the device resize timing's random batches")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True

    data = load_image_dataset(DataArguments(dataset=args.dataset, max_train_samples=args.images, max_eval_samples=8, max_test_samples=None))
    model, processor = load_model(ModelArguments(model=args.model, pretrained=False), data.labels)
    config = data_config(model, processor)
    train_cpu, _ = build_transforms(config)
    source = load_image(data.splits["train"][0][data.image_column]).size
    paths = {"cpu-resize": attach_transforms(data, train_cpu, train_cpu)["train"]}
    small = args.device_resize if args.device_resize is not None else args.dataset.rstrip("/").endswith("cifar10")
    if small:
        train_small, _, _ = device_transforms(config, source[::-1])  # (height, width) of the decoded images
        paths["device-resize"] = attach_transforms(data, train_small, train_small)["train"]

    rates = model_rates(model, config, args.batch_size, args.bf16, args.channels_last, args.model_steps)
    print(f"model: {rates}", flush=True)
    resize_rate = device_resize_rate(config, args.batch_size, args.source_size) if small else None
    rows = []
    for path, dataset in paths.items():
        for workers in (int(w) for w in args.workers.split(",")):
            with_start, rate = loader_rates(dataset, args.batch_size, workers)
            row = {
                "loader path": path, "workers": workers, "loader img/s": rate, "incl. worker start-up": with_start,
                "device resize img/s": resize_rate if path == "device-resize" else "-",
                "train step img/s": rates["train step"], "frozen forward img/s": rates["frozen forward"],
                "loader / train step": rate / rates["train step"], "loader / frozen forward": rate / rates["frozen forward"],
                # with 0 workers loading and computing take turns: the share of each step spent loading
                "loading share (0 workers, train)": f"{100 * rates['train step'] / (rate + rates['train step']):.0f}%" if workers == 0 else "-",
                "bottleneck (train / cache)": f"{'loader' if rate < rates['train step'] else 'model'} / {'loader' if rate < rates['frozen forward'] else 'model'}",
            }
            rows.append(row)
            print(row, flush=True)
    _, height, _ = config["input_size"]
    report(
        "input_pipeline",
        f"Input pipeline vs. model step rate ({device().type}): {args.dataset.rstrip('/').split('/')[-1]}, {args.model.split('/')[-1]}",
        rows,
        notes=[
            f"{args.images} train images (first one {source[0]}x{source[1]} px -> {height} px), batch {args.batch_size}; "
            "loader img/s = one DataLoader pass in steady state (after the first batch); `incl. worker start-up` from the DataLoader's creation",
            f"model rates on random tensors, {'bf16 autocast' if args.bf16 else 'fp32'}, channels_last {args.channels_last}, torch threads {torch.get_num_threads()}",
            "bottleneck = the slower of loader and model for a full fine-tuning step / for the feature cache's extraction forward",
            "`dataloader_num_workers` defaults to Trainer's 0 on a CPU and to min(8, cores) on CUDA (hf_transfer.recipe.device_defaults)",
        ],
    )


if __name__ == "__main__":
    main()
