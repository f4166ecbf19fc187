"""Example images for the demo and its Space: a few of the test split a run was scored on, per class."""

from __future__ import annotations

import json
import re
from pathlib import Path

from datasets import ClassLabel, Dataset
from datasets import Image as ImageFeature

from .images import unreadable_reason
from .repo_files import RUN_CONFIG


def examples_from_run(output_dir: Path, dest: Path, per_class: int = 2) -> Path | None:
    """Save a few images of the test split the run in output_dir was scored on; None when that is unknown
    (not a training output dir) or unreachable (a moved folder, a Hub dataset while offline)."""
    # Imported here: they pull in torch and timm, which `push --space` does not need.
    from transformers import TrainingArguments

    from .data import load_image_dataset
    from .errors import DatasetError
    from .options import DataArguments

    if not (output_dir / RUN_CONFIG).is_file():
        return None
    run_config = json.loads((output_dir / RUN_CONFIG).read_text())
    # The run carved its splits with its own seed (recorded only when not the default).
    seed = run_config.get("training", {}).get("seed", TrainingArguments.seed)
    try:
        data = load_image_dataset(DataArguments(**run_config["data"]), seed=seed)
    except (DatasetError, OSError) as error:
        print(f"No example images: {error}")
        return None
    save_examples(data.splits["test"], dest, image_column=data.image_column, label_column=data.label_column,
                  per_class=per_class)
    return dest


def save_examples(split: Dataset, dest: Path, *, image_column: str, label_column: str,
                  per_class: int = 2) -> list[Path]:
    """Write the first `per_class` images of each class of `split` (a test split) to dest, as `<label>_<n>.<ext>`.

    Unreadable images are passed over; the others keep their original encoded bytes.
    """
    dest.mkdir(parents=True, exist_ok=True)
    label_feature = split.features[label_column]
    names = label_feature.names if isinstance(label_feature, ClassLabel) else None
    raw = split.cast_column(image_column, ImageFeature(decode=False))
    taken: dict[object, int] = {}
    written = []
    for row in raw:
        label = row[label_column]
        if taken.get(label, 0) >= per_class or unreadable_reason(row[image_column]) is not None:
            continue
        taken[label] = taken.get(label, 0) + 1
        image = row[image_column]
        suffix = Path(image["path"] or "").suffix or ".jpg"
        # A safe file name: at most 60 characters (240 bytes in UTF-8) of a class name, as a file name holds 255 bytes.
        name = re.sub(r"[^\w.-]+", "_", names[label] if names else str(label))[:60]
        path = dest / f"{name}_{taken[label]}{suffix}"
        path.write_bytes(image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes())
        written.append(path)
        if names and len(written) == per_class * len(names):
            break
    return written
