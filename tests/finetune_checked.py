"""recipes/finetune.py as the tests launch it: a run that succeeds but leaves its process group alive exits with 3.

Left alive, gloo's worker threads still hold tensors while Python finalises, and the process may abort (SIGABRT) after
its work is done: 7 of 12 two-process runs of a script of 20 all-reduces did. Its other machine then waits 300 s at
torchrun's exit barrier. Checked here, every launched test run fails on it at once, not once in a while."""

import runpy
import sys
from pathlib import Path

import torch.distributed

runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "finetune.py"), run_name="__main__")
if torch.distributed.is_available() and torch.distributed.is_initialized():
    print("error: the run ended with its process group alive (destroy it before exit)", file=sys.stderr, flush=True)
    sys.exit(3)
