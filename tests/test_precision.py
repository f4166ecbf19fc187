"""Inference precision: what `auto` decides on this machine, and that passes without gradients run in it, on real
photos and Lite0's real ImageNet weights, while training and gradient passes stay untouched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_RUN, TINY_SAMPLE, run_command, sample_rows, user_error

from hf_transfer.blocks import find_head
from hf_transfer.errors import HFTransferError
from hf_transfer.feature_files import relative_errors
from hf_transfer.feature_store import FeatureCapture
from hf_transfer.images import load_image
from hf_transfer.models import load_model
from hf_transfer.options import ModelArguments
from hf_transfer.precision import FrozenPasses, PrecisionError, native_bf16, prepare_for_inference, resolve
from hf_transfer.repo_files import MODEL_CARD

LITE0 = "timm/tf_efficientnet_lite0.in1k"


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def lite0(monkeypatch_module):
    model, processor = load_model(ModelArguments(model=LITE0), ["cat", "dog"])
    return model.eval(), processor


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield patch


@pytest.fixture(scope="module")
def photos(lite0) -> torch.Tensor:
    """24 real test photos, preprocessed as the model expects."""
    model, _ = lite0
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model.timm_model))
    return torch.stack([transform(load_image(row["image"])) for row in sample_rows("test")[:24]])


# --- the decision -----------------------------------------------------------------------------------------------

def test_native_bf16_on_the_cpu_follows_its_instruction_set():
    supported, reason = native_bf16("cpu")
    assert supported == bool({"avx512_bf16", "amx_bf16"} & cpu_flags()), reason


def test_auto_decides_from_the_hardware_and_the_options_are_obeyed(lite0):
    model, _ = lite0
    native, _ = native_bf16("cpu")
    auto = resolve("auto", "cpu", model)
    assert auto.dtype == ("bf16" if native else "fp32") and auto.reason.startswith("auto: CPU")
    assert auto.channels_last, "Lite0 is a CNN"
    assert resolve("fp32", "cpu", model).dtype == "fp32" and resolve("bf16", "cpu", model).dtype == "bf16"
    if not native:
        assert resolve("auto", "cpu", model, fp16=True).dtype == "fp16", "no bf16: the run's own fp16"
    vit = timm.create_model("test_vit")
    assert not resolve("auto", "cpu", vit).channels_last, "a ViT's only convolution is its patch embedding"
    assert json.loads(json.dumps(auto.as_dict()))["dtype"] == auto.dtype


def test_an_unknown_precision_is_a_user_error(lite0, capsys):
    with pytest.raises(PrecisionError) as raised:
        resolve("fp8", "cpu", lite0[0])
    assert isinstance(raised.value, HFTransferError)
    message = user_error(capsys, *TINY_RUN, *TINY_SAMPLE, "--inference_precision", "fp8", "--output_dir", "/tmp/never-written")
    assert "inference_precision" in message and "fp8" in message


# --- the passes -------------------------------------------------------------------------------------------------

def test_frozen_passes_run_in_bf16_with_the_head_in_float32_and_training_untouched(lite0, photos):
    model, _ = lite0
    reference = copy.deepcopy(model)  # no hooks: fp32, contiguous
    hooked = copy.deepcopy(model)
    head = find_head(hooked)[1]
    precision = resolve("bf16", "cpu", hooked)
    FrozenPasses(hooked, precision, head=head)
    assert hooked.timm_model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        with FeatureCapture(head) as capture:
            got = hooked(pixel_values=photos).logits
    features = capture.features()
    assert got.dtype == torch.float32
    # bf16 rounding moves the backbone's features by up to a few percent, never to another image's.
    with torch.inference_mode():
        exact_features = reference.timm_model.forward_head(reference.timm_model.forward_features(photos), pre_logits=True)
    errors = relative_errors(features.numpy(), exact_features.numpy())
    assert 0 < errors.max() < 0.1, "bf16 ran (features differ from fp32) and stayed close"
    # The head ran in float32 on those features: its logits are exactly the cached-features head's.
    assert torch.equal(got, head(features))
    # Lite0's ImageNet classes for real photos: bf16 does not change the top classes of clear images.
    imagenet = copy.deepcopy(model.timm_model)
    FrozenPasses(imagenet, precision)
    with torch.inference_mode():
        assert (imagenet(photos).argmax(-1) == model.timm_model(photos).argmax(-1)).float().mean() >= 0.9

    # Training mode, or gradients on (Grad-CAM), run exactly as without the hooks.
    hooked.train(), reference.train()
    train_hooked = hooked(pixel_values=photos[:4]).logits
    train_reference = reference(pixel_values=photos[:4]).logits
    assert train_hooked.dtype == torch.float32 and torch.allclose(train_hooked, train_reference, rtol=1e-4, atol=1e-5)
    hooked.eval(), reference.eval()
    assert torch.allclose(hooked(pixel_values=photos[:4]).logits, reference(pixel_values=photos[:4]).logits, rtol=1e-4, atol=1e-5)


def test_prepare_for_inference_runs_a_pipeline_in_bf16_with_the_same_answers(lite0):
    from transformers import pipeline

    model, processor = lite0
    images = [load_image(row["image"]) for row in sample_rows("test")[:12]]
    plain = pipeline("image-classification", model=copy.deepcopy(model), image_processor=processor, device="cpu")
    fast = pipeline("image-classification", model=copy.deepcopy(model), image_processor=processor, device="cpu")
    precision = prepare_for_inference(fast.model, "bf16")
    assert precision.dtype == "bf16" and precision.channels_last
    computed_in = []
    fast.model.timm_model.conv_stem.register_forward_hook(lambda _module, _inputs, output: computed_in.append(output.dtype))
    # The new 2-class head is random: scores are close to ties, so compare the scores, not only the labels.
    for expected, got in zip(plain(images, top_k=2), fast(images, top_k=2)):
        assert {answer["label"]: pytest.approx(answer["score"], abs=0.02) for answer in expected} == \
            {answer["label"]: answer["score"] for answer in got}
    assert set(computed_in) == {torch.bfloat16}


# --- a run ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["auto", "fp32"])
def test_a_run_records_what_inference_precision_decided(tmp_path, option):
    out = tmp_path / option
    done = run_command(*TINY_RUN, *TINY_SAMPLE, "--inference_precision", option, "--output_dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    decided = json.loads((out / "all_results.json").read_text())["inference_precision"]
    expected = resolve(option, "cpu", timm.create_model("test_efficientnet"))
    assert decided == expected.as_dict() and decided["channels_last"], "a CNN trains in channels_last too"
    assert f"Inference precision: {expected.describe()}" in done.stderr
    assert f"Passes without gradients (feature extraction, evaluation, test): {expected.describe()}" in (out / MODEL_CARD).read_text()
