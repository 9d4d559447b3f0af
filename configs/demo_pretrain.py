"""Demo: CRATE-α CLIP (4 layers x 128, patch 8) pre-trained at 32 px on the digits corpus.

The CLIPA recipe shrunk to one laptop: low resolution first, then a short fine-tune at
full resolution (demo_finetune.py). β2 0.95 and gradient clipping 1.0 matter: with
open_clip's defaults (β2 0.98, no clipping) this model's loss stays at ln(batch).
"""


def get_config():
    return dict(
        model="crate-alpha-demo",
        image_size=32,
        train_data="runs/demo/data/train/{00000..00005}.tar",
        global_batch=64,
        reference_batch=64,
        epochs=30,
        lr_per_256=2e-3,            # 5e-4 at batch 64
        warmup_steps=60,
        weight_decay=0.2,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        precision="amp_bf16",
        workers=0,
        save_every_epochs=0,        # keep the final and the latest (resume) checkpoints only
        output="runs/demo",
        log_every_n_steps=50,
    )
