"""The classification trainer: timm's parts (transforms with RandAugment, Mixup/CutMix,
soft-target and label-smoothing losses, optimizer factory, cosine scheduler, model EMA)
around a short loop, with DDP through torchrun, bf16 autocast and optional torch.compile.

The loop itself is written here because timm ships its training loop only as a script
(train.py), not as a library function; the recipe keys are that script's argument names.
Everything that depends on the device goes through ``crate_alpha.device``'s seam, so
``device=xla`` runs the same loop on TPUs (or XLA:CPU): one process per device from
torch_xla's launcher, batches moved by its device loader, Mixup/CutMix on the host (a
CutMix box of random size on the device would give every step a new graph), a step
boundary after each optimizer step, and ``fsdp=True`` for SPMD sharding over all devices.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy
from tqdm import tqdm

from ..common import write_json
from ..device import Device, for_name
from .. import run_folder
from ..recipe import (COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, RecipeError,
                      check_resume_compatible, check_values, load_recipe)
from ..visualize import plot_panels
from ..data.decode import SkipCounter
from .data import check_path, class_names_of, eval_transform, make_loader, num_classes_of
from .init import load_encoder, timm_model_args

_log = logging.getLogger("crate_alpha.classifier")

# Keys are timm train.py's argument names where it has one (``--clip-grad`` -> clip_grad).
DEFAULTS: Dict[str, Any] = {
    "model": "crate_alpha_base_patch16_224",  # timm name, or local-dir:FOLDER
    "num_classes": None,            # None: from the ImageFolder's class folders
    "img_size": 224,
    "drop_path": 0.0,
    "torchcompile": None,           # a torch.compile backend ('inductor'; True means inductor), None: eager
    "train_data": None,             # ImageFolder directory or .tar shard pattern (.jpg + .cls)
    "val_data": None,
    "train_num_samples": None,      # for shards; None: counted
    "workers": 4,                   # loader processes per training process
    "prefetch_factor": None,        # batches each worker keeps ready (None: torch's 2)
    # optimisation
    "epochs": 91,
    "global_batch": 4096,
    "lr_base": 5e-5,                # lr at batch 256; lr = lr_base * global_batch / 256 (linear, as the paper)
    "min_lr": 1e-6,
    "warmup_epochs": 10,
    "warmup_lr": 1e-6,
    "weight_decay": 0.1,
    "opt": "adamw",
    "opt_betas": (0.9, 0.95),
    "clip_grad": 1.0,
    "amp": True,                    # bf16 autocast (amp_dtype)
    "amp_dtype": "bfloat16",
    "model_ema": False,
    "model_ema_decay": 0.9999,
    # augmentation and loss
    "scale": (0.08, 1.0),           # inception crop
    "ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
    "aa": None,                     # RandAugment, e.g. 'rand-m9-n2-mstd0.5'
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_switch_prob": 0.5,
    "smoothing": 0.0,
    "crop_pct": 0.875,              # evaluation centre crop
    # initialisation
    "initial_checkpoint": None,     # our checkpoint, an open_clip CRATE-α checkpoint, or local-dir:FOLDER
    "new_head": False,
    "load_patch_embed": True,
    # bookkeeping
    "output": "runs/cls",
    "experiment": None,             # run folder name under output; None: the recipe's file name
    "seed": 0,
    "log_interval": 50,             # steps between train_log.jsonl rows (loss, lr, data and batch time)
    # hardware
    "device": None,                 # None: cuda when available, else cpu; 'xla': TPU (or XLA:CPU)
    "fsdp": False,                  # on XLA: shard weights and batch over all devices (SPMD FSDP)
}

# Before the keys took timm's names; an old recipe gets told the new one.
RENAMED = {"image_size": "img_size", "crop_scale": "scale", "crop_ratio": "ratio", "rand_augment": "aa",
           "label_smoothing": "smoothing", "eval_crop_pct": "crop_pct", "grad_clip": "clip_grad",
           "beta1": "opt_betas", "beta2": "opt_betas", "lr_per_256": "lr_base", "init_from": "initial_checkpoint",
           "name": "experiment", "log_every_n_steps": "log_interval", "precision": "amp"}

# What may change when a run is resumed: how it runs, not what it computes. Any other key
# changed between a run and its resumption would silently mix two experiments (refused).
RESUMABLE_CHANGES = ("workers", "prefetch_factor", "log_interval", "device", "fsdp", "torchcompile", "output",
                     "experiment")

VALUES = {"num_classes": POSITIVE_INT, "img_size": POSITIVE_INT, "drop_path": FRACTION,
          "train_num_samples": POSITIVE_INT, "workers": COUNT, "prefetch_factor": POSITIVE_INT,
          "epochs": POSITIVE_INT, "global_batch": POSITIVE_INT, "lr_base": POSITIVE, "min_lr": NON_NEGATIVE,
          "warmup_epochs": NON_NEGATIVE, "warmup_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
          "clip_grad": NON_NEGATIVE, "model_ema_decay": PROBABILITY, "hflip": PROBABILITY, "mixup": NON_NEGATIVE,
          "cutmix": NON_NEGATIVE, "mixup_switch_prob": PROBABILITY, "smoothing": FRACTION,
          "crop_pct": POSITIVE, "seed": COUNT, "log_interval": POSITIVE_INT}
OPTIONAL = ("num_classes", "train_num_samples", "prefetch_factor", "clip_grad")


def load(recipe: str | None, overrides=()) -> Dict[str, Any]:
    cfg = load_recipe(recipe, overrides, DEFAULTS, "experiment", RENAMED)
    check_values(cfg, VALUES, OPTIONAL)
    return cfg


def run_dir_of(cfg: dict) -> Path:
    return Path(cfg["output"]) / cfg["experiment"]


def _autocast_dtype(cfg: dict):
    return getattr(torch, cfg["amp_dtype"]) if cfg["amp"] else None


def device_of(cfg: dict) -> Device:
    """The recipe's training device (``crate_alpha.device``)."""
    return for_name(cfg.get("device"), fsdp=cfg["fsdp"])


def build_model(cfg: dict, num_classes: int) -> nn.Module:
    import timm

    name = cfg["model"]
    kwargs = {"num_classes": num_classes, "img_size": cfg["img_size"], "drop_path_rate": cfg["drop_path"]}
    if name.startswith("local-dir:"):
        # the folder's architecture and model_args; its weights are loaded by initial_checkpoint
        args = timm_model_args(name)
        name = args.pop("architecture")
        kwargs = {**args, **kwargs}
    return timm.create_model(name, **kwargs)


def compiled(model: nn.Module, backend) -> nn.Module:
    """``model`` under torch.compile (``backend`` True means inductor), or itself when None/False."""
    if not backend:
        return model
    return torch.compile(model, backend="inductor" if backend is True else backend)


def evaluate(model: nn.Module, loader, device, amp_dtype=torch.bfloat16) -> dict:
    model.eval()
    n = top1 = top5 = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                out = model(x)
            k = min(5, out.shape[1])
            a1, a5 = accuracy(out.float(), y, topk=(1, k))
            top1 += a1.item() * len(y)
            top5 += a5.item() * len(y)
            n += len(y)
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "samples": int(n)}


def _plot(history, path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    panels = {"train loss": {"train": list(zip(epochs, [h["train_loss"] for h in history]))}}
    if any("top1" in h for h in history):
        panels["val accuracy (%)"] = {k: [(h["epoch"], h[k]) for h in history if k in h] for k in ("top1", "top5")}
    plot_panels(panels, path)


class _HostMixup:
    """Mixup/CutMix applied to CPU batches, before they cross to a device that needs static shapes (XLA)."""

    def __init__(self, loader, mixup):
        self.loader, self.mixup = loader, mixup

    def __iter__(self):
        for x, y in self.loader:
            yield self.mixup(x, torch.as_tensor(y))

    def __len__(self):
        return len(self.loader)


def train(recipe: str | None, overrides=(), cfg: dict | None = None) -> dict:
    cfg = cfg or load(recipe, overrides)
    dev = device_of(cfg)
    dev.check_ready()
    _check_data(cfg)
    run_dir = run_dir_of(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the folder for the whole run
        return _train(cfg)
    run_folder.claim(run_dir, run_folder.CLASSIFIER_RUN)
    with run_folder.locked(run_dir):
        summary = dev.launch(_process, (cfg,))
        # launched in other processes (XLA's launcher), rank 0 left its summary in the run folder
        return summary if summary is not None else json.loads((run_dir / "summary.json").read_text())


def _process(index: int, cfg: dict) -> dict:
    return _train(cfg)


def _check_data(cfg: dict) -> None:
    # everything about the data is checked before a model is built
    check_path(cfg["train_data"], "train_data")
    if cfg["val_data"]:
        check_path(cfg["val_data"], "val_data")
    folder_classes = num_classes_of(cfg["train_data"])
    num_classes = cfg["num_classes"] or folder_classes
    if num_classes is None:
        raise RecipeError("num_classes is needed for shard data (it cannot be read from the shards)")
    if folder_classes is not None and folder_classes != num_classes:
        raise RecipeError(f"{cfg['train_data']} has {folder_classes} class folders but num_classes={num_classes}")


def _train_transform(cfg: dict, mean, std):
    return create_transform(
        input_size=cfg["img_size"], is_training=True, scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]),
        hflip=cfg["hflip"], vflip=0.0, color_jitter=None, auto_augment=cfg["aa"] or None,
        interpolation="bicubic", mean=mean, std=std, re_prob=0.0)


class StepTiming:
    """Data wait and step time, as timm's train.py and open_clip_train log them (``Data`` / ``Batch``)."""

    def __init__(self):
        self.data = self.batch = 0.0  # whole run
        self.steps = 0
        self._data = self._batch = 0.0  # since the last log row
        self._steps = 0

    def add(self, data_time: float, batch_time: float) -> None:
        self.data += data_time
        self.batch += batch_time
        self.steps += 1
        self._data += data_time
        self._batch += batch_time
        self._steps += 1

    @property
    def data_share(self) -> float:
        return self.data / self.batch if self.batch else 0.0

    def interval(self) -> dict:
        n = max(self._steps, 1)
        row = {"data_time": self._data / n, "batch_time": self._batch / n}
        self._data = self._batch = 0.0
        self._steps = 0
        return row

    def totals(self) -> dict:
        n = max(self.steps, 1)
        return {"data_time": self.data / n, "batch_time": self.batch / n, "data_wait_share": self.data_share}


def _train(cfg: dict) -> dict:
    num_classes = cfg["num_classes"] or num_classes_of(cfg["train_data"])
    dev = device_of(cfg)
    rank, _, world, device = dev.join_process_group()
    random.seed(cfg["seed"] + rank)  # timm's crops and flips draw from Python's random
    np.random.seed(cfg["seed"] + rank)  # timm's Mixup draws from numpy
    torch.manual_seed(cfg["seed"] + rank)
    gb = int(cfg["global_batch"])
    if gb % world:
        raise RecipeError(f"global_batch {gb} is not divisible by {world} processes")
    batch = gb // world
    run_dir = run_dir_of(cfg)
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / "latest.pt"

    model = build_model(cfg, num_classes)
    resume = torch.load(latest, map_location="cpu", weights_only=True) if latest.is_file() else None
    if resume is not None:
        check_resume_compatible(json.loads(resume.get("recipe", "{}")), cfg, run_dir,
                                [k for k in cfg if k not in RESUMABLE_CHANGES])
    init_report = None
    if resume is None and cfg["initial_checkpoint"]:
        init_report = load_encoder(model, cfg["initial_checkpoint"], cfg["new_head"], cfg["load_patch_embed"])
    model.to(device)
    dev.shard(model)  # XLA FSDP; elsewhere nothing
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    skipped = SkipCounter()  # images that do not decode: skipped, named, counted across the loader workers
    train_loader, n_train, sampler = make_loader(cfg["train_data"], _train_transform(cfg, mean, std), batch, True,
                                                 cfg["workers"], rank, world, cfg["seed"], cfg["train_num_samples"],
                                                 counter=skipped, prefetch_factor=cfg["prefetch_factor"])
    val_loader = None
    if cfg["val_data"] and rank == 0:
        val_loader, _, _ = make_loader(cfg["val_data"], eval_transform(cfg["img_size"], mean, std, cfg["crop_pct"]),
                                       batch, False, cfg["workers"], counter=skipped)
    steps = max(n_train // gb, 1)
    lr = cfg["lr_base"] * gb / 256
    optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=lr, weight_decay=cfg["weight_decay"],
                                    betas=tuple(cfg["opt_betas"]))
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg["epochs"],
                                       warmup_epochs=cfg["warmup_epochs"], warmup_lr=cfg["warmup_lr"],
                                       min_lr=cfg["min_lr"], step_on_epochs=False, updates_per_epoch=steps)
    mixup = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], switch_prob=cfg["mixup_switch_prob"],
                      label_smoothing=cfg["smoothing"], num_classes=num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif cfg["smoothing"] > 0:
        loss_fn = LabelSmoothingCrossEntropy(cfg["smoothing"])
    else:
        loss_fn = nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=cfg["model_ema_decay"]) if cfg["model_ema"] else None
    start_epoch, num_updates, history = 0, 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None and "ema" in resume:
            ema.module.load_state_dict(resume["ema"])
        start_epoch, num_updates = resume["epoch"], resume["num_updates"]
        history = json.loads(resume["history"])
        _log.info("resuming %s at epoch %d", latest, start_epoch)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **dev.ddp_kwargs) if world > 1 else model
    forward = compiled(ddp, cfg["torchcompile"])  # checkpoints keep saving `model`'s own names
    batches = train_loader
    if mixup is not None and dev.static_shapes:
        batches, mixup = _HostMixup(train_loader, mixup), None
    batches = dev.wrap_loader(batches)
    log_path = run_dir / "train_log.jsonl"
    if rank == 0:
        for stale in ckpt_dir.glob(".*.partial-*"):  # a write cut short by a kill
            stale.unlink()
        record = {"recipe": cfg, "num_classes": num_classes, "lr": lr, "batch_per_process": batch,
                  "world_size": world, "init": init_report}
        if resume is None:
            write_json(record, run_dir / "recipe.json")
        else:  # the first run's recipe.json stays; each resumption is one row
            with open(run_dir / "segments.jsonl", "a") as f:
                f.write(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": start_epoch, **record},
                                   default=str) + "\n")
    t0 = time.time()
    timing = StepTiming()
    amp_dtype = _autocast_dtype(cfg)
    # the step boundary (XLA: the end of the step graph, and xla_metrics.json) after each optimizer step
    with dev.optimizer_hooks(run_dir / "xla_metrics.json" if rank == 0 else None):
        for epoch in range(start_epoch, cfg["epochs"]):
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            ddp.train()
            total, count = 0.0, 0
            bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=rank != 0,
                       leave=False)
            end = time.perf_counter()
            for x, y in bar:
                waited = time.perf_counter() - end  # timm's data_time: how long the step waited for its batch
                x, y = x.to(device), torch.as_tensor(y).to(device)
                if mixup is not None:
                    x, y = mixup(x, y)
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    loss = loss_fn(forward(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg["clip_grad"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
                optimizer.step()  # then dev.step_boundary(): the loss below is already computed
                num_updates += 1
                lr_now = optimizer.param_groups[0]["lr"]
                scheduler.step_update(num_updates)
                if ema is not None:
                    ema.update(model, step=num_updates)
                value = loss.item()
                total += value
                count += 1
                timing.add(waited, time.perf_counter() - end)
                end = time.perf_counter()
                bar.set_postfix(loss=f"{total / count:.3f}", lr=f"{lr_now:.2e}", data=f"{timing.data_share:.0%}")
                if rank == 0 and (num_updates % cfg["log_interval"] == 0 or num_updates == 1):
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": num_updates, "epoch": epoch + 1, "loss": value, "lr": lr_now,
                                            **timing.interval()}) + "\n")
            row = {"epoch": epoch + 1, "train_loss": total / max(count, 1), "seconds": time.time() - t0,
                   "skipped_images": skipped.count}
            if rank == 0:
                if val_loader is not None:
                    row.update(evaluate(ema.module if ema is not None else model, val_loader, device, amp_dtype))
                history.append(row)
                print(json.dumps(row), flush=True)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "num_updates": num_updates, "history": json.dumps(history),
                         "model_name": cfg["model"], "num_classes": num_classes, "image_size": cfg["img_size"],
                         "class_names": class_names_of(cfg["train_data"]),  # cls-eval checks data against them
                         "recipe": json.dumps(cfg, default=str)}
                if ema is not None:
                    state["ema"] = ema.module.state_dict()
                dev.save(state, latest)  # on XLA, a copy on the CPU: the file a CPU/GPU run writes
            if world > 1:
                dist.barrier()
    summary = {"seconds": time.time() - t0, "epochs": cfg["epochs"], "history": history,
               "checkpoint": str(latest), "num_classes": num_classes, "skipped_images": skipped.count,
               **timing.totals()}
    if history:
        summary.update({k: history[-1][k] for k in ("top1", "top5") if k in history[-1]})
    if rank == 0:
        write_json(summary, run_dir / "summary.json")
        if history:
            _plot(history, run_dir / "curves.png")
    if world > 1:
        dist.destroy_process_group()
    return summary
