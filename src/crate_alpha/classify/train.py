"""The supervised trainer: timm's parts (transforms with RandAugment, Mixup/CutMix, soft-target
and label-smoothing losses, optimizer factory, cosine scheduler, model EMA) around a short
loop, with DDP through torchrun and bf16 autocast.

The loop itself is written here because timm ships its training loop only as a script
(train.py), not as a library function. ``device=xla`` runs the same loop on TPUs (or
XLA:CPU) through ``crate_alpha.train.xla``: one process per device from torch_xla's
launcher, batches moved by its device loader, Mixup/CutMix on the host (a CutMix box of
random size on the device would give every step a new graph), a step boundary after
each optimizer step, and ``fsdp=True`` for SPMD sharding over all devices.
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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy
from tqdm import tqdm

from ..train import xla as xla_rt
from ..train.hooks import atomic_save
from ..train.recipe import RecipeError, check_resume_compatible, load_recipe
from .data import check_path, eval_transform, make_loader, num_classes_of, train_transform
from .init import load_encoder, local_dir_args

_log = logging.getLogger("crate_alpha.classify")

DEFAULTS: Dict[str, Any] = {
    "model": "crate_alpha_base_patch16_224",  # timm name, or local-dir:FOLDER
    "num_classes": None,            # None: from the ImageFolder's class folders
    "image_size": 224,
    "drop_path": 0.0,
    "train_data": None,             # ImageFolder directory or .tar shard pattern (.jpg + .cls)
    "val_data": None,
    "train_num_samples": None,      # for shards; None: counted
    "workers": 4,
    # optimisation
    "epochs": 91,
    "global_batch": 4096,
    "lr_per_256": 5e-5,             # lr = lr_per_256 * global_batch / 256
    "min_lr": 1e-6,
    "warmup_epochs": 10,
    "warmup_lr": 1e-6,
    "weight_decay": 0.1,
    "opt": "adamw",
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,
    "precision": "bf16",            # bf16 autocast, or fp32
    "model_ema": False,
    "model_ema_decay": 0.9999,
    # augmentation and loss
    "crop_scale": (0.08, 1.0),      # inception crop
    "crop_ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
    "rand_augment": None,           # e.g. 'rand-m9-n2-mstd0.5'
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_switch_prob": 0.5,
    "label_smoothing": 0.0,
    "eval_crop_pct": 0.875,
    # initialisation
    "init_from": None,              # our checkpoint, an open_clip CRATE-α checkpoint, or local-dir:FOLDER
    "new_head": False,
    "load_patch_embed": True,
    # bookkeeping
    "output": "runs/cls",
    "name": None,
    "seed": 0,
    "log_every_n_steps": 50,        # also the interval of train_log.jsonl (loss and lr per step)
    # hardware
    "device": None,                 # None: cuda when available, else cpu; 'xla': TPU (or XLA:CPU)
    "fsdp": False,                  # on XLA: shard weights and batch over all devices (SPMD FSDP)
}


def _dist(cfg: dict):
    if cfg.get("device") == "xla":
        if cfg["fsdp"]:
            return 0, 1, xla_rt.device()
        rank, _, world = xla_rt.ordinals()
        if world > 1 and not dist.is_initialized():
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the 'xla' backend)

            dist.init_process_group("xla", init_method="xla://")
        return rank, world, xla_rt.device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and cfg.get("device") != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def build_model(cfg: dict, num_classes: int) -> nn.Module:
    import timm

    import crate_alpha  # noqa: F401

    name = cfg["model"]
    kwargs = {"num_classes": num_classes, "img_size": cfg["image_size"], "drop_path_rate": cfg["drop_path"]}
    if name.startswith("local-dir:"):
        args = local_dir_args(name)
        name = args.pop("architecture")
        args.pop("num_classes", None)
        args.pop("img_size", None)
        kwargs = {**args, **kwargs}
    return timm.create_model(name, **kwargs)


def evaluate(model: nn.Module, loader, device, precision: str = "bf16") -> dict:
    model.eval()
    n = top1 = top5 = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(x)
            k = min(5, out.shape[1])
            a1, a5 = accuracy(out.float(), y, topk=(1, k))
            top1 += a1.item() * len(y)
            top5 += a5.item() * len(y)
            n += len(y)
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "samples": int(n)}


def _plot(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [h["train_loss"] for h in history])
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("train loss")
    if any("top1" in h for h in history):
        ax[1].plot(ep, [h.get("top1") for h in history], label="top-1")
        ax[1].plot(ep, [h.get("top5") for h in history], label="top-5")
        ax[1].set_ylabel("val accuracy (%)")
        ax[1].legend()
    ax[1].set_xlabel("epoch")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class _HostMixup:
    """Mixup/CutMix applied to CPU batches, before they cross to an XLA device."""

    def __init__(self, loader, mixup):
        self.loader, self.mixup = loader, mixup

    def __iter__(self):
        for x, y in self.loader:
            yield self.mixup(x, torch.as_tensor(y))

    def __len__(self):
        return len(self.loader)


def train(recipe: str | None, overrides=(), cfg: dict | None = None) -> dict:
    cfg = cfg or load_recipe(recipe, overrides, defaults=DEFAULTS)
    if cfg.get("device") == "xla":
        try:
            xla_rt.require()
            if not cfg["fsdp"]:
                xla_rt.launcher_world_size()
        except xla_rt.XlaUnavailable as e:
            raise RecipeError(str(e)) from None
    _check_data(cfg)
    if cfg.get("device") == "xla" and not cfg["fsdp"]:
        xla_rt.launch(_xla_process, args=(cfg,))
        return json.loads((Path(cfg["output"]) / cfg["name"] / "summary.json").read_text())
    return _train(cfg)


def _xla_process(index: int, cfg: dict) -> None:
    _train(cfg)


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


def _train(cfg: dict) -> dict:
    num_classes = cfg["num_classes"] or num_classes_of(cfg["train_data"])
    on_xla = cfg.get("device") == "xla"
    mesh = xla_rt.use_spmd() if on_xla and cfg["fsdp"] else None
    rank, world, device = _dist(cfg)
    random.seed(cfg["seed"] + rank)  # timm's crops and flips draw from Python's random
    np.random.seed(cfg["seed"] + rank)  # timm's Mixup draws from numpy
    torch.manual_seed(cfg["seed"] + rank)
    gb = int(cfg["global_batch"])
    if gb % world:
        raise RecipeError(f"global_batch {gb} is not divisible by {world} processes")
    batch = gb // world
    run_dir = Path(cfg["output"]) / cfg["name"]
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / "latest.pt"

    model = build_model(cfg, num_classes)
    resume = torch.load(latest, map_location="cpu", weights_only=True) if latest.is_file() else None
    init_report = None
    if resume is None and cfg["init_from"]:
        init_report = load_encoder(model, cfg["init_from"], cfg["new_head"], cfg["load_patch_embed"])
    model.to(device)
    if mesh is not None:
        xla_rt.shard_module(model, mesh)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    train_loader, n_train, sampler = make_loader(cfg["train_data"], train_transform(cfg, mean, std), batch, True,
                                                 cfg["workers"], rank, world, cfg["seed"], cfg["train_num_samples"])
    val_loader = None
    if cfg["val_data"] and rank == 0:
        val_loader, _, _ = make_loader(cfg["val_data"], eval_transform(cfg["image_size"], mean, std,
                                                                       cfg["eval_crop_pct"]),
                                       batch, False, cfg["workers"])
    steps = max(n_train // gb, 1)
    lr = cfg["lr_per_256"] * gb / 256
    optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=lr, weight_decay=cfg["weight_decay"],
                                    betas=(cfg["beta1"], cfg["beta2"]))
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg["epochs"],
                                       warmup_epochs=cfg["warmup_epochs"], warmup_lr=cfg["warmup_lr"],
                                       min_lr=cfg["min_lr"], step_on_epochs=False, updates_per_epoch=steps)
    mixup = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], switch_prob=cfg["mixup_switch_prob"],
                      label_smoothing=cfg["label_smoothing"], num_classes=num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif cfg["label_smoothing"] > 0:
        loss_fn = LabelSmoothingCrossEntropy(cfg["label_smoothing"])
    else:
        loss_fn = nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=cfg["model_ema_decay"]) if cfg["model_ema"] else None
    start_epoch, num_updates, history = 0, 0, []
    if resume is not None:
        check_resume_compatible(json.loads(resume.get("recipe", "{}")), cfg, run_dir)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None and "ema" in resume:
            ema.module.load_state_dict(resume["ema"])
        start_epoch, num_updates = resume["epoch"], resume["num_updates"]
        history = json.loads(resume["history"])
        _log.info("resuming %s at epoch %d", latest, start_epoch)
    ddp_kwargs = {"gradient_as_bucket_view": True} if on_xla else {}
    ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs) if world > 1 else model
    batches = train_loader
    if on_xla:
        if mixup is not None:
            batches, mixup = _HostMixup(train_loader, mixup), None
        batches = xla_rt.DeviceLoader(batches, device, mesh=mesh)
    metrics = xla_rt.StepMetrics(run_dir / "xla_metrics.json" if rank == 0 else None) if on_xla else None
    log_path = run_dir / "train_log.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("*.partial-*"):  # a write cut short by a kill
            stale.unlink()
        (run_dir / "recipe.json").write_text(json.dumps({"recipe": cfg, "num_classes": num_classes, "lr": lr,
                                                          "batch_per_process": batch, "world_size": world,
                                                          "init": init_report}, indent=2, default=str))
    t0 = time.time()
    use_bf16 = cfg["precision"] == "bf16"
    for epoch in range(start_epoch, cfg["epochs"]):
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        ddp.train()
        total, count = 0.0, 0
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=rank != 0,
                   leave=False)
        for x, y in bar:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            if mixup is not None:
                x, y = mixup(x, y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            if on_xla:
                xla_rt.sync()  # the whole step is one graph; the loss below is already computed
                metrics.step()
            num_updates += 1
            lr_now = optimizer.param_groups[0]["lr"]
            scheduler.step_update(num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
            value = loss.item()
            total += value
            count += 1
            bar.set_postfix(loss=f"{total / count:.3f}", lr=f"{lr_now:.2e}")
            if rank == 0 and (num_updates % cfg["log_every_n_steps"] == 0 or num_updates == 1):
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": num_updates, "epoch": epoch + 1, "loss": value, "lr": lr_now}) + "\n")
        row = {"epoch": epoch + 1, "train_loss": total / max(count, 1), "seconds": time.time() - t0}
        if rank == 0:
            if val_loader is not None:
                row.update(evaluate(ema.module if ema is not None else model, val_loader, device, cfg["precision"]))
            history.append(row)
            print(json.dumps(row), flush=True)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "num_updates": num_updates, "history": json.dumps(history),
                     "model_name": cfg["model"], "num_classes": num_classes, "image_size": cfg["image_size"],
                     "recipe": json.dumps(cfg, default=str)}
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(state, latest)
        if world > 1:
            dist.barrier()
    summary = {"seconds": time.time() - t0, "epochs": cfg["epochs"], "history": history,
               "checkpoint": str(latest), "num_classes": num_classes}
    if history:
        summary.update({k: history[-1][k] for k in ("top1", "top5") if k in history[-1]})
    if metrics is not None:
        metrics.write()
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if history:
            _plot(history, run_dir / "curves.png")
    if world > 1:
        dist.destroy_process_group()
    return summary
