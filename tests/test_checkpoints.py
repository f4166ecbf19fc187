"""Weights come back exactly from a checkpoint, for architectures whose saved key names differ from the module's."""

from __future__ import annotations

import torch
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from hf_transfer.trainer import SafeTrainer


def _tiny_vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2)
    return ViTForImageClassification(config)


def test_best_model_and_resume_reload_every_tensor(tmp_path):
    best = _tiny_vit(seed=1)
    best.save_pretrained(tmp_path / "checkpoint-4")
    for reload in ("best", "resume"):
        last = _tiny_vit(seed=2)
        trainer = SafeTrainer(model=last, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True))
        if reload == "best":
            trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-4")
            trainer._load_best_model()
        else:
            trainer._load_from_checkpoint(str(tmp_path / "checkpoint-4"))
        expected = best.state_dict()
        for name, tensor in last.state_dict().items():
            assert torch.equal(tensor, expected[name]), f"{reload}: {name} kept its own value"
