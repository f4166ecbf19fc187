"""`hf-transfer select`'s report (the terminal table, selection.json, selection.md, selection.png, recipe.selected.yaml), and
what a run trained from recipe.selected.yaml does with it: the selection checked against the recipe, a copy carried into the
model repo, and the card's "Why this backbone" made from that copy."""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
from pathlib import Path

from . import escape
from .errors import SelectionError
from .repo_files import RUN_CONFIG, SELECTED_RECIPE, SELECTION, SELECTION_MD, SELECTION_PNG, shareable_path, write_json

MAX_SELECTION_BYTES = 10 * 2**20  # a selection.json of 1,000 candidates is ~1 MB: a larger file is not one


# --- numbers as the tables show them ------------------------------------------------------------------------------------
def _accuracy(row: dict) -> str:
    if row.get("probe_accuracy") is None:
        return "—"
    low, high = row.get("probe_interval") or (None, None)
    interval = f" [{low:.1%}, {high:.1%}]" if low is not None else ""
    return f"{row['probe_accuracy']:.1%}{interval}"


def _number(value, form: str) -> str:
    return "—" if value is None else format(value, form)


def _parameters(row: dict) -> str:
    return "—" if row.get("parameters") is None else f"{row['parameters'] / 1e6:.2f} M"


def _input(row: dict) -> str:
    return "—" if not row.get("input_size") else "x".join(str(side) for side in row["input_size"])


def _rows(report: dict, shown) -> list[list[str]]:
    """The leaderboard's rows in rank order, then the reference; `shown` escapes a name."""
    measured = sorted((row for row in report["candidates"] if row["status"] == "measured"), key=lambda row: row["rank"])
    rows = [[str(row["rank"]), shown(row["model"]) + (" (chosen)" if row["model"] == report["chosen"] else ""),
             _number(row.get("logme"), ".3f"), _accuracy(row), _number(row.get("images_per_second"), ",.1f"), _parameters(row),
             _input(row)] for row in measured]
    reference = report.get("reference")
    if reference and reference["status"] == "measured":
        rows.append(["—", f"{shown(reference['model'])}, random init (no pretraining)", _number(reference.get("logme"), ".3f"),
                     _accuracy(reference), "—", _parameters(reference), _input(reference)])
    return rows


def _failures(report: dict, shown) -> list[str]:
    """One line per candidate that could not be measured (and the reference, if it could not), with the reason."""
    reference = report.get("reference")
    failed = [row for row in report["candidates"] + ([reference] if reference else []) if row["status"] == "failed"]
    return [f"{shown(row['model'])}{'' if row.get('pretrained', True) else ' (random init)'}: "
            f"{shown(row.get('reason') or 'could not be loaded or measured')}" for row in failed]


HEADERS = ["rank", "model", "LogME", "probe accuracy [95% interval]", "images/s", "parameters", "input"]


def _sample_line(report: dict) -> str:
    sample = report["sample"]
    return (f"{sample['train_images']:,} of {sample['train_split']:,} train and {sample['validation_images']:,} of "
            f"{sample['validation_split']:,} validation images (stratified, seed {sample['seed']}), {report['classes']} classes; "
            f"probe: logistic regression, {sample['folds']}-fold out-of-fold")


def table_text(report: dict) -> str:
    """The leaderboard for a terminal: names on one line, nothing a terminal would interpret."""
    rows = [HEADERS, *_rows(report, escape.one_line)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    failures = _failures(report, escape.one_line)
    return "\n".join(lines + (["", "Not measured:"] + [f"  {line}" for line in failures] if failures else []))


def print_table(report: dict, folder: Path) -> None:
    stopped = report.get("stopped")
    print(f"\nBackbones ranked on {escape.one_line(report['dataset'])}: {_sample_line(report)}.\n")
    print(table_text(report))
    if stopped:
        print(f"\nStopped by --max_seconds after {stopped['after_seconds']:.0f} s; not measured: "
              + ", ".join(escape.one_line(name) for name in stopped["not_measured"]))
    print(f"\nChosen: {escape.one_line(report['chosen'])} ({report['chosen_because']}).\n"
          f"Report: {folder / SELECTION_MD}, {folder / SELECTION}, {folder / SELECTION_PNG}\n"
          f"Train it: hf-transfer train {folder / SELECTED_RECIPE}\n")


def markdown_report(report: dict) -> str:
    """selection.md: the leaderboard, how it was measured, and what was chosen."""
    lines = [f"# Backbone selection on {escape.markdown_code(report['dataset'])}", "",
             (f"Measured on {_sample_line(report)}. LogME (You et al., ICML 2021) and the probe use each backbone's frozen pooled "
             f"features; images/s is the forward pass without gradients on this machine ({escape.markdown(report['hardware'])}), "
             "in the precision `inference_precision` chose."), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report, escape.markdown)]
    failures = _failures(report, escape.markdown)
    if failures:
        lines += ["", "Not measured:", "", *[f"- {line}" for line in failures]]
    if report.get("stopped"):
        stopped = report["stopped"]
        lines += ["", f"Stopped by `--max_seconds {stopped['max_seconds']:g}` after {stopped['after_seconds']:.0f} s; not measured: "
                  + ", ".join(escape.markdown_code(name) for name in stopped["not_measured"]) + "."]
    lines += ["", (f"Chosen: {escape.markdown_code(report['chosen'])}, {report['chosen_because']} (`--prefer {report['prefer']}`). "
              f"Train it with `hf-transfer train {SELECTED_RECIPE}` (in this folder)."), "",
              f"![probe accuracy against images/s]({SELECTION_PNG})", ""]
    return "\n".join(lines)


def pareto_front(rows: list[dict]) -> list[dict]:
    """The measured candidates no other beats on both probe accuracy and images/s, fastest first."""
    points = [row for row in rows if row.get("probe_accuracy") is not None and row.get("images_per_second") is not None]
    front = [row for row in points if not any(
        other["probe_accuracy"] >= row["probe_accuracy"] and other["images_per_second"] >= row["images_per_second"]
        and (other["probe_accuracy"], other["images_per_second"]) != (row["probe_accuracy"], row["images_per_second"])
        for other in points)]
    return sorted(front, key=lambda row: -row["images_per_second"])


def plot_selection(report: dict, path: Path) -> Path:
    """Probe accuracy (with its 95% interval) against images/s, the Pareto front joined, the chosen one starred, and the
    random-init reference as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, as in plots.py
    import matplotlib.pyplot as plt

    rows = [row for row in report["candidates"] if row["status"] == "measured" and row.get("probe_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for row in rows:
        low, high = row["probe_interval"] or (row["probe_accuracy"], row["probe_accuracy"])
        chosen = row["model"] == report["chosen"]
        ax.errorbar(row["images_per_second"], row["probe_accuracy"], yerr=[[row["probe_accuracy"] - low], [high - row["probe_accuracy"]]],
                    fmt="*" if chosen else "o", markersize=14 if chosen else 7, capsize=3, color="tab:red" if chosen else "tab:blue")
        ax.annotate(escape.plot_text(row["model"]), (row["images_per_second"], row["probe_accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = pareto_front(rows)
    if len(front) > 1:
        ax.plot([row["images_per_second"] for row in front], [row["probe_accuracy"] for row in front], "--", color="gray",
                label="Pareto front (no candidate is both faster and more accurate)")
    reference = report.get("reference")
    if reference and reference.get("probe_accuracy") is not None:
        ax.axhline(reference["probe_accuracy"], linestyle=":", color="black",
                   label=f"{escape.plot_text(reference['model'])}, random init: {reference['probe_accuracy']:.1%}")
    ax.set_xlabel("images/s (forward pass without gradients, this machine)")
    ax.set_ylabel("out-of-fold probe accuracy")
    ax.set_title(f"Backbones on {escape.plot_text(report['dataset'])}: chosen (star) {escape.plot_text(report['chosen'])}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


# --- writing it -------------------------------------------------------------------------------------------------------
def check_folder(folder: Path, recipe) -> None:
    """Never the dataset's folder or the home folder (as a run's), nor a training run's folder (its selection.json is the
    copy its card describes)."""
    from .output_dir import check_place

    check_place(folder, recipe.to_dict(local_paths=True), overwrite=False)
    if (folder / RUN_CONFIG).is_file():
        raise SelectionError(f"{folder} holds a training run: `hf-transfer select` writes its report into a folder of its own. "
                             "Choose another `--output_dir`.")


def _replace(path: Path, write) -> None:
    """`write(staged path)`, then moved into `path`: an interrupted report leaves the previous file whole."""
    staged = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(staged)
    os.replace(staged, path)


def write_selection(report: dict, recipe, chosen: str, folder: Path) -> None:
    """selection.json, selection.md, selection.png and recipe.selected.yaml (the recipe, resolved as `train` reads it, with
    `model: <chosen>` and `selection:` naming selection.json) in `folder`; the json last."""
    folder.mkdir(parents=True, exist_ok=True)
    report.update(recipe_model=chosen, recipe_dataset=recipe.data.dataset)  # as recipe.selected.yaml names them
    selected = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, model=chosen),
                                   run=dataclasses.replace(recipe.run, selection=str((folder / SELECTION).absolute())))
    header = (f"# The recipe with the backbone `hf-transfer select` chose ({escape.one_line(chosen)}), resolved as `train` reads it.\n"
              f"# Train it with: hf-transfer train {folder / SELECTED_RECIPE}\n")
    _replace(folder / SELECTED_RECIPE, lambda path: path.write_text(selected.to_yaml(header, local_paths=True)))
    _replace(folder / SELECTION_MD, lambda path: path.write_text(markdown_report(report)))
    _replace(folder / SELECTION_PNG, lambda path: plot_selection(report, path))
    _replace(folder / SELECTION, lambda path: write_json(path, report))


# --- a run trained from recipe.selected.yaml --------------------------------------------------------------------------
def _read(recipe) -> dict:
    text = recipe.run.selection
    fix = "Remove the `selection:` line to train without the card's \"Why this backbone\", or run `hf-transfer select` again."
    path = Path(text).expanduser()
    try:
        if path.stat().st_size > MAX_SELECTION_BYTES:
            raise ValueError(f"over {MAX_SELECTION_BYTES // 2**20} MB")
        selection = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SelectionError(f"`selection: {reprlib.repr(text)}` is not a readable selection.json of `hf-transfer select` "
                             f"({type(error).__name__}). {fix}") from None
    if not (isinstance(selection, dict) and isinstance(selection.get("candidates"), list) and isinstance(selection.get("chosen"), str)):
        raise SelectionError(f"`selection: {reprlib.repr(text)}` is not a selection.json of `hf-transfer select`. {fix}")
    for key, option, value in (("recipe_model", "model", recipe.model.model), ("recipe_dataset", "dataset", recipe.data.dataset)):
        if selection.get(key) != value:
            raise SelectionError(
                f"`selection: {reprlib.repr(text)}` records a choice made for `{option}: {reprlib.repr(selection.get(key))}`, but this "
                f"recipe has `{option}: {reprlib.repr(value)}`: the card would explain another choice. {fix}")
    return selection


def check_selection(recipe) -> None:
    """A recipe's `selection` names a selection.json that chose this recipe's model for its dataset (or is unset)."""
    if recipe.run.selection:
        _read(recipe)


CARRIED = ("model", "status", "rank", "pretrained", "logme", "probe_accuracy", "probe_interval", "probe_images", "images_per_second",
           "timed_on", "parameters", "input_size", "precision")


def carry_selection(recipe, folder: Path) -> None:
    """The run's copy of its selection.json (when the recipe has `selection`), as published with the model: the leaderboard
    and how it was measured, without local paths or failure messages (they may name local files)."""
    if not recipe.run.selection:
        return
    selection = _read(recipe)

    def kept(row):
        return None if not isinstance(row, dict) else {key: row[key] for key in CARRIED if key in row}

    stopped = selection.get("stopped")
    write_json(folder / SELECTION, {
        **{key: selection.get(key) for key in ("dataset", "classes", "sample", "hardware", "ranking", "prefer", "chosen",
                                               "chosen_because", "seconds")},
        "candidates": [kept(row) for row in selection["candidates"]],
        "reference": kept(selection.get("reference")),
        "stopped": {**stopped, "not_measured": [shareable_path(name) for name in stopped.get("not_measured", [])]} if isinstance(stopped, dict) else None,
    })


def why_this_backbone(selection: dict | None) -> str:
    """The card's "Why this backbone" (markdown) from a run's copy of its selection.json; "" when it has none."""
    if not selection:
        return ""
    rows = _rows({**selection, "candidates": [row for row in selection.get("candidates") or [] if row]}, escape.markdown)
    sample = selection.get("sample") or {}
    failed = [escape.markdown_code(row.get("model")) for row in selection.get("candidates") or [] if row and row.get("status") == "failed"]
    return "\n".join([
        "## Why this backbone", "",
        (f"Before training, `hf-transfer select` ranked {len(selection.get('candidates') or [])} pretrained backbones on a sample "
        f"of this dataset ({sample.get('train_images', '?')} train and {sample.get('validation_images', '?')} validation images), "
        f"each on its frozen features: LogME, and the out-of-fold accuracy of a linear probe. It chose "
        f"{escape.markdown_code(selection['chosen'])}: {escape.markdown(selection.get('chosen_because') or '')}."), "",
        "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS),
        *["| " + " | ".join(row) + " |" for row in rows], "",
        *([f"Not measured (could not be loaded or measured): {', '.join(failed)}.", ""] if failed else []),
        f"images/s: the forward pass on the machine that ran the selection ({escape.markdown(selection.get('hardware') or 'not recorded')}).",
    ])
