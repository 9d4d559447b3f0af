"""Training devices behind one seam: ``for_name(cfg["device"], fsdp=cfg["fsdp"])``.

Both trainers ask the returned :class:`Device` for everything that depends on the device
(process start and group, DDP arguments, step boundary, device loader, checkpoint writing)
instead of comparing device strings; ``base`` has the seam and the CPU and CUDA devices,
``xla`` the XLA one (TPU, or XLA:CPU in tests) with torch_xla's helpers.

    dev = for_name(cfg["device"], fsdp=cfg["fsdp"])
    dev.check_ready()
    rank, local_rank, world, device = dev.join_process_group()
    with dev.optimizer_hooks(run_dir / "xla_metrics.json"):   # step_boundary after each step
        for x, y in dev.wrap_loader(loader): ...
    dev.save(state, path)
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import NAMES, CpuDevice, CudaDevice, Device, ProcessInfo, check_choice
from .xla import XlaDevice

__all__ = ["NAMES", "Device", "CpuDevice", "CudaDevice", "XlaDevice", "ProcessInfo", "check_choice", "for_name",
           "default_name", "bf16_is_fast"]

_DEVICES = {"cpu": CpuDevice, "cuda": CudaDevice, "xla": XlaDevice}


def default_name() -> str:
    """The device a recipe without one trains on: cuda when torch sees one, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def for_name(name: Optional[str], fsdp: bool = False) -> Device:
    """The device of a recipe's ``device`` key (None: :func:`default_name`) and ``fsdp`` key.

    Anything but cpu, cuda, xla or None, and fsdp without xla, are refused in one line
    (``RecipeError``); whether the device is there is ``check_ready``'s question.
    """
    check_choice(name, fsdp)
    return _DEVICES[name or default_name()](fsdp=bool(fsdp))


def bf16_is_fast() -> bool:
    """Whether bf16 autocast pays off where a recipe without a ``device`` trains: on a GPU, or a
    CPU with bf16 instructions (AVX512-BF16 / AMX). On an AVX2-only CPU, torch emulates bf16
    and a 1024² matmul takes ~45x longer than in fp32 (8.7 s against 0.19 s, measured)."""
    if torch.cuda.is_available():
        return True
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch has no public query
    return bool(check()) if check is not None else True
