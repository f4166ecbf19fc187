"""The `hf-transfer` command: train, push, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import datasets
import transformers
from transformers import HfArgumentParser

from .data import DataArguments, DatasetError
from .freezing import FreezeArguments
from .images import UnreadableImageError
from .models import ModelArguments, ModelNotAvailableError
from .recipe import TRAINING_DEFAULTS, RecipeError, RunArguments, parse_recipe, parser
from .training import NonFiniteLossError, OutputDirError, run

# Errors whose message already says what to do: shown without a traceback (HF_TRANSFER_DEBUG=1 shows it).
USER_ERRORS = (RecipeError, DatasetError, ModelNotAvailableError, UnreadableImageError, OutputDirError, NonFiniteLossError)

TRAIN_USAGE = """usage: hf-transfer train RECIPE.yaml [--key value ...]

Fine-tune a pretrained image classifier. RECIPE.yaml sets any option below and any
transformers.TrainingArguments field; `--key value` on the command line wins over the recipe.
Multi-GPU / mixed precision: accelerate launch [--multi_gpu --num_processes N] [--mixed_precision bf16] recipes/finetune.py RECIPE.yaml

Defaults that differ from Trainer's: {defaults}
Every TrainingArguments option works too (--num_train_epochs, --learning_rate, --output_dir, --bf16, ...):
see `hf-transfer train --help-all`.
"""


def setup_logging(main_process: bool) -> None:
    # Our own steps at INFO; the libraries' INFO chatter (config saved, cache found...) stays quiet.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger("hf_transfer").setLevel(logging.INFO if main_process else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()


def _exit_on_user_error(function, *args):
    try:
        return function(*args)
    except USER_ERRORS as error:
        if os.environ.get("HF_TRANSFER_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def run_training(argv: list[str] | None = None) -> dict:
    """`recipes/finetune.py` and `hf-transfer train`: parse the recipe and run the flow."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        parser().print_help()
        sys.exit(0)
    if not argv or "-h" in argv or "--help" in argv:
        print(TRAIN_USAGE.format(defaults=", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items())))
        HfArgumentParser((DataArguments, ModelArguments, FreezeArguments, RunArguments)).print_help()
        sys.exit(0 if argv else 2)
    recipe = _exit_on_user_error(parse_recipe, argv)
    setup_logging(recipe.training.process_index == 0)
    return _exit_on_user_error(run, recipe)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = argparse.ArgumentParser(
        prog="hf-transfer",
        description="Transfer learning for image classification with the Hugging Face stack.",
        epilog="Run `hf-transfer <command> --help` for the options of a command.",
    )
    sub = commands.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="fine-tune a backbone from a recipe (recipes/quickstart.yaml)", add_help=False)
    if argv[:1] == ["train"]:
        run_training(argv[1:])
        return
    commands.parse_args(argv)


if __name__ == "__main__":
    main()
