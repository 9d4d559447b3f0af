"""CRATE-α-B/16 fine-tuning on ImageNet-1K from the IN-21K checkpoint, as in the paper.

The IN-21K recipe with what the paper's fine-tuning changes: lr 1e-5 x batch/256,
RandAugment (2, 9) and label smoothing 0.1 instead of Mixup/CutMix, a new 1000-class
head. As the official fine-tuning config does, the patch-embedding kernel is not loaded
(re-initialised); load_patch_embed=True loads it.

Variant ``:demo`` (``make demo-cls``): the CLIP demo's CRATE-α image tower fine-tuned as a
digits classifier at 64 px with a new head.
"""
from crate_alpha.configs.cls_crate_alpha_B16_in21k_pretrain import get_config as pretraining


def get_config(arg=None):
    config = pretraining(arg)
    config.update(new_head=True, smoothing=0.1, mixup=0.0, cutmix=0.0)
    if arg == "demo":
        config.update(
            img_size=64,
            initial_checkpoint="runs/demo/crate-alpha_finetune/checkpoints/epoch_latest.pt",
            load_patch_embed=True,  # same patch size
            epochs=15,
            global_batch=64,
            lr_base=8e-4,           # 2e-4 at batch 64
            warmup_epochs=1,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
        )
    else:
        config.update(
            num_classes=1000,
            train_data=None,        # ImageFolder of IN-1K train, or shards
            val_data=None,          # ImageFolder of IN-1K val
            initial_checkpoint="runs/cls/cls_crate_alpha_B16_in21k_pretrain/checkpoints/latest.pt",
            load_patch_embed=False,
            lr_base=1e-5,
            warmup_epochs=10,       # not stated for fine-tuning; as in pre-training
            aa="rand-m9-n2-mstd0.5",
        )
    return config
