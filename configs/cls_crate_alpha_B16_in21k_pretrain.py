"""CRATE-α-B/16 supervised pre-training on ImageNet-21K (19,167 classes), as in the paper.

91 epochs, lr 5e-5 x batch/256, weight decay 0.1, AdamW β2 0.95, 10 warm-up epochs,
cosine to 1e-6, Mixup 0.8 / CutMix 1.0 (switch probability 0.5), clipping 1.0, inception
crop (minimum area 8%) and horizontal flip. Keys are timm train.py's arguments.

Variant ``:demo`` (``make demo-cls``): the 4-layer x 128 demo CRATE-α trained from scratch
on the digits at 32 px. No Mixup/CutMix, no flips (digits are not symmetric) and only a
mild crop (85-100% of the area, aspect 0.9-1.1): without it, or with label smoothing 0.1,
accuracy stalls near 96-97%.
"""
from crate_alpha.device import bf16_is_fast


def get_config(arg=None):
    config = dict(
        model="crate_alpha_base_patch16_224",
        num_classes=19167,
        img_size=224,
        train_data=None,            # ImageFolder of IN-21K, or shards with .jpg + .cls
        val_data=None,
        epochs=91,
        global_batch=4096,
        lr_base=5e-5,
        warmup_epochs=10,
        min_lr=1e-6,
        weight_decay=0.1,
        opt_betas=(0.9, 0.95),
        clip_grad=1.0,
        scale=(0.08, 1.0),
        hflip=0.5,
        mixup=0.8,
        cutmix=1.0,
        mixup_switch_prob=0.5,
        amp=True,
        output="runs/cls",
    )
    if arg == "demo":
        config.update(
            model="crate_alpha_demo_patch8_64",
            num_classes=None,       # from the class folders
            img_size=32,
            epochs=100,
            global_batch=128,
            lr_base=2e-3,           # 1e-3 at batch 128
            warmup_epochs=3,
            weight_decay=0.05,
            scale=(0.85, 1.0),
            ratio=(0.9, 1.1),
            hflip=0.0,
            mixup=0.0,
            cutmix=0.0,
            crop_pct=1.0,
            workers=1,              # the other core trains; batches are ready before they are asked for
            prefetch_factor=4,
            amp=bf16_is_fast(),     # bf16 autocast only where it is not emulated (~45x slower on AVX2-only CPUs)
            output="runs/demo-cls",
        )
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (variants: demo)")
    return config
