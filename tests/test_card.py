"""Model card and plots, built from a real (tiny) hf_transfer training run.

`train_tiny_run` runs `hf_transfer.finetune` on a small ViT and 40 photos of the shipped cats-vs-dogs
sample (one of them truncated); test_hub.py pushes the same run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from hf_transfer.card import describe_hardware, write_model_card
from hf_transfer.options import ModelArguments
from hf_transfer.plots import plot_confusion_matrix, plot_training_curves, training_log
from hf_transfer.repo_files import RunFiles, shareable_path

LABELS = ["cat", "dog"]
PLACEHOLDERS = (r"\[More Information Needed\]", r"\{\{", r"\bTODO\b", r"\bTBD\b", r"\bNone\b", r"\bnan\b", r"\.partial")


@pytest.fixture
def fresh_run(run_dir, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def test_model_index_equals_all_results(fresh_run):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    write_model_card(fresh_run)
    results = json.loads((fresh_run / "all_results.json").read_text())
    metadata = _front_matter((fresh_run / "README.md").read_text())
    model_name, eval_results = model_index_to_eval_results(metadata["model-index"])
    by_metric = {result.metric_type: result for result in eval_results}
    assert model_name == "run"
    assert by_metric["accuracy"].metric_value == results["test_accuracy"]
    assert by_metric["f1"].metric_value == results["test_f1"]
    assert {r.task_type for r in eval_results} == {"image-classification"}
    assert {r.dataset_type for r in eval_results} == {"cats-dogs-40"}
    assert {r.dataset_split for r in eval_results} == {"test"}

    # The same card read back through huggingface_hub's own parser.
    card = ModelCard.load(fresh_run / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "transformers"
    assert {"transfer-learning", "freeze-staged", "image-classification"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.datasets is None  # local model and data folders


def test_card_body_is_filled_from_the_run(fresh_run):
    card = write_model_card(fresh_run)
    text = (fresh_run / "README.md").read_text()
    assert text == str(card) + ("" if text.endswith("\n") and str(card).endswith("\n") else "\n")
    body = text.split("\n---\n", 1)[1]
    for placeholder in PLACEHOLDERS:
        assert not re.search(placeholder, body), placeholder
    results = json.loads((fresh_run / "all_results.json").read_text())
    report = json.loads((fresh_run / "test_report.json").read_text())
    state = json.loads((fresh_run / "trainer_state.json").read_text())

    # The card is published: it names the folder relative to the working directory (or by name), never its absolute path.
    assert f'pipeline("image-classification", model="{shareable_path(str(fresh_run.resolve()))}")' in body
    assert str(fresh_run.resolve()) not in body
    assert "`cat`, `dog`" in body
    sizes = results["split_sizes"]
    assert f"| train | {sizes['train']} | 1 |" in body and f"| test | {sizes['test']} | 0 |" in body
    assert results["skipped_image_examples"]["train"]
    for name in results["skipped_image_examples"]["train"]:  # the truncated image is named
        assert name in body
    for label, metrics in report["per_class"].items():
        assert f"| {label} | {metrics['precision']:.4g} | {metrics['recall']:.4g} | {metrics['f1']:.4g} |" in body
    epochs = [entry for entry in training_log(state["log_history"]) if "eval_loss" in entry]
    assert len(epochs) == 2  # the evaluation of the reloaded best model after training is no epoch
    for entry in epochs:
        assert f"| {entry['eval_loss']:.4g} | {entry['eval_accuracy']:.4g} |" in body
    assert f"best checkpoint by validation accuracy (`{Path(state['best_model_checkpoint']).name}`" in body
    for block in json.loads((fresh_run / "freeze_plan.json").read_text())["blocks"]:
        assert f"| {block['name']} | {block['params']:,} |" in body
    assert f"{results['test_accuracy']:.2%}" in body
    assert "32 x 32" in body  # resolution, from preprocessor_config.json
    assert "head_stage" in results["feature_cache"]  # fastai's head-only epoch ran on cached features, and the card says so
    assert "| feature cache | the head-only first stage trained on backbone features computed once, from un-augmented images" in body
    n, p, z = sizes["test"], results["test_accuracy"], 1.96  # Wilson's score interval, by its formula
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert f"between {centre - half:.1%} and {centre + half:.1%} (95% Wilson interval)" in body
    assert "small test set" in body
    for figure in ("confusion_matrix.png", "training_curves.png"):
        assert f"]({figure})" in body
        assert Image.open(fresh_run / figure).format == "PNG"  # drawn by the card when the run had none


def test_card_uses_the_repo_id_and_the_recorded_hardware(fresh_run):
    results = json.loads((fresh_run / "all_results.json").read_text())
    (fresh_run / "all_results.json").write_text(json.dumps({**results, "hardware": describe_hardware()}))
    write_model_card(fresh_run, repo_id="user/tiny-vit-cats")
    text = (fresh_run / "README.md").read_text()
    assert f"- Hardware: {describe_hardware()}" in text and "CPU cores" in text
    assert 'pipeline("image-classification", model="user/tiny-vit-cats")' in text
    assert str(fresh_run.resolve()) not in text
    assert _front_matter(text)["model-index"][0]["name"] == "tiny-vit-cats"


def test_timm_card_takes_license_and_base_model_from_pretrained_cfg(fresh_run):
    import timm
    from safetensors.torch import load_file, save_file
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    pretrained_cfg = timm.models.get_pretrained_cfg("test_efficientnet.r160_in1k").to_dict()
    pretrained_cfg.pop("num_classes")
    config = TimmWrapperConfig(architecture="test_efficientnet", pretrained_cfg=pretrained_cfg, num_labels=2,
                               id2label=dict(enumerate(LABELS)), label2id={"cat": 0, "dog": 1})
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (fresh_run / name).unlink()
    TimmWrapperForImageClassification(config).save_pretrained(fresh_run)
    run_config = json.loads((fresh_run / "run_config.json").read_text())
    run_config["model"] = asdict(ModelArguments(model="test_efficientnet"))  # a bare timm name, pretrained
    (fresh_run / "run_config.json").write_text(json.dumps(run_config))

    data = _front_matter(str(write_model_card(fresh_run, repo_id="user/effnet")))
    assert data["license"] == "apache-2.0" and data["base_model"] == "timm/test_efficientnet.r160_in1k"
    assert "timm" in data["tags"]
    # transformers saves timm weights under `timm_model.`: only transformers can load them, so say so.
    assert data["library_name"] == "transformers"
    assert "160 x 160" in (fresh_run / "README.md").read_text()

    # With timm's own key names (and no null model_args) timm loads the repo too: library_name timm.
    weights = load_file(fresh_run / "model.safetensors")
    save_file({k.removeprefix("timm_model."): v for k, v in weights.items()}, fresh_run / "model.safetensors",
              metadata={"format": "pt"})
    saved = json.loads((fresh_run / "config.json").read_text())
    saved.pop("model_args", None)
    (fresh_run / "config.json").write_text(json.dumps(saved))
    assert RunFiles(fresh_run).timm_loadable
    timm_model = timm.create_model(f"local-dir:{fresh_run}", pretrained=True)
    assert timm_model.num_classes == 2
    text = str(write_model_card(fresh_run, repo_id="user/effnet"))
    assert _front_matter(text)["library_name"] == "timm"
    assert 'timm.create_model("hf-hub:user/effnet", pretrained=True)' in text


def test_card_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="all_results.json"):
        write_model_card(tmp_path)


def test_plots_are_titled_pngs(run_dir, tmp_path):
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    curves = plot_training_curves(history, tmp_path / "curves.png")
    assert Image.open(curves).size[0] >= 1000  # two readable panels side by side
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    matrix = [[10 if i == j else (2 if j == (i + 1) % 10 else 0) for j in range(10)] for i in range(10)]
    confusion = plot_confusion_matrix(matrix, labels, tmp_path / "nested" / "cm.png")
    assert Image.open(confusion).format == "PNG"
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix(matrix, labels[:3], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves([{"train_runtime": 1.0}], tmp_path / "empty.png")


def test_absolute_local_folders_stay_off_the_card(fresh_run):
    run_config = json.loads((fresh_run / "run_config.json").read_text())
    run_config["data"]["dataset"] = "/home/ana/private/pets"
    run_config["training"]["output_dir"] = "/home/ana/runs/pets"
    (fresh_run / "run_config.json").write_text(json.dumps(run_config))
    card = write_model_card(fresh_run).content
    assert "/home/ana" not in card and ".../pets" in card


def test_the_templates_use_only_the_values_the_card_gives_them(fresh_run):
    """Jinja renders a misspelt or missing value as nothing; in the tests (conftest.py's `_strict_card_templates`) it is an
    error instead: for a run with all its files (the data doctor's section included) and for one that recorded only its
    scores."""
    run = RunFiles(fresh_run)
    (fresh_run / "data_report.json").write_text(json.dumps({  # as the data doctor writes it (tests/test_doctor.py checks its own)
        "images": run.results["split_sizes"], "settings": {"duplicate_threshold": 0.9}, "copies": {"features_meaningful": True},
        "summary": {"probe_accuracy": 0.5, "label_issues": 1, "label_issues_by_split": {"train": 1}, "near_duplicate_pairs": 0,
                    "leak_pairs": 0, "leaks_by_splits": {}, "classes_below_minimum": []}}))
    sparse = fresh_run.parent / "sparse"
    sparse.mkdir()
    (sparse / "config.json").write_bytes((fresh_run / "config.json").read_bytes())
    (sparse / "all_results.json").write_text(json.dumps({key: run.results[key] for key in ("test_accuracy", "test_f1")}))
    for folder, sections in ((fresh_run, ("## Data quality", "## Freeze plan\n\n|", "- Optimizer: `")),
                             (sparse, ("The run recorded no freeze plan", "This run recorded no optimizer", "no run_config.json"))):
        body = str(write_model_card(folder)).split("\n---\n", 1)[1]
        for leftover in ("{{", "}}", "{%", "%}", "{#", "#}"):
            assert leftover not in body, (folder.name, leftover)
        for section in sections:
            assert section in body, (folder.name, section)


def test_a_wheel_ships_the_card_templates(tmp_path):
    """`pip install` carries only the package data pyproject.toml names: card.py, imported from an unpacked wheel of the
    checkout, reads every template through importlib.resources."""
    from hf_transfer import card

    repo, source = Path(card.__file__).parents[1], tmp_path / "source"
    shutil.copytree(repo / "hf_transfer", source / "hf_transfer", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
                            "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "installed")
    code = ("import json, hf_transfer.card as card; print(json.dumps([card.__file__, "
            "{path.name: path.read_text(encoding='utf-8') for path in card.TEMPLATES.iterdir()}]))")
    read = subprocess.run([sys.executable, "-c", code],
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}, cwd=tmp_path, capture_output=True, text=True)
    assert read.returncode == 0, read.stderr[-3000:]
    where, templates = json.loads(read.stdout)
    assert Path(where).is_relative_to(tmp_path / "installed")
    assert templates == {path.name: path.read_text(encoding="utf-8") for path in (repo / "hf_transfer" / "templates").iterdir()}
    assert {card.CARD_TEMPLATE.name, card.DATA_QUALITY_TEMPLATE.name} <= set(templates)


def test_the_deployment_section_names_no_local_folder(fresh_run):
    """`hf-transfer export`'s snippets load the model as the pipeline snippet does: by the folder relative to the working
    directory (or by name), never by its absolute path; with a repo id, from the Hub."""
    from hf_transfer.cli import main

    main(["export", str(fresh_run.resolve()), "--check_images", "8"])
    body = write_model_card(fresh_run).content
    section = body.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    folder = shareable_path(str(fresh_run.resolve()))
    assert f'AutoImageProcessor.from_pretrained("{folder}")' in section and f'"{folder}/onnx/model.onnx"' in section
    assert f"hf-transfer predict {folder} photos/ --backend onnx" in section
    assert str(fresh_run.resolve()) not in body
    section = write_model_card(fresh_run, repo_id="user/tiny-vit").content.split("## Deployment", 1)[1]
    assert 'ort.InferenceSession(hf_hub_download("user/tiny-vit", "onnx/model.onnx"))' in section
