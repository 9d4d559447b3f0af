"""CRATE-α-B/16 fine-tuning on ImageNet-1K from the IN-21K checkpoint, as in the paper.

lr 1e-5 x batch/256, RandAugment (2, 9), label smoothing 0.1, 91 epochs, a new head. As
the official fine-tuning config does, the patch-embedding kernel is not loaded
(re-initialised); load_patch_embed=True loads it.
"""


def get_config():
    return dict(
        model="crate_alpha_base_patch16_224",
        num_classes=1000,
        image_size=224,
        train_data=None,            # ImageFolder of IN-1K train, or shards
        val_data=None,              # ImageFolder of IN-1K val
        init_from="runs/cls/cls_crate_alpha_B16_in21k_pretrain/checkpoints/latest.pt",
        new_head=True,
        load_patch_embed=False,
        epochs=91,
        global_batch=4096,
        lr_per_256=1e-5,
        warmup_epochs=10,           # not stated for fine-tuning; as in pre-training
        min_lr=1e-6,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        crop_scale=(0.08, 1.0),
        hflip=0.5,
        rand_augment="rand-m9-n2-mstd0.5",
        label_smoothing=0.1,
        precision="bf16",
        output="runs/cls",
    )
