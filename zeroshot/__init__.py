"""Zero-shot evaluation of CRATE-α CLIP models through clip_benchmark (``python -m zeroshot``)."""
