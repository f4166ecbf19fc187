"""Nothing unsafe is written, loaded or leaked: only safetensors (and JSON) are written, pickles are opened
with weights_only=True or refused, a model repo's code never runs unless allowed, tokens never show up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import TINY_RUN, TINY_SAMPLE, train_in_process
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_transfer.models import ModelNotAvailableError, load_model
from hf_transfer.options import ModelArguments
from hf_transfer.trainer import CheckpointError, SafeTrainer

pytestmark = pytest.mark.usefixtures("offline_hub")

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
ENV_TOKEN = "hf_sentinelFromTheEnvironment0123456789"
ARG_TOKEN = "hf_sentinelFromTheCommandLine0123456789"


def test_tokens_never_reach_logs_cards_or_saved_files_and_only_safetensors_are_written(tmp_path, monkeypatch, capfd, caplog):
    """The default recipe path (frozen backbone, head trained on cached features), with checkpoints."""
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    output_dir = tmp_path / "out"
    train_in_process(*TINY_SAMPLE, *TINY_RUN, "--freeze", "head_only", "--save_strategy", "steps", "--save_steps", "1",
          "--hub_token", ARG_TOKEN, "--output_dir", str(output_dir))

    printed = capfd.readouterr()
    for text in (printed.out, printed.err, caplog.text):
        assert ENV_TOKEN not in text and ARG_TOKEN not in text
    files = [path for path in output_dir.rglob("*") if path.is_file()]
    assert {"README.md", "run_config.json", "trainer_state.json", "model.safetensors"} <= {path.name for path in files}
    for path in files:
        content = path.read_bytes()
        assert ENV_TOKEN.encode() not in content and ARG_TOKEN.encode() not in content, path
        assert path.suffix not in PICKLE_SUFFIXES, path
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    assert checkpoints and all(path.suffix in {".safetensors", ".json"} for folder in checkpoints for path in folder.iterdir())
    saved_args = json.loads((checkpoints[0] / "training_args.json").read_text())
    assert saved_args["hub_token"] == "<HUB_TOKEN>"  # the field was there, and masked
    assert "hub_token" not in (output_dir / "run_config.json").read_text()


def _malicious_pickle(folder: Path, sentinel: Path) -> None:
    """A ViT folder whose pytorch_model.bin would create `sentinel` if unpickled without weights_only."""

    class CreatesAFile:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=16, num_labels=2)
    ViTForImageClassification(config).config.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.save({"vit.embeddings.cls_token": torch.zeros(1, 1, 32), "payload": CreatesAFile()}, folder / "pytorch_model.bin")


def test_pickled_weights_that_would_run_code_are_refused(tmp_path):
    sentinel = tmp_path / "code_ran"
    _malicious_pickle(tmp_path / "model", sentinel)
    with pytest.raises(ModelNotAvailableError) as refused:
        load_model(ModelArguments(model=str(tmp_path / "model")), ["cat", "dog"])
    assert not sentinel.exists()
    assert "Refusing to load" in str(refused.value) and "it would call `io.open`" in str(refused.value)
    assert "Use a copy saved as safetensors" in str(refused.value)


def test_plain_pickled_weights_still_load_with_weights_only(tmp_path):
    folder = tmp_path / "model"
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=16, num_labels=2)
    original = ViTForImageClassification(config)
    original.config.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.save(original.state_dict(), folder / "pytorch_model.bin")  # tensors only: weights_only=True accepts it
    model, _ = load_model(ModelArguments(model=str(folder)), ["cat", "dog"])
    assert all(torch.equal(tensor, original.state_dict()[name]) for name, tensor in model.state_dict().items())


REMOTE_CODE = '''
from pathlib import Path
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

Path({sentinel!r}).write_text("the repo's code ran")


class ProbeConfig(PretrainedConfig):
    model_type = "remote_code_probe"


class ProbeModel(PreTrainedModel):
    config_class = ProbeConfig

    def __init__(self, config):
        super().__init__(config)
        self.classifier = torch.nn.Linear(3, config.num_labels)
        self.post_init()

    def forward(self, pixel_values=None, labels=None):
        return ImageClassifierOutput(logits=self.classifier(pixel_values.mean(dim=(2, 3))))
'''


def test_model_repo_code_runs_only_with_trust_remote_code(tmp_path):
    assert ModelArguments().trust_remote_code is False
    folder, sentinel = tmp_path / "remote", tmp_path / "code_ran"
    folder.mkdir()
    (folder / "probe_model.py").write_text(REMOTE_CODE.format(sentinel=str(sentinel)))
    config = {"model_type": "remote_code_probe", "architectures": ["ProbeModel"], "num_labels": 2,
              "auto_map": {"AutoConfig": "probe_model.ProbeConfig", "AutoModelForImageClassification": "probe_model.ProbeModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file({"classifier.weight": torch.zeros(2, 3), "classifier.bias": torch.zeros(2)}, folder / "model.safetensors")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)

    with pytest.raises(ModelNotAvailableError) as refused:
        load_model(ModelArguments(model=str(folder)), ["cat", "dog"])
    assert not sentinel.exists()
    assert "needs Python code from its repo" in str(refused.value) and "`trust_remote_code: true`" in str(refused.value)

    model, _ = load_model(ModelArguments(model=str(folder), trust_remote_code=True), ["cat", "dog"])
    assert sentinel.exists() and type(model).__name__ == "ProbeModel"  # passed through when the user says so


def test_pickled_trainer_checkpoint_is_refused_on_resume(tmp_path):
    """A checkpoint written by a plain Trainer (optimizer.pt & co) is never unpickled."""
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=16, num_labels=2)
    trainer = SafeTrainer(model=ViTForImageClassification(config),
                          args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    with pytest.raises(CheckpointError, match="it holds a pickled optimizer.pt: written by another Trainer, and hf-transfer "
                                              "never loads pickles"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
