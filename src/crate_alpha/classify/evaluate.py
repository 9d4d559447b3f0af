"""Top-1/top-5 evaluation as the official script does it (resize 256, centre crop 224, ImageNet
mean/std), for a training checkpoint or a converted ``local-dir:`` folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..train.recipe import RecipeError
from .data import check_path, eval_transform, make_loader


def load_for_eval(model: Optional[str], checkpoint: Optional[str], use_ema: bool = False):
    """(model, image size, mean, std, crop_pct, interpolation)."""
    import timm

    import crate_alpha  # noqa: F401

    if model and model.startswith("local-dir:"):
        d = Path(model[len("local-dir:"):])
        if not (d / "config.json").is_file():
            raise RecipeError(f"{d} is not a timm model folder (no config.json)")
        m = timm.create_model(model, pretrained=True)
        pc = m.pretrained_cfg
        return (m, pc["input_size"][-1], pc.get("mean", IMAGENET_DEFAULT_MEAN), pc.get("std", IMAGENET_DEFAULT_STD),
                pc.get("crop_pct", 0.875), pc.get("interpolation", "bilinear"))
    if not checkpoint or not os.path.isfile(checkpoint):
        raise RecipeError(f"checkpoint {checkpoint} does not exist (or pass --model local-dir:FOLDER)")
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model_name" not in ck:
        raise RecipeError(f"{checkpoint} is not a classification checkpoint of this trainer")
    from .train import build_model

    m = build_model({"model": model or ck["model_name"], "image_size": ck["image_size"], "drop_path": 0.0},
                    ck["num_classes"])
    m.load_state_dict(ck["ema"] if use_ema and "ema" in ck else ck["model"])
    return m, ck["image_size"], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.875, "bilinear"


def run_eval(data: str, output: str, model: Optional[str] = None, checkpoint: Optional[str] = None,
             batch_size: int = 64, workers: int = 2, use_ema: bool = False) -> dict:
    check_path(data, "evaluation data")
    from .train import evaluate

    m, size, mean, std, crop_pct, interp = load_for_eval(model, checkpoint, use_ema)
    loader, _, _ = make_loader(data, eval_transform(size, mean, std, crop_pct, interp), batch_size, False, workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = evaluate(m.to(device), loader, device, precision="fp32")
    res.update({"model": model, "checkpoint": checkpoint, "data": str(data), "image_size": size, "crop_pct": crop_pct})
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    return res
