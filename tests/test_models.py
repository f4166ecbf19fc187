"""Model stage: offline weights, head replacement and label maps, local folders, clear errors."""

from __future__ import annotations

import io

import pytest
import timm
import torch
from conftest import sample_rows
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_transfer.models import ModelNotAvailableError, data_config, load_model
from hf_transfer.offline import OFFLINE_WEIGHTS, load_offline_state_dict
from hf_transfer.options import ModelArguments

IMAGENET_CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr("hf_transfer.models.hub_reachable", lambda: False)


def test_packaged_weights_are_real_imagenet_weights():
    # The renamed state dict, classifier included, must classify a real cat photo as a cat.
    backbone = timm.create_model("tf_efficientnet_lite0").eval()
    state = load_offline_state_dict("timm/tf_efficientnet_lite0.in1k", [len(stage) for stage in backbone.blocks])
    backbone.load_state_dict(state, strict=False)
    config = timm.data.resolve_data_config({}, model=backbone)
    transform = timm.data.create_transform(**config)
    cats = [row for row in sample_rows("test") if row["labels"] == 0][:4]
    for row in cats:
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        with torch.no_grad():
            top5 = backbone(transform(image).unsqueeze(0)).topk(5).indices[0].tolist()
        assert IMAGENET_CAT_CLASSES & set(top5), f"{row['image']['path']}: top-5 {top5} holds no cat class"


@pytest.mark.parametrize("model_id", ["timm/tf_efficientnet_lite0.in1k", "tf_efficientnet_lite0", "tf_efficientnet_lite1.in1k"])
def test_offline_ids_get_packaged_weights_and_a_fresh_head(offline, model_id):
    labels = ["cat", "dog", "horse"]
    model, processor = load_model(ModelArguments(model=model_id), labels)
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "horse"} and model.config.label2id["horse"] == 2
    assert model.timm_model.get_classifier().out_features == 3
    hub_id = next(key for key in OFFLINE_WEIGHTS if model_id.split(".")[0] in key)
    packaged = load_offline_state_dict(hub_id, [len(stage) for stage in model.timm_model.blocks])
    backbone = model.timm_model.state_dict()
    assert torch.equal(backbone["conv_stem.weight"], packaged["conv_stem.weight"])
    assert torch.equal(backbone["blocks.5.0.conv_pw.weight"], packaged["blocks.5.0.conv_pw.weight"])
    expected_size = {"lite0": 224, "lite1": 240}[hub_id.split("_")[-1].split(".")[0]]
    assert data_config(model, processor)["input_size"] == (3, expected_size, expected_size)


def test_unknown_model_offline_lists_what_is_available(offline):
    with pytest.raises(ModelNotAvailableError) as error:
        load_model(ModelArguments(model="timm/resnet50.a1_in1k"), ["cat", "dog"])
    message = str(error.value)
    assert "timm/resnet50.a1_in1k" in message and "timm/tf_efficientnet_lite0.in1k" in message and "local model folder" in message


def test_local_transformers_folder_gets_a_new_head(tmp_path):
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5)
    original = ViTForImageClassification(config)
    original.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model, processor = load_model(ModelArguments(model=str(tmp_path)), ["cat", "dog"])
    assert model.classifier.out_features == 2 and model.config.id2label == {0: "cat", 1: "dog"}
    assert torch.equal(model.vit.embeddings.patch_embeddings.projection.weight, original.vit.embeddings.patch_embeddings.projection.weight)
    assert data_config(model, processor)["input_size"] == (3, 32, 32)


def test_random_init_for_any_timm_architecture():
    model, processor = load_model(ModelArguments(model="test_vit", pretrained=False), ["a", "b"])
    assert model.timm_model.get_classifier().out_features == 2
    assert data_config(model, processor)["input_size"][0] == 3
