"""Train the head of a frozen backbone on cached features through `Trainer`; a staged run then goes on on images.

The model's own head module trains on the features of `feature_store.FeatureStore`, with the run's optimizer,
schedule, callbacks and checkpoints. A `staged` schedule trains its head-only first stage here, then resumes on
images from a checkpoint at the stage boundary. Test metrics come from the cached test features; the full model on
images is checked against them: on every test image when its test pass stores them (an uncached split, no data
doctor), else on a seeded sample (features cached earlier, or extracted by this run's data doctor).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedModel, TimmWrapperForImageClassification, Trainer, TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, PredictionOutput

from .checkpoints import newest_checkpoint_on_every_process
from .feature_store import (  # noqa: F401 (CHECK_IMAGES: tests and benchmarks read it here)
    CHECK_IMAGES,
    FEATURE_RTOL,
    FeatureCacheMismatchError,
    FeatureCapture,
    FeatureStore,
    check_sample,
    relative_errors,
)
from .metrics import compute_metrics
from .precision import Precision
from .trainer import SafeTrainer

logger = logging.getLogger(__name__)

def head_module(model: nn.Module, head_names: list[str]) -> tuple[str, nn.Module] | None:
    """The module that owns exactly the head block's parameters (the classifier), with its dotted name."""
    paths = [name.split(".")[:-1] for name in head_names]
    prefix = []
    for pieces in zip(*paths):
        if len(set(pieces)) > 1:
            break
        prefix.append(pieces[0])
    name = ".".join(prefix)
    if not name:
        return None
    module = model.get_submodule(name)
    owned = {f"{name}.{parameter}" for parameter, _ in module.named_parameters()}
    return (name, module) if owned == set(head_names) else None


def head_dropout(model: nn.Module, head_name: str) -> float:
    """Dropout the model applies right before its classifier in training (timm: `drop_rate`)."""
    if isinstance(model, TimmWrapperForImageClassification):
        return float(getattr(model.timm_model, "drop_rate", 0.0))
    dropout = getattr(model.get_submodule(head_name.rpartition(".")[0]), "dropout", None)
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0


class CachedFeatures(Dataset):
    """Features `(images, views, dim)` and labels in memory; `view` picks which fixed view this epoch sees."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = torch.from_numpy(features), torch.from_numpy(labels)
        self.views, self.view = features.shape[1], 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.features[index, self.view].float(), "labels": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch in one indexing op (the DataLoader calls this): the head's steps are too short for per-item Python."""
        index = torch.as_tensor(indices)
        return {"features": self.features[index, self.view].float(), "labels": self.labels[index]}


class HeadTrainer(SafeTrainer):
    """Trains `HeadOnFeatures`; its checkpoints hold the whole model, so they load like any run's checkpoint
    (`pipeline`, `--resume`, best-model reloading) and a staged run's later stages resume from one."""

    def model_to_save(self) -> nn.Module:
        return self.model.whole_model[0]


class StopAtStep(TrainerCallback):
    """Ends training after optimizer step `step`, with a checkpoint whatever `save_strategy` says."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:  # saved after Trainer's epoch-end logging and evaluation
            control.should_save = True


def collated(batch: dict) -> dict:
    """The data collator for `CachedFeatures`: `__getitems__` already returns the batch."""
    return batch


class CycleViews(TrainerCallback):
    """Epoch e trains on view e mod K, so K fixed augmented views stand in for fresh augmentation."""

    def __init__(self, dataset: CachedFeatures):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.view = int(state.epoch or 0) % self.dataset.views


class HeadOnFeatures(nn.Module):
    """The model's own head module (the same object, so training it trains the model) applied to features."""

    def __init__(self, head: nn.Module, dropout: float, model: PreTrainedModel):
        super().__init__()
        self.head, self.dropout = head, dropout
        self.loss_function, self.config = model.loss_function, model.config
        self.whole_model = [model]  # in a list: not a submodule, so Trainer and DDP see only the head

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.head(F.dropout(features, self.dropout, self.training))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Head steps on a CPU are tiny matrix products: thread hand-offs cost more than they save
    (on a busy 2-core machine, 66 ms per step with 2 threads, 2.3 ms with 1)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _later_stages_start(plan, trainer: Trainer) -> int | None:
    """The optimizer step from which a staged schedule trains more than the head; None if it never does."""
    if len(plan.stages) == 1:
        return None
    if "at_plateau" in plan.stages[1]:
        return 0  # the boundary is known only during training: every stage trains on images
    args = trainer.args
    steps_per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps), 1)  # as Trainer counts
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    plan.set_steps_per_epoch(steps_per_epoch, max_steps)
    start = plan.stage_starts[1]
    return start if start < max_steps else None


def _global_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


class CachedHeadTraining:
    """Trains the head of a run whose backbone is frozen on cached features; see `run`."""

    def __init__(self, recipe, plan, trainer: Trainer, data, transforms, head_name: str, head: nn.Module, later_stages_start: int | None,
                 precision: Precision, store: FeatureStore | None = None):
        self.recipe, self.plan, self.trainer, self.head_name, self.head = recipe, plan, trainer, head_name, head
        self.later_stages_start = later_stages_start
        self.model, self.args = trainer.model, trainer.args
        self.store = store or FeatureStore(self.model, head, head_name, recipe.model, data, transforms, self.args,
                                           recipe.run.feature_cache_views, precision=precision)
        self.summary = self.store.summary  # what all_results.json records as `feature_cache`
        if later_stages_start is None:  # `_test` checks the cached test features against the full model's, with its logits
            self.store.checked_by_caller.add("test")
        self.trainer_that_finished = trainer

    @classmethod
    def for_run(cls, recipe, plan, trainer: Trainer, data, transforms, precision: Precision,
                store: FeatureStore | None = None) -> CachedHeadTraining | None:
        """A cache when the recipe wants one and the run (or a staged run's first stage) trains only the head
        on a frozen backbone; its features are extracted in `precision` (the run's `inference_precision`), into `store`
        when given (the one the data doctor read)."""
        head_names = set(plan.blocks[-1].parameter_names)
        if not recipe.run.feature_cache or plan.stage_sets[0] != head_names:
            return None
        if plan.args.batchnorm == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trainer.model.modules()):
            logger.info("Feature cache not used: `batchnorm: train` changes the backbone's features every step.")
            return None
        found = head_module(trainer.model, sorted(head_names))
        if found is None:
            logger.info("Feature cache not used: the head's parameters do not form one module.")
            return None
        later_stages_start = _later_stages_start(plan, trainer)
        if later_stages_start == 0:
            logger.info("Feature cache not used: the head-only first stage is shorter than one optimizer step, "
                        "or ends at a plateau, which is known only during training.")
            return None
        if recipe.run.feature_cache_views == 0 and recipe.data.augmentation != "none":
            logger.info(
                "Feature cache: the head trains on un-augmented features (augmentation '%s' is not applied%s). "
                "Set `feature_cache_views: K` for K fixed augmented views, or `feature_cache: false`.",
                recipe.data.augmentation, " in the head-only stage" if later_stages_start else "",
            )
        return cls(recipe, plan, trainer, data, transforms, *found, later_stages_start=later_stages_start, precision=precision, store=store)

    # --- the run ------------------------------------------------------------------------------
    def run(self, test_split, resume: bool | None):
        """Train the head on cached features, then test the full model on images.

        A staged schedule trains only its head-only first stage on the cache, up to a checkpoint at the
        stage boundary; the later stages then train on images, resumed from that checkpoint."""
        if self.later_stages_start is None:
            return self._head_only_run(test_split, resume)
        return self._staged_run(test_split, resume, self.later_stages_start)

    def _head_only_run(self, test_split, resume: bool | None):
        head_trainer = self._head_trainer()
        with _one_cpu_thread(self.args.device):
            train_metrics = head_trainer.train(resume_from_checkpoint=resume).metrics
            eval_metrics = head_trainer.evaluate()
        self.trainer.state = head_trainer.state  # log history and best checkpoint go into the output dir
        self.trainer_that_finished = head_trainer
        # Trainer's speed figures of this evaluation are the head's on cached features, not the model's: kept apart.
        self.summary["head_eval"] = _speed(eval_metrics)
        test_output = self._test(test_split, head_trainer)
        self.store.total_size()
        return train_metrics, eval_metrics, test_output

    def _test(self, test_split, head_trainer: Trainer) -> PredictionOutput:
        """Test metrics of the trained head on the cached test features, checked against the full model on images:
        on every test image when this run extracts the features (from that same pass), else on CHECK_IMAGES of them."""
        if self.store.has("test"):
            features, labels = self.store.features("test")
            rows = check_sample(len(labels), self.args.seed)
            logger.info("feature cache hit: test metrics from the cached test features; checking the full model on %d of "
                        "the %d test images", len(rows), len(labels))
            full, full_features, seconds = self._full_model_pass(test_split.select(rows))
        else:
            full, full_features, seconds = self._full_model_pass(test_split)
            self.store.save("test", full_features, full.label_ids, seconds)
            features, labels = self.store.features("test")
            rows = np.arange(len(labels))
        with _one_cpu_thread(self.args.device):
            test_output = head_trainer.predict(CachedFeatures(features, labels), metric_key_prefix="test")
        self.summary["head_test"] = _speed(test_output.metrics)
        # The speed reported for testing is the full model's on images (the card's "inference" line): this run's pass.
        test_output.metrics.update(_speed(full.metrics))
        check = check_cache(full_features, features[rows, 0], full.predictions, test_output.predictions[rows], full.label_ids, labels[rows])
        self.summary["test_check"] = {**check.as_dict(), "all_test_images": len(rows) == len(labels), "seconds": round(seconds, 2)}
        accuracy = test_output.metrics["test_accuracy"]
        test_output.metrics.update(test_cache_accuracy=accuracy, test_cache_agreement=check.agreement, test_cache_checked_images=check.images)
        self.summary.update(test_cache_accuracy=accuracy, test_cache_agreement=check.agreement)
        if not check.ok:
            raise FeatureCacheMismatchError(
                f"The full model and the cached test features disagree on {check.mismatched} of {check.images} checked test images "
                f"(relative feature error up to {check.max_feature_error:.2f}; rounding stays below {FEATURE_RTOL}; accuracy on "
                f"them {check.full_accuracy:.4f} from the full model vs {check.cache_accuracy:.4f} from the cache), so the cached "
                f"features are not this model's. Set `feature_cache: false` and report the model id ({self.recipe.model.model})."
            )
        return test_output

    def _full_model_pass(self, split) -> tuple[PredictionOutput, np.ndarray, float]:
        """The full model's predictions on `split`, the head's input features it computed, and the seconds it took."""
        started = time.perf_counter()
        with FeatureCapture(self.head, gather=self.trainer.accelerator.gather_for_metrics) as capture:
            output = self.trainer.predict(split, metric_key_prefix="test")
        return output, capture.features().numpy(), time.perf_counter() - started

    def _staged_run(self, test_split, resume: bool | None, boundary: int):
        hand_over = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{boundary}"
        checkpoint = newest_checkpoint_on_every_process(self.args.output_dir, self.args.world_size) if resume else None
        if checkpoint is None or _global_step(checkpoint) < boundary:
            head_trainer = self._head_trainer(stop_at=boundary)
            with _one_cpu_thread(self.args.device):
                self.summary["head_stage"] = head_trainer.train(resume_from_checkpoint=resume).metrics
            checkpoint = hand_over
            self.store.total_size()
        logger.info("Feature cache: head-only stage done at step %d; the later stages train on images from %s.", boundary, checkpoint)
        train_metrics = self.trainer.train(resume_from_checkpoint=str(checkpoint)).metrics
        self.trainer_that_finished = self.trainer
        eval_metrics = self.trainer.evaluate()
        test_output = self.trainer.predict(test_split, metric_key_prefix="test")
        if self.args.save_strategy == "no" and self.args.should_save:
            shutil.rmtree(hand_over, ignore_errors=True)  # saved only to hand the run over
        return train_metrics, eval_metrics, test_output

    def _head_trainer(self, stop_at: int | None = None) -> Trainer:
        train = CachedFeatures(*self.store.features("train"))
        validation = CachedFeatures(*self.store.features("validation"))
        args = copy.copy(self.args)
        args.dataloader_num_workers, args.dataloader_persistent_workers = 0, False  # features are in memory
        args.remove_unused_columns = False  # batches come whole from `CachedFeatures.__getitems__`
        if stop_at is not None:  # the run goes on after this stage: no end-of-run best-model reload or pruning
            args.load_best_model_at_end = False
            args.save_total_limit = None if args.save_total_limit == 1 else args.save_total_limit
        head_trainer = HeadTrainer(
            model=HeadOnFeatures(self.head, head_dropout(self.model, self.head_name), self.model),
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            data_collator=collated,
            compute_metrics=compute_metrics,
            processing_class=self.trainer.processing_class,  # checkpoints are complete model repos
            optimizers=(self.trainer.optimizer, None),  # the run's optimizer: it holds the head's parameters
            test_dataset=CachedFeatures(*self.store.features("test")) if self.trainer.test_dataset is not None else None,
        )
        present = {type(callback) for callback in head_trainer.callback_handler.callbacks}
        for callback in self.trainer.callback_handler.callbacks:
            if type(callback) not in present:
                head_trainer.add_callback(callback)
        if train.views > 1:
            head_trainer.add_callback(CycleViews(train))
        if stop_at is not None:
            head_trainer.add_callback(StopAtStep(stop_at))
        return head_trainer



def _speed(metrics: dict) -> dict:
    """Takes Trainer's speed figures (`*_runtime`, `*_per_second`) out of `metrics` and returns them."""
    return {key: metrics.pop(key) for key in list(metrics) if key.endswith(("_runtime", "_per_second"))}


@dataclass
class CacheCheck:
    """The full model against the cache on the same test images (see FEATURE_RTOL)."""

    images: int
    mismatched: int  # images whose features are not the same image's (error above FEATURE_RTOL) or whose label differs
    max_feature_error: float
    median_feature_error: float
    flips: int  # images whose predicted class differs: near-ties, when the features match
    agreement: float
    full_accuracy: float
    cache_accuracy: float

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def as_dict(self) -> dict:
        return asdict(self)


def check_cache(full_features: np.ndarray, cached_features: np.ndarray, full_logits: np.ndarray, cached_logits: np.ndarray,
                full_labels: np.ndarray, cached_labels: np.ndarray) -> CacheCheck:
    """Compare the full model's head inputs, logits and labels on some test images with the cache's for the same rows."""
    errors = relative_errors(full_features, cached_features.astype(np.float32))
    mismatched = int(((errors > FEATURE_RTOL) | (np.asarray(full_labels) != np.asarray(cached_labels))).sum())
    full_classes, cached_classes = np.argmax(full_logits, axis=-1), np.argmax(cached_logits, axis=-1)
    flips = int((full_classes != cached_classes).sum())
    images = len(errors)
    return CacheCheck(
        images=images, mismatched=mismatched,
        max_feature_error=float(errors.max()) if images else 0.0, median_feature_error=float(np.median(errors)) if images else 0.0,
        flips=flips, agreement=1 - flips / images if images else 1.0,
        full_accuracy=float((full_classes == cached_labels).mean()) if images else 0.0,
        cache_accuracy=float((cached_classes == cached_labels).mean()) if images else 0.0,
    )
