"""SafeTrainer uses Trainer through its public API, save the private methods and attributes listed in hf_transfer/trainer.py:
those are still there with the parameters they were written against, nothing else private is used, and each listed
override is still needed (Trainer's own way differs). Checkpoints hold no pickle, nothing is pickled or unpickled while
saving or resuming, and a resume restores each state at the moment Trainer would have: the weights and logs come out
as an uninterrupted run's."""

from __future__ import annotations

import ast
import inspect
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, sample_tensors
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification
from transformers import __version__ as transformers_version

from hf_transfer.callbacks import FreezeCallback
from hf_transfer.checkpoints import CheckpointError
from hf_transfer.data import collate
from hf_transfer.freezing import FreezePlan
from hf_transfer.models import load_model
from hf_transfer.optimization import build_optimizer
from hf_transfer.recipe import parse_recipe
from hf_transfer.trainer import PRIVATE_ATTRIBUTES, PRIVATE_OVERRIDES, NonFiniteLossError, SafeTrainer

PACKAGE = REPO / "hf_transfer"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


# ---- the private API that is used, and only that ----------------------------------------------------------------------

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


def _trainer_private_attributes() -> set[str]:
    """The private attributes a Trainer sets on itself (`self._x = ...` in its source)."""
    return set(re.findall(r"self\.(_\w+)\s*[-+]?=", Path(inspect.getfile(Trainer)).read_text()))


def _trainer_subclasses(tree: ast.Module) -> list[ast.ClassDef]:
    """Classes whose bases name Trainer or one of the package's Trainer subclasses."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(getattr(base, "id", getattr(base, "attr", "")).endswith("Trainer") for base in node.bases)]


def test_the_package_uses_no_private_trainer_api_beyond_the_two_lists():
    """Every Trainer subclass of the package (SafeTrainer, HeadTrainer, StreamingTrainer) counted together, by their source:
    the private Trainer methods they define, and any private Trainer attribute or method named anywhere in the package."""
    private_methods = {name for name in dir(Trainer) if name.startswith("_") and not name.startswith("__")}
    private_attributes = _trainer_private_attributes()
    overridden, used = set(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for cls in _trainer_subclasses(tree):
            overridden |= {f"{cls.name}.{node.name}" for node in cls.body
                           if isinstance(node, ast.FunctionDef) and node.name in private_methods}
        used |= {f"{path.name}: .{node.attr}" for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr in private_attributes | private_methods}
    assert {name.split(".")[1] for name in overridden} <= set(PRIVATE_OVERRIDES), f"unlisted private overrides: {sorted(overridden)}"
    assert len(PRIVATE_OVERRIDES) <= 4, "issue 22: at most 4 private Trainer methods overridden"
    unlisted = {entry for entry in used if entry.split(".")[-1] not in {*PRIVATE_ATTRIBUTES, *PRIVATE_OVERRIDES}}
    assert not unlisted, f"private Trainer API used but not listed in hf_transfer/trainer.py: {sorted(unlisted)}"


def test_the_private_attributes_are_set_by_trainer():
    assert set(PRIVATE_ATTRIBUTES) <= _trainer_private_attributes(), f"Trainer no longer sets {set(PRIVATE_ATTRIBUTES) - _trainer_private_attributes()}"


def test_the_model_hook_that_lets_each_machine_save_its_copy_is_there():
    """models.save_pretrained overrides PreTrainedModel.should_save_on_this_rank (transformers 5 saves on global rank 0
    only) so that each machine's main process writes its copy of a node-local output folder."""
    from transformers import PreTrainedModel

    parameters = list(inspect.signature(PreTrainedModel.should_save_on_this_rank).parameters)
    assert parameters == ["self", "is_main_process"], (
        f"PreTrainedModel.should_save_on_this_rank changed in transformers {transformers_version}: {parameters}; update models.save_pretrained."
    )


# ---- why each listed override is still needed: Trainer's own way gives another result ---------------------------------

def _tiny_vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_labels=2)
    return ViTForImageClassification(config)


@pytest.mark.parametrize("reload", ["_load_from_checkpoint", "_load_best_model"])
def test_trainers_own_reload_leaves_layers_saved_under_legacy_names_behind(reload, tmp_path):
    """Why SafeTrainer overrides Trainer's two weight reloads (tests/test_checkpoints.py shows its own reloading every
    tensor): when this fails, Trainer reloads ViT whole and the override can go."""
    best = _tiny_vit(seed=1)
    best.save_pretrained(tmp_path / "checkpoint-4")
    last = _tiny_vit(seed=2)
    trainer = Trainer(model=last, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True))
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-4")
    getattr(trainer, reload)(*([str(tmp_path / "checkpoint-4")] if reload == "_load_from_checkpoint" else []))
    left = [name for name, tensor in last.state_dict().items() if not torch.equal(tensor, best.state_dict()[name])]
    assert left, f"transformers {transformers_version}'s Trainer.{reload} reloads every ViT tensor: drop SafeTrainer's override"


def test_trainers_gradient_norm_sums_in_another_order_than_the_optimizers():
    """Why SafeTrainer overrides Trainer's gradient clipping: over `model.parameters()` the norm of the same gradients
    differs in the last bit from the norm over the optimizer's list, the one every run so far was trained with."""
    recipe = parse_recipe([], dataset="in-memory", model="test_efficientnet", pretrained=False, freeze="full", output_dir="unused")
    model, _ = load_model(recipe.model, ["cat", "dog"])
    optimizer = build_optimizer(recipe.training, model, FreezePlan(model, recipe.freezing, 1e-3).parameter_groups(0.01))
    listed = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    differing = 0
    for seed in range(20):
        torch.manual_seed(seed)
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter) * 10 * torch.rand(())
        walked = torch.nn.utils.get_total_norm([parameter.grad for parameter in model.parameters()])
        differing += not torch.equal(walked, torch.nn.utils.get_total_norm([parameter.grad for parameter in listed]))
    assert differing, "the two orders give the same norms: clipping through Trainer's own method would train the same weights"


# ---- checkpoints without pickles, resumed at Trainer's moments ---------------------------------------------------------

class Photos(torch.utils.data.Dataset):
    """16 real photos (64 px) and their labels."""

    def __init__(self):
        self.pixels, self.labels = sample_tensors()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def _trainer(output_dir: Path, **options) -> SafeTrainer:
    """What pipeline.run builds: 16 photos in batches of 4, 2 epochs of 4 steps, dropout 0.5 (so every step draws from
    the RNG), a checkpoint every 2 steps (at an epoch's end: 4 and 8; inside one: 2 and 6), a loss logged every 3 steps."""
    recipe = parse_recipe([], dataset="in-memory", model="test_efficientnet", pretrained=False, freeze="full", drop_rate=0.5,
                          output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=2, eval_strategy="no",
                          save_strategy="steps", save_steps=2, logging_strategy="steps", logging_steps=3,
                          load_best_model_at_end=False, save_total_limit=10, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                          **options)
    torch.manual_seed(0)
    model, _ = load_model(recipe.model, ["cat", "dog"])
    plan = FreezePlan(model, recipe.freezing, recipe.training.learning_rate)
    return SafeTrainer(model=model, args=recipe.training, train_dataset=Photos(), data_collator=collate,
                       optimizers=(build_optimizer(recipe.training, model, plan.parameter_groups(0.01)), None),
                       callbacks=[FreezeCallback(plan)])


@pytest.fixture
def pickling(monkeypatch) -> list[str]:
    """Every torch.save and torch.load while the test runs (Trainer writes and reads its checkpoint files with them)."""
    calls = []
    for name in ("save", "load"):
        original = getattr(torch, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            calls.append(f"torch.{_name}({args[1] if _name == 'save' else args[0]})")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, recorded)
    return calls


def _history(trainer: SafeTrainer) -> list[dict]:
    return [{key: value for key, value in entry.items() if not key.endswith(("runtime", "per_second"))}
            for entry in trainer.state.log_history]


@pytest.mark.slow
def test_a_resumed_run_trains_and_logs_as_the_uninterrupted_one_and_nothing_is_pickled(tmp_path, pickling):
    whole = _trainer(tmp_path / "whole")
    whole_output = whole.train()
    expected = {name: tensor.clone() for name, tensor in whole.model.state_dict().items()}
    for step in (4, 6):  # the start of epoch 2 (RNG restored before its loader starts); after 2 of its batches (then)
        output_dir = tmp_path / f"resumed_at_{step}"
        output_dir.mkdir()
        shutil.copytree(tmp_path / "whole" / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
        resumed = _trainer(output_dir)
        resumed_output = resumed.train(resume_from_checkpoint=True)
        weights = resumed.model.state_dict()
        assert all(torch.equal(weights[name], expected[name]) for name in expected), f"resumed at step {step}: other weights"
        assert _history(resumed) == _history(whole), f"resumed at step {step}: other logs"  # losses at 3 and 6, train_loss
        assert resumed_output.training_loss == whole_output.training_loss
    assert not pickling, pickling
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"optimizer.safetensors", "resume_state.json", "training_args.json"}
    assert not [path for path in files if path.suffix in PICKLE_SUFFIXES]
    saved = (tmp_path / "whole" / "checkpoint-2" / "training_args.json").read_text()
    assert '"save_only_model": false' in saved  # the arguments as given, not the run's copy Trainer saw


@pytest.mark.slow
@pytest.mark.parametrize("pickle", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_a_pickle_put_into_a_complete_checkpoint_is_refused_unread(pickle, tmp_path, pickling):
    """Trainer loads its own pickles when it finds them (the RNG file after ours, so its state would win): refused."""
    _trainer(tmp_path / "out", max_steps=4).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / pickle).write_bytes(b"\x80\x04N.")  # a pickle of None
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    with pytest.raises(CheckpointError) as refused:
        _trainer(tmp_path / "out", max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    assert str(refused.value).startswith(f"{checkpoint / pickle}: a pickle, which Trainer would load on resume; hf-transfer "
                                         "writes none and never loads one")
    assert not pickling, pickling
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir()} == before


class PoisonAt(TrainerCallback):
    """Turns a weight NaN at the end of optimizer step `step`, after that step's (finite) loss."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


@pytest.mark.slow
def test_a_checkpoint_with_a_nan_weight_is_never_written(tmp_path):
    trainer = _trainer(tmp_path / "out", max_steps=4)
    trainer.add_callback(PoisonAt(step=4))
    with pytest.raises(NonFiniteLossError, match="Weights became NaN or inf at step 4, so they were not saved. .*the last good "
                                                 "checkpoint, .*checkpoint-2, is kept"):
        trainer.train()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["checkpoint-2"]
