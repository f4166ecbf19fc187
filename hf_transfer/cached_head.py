"""The pieces that train a model's own head on cached features through `Trainer`: the features as a dataset, the head
applied to them, its trainer (whose checkpoints hold the whole model), and the check of a cache against the full model.

The strategies that use them are in `strategies.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedModel, TimmWrapperForImageClassification, TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutput

from .feature_files import relative_errors
from .feature_store import FEATURE_RTOL
from .trainer import SafeTrainer


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

    def __getitem__(self, index: int | torch.Tensor) -> dict:
        return {"features": self.features[index, self.view].float(), "labels": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch in one indexing op (the DataLoader calls this): the head's steps are too short for per-item Python."""
        return self[torch.as_tensor(indices)]


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

    def __init__(self, head: nn.Module, head_name: str, model: PreTrainedModel):
        super().__init__()
        self.head, self.dropout = head, head_dropout(model, head_name)
        self.loss_function, self.config = model.loss_function, model.config
        self.whole_model = [model]  # in a list: not a submodule, so Trainer and DDP see only the head

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.head(F.dropout(features, self.dropout, self.training))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Head steps on a CPU are tiny matrix products: thread hand-offs cost more than they save
    (on a busy 2-core machine, 66 ms per step with 2 threads, 2.3 ms with 1)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
