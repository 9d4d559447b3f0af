"""CRATE-α-CLIPA-L/14 fine-tuning at 224 px from the 84 px pre-training (512M samples seen).

As in the official code, the image position embedding is re-initialised as 2-D sin-cos at
the 16x16 grid (pos_embed_init='sincos'); pos_embed_init='resample' resamples the learned
6x6 grid instead.
"""


def get_config():
    return dict(
        model="crate-alpha-CLIPA-L-14",
        image_size=224,
        context_length=32,
        train_data=None,
        init_from="runs/clipa/clipa_crate_alpha_L14_84_pretrain/checkpoints/epoch_latest.pt",
        pos_embed_init="sincos",
        global_batch=32768,
        reference_batch=32768,
        samples_seen=512_000_000,
        lr_per_256=4e-7,            # 5.12e-5 at 32k
        warmup_steps=800,
        lr_scheduler="cosine",
        weight_decay=0.2,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        precision="amp_bf16",
        lock_text=True,
        local_loss=True,
        gather_with_grad=True,
        grad_checkpointing=True,
        fsdp=False,                 # with device=xla: True shards weights and batch over a host's devices (SPMD FSDP)
        output="runs/clipa",
    )
