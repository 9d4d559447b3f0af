"""CRATE-α-B/16 supervised pre-training on ImageNet-21K (19,167 classes), as in the paper.

91 epochs, lr 5e-5 x batch/256, weight decay 0.1, AdamW β2 0.95, 10 warm-up epochs,
cosine to 1e-6, Mixup 0.8 / CutMix 1.0 (switch probability 0.5), clipping 1.0, inception
crop (minimum area 8%) and horizontal flip.
"""


def get_config():
    return dict(
        model="crate_alpha_base_patch16_224",
        num_classes=19167,
        image_size=224,
        train_data=None,            # ImageFolder of IN-21K, or shards with .jpg + .cls
        val_data=None,
        epochs=91,
        global_batch=4096,
        lr_per_256=5e-5,
        warmup_epochs=10,
        min_lr=1e-6,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        crop_scale=(0.08, 1.0),
        hflip=0.5,
        mixup=0.8,
        cutmix=1.0,
        mixup_switch_prob=0.5,
        precision="bf16",
        output="runs/cls",
    )
