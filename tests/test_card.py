"""Model card and plots, built from a real (tiny) training run on cats_vs_dogs images.

`build_run_dir` trains a small ViT for two epochs with transformers.Trainer and writes the output-dir
files of the contract; test_hub.py pushes the same run.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hf_transfer.card import RunFiles, write_model_card
from hf_transfer.data import DataArguments
from hf_transfer.images import UnreadableImageError, load_image
from hf_transfer import metrics  # not `import test_report`: pytest would collect it as a test
from hf_transfer.models import ModelArguments
from hf_transfer.plots import plot_confusion_matrix, plot_training_curves

CATS_VS_DOGS = Path("/work/shared/datasets/cats_vs_dogs")
LABELS = ["cat", "dog"]
PLACEHOLDERS = ("[More Information Needed]", "{{", "}}", "TODO", "TBD", "None", "nan")


def _rows(split: str, count: int) -> list[dict]:
    table = pq.read_table(CATS_VS_DOGS / "data" / f"{split}-00000-of-00001.parquet").slice(0, count)
    return table.to_pylist()


class _Images(torch.utils.data.Dataset):
    def __init__(self, items, processor):
        self.items, self.processor = items, processor

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image, label = self.items[index]
        return {"pixel_values": self.processor(image, return_tensors="pt")["pixel_values"][0], "labels": label}


def build_run_dir(out: Path, hidden_size: int = 256) -> Path:
    """Train a ViT (hidden 256: a >5 MB model.safetensors, so pushes take the LFS path) and write the run files."""
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    rows = _rows("train", 48)
    rows[5]["image"]["bytes"] = rows[5]["image"]["bytes"][:300]  # a truncated JPEG, as real datasets have
    decoded, skipped = [], []
    for row in rows:
        try:
            decoded.append((load_image(row["image"]), row["labels"]))
        except UnreadableImageError:
            skipped.append(row["image"]["path"])
    train, validation = decoded[:32], decoded[32:]
    test = [(load_image(row["image"]), row["labels"]) for row in _rows("test", 16)]

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=hidden_size, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=4 * hidden_size, num_labels=2,
                       id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for parameter in model.vit.embeddings.parameters():  # a real (small) freeze plan: patch embeddings stay fixed
        parameter.requires_grad = False
    args = TrainingArguments(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=8,
                             learning_rate=1e-3, eval_strategy="epoch", logging_strategy="epoch",
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Images(train, processor),
                      eval_dataset=_Images(validation, processor), compute_metrics=metrics.compute_metrics)
    train_output = trainer.train()
    trainer.save_state()
    model.save_pretrained(out)
    processor.save_pretrained(out)

    evaluation = trainer.evaluate()
    prediction = trainer.predict(_Images(test, processor), metric_key_prefix="test")
    report = metrics.test_report(prediction.predictions.argmax(-1), prediction.label_ids, LABELS)
    results = {
        **{k: v for k, v in prediction.metrics.items() if k in ("test_accuracy", "test_f1", "test_loss")},
        **{k: v for k, v in evaluation.items() if k in ("eval_accuracy", "eval_f1")},
        "train_runtime": train_output.metrics["train_runtime"], "train_loss": train_output.training_loss,
        "split_sizes": {"train": len(train), "validation": len(validation), "test": len(test)},
        "skipped_images": {"train": len(skipped), "validation": 0, "test": 0},
        "skipped_image_examples": {"train": skipped, "validation": [], "test": []},
    }
    blocks = [("vit.embeddings", model.vit.embeddings, False)] + [
        (f"vit.layers.{i}", layer, True) for i, layer in enumerate(model.vit.layers)
    ] + [("vit.layernorm", model.vit.layernorm, True), ("classifier", model.classifier, True)]
    freeze_plan = {
        "strategy": "partial", "batchnorm": "frozen", "layer_decay": None,
        "stages": [{"epoch": 0, "trainable": [name for name, _, trainable in blocks if trainable]}],
        "blocks": [{"name": name, "params": sum(p.numel() for p in module.parameters()), "trainable": trainable,
                    "lr": args.learning_rate if trainable else 0.0, "batchnorm": "n/a"}
                   for name, module, trainable in blocks],
    }
    run_config = {
        "data": asdict(DataArguments(dataset=str(CATS_VS_DOGS), max_train_samples=48)),
        "model": asdict(ModelArguments(model="tiny-vit (random init)", pretrained=False)),
        "training": {"learning_rate": args.learning_rate, "num_train_epochs": args.num_train_epochs,
                     "per_device_train_batch_size": args.per_device_train_batch_size, "seed": args.seed},
    }
    for name, content in [("all_results.json", results), ("test_report.json", report),
                          ("freeze_plan.json", freeze_plan), ("run_config.json", run_config)]:
        (out / name).write_text(json.dumps(content, indent=2))
    return out


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One training run per session, shared by the card and hub tests (a fresh copy per module)."""
    built = tmp_path_factory.getbasetemp() / "tiny-vit-run"
    if not (built / "all_results.json").is_file():
        build_run_dir(built)
    return built


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
    assert {r.dataset_type for r in eval_results} == {"cats_vs_dogs"}
    assert {r.dataset_split for r in eval_results} == {"test"}

    # The same card read back through huggingface_hub's own parser.
    card = ModelCard.load(fresh_run / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "transformers"
    assert {"transfer-learning", "freeze-partial", "image-classification"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.datasets is None  # random init, local data folder


def test_card_body_is_filled_from_the_run(fresh_run):
    card = write_model_card(fresh_run)
    text = (fresh_run / "README.md").read_text()
    assert text == str(card) + ("" if text.endswith("\n") and str(card).endswith("\n") else "\n")
    body = text.split("\n---\n", 1)[1]
    for placeholder in PLACEHOLDERS:
        assert placeholder not in body, placeholder
    results = json.loads((fresh_run / "all_results.json").read_text())
    report = json.loads((fresh_run / "test_report.json").read_text())
    state = json.loads((fresh_run / "trainer_state.json").read_text())

    assert f'pipeline("image-classification", model="{fresh_run.resolve()}")' in body
    assert "`cat`, `dog`" in body
    sizes = results["split_sizes"]
    assert f"| train | {sizes['train']} | 1 |" in body and f"| test | {sizes['test']} | 0 |" in body
    assert results["skipped_image_examples"]["train"]
    for name in results["skipped_image_examples"]["train"]:  # the truncated image is named
        assert name in body
    for label, metrics in report["per_class"].items():
        assert f"| {label} | {metrics['precision']:.4g} | {metrics['recall']:.4g} | {metrics['f1']:.4g} |" in body
    epochs = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert len(epochs) == 2
    for entry in epochs:
        assert f"| {entry['eval_loss']:.4g} | {entry['eval_accuracy']:.4g} |" in body
    for block in json.loads((fresh_run / "freeze_plan.json").read_text())["blocks"]:
        assert f"| {block['name']} | {block['params']:,} |" in body
    assert f"{results['test_accuracy']:.2%}" in body
    assert "32 x 32" in body  # resolution, from preprocessor_config.json
    n_test = sizes["test"]
    margin = 1.96 * math.sqrt(max(results["test_accuracy"] * (1 - results["test_accuracy"]), 1e-12) / n_test)
    assert f"±{100 * margin:.1f} percentage points" in body and "small test set" in body
    for figure in ("confusion_matrix.png", "training_curves.png"):
        assert f"]({figure})" in body
        assert Image.open(fresh_run / figure).format == "PNG"  # drawn by the card when the run had none


def test_card_uses_the_repo_id_when_pushed(fresh_run):
    write_model_card(fresh_run, repo_id="user/tiny-vit-cats")
    text = (fresh_run / "README.md").read_text()
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
