"""CRATE-α-CLIPA-H/14 pre-training at 84 px: the L/14 recipe with the larger image tower.

Loader sizing: image tower 69.9 GFLOP forward per sample at 84 px, so a step costs ~300
GFLOP per sample (x 4 for forward, backward and checkpoint recompute, + ~19 for the
locked text tower): ~1,300 samples/s on an H100 at 40% of 989 TFLOP/s. At ~1,650 samples/s
per loader core (`make bench-data`) that is 0.8 cores -> 2 workers with headroom, each
keeping 4 batches ready.
"""
from crate_alpha.configs.clipa_crate_alpha_L14_84_pretrain import get_config as l14


def get_config(arg=None):
    config = l14(arg)
    if not arg:
        config.update(model="crate-alpha-CLIPA-H-14", workers=2, prefetch_factor=4, logs="runs/clipa-h")
    return config
