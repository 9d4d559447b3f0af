"""CRATE-α-CLIPA-L/14 pre-training at 84 px, as in the paper (DataComp-1B, 2.56B samples seen).

Values from the official configs (configs/crate/clipa/84_32_pre_training.py): stated for
a global batch of 32,768; at another batch the launcher scales lr linearly and keeps the
warm-up length in samples.
"""


def get_config():
    return dict(
        model="crate-alpha-CLIPA-L-14",
        image_size=84,
        context_length=32,
        train_data=None,            # DataComp-1B shards, e.g. 'datacomp/{00000000..00139999}.tar'
        global_batch=32768,
        reference_batch=32768,
        samples_seen=2_560_000_000,
        lr_per_256=8e-6,            # 1.024e-3 at 32k
        warmup_steps=1600,
        lr_scheduler="cosine",      # to 0
        weight_decay=0.2,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        precision="amp_bf16",
        text_init=None,             # an open_clip checkpoint of a pre-trained CLIPA text encoder (required)
        lock_text=True,             # the text tower stays frozen
        local_loss=True,
        gather_with_grad=True,
        grad_checkpointing=True,
        fsdp=False,                 # with device=xla: True shards weights and batch over a host's devices (SPMD FSDP)
        output="runs/clipa",
    )
