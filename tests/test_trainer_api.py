"""The private Trainer API that SafeTrainer extends is still there, with the parameters it was written against."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer, TrainingArguments
from transformers import __version__ as transformers_version

from hf_transfer.trainer import PRIVATE_ATTRIBUTES, PRIVATE_OVERRIDES, SafeTrainer


@pytest.mark.parametrize("name", sorted(PRIVATE_OVERRIDES))
def test_each_overridden_private_method_exists_with_the_same_parameters(name):
    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers {transformers_version} has no Trainer.{name}: SafeTrainer's override is dead code."
    assert name in vars(SafeTrainer), f"{name} is listed but SafeTrainer does not override it"
    parameters = list(inspect.signature(method).parameters)
    assert parameters == PRIVATE_OVERRIDES[name], (
        f"Trainer.{name} changed its parameters in transformers {transformers_version}: {parameters}; "
        "update SafeTrainer's override and PRIVATE_OVERRIDES."
    )


def test_every_private_override_is_listed():
    private = {name for name in vars(SafeTrainer) if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert private <= set(PRIVATE_OVERRIDES), f"unlisted private overrides: {private - set(PRIVATE_OVERRIDES)}"


def test_the_private_attributes_are_set_by_trainer(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    source = inspect.getsource(Trainer)
    for name in PRIVATE_ATTRIBUTES:
        assert hasattr(trainer, name) or f"self.{name} =" in source, f"Trainer no longer has {name}"


def test_the_model_hook_that_lets_each_machine_save_its_copy_is_there():
    """models.save_pretrained overrides PreTrainedModel.should_save_on_this_rank (transformers 5 saves on global rank 0
    only) so that each machine's main process writes its copy of a node-local output folder."""
    from transformers import PreTrainedModel

    parameters = list(inspect.signature(PreTrainedModel.should_save_on_this_rank).parameters)
    assert parameters == ["self", "is_main_process"], (
        f"PreTrainedModel.should_save_on_this_rank changed in transformers {transformers_version}: {parameters}; update models.save_pretrained."
    )
