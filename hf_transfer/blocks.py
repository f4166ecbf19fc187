"""The blocks of a model from stem to head: timm's own grouping, transformers' repeated layers, or top-level modules.

One list drives `last_n`, `layer_decay` and staged unfreezing (freezing.py) and the head a new dataset gets (models.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import timm.models
from torch import nn
from transformers import PreTrainedModel, TimmWrapperForImageClassification


@dataclass
class Block:
    name: str
    parameter_names: list[str]


def discover_blocks(model: nn.Module) -> list[Block]:
    """The model's blocks in order from stem to head; the last block is always the classifier head.

    timm models use timm's own grouping (the one behind its `--layer-decay`); transformers models
    their embeddings, repeated layers (`encoder.layer.N`) and everything outside the base model as
    the head; anything else its top-level modules, with a warning.
    """
    blocks = None
    if isinstance(model, TimmWrapperForImageClassification):
        blocks = _timm_blocks(model.timm_model, prefix="timm_model.")
    elif hasattr(model, "group_matcher") and hasattr(model, "get_classifier"):
        blocks = _timm_blocks(model, prefix="")
    elif isinstance(model, PreTrainedModel):
        blocks = _transformers_blocks(model)
    if blocks is None:
        warnings.warn(f"No block structure known for {type(model).__name__}: using its top-level modules as blocks "
                      "and the last one as the head. Check the freeze plan table.", stacklevel=2)
        blocks = _top_level_blocks(model)
    return blocks


def _common_dotted_prefix(names: list[str]) -> str:
    common = []
    for pieces in zip(*(name.split(".") for name in names)):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _named_block(names: list[str], prefix: str = "") -> Block:
    """Name parameters by the module(s) they live in: `blocks.3.1`, `conv_stem+bn1`, `vit.embeddings`."""
    by_top: dict[str, list[str]] = {}
    for name in names:
        module = name.removeprefix(prefix).rsplit(".", 1)[0]
        by_top.setdefault(module.split(".")[0], []).append(module)
    return Block("+".join(_common_dotted_prefix(group) for group in by_top.values()), names)


def _timm_blocks(backbone: nn.Module, prefix: str) -> list[Block] | None:
    try:
        groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=False))
        classifier = backbone.get_classifier()
    except (AttributeError, NotImplementedError):
        return None
    classifiers = classifier if isinstance(classifier, (tuple, list)) else [classifier]  # distilled models have two
    head_ids = {id(p) for module in classifiers for p in module.parameters()}
    parameters = dict(backbone.named_parameters())
    head = [prefix + name for name, p in parameters.items() if id(p) in head_ids]
    bodies = ([prefix + name for name in group if id(parameters[name]) not in head_ids] for group in groups.values())
    blocks = [_named_block(body, prefix) for body in bodies if body]
    return [*blocks, Block("head", head)] if head and blocks else None


def _layer_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The biggest list of same-type layers (`encoder.layer`, `encoder.stages`): the repeated blocks."""
    lists = [(name, child) for name, child in module.named_modules()
             if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(layer) for layer in child}) == 1]
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()), default=None)


def _transformers_blocks(model: PreTrainedModel) -> list[Block] | None:
    """Embeddings, then one block per layer (what follows the last layer joins it, as in timm), then the head.

    The head is everything outside the base model (`classifier`, `cls_classifier` + `distillation_classifier`...).
    """
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    found = _layer_list(base) if isinstance(base, nn.Module) else None
    if found is None:
        return None
    list_name = f"{prefix}.{found[0]}"
    names = [name for name, _ in model.named_parameters()]
    head = [name for name in names if not name.startswith(prefix + ".")]
    if not head:
        return None
    before, after, per_layer = [], [], [[] for _ in found[1]]
    for name in (name for name in names if name.startswith(prefix + ".")):
        if name.startswith(list_name + "."):
            per_layer[int(name[len(list_name) + 1:].split(".")[0])].append(name)
        elif not any(per_layer):
            before.append(name)
        else:
            after.append(name)
    blocks = [_named_block(before)] if before else []
    blocks += [Block(f"{list_name}.{index}", layer) for index, layer in enumerate(per_layer) if layer]
    if after:
        blocks[-1] = Block(f"{blocks[-1].name}+{_named_block(after).name}", blocks[-1].parameter_names + after)
    return [*blocks, Block("head", head)]


def _top_level_blocks(model: nn.Module) -> list[Block]:
    """Fallback: one block per top-level module (the last is the head), own parameters first."""
    blocks = [Block("(own parameters)", [name for name, _ in model.named_parameters(recurse=False)])]
    children = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    if len(children) == 2:  # `body + head` wrappers: open the body up
        body_name, body = children[0]
        children = [(f"{body_name}.{name}", child) for name, child in body.named_children()] + children[1:]
        blocks.append(Block(f"{body_name} (own parameters)", [f"{body_name}.{n}" for n, _ in body.named_parameters(recurse=False)]))
    for name, child in children:
        blocks.append(Block(name, [f"{name}.{p}" for p, _ in child.named_parameters()]))
    blocks = [block for block in blocks if block.parameter_names]
    blocks[-1].name = "head"
    return blocks


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The classifier: the module that owns exactly the head block's parameters, with its dotted name (`classifier`,
    `timm_model.classifier`); None when the head's parameters are spread over several modules."""
    head_names = discover_blocks(model)[-1].parameter_names
    name = _common_dotted_prefix([parameter.rpartition(".")[0] for parameter in head_names])
    if not name:
        return None
    module = model.get_submodule(name)
    owned = {f"{name}.{parameter}" for parameter, _ in module.named_parameters()}
    return (name, module) if owned == set(head_names) else None
