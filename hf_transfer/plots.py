"""Figures of a training run: loss/metric curves per epoch and the test confusion matrix (PNG), each drawn only when what
it shows has changed (`figures.draw`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .escape import plot_text
from .figures import draw

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The test split's, scored after every evaluation with `eval_test_each_epoch`; they never choose a checkpoint.
EVAL_METRICS = {"eval_accuracy": "validation accuracy", "eval_f1": "validation macro-F1", "test_accuracy": "test accuracy",
                "test_f1": "test macro-F1"}


def training_log(log_history: Sequence[dict]) -> list[dict]:
    """The entries logged while training: evaluations after it (e.g. of the reloaded best model) are not epochs."""
    end = next((i for i, entry in enumerate(log_history) if "train_runtime" in entry), len(log_history))
    return list(log_history[:end])


def _series(log_history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(entry["epoch"], entry[key]) for entry in training_log(log_history) if key in entry and "epoch" in entry]
    return [epoch for epoch, _ in points], [value for _, value in points]


def curve_marks(freeze_plan: dict | None, early_stopping: dict | None) -> list[tuple[int, str]]:
    """The optimizer steps to mark on the curves, from freeze_plan.json and all_results.json's `early_stopping`: where
    each later stage started, and where early stopping ended training."""
    marks = [(stage["started_at_step"], f"stage {stage['stage']}: {stage['train']}")
             for stage in (freeze_plan or {}).get("history", [])[1:] if stage.get("started_at_step")]
    if early_stopping and early_stopping.get("stopped_early"):
        marks.append((early_stopping["step"], "early stop"))
    return marks


def _epoch_at(log_history: Sequence[dict], step: int) -> float:
    """The epoch Trainer logged at optimizer step `step` (interpolated between logged steps)."""
    points = sorted({entry["step"]: entry["epoch"] for entry in training_log(log_history) if "step" in entry and "epoch" in entry}.items())
    if not points:
        return float(step)
    steps, epochs = zip(*points)
    if step > steps[-1] and steps[-1]:
        return epochs[-1] * step / steps[-1]
    return float(np.interp(step, steps, epochs))


def plot_training_curves(log_history: Sequence[dict], path: str | Path, marks: Sequence[tuple[int, str]] = (),
                         previous: str | Path | None = None) -> Path:
    """Plot train/validation loss and validation (and test) metrics against epochs from Trainer's log_history, with a
    vertical line at each of `marks` (optimizer step, label: see `curve_marks`). Kept, not drawn, when `previous`
    (default: `path`) shows the same curves (`figures.draw`): the run's timings are not part of them."""
    curves = training_curves(log_history, marks)
    return draw(path, "training curves", curves, lambda file, metadata: save_png(_curves_figure(curves), file, metadata), previous)


def has_curves(log_history: Sequence[dict]) -> bool:
    """Whether the log holds a point to draw: a training loss, a validation loss or metric, with its epoch (a run with
    `logging_strategy` and `eval_strategy` both `no` logs none)."""
    return any(_series(log_history, key)[0] for key in ("loss", "eval_loss", *EVAL_METRICS))


def training_curves(log_history: Sequence[dict], marks: Sequence[tuple[int, str]] = ()) -> dict:
    """What the training curves show: (epochs, values) of each series, and the epoch and label of each mark."""
    if not has_curves(log_history):
        raise ValueError("log_history holds no loss or eval metric entries with an 'epoch': nothing to plot")
    curves = {"train loss": _series(log_history, "loss"), "validation loss": _series(log_history, "eval_loss")}
    metrics = {label: _series(log_history, key) for key, label in EVAL_METRICS.items()}
    metrics = {label: points for label, points in metrics.items() if points[0]}
    return {**curves, "metrics": metrics, "marks": [(_epoch_at(log_history, step), label) for step, label in marks]}


def training_curves_figure(log_history: Sequence[dict], marks: Sequence[tuple[int, str]] = ()) -> Figure:
    """The figure `plot_training_curves` saves."""
    return _curves_figure(training_curves(log_history, marks))


def _curves_figure(curves: dict) -> Figure:
    plt = pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, style in (("train loss", "-o"), ("validation loss", "-s")):
        epochs, values = curves[label]
        if epochs:
            loss_ax.plot(epochs, values, style, label=label, markersize=4)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    for label, (epochs, values) in curves["metrics"].items():
        metric_ax.plot(epochs, values, "-o", label=label, markersize=4)
    tested = any(label.startswith("test") for label in curves["metrics"])
    metric_ax.set(title="Validation and test metrics" if tested else "Validation metrics", xlabel="epoch", ylabel="score", ylim=(0, 1.02))
    for ax in (loss_ax, metric_ax):
        for epoch, label in curves["marks"]:
            ax.axvline(epoch, color="tab:red" if label == "early stop" else "tab:gray",
                       linestyle="--" if label == "early stop" else ":", linewidth=1.2, label=label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle("Training curves")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                          previous: str | Path | None = None) -> Path:
    """Plot a confusion matrix (rows: true class, columns: predicted), coloured by row share, with counts. Kept, not
    drawn, when `previous` (default: `path`) shows the same matrix and labels (`figures.draw`)."""
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(labels):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {len(labels)} labels")
    return draw(path, "confusion matrix", {"matrix": counts, "labels": [str(label) for label in labels]},
                lambda file, metadata: save_png(_confusion_figure(counts, labels), file, metadata), previous)


def _confusion_figure(counts: np.ndarray, labels: Sequence[str]) -> Figure:
    plt = pyplot()
    n = len(labels)
    # Colour by share of each true class so that rare classes stay readable.
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(5.5, 0.45 * n + 2.5), 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    font = 10 if n <= 12 else max(4, 120 // n)
    labels = [plot_text(label) for label in labels]  # class names: `$` would start mathtext
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    if n <= 30:  # beyond that, numbers would not fit in the cells
        for row, col in np.ndindex(n, n):
            ax.text(col, row, f"{int(counts[row, col])}", ha="center", va="center", fontsize=font,
                    color="white" if shares[row, col] > 0.5 else "black")
    total, correct = counts.sum(), np.trace(counts)
    accuracy = f"accuracy {correct / total:.1%} on {int(total)} images" if total else "no images"
    ax.set(title=f"Confusion matrix, test split\n({accuracy})", xlabel="predicted label", ylabel="true label")
    fig.tight_layout()
    return fig


def pyplot():
    """matplotlib's pyplot, loaded when a figure is drawn (a rerun that keeps its figures never loads it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Figure, path: Path, metadata: dict, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi, format="png", metadata=metadata)
    pyplot().close(fig)
