"""The `hf-transfer` command: select, train, doctor, export, predict, push, demo."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from .errors import HFTransferError
from .images import UnreadableImageError

# torch, transformers and datasets load only in the commands that need them: `push --help` and `demo --help` answer at once.

# Errors whose message already says what to do: shown without a traceback (HF_TRANSFER_DEBUG=1 shows it).
# images.py is shipped alone to Spaces, so its error cannot derive from HFTransferError.
USER_ERRORS = (HFTransferError, UnreadableImageError)

TRAIN_USAGE = """usage: hf-transfer train RECIPE.yaml [--key value ...]

Fine-tune a pretrained image classifier. RECIPE.yaml sets any option below and any
transformers.TrainingArguments field; `--key value` on the command line wins over the recipe.
Multi-GPU / mixed precision: accelerate launch [--multi_gpu --num_processes N] [--mixed_precision bf16] recipes/finetune.py RECIPE.yaml

Defaults that differ from Trainer's: {defaults}
Every TrainingArguments option works too (--num_train_epochs, --learning_rate, --output_dir, --bf16, ...):
see `hf-transfer train --help-all`. The ones that shape training most:
  --optim NAME            the optimizer, as Trainer builds it (adamw_torch, sgd, adafactor, adagrad, rmsprop, ...),
                          over the freeze plan's per-block parameter groups; --optim_args momentum=0.9 for SGD
  --lr_scheduler_type T   Trainer's schedules (linear, cosine, constant, ...) or `step`: lr x gamma every step_size
                          epochs, --lr_scheduler_kwargs '{{"step_size": 2, "gamma": 0.1}}'; --warmup_steps applies to all
  --metric_for_best_model the validation metric that chooses the best checkpoint, `at_plateau` stages and early stopping
"""


def setup_logging(main_process: bool) -> None:
    import datasets
    import transformers

    # Our own steps at INFO; the libraries' INFO chatter (config saved, cache found...) stays quiet.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)  # no-op if configured
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
    except KeyboardInterrupt as interrupted:  # Ctrl-C; a run's own message says how to continue (output_dir.RunInterrupted)
        if os.environ.get("HF_TRANSFER_DEBUG"):
            raise
        print(f"error: {interrupted or 'interrupted'}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # End by SIGINT, as Python does on an uncaught Ctrl-C: the shell sees status 130 and also stops the script or
        # loop that ran this command, which a plain exit code would let go on to its next command.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(130)  # only if the signal has not ended the process yet


def _recipe_or_help(argv: list[str], usage: str, sections: tuple):
    """The recipe `argv` gives, with logging set up for this process; with no arguments or -h/--help, `usage` and the
    options of `sections`, then exit (2 when nothing was given)."""
    from transformers import HfArgumentParser

    from .recipe import parse_recipe

    if not argv or "-h" in argv or "--help" in argv:
        print(usage)
        HfArgumentParser(sections).print_help()
        sys.exit(0 if argv else 2)
    recipe = _exit_on_user_error(parse_recipe, argv)
    setup_logging(recipe.training.process_index == 0)
    return recipe


@contextlib.contextmanager
def command_process(own: bool):
    """Around a command's work in its own process (`own`; never a notebook or test calling in).

    Before: the objects of the modules loaded so far (torch, transformers, datasets...) live as long as the process, so
    they leave the cyclic collector (`gc.freeze`), which then no longer walks them in each full collection nor once more
    at exit. A warm rerun's exit went from 6.0 s to 1.3 s on 2 loaded cores (benchmarks/results/warm_rerun.md); forked
    loader workers share their pages for longer.

    After the work succeeded: the process group of an `accelerate launch` run is destroyed while the interpreter is
    whole. Left to the interpreter's exit, gloo's worker threads still held tensors as Python finalised, and the process
    aborted (SIGABRT) after its work was done: 7 of 12 two-process runs of a script of 20 all-reduces did, 0 of 12 with
    the group destroyed, and a two-machine test run did once. Not after an error: a process still waiting in a
    collective would hang the teardown."""
    if own:
        gc.freeze()
    yield
    distributed = sys.modules.get("torch.distributed")  # no torch loaded (push, demo): no group to end
    if own and distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def run_training(argv: list[str] | None = None, own_process: bool | None = None) -> dict:
    """`recipes/finetune.py` and `hf-transfer train`: parse the recipe and run the flow. `own_process`: this process
    is the command's (default: when `argv` is None, read from the command line)."""
    from .options import TRAINING_DEFAULTS, DataArguments, DoctorArguments, FreezeArguments, ModelArguments, RunArguments

    own_process = argv is None if own_process is None else own_process
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        from .recipe import parser

        parser().print_help()
        sys.exit(0)
    usage = TRAIN_USAGE.format(defaults=", ".join(f"{k}={v}" for k, v in TRAINING_DEFAULTS.items()))
    recipe = _recipe_or_help(argv, usage, (DataArguments, ModelArguments, FreezeArguments, RunArguments, DoctorArguments))
    from .hub import share_run  # the training stack loads once the recipe is read: `--help` answers without it
    from .pipeline import run

    with command_process(own_process):
        results = _exit_on_user_error(run, recipe)
        _exit_on_user_error(share_run, recipe.training)
    return results


def push_command(args: argparse.Namespace) -> None:
    from .hub import share

    share(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
          commit_message=args.commit_message, verify=args.verify, space=args.space)


DOCTOR_USAGE = """usage: hf-transfer doctor RECIPE.yaml [--key value ...]

Check a recipe's data before training, on the backbone's features (read from the feature cache, or extracted into it):
images whose label is likely wrong (cleanlab on out-of-fold probe probabilities), copies (cosine similarity of the
features, and a perceptual hash that colour mode and re-encoding barely move) grouped into near-duplicates within a
split, leaks across splits and copies with different labels, and images per class per split. Writes data_report.json and
data_suspects.png (the top suspects) to --output_dir, and prints a summary. Same recipe and options as `hf-transfer train`;
a training run whose features are cached runs the same check first (`data_doctor: false` turns it off). Into a run's
folder only with the options that run used: its model card describes the report there.
"""


def doctor_command(argv: list[str], own_process: bool = False) -> dict:
    """`hf-transfer doctor RECIPE.yaml [--key value ...]`."""
    from .options import DoctorArguments
    from .pipeline import run_doctor

    recipe = _recipe_or_help(argv, DOCTOR_USAGE, (DoctorArguments,))
    with command_process(own_process):
        return _exit_on_user_error(run_doctor, recipe)


SELECT_USAGE = """usage: hf-transfer select RECIPE.yaml [--candidates id,id,...] [--sample N] [--prefer best|fast] [--max_seconds S]
                          [--output_dir D] [--key value ...]

Rank pretrained backbones on the recipe's own data before training: on a stratified, seeded sample of its train split (and
of its validation split), each candidate's frozen features (through the feature cache a `train` run reads, so training the
winner's `head_only` recipe starts warm) get a LogME score and an out-of-fold linear-probe accuracy with its 95% interval;
the forward pass is timed on this machine. A random initialisation of the best shows what pretraining buys. Writes
selection.json, selection.md, selection.png and recipe.selected.yaml (the recipe with the chosen `model`) to --output_dir.
Any other `--key value` is a recipe option, as for `hf-transfer train`.
"""


def split_select_argv(argv: list[str]):
    """`(SelectArguments, the recipe's argv)` from `hf-transfer select`'s arguments."""
    from transformers import HfArgumentParser

    from .errors import RecipeError
    from .select_options import SelectArguments

    recipe = argv[:1] if argv and not argv[0].startswith("-") else []
    try:
        options, rest = HfArgumentParser((SelectArguments,), allow_abbrev=False, exit_on_error=False).parse_args_into_dataclasses(
            argv[len(recipe):], return_remaining_strings=True)
    except argparse.ArgumentError as error:
        raise RecipeError(f"Option `{(error.argument_name or '').lstrip('-')}`: {error.message.rstrip('.')}.") from None
    return options, [*recipe, *rest]


def select_command(argv: list[str]) -> dict:
    """`hf-transfer select RECIPE.yaml [--candidates ...] [--sample N] [--prefer best|fast] [--max_seconds S] ...`."""
    from .select_options import SelectArguments

    if not argv or "-h" in argv or "--help" in argv:
        _recipe_or_help(argv, SELECT_USAGE, (SelectArguments,))  # prints the help and exits
    options, recipe_argv = _exit_on_user_error(split_select_argv, argv)
    recipe = _recipe_or_help(recipe_argv, SELECT_USAGE, ())
    from .selection import run_select

    return _exit_on_user_error(run_select, recipe, options)


EXPORT_HELP = """Write the model folder's classifier as ONNX graphs into its onnx/ folder (onnx/model.onnx; with --int8 also
onnx/model_quantized.onnx), check each against the PyTorch model on the run's test split (top-1 agreement, largest logit
difference, accuracy), time them, and record it all in onnx/export_report.json and the model card's "Deployment" section."""

PREDICT_HELP = """Label images with a model folder or Hub model: batched, with a decode pool, into a CSV or parquet file (one row per
image: its path or index, the top-k labels and scores, the true label where the input has one, or why it could not be read).
Accuracy and a confusion matrix are printed when the images have true labels. An interrupted run continues with --resume."""


def _deploy_arguments(name: str, help_text: str, options: type, argv: list[str]):
    """The options of `hf-transfer export` or `predict` from `argv`, with logging set up."""
    from .deploy_options import command_parser, parse_options

    args = _exit_on_user_error(parse_options, command_parser(f"hf-transfer {name}", help_text, options), options, argv)
    setup_logging(True)
    return args


def export_command(argv: list[str]) -> dict:
    """`hf-transfer export <model folder> [--int8] [--opset N] ...`."""
    from .deploy_options import ExportArguments

    args = _deploy_arguments("export", EXPORT_HELP, ExportArguments, argv)
    from .export import export_model  # torch loads once the options are read: `--help` answers without it

    return _exit_on_user_error(export_model, args)


def predict_command(argv: list[str]) -> dict:
    """`hf-transfer predict <model> <images> [--output predictions.csv] [--top_k K] [--backend torch|onnx|onnx-int8] ...`."""
    from .deploy_options import PredictArguments

    args = _deploy_arguments("predict", PREDICT_HELP, PredictArguments, argv)
    from .predict import predict

    return _exit_on_user_error(predict, args)


def demo_command(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.model, examples_dir=args.examples, port=args.port, top_k=args.top_k)


def main(argv: list[str] | None = None) -> None:
    """The `hf-transfer` command; `argv` None: the command line, in the command's own process."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = argparse.ArgumentParser(
        prog="hf-transfer",
        description="Transfer learning for image classification with the Hugging Face stack.",
        epilog="Run `hf-transfer <command> --help` for the options of a command.",
    )
    sub = commands.add_subparsers(dest="command", required=True)
    sub.add_parser("select", help="rank pretrained backbones on a recipe's data before training; writes recipe.selected.yaml",
                   add_help=False)
    sub.add_parser("train", help="fine-tune a backbone from a recipe (recipes/quickstart.yaml)", add_help=False)
    sub.add_parser("doctor", help="check a recipe's data: likely wrong labels, near-duplicates and leaks, class balance", add_help=False)

    sub.add_parser("export", help="write the model as checked ONNX graphs (fp32, --int8) into its onnx/ folder", add_help=False)
    sub.add_parser("predict", help="label a folder, glob, parquet file, dataset or list of images into a CSV or parquet file",
                   add_help=False)

    push = sub.add_parser("push", help="upload a trained output dir to the Hub with its model card, and verify it")
    push.add_argument("output_dir", help="a folder written by `hf-transfer train`")
    push.add_argument("--repo-id", required=True, help="user/name or org/name of the model repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created from main if missing)")
    push.add_argument("--commit-message", help="message of the upload commit")
    push.add_argument("--space", help="also create or update this Gradio Space (user/name) with the demo, pinned to the model")
    push.add_argument("--no-verify", dest="verify", action="store_false",
                      help="skip downloading the pushed repo into a fresh cache and comparing its predictions")
    push.set_defaults(handler=push_command)

    demo = sub.add_parser("demo", help="try a model in the browser (Gradio, on 127.0.0.1)")
    demo.add_argument("model", help="an output dir or a Hub model id")
    demo.add_argument("--examples", type=Path, help="folder of example images (default: a few from the run's test split)")
    demo.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 7860 or the next free one)")
    demo.add_argument("--top-k", type=int, default=5, help="how many labels to show")
    demo.set_defaults(handler=demo_command)

    # The commands that read their own options (a recipe's, or a dataclass's) take the rest of the command line.
    own_options = {"train": lambda rest: run_training(rest, own_process), "doctor": lambda rest: doctor_command(rest, own_process),
                   "select": select_command, "export": export_command, "predict": predict_command}
    if argv and argv[0] in own_options:
        own_options[argv[0]](argv[1:])
        return
    args = commands.parse_args(argv)
    _exit_on_user_error(args.handler, args)


if __name__ == "__main__":
    main()
