"""Framework overhead: time per training step of hf_transfer's Trainer path vs. a minimal PyTorch loop.

Same backbone weights, batch, images, precision and threads, in one process. The images are 32 px
uint8 (CIFAR-10's size) held in memory and upsampled on the device by the same code in every path
(hf_transfer.data.device_resize.DeviceResize; no augmentation), so that loading costs all paths the same
and little. The contenders alternate round by round (the order rotates), and each round's time per
step is taken between two synchronised step ends. Reported: the median over rounds of (Trainer step
/ plain step).

- plain: the bare timm model, `F.cross_entropy`, AdamW (decay / no-decay groups), zero_grad.
- trainer: what hf_transfer.pipeline.run builds: recipe defaults, TimmWrapperForImageClassification,
  FreezePlan + its callback and BatchNorm hooks, AdamW on the plan's per-block groups,
  hf_transfer's SafeTrainer (a transformers.Trainer that stops on a NaN/inf loss; grad clipping at 1.0).
- trainer_noclip: the same with `max_grad_norm: 0` (Trainer still computes the norm, for its log).
- plain_recipe: the plain loop doing what the recipe does besides: hf_transfer's optimizer groups (one
  or two per block, for layer-wise learning rates), grad clipping at 1.0 and the linear warmup/decay
  schedule. The Trainer's ratio to it is the framework's own cost; the ratio to `plain` adds the recipe's.

    python benchmarks/overhead.py                                  # CPU: fp32, batch 16
    python benchmarks/overhead.py --batch-size 256 --bf16          # GPU
    python benchmarks/overhead.py --threads 1 --clock cpu          # CPU shared with other jobs

`--clock cpu` times the main thread's CPU time instead of the wall clock: with one torch thread, no
GPU and no dataloader workers the whole step runs on that thread, and what other processes take of
a shared machine's cores is left out, so fixed per-step costs can be compared under load.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from common import alternating_rounds, device, load_average, median, report, synchronize
from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback, get_scheduler

from hf_transfer.data import collate
from hf_transfer.data.device_resize import DeviceResize
from hf_transfer.freezing import FreezePlan
from hf_transfer.models import data_config, load_model
from hf_transfer.pipeline import build_trainer, run_arguments
from hf_transfer.recipe import parse_recipe

RECIPE_LOOP = "plain loop + recipe's groups, clipping, schedule"
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


class Images(Dataset):
    """Fixed 32 px uint8 images in memory."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "labels": int(self.labels[index])}


class StepClock(TrainerCallback):
    """Time between the end of step `first` and the end of step `last` (GPU synchronised at both)."""

    def __init__(self, first: int, last: int, clock):
        self.first, self.last, self.clock, self.seconds = first, last, clock, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.first, self.last):
            synchronize()
            now = self.clock()
            if state.global_step == self.first:
                self.start = now
            else:
                self.seconds = now - self.start


def build_recipe(args, output_dir: str, clip: bool):
    return parse_recipe(
        [], dataset="in-memory", model=args.model, pretrained=False, freeze=args.freeze, output_dir=output_dir,
        per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        eval_strategy="no", save_strategy="no", load_best_model_at_end=False, bf16=args.bf16,
        max_grad_norm=1.0 if clip else 0.0, dataloader_num_workers=0,
        disable_tqdm=True, seed=args.seed,
    )


def resize_config(model, processor, args) -> dict:
    config = data_config(model, processor)
    if args.image_size:
        config["input_size"] = (3, args.image_size, args.image_size)
    return config


class TrainerPath:
    """hf_transfer's Trainer, built as pipeline.run builds it; each round is one `train()` of warmup + steps."""

    def __init__(self, args, dataset: Images, labels: list[str], clip: bool):
        self.folder = tempfile.TemporaryDirectory()
        recipe = build_recipe(args, self.folder.name, clip)
        torch.manual_seed(args.seed)
        self.model, processor = load_model(recipe.model, labels)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        DeviceResize(resize_config(self.model, processor, args), args.channels_last).attach(self.model)
        plan = FreezePlan(self.model, recipe.freezing, recipe.training.learning_rate)
        self.clock = StepClock(args.warmup, args.warmup + args.steps, CLOCKS[args.clock])
        self.trainer = build_trainer(recipe, run_arguments(recipe), self.model, processor, plan, {"train": dataset},
                                     callbacks=(self.clock,))

    def round(self) -> float:
        self.trainer.lr_scheduler = None  # a fresh schedule each round, as a new run would have
        self.trainer.train()
        return self.clock.seconds


class PlainPath:
    """The minimal loop a PyTorch user writes, on the same weights (no hf_transfer code in the step);
    with `as_recipe`, also the recipe's optimizer groups, grad clipping and learning-rate schedule."""

    def __init__(self, args, dataset: Images, labels: list[str], as_recipe: bool = False):
        recipe = build_recipe(args, tempfile.gettempdir(), clip=as_recipe)
        torch.manual_seed(args.seed)
        wrapper, processor = load_model(recipe.model, labels)
        self.model = wrapper.timm_model.to(device())
        self.resize = DeviceResize(resize_config(wrapper, processor, args), args.channels_last)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        head = {id(p) for p in self.model.get_classifier().parameters()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(args.freeze == "full" or id(parameter) in head)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        training = recipe.training
        groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": training.weight_decay},
                  {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
        if as_recipe:
            groups = self.block_groups(recipe, labels, training.weight_decay)
        self.optimizer = torch.optim.AdamW(
            groups, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_epsilon,
        )
        self.trainable, self.training_args, self.as_recipe = trainable, training, as_recipe
        self.frozen_norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                             and not any(p.requires_grad for p in m.parameters())]
        self.loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                 pin_memory=torch.cuda.is_available(), drop_last=True)
        self.args = args

    def block_groups(self, recipe, labels, weight_decay: float) -> list[dict]:
        """hf_transfer's optimizer groups (one or two per block), taken from a FreezePlan on a throwaway
        copy of the model so that none of the plan's hooks land on this one."""
        copy, _ = load_model(recipe.model, labels)
        plan = FreezePlan(copy, recipe.freezing, recipe.training.learning_rate)
        names = {id(p): name.removeprefix("timm_model.") for name, p in copy.named_parameters()}
        mine = dict(self.model.named_parameters())
        return [{**group, "params": [mine[names[id(p)]] for p in group["params"]]} for group in plan.parameter_groups(weight_decay)]

    def round(self) -> float:
        self.model.train()
        for module in self.frozen_norms:  # frozen BatchNorm keeps its statistics, as in hf_transfer
            module.eval()
        schedule = None
        if self.as_recipe:  # a fresh schedule each round, as the Trainer path has
            schedule = get_scheduler(
                self.training_args.lr_scheduler_type, self.optimizer, num_training_steps=len(self.loader),
                num_warmup_steps=self.training_args.get_warmup_steps(len(self.loader)),
            )
        for step, batch in enumerate(self.loader, start=1):
            images = self.resize(batch["pixel_values"].to(device(), non_blocking=True))
            labels = batch["labels"].to(device(), non_blocking=True)
            with torch.autocast(device().type, dtype=torch.bfloat16, enabled=self.args.bf16):
                loss = F.cross_entropy(self.model(images), labels)
            loss.backward()
            if self.as_recipe:
                torch.nn.utils.clip_grad_norm_(self.trainable, self.training_args.max_grad_norm)
            self.optimizer.step()
            if schedule is not None:
                schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            if step == self.args.warmup:
                synchronize()
                start = CLOCKS[self.args.clock]()
        synchronize()
        return CLOCKS[self.args.clock]() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0.in1k")
    parser.add_argument("--freeze", default="full", choices=("full", "head_only"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's input size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each round")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="`cpu`: see above (CPU only, with --threads 1)")
    args = parser.parse_args()
    if args.clock == "cpu" and (torch.cuda.is_available() or args.threads != 1):
        parser.error("--clock cpu needs --threads 1 and no GPU: the step must run on the main thread alone")
    torch.set_num_threads(args.threads)
    load_at_start = load_average()
    torch.backends.cudnn.benchmark = True

    labels = [f"class_{index}" for index in range(10)]
    probe, processor = load_model(build_recipe(args, tempfile.gettempdir(), True).model, labels)
    size = resize_config(probe, processor, args)["input_size"][-1]
    del probe
    generator = torch.Generator().manual_seed(args.seed)
    count = args.batch_size * (args.warmup + args.steps)  # one round = one epoch, as in a real run
    pixels = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    dataset = Images(pixels, torch.randint(0, 10, (count,), generator=generator))

    # The plain paths first: a new TrainingArguments resets accelerate's state under existing Trainers.
    plain = PlainPath(args, dataset, labels)
    plain_recipe = PlainPath(args, dataset, labels, as_recipe=True)
    contenders = {
        "plain PyTorch loop": plain,
        "hf_transfer Trainer": TrainerPath(args, dataset, labels, clip=True),
        "hf_transfer Trainer, no grad clipping": TrainerPath(args, dataset, labels, clip=False),
        RECIPE_LOOP: plain_recipe,
    }
    names = list(contenders)
    seconds = alternating_rounds(contenders, args.rounds, args.steps,
                                 lambda seconds: print({name: f"{1000 * seconds[name][-1]:.1f} ms" for name in names}, flush=True))

    rows = []
    for name in names:
        ratios = [mine / base for mine, base in zip(seconds[name], seconds[names[0]])]
        to_recipe = [mine / base for mine, base in zip(seconds[name], seconds[RECIPE_LOOP])]
        rows.append({
            "path": name,
            "median step ms": 1000 * median(seconds[name]),
            "img/s": args.batch_size / median(seconds[name]),
            "median ratio to plain": median(ratios),
            "overhead %": 100 * (median(ratios) - 1),
            "min..max ratio": f"{min(ratios):.3f}..{max(ratios):.3f}",
            "% vs recipe by hand": 100 * (median(to_recipe) - 1) if "Trainer" in name else "",
        })
    report(
        "overhead",
        f"Framework overhead per training step ({device().type}, {args.model.split('/')[-1]}, {args.freeze})",
        rows,
        notes=[
            f"batch {args.batch_size}, 32 px uint8 images upsampled to {size} px on the device, {'bf16 autocast' if args.bf16 else 'fp32'}, channels_last {args.channels_last}, "
            f"torch threads {args.threads}, random-init weights (identical for all paths), "
            "dataloader_num_workers 0 (the input pipeline is measured by input_pipeline.py)",
            f"{args.rounds} rounds after one warm-up round, order rotated each round; per round {args.warmup} untimed + {args.steps} timed steps, "
            f"{'wall clock' if args.clock == 'wall' else 'CPU time of the main thread (--clock cpu)'}",
            "ratio = Trainer step time / plain step time in the same round; target: overhead at most 5%",
            f"`% vs recipe by hand`: the same ratio against `{RECIPE_LOOP}` (what the Trainer adds by itself)",
            f"load average at the start: {load_at_start} (at the end: see machine)",
        ],
    )


if __name__ == "__main__":
    main()
