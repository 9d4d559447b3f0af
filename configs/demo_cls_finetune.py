"""Demo: fine-tune the CLIP demo's CRATE-α image tower as a digits classifier at 64 px (new head)."""


def get_config():
    return dict(
        model="crate_alpha_demo_patch8_64",
        image_size=64,
        train_data="runs/demo/data/imagefolder/train",
        val_data="runs/demo/data/imagefolder/val",
        init_from="runs/demo/crate-alpha_finetune/checkpoints/epoch_latest.pt",
        new_head=True,
        load_patch_embed=True,      # same patch size; the IN-1K recipe re-initialises it
        epochs=15,
        global_batch=64,
        lr_per_256=8e-4,            # 2e-4 at batch 64
        warmup_epochs=1,
        weight_decay=0.05,
        beta2=0.95,
        grad_clip=1.0,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip=0.0,
        label_smoothing=0.1,
        eval_crop_pct=1.0,
        workers=0,
        output="runs/demo-cls",
    )
