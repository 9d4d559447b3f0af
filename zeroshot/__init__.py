"""Zero-shot evaluation through clip_benchmark: ``python -m zeroshot``, the same as ``crate-alpha zeroshot``.

The code lives in ``crate_alpha.clip.zeroshot``.
"""
