"""The transforms of a run's images: from the model's data config, augmentation on the train split only, applied lazily
batch by batch (a run never holds decoded images; `hf-transfer select` holds its sample's, `DecodedRows`), each image's
random augmentation drawn from its own seed (`SeededAugmentation`), and the collate of a batch."""

from __future__ import annotations

import contextlib
import random

import datasets
import numpy as np
import timm.data
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..errors import DatasetError
from ..images import load_image
from ..options import AUGMENTATIONS
from .splits import PreparedData


def check_augmentation(augmentation: str) -> None:
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation '{augmentation}'; choose one of {AUGMENTATIONS}.")


def build_transforms(data_config: dict, augmentation: str = "default", crop_min_scale: float = 0.35):
    """Train and eval transforms from the model's data config; augmentation is train-only."""
    check_augmentation(augmentation)
    eval_transform = timm.data.create_transform(**data_config, is_training=False)
    if augmentation == "none":
        return eval_transform, eval_transform
    primary, _, final = timm.data.create_transform(
        **data_config, is_training=True, scale=(crop_min_scale, 1.0), color_jitter=None, separate=True
    )
    extra = {"randaugment": [T.RandAugment()], "trivialaugment": [T.TrivialAugmentWide()]}.get(augmentation, [])
    return T.Compose([*primary.transforms, *extra, *final.transforms]), eval_transform


def attach_transforms(data: PreparedData, train_transform, eval_transform) -> datasets.DatasetDict:
    """Decode and transform lazily, batch by batch, never materialising decoded images."""

    def transformer(transform):
        return lambda batch: {"pixel_values": [transform(load_image(cell)) for cell in batch[data.image_column]],
                              "labels": batch[data.label_column]}

    return datasets.DatasetDict({
        name: split.with_transform(transformer(train_transform if name == "train" else eval_transform))
        for name, split in data.splits.items()
    })


class DecodedRows(Dataset):
    """Rows of a split from their images decoded once (`hf-transfer select`'s sample, read by every candidate), through
    `transform`: the items `attach_transforms` gives for those rows, without decoding them again."""

    def __init__(self, images: list, labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.transform(self.images[index]), "labels": self.labels[index]}


def collate(examples) -> dict[str, torch.Tensor]:
    pixels = [example["pixel_values"] for example in examples]
    shapes = {tuple(pixel.shape) for pixel in pixels}
    if len(shapes) > 1:  # only images resized on the device keep their own size
        raise DatasetError(
            f"Images of different sizes {sorted(shapes)[:3]} in one batch: `resize_on_device` needs one image size. "
            "Set `resize_on_device: false` to resize every image on the CPU."
        )
    return {"pixel_values": torch.stack(pixels), "labels": torch.tensor([example["labels"] for example in examples])}


class SeededAugmentation(Dataset):
    """A split with the train transform attached, each image's random augmentation drawn from its own seed (run seed,
    epoch or view, row): any image comes out the same alone (the check of a cached view) as in the whole split, whatever
    the batch size, loader workers, processes or prefetching. Reading a row leaves the global generators as they were,
    so a resumed run sees the same augmentations and the model's own randomness (dropout, drop-path) continues from the
    checkpoint's RNG state."""

    def __init__(self, dataset, seed: int, epoch: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with _seeded_generators(int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])):
            return self.dataset[int(index)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@contextlib.contextmanager
def _seeded_generators(seed: int):
    """The generators the transforms draw from, seeded: random (timm's RandAugment), numpy and torch's CPU generator
    (torchvision; transforms run on the CPU, so CUDA's stays untouched); restored afterwards."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
