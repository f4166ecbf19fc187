"""Model card (README.md) of a training output dir, filled entirely from the run's own files.

Metadata goes through huggingface_hub's ModelCardData/EvalResult so the Hub parses model-index.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from scipy.stats import binomtest

from . import escape
from .plots import curve_marks, plot_confusion_matrix, plot_training_curves, training_log
from .repo_files import CONFUSION_PNG, CURVES_PNG, DATA_REPORT, DATA_SUSPECTS_PNG, EXPLANATIONS_PNG, MODEL_CARD, RunFiles, shareable_path
from .selection_report import why_this_backbone


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


class _Shown(str):
    """A cell's text already escaped for Markdown (`escape.markdown`): `_cell` takes it as it is."""


def _untrusted(value):
    """value with every string in it escaped for a table cell: names and paths from the data, the recipe or a model
    folder made elsewhere."""
    if isinstance(value, str):
        return _Shown(escape.markdown(value))
    if isinstance(value, (list, tuple)):
        return [_untrusted(v) for v in value]
    if isinstance(value, dict):
        return {_untrusted(k): _untrusted(v) for k, v in value.items()}
    return value


def _hub_link(repo_id: str, kind: str = "") -> str:
    """A Hub id as a link to its page; anything that is not a valid Hub id as a code span."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return escape.markdown_code(repo_id)
    return f"[{escape.markdown(repo_id)}](https://huggingface.co/{kind}{repo_id})"


def _dataset_text(run: RunFiles) -> str:
    identifier, on_hub = run.dataset
    if on_hub:
        return _hub_link(identifier, "datasets/")
    return f"the local dataset folder {escape.markdown_code(identifier)}" if identifier != "unknown" else "an unrecorded dataset"


def _cell(value) -> str:
    if isinstance(value, _Shown):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "none"
    return "—" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else (f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s")


def describe_hardware() -> str:
    """One line describing this machine, for the run to record next to its results."""
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    elif torch.backends.mps.is_available():
        device = "Apple MPS"
    else:
        device = "CPU only"
    return f"{device}; {os.cpu_count()} CPU cores ({platform.machine()}); torch {torch.__version__}"


def build_card_data(run: RunFiles, repo_id: str | None) -> ModelCardData:
    dataset_id, on_hub = run.dataset
    test_split = run.run_config.get("data", {}).get("test_split") or "test"
    common = dict(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_id,
                  dataset_name=dataset_id, dataset_split=test_split,
                  dataset_config=run.run_config.get("data", {}).get("dataset_config"))
    eval_results = [
        EvalResult(metric_type="accuracy", metric_name="Test accuracy", metric_value=run.results["test_accuracy"],
                   **common),
        EvalResult(metric_type="f1", metric_name="Test macro-F1", metric_value=run.results["test_f1"],
                   metric_args={"average": "macro"}, **common),
    ]
    strategy = (run.freeze_plan or {}).get("strategy")
    tags = ["image-classification", "transfer-learning", "hf-transfer"]
    tags += ["timm"] if run.is_timm else []
    tags += [f"freeze-{strategy}".replace("_", "-").lower()] if strategy else []
    return ModelCardData(
        model_name=(repo_id or str(run.location)).split("/")[-1],
        base_model=run.base_model,
        datasets=[dataset_id] if on_hub else None,
        license=run.license,
        library_name="timm" if run.timm_loadable else "transformers",
        pipeline_tag="image-classification",
        metrics=["accuracy", "f1"],
        tags=tags,
        eval_results=eval_results,
    )


def _summary(run: RunFiles, repo_id: str | None, data: ModelCardData) -> str:
    labels, results = run.labels, run.results
    requested = str(run.run_config.get("model", {}).get("model") or "")
    if data.base_model:
        origin = f"fine-tuned from {_hub_link(data.base_model)}"
    elif run.run_config.get("model", {}).get("pretrained") is False:
        origin = f"trained from a random initialisation of {escape.markdown_code(run.architecture)}"
    elif requested and Path(requested).is_dir():
        origin = (f"fine-tuned from the local model folder {escape.markdown_code(Path(requested).name)} "
                  f"({escape.markdown_code(run.architecture)})")
    else:
        origin = f"fine-tuned from {escape.markdown_code(run.architecture)} (its pretrained checkpoint was not recorded)"
    n_test = (results.get("split_sizes") or {}).get("test")
    scored = f" on {n_test} held-out test images" if n_test else " on the held-out test split"
    source = repo_id or shareable_path(str(run.location))  # the card is published: no absolute local path
    snippet = [
        "```python", "from transformers import pipeline", "",
        f'classifier = pipeline("image-classification", model="{source}")',
        'predictions = classifier("photo.jpg")  # a file path, an URL or a PIL.Image',
        "print(predictions[0])  # the most likely label and its score", "```",
    ]
    if run.timm_loadable:
        timm_source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{source}"
        snippet += ["", "The weights are timm's own layout, so timm loads them directly:", "",
                    "```python", "import timm", "",
                    f'model = timm.create_model("{timm_source}", pretrained=True)', "```"]
    return "\n".join([
        f"# {escape.markdown(data.model_name)}", "",
        f"An image classifier for {len(labels)} classes ({', '.join(map(escape.markdown, labels))}), {origin} "
        f"on {_dataset_text(run)} with hf_transfer "
        f"(freeze strategy: `{(run.freeze_plan or {}).get('strategy', 'not recorded')}`).", "",
        f"**Test accuracy {results['test_accuracy']:.2%}, macro-F1 {results['test_f1']:.4f}**{scored}.", "",
        "## How to use", "", *snippet,
    ])


def _data_section(run: RunFiles) -> str:
    sizes = run.results.get("split_sizes") or {}
    skipped = run.results.get("skipped_images") or {}
    examples = run.results.get("skipped_image_examples") or {}
    # A streamed train split has no size (None): its images are read as training goes.
    rows = [[split, "streamed" if sizes.get(split, 0) is None else sizes.get(split), skipped.get(split, 0)]
            for split in ("train", "validation", "test")]
    lines = ["## Training data", "", f"Dataset: {_dataset_text(run)}.", "",
             _table(["split", "images used", "skipped as unreadable"], rows), "",
             f"Classes ({len(run.labels)}): " + ", ".join(map(escape.markdown_code, run.labels)) + "."]
    total_skipped = sum(skipped.values())
    if total_skipped:
        listing = "; ".join(f"{split}: {', '.join(map(escape.markdown, names[:5]))}" for split, names in examples.items() if names)
        lines += ["", f"{total_skipped} image(s) could not be decoded and were left out" +
                  (f" (e.g. {listing})." if listing else ".")]
    else:
        lines += ["", "Every image decoded; none was skipped."]
    return "\n".join(lines)


def data_quality_section(report: dict, excluded: dict[str, int] | None = None, exclude_flagged: str | None = None) -> str:
    """The "Data quality" section (markdown) from `data_report.json` and the images excluded per split."""
    counts = report["summary"]
    leaks = ", ".join(f"{crossing}: {values['pairs']}" for crossing, values in counts["leaks_by_splits"].items()) or "none"
    rows = [
        ("images checked", ", ".join(f"{split} {n:,}" for split, n in report["images"].items())),
        ("out-of-fold accuracy of the probe", "—" if counts.get("probe_accuracy") is None else f"{counts['probe_accuracy']:.1%}"),
        ("likely wrong labels (cleanlab, out-of-fold probe)",
         f"{counts['label_issues']} ({', '.join(f'{s} {n}' for s, n in counts['label_issues_by_split'].items())})"),
        ("near-duplicate pairs within a split", counts["near_duplicate_pairs"]),
        (f"leaks across splits (cosine >= {report['settings']['duplicate_threshold']}, or the same perceptual hash)",
         f"{counts['leak_pairs']} ({leaks})"),
        ("groups of copies", f"{counts.get('copy_groups', '—')} group(s), {counts.get('images_in_copy_groups', '—')} images"),
        ("copies with different labels", f"{counts.get('conflicting_label_groups', '—')} group(s), "
                                         f"{counts.get('conflicting_label_images', '—')} images"),
        ("classes below the minimum", counts["classes_below_minimum"]),
    ]
    lines = ["## Data quality", "", "| check | found |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], ""]
    copies = report.get("copies") or {}
    if copies.get("features_meaningful") is False:  # data unlike the backbone's: its features call everything a copy
        lines += [f"The backbone's features do not tell these images apart ({copies['share_with_a_neighbour_above_threshold']:.0%} have a "
                  f"neighbour at cosine >= {report['settings']['duplicate_threshold']}): copies were found by the perceptual hash "
                  "alone.", ""]
    if excluded and any(excluded.values()):
        removed = ", ".join(f"{count} from {split}" for split, count in excluded.items() if count)
        scope = " minus its excluded images." if excluded.get("test") else "."
        lines.append(f"Excluded before training (`exclude_flagged: {exclude_flagged}`): {removed}. "
                     f"The test scores cover the test split as given{scope}")
    else:
        lines.append("Nothing was excluded: the model trained on every image, flagged or not.")
    lines += ["", f"Details in [{DATA_REPORT}]({DATA_REPORT}); the top suspects: [{DATA_SUSPECTS_PNG}]({DATA_SUSPECTS_PNG})."]
    return "\n".join(lines)


def _data_quality_section(run: RunFiles) -> str | None:
    """The data doctor's findings, when the run checked its data, and what it excluded (read from all_results.json)."""
    if run.data_report is None:
        return None
    doctor = run.results.get("data_doctor") or {}
    return data_quality_section(run.data_report, doctor.get("excluded"), doctor.get("exclude_flagged"))


def _preprocessing_section(run: RunFiles) -> str:
    rows = []
    if run.is_timm:
        cfg = run.config.get("pretrained_cfg") or {}
        rows += [["input size", run.image_size and f"{run.image_size[0]} x {run.image_size[1]}"],
                 ["resize interpolation", _untrusted(cfg.get("interpolation"))], ["crop fraction", cfg.get("crop_pct")],
                 ["normalisation mean", cfg.get("mean")], ["normalisation std", cfg.get("std")]]
    elif run.preprocessor:
        proc = run.preprocessor
        rows += [["image processor", _untrusted(proc.get("image_processor_type"))],
                 ["input size", run.image_size and f"{run.image_size[0]} x {run.image_size[1]}"],
                 ["normalisation mean", proc.get("image_mean")], ["normalisation std", proc.get("image_std")]]
    data_args = run.run_config.get("data", {})
    augmentation = data_args.get("augmentation")
    described = {"default": "random-resized-crop + horizontal flip", "none": "none (eval transform only)",
                 "randaugment": "random-resized-crop + flip + RandAugment",
                 "trivialaugment": "random-resized-crop + flip + TrivialAugmentWide"}.get(augmentation, augmentation)
    on_device = run.results.get("resized_on_device")
    if on_device and augmentation not in (None, "none"):  # device_resize: small images are shifted, not cropped
        described = "random shift by up to 1/8 of the side (reflect) + horizontal flip" + described.partition("flip")[2]
    if augmentation:
        rows.append(["train-time augmentation", described])
    if on_device:
        rows.append(["where", "decoded (and augmented) at their own size on the CPU, resized and normalised on the training device"])
    elif data_args.get("crop_min_scale") is not None and augmentation not in (None, "none"):
        rows.append(["random crop area", f"{data_args['crop_min_scale']:.0%} to 100% of the image"])
    cache = run.results.get("feature_cache")
    if cache:
        views = run.run_config.get("run", {}).get("feature_cache_views") or 0
        seen = f"{views} fixed augmented views per image, one per epoch" if views else "un-augmented images (the augmentation above not applied)"
        stage = "the head-only first stage" if "head_stage" in cache else "the head"
        rows.append(["feature cache", f"{stage} trained on backbone features computed once, from {seen}"])
    rows = [row for row in rows if row[1] is not None]
    return "\n".join(["## Preprocessing and augmentation", "",
                      "Every image is decoded to RGB, then (evaluation and inference) resized, center-cropped and "
                      "normalised as below; augmentation applies to training images only.", "",
                      _table(["step", "setting"], rows)])


def _freeze_section(run: RunFiles) -> str:
    plan = run.freeze_plan
    if not plan:
        return "## Freeze plan\n\nThe run recorded no freeze plan (freeze_plan.json is absent)."
    requested = plan.get("preset") or plan.get("freeze") or plan.get("strategy")
    lines = ["## Freeze plan", "",
             _table(["requested", "strategy", "BatchNorm in frozen blocks", "layer-wise lr decay"],
                    [[requested, plan.get("strategy"), plan.get("batchnorm"), plan.get("layer_decay")]])]
    trainable, total = plan.get("trainable_parameters"), plan.get("total_parameters")
    if trainable is not None and total:
        lines += ["", f"Trainable parameters at the end: {trainable:,} of {total:,} ({trainable / total:.2%})."]
    history = plan.get("history") or []
    if len(history) > 1 or plan.get("stages"):
        rows = [[h.get("stage"), h.get("train"), h.get("started_at_step"), h.get("reason", "—"), h.get("lr_scale", 1.0),
                 _rate_range(h.get("learning_rates")), f"{h.get('trainable_parameters', 0):,}"] for h in history]
        lines += ["", "Stages as they ran:", "",
                  _table(["stage", "trains", "from step", "why it started", "lr scale", "learning rate at its first step",
                          "trainable parameters"], rows)]
    blocks = plan.get("blocks") or []
    last = history[-1] if history else {}
    if blocks and "learning_rates" in last:  # the rates the optimizer's groups held as the final stage ran
        first, final = last["learning_rates"], last.get("learning_rates_at_last_step") or {}
        rows = [[b.get("name"), f"{b.get('params', 0):,}", "yes" if b.get("trainable") else "no", first.get(b.get("name")),
                 final.get(b.get("name")), b.get("batchnorm")] for b in blocks]
        lines += ["", "Blocks (final stage):", "",
                  _table(["block", "parameters", "trainable", "learning rate at the stage's first step", "at its last step",
                          "BatchNorm"], rows)]
    elif blocks:  # a run that recorded no rates from its optimizer: the plan's, before the schedule scaled them
        rows = [[b.get("name"), f"{b.get('params', 0):,}", "yes" if b.get("trainable") else "no", b.get("lr"),
                 b.get("batchnorm")] for b in blocks]
        lines += ["", "Blocks (final stage):", "",
                  _table(["block", "parameters", "trainable", "learning rate before the schedule", "BatchNorm"], rows)]
    integrity = plan.get("integrity") or {}
    if integrity.get("frozen_unchanged") is not None:
        verdict = "bit-identical to the start" if integrity["frozen_unchanged"] else "NOT identical to the start"
        lines += ["", f"Weights that never trained were checked at step {integrity.get('at_step')}: {verdict}."]
    return "\n".join(lines)


def _procedure_section(run: RunFiles) -> str:
    """How the weights were trained, read back from the objects that trained them (all_results.json)."""
    results = run.results
    optimizer, schedule = results.get("optimizer"), results.get("lr_scheduler")
    lines = ["## Training procedure", ""]
    if optimizer:
        ignored = ("lr", "weight_decay", "foreach", "capturable", "differentiable", "maximize")  # per group, or not about the math
        hyper = {k: v for k, v in optimizer["hyperparameters"].items() if k not in ignored}
        decays = optimizer.get("weight_decays") or []
        stages = [stage for stage in (run.freeze_plan or {}).get("history") or [] if "learning_rates" in stage]
        rates = ""
        if not stages and optimizer.get("learning_rates"):  # a run that recorded no stage rates: the groups' initial rates
            rates = f"initial learning rate {_rate_range(dict(enumerate(optimizer['learning_rates'])))}, "
        lines.append(f"- Optimizer: `{optimizer['class']}` ({_cell(hyper)}), {optimizer['parameter_groups']} parameter groups, "
                     f"{rates}weight decay {' or '.join(f'{d:g}' for d in decays) or 'as above'} "
                     "(none on biases and norm weights).")
        if stages:  # as the optimizer's groups held them (freeze_plan.json has each block's)
            lines.append("- Learning rate: " + "; ".join(
                f"stage {stage['stage']} (`{stage['train']}`) {_rate_range(stage['learning_rates'])} at its first step, "
                f"{_rate_range(stage.get('learning_rates_at_last_step'))} at its last" for stage in stages)
                + " (per epoch in the table under Results).")
    if schedule:
        kwargs = f" with {_cell(schedule['kwargs'])}" if schedule.get("kwargs") else ""
        unit = " (step_size in epochs)" if schedule["type"] == "step" else ""
        when = "after each evaluation" if schedule["type"] == "reduce_lr_on_plateau" else "per optimizer step"
        applied = f", applied {when} by `{schedule['class']}`" if schedule.get("class") else ""
        lines.append(f"- Learning-rate schedule: `{schedule['type']}`{kwargs}{unit}, {schedule['warmup_steps']} warm-up step(s){applied}.")
    passes = results.get("training_passes")
    if passes:
        lines.append(f"- Training passes: {_training_passes(passes)}.")
    stopping = results.get("early_stopping")
    if stopping:
        what = (f"stopped training at epoch {stopping['epoch']:g} (step {stopping['step']}): {stopping['reason']}" if stopping["stopped_early"]
                else "was on but did not stop training")
        lines.append(f"- Early stopping (patience {stopping['patience']}, threshold {stopping['threshold']}) {what}.")
    published = results.get("published_weights")
    if published and published["kind"] == "best":
        lines.append(f"- The published weights are the best checkpoint by validation {published['metric']} "
                     f"(`{published['checkpoint']}`, step {published['step']}, {published['metric']} {_cell(published['value'])}), "
                     "reloaded at the end of training.")
    elif published:
        lines.append(f"- The published weights are those after the last training step (step {published['step']}, "
                     f"epoch {published['epoch']:g}); no checkpoint was reloaded.")
    if len(lines) == 2:
        return "## Training procedure\n\nThis run recorded no optimizer, schedule or checkpoint information."
    return "\n".join(lines)


def _rate_range(rates: dict | None) -> str:
    """Learning rates by block as one value, or their range across blocks."""
    values = sorted((rates or {}).values())
    if not values:
        return "—"
    return _cell(values[0]) if values[0] == values[-1] else f"{_cell(values[0])} to {_cell(values[-1])} across blocks"


def _training_passes(passes: dict) -> str:
    """all_results.json's `training_passes` in words: precision, processes, machines and the batch of an optimizer step."""
    def count(number: int, word: str) -> str:
        return f"{number} {word}{'' if number == 1 else ('es' if word.endswith('s') else 's')}"

    distributed = f" ({passes['distributed']})" if passes["processes"] > 1 else ""
    gpus = f" x {passes['devices_per_process']} GPUs" if passes.get("devices_per_process", 1) > 1 else ""
    return (f"{passes['precision']} on {passes['device']}, {count(passes['processes'], 'process')}{distributed} on "
            f"{count(passes['machines'], 'machine')}; effective batch {passes['effective_batch_size']} "
            f"({passes['per_device_train_batch_size']} per device{gpus} x "
            f"{count(passes['gradient_accumulation_steps'], 'accumulation step')} x {count(passes['processes'], 'process')})")


def _without_local_folders(value):
    """An absolute local path by its last part only: the card is pushed, and the folders of the machine it ran on are not
    the reader's business (`/home/ana/data/pets` -> `.../pets`)."""
    if isinstance(value, str) and os.path.isabs(os.path.expanduser(value)):
        return f".../{Path(value).name}"
    return value


def _hyperparameters_section(run: RunFiles) -> str:
    """The resolved recipe (run_config.json): data, model and Trainer settings; unset ones are left out."""
    rows = [[section, key, _untrusted(_without_local_folders(value))] for section in ("data", "model", "training")
            for key, value in (run.run_config.get(section) or {}).items()
            if value is not None and "token" not in key.lower()]
    if not rows:
        return "## Training hyperparameters\n\nThe run recorded no run_config.json."
    return "\n".join(["## Training hyperparameters", "", "The resolved recipe of this run:", "",
                      _table(["section", "setting", "value"], rows)])


def _epoch_training(history: list[dict], start: int, end: int) -> tuple[float | None, float | None]:
    """The mean training loss of optimizer steps start+1..end, and the learning rate Trainer logged last among them.

    Each logged `loss` is the mean over the steps since the previous log: every step counts with the loss of the log
    that covers it (exact when logs do not straddle the evaluations; with `logging_steps` that do, the closest there is)."""
    logged = [entry for entry in history if "loss" in entry and "step" in entry]
    total = steps = 0
    previous = 0
    for entry in logged:
        covered = min(entry["step"], end) - max(previous, start)
        if covered > 0:
            total, steps = total + entry["loss"] * covered, steps + covered
        previous = entry["step"]
    rates = [entry["learning_rate"] for entry in logged if start < entry["step"] <= end and "learning_rate" in entry]
    return (total / steps if steps else None), (rates[-1] if rates else None)


def _logged_rate_header(run: RunFiles) -> str:
    """Trainer logs the rate of the optimizer's first parameter group; where blocks differ, the header says whose."""
    stages = [stage for stage in (run.freeze_plan or {}).get("history") or [] if stage.get("learning_rates")]
    differ = any(len(set(stage["learning_rates"].values())) > 1 for stage in stages)
    block = next((stage.get("logged_rate_block") for stage in stages if stage.get("logged_rate_block")), None)
    return f"learning rate of `{block}`" if differ and block else "learning rate"


def _results_section(run: RunFiles) -> str:
    history = training_log(run.state.get("log_history") or [])
    rows = []
    test_by_step = {e.get("step"): e for e in history if "test_accuracy" in e}  # `eval_test_each_epoch`
    with_rates = any("learning_rate" in e for e in history)
    previous = 0
    for entry in (e for e in history if "eval_loss" in e):
        loss, rate = _epoch_training(history, previous, entry.get("step", 0))
        previous = entry.get("step", 0)
        test = test_by_step.get(entry.get("step"), {})
        rows.append([round(entry.get("epoch", 0), 2), entry.get("step"), loss, *([rate] if with_rates else []),
                     entry.get("eval_loss"), entry.get("eval_accuracy"), entry.get("eval_f1"),
                     *([test.get("test_accuracy"), test.get("test_f1")] if test_by_step else [])])
    results = run.results
    lines = ["## Results", "",
             _table(["test accuracy", "test macro-F1", "test loss"],
                    [[results["test_accuracy"], results["test_f1"], results.get("test_loss")]])]
    if rows:
        title = "Per epoch (validation split; the test columns never chose a checkpoint):" if test_by_step else "Per epoch (validation split):"
        lines += ["", title, "",
                  _table(["epoch", "step", "training loss", *([_logged_rate_header(run)] if with_rates else []), "validation loss",
                          "validation accuracy", "validation macro-F1", *(["test accuracy", "test macro-F1"] if test_by_step else [])],
                         rows),
                  "", "Training loss: the mean over the epoch's steps"
                  + ("; learning rate: the one its last logged step ran at." if with_rates else ".")]
    if run.report:
        per_class = run.report["per_class"]
        lines += ["", "Per class (test split):", "",
                  _table(["class", "precision", "recall", "F1", "test images"],
                         [[_untrusted(label), m["precision"], m["recall"], m["f1"], m["support"]]
                          for label, m in per_class.items()])]
    if (run.dir / CONFUSION_PNG).is_file():
        lines += ["", f"![Confusion matrix on the test split]({CONFUSION_PNG})"]
    if (run.dir / EXPLANATIONS_PNG).is_file():
        lines += ["", ("Where the model looked (Grad-CAM of the predicted class, red: most weight) on test images, correctly "
                       "classified ones on the left, misclassified ones on the right:"), "",
                  f"![Class-activation maps of test images]({EXPLANATIONS_PNG})"]
    if (run.dir / CURVES_PNG).is_file():
        lines += ["", f"![Training curves]({CURVES_PNG})"]
    return "\n".join(lines)


def _compute_section(run: RunFiles) -> str:
    hardware = run.results.get("hardware") or run.run_config.get("hardware")
    runtime = run.results.get("train_runtime")
    epochs = run.state.get("epoch") or run.run_config.get("training", {}).get("num_train_epochs")
    cache = run.results.get("feature_cache")
    lines = ["## Hardware and training time", ""]
    lines.append(f"- Hardware: {hardware}" if hardware else "- Hardware: not recorded by this run")
    if runtime is not None:
        on_cache = " (the head, on cached backbone features)" if cache and "head_stage" not in cache else ""
        lines.append(f"- Training time: {_duration(runtime)}" + (f" for {epochs:g} epochs" if epochs else "") + on_cache)
    speed = next((e["train_samples_per_second"] for e in reversed(run.state.get("log_history") or [])
                  if "train_samples_per_second" in e), None)
    if cache and "head_stage" not in cache:
        # The head trained on cached features: Trainer's speed is of the head alone, not of the model on images.
        extraction = [(split["images"] * split["views"], split["seconds"]) for split in cache["splits"].values() if not split["hit"]]
        if extraction and sum(seconds for _, seconds in extraction):
            rate = sum(images for images, _ in extraction) / sum(seconds for _, seconds in extraction)
            lines.append(f"- Backbone feature extraction (the full model on images, once): {rate:.1f} images per second")
        else:
            lines.append("- Backbone features came from the feature cache of an earlier run (no extraction in this run)")
    elif speed:
        lines.append(f"- Throughput: {speed:.1f} training images per second")
    precision = run.results.get("inference_precision")
    if precision:  # what `inference_precision` decided on the machine that ran
        lines.append(f"- Passes without gradients (feature extraction, evaluation, test): {precision['description']}")
    inference = run.results.get("test_samples_per_second")
    if inference:
        lines.append(f"- Inference on the test split (the full model on images): {inference:.1f} images per second")
    return "\n".join(lines)


def _limitations_section(run: RunFiles) -> str:
    results, labels = run.results, run.labels
    notes = [f"It only knows the {len(labels)} classes above: any other image still gets one of them "
             "(there is no 'none of these' answer), so check the score before trusting a prediction."]
    n_test = (results.get("split_sizes") or {}).get("test")
    if n_test:
        # Wilson's interval stays honest near 0% and 100%, where the normal approximation claims too much.
        interval = binomtest(round(results["test_accuracy"] * n_test), n_test).proportion_ci(method="wilson")
        caution = " That is a small test set; treat the scores as rough." if n_test < 1000 else ""
        notes.append(f"The test split has {n_test} images: the true accuracy lies between {interval.low:.1%} and "
                     f"{interval.high:.1%} (95% Wilson interval).{caution}")
    if run.report:
        per_class = run.report["per_class"]
        worst = min(per_class, key=lambda label: per_class[label]["f1"])
        notes.append(f"The weakest class is {escape.markdown_code(worst)} (test F1 {per_class[worst]['f1']:.3f}).")
        matrix, names = run.report["confusion_matrix"], run.report["labels"]
        errors = [(matrix[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j]
        count, true, predicted = max(errors, default=(0, None, None))
        if count:
            notes.append(f"The most frequent mistake is {escape.markdown_code(true)} predicted as {escape.markdown_code(predicted)} "
                         f"({count} test image{'s' if count > 1 else ''}).")
        supports = [m["support"] for m in per_class.values()]
        if supports and min(supports) and max(supports) / min(supports) >= 1.5:
            notes.append(f"The test classes are imbalanced ({min(supports)} to {max(supports)} images per class).")
    if run.image_size:
        notes.append(f"Images are resized to {run.image_size[0]} x {run.image_size[1]} pixels: details smaller than "
                     "that are lost, and very different framings or resolutions than the training data may hurt.")
    skipped = sum((results.get("skipped_images") or {}).values())
    if skipped:
        notes.append(f"{skipped} unreadable image(s) were dropped from the data; the scores do not cover them.")
    if not run.license:
        notes.append("No license was recorded for the base model: check it before using this model.")
    notes.append(f"It inherits the biases of {_dataset_text(run)}: it was only evaluated on images from that source.")
    return "\n".join(["## Limitations", "", *[f"- {note}" for note in notes]])


def _deployment_section(run: RunFiles, repo_id: str | None) -> str:
    """`hf-transfer export`'s graphs (onnx/export_report.json): each one's check against PyTorch, and the latency table."""
    report = run.export_report
    if not report:
        return ""
    check, kept = report.get("check") or {}, {name: graph for name, graph in report["graphs"].items() if graph.get("status") == "kept"}
    rows = [[f"`{graph.get('file')}`", name, graph.get("size_mb"), f"{graph.get('agreement', 0):.2%}", graph.get("max_abs_logit_difference"),
             f"{graph.get('accuracy', 0):.2%}", "kept" if name in kept else f"refused: {graph.get('reason')}"]
            for name, graph in report["graphs"].items()]
    lines = ["## Deployment", "",
             f"`hf-transfer export` wrote ONNX graphs of the whole classifier (preprocessed `pixel_values` in, `logits` out, any batch "
             f"size; opset {report.get('opset')}, {_cell(report.get('exporter'))}), and checked each against the PyTorch model on "
             f"{check.get('images')} test images of {_cell(check.get('dataset'))} (PyTorch accuracy {check.get('pytorch_accuracy', 0):.2%}):", "",
             _table(["file", "precision", "MB", "top-1 agreement with PyTorch", "largest logit difference", "test accuracy", "status"], rows)]
    quantization = (report["graphs"].get("int8") or {}).get("quantization")
    if quantization:
        lines += ["", f"int8 quantization: {_cell(quantization)}."]
    speed = report.get("speed") or {}
    if speed.get("rows"):
        throughput = next((key for key in speed["rows"][0] if key.startswith("images_per_second_batch_")), None)
        lines += ["", f"Speed on the machine that exported it ({_cell(speed.get('machine'))}), onnxruntime's CPU provider:", "",
                  _table(["model", "latency at batch 1 (ms)", f"images/s at batch {throughput.rsplit('_', 1)[-1] if throughput else '?'}",
                          "test accuracy"],
                         [[row["model"], row.get("latency_ms_batch_1"), row.get(throughput), f"{row.get('accuracy', 0):.2%}"]
                          for row in speed["rows"]])]
    if kept:
        graph = kept.get("int8") or kept["fp32"]
        source = repo_id or str(run.location)
        where = f'hf_hub_download("{source}", "{graph["file"]}")' if repo_id else f'"{source}/{graph["file"]}"'
        backend = "onnx-int8" if "int8" in kept else "onnx"
        lines += ["", "Without PyTorch's model code, on onnxruntime:", "", "```python",
                  "import onnxruntime as ort", *(["from huggingface_hub import hf_hub_download"] if repo_id else []),
                  "from PIL import Image", "from transformers import AutoImageProcessor", "",
                  f'processor = AutoImageProcessor.from_pretrained("{source}")',
                  f"session = ort.InferenceSession({where})",
                  'pixels = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt")["pixel_values"].numpy()',
                  'logits = session.run(["logits"], {"pixel_values": pixels})[0]', "```", "",
                  "A whole folder, batched, to a CSV file (resumable):", "", "```bash",
                  f"hf-transfer predict {source} photos/ --backend {backend} --output predictions.csv", "```"]
    return "\n".join(lines)


def ensure_plots(run: RunFiles) -> None:
    """Draw the figures the card embeds if the run did not leave them."""
    history = run.state.get("log_history") or []
    if not (run.dir / CURVES_PNG).is_file() and any("loss" in e or "eval_loss" in e for e in history):
        plot_training_curves(history, run.dir / CURVES_PNG, curve_marks(run.freeze_plan, run.results.get("early_stopping")))
    if not (run.dir / CONFUSION_PNG).is_file() and run.report:
        plot_confusion_matrix(run.report["confusion_matrix"], run.report["labels"], run.dir / CONFUSION_PNG)


def write_model_card(output_dir: str | Path, repo_id: str | None = None, final_dir: str | Path | None = None) -> ModelCard:
    """Write `output_dir/README.md` for the run; `repo_id` (user/name) goes into the usage snippet, else the folder's
    path: `final_dir` for a card written in a staging folder, to be published with the model into `final_dir`."""
    run = RunFiles(output_dir)
    if final_dir is not None:
        run.location = Path(final_dir).resolve()
    ensure_plots(run)
    data = build_card_data(run, repo_id)
    sections = [_summary(run, repo_id, data), _data_section(run), why_this_backbone(run.selection), _data_quality_section(run),
                _preprocessing_section(run),
                _freeze_section(run), _procedure_section(run), _hyperparameters_section(run), _results_section(run),
                _compute_section(run), _deployment_section(run, repo_id), _limitations_section(run)]
    sections = [section for section in sections if section]  # no "Data quality" unless the run checked its data, no "Deployment" before export
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    card.save(run.dir / MODEL_CARD)
    return card
