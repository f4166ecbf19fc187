"""What a freeze plan's `stages` and a `train` target may say: the grammar, checked when a recipe is read.

`freeze: last_n:2` and each stage's `train` name a target; `stages` is a list of mappings, each starting `at_epoch`,
`at_step` or `at_plateau` (after that many evaluations without improvement), with an optional `lr_scale`.
"""

from __future__ import annotations

# What a stage trains; `head_only` and `full` are accepted as synonyms of `head` and `all`.
TARGETS = ("head", "all", "last_n:<k>", "patterns")
TARGET_ALIASES = {"head_only": "head", "full": "all"}


def check_target(target, where: str) -> None:
    """Refuse a `train` target (named `where` in the message) outside TARGETS."""
    target = TARGET_ALIASES.get(target, target) if isinstance(target, str) else repr(target)
    if target in ("head", "all", "patterns"):
        return
    count = target.split(":", 1)[1] if target.startswith("last_n:") else None
    if count is None or not count.isdigit():
        raise ValueError(
            f"{where} cannot be '{target}': use {' | '.join(TARGETS)}"
            " (`last_n:2` trains the head and the last 2 blocks)."
        )


STAGE_STARTS = ("at_epoch", "at_step", "at_plateau")
STAGE_KEYS = (*STAGE_STARTS, "train", "lr_scale")


def check_stages(stages) -> None:
    """Refuse a `stages` list that does not say, stage by stage, when it starts and what it trains, in a valid order."""
    example = "e.g. [{at_epoch: 0, train: head}, {at_epoch: 1, train: 'last_n:2'}, {at_plateau: 2, train: all, lr_scale: 0.1}]"
    if not isinstance(stages, list) or not stages or not all(isinstance(stage, dict) for stage in stages):
        raise ValueError(f"`freeze: staged` needs `stages`, a list of {{at_epoch|at_step|at_plateau, train, lr_scale}} mappings, {example}.")
    for index, stage in enumerate(stages):
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(f"Stage {index} has unknown key(s) {unknown}: a stage takes {', '.join(STAGE_KEYS)}, {example}.")
        starts = [key for key in STAGE_STARTS if key in stage]
        if "train" not in stage or len(starts) != 1:
            raise ValueError(f"Stage {index} is {stage}: a stage needs `train` and exactly one of {', '.join(STAGE_STARTS)}, {example}.")
        start = stage[starts[0]]
        if isinstance(start, bool) or not isinstance(start, (int, float)) or start < 0:
            raise ValueError(f"Stage {index}: `{starts[0]}` must be a number >= 0, not {start!r}.")
        if starts[0] == "at_plateau" and (index == 0 or not isinstance(start, int) or start < 1):
            raise ValueError(
                f"Stage {index}: `at_plateau: {start}` "
                + ("cannot start the first stage (it says what trains from the start)." if index == 0 else
                   "is a patience: the whole number of evaluations without improvement of `metric_for_best_model`, >= 1.")
            )
        scale = stage.get("lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise ValueError(f"Stage {index}: `lr_scale` multiplies every learning rate from that stage on; it must be > 0, not {scale!r}.")
        check_target(stage["train"], where=f"Stage {index}'s `train`")
    fixed = [stage for stage in stages if "at_plateau" not in stage]
    units = {key for stage in fixed for key in ("at_epoch", "at_step") if key in stage}
    if len(units) > 1:
        raise ValueError("Use `at_epoch` in every stage or `at_step` in every stage, not both (`at_plateau` mixes with either).")
    unit = units.pop()
    if any("at_plateau" in earlier and "at_plateau" not in later for earlier, later in zip(stages, stages[1:])):
        raise ValueError("A stage that starts `at_plateau` can only be followed by more `at_plateau` stages: when it starts is known only during the run.")
    starts = [stage[unit] for stage in fixed]
    if starts[0] != 0:
        raise ValueError(f"The first stage must start at 0 (it says what trains from the start), not {starts[0]}.")
    if any(later <= earlier for earlier, later in zip(starts, starts[1:])):
        raise ValueError(f"Stages must start in increasing order, got starts {starts}.")
