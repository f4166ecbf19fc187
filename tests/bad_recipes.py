"""A corpus of bad recipes and invocations of `hf-transfer train`, each with the one-line error it must give.

Every case is refused while the recipe and options are read: `$DATASET` stands for a dataset folder that does not
exist, so a case that got as far as loading data would end with that folder's error instead of its own.
`$RECIPE` in a recipe or an expected phrase stands for the recipe file's path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    expected: tuple[str, ...]  # phrases the one `error: ...` line must contain: the problem, the key, the fix
    recipe: str | bytes | None = None  # the recipe file's contents; None: options only
    args: tuple[str, ...] = ()  # command-line arguments after the recipe


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """The 'billion laughs', a YAML list: each item repeats the one before `width` times: 10**9 strings in 513 bytes."""
    lines = [f"- &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"- &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


DATASET = "dataset: $DATASET\n"
STAGES = "    - {at_epoch: 0, train: head}\n    - {at_epoch: 1, train: all}\n"
OUT_OF_RANGE = "Fix it in the recipe or on the command line"

CASES = [
    # --- keys that do not exist
    Case("misspelt_key", ("Unknown recipe key `num_train_epoch` in $RECIPE.", "Did you mean `num_train_epochs`?"),
         DATASET + "num_train_epoch: 3\n"),
    Case("misspelt_option", ("Unknown option `--learning_rat`.", "Did you mean `learning_rate`?"),
         args=("--dataset", "$DATASET", "--learning_rat", "0.1")),
    Case("misspelt_freeze_key", ("Unknown key(s) ['stage'] under `freeze:`", "Did you mean `stages`?"),
         DATASET + "freeze:\n  strategy: staged\n  stage:\n" + STAGES),
    Case("misspelt_patterns_key", ("Unknown key(s) ['froze'] under `freeze.patterns:`", "Did you mean `freeze`?", "train, freeze"),
         DATASET + "freeze:\n  strategy: patterns\n  patterns:\n    train: ['*.blocks.5.*']\n    froze: ['*stem*']\n"),
    Case("patterns_not_a_mapping", ("`freeze.patterns` must be a mapping", "patterns: {train: ['*.blocks.5.*'], freeze: ['*stem*']}"),
         DATASET + "freeze:\n  strategy: patterns\n  patterns: ['*stem*']\n"),
    Case("pattern_not_a_string", ("`train_patterns` must be a list of globs over parameter names", "{'blocks': 5}"),
         DATASET + "freeze:\n  strategy: patterns\n  patterns: {train: [{blocks: 5}]}\n"),
    Case("key_not_a_string", ("Unknown recipe key `1` in $RECIPE.",), DATASET + "1: one\n"),
    Case("not_a_mapping", ("Recipe '$RECIPE' must be a mapping of `key: value` lines.",), "- dataset\n- model\n"),
    Case("recipe_missing", ("not found", "Pass a YAML file"), args=("no_such_recipe.yaml",)),
    # --- a list, mapping or nothing where one value belongs
    Case("list_for_dataset", ("`dataset: ['a', 'b']` has the wrong type: `dataset` takes a single value, not a list",),
         "dataset: [a, b]\n"),
    Case("list_for_model", ("`model: ['x']` has the wrong type: `model` takes a single value, not a list",
                            "e.g. `model: timm/tf_efficientnet_lite0.in1k`"), DATASET + "model: [x]\n"),
    Case("mapping_for_output_dir", ("`output_dir: {'a': 1}` has the wrong type", "not a mapping", "e.g. `output_dir: outputs/run`"),
         DATASET + "output_dir: {a: 1}\n"),
    Case("list_for_freeze", ("`freeze: ['head_only', 'full']` has the wrong type", "e.g. `freeze: head_only`"),
         DATASET + "freeze: [head_only, full]\n"),
    Case("list_for_number", ("`learning_rate: [0.1, 0.01]` has the wrong type: `learning_rate` takes a single value",),
         DATASET + "learning_rate: [0.1, 0.01]\n"),
    Case("empty_number", ("`learning_rate` is empty", "e.g. `learning_rate: 0.001`", "or delete the line"), DATASET + "learning_rate:\n"),
    Case("empty_freeze", ("`freeze` is empty", "e.g. `freeze: head_only`"), DATASET + "freeze:\n"),
    Case("empty_model", ("`model` is empty", "e.g. `model: timm/tf_efficientnet_lite0.in1k`"), DATASET + "model:\n"),
    # --- a value of the wrong type
    Case("word_for_number", ("Option `num_train_epochs`: invalid float value: 'three'", OUT_OF_RANGE),
         DATASET + "num_train_epochs: three\n"),
    Case("word_for_bool", ("Option `pretrained`: Truthy value expected: got maybe",), DATASET + "pretrained: maybe\n"),
    Case("word_for_int_option", ("Option `per_device_train_batch_size`: invalid int value: 'big'",),
         args=("--dataset", "$DATASET", "--per_device_train_batch_size", "big")),
    Case("unknown_choice", ("sometimes is not a valid IntervalStrategy",), DATASET + "eval_strategy: sometimes\n"),
    # --- numbers that would train nothing, or not what was asked
    Case("negative_learning_rate", ("Option `learning_rate`: -1 is out of range", "give a number > 0, e.g. 1e-3", OUT_OF_RANGE),
         DATASET + "learning_rate: -1\n"),
    Case("zero_learning_rate", ("Option `learning_rate`: 0 is out of range", "0 or less trains nothing"), DATASET + "learning_rate: 0\n"),
    Case("nan_learning_rate", ("Option `learning_rate`: nan is out of range",), args=("--dataset", "$DATASET", "--learning_rate", "nan")),
    Case("zero_epochs", ("`num_train_epochs: 0` trains nothing", "give a number of epochs > 0, e.g. 3", "`max_steps`"),
         DATASET + "num_train_epochs: 0\n"),
    Case("negative_epochs", ("Option `num_train_epochs`: -2 is out of range", "give a number of epochs > 0, e.g. 3"),
         args=("--dataset", "$DATASET", "--num_train_epochs", "-2")),
    Case("zero_train_batch", ("Option `per_device_train_batch_size`: 0 is out of range", "give a batch size >= 1, e.g. 32"),
         DATASET + "per_device_train_batch_size: 0\n"),
    Case("negative_eval_batch", ("Option `per_device_eval_batch_size`: -1 is out of range", "give a batch size >= 1"),
         DATASET + "per_device_eval_batch_size: -1\n"),
    Case("zero_max_steps", ("Option `max_steps`: 0 is out of range", "-1 to train for `num_train_epochs`", "silently ignore"),
         DATASET + "max_steps: 0\n"),
    Case("negative_max_steps", ("Option `max_steps`: -5 is out of range",), args=("--dataset", "$DATASET", "--max_steps", "-5")),
    Case("zero_accumulation", ("Option `gradient_accumulation_steps`: 0 is out of range", "1 = no accumulation"),
         DATASET + "gradient_accumulation_steps: 0\n"),
    Case("negative_weight_decay", ("Option `weight_decay`: -0.1 is out of range", "give a number >= 0, e.g. 0.01"),
         DATASET + "weight_decay: -0.1\n"),
    Case("negative_warmup", ("Option `warmup_steps`: -1 is out of range", "a fraction of the training steps below 1"),
         DATASET + "warmup_steps: -1\n"),
    Case("negative_warmup_option", ("Option `warmup_steps`: -5 is out of range",), args=("--dataset", "$DATASET", "--warmup_steps", "-5")),
    Case("negative_option_with_equals", ("Option `learning_rate`: -0.5 is out of range",), DATASET, args=("--learning_rate=-0.5",)),
    # --- options that contradict each other
    Case("resume_and_overwrite", ("`--resume` and `--overwrite` cannot go together", "`--resume` continues the run in outputs/run",
                                  "`--overwrite` deletes that run to start a new one", "Pass one of them"),
         args=("--dataset", "$DATASET", "--resume", "true", "--overwrite", "true")),
    Case("resume_and_overwrite_in_recipe", ("`--resume` and `--overwrite` cannot go together",),
         DATASET + "resume: true\noverwrite: true\n"),
    # --- YAML that says one thing twice, or far too much
    Case("duplicate_key", ("Recipe $RECIPE sets `learning_rate` twice (lines 2 and 4)", "keep only the last", "Delete all but one"),
         DATASET + "learning_rate: 0.1\nseed: 1\nlearning_rate: 0.2\n"),
    Case("duplicate_key_three_times", ("sets `seed` 3 times (lines 2, 3 and 4)",), DATASET + "seed: 1\nseed: 2\nseed: 3\n"),
    Case("duplicate_nested_key", ("sets `freeze.patterns.train` twice (lines 5 and 6)",),
         DATASET + "freeze:\n  strategy: patterns\n  patterns:\n    train: ['*.blocks.5.*']\n    train: ['*.blocks.6.*']\n"),
    Case("duplicate_key_in_a_stage", ("sets `freeze.stages[1].train` twice (line:column 6:21 and 6:33)",),
         DATASET + "freeze:\n  strategy: staged\n  stages:\n    - {at_epoch: 0, train: head}\n"
         "    - {at_epoch: 1, train: all, train: head}\n"),
    Case("duplicate_key_in_stages_option", ("`stages` sets `[0].at_epoch` twice",),
         args=("--dataset", "$DATASET", "--freeze", "staged", "--stages", "[{at_epoch: 0, at_epoch: 1, train: head}]")),
    Case("alias_bomb", ("Recipe $RECIPE expands to more than 10,000 values", "at line 6 (`label_names[3]`)", "through aliases (*name)",
                        "Write the values out"), DATASET + "label_names:\n" + alias_bomb()),
    Case("alias_bomb_in_stages_option", ("`stages` expands to more than 10,000 values",),
         args=("--dataset", "$DATASET", "--freeze", "staged", "--stages", alias_bomb())),
    Case("recursive_alias", ("alias *a at line 2 repeats the block that contains it", "which never ends"),
         DATASET + "label_names: &a [x, *a]\n"),
    Case("too_deep", ("Recipe $RECIPE nests deeper than 32 levels at line 2", "Flatten it"),
         DATASET + "label_names: " + "[" * 200 + "]" * 200 + "\n"),
    Case("too_big", ("Recipe $RECIPE is 1,1", "bytes: a recipe is a few KB", "not a data file"), DATASET + "# " + "x" * 1_100_000 + "\n"),
    # --- not YAML at all
    Case("unclosed_bracket", ("Recipe $RECIPE is not valid YAML: line 3, column 1: expected ',' or ']'", "Fix it there"),
         DATASET + "model: [timm/resnet50\n"),
    Case("tab_indent", ("is not valid YAML: line 2, column 1", "YAML indents with spaces, not tabs"), DATASET + "\tmodel: resnet50\n"),
    Case("two_documents", ("is not valid YAML: line 2, column 1: but found another document", "a recipe is one document: remove the `---`"),
         DATASET + "---\nmodel: resnet50\n"),
    Case("unhashable_key", ("found unhashable key",), DATASET + "[seed]: 1\n"),
    Case("impossible_date", ("holds a value YAML cannot read (day is out of range for month)", "quote it"),
         DATASET + "hub_revision: 2024-02-30\n"),
    Case("control_character", ("holds a control character (#x0000)", "Remove it"), DATASET + "seed: \x00\n"),
    Case("not_utf8", ("Recipe $RECIPE is not UTF-8 text (byte 0 is 0xff)", "saved as UTF-8"), b"\xff\xd8\xff\xe0 a JPEG, not a recipe"),
    Case("bad_stages_option", ("`stages` is not valid YAML: line 1, column 14: expected ',' or '}'",),
         args=("--dataset", "$DATASET", "--freeze", "staged", "--stages", "[{at_epoch: 0")),
    # --- optimizer and schedule options that would be ignored, or fail only once training starts
    Case("optim_args_misspelt_key", ("`optim_args` key `momentun` is not an option of `optim: sgd` (torch.optim.SGD)",
                                     "Did you mean `momentum`?", "It takes momentum, dampening, nesterov"),
         args=("--dataset", "$DATASET", "--optim", "sgd", "--optim_args", "momentun=0.9")),
    Case("optim_args_unknown_key", ("`optim_args` key `bogus_key` is not an option of `optim: sgd`", "It takes momentum"),
         DATASET + "optim: sgd\noptim_args: bogus_key=1\n"),
    Case("optim_args_bad_value", ("`optim_args` `momentum=abc` cannot be used by `optim: sgd`", "could not convert string to float",
                                  "Fix the value of `momentum` in `optim_args`"),
         args=("--dataset", "$DATASET", "--optim", "sgd", "--optim_args", "momentum=abc")),
    Case("optim_args_out_of_range", ("`optim_args` `momentum=-1` cannot be used by `optim: sgd`", "Invalid momentum value"),
         DATASET + "optim: sgd\noptim_args: momentum=-1\n"),
    Case("optim_args_not_pairs", ("`optim_args: '=,=,'`: '=' is not a `key=value` pair", "comma-separated", "`optim: sgd` takes momentum"),
         args=("--dataset", "$DATASET", "--optim", "sgd", "--optim_args", "=,=,")),
    Case("optim_args_set_per_group", ("`optim_args` key `weight_decay` would not take effect", "every parameter group sets its own",
                                      "Set `weight_decay: 0.1` instead"),
         args=("--dataset", "$DATASET", "--optim", "sgd", "--optim_args", "momentum=0.9,weight_decay=0.1")),
    Case("optim_args_for_adamw", ("Trainer passes no `optim_args` to `optim: adamw_torch", "remove `eps` from `optim_args`",
                                  "`adam_epsilon`"),
         args=("--dataset", "$DATASET", "--optim_args", "eps=1e-6")),
    Case("lr_scheduler_kwargs_not_json", ("`lr_scheduler_kwargs` must be a mapping", "not 'not json'", "`lr_scheduler_type: step` takes"),
         args=("--dataset", "$DATASET", "--lr_scheduler_type", "step", "--lr_scheduler_kwargs", "not json")),
    Case("lr_scheduler_kwargs_not_json_cosine", ("`lr_scheduler_kwargs` must be a mapping", "not 'not json'"),
         args=("--dataset", "$DATASET", "--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", "not json")),
    Case("lr_scheduler_kwargs_bad_json", ("`lr_scheduler_kwargs` is not valid JSON", "Expecting property name"),
         args=("--dataset", "$DATASET", "--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", "{bogus")),
    Case("lr_scheduler_kwargs_unknown_key", ("`lr_scheduler_type: cosine` takes `lr_scheduler_kwargs` num_cycles, not `bogus`",),
         args=("--dataset", "$DATASET", "--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"bogus": 1}')),
    Case("lr_scheduler_kwargs_misspelt_in_recipe", ("takes `lr_scheduler_kwargs` lr_end, power, not `powr`", "Did you mean `power`?"),
         DATASET + "lr_scheduler_type: polynomial\nlr_scheduler_kwargs: {powr: 2}\n"),
    Case("lr_scheduler_kwargs_step_misspelt", ("`lr_scheduler_type: step` takes `lr_scheduler_kwargs` step_size, gamma, not `stepsize`",
                                               "Did you mean `step_size`?"),
         DATASET + "lr_scheduler_type: step\nlr_scheduler_kwargs: {stepsize: 2}\n"),
    Case("lr_scheduler_kwargs_for_constant", ("`lr_scheduler_type: constant` takes no `lr_scheduler_kwargs`", "not `num_cycles`"),
         args=("--dataset", "$DATASET", "--lr_scheduler_type", "constant", "--lr_scheduler_kwargs", '{"num_cycles": 1}')),
    Case("lr_scheduler_kwargs_set_by_trainer", ("not `num_warmup_steps`", "set from `warmup_steps`"),
         args=("--dataset", "$DATASET", "--lr_scheduler_kwargs", '{"num_warmup_steps": 5}')),
    Case("lr_scheduler_kwargs_bad_value", ("`lr_scheduler_kwargs` `num_cycles='abc'` cannot be used by `lr_scheduler_type: cosine`",),
         args=("--dataset", "$DATASET", "--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", '{"num_cycles": "abc"}')),
]
