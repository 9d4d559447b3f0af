"""Fused AdamW against torch's default AdamW, one optimizer step over a CRATE-α's parameters.

The CLIP trainer asks open_clip_train's AdamW for torch's fused kernel where the device has
one (``crate_alpha.clip.patches``); this is the measurement that keeps that change: the
same parameters and gradients, stepped by each, median seconds per step.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import torch

MODELS = ("crate_alpha_demo_patch8_64", "crate_alpha_base_patch16_224")


def step_seconds(params: List[torch.nn.Parameter], fused: bool, device, repeats: int = 10) -> float:
    """Median seconds of one AdamW step (open_clip_train's settings) over ``params`` (on ``device``, a seam Device)."""
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.2,
                            fused=True if fused else None)
    opt.step()  # the state is allocated at the first step: not timed
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        device.synchronize(params[0].device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_optimizer(device: torch.device, models=MODELS, repeats: int = 10) -> List[Dict]:
    import timm

    from ..device import for_name

    seam = for_name(device.type)

    rows = []
    for name in models:
        model = timm.create_model(name).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        row = {"model": name, "device": str(device), "parameters": sum(p.numel() for p in params)}
        for fused in (False, True):
            row["fused_s" if fused else "default_s"] = step_seconds(params, fused, seam, repeats)
        row["speedup"] = row["default_s"] / row["fused_s"]
        rows.append(row)
        print(f"AdamW step {name:<32} {row['parameters'] / 1e6:7.1f} M params  default {1e3 * row['default_s']:8.1f} ms"
              f"  fused {1e3 * row['fused_s']:8.1f} ms  ({row['speedup']:.2f}x)", flush=True)
    return rows


def run(device: torch.device, out: Path) -> List[Dict]:
    from ..common import write_json

    rows = bench_optimizer(device)
    write_json({"adamw_step": rows, "torch": torch.__version__}, out)
    return rows
