"""The device seam: what the two trainers need from the machine they train on.

A recipe's ``device`` key picks one :class:`Device` (``for_name``); the trainers ask it,
never the device string, how to start processes and join their process group, what
DistributedDataParallel needs, where the step boundary is, how batches reach the device
and how a checkpoint is written. CPU and CUDA are here; XLA (TPU, or XLA:CPU in tests)
is ``xla.XlaDevice``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..common import save_checkpoint
from ..errors import RecipeError

NAMES = ("cpu", "cuda", "xla")


class ProcessInfo(NamedTuple):
    """This process among the training processes, and the torch device it trains on."""

    rank: int
    local_rank: int
    world: int
    device: torch.device


def check_choice(name: Optional[str], fsdp: bool = False) -> None:
    """A recipe's ``device`` and ``fsdp`` keys, refused in one line when no device fits them."""
    if name not in (None,) + NAMES:
        raise RecipeError(f"device must be cpu, cuda or xla (or None: cuda when available), got {name!r}")
    if fsdp and name != "xla":
        raise RecipeError("fsdp=True is the SPMD sharding of XLA devices: set device=xla as well")


def _env_int(key: str, default: int) -> int:
    return int(os.environ.get(key) or default)


class Device:
    """One kind of training device. The defaults are the CPU's; subclasses say what differs."""

    name = "cpu"                # what open_clip_train's --device gets
    dist_backend = "gloo"       # torch.distributed backend of its process group
    pin_memory = False          # pin host batches (a DMA copy that overlaps the step)
    fused_optimizer = True      # torch's fused AdamW kernels exist for its tensors
    static_shapes = False       # every step must have the same shapes (XLA: a new shape is a new graph)
    is_accelerator = False
    ddp_kwargs: dict = {}       # extra DistributedDataParallel arguments

    def __init__(self, fsdp: bool = False):
        self.fsdp = fsdp
        self._device: Optional[torch.device] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fsdp={self.fsdp})"

    # ---- processes -----------------------------------------------------------------

    def check_ready(self) -> None:
        """Fail before any data or model is touched when a run on this device cannot start."""

    def world_size(self) -> int:
        """How many training processes there are in all, known before any of them starts."""
        return _env_int("WORLD_SIZE", 1)

    def launch(self, fn: Callable, args: tuple = ()) -> Any:
        """Run ``fn(index, *args)`` in this device's processes; what it returns when run here, else None.

        CPU and CUDA: this process is the one (torchrun started the others).
        """
        return fn(0, *args)

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def join_process_group(self, init_group: bool = True) -> ProcessInfo:
        """This process's place among the training processes; with several, it joins their group.

        ``init_group=False`` leaves ``torch.distributed.init_process_group`` to the caller
        (open_clip_train initialises the group itself, from the torchrun variables).
        """
        world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        self._device = self.torch_device(local)
        self._select(self._device)
        if init_group and world > 1 and not dist.is_initialized():
            dist.init_process_group(self.dist_backend)
        return ProcessInfo(rank, local, world, self._device)

    def _select(self, device: torch.device) -> None:
        """Make ``device`` this process's current one (before its process group is joined)."""

    def ddp_device_ids(self, device_ids):
        """DistributedDataParallel's ``device_ids``: DDP refuses any for CPU (and XLA) modules."""
        return None

    def open_clip_train_args(self) -> list:
        """open_clip_train arguments this device needs beyond ``--device`` and ``--dist-backend``."""
        return []

    # ---- the training step ---------------------------------------------------------

    def step_boundary(self) -> None:
        """What follows each optimizer step (nothing here; XLA: the end of the step's graph)."""

    @contextlib.contextmanager
    def optimizer_hooks(self, metrics_path=None) -> Iterator["Device"]:
        """``step_boundary`` after every ``optimizer.step()`` of any optimizer, while inside.

        Through torch's global optimizer post-hook, so the optimizer is torch's (or timm's)
        own class, not a subclass made for the device; the hook is removed on leaving.
        ``metrics_path``: where a device that records per-step metrics writes them.
        """
        handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: self.step_boundary())
        try:
            yield self
        finally:
            handle.remove()

    # ---- data ----------------------------------------------------------------------

    @property
    def batch_device(self) -> torch.device:
        """Where a uint8 batch is normalised: the training device, or the CPU when batches cross later."""
        return torch.device("cpu")

    def wrap_loader(self, loader):
        """A loader whose batches arrive on the device (here: the loader itself; the step moves them)."""
        return loader

    def shard(self, module: torch.nn.Module) -> int:
        """Shard ``module``'s weights over the devices (XLA FSDP); the number sharded."""
        return 0

    # ---- checkpoints ---------------------------------------------------------------

    def to_cpu(self, obj):
        """``obj`` with its tensors readable without this device's runtime (here: itself)."""
        return obj

    def save(self, obj, path: os.PathLike):
        """Write a whole checkpoint (atomically: the old file or the new one, never half of one)."""
        return save_checkpoint(self.to_cpu(obj), path)

    # ---- measuring (apps/bench.py) -------------------------------------------------

    def synchronize(self, device: Optional[torch.device] = None) -> None:
        """Wait for the work queued on ``device`` (the CPU runs synchronously)."""

    def peak_memory(self, fn: Callable[[], object], device: Optional[torch.device] = None) -> Optional[int]:
        """Peak bytes the allocator held while ``fn`` ran once; None (``fn`` not run) without such a counter."""
        return None


class CpuDevice(Device):
    pass


class CudaDevice(Device):
    name = "cuda"
    dist_backend = "nccl"
    pin_memory = True
    is_accelerator = True

    def check_ready(self) -> None:
        if not torch.cuda.is_available():
            raise RecipeError("device=cuda, but torch sees no CUDA device here: set device=cpu, or leave device "
                              "unset (cuda when available, else cpu)")

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)

    def _select(self, device: torch.device) -> None:
        torch.cuda.set_device(device)  # before the group: NCCL binds each rank to its current GPU

    def ddp_device_ids(self, device_ids):
        return device_ids

    @property
    def batch_device(self) -> torch.device:
        return self._device or torch.device("cuda")

    def synchronize(self, device: Optional[torch.device] = None) -> None:
        torch.cuda.synchronize(device)

    def peak_memory(self, fn: Callable[[], object], device: Optional[torch.device] = None) -> Optional[int]:
        self.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        self.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
