"""Supervised classification with CRATE-α: IN-21K pre-training, IN-1K fine-tuning, evaluation."""
