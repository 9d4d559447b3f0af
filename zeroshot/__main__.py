"""``python -m zeroshot eval|imagenet|table``: ``crate-alpha zeroshot ...``."""
import sys

from crate_alpha.cli import main

sys.exit(main(["zeroshot", *sys.argv[1:]], prog="python -m zeroshot"))
