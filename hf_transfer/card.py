"""Model card (README.md) of a training output dir, filled entirely from the run's own files.

Metadata goes through huggingface_hub's ModelCardData/EvalResult so the Hub parses model-index.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from scipy.stats import binomtest

from .plots import plot_confusion_matrix, plot_training_curves, training_log
from .repo_files import CONFUSION_PNG, CURVES_PNG, DATA_REPORT, DATA_SUSPECTS_PNG, EXPLANATIONS_PNG, MODEL_CARD, RunFiles


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
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
        origin = f"fine-tuned from [{data.base_model}](https://huggingface.co/{data.base_model})"
    elif run.run_config.get("model", {}).get("pretrained") is False:
        origin = f"trained from a random initialisation of `{run.architecture}`"
    elif requested and Path(requested).is_dir():
        origin = f"fine-tuned from the local model folder `{Path(requested).name}` (`{run.architecture}`)"
    else:
        origin = f"fine-tuned from `{run.architecture}` (its pretrained checkpoint was not recorded)"
    n_test = (results.get("split_sizes") or {}).get("test")
    scored = f" on {n_test} held-out test images" if n_test else " on the held-out test split"
    source = repo_id or str(run.location)
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
        f"# {data.model_name}", "",
        f"An image classifier for {len(labels)} classes ({', '.join(labels)}), {origin} "
        f"on {run.dataset_text} with hf_transfer "
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
    lines = ["## Training data", "", f"Dataset: {run.dataset_text}.", "",
             _table(["split", "images used", "skipped as unreadable"], rows), "",
             f"Classes ({len(run.labels)}): " + ", ".join(f"`{label}`" for label in run.labels) + "."]
    total_skipped = sum(skipped.values())
    if total_skipped:
        listing = "; ".join(f"{split}: {', '.join(map(str, names[:5]))}" for split, names in examples.items() if names)
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
        (f"leaks across splits (cosine >= {report['settings']['duplicate_threshold']})", f"{counts['leak_pairs']} ({leaks})"),
        ("classes below the minimum", counts["classes_below_minimum"]),
    ]
    lines = ["## Data quality", "", "| check | found |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], ""]
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
                 ["resize interpolation", cfg.get("interpolation")], ["crop fraction", cfg.get("crop_pct")],
                 ["normalisation mean", cfg.get("mean")], ["normalisation std", cfg.get("std")]]
    elif run.preprocessor:
        proc = run.preprocessor
        rows += [["image processor", proc.get("image_processor_type")],
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
                 f"{h.get('trainable_parameters', 0):,}"] for h in history]
        lines += ["", "Stages as they ran:", "",
                  _table(["stage", "trains", "from step", "why it started", "lr scale", "trainable parameters"], rows)]
    blocks = plan.get("blocks") or []
    if blocks:
        rows = [[b.get("name"), f"{b.get('params', 0):,}", "yes" if b.get("trainable") else "no", b.get("lr"),
                 b.get("batchnorm")] for b in blocks]
        lines += ["", "Blocks (final stage):", "",
                  _table(["block", "parameters", "trainable", "learning rate", "BatchNorm"], rows)]
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
        low, high = (optimizer.get("learning_rates") or [None, None])[:2] if optimizer.get("learning_rates") else (None, None)
        rates = f"{low:.3g}" if low == high else f"{low:.3g} to {high:.3g} across blocks"
        lines.append(f"- Optimizer: `{optimizer['class']}` ({_cell(hyper)}), {optimizer['parameter_groups']} parameter groups, "
                     f"learning rate {rates}, weight decay {' or '.join(f'{d:g}' for d in decays) or 'as above'} "
                     "(none on biases and norm weights).")
    if schedule:
        kwargs = f" with {_cell(schedule['kwargs'])}" if schedule.get("kwargs") else ""
        unit = " (step_size in epochs)" if schedule["type"] == "step" else ""
        lines.append(f"- Learning-rate schedule: `{schedule['type']}`{kwargs}{unit}, {schedule['warmup_steps']} warm-up step(s).")
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


def _without_local_folders(value):
    """An absolute local path by its last part only: the card is pushed, and the folders of the machine it ran on are not
    the reader's business (`/home/ana/data/pets` -> `.../pets`)."""
    if isinstance(value, str) and os.path.isabs(os.path.expanduser(value)):
        return f".../{Path(value).name}"
    return value


def _hyperparameters_section(run: RunFiles) -> str:
    """The resolved recipe (run_config.json): data, model and Trainer settings; unset ones are left out."""
    rows = [[section, key, _without_local_folders(value)] for section in ("data", "model", "training")
            for key, value in (run.run_config.get(section) or {}).items()
            if value is not None and "token" not in key.lower()]
    if not rows:
        return "## Training hyperparameters\n\nThe run recorded no run_config.json."
    return "\n".join(["## Training hyperparameters", "", "The resolved recipe of this run:", "",
                      _table(["section", "setting", "value"], rows)])


def _results_section(run: RunFiles) -> str:
    history = training_log(run.state.get("log_history") or [])
    rows = []
    test_by_step = {e.get("step"): e for e in history if "test_accuracy" in e}  # `eval_test_each_epoch`
    for entry in (e for e in history if "eval_loss" in e):
        train = [e["loss"] for e in history if "loss" in e and e.get("step", 0) <= entry.get("step", 0)]
        test = test_by_step.get(entry.get("step"), {})
        rows.append([round(entry.get("epoch", 0), 2), entry.get("step"), train[-1] if train else None,
                     entry.get("eval_loss"), entry.get("eval_accuracy"), entry.get("eval_f1"),
                     *([test.get("test_accuracy"), test.get("test_f1")] if test_by_step else [])])
    results = run.results
    lines = ["## Results", "",
             _table(["test accuracy", "test macro-F1", "test loss"],
                    [[results["test_accuracy"], results["test_f1"], results.get("test_loss")]])]
    if rows:
        title = "Per epoch (validation split; the test columns never chose a checkpoint):" if test_by_step else "Per epoch (validation split):"
        lines += ["", title, "",
                  _table(["epoch", "step", "training loss", "validation loss", "validation accuracy", "validation macro-F1",
                          *(["test accuracy", "test macro-F1"] if test_by_step else [])], rows)]
    if run.report:
        per_class = run.report["per_class"]
        lines += ["", "Per class (test split):", "",
                  _table(["class", "precision", "recall", "F1", "test images"],
                         [[label, m["precision"], m["recall"], m["f1"], m["support"]]
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
        notes.append(f"The weakest class is `{worst}` (test F1 {per_class[worst]['f1']:.3f}).")
        matrix, names = run.report["confusion_matrix"], run.report["labels"]
        errors = [(matrix[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j]
        count, true, predicted = max(errors, default=(0, None, None))
        if count:
            notes.append(f"The most frequent mistake is `{true}` predicted as `{predicted}` "
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
    notes.append(f"It inherits the biases of {run.dataset_text}: it was only evaluated on images from that source.")
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
        plot_training_curves(history, run.dir / CURVES_PNG)
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
    sections = [_summary(run, repo_id, data), _data_section(run), _data_quality_section(run), _preprocessing_section(run),
                _freeze_section(run), _procedure_section(run), _hyperparameters_section(run), _results_section(run),
                _compute_section(run), _deployment_section(run, repo_id), _limitations_section(run)]
    sections = [section for section in sections if section]  # no "Data quality" unless the run checked its data, no "Deployment" before export
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    card.save(run.dir / MODEL_CARD)
    return card
