"""The released CRATE-α weights (Hub repo ``UCSC-VLAA/CRATE-alpha``): one row per file.

This table is the one source of the timm pretrained tags (``crate_alpha.models.crate_alpha``
builds their ``pretrained_cfg`` from it), of the open_clip CLIPA models that
:func:`crate_alpha.convert.hub.pretrained_dir` converts into the Hub cache, of the names the CLI
accepts as Hub references, and of the README's table (``crate-alpha released``).
It imports nothing, so reading it costs nothing.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

REPO = "UCSC-VLAA/CRATE-alpha"
# The release's model card (huggingface.co/UCSC-VLAA/CRATE-alpha) states apache-2.0.
LICENSE = "apache-2.0"
# the official pre-training config (configs/crate/classification/pre_training_in21k.py): ImageNet-21K
IN21K_CLASSES = 19167


class Release(NamedTuple):
    path: str            # file in REPO
    model: str           # timm architecture
    tag: str             # timm pretrained tag: model.tag
    kind: str            # 'classifier' (official torch layout), 'big_vision' (.npz tree), 'clipa' (image-text)
    num_classes: int     # classes of the head; for CLIPA the image embedding width (head = projection)
    figure: str          # what the paper reports for it
    open_clip: Optional[str] = None  # open_clip model config of a CLIPA file

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"


RELEASES = (
    Release("torch/crate_alpha_B16.pth", "crate_alpha_base_patch16_224", "in21k_ft_in1k", "classifier", 1000,
            "81.2 top-1 IN-1K"),
    Release("torch/crate_alpha_L14.pth", "crate_alpha_large_patch14_224", "in21k_ft_in1k", "classifier", 1000,
            "83.9 top-1 IN-1K"),
    Release("jax/crate_alpha_B16_in1k.npz", "crate_alpha_base_patch16_224", "in21k_ft_in1k_jax", "big_vision", 1000,
            "B/16 IN-1K fine-tuning, big_vision tree (81.2 top-1 for the model)"),
    Release("jax/crate_alpha_B8_in1k.npz", "crate_alpha_base_patch8_224", "in21k_ft_in1k", "big_vision", 1000,
            "83.2 top-1 IN-1K"),
    Release("jax/crate_alpha_L14_in1k.npz", "crate_alpha_large_patch14_224", "in21k_ft_in1k_jax", "big_vision", 1000,
            "L/14 IN-1K fine-tuning, big_vision tree (83.9 top-1 for the model)"),
    Release("jax/crate_alpha_L8_in1k.npz", "crate_alpha_large_patch8_224", "in21k_ft_in1k", "big_vision", 1000,
            "85.1 top-1 IN-1K"),
    Release("torch/in21k_Pretrain/crate_alpha_B32_in21k.pth", "crate_alpha_base_patch32_224", "in21k", "classifier",
            IN21K_CLASSES, "IN-21K pre-training"),
    Release("torch/in21k_Pretrain/crate_alpha_B16_IN21K", "crate_alpha_base_patch16_224", "in21k", "classifier",
            IN21K_CLASSES, "IN-21K pre-training"),
    Release("torch/in21k_Pretrain/crate_alpha_B8_IN21K", "crate_alpha_base_patch8_224", "in21k", "classifier",
            IN21K_CLASSES, "IN-21K pre-training"),
    Release("torch/in21k_Pretrain/crate_alpha_L32_in21k.pth", "crate_alpha_large_patch32_224", "in21k", "classifier",
            IN21K_CLASSES, "IN-21K pre-training"),
    Release("torch/in21k_Pretrain/crate_alpha_L14_IN21K", "crate_alpha_large_patch14_224", "in21k", "classifier",
            IN21K_CLASSES, "IN-21K pre-training"),
    Release("torch/in21k_Pretrain/crate_alpha_L8_IN21K", "crate_alpha_large_patch8_224", "in21k", "classifier",
            IN21K_CLASSES, "IN-21K pre-training"),
    Release("torch/crate_alpha_CLIPA_L14.pth", "crate_alpha_large_patch14_224", "clipa_datacomp1b", "clipa", 1024,
            "69.8 zero-shot top-1 IN-1K", "crate-alpha-CLIPA-L-14"),
    Release("torch/crate_alpha_CLIPA_H14.pth", "crate_alpha_huge_patch14_224", "clipa_datacomp1b", "clipa", 1024,
            "72.3 zero-shot top-1 IN-1K", "crate-alpha-CLIPA-H-14"),
)

# open_clip spells a pretrained model as (config name, tag); the CLI as config.tag
OPEN_CLIP_TAG = "datacomp1b"


def by_name(name: str) -> Optional[Release]:
    """The release named ``model.tag`` (timm) or ``open_clip_name[.datacomp1b]``, else None."""
    for r in RELEASES:
        if name == r.name or (r.open_clip is not None and name in (r.open_clip, f"{r.open_clip}.{OPEN_CLIP_TAG}")):
            return r
    return None


def by_path(path: str) -> Optional[Release]:
    for r in RELEASES:
        if r.path == path:
            return r
    return None


def table() -> str:
    """Markdown: every released file, its model and tag, the paper's figure, the call that loads it."""
    rows = ["| file | model | tag | paper | load with |", "|---|---|---|---|---|"]
    for r in RELEASES:
        if r.open_clip:
            call = f'`open_clip.create_model_and_transforms(crate_alpha.pretrained_dir("{r.open_clip}"))`'
        else:
            call = f'`timm.create_model("{r.name}", pretrained=True)`'
        rows.append(f"| `{r.path}` | `{r.open_clip or r.model}` | `{r.tag}` | {r.figure} | {call} |")
    return "\n".join(rows) + "\n"
