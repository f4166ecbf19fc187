"""Every bad recipe and invocation of tests/bad_recipes.py stops `hf-transfer train` with its one-line error, before any
data or model loads; recipes that only look unusual (anchors, aliases, merge keys) still run."""

from __future__ import annotations

import time

import pytest
from bad_recipes import CASES, alias_bomb
from conftest import REPO, SAMPLE, user_error

from hf_transfer.errors import RecipeError
from hf_transfer.recipe import load_yaml, parse_recipe

pytestmark = pytest.mark.usefixtures("offline_hub")


def test_corpus_names_are_unique():
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_recipe_gives_its_one_line_error(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output_dir, outputs/run, is relative: it would appear here
    dataset = str(tmp_path / "never_loaded")
    argv = [arg.replace("$DATASET", dataset) for arg in case.args]
    recipe = tmp_path / "recipe.yaml"
    if case.recipe is not None:
        text = case.recipe.replace("$DATASET", dataset).encode() if isinstance(case.recipe, str) else case.recipe
        recipe.write_bytes(text)
        argv.insert(0, str(recipe))
    message = user_error(capsys, *argv)
    for phrase in case.expected:
        assert phrase.replace("$RECIPE", str(recipe)) in message
    assert [path.name for path in tmp_path.iterdir()] == (["recipe.yaml"] if case.recipe is not None else [])


def test_alias_bomb_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"dataset: {SAMPLE}\nlabel_names:\n{alias_bomb()}")
    assert bomb.stat().st_size < 1000  # and it would expand to 10**9 strings
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than 10,000 values"):
        load_yaml(bomb)
    assert time.perf_counter() - start < 5  # milliseconds when refused; expanding 10**9 strings would take minutes


def test_anchors_aliases_and_merge_keys_still_work(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {SAMPLE}\nper_device_train_batch_size: &batch 16\nper_device_eval_batch_size: *batch\n"
                      "freeze:\n  strategy: staged\n  stages:\n    - &head {at_epoch: 0, train: head}\n"
                      "    - {<<: *head, at_epoch: 1, train: all}\n")
    parsed = parse_recipe([str(recipe)])
    assert parsed.training.per_device_train_batch_size == parsed.training.per_device_eval_batch_size == 16
    assert [(stage["at_epoch"], stage["train"]) for stage in parsed.freezing.stages] == [(0, "head"), (1, "all")]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_recipes_pass_every_check(recipe):
    assert parse_recipe([str(recipe), "--dataset", str(SAMPLE)]).data.dataset == str(SAMPLE)


def test_values_that_only_look_out_of_range_are_accepted(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {SAMPLE}\nlearning_rate: -1\nnum_train_epochs: 0\nmax_steps: 10\nweight_decay: 0\nwarmup_steps: 0\n")
    parsed = parse_recipe([str(recipe), "--learning_rate", "0.01"])  # the command line replaces the recipe's bad value
    assert (parsed.training.learning_rate, parsed.training.num_train_epochs, parsed.training.max_steps) == (0.01, 0, 10)


def test_python_keyword_options_are_checked_too():
    with pytest.raises(RecipeError, match="Option `per_device_train_batch_size`: 0 is out of range"):
        parse_recipe(["--dataset", str(SAMPLE)], per_device_train_batch_size=0)
    with pytest.raises(RecipeError, match="`model: \\['a'\\]` has the wrong type"):
        parse_recipe(["--dataset", str(SAMPLE)], model=["a"])
