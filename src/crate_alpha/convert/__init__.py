"""Converters from the released CRATE-α checkpoints to timm / open_clip model folders."""
from .folders import ConversionError, write_open_clip_folder, write_timm_folder
from .big_vision import convert_big_vision
from .official_torch import convert_official_torch

__all__ = ["ConversionError", "convert_big_vision", "convert_official_torch", "write_open_clip_folder", "write_timm_folder"]
