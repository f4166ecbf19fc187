"""Transfer learning for image classification with the Hugging Face stack.

    from hf_transfer import finetune
    results = finetune("recipes/quickstart.yaml", num_train_epochs=3, output_dir="outputs/mine")

    from hf_transfer import select
    selection = select("recipes/cifar10.yaml", sample=2000, output_dir="outputs/select")  # before training: which backbone
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Threads of torch's CPU thread pool sleep when they run out of work instead of spinning (libgomp reads this once, when
# torch loads, so it is set before any import of torch; a value already set wins). On a 2-core CPU shared with other
# jobs, spinning threads hold the cores the working ones need: Lite0's bf16 forward went from 21 to 71 images/s, and
# feature extraction from 16 to 66 (medians of 4 alternating rounds at load average 4-5.6, benchmarks/results/extraction.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch's CPU tensors of 2 MB and more on transparent huge pages (c10 reads this at its first allocation). A batch's
# activations (128 images at 224 px: ~100 MB per bf16 tensor) are each a fresh mmap, faulted in 4 KB at a time: 830,000
# page faults per batch. On huge pages, 27,000: Lite0's forward without gradients (extraction, evaluation, test,
# predict) went from 86 to 193 images/s; training steps at 128 px were unchanged within the noise; memory +8%
# (benchmarks/results/huge_pages.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def select(recipe: str | None = None, candidates: str | list[str] | None = None, sample: int = 2000, prefer: str = "best",
           max_seconds: float | None = None, output_dir: str = "outputs/select", **options) -> dict:
    """`hf-transfer select`: rank pretrained backbones on a recipe's data (any recipe key overridden by keyword), write
    selection.json, selection.md, selection.png and recipe.selected.yaml into `output_dir`; returns selection.json's dict."""
    from .cli import setup_logging
    from .recipe import parse_recipe
    from .select_options import SelectArguments
    from .selection import run_select

    parsed = parse_recipe([recipe] if recipe else [], **options)
    setup_logging(parsed.training.process_index == 0)
    names = ",".join(candidates) if isinstance(candidates, (list, tuple)) else candidates
    return run_select(parsed, SelectArguments(names, sample, prefer, max_seconds, output_dir))


def finetune(recipe: str | None = None, **options) -> dict:
    """Run a recipe (a YAML path), with any recipe key overridden by keyword; returns all results."""
    from .cli import setup_logging
    from .hub import share_run
    from .pipeline import run
    from .recipe import parse_recipe

    parsed = parse_recipe([recipe] if recipe else [], **options)
    setup_logging(parsed.training.process_index == 0)  # the freeze plan table and the run's steps, as the CLI shows them
    results = run(parsed)
    share_run(parsed.training)
    return results
