"""The data pipeline's command line: ``python -m data_pipeline``, the same as ``crate-alpha data``.

The code lives in ``crate_alpha.data``.
"""
