"""Training recipes: one readable Python file per experiment in ``configs/``.

A recipe file defines ``get_config()`` returning a dict of the keys below (any key left
out keeps its default). Every key can be overridden on the command line as ``key=value``;
an unknown key is an error that lists the known ones.
"""
from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

DEFAULTS: Dict[str, Any] = {
    # model
    "model": "crate-alpha-L-14",        # open_clip name (after `import crate_alpha`) or local-dir:
    "image_size": 224,                  # training resolution (force_image_size)
    "context_length": None,             # text length; None keeps the model's
    # data
    "train_data": None,                 # webdataset shard pattern, e.g. shards/{00000..00099}.tar
    "train_num_samples": None,          # samples per pass over the data; None: counted from the shards
    "workers": 2,
    "fast_decode": True,                # reduced-size JPEG decode before the random resized crop
    # schedule (stated for the reference batch; scaled to the batch actually used)
    "global_batch": 32768,
    "reference_batch": 32768,           # the batch warmup_steps is stated for
    "samples_seen": 2_560_000_000,
    "epochs": None,                     # if set, overrides samples_seen
    "lr_per_256": 8e-6,                 # lr = lr_per_256 * global_batch / 256
    "warmup_steps": 1600,               # at reference_batch; the same number of samples at any batch
    "lr_scheduler": "cosine",
    "weight_decay": 0.2,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "grad_clip": 1.0,
    "precision": "amp_bf16",
    "accum_freq": 1,
    "grad_checkpointing": False,
    # initialisation
    "init_from": None,                  # an open_clip checkpoint to start the whole model from (fine-tuning)
    "pos_embed_init": "resample",       # when the grid changes: 'resample' or 'sincos' (re-initialise)
    "text_init": None,                  # an open_clip checkpoint whose text tower initialises ours
    "lock_text": False,                 # freeze the text tower
    # distributed (open_clip_train's options)
    "local_loss": False,
    "gather_with_grad": False,
    "dist_backend": None,               # None: nccl on GPUs, gloo on CPU, xla on XLA
    "device": None,                     # None: cuda when available, else cpu; 'xla': TPU (or XLA:CPU)
    "fsdp": False,                      # on XLA: shard weights and batch over all devices (SPMD FSDP)
    # bookkeeping
    "output": "runs/train",
    "name": None,                       # run folder name under output; None: the recipe's file name
    "seed": 0,
    "save_every_epochs": 1,
    "log_every_n_steps": 20,
    "report_to": "",                    # '', 'tensorboard', 'wandb'
}


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names it."""


def _check_keys(keys: Iterable[str], where: str, defaults: Dict[str, Any]) -> None:
    unknown = sorted(set(keys) - set(defaults))
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)} in {where}; known keys: "
                          + ", ".join(sorted(defaults)))


def parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def load_recipe(path: Optional[str], overrides: Iterable[str] = (),
                defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    defaults = DEFAULTS if defaults is None else defaults
    cfg = dict(defaults)
    if path:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        spec = importlib.util.spec_from_file_location(f"recipe_{p.stem}", p)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not hasattr(mod, "get_config"):
            raise RecipeError(f"recipe {p} defines no get_config()")
        values = dict(mod.get_config())
        _check_keys(values, str(p), defaults)
        cfg.update(values)
        cfg["name"] = cfg["name"] or p.stem
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _check_keys([key], "the command line", defaults)
        cfg[key] = parse_value(raw)
    cfg["name"] = cfg["name"] or "run"
    if cfg.get("device") not in (None, "cpu", "cuda", "xla"):
        raise RecipeError(f"device must be cpu, cuda or xla (or None: cuda when available), got {cfg['device']!r}")
    if cfg.get("fsdp") and cfg.get("device") != "xla":
        raise RecipeError("fsdp=True is the SPMD sharding of XLA devices: set device=xla as well")
    if cfg.get("pos_embed_init", "resample") not in ("resample", "sincos"):
        raise RecipeError(f"pos_embed_init must be 'resample' or 'sincos', got {cfg['pos_embed_init']!r}")
    return cfg


def schedule(cfg: Dict[str, Any], world_size: int, train_num_samples: int) -> Dict[str, Any]:
    """Per-process batch, lr, warm-up steps and epochs for this hardware."""
    gb = int(cfg["global_batch"])
    per = world_size * int(cfg["accum_freq"])
    if gb % per:
        raise RecipeError(f"global_batch {gb} is not divisible by processes x accum_freq = {per}")
    batch = gb // per
    lr = cfg["lr_per_256"] * gb / 256
    warmup = int(round(cfg["warmup_steps"] * cfg["reference_batch"] / gb))
    if cfg["epochs"]:
        epochs = int(cfg["epochs"])
    else:
        epochs = max(1, math.ceil(cfg["samples_seen"] / train_num_samples))
    return {"batch_size": batch, "lr": lr, "warmup": warmup, "epochs": epochs}


# Changing these between a run and its resumption would silently mix two experiments.
SCHEDULE_KEYS = ("model", "image_size", "epochs", "samples_seen", "global_batch", "lr_per_256", "warmup_steps",
                 "warmup_epochs", "train_num_samples")


def check_resume_compatible(saved: Dict[str, Any], cfg: Dict[str, Any], where) -> None:
    diff = [f"{k} {saved.get(k)!r} -> {cfg.get(k)!r}" for k in SCHEDULE_KEYS
            if k in cfg and k in saved and saved.get(k) != cfg.get(k)]
    if diff:
        raise RecipeError(f"{where} holds a run of another recipe ({'; '.join(diff)}); resume it with the same "
                          "values, or start a new run (another name= or delete the folder)")
