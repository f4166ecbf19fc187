"""How a run trains, decided in one place: the whole model on images, the head on cached features of a frozen backbone,
or the head on cached features and then the later stages of a staged plan on images.

Each strategy's `fit` trains, evaluates on validation and predicts the test split, and returns a `Fitted`. The cached
strategies test on the cached test features and check them against the full model on images: on every test image when
their test pass stores them, else on a seeded sample (features cached earlier, or extracted by the data doctor).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, PredictionOutput

from .cached_head import CachedFeatures, CycleViews, HeadOnFeatures, HeadTrainer, StopAtStep, check_cache, collated, one_cpu_thread
from .checkpoints import newest_checkpoint_on_every_process
from .feature_store import FEATURE_RTOL, FeatureCacheMismatchError, FeatureCapture, FeatureStore, check_sample
from .metrics import compute_metrics
from .trainer import SafeTrainer

logger = logging.getLogger(__name__)


@dataclass
class Fitted:
    """What training and testing produced."""

    trainer: SafeTrainer  # the one whose optimizer, schedule and state the results describe
    train_metrics: dict
    eval_metrics: dict
    test_output: PredictionOutput
    feature_cache: dict | None = None  # what the cached strategies record as `feature_cache` in all_results.json


def speed_figures(metrics: dict) -> dict:
    """Takes Trainer's speed figures (`*_runtime`, `*_per_second`) out of `metrics` and returns them."""
    return {key: metrics.pop(key) for key in list(metrics) if key.endswith(("_runtime", "_per_second"))}


class FullModel:
    """The plan's trainable blocks train on images: the model's own forward pass every step."""

    def __init__(self, trainer: SafeTrainer, test_split):
        self.trainer, self.test_split = trainer, test_split

    def fit(self, resume: bool) -> Fitted:
        trainer = self.trainer
        train_metrics = trainer.train(resume_from_checkpoint=True if resume else None).metrics
        eval_metrics = trainer.evaluate()
        test_output = trainer.predict(self.test_split, metric_key_prefix="test")
        return Fitted(trainer, train_metrics, eval_metrics, test_output)


class CachedHead(FullModel):
    """A frozen backbone: its features of every image are computed once (`FeatureStore`), and the head trains on them
    with the run's optimizer, schedule, callbacks and checkpoints (which hold the whole model)."""

    def __init__(self, trainer: SafeTrainer, test_split, store: FeatureStore, head_name: str, head: nn.Module):
        super().__init__(trainer, test_split)
        self.store, self.head_name, self.head = store, head_name, head
        self.summary = store.summary  # what all_results.json records as `feature_cache`
        store.checked_by_caller.add("test")  # `_test` checks the cached test features against the full model's, with its logits

    def fit(self, resume: bool) -> Fitted:
        head_trainer = self._head_trainer()
        with one_cpu_thread(self.trainer.args.device):
            train_metrics = head_trainer.train(resume_from_checkpoint=True if resume else None).metrics
            eval_metrics = head_trainer.evaluate()
        self.trainer.state = head_trainer.state  # log history and best checkpoint go into the output dir
        # Trainer's speed figures of this evaluation are the head's on cached features, not the model's: kept apart.
        self.summary["head_eval"] = speed_figures(eval_metrics)
        test_output = self._test(head_trainer)
        self.store.total_size()
        return Fitted(head_trainer, train_metrics, eval_metrics, test_output, self.summary)

    def _test(self, head_trainer: SafeTrainer) -> PredictionOutput:
        """The trained head's test metrics on the cached test features, checked against the full model on images as above."""
        if self.store.has("test"):
            features, labels = self.store.features("test")
            rows = check_sample(len(labels), self.trainer.args.seed)
            logger.info("feature cache hit: test metrics from the cached test features; checking the full model on %d of "
                        "the %d test images", len(rows), len(labels))
            full, full_features, seconds = self._full_model_pass(self.test_split.select(rows))
        else:
            full, full_features, seconds = self._full_model_pass(self.test_split)
            self.store.save("test", full_features, full.label_ids, seconds)
            features, labels = self.store.features("test")
            rows = np.arange(len(labels))
        with one_cpu_thread(self.trainer.args.device):
            test_output = head_trainer.predict(CachedFeatures(features, labels), metric_key_prefix="test")
        self.summary["head_test"] = speed_figures(test_output.metrics)
        # The speed reported for testing is the full model's on images (the card's "inference" line): this run's pass.
        test_output.metrics.update(speed_figures(full.metrics))
        check = check_cache(full_features, features[rows, 0], full.predictions, test_output.predictions[rows], full.label_ids, labels[rows])
        self.summary["test_check"] = {**asdict(check), "all_test_images": len(rows) == len(labels),
                                      "seconds": round(seconds, 2)}
        cache = {"test_cache_accuracy": test_output.metrics["test_accuracy"], "test_cache_agreement": check.agreement}
        test_output.metrics.update(cache, test_cache_checked_images=check.images)
        self.summary.update(cache)
        if not check.ok:
            raise FeatureCacheMismatchError(
                f"The full model and the cached test features disagree on {check.mismatched} of {check.images} checked test images "
                f"(relative feature error up to {check.max_feature_error:.2f}; rounding stays below {FEATURE_RTOL}; accuracy on "
                f"them {check.full_accuracy:.4f} from the full model vs {check.cache_accuracy:.4f} from the cache), so the cached "
                f"features are not this model's. Set `feature_cache: false` and report the model id ({self.store.model_key['model']})."
            )
        return test_output

    def _full_model_pass(self, split) -> tuple[PredictionOutput, np.ndarray, float]:
        """The full model's predictions on `split`, the head's input features it computed, and the seconds it took."""
        started = time.perf_counter()
        with FeatureCapture(self.head, gather=self.trainer.accelerator.gather_for_metrics) as capture:
            output = self.trainer.predict(split, metric_key_prefix="test")
        return output, capture.features().numpy(), time.perf_counter() - started

    def _head_trainer(self, stop_at: int | None = None) -> HeadTrainer:
        """A trainer of the model's own head module on the cached features, with the image trainer's optimizer (it holds
        the head's parameters) and callbacks; `stop_at`: the step where a staged run hands over to images."""
        image_trainer = self.trainer
        train = CachedFeatures(*self.store.features("train"))
        args = copy.copy(image_trainer.args)
        args.dataloader_num_workers, args.dataloader_persistent_workers = 0, False  # features are in memory
        args.remove_unused_columns = False  # batches come whole from `CachedFeatures.__getitems__`
        if stop_at is not None:  # the run goes on after this stage: no end-of-run best-model reload or pruning
            args.load_best_model_at_end = False
            args.save_total_limit = None if args.save_total_limit == 1 else args.save_total_limit
        head_trainer = HeadTrainer(
            model=HeadOnFeatures(self.head, self.head_name, image_trainer.model), args=args, train_dataset=train,
            eval_dataset=CachedFeatures(*self.store.features("validation")), data_collator=collated, compute_metrics=compute_metrics,
            processing_class=image_trainer.processing_class,  # checkpoints are complete model repos
            optimizers=(image_trainer.optimizer, None),
            test_dataset=CachedFeatures(*self.store.features("test")) if image_trainer.test_dataset is not None else None,
        )
        present = {type(callback) for callback in head_trainer.callback_handler.callbacks}
        for callback in image_trainer.callback_handler.callbacks:
            if type(callback) not in present:
                head_trainer.add_callback(callback)
        if train.views > 1:
            head_trainer.add_callback(CycleViews(train))
        if stop_at is not None:
            head_trainer.add_callback(StopAtStep(stop_at))
        return head_trainer


class CachedHeadThenImages(CachedHead):
    """A staged plan whose first stage trains only the head: that stage on cached features, up to a checkpoint at the
    stage boundary; the later stages then train on images, resumed from that checkpoint, exactly as `--resume` would."""

    def __init__(self, trainer: SafeTrainer, test_split, store: FeatureStore, head_name: str, head: nn.Module, boundary: int):
        super().__init__(trainer, test_split, store, head_name, head)
        self.boundary = boundary
        store.checked_by_caller.discard("test")  # tested by the full model on images, like any run

    def fit(self, resume: bool) -> Fitted:
        args, boundary = self.trainer.args, self.boundary
        hand_over = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{boundary}"
        checkpoint = newest_checkpoint_on_every_process(args.output_dir, args.world_size) if resume else None
        if checkpoint is None or int(checkpoint.name.rsplit("-", 1)[1]) < boundary:
            head_trainer = self._head_trainer(stop_at=boundary)
            with one_cpu_thread(args.device):
                self.summary["head_stage"] = head_trainer.train(resume_from_checkpoint=True if resume else None).metrics
            checkpoint = hand_over
            self.store.total_size()
        logger.info("Feature cache: head-only stage done at step %d; the later stages train on images from %s.", boundary, checkpoint)
        train_metrics = self.trainer.train(resume_from_checkpoint=str(checkpoint)).metrics
        eval_metrics = self.trainer.evaluate()
        test_output = self.trainer.predict(self.test_split, metric_key_prefix="test")
        if args.save_strategy == "no" and args.should_save:
            shutil.rmtree(hand_over, ignore_errors=True)  # saved only to hand the run over
        return Fitted(self.trainer, train_metrics, eval_metrics, test_output, self.summary)


def cache_refusal(recipe, plan, head: tuple[str, nn.Module] | None) -> str | None:
    """Why the head cannot train on cached features in this run (None: it can, at least in its first stage)."""
    if not recipe.run.feature_cache or plan.stage_sets[0] != set(plan.blocks[-1].parameter_names):
        return "off, or the first stage trains more than the head"
    if plan.args.batchnorm == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plan.model.modules()):
        return "`batchnorm: train` changes the backbone's features every step"
    if head is None:
        return "the head's parameters do not form one module"
    if recipe.model.image_size_schedule:
        return "`image_size_schedule` trains on images resized epoch by epoch"
    if len(plan.stages) > 1 and "at_plateau" in plan.stages[1]:
        return "the head-only first stage ends at a plateau, which is known only during training"
    return None


def tests_on_cache(prepared) -> bool:
    """Whether the run scores its test split on cached features (`CachedHead`: a head-only plan of one stage on the cache),
    and so checks the cached test features against the full model in its own test pass."""
    return prepared.store is not None and prepared.cache_refusal is None and len(prepared.plan.stages) == 1


def choose(recipe, prepared, trainer: SafeTrainer, test_split) -> FullModel:
    """The strategy of a run: the cached head when the backbone starts frozen (`prepared.cache_refusal`), else the full model."""
    refusal, plan, store, head = prepared.cache_refusal, prepared.plan, prepared.store, prepared.head
    if refusal or store is None:
        if refusal and recipe.run.feature_cache and not refusal.startswith("off"):
            logger.info("Feature cache not used: %s.", refusal)
        return FullModel(trainer, test_split)
    boundary = _later_stages_start(plan, trainer)
    if boundary == 0:
        logger.info("Feature cache not used: the head-only first stage is shorter than one optimizer step.")
        return FullModel(trainer, test_split)
    if recipe.run.feature_cache_views == 0 and recipe.data.augmentation != "none":
        logger.info("Feature cache: the head trains on un-augmented features (augmentation '%s' is not applied%s). "
                    "Set `feature_cache_views: K` for K fixed augmented views, or `feature_cache: false`.",
                    recipe.data.augmentation, " in the head-only stage" if boundary else "")
    if boundary is None:
        return CachedHead(trainer, test_split, store, *head)
    return CachedHeadThenImages(trainer, test_split, store, *head, boundary=boundary)


def _later_stages_start(plan, trainer: SafeTrainer) -> int | None:
    """The optimizer step from which a staged schedule trains more than the head; None if it never does."""
    if len(plan.stages) == 1:
        return None
    args = trainer.args
    steps_per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps), 1)  # as Trainer counts
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    plan.set_steps_per_epoch(steps_per_epoch, max_steps)
    start = plan.stage_starts[1]
    return start if start < max_steps else None

