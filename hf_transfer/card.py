"""Model card (README.md) of a training output dir, filled entirely from the run's own files.

The card's prose and layout are a Jinja template (templates/model_card.md) rendered by huggingface_hub's
ModelCard.from_template; this module computes its values from the run's files and escapes every string from outside for
Markdown before it reaches the template (Jinja's autoescape is HTML's, which leaves `#`, `|`, `*` and backticks live).
Metadata goes through huggingface_hub's ModelCardData/EvalResult so the Hub parses model-index.
"""

from __future__ import annotations

import os
import platform
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from scipy.stats import binomtest

from . import escape
from .plots import curve_marks, has_curves, plot_confusion_matrix, plot_training_curves, training_log
from .repo_files import CONFUSION_PNG, CURVES_PNG, DATA_REPORT, DATA_SUSPECTS_PNG, EXPLANATIONS_PNG, MODEL_CARD, RunFiles, shareable_path
from .selection_report import why_this_backbone

# Package data (pyproject.toml's [tool.setuptools.package-data]), read where the package is installed.
TEMPLATES = resources.files(__package__) / "templates"
CARD_TEMPLATE, DATA_QUALITY_TEMPLATE = TEMPLATES / "model_card.md", TEMPLATES / "data_quality.md"


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
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return escape.markdown_code(repo_id)
    return f"[{escape.markdown(repo_id)}](https://huggingface.co/{kind}{repo_id})"


def _cell(value) -> str:
    """A value as a table cell (the template's `cell`): strings that are not `_Shown` come from hf_transfer itself."""
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
    data_args = run.run_config.get("data", {})
    common = dict(task_type="image-classification", task_name="Image Classification", dataset_type=dataset_id, dataset_name=dataset_id,
                  dataset_split=data_args.get("test_split") or "test", dataset_config=data_args.get("dataset_config"))
    eval_results = [EvalResult(metric_type="accuracy", metric_name="Test accuracy", metric_value=run.results["test_accuracy"], **common),
                    EvalResult(metric_type="f1", metric_name="Test macro-F1", metric_value=run.results["test_f1"],
                               metric_args={"average": "macro"}, **common)]
    strategy = (run.freeze_plan or {}).get("strategy")
    tags = ["image-classification", "transfer-learning", "hf-transfer"]
    tags += ["timm"] if run.is_timm else []
    tags += [f"freeze-{strategy}".replace("_", "-").lower()] if strategy else []
    return ModelCardData(model_name=(repo_id or str(run.location)).split("/")[-1], base_model=run.base_model,
                         datasets=[dataset_id] if on_hub else None, license=run.license,
                         library_name="timm" if run.timm_loadable else "transformers", pipeline_tag="image-classification",
                         metrics=["accuracy", "f1"], tags=tags, eval_results=eval_results)


def _summary(run: RunFiles, repo_id: str | None, data: ModelCardData) -> dict:
    """What the model is, where its weights and data came from, and how to load it."""
    identifier, on_hub = run.dataset
    requested = str(run.run_config.get("model", {}).get("model") or "")
    source = repo_id or shareable_path(str(run.location))  # the card is published: no absolute local path
    return dict(title=escape.markdown(data.model_name), labels=[escape.markdown(label) for label in run.labels],
                model=dict(hub_link=data.base_model and _hub_link(data.base_model), architecture=escape.markdown_code(run.architecture),
                           random_init=run.run_config.get("model", {}).get("pretrained") is False,
                           folder=requested and Path(requested).is_dir() and escape.markdown_code(Path(requested).name)),
                dataset=dict(link=on_hub and _hub_link(identifier, "datasets/"),
                             folder=identifier != "unknown" and escape.markdown_code(identifier)),
                strategy=(run.freeze_plan or {}).get("strategy", "not recorded"), source=source,
                timm_source=run.timm_loadable and (f"hf-hub:{repo_id}" if repo_id else f"local-dir:{source}"),
                n_test=(run.results.get("split_sizes") or {}).get("test"), image_size=run.image_size, license=run.license)


def _data(run: RunFiles) -> dict:
    sizes = run.results.get("split_sizes") or {}
    skipped = run.results.get("skipped_images") or {}
    examples = run.results.get("skipped_image_examples") or {}
    # A streamed train split has no size (None): its images are read as training goes.
    return dict(splits=[[split, "streamed" if sizes.get(split, 0) is None else sizes.get(split), skipped.get(split, 0)]
                        for split in ("train", "validation", "test")],
                label_codes=[escape.markdown_code(label) for label in run.labels], skipped=sum(skipped.values()),
                examples=[f"{split}: {', '.join(map(escape.markdown, names[:5]))}" for split, names in examples.items() if names])


def data_quality_section(report: dict, excluded: dict[str, int] | None = None, exclude_flagged: str | None = None) -> str:
    """The "Data quality" section (markdown) from `data_report.json` and the images excluded per split."""
    # A section, not a card (ModelCard.from_template makes whole cards): rendered as from_template renders, with jinja2.Template.
    return jinja2.Template(DATA_QUALITY_TEMPLATE.read_text(encoding="utf-8")).render(
        report=report, excluded=excluded, exclude_flagged=exclude_flagged, report_file=DATA_REPORT, suspects_file=DATA_SUSPECTS_PNG)


def _data_quality(run: RunFiles) -> str | None:
    """The data doctor's findings, when the run checked its data, and what it excluded (read from all_results.json)."""
    if run.data_report is None:
        return None
    doctor = run.results.get("data_doctor") or {}
    return data_quality_section(run.data_report, doctor.get("excluded"), doctor.get("exclude_flagged"))


def _preprocessing(run: RunFiles) -> dict:
    cfg, proc = run.config.get("pretrained_cfg") or {}, run.preprocessor or {}
    data_args = run.run_config.get("data", {})
    mean, std = (cfg.get("mean"), cfg.get("std")) if run.is_timm else (proc.get("image_mean"), proc.get("image_std"))
    return dict(timm=run.is_timm, interpolation=_untrusted(cfg.get("interpolation")), crop_pct=cfg.get("crop_pct"), mean=mean, std=std,
                preprocessor=bool(run.preprocessor), processor_type=_untrusted(proc.get("image_processor_type")),
                augmentation=data_args.get("augmentation"), crop_min_scale=data_args.get("crop_min_scale"),
                on_device=run.results.get("resized_on_device"), cache_views=run.run_config.get("run", {}).get("feature_cache_views") or 0,
                sizes_trained=_sizes_trained(run.results.get("image_sizes_trained")))


def _sizes_trained(parts) -> list[dict] | None:
    """`image_sizes_trained` as numbers only: all_results.json is a file of the folder, shown in the card."""
    try:
        return [{"epochs": [int(part["epochs"][0]), int(part["epochs"][1])], "size": [int(part["size"][0]), int(part["size"][1])]}
                for part in parts] if parts else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _freeze_plan(run: RunFiles) -> dict | None:
    plan = run.freeze_plan
    if not plan:
        return None
    history, blocks = plan.get("history") or [], plan.get("blocks") or []
    last = history[-1] if history else {}
    block_rates = bool(blocks) and "learning_rates" in last  # the rates the optimizer's groups held as the final stage ran
    first, final = last.get("learning_rates") or {}, last.get("learning_rates_at_last_step") or {}
    return dict(settings=[plan.get("preset") or plan.get("freeze") or plan.get("strategy"), plan.get("strategy"), plan.get("batchnorm"),
                          plan.get("layer_decay")],
                trainable=plan.get("trainable_parameters"), total=plan.get("total_parameters"), integrity=plan.get("integrity") or {},
                stages=[[h.get("stage"), h.get("train"), h.get("started_at_step"), h.get("reason", "—"), h.get("lr_scale", 1.0),
                         _rate_range(h.get("learning_rates")), f"{h.get('trainable_parameters', 0):,}"] for h in history]
                if len(history) > 1 or plan.get("stages") else None,
                block_rates=block_rates,
                blocks=[[b.get("name"), f"{b.get('params', 0):,}", "yes" if b.get("trainable") else "no",
                         *([first.get(b.get("name")), final.get(b.get("name"))] if block_rates else [b.get("lr")]), b.get("batchnorm")]
                        for b in blocks])


def _optimizer(run: RunFiles) -> dict | None:
    """How the weights were trained, read back from the objects that trained them (all_results.json)."""
    optimizer = run.results.get("optimizer")
    if not optimizer:
        return None
    ignored = ("lr", "weight_decay", "foreach", "capturable", "differentiable", "maximize")  # per group, or not about the math
    stages = [stage for stage in (run.freeze_plan or {}).get("history") or [] if "learning_rates" in stage]
    initial = not stages and optimizer.get("learning_rates")  # a run that recorded no stage rates: the groups' initial rates
    return dict(class_name=optimizer["class"], hyperparameters={k: v for k, v in optimizer["hyperparameters"].items() if k not in ignored},
                parameter_groups=optimizer["parameter_groups"], decays=" or ".join(f"{d:g}" for d in optimizer.get("weight_decays") or []),
                initial_rates=initial and _rate_range(dict(enumerate(optimizer["learning_rates"]))),
                # as the optimizer's groups held them (freeze_plan.json has each block's)
                stages=[dict(stage=stage["stage"], train=stage["train"], first=_rate_range(stage["learning_rates"]),
                             last=_rate_range(stage.get("learning_rates_at_last_step"))) for stage in stages])


def _rate_range(rates: dict | None) -> str:
    values = sorted((rates or {}).values())
    if not values:
        return "—"
    return _cell(values[0]) if values[0] == values[-1] else f"{_cell(values[0])} to {_cell(values[-1])} across blocks"


def _without_local_folders(value):
    """An absolute local path by its last part only: the card is pushed, and the folders of the machine it ran on are not
    the reader's business (`/home/ana/data/pets` -> `.../pets`)."""
    if isinstance(value, str) and os.path.isabs(os.path.expanduser(value)):
        return f".../{Path(value).name}"
    return value


def _hyperparameters(run: RunFiles) -> list[list]:
    """The resolved recipe (run_config.json): data, model and Trainer settings; unset ones are left out."""
    return [[section, key, _untrusted(_without_local_folders(value))] for section in ("data", "model", "training")
            for key, value in (run.run_config.get(section) or {}).items()
            if value is not None and "token" not in key.lower()]


def _epoch_training(history: list[dict], start: int, end: int) -> tuple[float | None, float | None]:
    """The mean training loss of optimizer steps start+1..end, and the learning rate Trainer logged last among them.

    Each logged `loss` is the mean over the steps since the previous log: every step counts with the loss of the log
    that covers it (exact when logs do not straddle the evaluations; with `logging_steps` that do, the closest there is)."""
    logged = [entry for entry in history if "loss" in entry and "step" in entry]
    total = steps = previous = 0
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


def _epochs(run: RunFiles) -> dict:
    """The per-epoch table: each evaluation with the mean training loss and the rate of the steps before it."""
    history = training_log(run.state.get("log_history") or [])
    test_by_step = {e.get("step"): e for e in history if "test_accuracy" in e}  # `eval_test_each_epoch`
    with_rates = any("learning_rate" in e for e in history)
    rows, previous = [], 0
    for entry in (e for e in history if "eval_loss" in e):
        loss, rate = _epoch_training(history, previous, entry.get("step", 0))
        previous = entry.get("step", 0)
        test = test_by_step.get(entry.get("step"), {})
        rows.append([round(entry.get("epoch", 0), 2), entry.get("step"), loss, *([rate] if with_rates else []),
                     entry.get("eval_loss"), entry.get("eval_accuracy"), entry.get("eval_f1"),
                     *([test.get("test_accuracy"), test.get("test_f1")] if test_by_step else [])])
    return dict(rows=rows, with_rates=with_rates, with_test=bool(test_by_step), rate_header=_logged_rate_header(run))


def _compute(run: RunFiles) -> dict:
    runtime, cache = run.results.get("train_runtime"), run.results.get("feature_cache")
    head_on_cache = bool(cache) and "head_stage" not in cache
    rate = None
    if head_on_cache:  # the head trained on cached features: Trainer's speed is of the head alone, not of the model on images
        extraction = [(split["images"] * split["views"], split["seconds"]) for split in cache["splits"].values() if not split["hit"]]
        if extraction and sum(seconds for _, seconds in extraction):
            rate = sum(images for images, _ in extraction) / sum(seconds for _, seconds in extraction)
    return dict(hardware=run.results.get("hardware") or run.run_config.get("hardware"),
                runtime=None if runtime is None else _duration(runtime), head_on_cache=head_on_cache, extraction_rate=rate,
                epochs=run.state.get("epoch") or run.run_config.get("training", {}).get("num_train_epochs"),
                speed=next((e["train_samples_per_second"] for e in reversed(run.state.get("log_history") or [])
                            if "train_samples_per_second" in e), None),
                precision=run.results.get("inference_precision"),  # what `inference_precision` decided on the machine that ran
                inference=run.results.get("test_samples_per_second"))


def _limitations(run: RunFiles) -> dict:
    n_test = (run.results.get("split_sizes") or {}).get("test")
    # Wilson's interval stays honest near 0% and 100%, where the normal approximation claims too much.
    limits = dict(interval=n_test and binomtest(round(run.results["test_accuracy"] * n_test), n_test).proportion_ci(method="wilson"),
                  weakest=None, mistake=None, supports=None)
    if run.report:
        per_class = run.report["per_class"]
        worst = min(per_class, key=lambda label: per_class[label]["f1"])
        matrix, names = run.report["confusion_matrix"], run.report["labels"]
        errors = [(matrix[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j]
        count, true, predicted = max(errors, default=(0, None, None))
        supports = [m["support"] for m in per_class.values()]
        limits.update(weakest=escape.markdown_code(worst), weakest_f1=per_class[worst]["f1"],
                      supports=supports and (min(supports), max(supports)),
                      mistake=count and dict(count=count, true=escape.markdown_code(true), predicted=escape.markdown_code(predicted)))
    return limits


def _deployment(run: RunFiles) -> dict | None:
    """`hf-transfer export`'s graphs (onnx/export_report.json): each one's check against PyTorch, and the latency table."""
    report = run.export_report
    if not report:
        return None
    kept = {name: graph for name, graph in report["graphs"].items() if graph.get("status") == "kept"}
    speed = report.get("speed") or {}
    speed_rows = speed.get("rows")
    throughput = next((key for key in speed_rows[0] if key.startswith("images_per_second_batch_")), None) if speed_rows else None
    return dict(opset=report.get("opset"), exporter=report.get("exporter"), check=report.get("check") or {},
                graphs=[[f"`{graph.get('file')}`", name, graph.get("size_mb"), f"{graph.get('agreement', 0):.2%}",
                         graph.get("max_abs_logit_difference"), f"{graph.get('accuracy', 0):.2%}",
                         "kept" if name in kept else f"refused: {graph.get('reason')}"]
                        for name, graph in report["graphs"].items()],
                quantization=(report["graphs"].get("int8") or {}).get("quantization"), machine=speed.get("machine"),
                batch=throughput.rsplit("_", 1)[-1] if throughput else "?",
                speed=speed_rows and [[row["model"], row.get("latency_ms_batch_1"), row.get(throughput), f"{row.get('accuracy', 0):.2%}"]
                                      for row in speed_rows],
                kept=bool(kept), graph=kept and (kept.get("int8") or kept["fp32"])["file"],
                backend="onnx-int8" if "int8" in kept else "onnx")


def ensure_plots(run: RunFiles) -> None:
    """Draw the figures the card embeds if the run did not leave them."""
    history = run.state.get("log_history") or []
    if not (run.dir / CURVES_PNG).is_file() and has_curves(history):
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
    results = run.results
    card = ModelCard.from_template(
        data, template_str=CARD_TEMPLATE.read_text(encoding="utf-8"), cell=_cell, repo_id=repo_id, scores=results,
        **_summary(run, repo_id, data), data=_data(run), why_this_backbone=why_this_backbone(run.selection),
        data_quality=_data_quality(run), pre=_preprocessing(run), feature_cache=results.get("feature_cache"),
        plan=_freeze_plan(run), optimizer=_optimizer(run), schedule=results.get("lr_scheduler"), passes=results.get("training_passes"),
        stopping=results.get("early_stopping"), published=results.get("published_weights"), hyperparameters=_hyperparameters(run),
        epochs=_epochs(run), per_class=[[_untrusted(label), m["precision"], m["recall"], m["f1"], m["support"]]
                                        for label, m in run.report["per_class"].items()] if run.report else None,
        figures={name: figure if (run.dir / figure).is_file() else None
                 for name, figure in (("confusion", CONFUSION_PNG), ("explanations", EXPLANATIONS_PNG), ("curves", CURVES_PNG))},
        compute=_compute(run), deployment=_deployment(run), limits=_limitations(run))
    card.save(run.dir / MODEL_CARD)
    return card
