"""CLIPA-style training of CRATE-α CLIP models on open_clip_train."""
