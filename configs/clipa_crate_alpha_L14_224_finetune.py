"""CRATE-α-CLIPA-L/14 fine-tuning at 224 px from the 84 px pre-training (512M samples seen).

The pre-training recipe with what the official fine-tuning changes: resolution, starting
weights, length, lr and warm-up. As in the official code, the image position embedding is
re-initialised as 2-D sin-cos at the 16x16 grid (pos_embed_init='sincos');
pos_embed_init='resample' resamples the learned 6x6 grid instead.

Variant ``:demo`` (``make demo``): the 32 px demo CLIP fine-tuned at its full 64 px
resolution, the position grid resampled.
"""
from crate_alpha.configs.clipa_crate_alpha_L14_84_pretrain import get_config as pretraining


def get_config(arg=None):
    config = pretraining(arg)
    if arg == "demo":
        config.update(
            force_image_size=64,
            init_from="runs/demo/crate-alpha_pretrain/checkpoints/epoch_latest.pt",
            pos_embed_init="resample",
            epochs=6,
            warmup_steps=20,
        )
    else:
        config.update(
            force_image_size=224,
            init_from="runs/clipa/clipa_crate_alpha_L14_84_pretrain/checkpoints/epoch_latest.pt",
            pos_embed_init="sincos",
            samples_seen=512_000_000,
            lr_per_256=4e-7,        # 5.12e-5 at 32k
            warmup_steps=800,
        )
    return config
