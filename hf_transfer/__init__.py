"""Transfer learning for image classification with the Hugging Face stack.

    from hf_transfer import finetune
    results = finetune("recipes/quickstart.yaml", num_train_epochs=3, output_dir="outputs/mine")
"""

from __future__ import annotations

__version__ = "0.1.0"


def finetune(recipe: str | None = None, **options) -> dict:
    """Run a recipe (a YAML path), with any recipe key overridden by keyword; returns all results."""
    from .cli import setup_logging
    from .hub import share_run
    from .recipe import parse_recipe
    from .training import run

    parsed = parse_recipe([recipe] if recipe else [], **options)
    setup_logging(parsed.training.process_index == 0)  # the freeze plan table and the run's steps, as the CLI shows them
    results = run(parsed)
    share_run(parsed.training)
    return results
