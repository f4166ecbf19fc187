"""A run's data behind one interface: a map-style dataset or a stream, each giving its splits for the Trainer (the train
dataset of this process included), the Trainer class that reads them, the run arguments it needs, its refusals and
what it reports. `source_for(recipe)` is the one place that asks whether the recipe streams."""

from __future__ import annotations

from ..trainer import SafeTrainer
from . import stream
from .splits import PreparedData, load_image_dataset
from .train_stream import StreamingTrainer, train_stream
from .transforms import attach_transforms


class MapSource:
    """A dataset in hand (the Hub's, the datasets cache's or a local folder): every split map-style."""

    trainer_class = SafeTrainer
    in_hand = True  # every image can be sampled and its features stored (the feature store, the doctor, `select`)

    def __init__(self, recipe):
        self.recipe = recipe

    def check_options(self) -> None:
        """A dataset in hand honours every option."""

    def check_plan(self, plan) -> None:
        """Every freeze plan can train on it, on images or cached features."""

    def load(self, seed: int) -> PreparedData:
        return load_image_dataset(self.recipe.data, seed=seed)

    def adjust_arguments(self, args) -> None:
        """Trainer's own arguments serve."""

    def splits(self, data: PreparedData, transforms: tuple, args) -> dict:
        """train, validation and test, each decoded and transformed lazily (augmentation on train only)."""
        return attach_transforms(data, *transforms)

    def report(self, trainer) -> dict:
        return {}


class StreamSource(MapSource):
    """`streaming: true`: validation and test in memory, the train split a stream this process reads its shards of."""

    trainer_class = StreamingTrainer
    in_hand = False

    def check_options(self) -> None:
        stream.check_options(self.recipe)

    def check_plan(self, plan) -> None:
        stream.check_plan(self.recipe, plan)

    def load(self, seed: int) -> stream.StreamingData:
        return stream.load_streaming_dataset(self.recipe.data, seed)

    def adjust_arguments(self, args) -> None:
        """The stream restores its own position on resume; Trainer would re-read every batch to skip it."""
        args.ignore_data_skip = True
        stream.steps_note(args)

    def splits(self, data: stream.StreamingData, transforms: tuple, args) -> dict:
        restore = not self.recipe.training.ignore_data_skip  # the user's, not the run's own arguments'
        return {**attach_transforms(data, *transforms),
                "train": train_stream(data, transforms[0], args.process_index, args.world_size, restore)}

    def report(self, trainer) -> dict:
        return {"streaming": trainer.stream_summary} if trainer.stream_summary else {}


def source_for(recipe) -> MapSource:
    """The data source of `recipe`: a stream with `streaming: true`, else a dataset in hand."""
    return (StreamSource if recipe.data.streaming else MapSource)(recipe)
