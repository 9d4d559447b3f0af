"""``python -m data_pipeline download|verify|demo|bench``: ``crate-alpha data ...``."""
import sys

from crate_alpha.cli import main

sys.exit(main(["data", *sys.argv[1:]], prog="python -m data_pipeline"))
