"""Class-activation maps (hf_transfer/explain.py): real photos through the real quickstart model, CNN and ViT
backbones of timm and transformers, and the model card's figure."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    SwinConfig,
    SwinForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from hf_transfer.card import EXPLANATIONS_PNG, write_model_card
from hf_transfer.explain import Explainer, choose_examples, overlay, patch_grid, save_explanation_figure, tokens_to_grid

CAT = Path(__file__).parent / "fixtures" / "cat.jpg"
LABELS = {"num_labels": 2, "id2label": {0: "cat", 1: "dog"}, "label2id": {"cat": 0, "dog": 1}}


@pytest.fixture(scope="module")
def classifier(quickstart_model_dir):
    return pipeline("image-classification", model=str(quickstart_model_dir), device="cpu")


@pytest.fixture(scope="module")
def explainer(classifier) -> Explainer:
    return Explainer.from_pipeline(classifier)


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.open(CAT).convert("RGB")


def test_map_of_a_real_cat_photo_has_its_size_is_finite_and_not_uniform(explainer, classifier, cat):
    explanation = explainer.explain(cat)
    assert explanation.heatmap.shape == (cat.height, cat.width) and explanation.heatmap.dtype == np.float32
    assert np.isfinite(explanation.heatmap).all()
    assert explanation.heatmap.min() >= 0 and explanation.heatmap.max() <= 1
    assert explanation.heatmap.std() > 0.1  # a uniform map (or one left all zero) has none
    assert explanation.layer == "timm_model.bn2"  # EfficientNet's feature map, the one global pooling reads
    # The map explains the pipeline's own prediction: same model, same preprocessing, same scores.
    predicted = {p["label"]: p["score"] for p in classifier(cat)}
    assert explanation.label == max(predicted, key=predicted.get) == "cat"
    assert explanation.probabilities == pytest.approx(predicted, abs=1e-5)
    # Asked for another size (the demo draws on a smaller copy), the same map comes at that size.
    small = explainer.explain(cat, size=(160, 128)).heatmap
    assert small.shape == (128, 160)
    assert np.corrcoef(small.ravel(), np.asarray(Image.fromarray(explanation.heatmap).resize((160, 128))).ravel())[0, 1] > 0.95


@pytest.mark.parametrize("quadrant", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_the_map_lies_on_the_cat(explainer, cat, quadrant):
    """The cat photo shrunk into one quarter of a grey canvas: the map's weight is in that quarter, wherever it is."""
    width, height = 600, 480
    canvas = Image.new("RGB", (width, height), (128, 128, 128))
    canvas.paste(cat.resize((width // 2, height // 2)), (quadrant[0] * width // 2, quadrant[1] * height // 2))
    explanation = explainer.explain(canvas)
    assert explanation.label == "cat"
    heatmap = explanation.heatmap
    means = {(x, y): heatmap[y * height // 2:(y + 1) * height // 2, x * width // 2:(x + 1) * width // 2].mean()
             for x in (0, 1) for y in (0, 1)}
    others = [mean for where, mean in means.items() if where != quadrant]
    assert means[quadrant] > 3 * max(others), means


def test_the_map_is_zero_where_the_center_crop_cut_the_image_away(explainer, cat):
    """timm's eval transform resizes the short side to input / crop_pct and crops the centre: only that window of
    the image reaches the model, and the map says so."""
    image = cat.resize((600, 300))  # wide: the crop drops both sides
    config = timm.data.resolve_data_config(explainer.model.config.pretrained_cfg)
    side = config["input_size"][1]
    resized_width = int(side / config["crop_pct"]) * 600 / 300
    left = (resized_width - side) / 2 / resized_width  # fraction of the width cut on each side
    measured = explainer.input_window(image.size)
    assert measured == pytest.approx((left, (1 - config["crop_pct"]) / 2, 1 - 2 * left, config["crop_pct"]), abs=2 / 300)

    heatmap = explainer.explain(image).heatmap
    cut = round(left * 600)
    assert not heatmap[:, :cut - 2].any() and not heatmap[:, 600 - cut + 2:].any()
    assert heatmap[:, cut + 2:600 - cut - 2].max() > 0.9


def test_maps_leave_the_model_as_they_found_it(explainer, cat):
    model = explainer.model
    flags = [parameter.requires_grad for parameter in model.parameters()]
    model.train()
    try:
        explainer.explain(cat)
        assert model.training
    finally:
        model.eval()
    assert [parameter.requires_grad for parameter in model.parameters()] == flags
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not any(module._forward_hooks for module in model.modules())  # grad-cam's hooks are gone


def test_overlay_is_the_image_with_the_map_drawn_over_it(explainer, cat):
    drawn = overlay(cat, explainer.explain(cat).heatmap)
    assert drawn.size == cat.size and drawn.mode == "RGB"
    assert np.abs(np.asarray(drawn, np.int16) - np.asarray(cat, np.int16)).mean() > 20
    with pytest.raises(ValueError, match="does not match"):
        overlay(cat, np.zeros((10, 10), np.float32))


def _timm(name: str):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    cfg.pop("num_classes", None)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=name, pretrained_cfg=cfg, **LABELS))
    return model, TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg)


VIT_SIZE = {"height": 64, "width": 64}
# Small random-init models of each family: what is checked is the layer, the layout and the map's geometry.
BACKBONES = {
    "timm ViT": (lambda: _timm("test_vit"), "timm_model.blocks.5.norm1", "tokens"),
    "timm MambaOut (channels last)": (lambda: _timm("test_mambaout"), "timm_model.stages", "NHWC"),
    "timm ResNet": (lambda: _timm("test_resnet"), "timm_model.layer4", "NCHW"),
    "transformers ViT": (lambda: (ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16,
        **LABELS)), ViTImageProcessor(size=VIT_SIZE)), "vit.layers.1.layernorm_before", "tokens"),
    "transformers Swin": (lambda: (SwinForImageClassification(SwinConfig(
        image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, **LABELS)),
        ViTImageProcessor(size=VIT_SIZE)), "swin.encoder.layers.1.blocks.0.layernorm_before", "tokens"),
    "transformers ConvNeXt": (lambda: (ConvNextForImageClassification(ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], **LABELS)),
        ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)), "convnext.encoder.stages.3", "NCHW"),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_cnn_and_vit_backbones_of_timm_and_transformers(name, cat):
    build, layer, layout = BACKBONES[name]
    torch.manual_seed(0)
    model, processor = build()
    model.eval().requires_grad_(False)  # a frozen backbone, as after head-only training, still gets its map
    classifier = pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    explainer = Explainer.from_pipeline(classifier)
    explanation = explainer.explain(cat)
    assert (explanation.layer, explainer.target_layer(explainer.pixel_values(cat)).layout) == (layer, layout)
    assert explanation.heatmap.shape == (cat.height, cat.width)
    assert np.isfinite(explanation.heatmap).all() and explanation.heatmap.std() > 0.05
    predicted = {p["label"]: p["score"] for p in classifier(cat)}
    assert explanation.probabilities == pytest.approx(predicted, abs=1e-5)
    # The photo is wider than tall: its height keeps crop_pct (timm's, ConvNeXt's), or all of it where the processor
    # squashes the whole image into the input (ViT's).
    crop = getattr(processor, "data_config", {}).get("crop_pct") or getattr(processor, "crop_pct", None) or 1.0
    top, height = explainer.input_window(cat.size)[1::2]
    assert (top, height) == pytest.approx(((1 - crop) / 2, crop), abs=0.01)


def test_tokens_become_a_patch_grid_after_the_prefix_tokens():
    assert patch_grid(197, (224, 224)) == (14, 14, 1)  # ViT-B/16: class token, 14 x 14 patches
    assert patch_grid(1 + 4 + 256, (224, 224)) == (16, 16, 5)  # DINOv2-S/14 with 4 registers
    assert patch_grid(49, (224, 224)) == (7, 7, 0)  # Swin's last stage: no class token
    assert patch_grid(1 + 10 * 15, (160, 240)) == (10, 15, 1)  # a wide input
    tokens = torch.arange(1 + 10 * 15, dtype=torch.float32).reshape(1, -1, 1).repeat(1, 1, 3)
    grid = tokens_to_grid(tokens, (160, 240))
    assert grid.shape == (1, 3, 10, 15)
    # Row-major, as patch embeddings are flattened: the patch at row 2, column 4 is token 1 + 2 * 15 + 4.
    assert grid[0, 0, 2, 4] == 1 + 2 * 15 + 4 and torch.equal(grid[0, 0], grid[0, 2])


def test_examples_alternate_classes_within_correct_and_misclassified():
    labels = [0, 0, 0, 0, 1, 1, 1, 0, 1]
    predicted = [0, 0, 1, 0, 1, 0, 1, 0, 1]
    correct, wrong = choose_examples(labels, predicted, per_group=4)
    assert correct == [0, 4, 1, 6] and wrong == [2, 5]


def test_card_figure_shows_correct_and_misclassified_maps(quickstart_model_dir, test_photos, classifier, cat, tmp_path):
    # The held-out photos as the model predicts them, and the cat photo labelled `dog` as a labelling error would be.
    images = [image.convert("RGB") for image, _ in test_photos] + [cat]
    names = classifier.model.config.label2id
    labels = [names[name] for _, name in test_photos] + [names["dog"]]
    predictions = [names[p[0]["label"]] for p in classifier(images, top_k=1)]
    correct, wrong = choose_examples(labels, predictions)
    assert len(images) - 1 in wrong and len(correct) == 6

    run = tmp_path / "run"
    shutil.copytree(quickstart_model_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    start = time.perf_counter()
    path = save_explanation_figure(run, images, labels, predictions, run / EXPLANATIONS_PNG)
    print(f"figure of {len(correct) + len(wrong)} maps: {time.perf_counter() - start:.1f} s")
    figure = Image.open(path)
    assert figure.format == "PNG"
    pixels = np.asarray(figure.convert("RGB"), np.int16)
    drawn = (np.abs(pixels - 255).sum(axis=2) > 60).mean(axis=0)  # share of non-white pixels in each column
    half = pixels.shape[1] // 2
    assert drawn[:half].mean() > 0.15 and drawn[half:].mean() > 0.03  # maps on both sides

    card = write_model_card(run).content
    assert f"]({EXPLANATIONS_PNG})" in card and "misclassified ones on the right" in card
    (run / EXPLANATIONS_PNG).unlink()
    assert EXPLANATIONS_PNG not in write_model_card(run).content  # no figure, no broken link
