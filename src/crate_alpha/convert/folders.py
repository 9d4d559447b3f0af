"""Model folders in timm's and open_clip's local formats, written atomically.

A folder is assembled under a hidden sibling path and renamed into place only once it is
complete and its state dict has loaded strictly into the model it describes, so an
interrupted or failed conversion never leaves a half-written OUT_DIR behind.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator

import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class ConversionError(ValueError):
    """A checkpoint or request that cannot be converted; the message says why and what to do."""


def check_names(present, expected: set, what: str, noun: str = "keys", optional: set = frozenset()) -> None:
    """Refuse a checkpoint with missing or unexpected entries, naming every one."""
    missing = sorted(expected - set(present))
    unexpected = sorted(set(present) - expected - set(optional))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {noun}: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {noun}: {', '.join(unexpected)}")
        raise ConversionError(f"{what}: " + " | ".join(parts))


def check_shape(entries, key: str, shape: tuple):
    """``entries[key]``, refused with its name when its shape is not ``shape``."""
    a = entries[key]
    if tuple(a.shape) != tuple(shape):
        raise ConversionError(f"{key} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


@contextlib.contextmanager
def atomic_dir(out_dir: os.PathLike, force: bool = False) -> Iterator[Path]:
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ConversionError(f"output folder {out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output path {out_dir} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "dir")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_tensors(state: Dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def load_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly, naming every missing, extra or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong)}")
    if problems:
        raise ConversionError(f"{what} does not fit the model it describes: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def write_timm_folder(out_dir: os.PathLike, architecture: str, model_args: dict,
                      state: Dict[str, torch.Tensor], force: bool = False,
                      crop_pct: float = 0.875, interpolation: str = "bilinear") -> Path:
    """A folder for ``timm.create_model("local-dir:OUT_DIR", pretrained=True)``."""
    import timm

    import crate_alpha  # noqa: F401  (registers the architectures)

    model = timm.create_model(architecture, pretrained=False, **model_args)
    load_strict(model, state, "converted classifier")
    res = model_args["img_size"]
    config = {
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "num_features": model_args["embed_dim"],
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, res, res],
            "crop_pct": crop_pct,
            "interpolation": interpolation,
            "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD),
            "num_classes": model_args["num_classes"],
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    with atomic_dir(out_dir, force) as tmp:
        _save_tensors(state, tmp / TIMM_WEIGHTS)
        _write_json(config, tmp / TIMM_CONFIG)
    return Path(out_dir)


def write_open_clip_folder(out_dir: os.PathLike, model_cfg: dict, state: Dict[str, torch.Tensor],
                           preprocess_cfg: dict, force: bool = False) -> Path:
    """A folder for ``open_clip.create_model_and_transforms("local-dir:OUT_DIR")``."""
    import open_clip

    import crate_alpha  # noqa: F401  (registers the vision trunks)

    model = open_clip.model.CLIP(**copy.deepcopy(model_cfg))
    load_strict(model, state, "converted CLIP model")
    with atomic_dir(out_dir, force) as tmp:
        _save_tensors(state, tmp / OPEN_CLIP_WEIGHTS)
        _write_json({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, tmp / OPEN_CLIP_CONFIG)
    return Path(out_dir)


def export_open_clip_checkpoint(checkpoint: os.PathLike, model_name: str, out_dir: os.PathLike,
                                image_size: int | None = None, force: bool = False) -> Path:
    """A training checkpoint (open_clip_train's epoch_*.pt) as an open_clip ``local-dir:`` folder."""
    import open_clip

    import crate_alpha  # noqa: F401

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        names = ", ".join(n for n in open_clip.list_models() if "crate" in n or "demo" in n)
        raise ConversionError(f"unknown open_clip model {model_name!r}; CRATE-α models: {names}")
    if not Path(checkpoint).is_file():
        raise ConversionError(f"checkpoint {checkpoint} does not exist")
    obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if image_size is None:
        trunk_pos = state.get("visual.trunk.pos_embed")
        if trunk_pos is not None:
            import math

            from .. import variant_args

            patch = variant_args(cfg["vision_cfg"]["timm_model_name"])["patch_size"]
            image_size = math.isqrt(trunk_pos.shape[1] - 1) * patch
    if image_size is not None and image_size != cfg["vision_cfg"].get("image_size"):
        cfg["vision_cfg"]["image_size"] = image_size
        if "timm_model_name" in cfg["vision_cfg"]:
            from .. import custom_variant_name, variant_args

            a = variant_args(cfg["vision_cfg"]["timm_model_name"])
            cfg["vision_cfg"]["timm_model_name"] = custom_variant_name(
                a["embed_dim"], a["depth"], a["num_heads"], a["patch_size"], image_size)
    # load through the model, so that a checkpoint of another resolution is resampled
    from open_clip.model import resize_pos_embed

    model = open_clip.model.CLIP(**copy.deepcopy(cfg))
    resize_pos_embed(state, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConversionError(f"{checkpoint} does not fit {model_name}: {str(e).splitlines()[0]}") from None
    state = model.state_dict()
    pp = {"size": cfg["vision_cfg"].get("image_size", 224)}  # open_clip's default normalisation, as trained
    return write_open_clip_folder(out_dir, cfg, state, pp, force=force)

