"""Command-line data pipeline: ``python -m data_pipeline download|verify|demo|bench``.

The reusable code lives in ``crate_alpha.data``; this package is the command line.
"""
