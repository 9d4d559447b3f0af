"""CRATE-α for timm and open_clip.

``import crate_alpha`` registers the CRATE-α models in timm
(``timm.create_model("crate_alpha_base_patch16_224.in21k_ft_in1k", pretrained=True)``) and
the CRATE-α CLIP configs in open_clip (``open_clip.create_model("crate-alpha-L-14")``).
Installed, the package does this by itself when timm or open_clip is imported (the start-up
hook ``_crate_alpha_autoload``; ``CRATE_ALPHA_AUTOLOAD=0`` turns it off).
"""
from pathlib import Path

from .models.layers import ISTA, MSSA, ODL, sincos_2d_pos_embed
from .models.crate_alpha import (
    CRATE_ALPHA_SIZES,
    CrateAlpha,
    checkpoint_filter_fn,
    custom_variant_name,
    list_crate_alpha_models,
    unknown_model_message,
    variant_args,
    variant_name,
)
from .models.crate import Crate

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


def pretrained_dir(name: str, revision=None, tokenizer=None) -> str:
    """``local-dir:FOLDER`` of a released CLIPA model (e.g. ``"crate-alpha-CLIPA-L-14"``), for
    ``open_clip.create_model_and_transforms`` and ``open_clip.get_tokenizer``: downloaded
    through huggingface_hub and converted once into its cache. See :mod:`crate_alpha.convert.hub`."""
    from .convert.hub import pretrained_dir as _pretrained_dir

    return _pretrained_dir(name, revision=revision, tokenizer=tokenizer)

__all__ = [
    "CRATE_ALPHA_SIZES", "ISTA", "MSSA", "ODL", "Crate", "CrateAlpha", "MODEL_CONFIG_DIR", "checkpoint_filter_fn",
    "custom_variant_name", "list_crate_alpha_models", "list_open_clip_models", "pretrained_dir",
    "sincos_2d_pos_embed",
    "unknown_model_message", "variant_args", "variant_name",
]
