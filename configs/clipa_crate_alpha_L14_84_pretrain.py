"""CRATE-α-CLIPA-L/14 pre-training at 84 px, as in the paper (DataComp-1B, 2.56B samples seen).

Values from the official configs (configs/crate/clipa/84_32_pre_training.py): stated for
a global batch of 32,768; at another batch the trainer scales lr linearly and keeps the
warm-up length in samples. Keys are open_clip_train's flags (wd, grad_clip_norm, ...).

Variant ``:demo`` (``make demo``): the same recipe shrunk to one laptop, a 4-layer x 128
CRATE-α CLIP pre-trained at 32 px on the digits corpus. β2 0.95 and gradient clipping 1.0
matter: with open_clip's defaults (β2 0.98, no clipping) this model's loss stays at
ln(batch).
"""
from crate_alpha.device import bf16_is_fast


def get_config(arg=None):
    config = dict(
        model="crate-alpha-CLIPA-L-14",
        force_image_size=84,
        force_context_length=32,
        train_data=None,            # DataComp-1B shards, e.g. 'datacomp/{00000000..00139999}.tar'
        global_batch=32768,
        reference_batch=32768,
        samples_seen=2_560_000_000,
        lr_per_256=8e-6,            # 1.024e-3 at 32k
        warmup_steps=1600,
        lr_scheduler="cosine",      # to 0
        wd=0.2,
        beta1=0.9,
        beta2=0.95,
        grad_clip_norm=1.0,
        precision="amp_bf16",
        text_init=None,             # an open_clip checkpoint of a pre-trained CLIPA text encoder (required)
        lock_text=True,             # the text tower stays frozen
        local_loss=True,
        gather_with_grad=True,
        grad_checkpointing=True,
        # Loader sizing (per training process = per device). A train step costs ~155 GFLOP
        # per sample: image tower 33.6 GFLOP forward at 84 px (torch's FLOP counter) x 4
        # (forward, backward, checkpoint recompute) + ~19 for the locked text tower. At 40%
        # of an H100's 989 bf16 TFLOP/s that is ~2,600 samples/s per GPU (a TPU v3 core:
        # ~160/s). One loader core does ~1,650 samples/s at 84 px from 256 px shards
        # (`make bench-data`), so 2,600 / 1,650 = 1.6 cores -> 3 workers for headroom
        # (augmentation bursts, shard opens, slower server cores); prefetch 4 batches per
        # worker = 12 x 128 samples queued, ~0.6 s of steps to ride out a slow shard read.
        workers=3,
        prefetch_factor=4,
        fsdp=False,                 # with device=xla: True shards weights and batch over a host's devices (SPMD FSDP)
        logs="runs/clipa",
    )
    if arg == "demo":
        config.update(
            model="crate-alpha-demo",
            force_image_size=32,
            force_context_length=None,
            global_batch=64,
            reference_batch=64,
            epochs=30,
            lr_per_256=2e-3,        # 5e-4 at batch 64
            warmup_steps=60,
            lock_text=False,        # no pre-trained text tower: both towers learn
            local_loss=False,
            gather_with_grad=False,
            grad_checkpointing=False,
            # one loader process (the other core trains): ~5,600 samples/s at 32 px, so a
            # 64-sample batch takes ~11 ms of a ~150 ms step, ready before it is asked for
            workers=1,
            prefetch_factor=4,
            # bf16 autocast where the laptop has bf16 instructions; emulated (an AVX2-only CPU)
            # it is ~45x slower than fp32, and the demo would take hours instead of minutes
            precision="amp_bf16" if bf16_is_fast() else "fp32",
            save_frequency=0,       # keep the final and the latest (resume) checkpoints only
            log_every_n_steps=50,
            logs="runs/demo",
        )
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (variants: demo)")
    return config
