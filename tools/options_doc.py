"""Write docs/options.md, the option reference, from the argument dataclasses' field help (run it after adding an option).

    python tools/options_doc.py            # rewrites docs/options.md
    python tools/options_doc.py --stdout   # prints it instead

One table per hf_transfer section (the dataclasses of hf_transfer.options.ARGUMENT_CLASSES other than TrainingArguments),
then the TrainingArguments fields whose defaults hf_transfer changes (options.TRAINING_DEFAULTS, with the reason its
comments give, and recipe.device_defaults) or whose meaning it extends. tests/test_docs.py checks the file against
`hf-transfer train --help-all`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path

import yaml
from transformers import TrainingArguments

from hf_transfer import options, recipe
from hf_transfer.options import HfTransferTrainingArguments

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"
COMMAND = "python tools/options_doc.py"
TITLES = {"DataArguments": "Data", "ModelArguments": "Model", "FreezeArguments": "What trains",
          "RunArguments": "Run", "DoctorArguments": "Data doctor"}  # a class not named here is titled by its name


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def as_yaml(value) -> str:
    """A default as a recipe would write it (`null`, `true`, `0.001`, `[a, b]`), in backticks."""
    text = yaml.safe_dump(getattr(value, "value", value), default_flow_style=True, width=10**6).strip()
    return f"`{text.removesuffix('...').strip()}`"


def prose(text: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), 118, break_long_words=False, break_on_hyphens=False) + [""]


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def help_of(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "").replace("%%", "%")  # argparse help text doubles a literal %
    if f.metadata.get("choices"):
        text += f" Choices: {', '.join(str(c) for c in f.metadata['choices'])}."
    if f.type in (bool, "bool") and default_of(f) is True:
        text += f" `--no_{f.name}` turns it off."
    return cell(text)


def section_table(cls) -> list[str]:
    path = Path(inspect.getfile(cls)).relative_to(Path(recipe.__file__).parents[1]).as_posix()
    lines = [f"## {TITLES.get(cls.__name__, cls.__name__)} (`{cls.__name__}`, {path})", "",
             "| option | type | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.init:
            lines.append(f"| `{f.name}` | `{cell(f.type if isinstance(f.type, str) else f.type.__name__)}` "
                         f"| {as_yaml(default_of(f))} | {help_of(f)} |")
    return lines + [""]


def default_reasons() -> dict[str, str]:
    """The comment on each TRAINING_DEFAULTS key's line, or the comment lines right above it; under "" the comment
    above the dict itself (the reason for all of them)."""
    source = inspect.getsource(options)
    comments = {token.start[0]: token.string.lstrip("# ").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()

    def above(number: int) -> str:  # the run of whole-line comments just above line `number`
        found = []
        while number - 1 in comments and lines[number - 2].lstrip().startswith("#"):
            number -= 1
            found.insert(0, comments[number])
        return " ".join(found)

    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TRAINING_DEFAULTS" for t in node.targets):
            reasons = {"": above(node.lineno)}
            for key in node.value.keys:
                reasons[key.value] = comments.get(key.lineno) or above(key.lineno)
            return reasons
    raise SystemExit("TRAINING_DEFAULTS not found in hf_transfer/options.py")


def training_tables() -> list[str]:
    trainer_fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    reasons = default_reasons()
    lines = ["## TrainingArguments defaults hf_transfer changes (`TRAINING_DEFAULTS`, hf_transfer/options.py)", "",
             *prose("Every `transformers.TrainingArguments` field is a recipe key (`hf-transfer train --help-all` lists them all, "
                    "with Trainer's defaults). These start from other values. " + reasons[""]),
             "| option | Trainer's default | hf_transfer's default | why |", "|---|---|---|---|"]
    for name, value in options.TRAINING_DEFAULTS.items():
        lines.append(f"| `{name}` | {as_yaml(default_of(trainer_fields[name]))} | {as_yaml(value)} | {cell(reasons.get(name) or '-')} |")
    on_cuda = recipe.device_defaults("cuda", cpu_count=8)
    lines += [""] + prose("On a CUDA device, also " + ", ".join(f"`{name}`" for name in on_cuda)
                          + " (`device_defaults`, hf_transfer/recipe.py): " + inspect.getdoc(recipe.device_defaults))
    redefined = [f for f in dataclasses.fields(HfTransferTrainingArguments)
                 if f.name in trainer_fields and (f.metadata, default_of(f)) != (trainer_fields[f.name].metadata, default_of(trainer_fields[f.name]))]
    if redefined:
        lines += ["## TrainingArguments fields hf_transfer extends (`HfTransferTrainingArguments`, hf_transfer/options.py)", "",
                  "| option | type | default | what it does |", "|---|---|---|---|"]
        lines += [f"| `{f.name}` | `{cell(f.type if isinstance(f.type, str) else f.type.__name__)}` | {as_yaml(default_of(f))} "
                  f"| {help_of(f)} |" for f in redefined]
        lines.append("")
    return lines


def render() -> str:
    lines = ["# Options", "",
             f"<!-- Generated from the argument dataclasses' help by `{COMMAND}`: edit the help there, then rerun it. -->", "",
             *prose("Every option is a recipe key (`key: value` in the YAML file) and a command-line flag (`--key value`, which "
                    "wins over the recipe). `hf-transfer train --help` prints the hf_transfer sections below; `--help-all` adds "
                    "every `TrainingArguments` field. Generated by `" + COMMAND + "` from the help text of the fields; "
                    "`tests/test_docs.py` fails when this page and `--help-all` list different options.")]
    for cls in options.ARGUMENT_CLASSES:
        if not issubclass(cls, TrainingArguments):
            lines += section_table(cls)
    lines += training_tables()
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--stdout" in sys.argv[1:]:
        sys.stdout.write(text)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")
