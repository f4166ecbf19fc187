"""Fine-tune an image classifier from a recipe: `accelerate launch recipes/finetune.py recipe.yaml [--key value ...]`."""

from hf_transfer.cli import run_training

if __name__ == "__main__":
    run_training()
