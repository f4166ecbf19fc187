"""The options of `hf-transfer select` (not a recipe section: the recipe names the data and the run it selects for); light
enough for `--help`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RecipeError

PREFER = ("best", "fast")


@dataclass
class SelectArguments:
    candidates: str | None = field(
        default=None,
        metadata={"help": "Comma-separated model ids to rank (timm names, Hub ids, local model folders). Default: small to medium "
                          "backbones of several families; with no Hub access, every model whose ImageNet weights are available "
                          "offline."},
    )
    sample: int = field(
        default=2000,
        metadata={"help": "Train images each candidate is measured on: a stratified, seeded sample of the train split (all of it "
                          "if it has fewer), with a quarter as many from the validation split (all of it if it has fewer)."},
    )
    prefer: str = field(
        default="best",
        metadata={"help": "Which candidate recipe.selected.yaml trains: best = the best out-of-fold probe accuracy; fast = the "
                          "fastest whose probe accuracy is within the best's 95%% interval.", "choices": list(PREFER)},
    )
    max_seconds: float | None = field(
        default=None,
        metadata={"help": "Once this many seconds have passed, stop after the candidate in progress and report those measured."},
    )
    output_dir: str = field(
        default="outputs/select",
        metadata={"help": "Where selection.json, selection.md, selection.png and recipe.selected.yaml are written (the recipe's "
                          "own `output_dir` stays the selected recipe's)."},
    )

    def __post_init__(self):
        if isinstance(self.candidates, str):
            self.candidates = [name.strip() for name in self.candidates.split(",") if name.strip()] or None
        if not (isinstance(self.sample, int) and self.sample >= 2):
            raise RecipeError(f"`--sample {self.sample}` measures nothing: give a number of train images >= 2, e.g. 2000.")
        if self.prefer not in PREFER:
            raise RecipeError(f"`--prefer {self.prefer}` is not one of {' | '.join(PREFER)}.")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise RecipeError(f"`--max_seconds {self.max_seconds}`: give a number of seconds > 0, or leave it unset (no limit).")
