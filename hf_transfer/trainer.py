"""SafeTrainer: Trainer through its public hooks, with checkpoints made only of safetensors and JSON that resume exactly
and never hold NaN weights.

Trainer pickles the optimizer, scheduler, RNG states and arguments (`*.pt`, `*.pth`, `*.bin`); SafeTrainer has it write
none of them (`save_only_model` on the run's copy of its arguments), writes the same state as safetensors and JSON
(checkpoints.py) from `save_model`, and loads it back from a callback at the moments Trainer would load its own.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import datasets
import safetensors.torch
import torch
from accelerate.utils import DistributedType, gather_object
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from .checkpoint_checks import PLATEAU_SCHEDULES, check_checkpoint_files, check_run_length
from .checkpoints import (
    TRAINING_ARGS,
    CheckpointError,
    checkpoint_to_resume,
    describe_incomplete,
    last_complete_checkpoint,
    load_optimizer_and_scheduler,
    load_resume_state,
    load_weights,
    missing_files,
    resume_files,
    rng_states,
    save_optimizer_and_scheduler,
    save_resume_states,
)
from .data import SeededAugmentation
from .errors import HFTransferError
from .models import save_pretrained
from .schedules import STEP, STEP_DEFAULTS, step_schedule

logger = logging.getLogger(__name__)

_REPLICATED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # one process or DDP


class NonFiniteLossError(HFTransferError, RuntimeError):
    """Training diverged; the last good checkpoint is kept."""


class ResumeFromCheckpoint(TrainerCallback):
    """Loads a checkpoint's own files at the moments Trainer loads its pickles (Trainer._prepare_for_training and
    _run_epoch in transformers 5.23-5.25). The optimizer, schedule and loss scaler once they are built, before any other
    callback or the first step: on_train_begin. The RNG states and loss tallies right before the resumed epoch's first
    batch trains: at an epoch boundary (or with `ignore_data_skip`) on_epoch_begin, before the loader is iterated, whose
    start draws from the RNG; mid-epoch, after Trainer has skipped the trained batches, on the first on_step_begin."""

    def __init__(self, trainer: SafeTrainer):
        self.trainer = trainer
        self.checkpoint: Path | None = None  # whose RNG states and tallies are still to be restored
        self.at_first_step = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.checkpoint, self.at_first_step = self.trainer.resuming_from, False
        if self.checkpoint is not None:
            self.trainer.load_optimizer_state(self.checkpoint)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.checkpoint is None or self.at_first_step:
            return
        if not args.ignore_data_skip and state.global_step % self.trainer.steps_per_epoch:
            self.at_first_step = True  # Trainer first skips the batches this epoch has trained on
        else:
            self._restore()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.at_first_step:
            self._restore()

    def _restore(self) -> None:
        checkpoint, self.checkpoint, self.at_first_step = self.checkpoint, None, False
        self.trainer.restore_resume_state(checkpoint)


class AugmentationEpochs(TrainerCallback):
    """Tells the trainer's `SeededAugmentation`, if it has one, which epoch starts, before its loader is iterated: Trainer
    counts its epochs from those the checkpoint completed (global_step // update steps per epoch), one on_epoch_begin each."""

    def __init__(self, trainer: SafeTrainer):
        self.trainer, self.epoch = trainer, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.epoch = state.global_step // self.trainer.steps_per_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        if isinstance(self.trainer.train_dataset, SeededAugmentation):
            self.trainer.train_dataset.set_epoch(self.epoch)
        self.epoch += 1


class LogAsAsked(TrainerCallback):
    """Trainer takes `logging_steps` back from a resumed checkpoint's state, so a resumed run would go on logging at the
    old rate: a resumed run may log at another (output_dir.SAME_RUN_CHANGES), and its own arguments set it."""

    def on_train_begin(self, args, state, control, **kwargs):
        asked = TrainerState()
        asked.compute_steps(args, state.max_steps)  # Trainer's own reading of `logging_steps` (a fraction of the run, or steps)
        state.logging_steps = asked.logging_steps


# The private Trainer methods overridden by SafeTrainer and its subclasses (HeadTrainer, StreamingTrainer; none other
# overrides one), with the parameters they were written against, and the private attributes they read or set (the loss
# tallies: an exact resume logs the same losses; Trainer has no public way to them). Each override says why no public
# hook can do its job. Tested with transformers 5.23-5.25 (pyproject.toml allows <6); tests/test_trainer_api.py fails,
# naming the method, when one disappears or changes its parameters.
PRIVATE_OVERRIDES = {
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"], "_load_best_model": ["self"],
    "_clip_grad_norm": ["self", "model"], "_get_grad_norm": ["self", "model", "grad_norm"],
}
PRIVATE_ATTRIBUTES = ("_tr_loss", "_total_loss_scalar", "_globalstep_last_logged")


class SafeTrainer(Trainer):
    """A Trainer whose checkpoints hold only safetensors + JSON, that resumes exactly, stops on NaN/inf, and runs the
    recipe's `step` schedule and per-epoch test scores. Besides public methods and callbacks it overrides the private
    methods in PRIVATE_OVERRIDES and uses the private attributes in PRIVATE_ATTRIBUTES."""

    def __init__(self, *args, test_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Scored after every evaluation during training (`eval_test_each_epoch`); never used to choose a checkpoint.
        self.test_dataset = test_dataset
        self.steps_per_epoch: int | None = None
        self.reloaded_best: str | None = None  # the checkpoint `load_best_model_at_end` reloaded, once it has
        self.resuming_from: Path | None = None  # the checkpoint train() resumes from
        self._resuming: tuple[Path, dict] | None = None  # it, and its checked trainer state
        self._given_args = self.args  # as the caller gave them: training_args.json, and the copy train() runs with
        self._training = False
        self._resumed = False  # the loss tallies came from a checkpoint
        self._built_step_schedule = False
        persistent_workers = self.args.dataloader_num_workers > 0 and self.args.dataloader_persistent_workers
        # Random augmentations run in the transforms of a `datasets` split; persistent workers never see a new epoch.
        if isinstance(self.train_dataset, datasets.Dataset) and not persistent_workers:
            self.train_dataset = SeededAugmentation(self.train_dataset, self.args.seed)
        # Each trainer's own (a HeadTrainer takes over the run's other callbacks, those of a type it lacks). The first
        # has the optimizer's state back before any other callback (FreezeCallback scales its learning rates) sees it.
        self.callback_handler.callbacks.insert(0, ResumeFromCheckpoint(self))
        self.add_callback(AugmentationEpochs(self))
        self.add_callback(LogAsAsked())
        self._pending_loss: PendingLoss | None = None
        self._parameter_count: tuple[torch.nn.Module, int] | None = None

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:  # Trainer would take the newest checkpoint, even a half-written one
            resume_from_checkpoint = str(checkpoint_to_resume(self.args.output_dir, self.args.world_size))
        elif resume_from_checkpoint and (missing := missing_files(Path(resume_from_checkpoint), self.args.world_size)):
            raise CheckpointError(f"{describe_incomplete(Path(resume_from_checkpoint), missing)}, so it cannot be resumed from. "
                                  "Restore the missing files, or resume from another checkpoint.")
        self.resuming_from = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        # Its files checked before Trainer loads any; its length once the run's is known.
        self._resuming = (self.resuming_from, self.check_checkpoint(self.resuming_from)) if self.resuming_from else None
        if self._built_step_schedule:  # as Trainer rebuilds the schedules it built when train() runs again
            self.lr_scheduler, self._built_step_schedule = None, False
        self._pending_loss, self._resumed, self._training = None, False, True
        # Trainer's own checkpoint files are pickles: with `save_only_model` it writes none (nor finds any to load), and
        # save_model writes ours. A user's `save_only_model: true` keeps its meaning: checkpoints without them.
        self.args = copy.copy(self._given_args)
        self.args.save_only_model = True
        try:
            output = super().train(resume_from_checkpoint, **kwargs)
        finally:
            self.args, self._training = self._given_args, False
        # Trainer's train_loss divides by the steps of this call only; log() made it the whole run's from the restored total.
        return output._replace(training_loss=output.metrics["train_loss"]) if self._resumed else output

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self.steps_per_epoch = values[1]  # num_update_steps_per_epoch, for the `step` schedule and the resumed epoch
        if self._resuming is not None:  # before Trainer restores its state: a checkpoint past the end would "finish" at once
            check_run_length(*self._resuming, max_steps=values[-1])
        return values

    def check_checkpoint(self, checkpoint: Path) -> dict:
        """Refuse a checkpoint whose files are malformed, disagree with each other or do not fit this run's optimizer
        (`check_checkpoint_files`); its trainer state. Subclasses that save more files check them too."""
        schedule = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        return check_checkpoint_files(checkpoint, self.args.world_size, self.optimizer,
                                      steps_schedule_every_step=schedule not in PLATEAU_SCHEDULES)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedules, plus `step` (lr x gamma every `step_size` epochs, after the warm-up)."""
        if self.lr_scheduler is None and self.args.lr_scheduler_type == STEP:
            kwargs = {**STEP_DEFAULTS, **(self.args.lr_scheduler_kwargs or {})}
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = step_schedule(optimizer or self.optimizer, warmup, self.steps_per_epoch or 1, **kwargs)
            self._built_step_schedule = True
        return super().create_scheduler(num_training_steps, optimizer)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._raise_if_loss_was_not_finite()  # an evaluation during training checks the latest loss first
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self._training and self.test_dataset is not None and eval_dataset is None and metric_key_prefix == "eval":
            super().evaluate(self.test_dataset, ignore_keys, metric_key_prefix="test")  # logged beside the epoch's validation
        return metrics

    def log(self, logs: dict, start_time: float | None = None) -> None:
        self._raise_if_loss_was_not_finite()  # a logged loss, and the run's end, check the latest loss first
        if self._resumed and "train_loss" in logs:  # the run's end: Trainer divides by the steps of this call only
            logs["train_loss"] = self._total_loss_scalar / max(self.state.global_step, 1)  # the restored total: the run's
        super().log(logs, start_time)

    # ---- stopping on a NaN / inf loss, without a host-device synchronisation per step -------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            # Why one step late: reading this loss now would make the CPU wait for the GPU to finish the
            # forward pass, and the GPU then wait for the CPU, every step. The previous step's loss was
            # copied to the host behind its own forward pass, a backward and an optimizer step ago, so
            # reading it stalls nothing; a diverging run still stops at the next step, before its backward
            # pass, and every log, evaluation and save checks the latest loss first.
            self._raise_if_loss_was_not_finite()
            self._pending_loss = PendingLoss(output[0] if return_outputs else output, self.state.global_step + 1)
        return output

    def _raise_if_loss_was_not_finite(self) -> None:
        pending, self._pending_loss = self._pending_loss, None
        if pending is not None and not math.isfinite(loss := pending.value()):
            raise NonFiniteLossError(f"Loss became {loss} at step {pending.step}. {self._advice()}")

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate (6 x input size x parameters), with the parameters counted once, not every step."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None or self._parameter_count[0] is not self.model:
            self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._parameter_count[1]

    # Private: Trainer clips (and, without clipping, measures for the log) the gradients of `model.parameters()`, walking
    # every module each step, and has no public hook in its place. The optimizer holds the same gradients in a list
    # (frozen parameters have none), in another order: the norm sums them in that order, so these two keep the weights
    # and logged grad norms bit for bit as before (Trainer's order differs in the last bit at 30-40% of steps of
    # test_efficientnet and Lite0: tests/test_trainer_api.py), and save the walk. DeepSpeed, FSDP and XLA keep Trainer's way.
    def _clip_grad_norm(self, model):
        if self.accelerator.distributed_type not in _REPLICATED:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._optimized_parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.accelerator.distributed_type in _REPLICATED:  # no clipping: the norm, for the log
            grad_norm = self.accelerator.clip_grad_norm_(self._optimized_parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _optimized_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for group in self.optimizer.param_groups for parameter in group["params"]]

    def _advice(self) -> str:
        kept = last_complete_checkpoint(self.args.output_dir)
        return ("Lower `learning_rate` (or use `bf16` instead of `fp16`) and start again with `--overwrite`; "
                + (f"the last good checkpoint, {kept}, is kept." if kept else "no checkpoint had been saved yet."))

    # ---- loading weights ---------------------------------------------------------------------
    # Private: Trainer reloads with load_state_dict(strict=False) on the names save_pretrained writes, which for some
    # architectures (ViT in transformers 5) are legacy names: those layers would silently keep their last values
    # (tests/test_trainer_api.py shows Trainer's own reload leaving them, tests/test_checkpoints.py ours reloading them),
    # and HeadTrainer's model (the head on features) holds none of the names. Trainer calls these in train() and at the
    # run's end with no public hook in their place: a callback could only reload again after Trainer's partial load.
    # from_pretrained maps the names, so reload through it.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model_to_save()
        if not isinstance(model, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self.model_to_save()
        if isinstance(model, PreTrainedModel):
            logger.info("Loading the best model from %s (%s).", self.state.best_model_checkpoint, self.state.best_metric)
            load_weights(model, self.state.best_model_checkpoint)
        else:
            super()._load_best_model()
        self.reloaded_best = self.state.best_model_checkpoint

    # ---- saving --------------------------------------------------------------------------------
    def model_to_save(self) -> torch.nn.Module:
        """The model that checkpoints hold, and that resuming and best-model reloading load into."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Model, processor and arguments, the arguments as JSON (tokens masked), not Trainer's `training_args.bin`. In
        this step's checkpoint also what resuming reads (save_resume_state): Trainer saves the model first, then its
        trainer_state.json, then deletes checkpoints past `save_total_limit`, so a checkpoint is whole before an older
        one goes. Never a NaN or inf loss or weight: `--resume` would continue from whatever is saved."""
        output = Path(output_dir or self.args.output_dir)
        checkpoint = self._training and output.name == f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if checkpoint:
            self._raise_if_loss_was_not_finite()
            if not all(torch.isfinite(tensor).all() for tensor in self.model.state_dict().values()):
                raise NonFiniteLossError(f"Weights became NaN or inf at step {self.state.global_step}, so they were not saved. "
                                         f"{self._advice()}")
        if self.args.should_save:
            output.mkdir(parents=True, exist_ok=True)
            model = self.model_to_save()
            if isinstance(model, PreTrainedModel):
                save_pretrained(model, output)  # also on a machine's main process (save_on_each_node)
            else:  # as Trainer saves a model of its own
                safetensors.torch.save_file(model.state_dict(), output / SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output)
            (output / TRAINING_ARGS).write_text(self._given_args.to_json_string())
        if checkpoint and not self._given_args.save_only_model:
            self.save_resume_state(output)
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_resume_state(self, output: Path) -> None:
        """The optimizer, schedule and loss scaler, and per process the RNG states and the loss not yet logged: what an
        exact continuation needs. Every process's, gathered over torch.distributed and written by each process that
        saves, so every copy of the checkpoint (one per machine with node-local output folders) holds every process's."""
        generators, values = rng_states()
        values.update(loss_since_last_log=self._tr_loss.item(), loss_logged_total=self._total_loss_scalar,
                      last_logged_step=self._globalstep_last_logged)
        states = gather_object([(generators, values)]) if self.args.world_size > 1 else [(generators, values)]
        if self.args.should_save:
            save_optimizer_and_scheduler(output, self.optimizer, self.lr_scheduler, getattr(self.accelerator, "scaler", None))
            save_resume_states(output, states)

    # ---- resuming (called by ResumeFromCheckpoint) -----------------------------------------------
    def load_optimizer_state(self, checkpoint: Path) -> None:
        load_optimizer_and_scheduler(checkpoint, self.optimizer, self.lr_scheduler, getattr(self.accelerator, "scaler", None))

    def restore_resume_state(self, checkpoint: Path) -> None:
        """This process's RNG states, and the loss tallies as they stood, so logged losses and train_loss match an
        uninterrupted run."""
        saved = load_resume_state(checkpoint, resume_files(self.args.world_size)[self.args.process_index])
        self._tr_loss = torch.tensor(saved["loss_since_last_log"], device=self.args.device)
        self._total_loss_scalar = saved["loss_logged_total"]
        self._globalstep_last_logged = saved["last_logged_step"]
        self._resumed = True


class PendingLoss:
    """A training step's loss on its way to the host. On CUDA it is copied into pinned memory behind the
    step's kernels, and the event says when it has landed; on the CPU there is nothing to wait for (other
    devices read it where it is, when asked: a step late, so their wait is short)."""

    def __init__(self, loss: torch.Tensor, step: int):
        self.step, self.copied, self.loss = step, None, loss.detach()
        if self.loss.is_cuda:
            self.loss = self.loss.to("cpu", non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def value(self) -> float:
        if self.copied is not None:
            self.copied.synchronize()
        return self.loss.float().mean().item()  # the mean: one value per GPU under DataParallel
