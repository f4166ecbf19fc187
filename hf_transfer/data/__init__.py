"""The data of a run: datasets as sources of labelled images (map-style or streamed), their splits and transforms.

    source = source.source_for(recipe)   # MapSource or StreamSource: the one place that asks whether a recipe streams
    data = source.load(seed)             # PreparedData: splits, class names, columns, skipped images
    splits = source.splits(data, transforms, args)   # what the Trainer reads, this process's train data included

Modules: `splits` (map-style loading), `folders` (local files and image folders), `stream`, `train_stream` and
`stream_state` (`streaming: true`), `transforms`, `device_resize` (small images resized on the training device), `source`.
"""

from .splits import PreparedData, find_columns, image_name, load_image_dataset, shareable_name
from .transforms import DecodedRows, SeededAugmentation, attach_transforms, build_transforms, check_augmentation, collate

__all__ = ["DecodedRows", "PreparedData", "SeededAugmentation", "attach_transforms", "build_transforms", "check_augmentation",
           "collate", "find_columns", "image_name", "load_image_dataset", "shareable_name"]
