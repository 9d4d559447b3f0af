"""Top-1/top-5 evaluation as the official script does it (resize 256, centre crop 224, ImageNet
mean/std), for a training checkpoint or a converted ``local-dir:`` folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..common import local_dir, timm_folder_config, write_json
from ..recipe import RecipeError
from .data import check_path, eval_transform, make_loader


def load_for_eval(model: Optional[str], checkpoint: Optional[str], use_ema: bool = False):
    """(model, image size, mean, std, crop_pct, interpolation)."""
    import timm

    import crate_alpha  # noqa: F401

    folder = local_dir(model)
    if folder is not None:
        timm_folder_config(folder)  # says so when it is not a timm folder
        m = timm.create_model(model, pretrained=True)  # timm applies the folder's config and weights
        pc = m.pretrained_cfg
        return (m, pc["input_size"][-1], pc.get("mean", IMAGENET_DEFAULT_MEAN), pc.get("std", IMAGENET_DEFAULT_STD),
                pc.get("crop_pct", 0.875), pc.get("interpolation", "bilinear"))
    if not checkpoint or not Path(checkpoint).is_file():
        raise RecipeError(f"checkpoint {checkpoint} does not exist (or pass --model local-dir:FOLDER)")
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model_name" not in ck:
        raise RecipeError(f"{checkpoint} is not a classification checkpoint of this trainer")
    from .trainer import build_model

    m = build_model({"model": model or ck["model_name"], "img_size": ck["image_size"], "drop_path": 0.0},
                    ck["num_classes"])
    m.load_state_dict(ck["ema"] if use_ema and "ema" in ck else ck["model"])
    return m, ck["image_size"], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.875, "bilinear"


def run_eval(data: str, output: str, model: Optional[str] = None, checkpoint: Optional[str] = None,
             batch_size: int = 64, workers: int = 2, use_ema: bool = False, torchcompile=None) -> dict:
    check_path(data, "evaluation data")
    from .trainer import compiled, evaluate

    m, size, mean, std, crop_pct, interp = load_for_eval(model, checkpoint, use_ema)
    loader, _, _ = make_loader(data, eval_transform(size, mean, std, crop_pct, interp), batch_size, False, workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = evaluate(compiled(m.to(device), torchcompile), loader, device, amp_dtype=None)
    res.update({"model": model, "checkpoint": checkpoint, "data": str(data), "image_size": size, "crop_pct": crop_pct,
                "torchcompile": torchcompile})
    write_json(res, output)
    return res
