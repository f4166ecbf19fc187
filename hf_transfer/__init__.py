"""Transfer learning for image classification with the Hugging Face stack.

    from hf_transfer import finetune
    results = finetune("recipes/quickstart.yaml", num_train_epochs=3, output_dir="outputs/mine")
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Threads of torch's CPU thread pool sleep when they run out of work instead of spinning (libgomp reads this once, when
# torch loads, so it is set before any import of torch; a value already set wins). On a 2-core CPU shared with other
# jobs, spinning threads hold the cores the working ones need: Lite0's bf16 forward went from 21 to 71 images/s, and
# feature extraction from 16 to 66 (medians of 4 alternating rounds at load average 4-5.6, benchmarks/results/extraction.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
