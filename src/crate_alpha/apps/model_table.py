"""Parameters and compute of every registered CRATE-α variant, measured on the model itself.

``crate-alpha model-table`` prints a markdown table. FLOPs are counted by
torch's FlopCounterMode over one forward pass at 224 px on the meta device (no memory, no
time); GFLOPs = 2 x multiply-accumulates.
"""
from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.crate_alpha import list_crate_alpha_models, variant_args


def measure(name: str, res: int = 224, num_classes: int = 1000) -> dict:
    model = timm.create_model(name, num_classes=num_classes, device="meta", img_size=res).eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, res, res, device="meta"))
    args = variant_args(name)
    return {"model": name, "width": args["embed_dim"], "depth": args["depth"], "heads": args["num_heads"],
            "patch": args["patch_size"], "res": res, "params_m": params / 1e6,
            "gflops": counter.get_total_flops() / 1e9}


def markdown(rows) -> str:
    lines = ["| model | width | depth | heads | patch | params (M) | GFLOPs @224 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['width']} | {r['depth']} | {r['heads']} | {r['patch']} | "
                     f"{r['params_m']:.1f} | {r['gflops']:.1f} |")
    return "\n".join(lines)


def model_table(res: int = 224, num_classes: int = 1000) -> str:
    names = [n for n in list_crate_alpha_models() if "demo" not in n]
    return markdown([measure(n, res, num_classes) for n in names])
