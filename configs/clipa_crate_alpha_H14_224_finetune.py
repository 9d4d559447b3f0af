"""CRATE-α-CLIPA-H/14 fine-tuning at 224 px from the 84 px pre-training.

The L/14 fine-tuning recipe with the H/14 tower. Loader sizing: 485 GFLOP forward per
sample at 224 px, ~2 TFLOP per training sample: ~200 samples/s on an H100, where a full
256 px decode (~450 µs) and crop keep one core at ~1,000 samples/s, so 2 workers suffice.
"""
from crate_alpha.configs.clipa_crate_alpha_L14_224_finetune import get_config as l14


def get_config(arg=None):
    config = l14(arg)
    if not arg:
        config.update(model="crate-alpha-CLIPA-H-14", workers=2,
                      init_from="runs/clipa-h/clipa_crate_alpha_H14_84_pretrain/checkpoints/epoch_latest.pt",
                      logs="runs/clipa-h")
    return config
