"""Freeze plans on real models and real photos: what trains, what stays bit-identical, when stages change.

Models: a timm CNN with BatchNorm (`test_efficientnet`), a timm ViT (`test_vit`) and a tiny transformers
ViT, each saved to a local model folder (so the run loads it the way it loads any model and the
folder holds the exact initial weights). Training goes through `hf_transfer.pipeline.run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import SAMPLE, block_tensors, changed_blocks, load, model_photos, save_timm_model, trains, weights
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hf_transfer.blocks import discover_blocks
from hf_transfer.errors import RecipeError
from hf_transfer.freezing import FreezePlan, FreezePlanError
from hf_transfer.options import FreezeArguments
from hf_transfer.pipeline import run
from hf_transfer.recipe import parse_recipe

LABELS = ["cat", "dog"]
LABEL_MAPS = dict(num_labels=2, id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})


def save_transformers_vit(path: Path) -> Path:
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, **LABEL_MAPS)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "timm_cnn": save_timm_model(root / "timm_cnn", "test_efficientnet"),
        "timm_vit": save_timm_model(root / "timm_vit", "test_vit", img_size=32),
        "hf_vit": save_transformers_vit(root / "hf_vit"),
    }


@trains
def train(model_dir: Path, output_dir: Path, *options: str) -> Path:
    """A real run on the repo's cat and dog photos, saving a checkpoint after every optimizer step."""
    run(parse_recipe([
        "--dataset", str(SAMPLE), "--model", str(model_dir), "--output_dir", str(output_dir),
        "--validation_size", "8", "--max_train_samples", "32", "--max_eval_samples", "8", "--max_test_samples", "16",
        "--per_device_train_batch_size", "8", "--augmentation", "none", "--learning_rate", "0.01", "--warmup_steps", "0",
        "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "20",
        "--load_best_model_at_end", "false", "--disable_tqdm", "true", *options,
    ]))
    return output_dir


def _assert_blocks_partition(model: nn.Module, blocks) -> None:
    names = [name for block in blocks for name in block.parameter_names]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters()), "every parameter in exactly one block"


def test_timm_blocks_follow_timm_grouping_from_stem_to_head(model_dirs):
    cnn = load(model_dirs["timm_cnn"])
    blocks = discover_blocks(cnn)
    _assert_blocks_partition(cnn, blocks)
    assert [b.name for b in blocks] == ["conv_stem+bn1", "blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0+conv_head+bn2", "head"]
    assert blocks[-1].parameter_names == ["timm_model.classifier.weight", "timm_model.classifier.bias"]

    vit = load(model_dirs["timm_vit"])
    blocks = discover_blocks(vit)
    _assert_blocks_partition(vit, blocks)
    assert [b.name for b in blocks] == ["cls_token+pos_embed+patch_embed.proj", *[f"blocks.{i}" for i in range(5)], "blocks.5+norm", "head"]
    assert blocks[-1].parameter_names == ["timm_model.head.weight", "timm_model.head.bias"]


def test_transformers_blocks_are_embeddings_layers_and_everything_outside_the_base_model():
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                              num_attention_heads=2, intermediate_size=64, num_labels=2))
    blocks = discover_blocks(vit)
    _assert_blocks_partition(vit, blocks)
    layer_list = next(name for name, m in vit.vit.named_modules() if isinstance(m, nn.ModuleList))
    assert [b.name for b in blocks] == ["vit.embeddings", f"vit.{layer_list}.0", f"vit.{layer_list}.1", f"vit.{layer_list}.2+vit.layernorm", "head"]
    assert blocks[-1].parameter_names == ["classifier.weight", "classifier.bias"]

    # No `classifier` attribute: two heads, both outside the base model `deit`.
    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=2, intermediate_size=64, num_labels=2))
    blocks = discover_blocks(deit)
    _assert_blocks_partition(deit, blocks)
    assert blocks[0].name == "deit.embeddings" and len(blocks) == 4
    assert {name.split(".")[0] for name in blocks[-1].parameter_names} == {"cls_classifier", "distillation_classifier"}


def test_unknown_architecture_gets_top_level_blocks_and_a_warning():
    model = torchvision.models.resnet18(num_classes=2)
    with pytest.warns(UserWarning, match="No block structure known for ResNet"):
        plan = FreezePlan(model, FreezeArguments(freeze="last_n:2"), learning_rate=1e-3)
    assert [b.name for b in plan.blocks] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head"]
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4", "fc"}


# --- what each option trains -------------------------------------------------------------------

@pytest.mark.parametrize(("options", "expected"), [
    (dict(freeze="head_only"), lambda b: b["head"]),
    (dict(freeze="full"), lambda b: [n for names in b.values() for n in names]),
    (dict(freeze="last_n:2"), lambda b: b["head"] + b["blocks.3.0"] + b["blocks.4.0+conv_head+bn2"]),
    (dict(freeze="last_n:0"), lambda b: b["head"]),
    (dict(freeze="patterns", train_patterns=["*.blocks.2.*", "*conv_head*"], freeze_patterns=["*.bn*"]),
     lambda b: b["head"] + [n for n in b["blocks.2.0"] if ".bn" not in n] + ["timm_model.conv_head.weight"]),
    (dict(freeze="patterns", freeze_patterns=["*stem*", "*.blocks.0.*"]),
     lambda b: [n for names in b.values() for n in names if "stem" not in n and ".blocks.0." not in n]),
], ids=["head_only", "full", "last_n:2", "last_n:0", "patterns", "patterns-freeze-only"])
def test_each_strategy_trains_exactly_what_it_says(model_dirs, options, expected):
    model = load(model_dirs["timm_cnn"])
    plan = FreezePlan(model, FreezeArguments(**options), learning_rate=1e-3)
    blocks = {block.name: block.parameter_names for block in plan.blocks}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(expected(blocks))
    in_optimizer = {id(p) for group in plan.parameter_groups(0.01) for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_waiting_block_gets_zero_gradients_and_no_update(model_dirs):
    model = load(model_dirs["timm_cnn"])
    stages = [{"at_step": 0, "train": "head"}, {"at_step": 5, "train": "all"}]
    plan = FreezePlan(model, FreezeArguments(freeze="staged", stages=stages), learning_rate=0.01)
    optimizer = torch.optim.AdamW(plan.parameter_groups(weight_decay=0.5))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pixels, labels = model_photos(model, 8)
    with plan.attached():  # the plan's hooks, as FreezeCallback attaches them for the length of training
        model(pixel_values=pixels, labels=labels).loss.backward()
    waiting = {name: p for name, p in model.named_parameters() if name not in plan.stage_sets[0]}
    # A gradient for every registered parameter keeps DDP's reducers in step; zero keeps clipping to the head's.
    assert all(p.grad is not None and not p.grad.any() for p in waiting.values())
    plan.drop_waiting_gradients()
    optimizer.step()
    assert all(torch.equal(before[name], p) for name, p in waiting.items()), "not even weight decay moves a waiting block"
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if name not in waiting)


def test_the_plans_stages_are_its_own_and_the_recipes_schedule_stays_as_written(model_dirs):
    args = FreezeArguments(freeze="staged", stages=[{"at_step": 0, "train": "head"}, {"at_step": 5, "train": "all"}])
    plan = FreezePlan(load(model_dirs["timm_cnn"]), args, learning_rate=0.01)
    plan.stages[1]["train"] = "last_n:1"  # what a later change to the plan's stages would do
    assert args.schedule[1] == {"at_step": 5, "train": "all"}


def test_patterns_that_match_nothing_or_freeze_everything_are_refused(model_dirs):
    model = load(model_dirs["timm_cnn"])
    with pytest.raises(FreezePlanError, match=r"'\*backbone\*' matches no parameter.*timm_model\.conv_stem\.weight"):
        FreezePlan(model, FreezeArguments(freeze="patterns", train_patterns=["*backbone*"]), 1e-3)
    with pytest.raises(FreezePlanError, match="Nothing would train"):
        FreezePlan(model, FreezeArguments(freeze="patterns", freeze_patterns=["*"]), 1e-3)


def test_layer_decay_learning_rates_are_geometric_in_depth(model_dirs):
    model = load(model_dirs["hf_vit"])
    plan = FreezePlan(model, FreezeArguments(freeze="full", layer_decay=0.5), learning_rate=0.01)
    lr_by_block = {group["block"]: group["lr"] for group in plan.parameter_groups(weight_decay=0.05)}
    names = [block.name for block in plan.blocks]
    assert [lr_by_block[name] for name in names] == pytest.approx([0.01 * 0.5 ** (len(names) - 1 - i) for i in range(len(names))])
    for group in plan.parameter_groups(weight_decay=0.05):
        assert group["weight_decay"] == (0.05 if all(p.ndim > 1 for p in group["params"]) else 0.0), "no decay on biases, norms"


def test_timm_layer_decay_groups_cannot_replace_the_plans_groups(model_dirs):
    """Why FreezePlan builds its own groups (see parameter_groups): timm's `param_groups_layer_decay` gives each group an
    `lr_scale` that only timm's schedulers apply (torch's optimizers and Trainer's schedulers ignore it, so every block would
    run at one rate), and it serves timm models only, where the plan serves transformers backbones too."""
    from timm.optim import param_groups_layer_decay

    model = load(model_dirs["timm_cnn"])
    plan = FreezePlan(model, FreezeArguments(freeze="staged", stages=[{"at_epoch": 0, "train": "head"},
                                                                  {"at_epoch": 1, "train": "all"}], layer_decay=0.5),
                      learning_rate=0.01)
    ours = plan.parameter_groups(weight_decay=0.05)
    theirs = param_groups_layer_decay(model.timm_model, weight_decay=0.05, layer_decay=0.5)
    optimizer = torch.optim.SGD(theirs, lr=0.01)
    assert {group["lr"] for group in optimizer.param_groups} == {0.01}, "timm's lr_scale does not reach the optimizer"
    assert len({group["lr"] for group in ours}) > 1, "ours: one rate per block"


def test_presets_and_command_line_forms():
    base = ["--dataset", str(SAMPLE)]
    fastai = parse_recipe([*base, "--freeze", "fastai"]).freezing
    assert (fastai.freeze, fastai.preset, fastai.stages) == ("staged", "fastai", [{"at_epoch": 0, "train": "head"}, {"at_epoch": 1, "train": "all"}])
    assert fastai.decay_for(4) == pytest.approx(0.01 ** (1 / 4)), "fastai: the stem learns 100x slower than the head"
    assert parse_recipe([*base, "--freeze", "linear_probe"]).freezing.freeze == "head_only"
    llrd = parse_recipe([*base, "--freeze", "llrd"]).freezing
    assert (llrd.freeze, llrd.layer_decay) == ("full", 0.75)
    assert parse_recipe([*base, "--freeze", "llrd", "--layer_decay", "0.9"]).freezing.layer_decay == 0.9, "what the user sets wins"

    staged = parse_recipe([*base, "--freeze", "staged", "--stages", "[{at_epoch: 0, train: head}, {at_epoch: 1, train: last_n:2}, {at_epoch: 2, train: all}]",
                           "--layer_decay", "0.7", "--batchnorm", "train"]).freezing
    assert [stage["train"] for stage in staged.schedule] == ["head", "last_n:2", "all"]
    assert (staged.layer_decay, staged.batchnorm) == (0.7, "train")
    patterns = parse_recipe([*base, "--freeze", "patterns", "--train_patterns", "*.blocks.5.*", "*.norm.*", "--freeze_patterns", "*stem*"]).freezing
    assert (patterns.train_patterns, patterns.freeze_patterns) == (["*.blocks.5.*", "*.norm.*"], ["*stem*"])


def test_grouped_yaml_form_from_the_recipe_file(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        f"dataset: {SAMPLE}\n"
        "freeze:\n"
        "  strategy: staged\n"
        "  stages:\n"
        "    - {at_epoch: 0, train: head}\n"
        "    - {at_epoch: 1, train: last_n:2}\n"
        "    - {at_epoch: 2, train: all}\n"
        "  batchnorm: frozen\n"
        "  layer_decay: 0.7\n"
    )
    freeze = parse_recipe([str(recipe_file)]).freezing
    assert freeze.schedule == [{"at_epoch": 0, "train": "head"}, {"at_epoch": 1, "train": "last_n:2"}, {"at_epoch": 2, "train": "all"}]
    assert (freeze.batchnorm, freeze.layer_decay) == ("frozen", 0.7)


@pytest.mark.parametrize(("options", "message"), [
    (["--freeze", "half"], "Unknown freeze strategy 'half'"),
    (["--freeze", "last_n"], r"cannot be 'last_n'.*`last_n:2` trains the head and the last 2 blocks"),
    (["--freeze", "last_n:two"], "cannot be 'last_n:two'"),
    (["--freeze", "staged"], "needs `stages`"),
    (["--freeze", "staged", "--stages", "[{at_epoch: 1, train: head}]"], "first stage must start at 0"),
    (["--freeze", "staged", "--stages", "[{at_epoch: 0, train: head}, {at_step: 9, train: all}]"], "not both"),
    (["--freeze", "staged", "--stages", "[{at_step: 0, train: head}, {at_step: 0, train: all}]"], "increasing order"),
    (["--freeze", "staged", "--stages", "[{at_step: 0, train: everything}]"], "cannot be 'everything'"),
    (["--freeze", "staged", "--stages", "[{at_step: 0}]"], "a stage needs `train`"),
    (["--freeze", "staged", "--stages", "[{at_step: -1, train: head}]"], "must be a number >= 0"),
    (["--stages", "[{at_step: 0, train: head}]"], "only apply to `freeze: staged`"),
    (["--batchnorm", "stats"], "`batchnorm` must be one of frozen, eval, train"),
    (["--layer_decay", "1.5"], r"`layer_decay` must be in \(0, 1\]"),
    (["--freeze", "patterns"], "needs `train_patterns` and/or `freeze_patterns`"),
    (["--train_patterns", "*stem*"], "only apply to `freeze: patterns`"),
    (["--freeze", "staged", "--stages", "[{at_step: 0, train: [head]}]"], r"cannot be '\['head'\]'"),
])
def test_invalid_options_say_what_to_write_instead(options, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(["--dataset", str(SAMPLE), *options])


def test_only_batchnorm_layers_of_frozen_blocks_are_held_in_eval_mode(model_dirs):
    cnn = load(model_dirs["timm_cnn"])
    plan = FreezePlan(cnn, FreezeArguments(freeze="last_n:1"), 1e-3)
    cnn.train()  # as Trainer does before every step
    with plan.attached():
        cnn(pixel_values=model_photos(cnn, 4)[0])
    last_block = set(plan.blocks[-2].parameter_names)
    norms = {name: m for name, m in cnn.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert type(norms["timm_model.bn1"]).__name__ == "BatchNormAct2d", "timm's fused BatchNorm + activation is covered"
    assert {name for name, m in norms.items() if m.training} == {name for name in norms if f"{name}.weight" in last_block}
    assert [row["batchnorm"] for row in plan.table()] == ["frozen"] * 5 + ["train", "-"]


def test_batchnorm_eval_keeps_statistics_of_trained_blocks_too(model_dirs):
    cnn = load(model_dirs["timm_cnn"])
    statistics = {name: b.clone() for name, b in cnn.named_buffers()}
    plan = FreezePlan(cnn, FreezeArguments(freeze="full", batchnorm="eval"), 1e-3)
    cnn.train()
    with plan.attached():
        cnn(pixel_values=model_photos(cnn, 4)[0])
    assert all(torch.equal(statistics[name], b) for name, b in cnn.named_buffers())
    assert all(p.requires_grad for p in cnn.parameters()), "their scale and shift still train"
    assert {row["batchnorm"] for row in plan.table()[:-1]} == {"frozen"}

    vit = load(model_dirs["timm_vit"])
    FreezePlan(vit, FreezeArguments(freeze="head_only"), 1e-3)
    vit.train()
    vit(pixel_values=torch.randn(2, 3, 32, 32))
    layer_norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    assert layer_norms and all(m.training for m in layer_norms), "LayerNorm has no running statistics: left alone"


# --- real training runs --------------------------------------------------------------------------

def test_staged_unfreezing_starts_at_the_declared_step_and_frozen_tensors_stay_bit_identical(model_dirs, tmp_path):
    model_dir = model_dirs["timm_cnn"]
    # Uncached: the bit-for-bit comparison with head_only below needs float32 features in stage 0.
    out = train(model_dir, tmp_path / "run", "--max_steps", "4", "--freeze", "staged", "--layer_decay", "0.5",
                "--stages", "[{at_step: 0, train: head}, {at_step: 2, train: 'last_n:2'}]", "--feature_cache", "false")
    blocks = block_tensors(model_dir)
    names = list(blocks)
    initial = weights(model_dir)
    late = {names[-3], names[-2]}
    for step in (1, 2, 3, 4):  # checkpoint-N holds the weights after N optimizer steps
        moved = changed_blocks(blocks, initial, weights(out / f"checkpoint-{step}"))
        assert moved == ({"head"} if step <= 2 else {"head"} | late), f"after step {step}"

    final = weights(out)
    frozen = [t for name in names[:-3] for t in blocks[name]]
    assert any("running_mean" in t for t in frozen)
    assert all(torch.equal(initial[t], final[t]) for t in frozen), "frozen weights and BatchNorm statistics are bit-identical"

    plan = json.loads((out / "freeze_plan.json").read_text())
    assert [(h["stage"], h["train"], h["started_at_step"]) for h in plan["history"]] == [(0, "head", 0), (1, "last_n:2", 2)]
    rows = plan["history"][1]["blocks"]
    assert [row["lr"] for row in rows[-3:]] == pytest.approx([0.01 * 0.25, 0.01 * 0.5, 0.01])
    assert [row["batchnorm"] for row in rows] == ["frozen"] * 4 + ["train", "train", "-"]
    assert plan["integrity"]["frozen_unchanged"] and plan["integrity"]["at_step"] == 4
    assert plan["trainable_parameters"] == sum(row["params"] for row in rows[-3:])

    # Waiting is exactly frozen: up to its stage change the run matches a head_only run bit for bit
    # (same data order, same head learning rate, gradient clipping over the head's gradients only).
    head_only = train(model_dir, tmp_path / "head_only", "--max_steps", "4", "--freeze", "head_only", "--feature_cache", "false")
    staged_step_2, head_only_step_2 = weights(out / "checkpoint-2"), weights(head_only / "checkpoint-2")
    assert all(torch.equal(staged_step_2[name], head_only_step_2[name]) for name in staged_step_2)


def test_batchnorm_train_updates_statistics_of_frozen_blocks_but_not_their_weights(model_dirs, tmp_path):
    model_dir = model_dirs["timm_cnn"]
    out = train(model_dir, tmp_path / "run", "--max_steps", "2", "--save_strategy", "no", "--freeze", "head_only", "--batchnorm", "train")
    initial, final = weights(model_dir), weights(out)
    parameters = [name for name, _ in load(model_dir).named_parameters()]
    head = {"timm_model.classifier.weight", "timm_model.classifier.bias"}
    assert all(torch.equal(initial[n], final[n]) for n in parameters if n not in head)
    assert all(not torch.equal(initial[n], final[n]) for n in head)
    statistics = [n for n in initial if n.endswith(("running_mean", "running_var"))]
    assert all(not torch.equal(initial[n], final[n]) for n in statistics), "batchnorm: train keeps updating statistics"

    plan = json.loads((out / "freeze_plan.json").read_text())
    assert plan["trainable_parameters"] == initial["timm_model.classifier.weight"].numel() + 2
    assert {row["batchnorm"] for row in plan["blocks"][:-1]} == {"train"}


def test_timm_vit_unfreezes_its_last_block_at_the_declared_epoch(model_dirs, tmp_path):
    model_dir = model_dirs["timm_vit"]
    out = train(model_dir, tmp_path / "run", "--max_train_samples", "16", "--num_train_epochs", "2", "--save_strategy", "epoch",
                "--freeze", "staged", "--stages", "[{at_epoch: 0, train: head}, {at_epoch: 1, train: 'last_n:1'}]")
    blocks = block_tensors(model_dir)
    initial = weights(model_dir)
    assert changed_blocks(blocks, initial, weights(out / "checkpoint-2")) == {"head"}, "epoch 0 (2 steps): head only"
    assert changed_blocks(blocks, initial, weights(out)) == {"head", "blocks.5+norm"}
    plan = json.loads((out / "freeze_plan.json").read_text())
    assert [h["started_at_step"] for h in plan["history"]] == [0, 2] and plan["history"][1]["at_epoch"] == 1


def test_transformers_vit_fastai_preset_trains_head_then_everything_with_spread_rates(model_dirs, tmp_path):
    model_dir = model_dirs["hf_vit"]
    out = train(model_dir, tmp_path / "run", "--max_train_samples", "16", "--num_train_epochs", "2", "--save_strategy", "epoch",
                "--freeze", "fastai")
    blocks = block_tensors(model_dir)
    initial = weights(model_dir)
    assert changed_blocks(blocks, initial, weights(out / "checkpoint-2")) == {"head"}
    assert changed_blocks(blocks, initial, weights(out)) == set(blocks)
    plan = json.loads((out / "freeze_plan.json").read_text())
    assert plan["preset"] == "fastai" and [h["started_at_step"] for h in plan["history"]] == [0, 2]
    rates = [row["lr"] for row in plan["history"][1]["blocks"]]
    assert rates[0] / rates[-1] == pytest.approx(1 / 100)
    assert all(later / earlier == pytest.approx(rates[1] / rates[0]) for earlier, later in zip(rates, rates[1:]))
