"""What trains, and how fast: blocks, freeze plans, BatchNorm control, layer-wise LRs, staged unfreezing.

Every parameter that trains at any stage is registered with the optimizer (and DDP) from the
start; a block waiting for its stage gets zero gradients and no optimizer update, so unfreezing
mid-run needs no re-wrapping and stays identical across ranks.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import timm.models
import torch
import yaml
from torch import nn
from transformers import PreTrainedModel, TimmWrapperForImageClassification, TrainerCallback
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

logger = logging.getLogger(__name__)

STRATEGIES = ("head_only", "last_n", "full", "patterns", "staged")
BATCHNORM_MODES = ("frozen", "train")
PRESETS = {
    "linear_probe": {"freeze": "head_only", "batchnorm": "frozen"},
    # fastai's fine_tune: one epoch of head, then everything with discriminative learning rates
    "fastai": {"freeze": "staged", "stages": [{"at_epoch": 0, "train": "head"}, {"at_epoch": 1, "train": "all"}]},
    # layer-wise learning-rate decay as in BEiT / timm's --layer-decay
    "llrd": {"freeze": "full", "layer_decay": 0.75},
}
FASTAI_LR_SPREAD = 100  # fastai's slice(lr / 100, lr): the stem learns 100x slower than the head


@dataclass
class FreezeArguments:
    freeze: str = field(
        default="head_only",
        metadata={"help": f"What trains: {' | '.join(STRATEGIES)} (`last_n:<k>` = head + last k blocks), or a preset: {' | '.join(PRESETS)}."},
    )
    stages: str | None = field(
        default=None,
        metadata={"help": "For `staged`: a YAML list such as `[{at_epoch: 0, train: head}, {at_epoch: 1, train: 'last_n:2'}, {at_step: 500, train: all}]`."},
    )
    batchnorm: str = field(default="frozen", metadata={"help": "Normalisation layers in frozen blocks: `frozen` (eval mode, statistics kept) or `train`."})
    layer_decay: float | None = field(default=None, metadata={"help": "Learning rate of a block = lr * layer_decay ** (depth from the head)."})
    train_patterns: list[str] | None = field(default=None, metadata={"help": "For `patterns`: glob(s) over parameter names that train (default: all)."})
    freeze_patterns: list[str] | None = field(default=None, metadata={"help": "For `patterns`: glob(s) over parameter names kept frozen."})

    def __post_init__(self):
        preset = PRESETS.get(self.freeze)
        if preset:
            self.preset = self.freeze
            for key, value in preset.items():
                if key == "freeze" or getattr(self, key) in (None, "frozen"):
                    setattr(self, key, value)
        else:
            self.preset = None
        if isinstance(self.stages, str):
            self.stages = yaml.safe_load(self.stages)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown freeze strategy '{self.freeze}'. Choose one of {STRATEGIES} (e.g. `last_n:2`) or a preset {tuple(PRESETS)}.")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"`batchnorm` must be one of {BATCHNORM_MODES}, not '{self.batchnorm}'.")
        if self.strategy == "staged" and not self.stages:
            raise ValueError("`freeze: staged` needs `stages`, e.g. [{at_epoch: 0, train: head}, {at_epoch: 1, train: all}].")

    @property
    def strategy(self) -> str:
        return self.freeze.split(":")[0]

    def schedule(self) -> list[dict]:
        """The stages as a list, with a single stage for the static strategies."""
        if self.strategy == "staged":
            return [_check_stage(stage) for stage in self.stages]
        return [{"at_step": 0, "train": {"head_only": "head", "full": "all"}.get(self.strategy, self.freeze)}]


def _check_stage(stage: dict) -> dict:
    if set(stage) - {"at_epoch", "at_step", "train"} or "train" not in stage or len(stage) != 2:
        raise ValueError(f"A stage needs `train` and one of `at_epoch` / `at_step`, got {stage}.")
    return stage


@dataclass
class Block:
    name: str
    parameter_names: list[str]


def discover_blocks(model: nn.Module) -> list[Block]:
    """The model's blocks in order from stem to head; the last block is always the classifier head."""
    if isinstance(model, TimmWrapperForImageClassification):
        return _timm_blocks(model.timm_model, prefix="timm_model.")
    if isinstance(model, PreTrainedModel) and _layer_list(model) is not None:
        return _transformers_blocks(model)
    warnings.warn(f"No block structure known for {type(model).__name__}: using its top-level modules as blocks.", stacklevel=2)
    return _top_level_blocks(model)


def _named_block(names: list[str], prefix: str = "") -> Block:
    """Name a group of parameters by the module(s) they live in: `blocks.3.1`, `conv_stem+bn1`."""
    modules = [name.removeprefix(prefix).rsplit(".", 1)[0] for name in names]
    by_top = {}
    for module in modules:
        by_top.setdefault(module.split(".")[0], []).append(module)
    return Block("+".join(_common_dotted_prefix(group) for group in by_top.values()), names)


def _common_dotted_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _timm_blocks(backbone: nn.Module, prefix: str) -> list[Block]:
    """timm's own group matcher (the one behind `--layer-decay`), with the classifier split out as the head."""
    head_ids = {id(p) for p in backbone.get_classifier().parameters()}
    names = {id(p): name for name, p in backbone.named_parameters()}
    head = [prefix + names[i] for i in names if i in head_ids]
    groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=False))
    blocks = []
    for group in groups.values():
        body = [prefix + name for name in group if prefix + name not in head]
        if body:
            blocks.append(_named_block(body, prefix))
    return [*blocks, Block("head", head)]


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The biggest list of same-type layers (`encoder.layer`, `encoder.stages`): the repeated blocks."""
    lists = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(child) for child in module}) == 1
    ]
    if not lists:
        return None
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _classifier_names(model: nn.Module) -> list[str]:
    head = getattr(model, "classifier", None) or getattr(model, "head", None)
    if head is None:
        return []
    head_ids = {id(p) for p in head.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in head_ids]


def _transformers_blocks(model: PreTrainedModel) -> list[Block]:
    list_name, layers = _layer_list(model)
    head = _classifier_names(model)
    before, after, per_layer = [], [], [[] for _ in layers]
    for name, _ in model.named_parameters():
        if name in head:
            continue
        if name.startswith(list_name + "."):
            per_layer[int(name[len(list_name) + 1:].split(".")[0])].append(name)
        elif not any(per_layer):
            before.append(name)
        else:
            after.append(name)
    blocks = [_named_block(before)] if before else []
    blocks += [Block(f"{list_name}.{index}", names) for index, names in enumerate(per_layer) if names]
    blocks += [_named_block(after)] if after else []
    return [*blocks, Block("head", head)]


def _top_level_blocks(model: nn.Module) -> list[Block]:
    blocks = [
        Block(name, [f"{name}.{p}" for p, _ in child.named_parameters()])
        for name, child in model.named_children()
        if any(True for _ in child.parameters())
    ]
    blocks[-1].name = "head"
    return blocks


def _trainable_in(spec: str, blocks: list[Block], args: FreezeArguments) -> set[str]:
    """Parameter names that `spec` (head | all | last_n:<k> | patterns) makes trainable."""
    head = set(blocks[-1].parameter_names)
    everything = {name for block in blocks for name in block.parameter_names}
    if spec == "head":
        return head
    if spec == "all":
        return everything
    if spec.startswith("last_n:"):
        count = int(spec.split(":", 1)[1])
        body = blocks[:-1][-count:] if count > 0 else []
        return head | {name for block in body for name in block.parameter_names}
    if spec == "patterns":
        selected = {n for n in everything if any(fnmatch.fnmatch(n, p) for p in args.train_patterns)} if args.train_patterns else everything
        frozen = {n for n in everything if any(fnmatch.fnmatch(n, p) for p in args.freeze_patterns or [])}
        return (selected | head) - frozen
    raise ValueError(f"Cannot tell what `{spec}` trains: use head, all, last_n:<k> or patterns.")


class FreezePlan:
    """Applies a `FreezeArguments` to a model and keeps it true for the whole run."""

    def __init__(self, model: nn.Module, args: FreezeArguments, learning_rate: float):
        self.model, self.args, self.learning_rate = model, args, learning_rate
        self.blocks = discover_blocks(model)
        self.stages = args.schedule()
        self.stage_sets = [_trainable_in(stage["train"], self.blocks, args) for stage in self.stages]
        self.parameters = dict(model.named_parameters())
        self.ever_trained = set().union(*self.stage_sets)
        decay = args.layer_decay
        if args.preset == "fastai" and decay is None:
            decay = (1 / FASTAI_LR_SPREAD) ** (1 / max(len(self.blocks) - 1, 1))
        self.layer_decay = decay
        self.block_lr = [
            learning_rate * (decay ** (len(self.blocks) - 1 - index) if decay else 1.0) for index in range(len(self.blocks))
        ]
        self.active: set[str] = set()
        self.stage_index = None
        self.history: list[dict] = []
        for name, parameter in self.parameters.items():
            parameter.requires_grad_(name in self.ever_trained)
            if name in self.ever_trained and len(self.stages) > 1:
                parameter.register_hook(self._gradient_gate(name))
        self._norm_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for module in self._norm_layers:
            module.register_forward_pre_hook(self._keep_frozen_norm_in_eval)
        self.enter_stage(0, step=0)

    # --- what the optimizer sees -------------------------------------------------------------
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """One group per block (and per decay / no-decay), each with its layer-decayed learning rate."""
        decayed = set(get_parameter_names(self.model, [*ALL_LAYERNORM_LAYERS, nn.modules.batchnorm._BatchNorm], ["bias", "layernorm", "rmsnorm"]))
        groups = []
        for block, lr in zip(self.blocks, self.block_lr):
            names = [n for n in block.parameter_names if n in self.ever_trained]
            for wd, members in ((weight_decay, [n for n in names if n in decayed]), (0.0, [n for n in names if n not in decayed])):
                if members:
                    groups.append({"params": [self.parameters[n] for n in members], "lr": lr, "weight_decay": wd, "block": block.name})
        return groups

    # --- stage changes -----------------------------------------------------------------------
    def stage_for_step(self, step: int, steps_per_epoch: int) -> int:
        starts = [stage.get("at_step", round(stage.get("at_epoch", 0) * steps_per_epoch)) for stage in self.stages]
        return max(index for index, start in enumerate(starts) if step >= start or index == 0)

    def enter_stage(self, index: int, step: int) -> None:
        if index == self.stage_index:
            return
        self.stage_index, self.active = index, self.stage_sets[index]
        self._active_ids = {id(self.parameters[name]) for name in self.active}
        self.history.append({"stage": index, "started_at_step": step, "train": self.stages[index]["train"], "blocks": self.table()})
        logger.info("Freeze plan, stage %d (%s) from step %d:\n%s", index, self.stages[index]["train"], step, self.render())

    def _gradient_gate(self, name):
        # A block waiting for its stage still gets a gradient tensor (so DDP stays in step) but it is zero.
        return lambda grad: grad if name in self.active else torch.zeros_like(grad)

    def drop_waiting_gradients(self) -> None:
        """Called before each optimizer step: no update at all (not even weight decay) for waiting blocks."""
        for name in self.ever_trained - self.active:
            self.parameters[name].grad = None

    def _keep_frozen_norm_in_eval(self, module, _inputs):
        # Trainer calls model.train() every step; frozen normalisation layers must keep their statistics.
        if module.training and self.args.batchnorm == "frozen" and not any(
            id(p) in self._active_ids for p in module.parameters()
        ):
            module.eval()

    # --- the audit ---------------------------------------------------------------------------
    def table(self) -> list[dict]:
        rows = []
        for block, lr in zip(self.blocks, self.block_lr):
            sizes = [self.parameters[n].numel() for n in block.parameter_names]
            trained = [self.parameters[n].numel() for n in block.parameter_names if n in self.active]
            has_norm = any(
                n.startswith(prefix + ".") for n in block.parameter_names for prefix in self._norm_names
            )
            rows.append({
                "name": block.name,
                "params": sum(sizes),
                "trainable": "yes" if sum(trained) == sum(sizes) else ("partly" if trained else "no"),
                "lr": lr if trained else 0.0,
                "batchnorm": ("train" if trained or self.args.batchnorm == "train" else "frozen") if has_norm else "-",
            })
        return rows

    @property
    def _norm_names(self) -> list[str]:
        return [name for name, module in self.model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]

    def render(self) -> str:
        rows = self.table()
        width = max(len(row["name"]) for row in rows)
        lines = [f"{'block':<{width}}  {'params':>10}  trainable  {'lr':>9}  batchnorm"]
        lines += [
            f"{r['name']:<{width}}  {r['params']:>10,}  {r['trainable']:<9}  {r['lr']:>9.2e}  {r['batchnorm']}" for r in rows
        ]
        total = sum(r["params"] for r in rows)
        trainable = sum(self.parameters[n].numel() for n in self.active)
        lines.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        return "\n".join(lines)

    def summary(self) -> dict:
        return {
            "strategy": self.args.strategy,
            "freeze": self.args.freeze,
            "preset": self.args.preset,
            "batchnorm": self.args.batchnorm,
            "layer_decay": self.layer_decay,
            "stages": self.stages,
            "trainable_parameters": sum(self.parameters[n].numel() for n in self.active),
            "total_parameters": sum(p.numel() for p in self.parameters.values()),
            "blocks": self.table(),
            "history": self.history,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.summary(), indent=2))


class FreezeCallback(TrainerCallback):
    """Moves the plan through its stages at the declared epoch or step (also after `--resume`)."""

    def __init__(self, plan: FreezePlan):
        self.plan = plan
        self.steps_per_epoch = 1

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None:
            self.steps_per_epoch = max(len(train_dataloader) // args.gradient_accumulation_steps, 1)
        self._sync(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.plan.drop_waiting_gradients()

    def _sync(self, state):
        self.plan.enter_stage(self.plan.stage_for_step(state.global_step, self.steps_per_epoch), step=state.global_step)
