"""Demo: fine-tune the 32 px demo CLIP at its full 64 px resolution (position grid resampled)."""


def get_config():
    return dict(
        model="crate-alpha-demo",
        image_size=64,
        train_data="runs/demo/data/train/{00000..00005}.tar",
        init_from="runs/demo/demo_pretrain/checkpoints/epoch_latest.pt",
        pos_embed_init="resample",
        global_batch=64,
        reference_batch=64,
        epochs=6,
        lr_per_256=2e-3,            # 5e-4 at batch 64
        warmup_steps=20,
        weight_decay=0.2,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        precision="amp_bf16",
        workers=0,
        save_every_epochs=0,
        output="runs/demo",
        log_every_n_steps=50,
    )
