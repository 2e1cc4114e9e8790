"""Training helpers: deterministic batches and the shared fine-tuning recipe."""
