"""A run's data check and `hf-transfer doctor`'s report: the report made from a feature store, read as a summary,
written with its contact sheet, and the images a run excludes because of it.

The checks themselves (numpy in, plain Python out) are `doctor.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from .data import PreparedData, shareable_name
from .data.splits import local_root
from .doctor import WEAK_PROBE, diagnose, split_rank
from .errors import DoctorError
from .escape import one_line, plot_text
from .feature_store import FeatureStore
from .figures import draw, image_content
from .options import EXCLUDE_CHOICES, REPORT_OPTIONS, DoctorArguments
from .perceptual_hash import image_hashes
from .plots import pyplot, save_png
from .repo_files import DATA_REPORT, DATA_SUSPECTS_PNG, shareable_path, without_local_paths

logger = logging.getLogger(__name__)


# --- features ---------------------------------------------------------------------------------------------------------
def split_features(store: FeatureStore) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{split: (features (images, dim) float32, labels)}`: the backbone's un-augmented pooled features of every split,
    read from the feature cache, extracted into it on a miss (the same cache entries a `head_only` run reads)."""
    return _store_features(store)[0]


def _store_features(store: FeatureStore) -> tuple[dict, dict]:
    if store.views:  # a run that trains on augmented views: the doctor looks at the images as they are
        store = store.with_views(0)
    found = {}
    for split in store.data.splits:
        features, labels = store.features(split)
        found[split] = (features[:, 0].astype(np.float32), labels)
    return found, {split: {"hit": record["hit"], "seconds": record["seconds"]} for split, record in store.summary["splits"].items()}


# --- what to exclude --------------------------------------------------------------------------------------------------
def flagged_indices(report: dict, exclude_flagged: str | None, splits: list[str] | tuple[str, ...] = ("train",)) -> dict[str, list[int]]:
    """`{split: sorted indices}` to remove for `exclude_flagged` (leaks | label_issues | both), from `splits` only.

    Leaks: every image of a group of copies that is in an earlier split of train < validation < test than the group's
    latest (that one measures the model), when its split is in `splits`. Label issues: the image itself, and every image
    of a group of copies that carries more than one label."""
    if exclude_flagged is None:
        return {}
    if exclude_flagged not in EXCLUDE_CHOICES:
        raise DoctorError(f"`exclude_flagged: {exclude_flagged}` is not one of {' | '.join(EXCLUDE_CHOICES)}.")
    flagged: dict[str, set[int]] = {}
    chosen = []
    if exclude_flagged in ("label_issues", "both"):
        chosen += report["label_issues"] + [image for group in report["conflicting_labels"] for image in group["images"]]
    if exclude_flagged in ("leaks", "both"):
        for group in report["copy_groups"]:
            latest = max(split_rank(split) for split in group["splits"])
            chosen += [image for image in group["images"] if split_rank(image["split"]) < latest]
    for image in chosen:
        if image["split"] in splits:
            flagged.setdefault(image["split"], set()).add(image["index"])
    return {split: sorted(indices) for split, indices in flagged.items()}


def exclude(data: PreparedData, flagged: dict[str, list[int]], option: str = "exclude_flagged") -> PreparedData:
    """`data` without the flagged images (`flagged_indices`); the report's indices refer to `data` as given. Refused when
    a split would lose every image of a class it has (as at load time: no class without training images, and none the
    test cannot measure); `option` names what asked for the exclusions in that message."""
    splits = dict(data.splits)
    for split, indices in flagged.items():
        if not indices:
            continue
        kept = np.setdiff1d(np.arange(len(splits[split])), indices).tolist()
        labels = np.asarray(splits[split][data.label_column])
        had, keeps = (np.bincount(values, minlength=len(data.labels)) for values in (labels, labels[kept]))
        emptied = [f"{data.labels[label]!r} ({had[label]} of {had[label]})" for label in np.flatnonzero((had > 0) & (keeps == 0))]
        if emptied:
            role = ("a model cannot learn a class it has no training images of" if split == "train"
                    else "its accuracy could not be measured there")
            raise DoctorError(
                f"`{option}` would remove every {split} image of class{'es' if len(emptied) > 1 else ''} {', '.join(emptied)}: {role}. "
                f"Remove those copies from the later split instead, exclude from fewer splits (`exclude_flagged_from`), or unset "
                f"`exclude_flagged`; `hf-transfer doctor` lists the flagged images in {DATA_REPORT}."
            )
        splits[split] = splits[split].select(kept)
    return dataclasses.replace(data, splits=datasets.DatasetDict(splits))


# --- reading it ---------------------------------------------------------------------------------------------------------
def summary_text(report: dict, folder: str | Path | None = None) -> str:
    """A few lines for the terminal: counts and the top findings."""
    counts, total = report["summary"], sum(report["images"].values())
    where = f" ({Path(folder) / DATA_REPORT}, {Path(folder) / DATA_SUSPECTS_PNG})" if folder else ""
    per_split = ", ".join(f"{split} {n}" for split, n in counts["label_issues_by_split"].items() if n)
    lines = [f"Data doctor{where}: {total:,} images ({', '.join(f'{s} {n:,}' for s, n in report['images'].items())})",
             f"  label issues: {counts['label_issues']} likely wrong label(s){f' ({per_split})' if per_split else ''}"]
    accuracy = counts.get("probe_accuracy")
    if accuracy is not None and accuracy < WEAK_PROBE:
        lines.append(f"    the probe is right on only {accuracy:.1%} of the images (out of fold): many flagged images will be hard "
                     "rather than mislabelled; read the list from the top")
    for issue in report["label_issues"][:3]:
        lines.append(f"    {_where(issue)} labelled {one_line(issue['label'])}, looks like {one_line(issue['suggested_label'])} "
                     f"(p={issue['suggested_probability']:.2f})")
    lines.append(f"  near-duplicates within a split: {counts['near_duplicate_pairs']} pair(s)")
    lines += [_pair_line(pair) for pair in report["near_duplicates"][:2]]
    leaks = []
    for crossing, values in counts["leaks_by_splits"].items():
        earlier, later = crossing.split("-")
        leaks.append(f"{crossing}: {values['pairs']} pair(s), {values[f'{later}_images']} {later} image(s) with a copy in {earlier}")
    crossings = " (" + "; ".join(leaks) + ")" if leaks else ""
    lines.append(f"  leaks across splits: {counts['leak_pairs']} pair(s){crossings}")
    lines += [_pair_line(pair) for pair in report["leaks"][:3]]
    lines += _copy_lines(report)
    balance = report["class_balance"]
    for split, per in balance["images_per_class"].items():
        shown = ", ".join(f"{one_line(name)} {n}" for name, n in list(per.items())[:10]) + (", ..." if len(per) > 10 else "")
        ratio = balance["largest_to_smallest"][split]
        lines.append(f"  {split}: {shown}" + (f" (largest/smallest {ratio:.1f})" if ratio and ratio > 1.5 else ""))
    below = balance["below_minimum"]
    lines.append(f"  classes under {balance['minimum']} training images (or absent from an evaluation split): "
                 + (", ".join(f"{one_line(b['class'])} ({b['split']}: {b['images']})" for b in below[:10]) if below else "none"))
    if counts["label_check_skipped_classes"]:
        lines.append(f"  not label-checked (fewer images than folds): classes {counts['label_check_skipped_classes']}")
    return "\n".join(lines)


def _pair_line(pair: dict) -> str:
    first, second = pair["images"]
    labels = f"; labelled {one_line(first['label'])} and {one_line(second['label'])}" if first["label"] != second["label"] else ""
    distance = f", hash distance {pair['hash_distance']}" if pair.get("hash_distance") is not None else ""
    return f"    {_where(first)} ~ {_where(second)} (cosine {pair['similarity']:.3f}{distance}{labels})"


def _copy_lines(report: dict) -> list[str]:
    """Groups of copies, those whose images carry different labels (a label problem), and whether the features counted."""
    counts, copies = report["summary"], report["copies"]
    lines = [f"  copies: {counts['copy_groups']} group(s) of 2 or more images ({counts['images_in_copy_groups']} images)"]
    if not copies["features_meaningful"]:
        lines.append(f"    the backbone's features do not tell these images apart ({copies['share_with_a_neighbour_above_threshold']:.0%} "
                     f"have a neighbour at cosine >= {report['settings']['duplicate_threshold']}; the median nearest neighbour is at "
                     f"{copies['median_nearest_neighbour']:.3f}): copies come from the perceptual hash alone")
    lines.append(f"  copies with different labels: {counts['conflicting_label_groups']} group(s), {counts['conflicting_label_images']} "
                 "image(s)" + (": at least one label in each group is wrong" if counts["conflicting_label_groups"] else ""))
    for group in report["conflicting_labels"][:3]:
        one_each = [next(image for image in group["images"] if image["label"] == label) for label in group["labels"]]
        shown = (one_each + [image for image in group["images"] if image not in one_each])[:3]
        lines.append("    " + " ~ ".join(f"{_where(image)} labelled {one_line(image['label'])}" for image in shown)
                     + (f" (+{len(group['images']) - len(shown)} more)" if len(group["images"]) > len(shown) else ""))
    return lines


def _where(image: dict) -> str:
    name = "" if image["image"] == f"#{image['index']}" else f" {one_line(image['image'])}"
    return f"{image['split']} #{image['index']}{name}"


# --- writing it -------------------------------------------------------------------------------------------------------
def image_names(data: PreparedData, dataset: str) -> dict[str, list[str]]:
    """Each image's path relative to the local dataset folder (or its stored path, or `#index`), per split."""
    root = local_root(dataset)
    names = {}
    for split, rows in data.splits.items():
        cells = rows.select_columns([data.image_column]).with_format("arrow")[:][data.image_column]  # no image decoded
        paths = cells.combine_chunks().field("path").to_pylist() if len(cells) else []
        names[split] = [shareable_name({"path": path}, index, root) for index, path in enumerate(paths)]
    return names


def write_report(report: dict, data: PreparedData, folder: str | Path, sheet_size: int = 24, previous: str | Path | None = None) -> Path:
    """`data_report.json` and the contact sheet `data_suspects.png` in `folder` (each written whole, then moved in); the
    sheet is kept, not drawn, when the one in `previous` (a folder; default: `folder`) shows the same (`figures.draw`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{DATA_REPORT}.tmp{os.getpid()}"
    staged.write_text(json.dumps({**report, "contact_sheet": DATA_SUSPECTS_PNG}, indent=2))
    os.replace(staged, folder / DATA_REPORT)
    suspects = [(_cell(data, issue), _suspect_caption(issue)) for issue in report["label_issues"][:sheet_size]]
    leaks = [([_cell(data, image) for image in pair["images"]], _leak_caption(pair)) for pair in report["leaks"][:8]]
    plot_suspects(suspects, leaks, folder / DATA_SUSPECTS_PNG, previous=Path(previous or folder) / DATA_SUSPECTS_PNG)
    return folder / DATA_REPORT


def _suspect_caption(issue: dict) -> str:
    return (f"{plot_text(_where(issue))}\ngiven: {plot_text(issue['label'])}\n"
            f"suggested: {plot_text(issue['suggested_label'])} ({issue['suggested_probability']:.2f})")


def _leak_caption(pair: dict) -> str:
    first, second = pair["images"]
    labels = f"\nlabelled {plot_text(first['label'])} and {plot_text(second['label'])}" if first["label"] != second["label"] else ""
    return f"{plot_text(_where(first))}\n~ {plot_text(_where(second))}\ncosine {pair['similarity']:.3f}{labels}"


def _cell(data: PreparedData, image: dict):
    return data.splits[image["split"]][image["index"]][data.image_column]


def plot_suspects(suspects: list, leaks: list, path: str | Path, columns: int = 6, previous: str | Path | None = None) -> Path:
    """A contact sheet: `suspects` as `(image cell, caption)` (the likely wrong labels), then `leaks` as `([cell, cell],
    caption)`, each pair side by side. Unreadable cells show as an empty frame with the caption. Kept, not drawn, when
    `previous` (default: `path`) shows the same images and captions (`figures.draw`)."""
    panels = [([cell], caption) for cell, caption in suspects] + list(leaks)
    inputs = {"panels": [([image_content(cell) for cell in cells], caption) for cells, caption in panels],
              "suspects": len(suspects), "columns": columns}
    return draw(path, "contact sheet", inputs, lambda file, metadata: _draw_suspects(panels, len(suspects), columns, file, metadata),
                previous)


def _draw_suspects(panels: list, suspects: int, columns: int, path: Path, metadata: dict) -> None:
    plt = pyplot()
    leaks = len(panels) - suspects
    columns = max(2, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.0 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (cells, caption) in zip(axes.flat, panels):
        ax.imshow(_thumbnails(cells))
        ax.set_title(caption, fontsize=7, color="firebrick" if len(cells) > 1 else "black")
    if not panels:
        axes[0, 0].text(0, 0.5, "No label issues or leaks found.", fontsize=12)
    fig.suptitle(f"Likely wrong labels: {suspects} shown" + (f"; leaks across splits (red): {leaks} shown" if leaks else ""), fontsize=11)
    save_png(fig, path, metadata, dpi=100)


def _thumbnails(cells: list, side: int = 160) -> np.ndarray:
    """The images side by side, each fitted in `side` x `side` on white."""
    from PIL import Image, ImageOps

    from .images import UnreadableImageError, load_image

    canvas = Image.new("RGB", (side * len(cells) + 4 * (len(cells) - 1), side), "white")
    for position, cell in enumerate(cells):
        try:
            image = load_image(cell)
        except UnreadableImageError:
            continue
        image = ImageOps.contain(image, (side, side))  # small images (CIFAR's 32 px) scaled up too
        canvas.paste(image, (position * (side + 4) + (side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(canvas)


# --- the command ------------------------------------------------------------------------------------------------------
def data_report(recipe, data: PreparedData, store: FeatureStore, options: DoctorArguments | None = None) -> dict:
    """The report of a recipe's data (`diagnose` on the features `store` holds or extracts), with how long it took."""
    options = options or recipe.doctor
    started = time.perf_counter()
    found, cache = _store_features(store)
    hashing = time.perf_counter()
    with recipe.training.main_process_first(desc="image hashes"):
        hashes = image_hashes(data)
    hashed = time.perf_counter()
    report = diagnose({split: f for split, (f, _) in found.items()}, {split: y for split, (_, y) in found.items()},
                      data.labels, image_names(data, recipe.data.dataset), options, recipe.training.seed, hashes)
    report["timing"].update(features_s=round(hashing - started, 3), hashes_s=round(hashed - hashing, 3))
    # Published with the model: local folders as the run config names them (`shareable_path`).
    report["dataset"], report["model"] = shareable_path(recipe.data.dataset), shareable_path(recipe.model.model)
    report["feature_cache"] = cache
    return report


def features_of(recipe, store: FeatureStore | None) -> FeatureStore:
    """`store`, or the one-line refusal of a model whose classifier's input cannot be cached."""
    if store is None:
        raise DoctorError(f"The data doctor needs the pooled features that feed the classifier of `{recipe.model.model}`, but its head's "
                          "parameters do not form one module. Choose another model, or set `data_doctor: false`.")
    return store


@contextlib.contextmanager
def report_folder(recipe):
    """`hf-transfer doctor`'s output folder, checked and locked by the main process: never the dataset's folder or the home
    folder, and never a finished run's folder whose card describes a report made with other options."""
    from accelerate import PartialState

    from .output_dir import RUN_CONFIG, OutputDirLock, check_place

    folder = Path(recipe.training.output_dir)
    lock = None
    if PartialState().is_main_process:
        check_place(folder, recipe.to_dict(local_paths=True), overwrite=False)
        if (folder / RUN_CONFIG).is_file():  # a run's folder: its report must be the one the run's card describes
            previous, now = (_report_settings(config) for config in (without_local_paths(json.loads((folder / RUN_CONFIG).read_text())),
                                                                     recipe.to_dict()))
            differ = sorted(key for key in set(previous) | set(now) if previous.get(key) != now.get(key))
            if differ:
                raise DoctorError(
                    f"{folder} holds a run whose data and data report were made with other options (differs in: "
                    f"{', '.join(differ[:8])}): a report written there would replace the one its model card describes. "
                    "Choose another `--output_dir`, or give the run's options."
                )
        lock = OutputDirLock(folder)
        lock.acquire()  # not while a training run writes there
    try:
        yield folder
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.release()


def _report_settings(config: dict) -> dict:
    """What a data report depends on, from a resolved recipe (`Recipe.to_dict`, as in run_config.json): the data, the
    model, the checks' options, the seed of the probe's folds and the precision of the features."""
    sections = {section: config.get(section) or {} for section in ("data", "model", "doctor", "run", "training")}
    return {
        **{f"{section}.{key}": value for section in ("data", "model") for key, value in sections[section].items()},
        **{f"doctor.{key}": sections["doctor"].get(key) for key in REPORT_OPTIONS},
        "training.seed": sections["training"].get("seed"), "run.inference_precision": sections["run"].get("inference_precision"),
    }


# --- in a training run ------------------------------------------------------------------------------------------------
@dataclass
class DataCheck:
    """A training run's data check: the report on the data as loaded, and the images `exclude_flagged` removes."""

    report: dict
    data: PreparedData  # as loaded: the report's indices refer to it
    excluded: dict[str, list[int]]  # split -> indices removed before training
    options: DoctorArguments
    _kept: PreparedData | None = dataclasses.field(default=None, repr=False)

    def kept_data(self) -> PreparedData:
        """The data without the excluded images; refused when a split would lose every image of a class (`exclude`)."""
        if self._kept is None:
            self._kept = exclude(self.data, self.excluded, f"exclude_flagged: {self.options.exclude_flagged}")
        return self._kept

    def kept_rows(self) -> dict[str, np.ndarray]:
        """Split -> the indices that stay, for the splits that lose images."""
        return {split: np.setdiff1d(np.arange(len(self.data.splits[split])), indices)
                for split, indices in self.excluded.items() if indices}

    def results(self) -> dict:
        """For all_results.json (`data_doctor`) and the card: counts, and what was excluded."""
        counted = ("label_issues", "near_duplicate_pairs", "leak_pairs", "classes_below_minimum", "copy_groups", "conflicting_label_groups")
        return {
            **{key: self.report["summary"][key] for key in counted},
            "exclude_flagged": self.options.exclude_flagged,
            "excluded": {split: len(indices) for split, indices in self.excluded.items() if indices},
            "seconds": self.report["timing"].get("total_s"),
        }

    def write(self, folder: Path, previous: Path | None = None) -> None:
        """The report and contact sheet into `folder`; the sheet kept from the folder `previous` when it shows the same."""
        write_report(self.report, self.data, folder, self.options.doctor_sheet_size, previous)


def check_run_data(recipe, data: PreparedData, store: FeatureStore | None, cached: bool, args) -> DataCheck | None:
    """The data doctor at the start of a run: when its head trains on cached features (`cached`, `data_doctor`), and always
    when `exclude_flagged` asks for exclusions. None when neither applies."""
    options = recipe.doctor
    if not (options.exclude_flagged or (options.data_doctor and cached)):
        return None
    started = time.perf_counter()
    report = data_report(recipe, data, features_of(recipe, store), options)
    report["timing"]["total_s"] = round(time.perf_counter() - started, 3)
    check = DataCheck(report, data, flagged_indices(report, options.exclude_flagged, options.excluded_splits), options)
    if check.excluded:
        check.kept_data()  # refused now, before training, when a split would lose every image of a class
    if args.process_index == 0:
        logger.info("\n%s", summary_text(report))
        if check.excluded:
            logger.info("exclude_flagged: %s: removed %s before training", options.exclude_flagged,
                        ", ".join(f"{count} {split} image(s)" for split, count in check.results()["excluded"].items()))
    return check
