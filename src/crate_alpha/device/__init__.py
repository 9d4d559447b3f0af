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
           "default_name"]

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
