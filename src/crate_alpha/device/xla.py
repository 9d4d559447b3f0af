"""XLA devices (TPU; XLA:CPU for tests) for both trainers, from the same recipe files.

open_clip_train has no XLA support, but its loop needs very little to run on one: a device
string, the XLA process group, a step boundary, and CPU copies of what it saves. So the
CLIP trainer stays open_clip_train itself (model, loss, webdataset pipeline, scheduler,
checkpoints, resuming, logging) and this module supplies only those pieces, installed
by ``patches.install(..., xla=...)``; the classification trainer (our own short loop over
timm's parts) calls the same helpers. A second, XLA-only training loop would have been
larger and would drift from the CPU/GPU one, which is what the parity tests compare.

* launcher: ``torch_xla.launch`` runs one process per device (per TPU chip; under
  torchrun it uses the torchrun processes); each process sees its device as ``xla:0``.
* bf16: ``torch.autocast("xla", bfloat16)``, the same ``amp_bf16`` / ``bf16`` precision keys.
* step boundary: ``torch_xla.sync()`` right after each optimizer step, so the whole step
  (forward, backward, clipping, update) is one graph, and logging reads losses that are
  already computed instead of tracing a second, different graph.
* input: batches cross to the device in a background thread (``MpDeviceLoader``); the
  loaders drop the last partial batch, so every step has the same shapes and the step
  graph compiles once. ``xla_metrics.json`` in the run folder records the compile count
  after every step.
* checkpoints: tensors are copied to the CPU before ``torch.save``, so a checkpoint written
  on XLA is the same file a CPU/GPU run writes (loads without torch_xla, and resumes).
* FSDP for the big models: SPMD sharding annotations (the mechanism torch_xla's FSDPv2 is
  built on), applied to the module in place, so its ``state_dict`` keeps its names:
  every weight matrix is sharded along its first dimension over a one-axis ``fsdp`` mesh
  of all devices, and every batch along the batch dimension; XLA's SPMD partitioner
  inserts the all-gathers and reduce-scatters (ZeRO-3). SPMD is one process per host
  (no launcher), and one host: across hosts every host would read the whole data stream.

``XlaDevice`` puts these pieces behind the trainers' device seam (``crate_alpha.device``).
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..common import write_json
from ..errors import XlaUnavailable
from .base import Device, ProcessInfo


def require() -> None:
    try:
        import torch_xla  # noqa: F401
    except ImportError as e:
        raise XlaUnavailable(
            f"device=xla needs torch_xla ({e}); use the XLA environment: `make venv-xla` "
            "(.venv-xla: torch 2.9.0 + torch_xla 2.9.0) or `pip install -e '.[tpu]'`") from None
    from torch_xla._internal import tpu

    os.environ.setdefault("PJRT_DEVICE", "TPU" if tpu.num_available_chips() else "CPU")


def launcher_world_size() -> int:
    """How many processes ``launch`` will run in all, known before the runtime starts.

    (Asking the runtime would start it, after which torch_xla refuses to launch.)
    """
    if os.environ.get("WORLD_SIZE"):  # under torchrun
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("PJRT_DEVICE") == "TPU":
        from torch_xla._internal import tpu

        return tpu.num_local_processes() * tpu.num_tpu_workers()
    if int(os.environ.get("CPU_NUM_DEVICES", "1")) > 1:
        # the launcher runs one *thread* per XLA:CPU device, which open_clip_train's
        # process-global state cannot share; several CPU devices are for fsdp=True
        raise XlaUnavailable("data-parallel training on XLA:CPU uses one device per process: unset "
                             "CPU_NUM_DEVICES (or set it to 1), or set fsdp=True to shard over the devices")
    return 1


def check_ready(fsdp: bool) -> None:
    """Fail before any data or model is touched when an XLA run cannot start."""
    require()
    if not fsdp:
        launcher_world_size()


def is_xla(x: Any) -> bool:
    dev = getattr(x, "device", x)
    return getattr(dev, "type", str(dev).split(":")[0]) == "xla"


def device() -> torch.device:
    import torch_xla

    return torch_xla.device()


def sync() -> None:
    import torch_xla

    torch_xla.sync()


def ordinals() -> tuple:
    """(global rank, local rank, world size) of this process among the launcher's processes."""
    import torch_xla.runtime as xr

    return xr.global_ordinal(), xr.local_ordinal(), xr.world_size()


def launch(fn: Callable, args: tuple = ()) -> None:
    """Run ``fn(index, *args)`` in one process per device."""
    import torch_xla

    torch_xla.launch(fn, args=args)


def to_cpu(obj):
    """A copy of ``obj`` (nested dicts/lists of tensors) with every XLA tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu() if is_xla(obj) else obj
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def has_xla_tensors(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return is_xla(obj)
    if isinstance(obj, dict):
        return any(has_xla_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_xla_tensors(v) for v in obj)
    return False


def compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def execute_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("ExecuteTime")
    return int(data[0]) if data else 0


class StepMetrics:
    """Compile and execution counts after every step, written to ``xla_metrics.json``."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path else None
        self.steps = []
        self.t0 = time.time()

    def step(self) -> None:
        self.steps.append({"step": len(self.steps) + 1, "compiles": compile_count(),
                           "executions": execute_count(), "seconds": round(time.time() - self.t0, 3)})
        if self.path is not None and (len(self.steps) <= 10 or len(self.steps) % 50 == 0):
            self.write()

    def write(self) -> None:
        if self.path is not None:
            write_json({"steps": self.steps}, self.path)


class _KeepError:
    """Iterates ``loader``; an exception ends the iteration and is kept in ``error``."""

    def __init__(self, loader):
        self.loader, self.error = loader, None

    def __iter__(self):
        try:
            yield from self.loader
        except Exception as e:  # noqa: BLE001 - handed to the consuming thread
            self.error = e

    def __len__(self):
        return len(self.loader)


class DeviceLoader:
    """An open_clip_train / torch DataLoader whose batches arrive on the XLA device.

    Keeps the wrapped loader's attributes (``num_batches``, ``num_samples``, ``sampler``)
    so code written for the plain loader does not notice.
    """

    def __init__(self, loader, dev=None, mesh=None):
        self._loader, self._device, self._mesh = loader, dev, mesh

    def __iter__(self):
        import torch_xla.distributed.parallel_loader as pl

        # torch_xla reads the CPU loader on a background thread, where an exception (a loader
        # worker that cannot start, a broken shard list) only ends the thread: the epoch would
        # look empty and training "finish" with no step; it is re-raised here instead
        source = _KeepError(self._loader)
        for batch in pl.MpDeviceLoader(source, self._device or device()):
            yield batch if self._mesh is None else shard_batch(batch, self._mesh)
        if source.error is not None:
            raise source.error

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


# ---- SPMD FSDP ----------------------------------------------------------------------

def use_spmd() -> Any:
    """Switch this process to SPMD and return a one-axis ('fsdp',) mesh of all devices."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    if xr.process_count() > 1:
        # each host would read the whole data stream as if it were the global batch
        raise XlaUnavailable("fsdp=True shards over the devices of one host; this run spans "
                             f"{xr.process_count()} hosts: use data-parallel (fsdp=False) across hosts")
    n = xr.global_runtime_device_count()
    return xs.Mesh(np.arange(n), (n,), ("fsdp",))


def shard_module(module: torch.nn.Module, mesh) -> int:
    """Shard every parameter with two or more dimensions along dim 0 over ``fsdp``; returns the count."""
    import torch_xla.distributed.spmd as xs

    n = 0
    for p in module.parameters():
        if p.dim() >= 2:
            xs.mark_sharding(p, mesh, ("fsdp",) + (None,) * (p.dim() - 1))
            n += 1
    return n


def shard_batch(batch, mesh):
    """Shard every tensor of a batch along its first (batch) dimension."""
    import torch_xla.distributed.spmd as xs

    if isinstance(batch, torch.Tensor):
        if batch.dim() >= 1:
            xs.mark_sharding(batch, mesh, ("fsdp",) + (None,) * (batch.dim() - 1))
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(b, mesh) for b in batch)
    if isinstance(batch, dict):
        return {k: shard_batch(v, mesh) for k, v in batch.items()}
    return batch


# ---- the device seam ----------------------------------------------------------------

class XlaDevice(Device):
    """``device=xla``: one process per device from torch_xla's launcher, or with ``fsdp`` one SPMD
    process over all of them; a step boundary after each optimizer step; batches moved by
    the device loader; checkpoints copied to the CPU."""

    name = "xla"
    dist_backend = "xla"
    fused_optimizer = False  # torch's fused AdamW has no XLA kernels
    static_shapes = True
    is_accelerator = True
    ddp_kwargs = {"gradient_as_bucket_view": True}

    def __init__(self, fsdp: bool = False):
        super().__init__(fsdp)
        self._mesh = None
        self.metrics: Optional[StepMetrics] = None

    def check_ready(self) -> None:
        check_ready(self.fsdp)

    def world_size(self) -> int:
        # SPMD: one process drives every device; the batch is sharded, not split
        return 1 if self.fsdp else launcher_world_size()

    def launch(self, fn: Callable, args: tuple = ()) -> Any:
        if self.fsdp:
            return fn(0, *args)  # SPMD is one process; torch_xla's launcher does not support it
        launch(fn, args)
        return None

    @property
    def mesh(self):
        """The SPMD mesh of all devices (fsdp only); the process switches to SPMD on first use."""
        if self.fsdp and self._mesh is None:
            self._mesh = use_spmd()
        return self._mesh

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return device()  # each launcher process sees its one device as xla:0

    def join_process_group(self, init_group: bool = True) -> ProcessInfo:
        if self.fsdp:
            self.mesh  # noqa: B018 - SPMD before the device is first used
            return ProcessInfo(0, 0, 1, device())
        rank, local, world = ordinals()
        if world > 1:
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the 'xla' backend)
            import torch.distributed as dist

            # open_clip_train (and DistributedSampler users) read the torchrun variables
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world))
            if init_group and not dist.is_initialized():
                dist.init_process_group("xla", init_method="xla://")
        return ProcessInfo(rank, local, world, device())

    def open_clip_train_args(self) -> list:
        # each launcher process sees its one device as xla:0, so no per-rank device index
        return ["--dist-url", "xla://", "--no-set-device-rank"]

    def step_boundary(self) -> None:
        sync()  # the whole step is one graph; what is logged after it is already computed
        if self.metrics is not None:
            self.metrics.step()

    @contextlib.contextmanager
    def optimizer_hooks(self, metrics_path=None):
        self.metrics = StepMetrics(metrics_path)
        try:
            with super().optimizer_hooks(metrics_path):
                yield self
        finally:
            self.metrics.write()
            self.metrics = None

    def wrap_loader(self, loader):
        return DeviceLoader(loader, device(), mesh=self.mesh)

    def shard(self, module: torch.nn.Module) -> int:
        return shard_module(module, self.mesh) if self.fsdp else 0

    def to_cpu(self, obj):
        return to_cpu(obj)

    def synchronize(self, device=None) -> None:
        import torch_xla.core.xla_model as xm

        sync()
        xm.wait_device_ops()
