"""CRATE-α for timm and open_clip.

``import crate_alpha`` registers the CRATE-α models in timm
(``timm.create_model("crate_alpha_base_patch16_224")``) and the CRATE-α CLIP configs in
open_clip (``open_clip.create_model("crate-alpha-L-14")``).
"""
from pathlib import Path

from .crate_alpha import (
    CRATE_ALPHA_SIZES,
    MSSA,
    ODL,
    CrateAlpha,
    custom_variant_name,
    list_crate_alpha_models,
    register_folder_variants,
    register_variant,
    sincos_2d_pos_embed,
    unknown_model_message,
    variant_args,
    variant_name,
)
from .crate import ISTA, Crate

__version__ = "0.1.0"

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def _register_open_clip_configs() -> None:
    import open_clip

    # open_clip's public registration; asked once per process (it rescans its configs each time)
    if not set(list_open_clip_models()) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def list_open_clip_models() -> list:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


_register_open_clip_configs()

__all__ = [
    "CRATE_ALPHA_SIZES", "ISTA", "MSSA", "ODL", "Crate", "CrateAlpha", "MODEL_CONFIG_DIR", "custom_variant_name",
    "list_crate_alpha_models", "list_open_clip_models", "register_folder_variants", "register_variant",
    "sincos_2d_pos_embed",
    "unknown_model_message", "variant_args", "variant_name",
]
