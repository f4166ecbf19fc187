"""Transfer learning for image classification with the Hugging Face stack."""
