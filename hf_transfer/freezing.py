"""What trains, and how fast: the freeze options and the plan that applies them (BatchNorm, layer-wise rates, stages).

Every parameter that trains at any stage is registered with the optimizer (and DDP) from the start; a block
waiting for its stage gets zero gradients (one process: none) and no update, so unfreezing needs no re-wrapping.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import TimmWrapperForImageClassification

from .blocks import discover_blocks
from .checksums import checksum
from .errors import HFTransferError
from .options import FreezeArguments

logger = logging.getLogger(__name__)

_BATCHNORM = nn.modules.batchnorm._BatchNorm  # the norm layers with running statistics (not Layer/GroupNorm)


class FreezePlanError(HFTransferError, ValueError):
    """A freeze option that does not fit the model (a pattern that matches nothing...); the message says why."""


# --- the plan ------------------------------------------------------------------------------------

def _norm_owner(norm_name: str, norm: nn.Module, parameter_names: list[str]) -> list[str]:
    """The parameters that decide whether a norm layer trains: its own, or its parent's when it has none."""
    own = [f"{norm_name}.{name}" for name, _ in norm.named_parameters()]
    if own:
        return own
    parent = norm_name.rsplit(".", 1)[0] + "." if "." in norm_name else ""
    return [name for name in parameter_names if name.startswith(parent)]


class FreezePlan:
    """Applies a `FreezeArguments` to a model and keeps it true for the whole run."""

    def __init__(self, model: nn.Module, args: FreezeArguments, learning_rate: float):
        self.model, self.args, self.learning_rate = model, args, learning_rate
        self.blocks = discover_blocks(model)
        self.parameters = dict(model.named_parameters())
        self.stages = [dict(stage) for stage in args.schedule]  # the plan's own: the recipe's schedule stays as written
        self.stage_sets = [self._trainable_in(stage["train"]) for stage in self.stages]
        for stage, trainable in zip(self.stages, self.stage_sets):
            if not trainable:
                raise FreezePlanError(f"Nothing would train in stage {stage}: check `freeze_patterns`.")
        self.ever_trained = set().union(*self.stage_sets)
        depth = len(self.blocks) - 1  # of the stem, counted from the head
        self.layer_decay = args.decay_for(depth)
        self.block_lr = [learning_rate * (self.layer_decay or 1.0) ** (depth - index) for index in range(len(self.blocks))]
        self.lr_scales = [float(stage.get("lr_scale", 1.0)) for stage in self.stages]
        self.stage_starts: list[int | None] | None = None
        self.stage_index: int | None = None
        # A stage waiting for a plateau: the best metric and the evaluations without improvement since its predecessor began.
        self.plateau = {"best": None, "evaluations": 0}
        self.reasons: dict[int, str] = {}
        self._applied_scale = 1.0
        # With a single process nobody needs the waiting blocks' zero gradients: FreezeCallback sets this, and from the next
        # stage entered (the first, at the start of training) waiting blocks get none, which skips their backward pass.
        self.skip_waiting_backward = False
        self.history: list[dict] = []
        self.integrity: dict | None = None

        for name, parameter in self.parameters.items():
            parameter.requires_grad_(name in self.ever_trained)
        self._norms = {name: (module, _norm_owner(name, module, list(self.parameters)))
                       for name, module in model.named_modules() if isinstance(module, _BATCHNORM)}
        self._activate(0)
        # What must end bit-identical: parameters that never train and the statistics that are never updated.
        kept_norms = [name for name, (_, owner) in self._norms.items()
                      if args.batchnorm == "eval" or (args.batchnorm == "frozen" and not self.ever_trained & set(owner))]
        self._fixed = [n for n in self.parameters if n not in self.ever_trained]
        self._fixed += [f"{norm}.{b}" for norm in kept_norms for b, _ in self._norms[norm][0].named_buffers()]
        self._fixed_checksum = self._checksum(self._fixed)

    @contextlib.contextmanager
    def attached(self):
        """The plan's hooks on the model while it trains: frozen BatchNorm layers kept in eval mode (Trainer calls
        `model.train()` every step) and, in a staged plan on several processes, zero gradients for the blocks waiting for
        their stage (every process's reducer expects a gradient for every parameter it registered)."""
        handles = []
        if len(self.stages) > 1 and not self.skip_waiting_backward:  # one process: waiting blocks take no backward at all
            handles += [parameter.register_hook(self._gradient_gate(name)) for name, parameter in self.parameters.items()
                        if name in self.ever_trained]
        # A hook costs every forward pass: only on norm layers that some stage keeps frozen (none for `full`).
        for name, (module, _) in self._norms.items():
            if any(self.norm_mode(name, trained) == "frozen" for trained in self.stage_sets):
                handles.append(module.register_forward_pre_hook(self._keep_frozen_norm_in_eval))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _trainable_in(self, target: str) -> set[str]:
        """Parameter names that `target` (head | all | last_n:<k> | patterns) makes trainable."""
        head = set(self.blocks[-1].parameter_names)
        if target == "head":
            return head
        if target == "all":
            return set(self.parameters)
        if target.startswith("last_n:"):
            count = int(target.split(":", 1)[1])
            body = self.blocks[:-1]
            if count > len(body):
                logger.warning("`%s` asks for more blocks than the model has (%d): everything trains.", target, len(body))
            return head.union(*(block.parameter_names for block in body[len(body) - count:] if count))
        trained = self._matching(self.args.train_patterns) if self.args.train_patterns else set(self.parameters)
        return (trained | head) - self._matching(self.args.freeze_patterns or [])

    def _matching(self, patterns: list[str]) -> set[str]:
        matched = set()
        for pattern in patterns:
            hits = {name for name in self.parameters if fnmatch.fnmatchcase(name, pattern)}
            if not hits:
                examples = ", ".join(list(self.parameters)[:: max(len(self.parameters) // 4, 1)][:4])
                raise FreezePlanError(f"Pattern '{pattern}' matches no parameter of this model; its names look like {examples}.")
            matched |= hits
        return matched

    # --- what the optimizer sees -------------------------------------------------------------
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """One group per block (and per decay / no-decay), each with its layer-decayed learning rate.

        Biases, norm weights and other 1-d tensors (and timm's `no_weight_decay()` names) get no weight decay.
        Not timm's `param_groups_layer_decay`: its `lr_scale` reaches no torch optimizer or Trainer schedule, and it serves
        timm models only (tests/test_freezing.py shows the first).
        """
        no_decay = self._no_weight_decay_names()
        groups = []
        for block, lr in zip(self.blocks, self.block_lr):
            names = [n for n in block.parameter_names if n in self.ever_trained]
            decayed = [n for n in names if self.parameters[n].ndim > 1 and n not in no_decay]
            for wd, members in ((weight_decay, decayed), (0.0, [n for n in names if n not in decayed])):
                if members:
                    groups.append({"params": [self.parameters[n] for n in members], "lr": lr, "weight_decay": wd, "block": block.name})
        return groups

    def _no_weight_decay_names(self) -> set[str]:
        timm_model, prefix = self.model, ""
        if isinstance(self.model, TimmWrapperForImageClassification):
            timm_model, prefix = self.model.timm_model, "timm_model."
        names = timm_model.no_weight_decay() if hasattr(timm_model, "no_weight_decay") else set()
        return {prefix + name for name in names}

    # --- stage changes -----------------------------------------------------------------------
    def set_steps_per_epoch(self, steps_per_epoch: int, max_steps: int) -> None:
        """Turn `at_epoch` into optimizer steps; warn about stages the run never reaches. `at_plateau` stages stay
        undecided (None) until `observe` sees the plateau, unless a resumed run already decided them."""
        decided = dict(enumerate(self.stage_starts or []))
        self.stage_starts = []
        for index, stage in enumerate(self.stages):
            if "at_plateau" in stage:
                self.stage_starts.append(decided.get(index))
            else:
                self.stage_starts.append(stage["at_step"] if "at_step" in stage else round(stage["at_epoch"] * steps_per_epoch))
                self.reasons[index] = f"at_{'step' if 'at_step' in stage else 'epoch'} {stage.get('at_step', stage.get('at_epoch'))}"
        for index, start in enumerate(self.stage_starts):
            if start is not None and start >= max_steps > 0:
                logger.warning("Stage %d (%s) starts at step %d but training ends at step %d: it never runs.",
                               index, self.stages[index]["train"], start, max_steps)

    def stage_for_step(self, step: int) -> int:
        return max(index for index, start in enumerate(self.stage_starts) if start is not None and step >= start)

    @property
    def waits_for_plateau(self) -> bool:
        """True while the next stage starts at a plateau that has not come yet."""
        following = (self.stage_index or 0) + 1
        return following < len(self.stages) and self.stage_starts[following] is None

    @property
    def in_last_stage(self) -> bool:
        return self.stage_index == len(self.stages) - 1

    def observe(self, metric: str, value: float, greater_is_better: bool, step: int) -> None:
        """An evaluation of `metric_for_best_model`: start the next `at_plateau` stage once it has not improved
        for that many evaluations of the current stage. Every rank sees the same gathered metrics, so all decide alike."""
        if not self.waits_for_plateau:
            return
        following = self.stage_index + 1
        best = self.plateau["best"]
        if best is None or (value > best if greater_is_better else value < best):
            self.plateau = {"best": value, "evaluations": 0}
            return
        self.plateau["evaluations"] += 1
        patience = self.stages[following]["at_plateau"]
        if self.plateau["evaluations"] >= patience:
            self.stage_starts[following] = step
            self.reasons[following] = (f"at_plateau {patience}: validation {metric} did not improve on {best:.4g} "
                                       f"for {patience} evaluation(s)")

    def enter_stage(self, index: int, step: int) -> None:
        """Make stage `index` the one in force from optimizer step `step` on; print and record the plan."""
        if index == self.stage_index:
            return
        self._activate(index)
        self.stage_index = index
        self.plateau = {"best": None, "evaluations": 0}
        declared = {key: value for key, value in self.stages[index].items() if key != "train"}
        self.history.append({
            "stage": index, "train": self.stages[index]["train"], **declared, "started_at_step": step,
            "reason": self.reasons.get(index, "start"), "lr_scale": self.lr_scales[index],
            "trainable_parameters": self.trainable_parameters(), "blocks": self.table(),
        })
        logger.info("Freeze plan, stage %d (train %s, %s) from step %d:\n%s",
                    index, self.stages[index]["train"], self.reasons.get(index, "start"), step, self.render())

    def scale_learning_rates(self, optimizer, scheduler) -> None:
        """Multiply every group's rate by the current stage's `lr_scale`, on top of the schedule and layer decay.

        transformers' schedules are LambdaLRs (lr = base_lr x factor(step)): scaling their base rates composes with them
        and is saved with the scheduler, so a resumed run continues at the scaled rate. Others (ReduceLROnPlateau) get
        their current rates scaled once per stage change.
        """
        scale = self.lr_scales[self.stage_index]
        optimizer = getattr(optimizer, "optimizer", optimizer)
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.base_lrs = [group["initial_lr"] * scale for group in optimizer.param_groups]
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
        elif scale != self._applied_scale:
            for group in optimizer.param_groups:
                group["lr"] *= scale / self._applied_scale
        self._applied_scale = scale

    def _activate(self, index: int) -> None:
        self.active = self.stage_sets[index]
        self._waiting = [self.parameters[name] for name in self.ever_trained - self.active]
        if self.skip_waiting_backward:
            for name in self.ever_trained:
                self.parameters[name].requires_grad_(name in self.active)
        self._frozen_norm_ids = {id(module) for name, (module, _) in self._norms.items() if self.norm_mode(name) == "frozen"}

    def norm_mode(self, norm_name: str, trained: set[str] | None = None) -> str:
        """`frozen` or `train` for a norm layer, in the current stage or the one that trains `trained`."""
        owner = self._norms[norm_name][1]
        if self.args.batchnorm == "eval":
            return "frozen"
        trained = self.active if trained is None else trained
        return "train" if self.args.batchnorm == "train" or trained & set(owner) else "frozen"

    def _gradient_gate(self, name: str):
        # A block waiting for its stage still gets a gradient tensor (so DDP stays in step), but it is zero.
        return lambda grad: grad if name in self.active else torch.zeros_like(grad)

    def drop_waiting_gradients(self) -> None:
        """Called before each optimizer step: no update at all (not even weight decay) for waiting blocks."""
        for parameter in self._waiting:
            parameter.grad = None

    def _keep_frozen_norm_in_eval(self, module: nn.Module, _inputs) -> None:
        # Trainer calls model.train() every step; frozen BatchNorm layers must keep their statistics.
        if module.training and id(module) in self._frozen_norm_ids:
            module.eval()

    # --- the audit ---------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        return sum(self.parameters[n].numel() for n in self.active)

    def table(self) -> list[dict]:
        """One row per block: name, params, trainable (any of it), trainable_params, lr, batchnorm."""
        block_of = {name: index for index, block in enumerate(self.blocks) for name in block.parameter_names}
        norms_by_block = {}
        for name, (_, owner) in self._norms.items():
            if owner:
                norms_by_block.setdefault(block_of[owner[0]], set()).add(self.norm_mode(name))
        rows = []
        for index, (block, lr) in enumerate(zip(self.blocks, self.block_lr)):
            trained = sum(self.parameters[n].numel() for n in block.parameter_names if n in self.active)
            modes = norms_by_block.get(index, set())
            rows.append({
                "name": block.name,
                "params": sum(self.parameters[n].numel() for n in block.parameter_names),
                "trainable": trained > 0,
                "trainable_params": trained,
                "lr": lr * self.lr_scales[self.stage_index or 0] if trained else 0.0,
                "batchnorm": modes.pop() if len(modes) == 1 else ("mixed" if modes else "-"),
            })
        return rows

    def render(self) -> str:
        rows = self.table()
        width = max(len(row["name"]) for row in rows + [{"name": "block"}])
        lines = [f"{'block':<{width}}  {'params':>11}  trainable  {'lr':>9}  batchnorm"]
        for r in rows:
            trainable = "yes" if r["trainable_params"] == r["params"] else ("partly" if r["trainable"] else "no")
            lr = f"{r['lr']:.2e}" if r["trainable"] else "-"
            lines.append(f"{r['name']:<{width}}  {r['params']:>11,}  {trainable:<9}  {lr:>9}  {r['batchnorm']}")
        total = sum(r["params"] for r in rows)
        trainable = self.trainable_parameters()
        lines.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        return "\n".join(lines)

    def summary(self) -> dict:
        return {
            **{option: getattr(self.args, option) for option in ("strategy", "freeze", "preset", "batchnorm")},
            "layer_decay": self.layer_decay,
            "stages": self.stages if self.args.strategy == "staged" else [],
            "trainable_parameters": self.trainable_parameters(),
            "total_parameters": sum(p.numel() for p in self.parameters.values()),
            "blocks": self.table(),
            "history": self.history,
            "integrity": self.integrity,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.summary(), indent=2))

    # --- proof that frozen stays frozen and ranks agree --------------------------------------
    def _checksum(self, names: list[str]) -> str:
        tensors = {**dict(self.model.named_buffers()), **self.parameters}
        return checksum({name: tensors[name] for name in names})

    def verify(self, step: int) -> dict:
        """Check that what never trains is bit-identical to the start, and that all ranks hold the same weights.

        Trained BatchNorm statistics are left out of the rank check: under DDP each rank updates
        them from its own last batch (rank 0's are the ones saved).
        """
        own = self._checksum(list(self.parameters))
        ranks = [own]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, own)
        self.integrity = {
            "at_step": step,
            "frozen_unchanged": self._checksum(self._fixed) == self._fixed_checksum,
            "ranks_identical": len(set(ranks)) == 1,
            "parameter_checksums_by_rank": ranks,
        }
        if not (self.integrity["frozen_unchanged"] and self.integrity["ranks_identical"]):
            logger.error("Freeze plan check failed at step %d: %s", step, self.integrity)
        return self.integrity
