"""The CLIP trainer: a CLIPA recipe run by open_clip_train.

    crate-alpha pretrain configs/clipa_crate_alpha_L14_84_pretrain.py train_data='shards/{00000..00099}.tar'
    torchrun --nproc_per_node 8 -m crate_alpha.cli pretrain clipa_crate_alpha_L14_84_pretrain ...

open_clip_train does the loop, loss, distributed training, checkpointing, resuming and
logging. This module checks the data before anything is built, turns the recipe into
open_clip_train's arguments for the hardware at hand (batch, lr and warm-up scaled; every
other key is one of open_clip_train's own flags under its own name), prepares the initial
weights (text tower from a CLIPA checkpoint; fine-tuning from a pre-training checkpoint
with the position grid resampled or re-initialised), and runs open_clip_train inside
``patches.patched`` (its few replacements, restored when the run ends).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from ..common import load_open_clip_checkpoint, read_state_dict, save_checkpoint, write_json
from ..data.shards import check_shards, count_samples
from .. import run_folder
from ..data.decode import SkipCounter
from ..device import for_name
from ..errors import CheckpointError, CrateAlphaError
from ..recipe import (COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, RecipeError, check_resume_compatible,
                     check_values, load_recipe)

# Keys that are open_clip_train flags, passed on under their own names (``wd`` -> ``--wd``);
# ``epochs`` too is its flag's name, passed on after the schedule has resolved it.
OPEN_CLIP_TRAIN_FLAGS = (
    "model", "train_data", "lr_scheduler", "wd", "beta1", "beta2", "eps", "grad_clip_norm", "precision",
    "accum_freq", "workers", "seed", "logs", "name", "save_frequency", "log_every_n_steps", "force_image_size",
    "force_context_length", "report_to", "lock_text", "local_loss", "gather_with_grad", "grad_checkpointing",
    "torchcompile",
)

DEFAULTS: Dict[str, Any] = {
    # model
    "model": "crate-alpha-L-14",        # open_clip name (after `import crate_alpha`) or local-dir:
    "force_image_size": 224,            # training resolution
    "force_context_length": None,       # text length; None keeps the model's
    "torchcompile": False,              # torch.compile the model (first steps slower while it compiles)
    # data
    "train_data": None,                 # webdataset shard pattern, e.g. shards/{00000..00099}.tar
    "train_num_samples": None,          # samples per pass over the data; None: counted from the shards
    "workers": 2,                       # loader processes per training process
    "prefetch_factor": None,            # batches each worker keeps ready (None: torch's 2)
    "fast_decode": True,                # reduced-size JPEG decode before the random resized crop
    # schedule (stated for the reference batch; scaled to the batch actually used)
    "global_batch": 32768,
    "reference_batch": 32768,           # the batch warmup_steps is stated for
    "samples_seen": 2_560_000_000,
    "epochs": None,                     # if set, overrides samples_seen
    "lr_per_256": 8e-6,                 # lr = lr_per_256 * global_batch / 256
    "warmup_steps": 1600,               # at reference_batch; the same number of samples at any batch
    "lr_scheduler": "cosine",
    "wd": 0.2,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "grad_clip_norm": 1.0,
    "precision": "amp_bf16",
    "accum_freq": 1,
    "grad_checkpointing": False,
    # initialisation
    "init_from": None,                  # an open_clip checkpoint to start the whole model from (fine-tuning)
    "pos_embed_init": "resample",       # when the grid changes: 'resample' or 'sincos' (re-initialise)
    "text_init": None,                  # an open_clip checkpoint whose text tower initialises ours
    "lock_text": False,                 # freeze the text tower
    # distributed
    "local_loss": False,
    "gather_with_grad": False,
    "dist_backend": None,               # None: nccl on GPUs, gloo on CPU, xla on XLA
    "device": None,                     # None: cuda when available, else cpu; 'xla': TPU (or XLA:CPU)
    "fsdp": False,                      # on XLA: shard weights and batch over all devices (SPMD FSDP)
    # bookkeeping
    "logs": "runs/train",
    "name": None,                       # run folder name under logs; None: the recipe's file name
    "seed": 0,
    "save_frequency": 1,                # epochs between epoch_N.pt (0: only the final and epoch_latest.pt)
    "log_every_n_steps": 20,
    "report_to": "",                    # '', 'tensorboard', 'wandb'
}

# Before the keys took open_clip_train's names; an old recipe gets told the new one.
RENAMED = {"weight_decay": "wd", "grad_clip": "grad_clip_norm", "save_every_epochs": "save_frequency",
           "output": "logs", "image_size": "force_image_size", "context_length": "force_context_length"}

# What may change when a run is resumed: how it runs, not what it computes. Any other key
# changed between a run and its resumption would silently mix two experiments (refused).
RESUMABLE_CHANGES = ("workers", "prefetch_factor", "log_every_n_steps", "report_to", "device", "dist_backend",
                     "torchcompile", "grad_checkpointing", "fast_decode", "local_loss", "gather_with_grad",
                     "accum_freq", "fsdp", "save_frequency", "logs", "name")

VALUES = {"global_batch": POSITIVE_INT, "reference_batch": POSITIVE_INT, "samples_seen": POSITIVE,
          "epochs": POSITIVE_INT, "lr_per_256": POSITIVE, "warmup_steps": NON_NEGATIVE, "accum_freq": POSITIVE_INT,
          "train_num_samples": POSITIVE_INT, "workers": COUNT, "save_frequency": COUNT,
          "log_every_n_steps": POSITIVE_INT, "force_image_size": POSITIVE_INT, "wd": NON_NEGATIVE,
          "beta1": FRACTION, "beta2": FRACTION, "eps": POSITIVE, "grad_clip_norm": POSITIVE, "seed": COUNT,
          "prefetch_factor": POSITIVE_INT}
OPTIONAL = ("epochs", "train_num_samples", "grad_clip_norm", "prefetch_factor")


def load(recipe: str | None, overrides=()) -> Dict[str, Any]:
    cfg = load_recipe(recipe, overrides, DEFAULTS, "name", RENAMED)
    if cfg["pos_embed_init"] not in ("resample", "sincos"):
        raise RecipeError(f"pos_embed_init must be 'resample' or 'sincos', got {cfg['pos_embed_init']!r}")
    check_values(cfg, VALUES, OPTIONAL)
    return cfg


def schedule(cfg: Dict[str, Any], world_size: int, train_num_samples: int) -> Dict[str, Any]:
    """Per-process batch, lr, warm-up steps and epochs for this hardware."""
    gb = int(cfg["global_batch"])
    per = world_size * int(cfg["accum_freq"])
    if gb % per:
        raise RecipeError(f"global_batch {gb} is not divisible by processes x accum_freq = {per}")
    warmup = int(round(cfg["warmup_steps"] * cfg["reference_batch"] / gb))
    epochs = int(cfg["epochs"]) if cfg["epochs"] is not None else math.ceil(cfg["samples_seen"] / train_num_samples)
    return {"batch_size": gb // per, "lr": cfg["lr_per_256"] * gb / 256, "warmup": warmup, "epochs": epochs}


def checkpoint_path(logs, name) -> Path:
    """Where open_clip_train keeps a run's latest checkpoint."""
    return Path(logs) / name / "checkpoints" / "epoch_latest.pt"


def prepare_init(cfg: dict, run_dir: Path) -> str:
    """An open_clip checkpoint with the recipe's starting weights; returns its path."""
    import open_clip

    torch.manual_seed(cfg["seed"])
    size = cfg["force_image_size"] if cfg["init_from"] else None
    model = open_clip.create_model(cfg["model"], force_image_size=size,
                                   force_context_length=cfg["force_context_length"])
    if cfg["init_from"]:
        # open_clip's loader (resamples a ViT's grid; a CRATE-α trunk resamples its own), checked
        load_open_clip_checkpoint(model, cfg["init_from"], "init_from checkpoint", cfg["model"])
        trunk = getattr(model.visual, "trunk", None)
        if cfg["pos_embed_init"] == "sincos":
            if trunk is None or not hasattr(trunk, "reset_pos_embed_sincos"):
                raise RecipeError("pos_embed_init='sincos' needs a CRATE-α image tower")
            trunk.reset_pos_embed_sincos()  # the official fine-tuning's choice
    if cfg["text_init"]:
        own = model.state_dict()
        text = {k: v for k, v in read_state_dict(cfg["text_init"], "text_init checkpoint").items()
                if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
        missing = sorted(k for k in own if not k.startswith("visual.") and k not in text
                         and k not in ("logit_scale", "logit_bias"))
        wrong = [k for k in text if k in own and own[k].shape != text[k].shape]
        extra = sorted(k for k in text if k not in own)
        if missing or wrong or extra:
            raise CheckpointError(f"text_init {cfg['text_init']} does not fit {cfg['model']}'s text tower: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {wrong[:5]}")
        model.load_state_dict(text, strict=False)
    return str(save_checkpoint({"state_dict": model.state_dict()}, run_dir / "init.pt"))


def device_of(cfg: dict):
    """The recipe's training device (``crate_alpha.device``)."""
    return for_name(cfg.get("device"), fsdp=cfg.get("fsdp", False))


def open_clip_args(cfg: dict, sched: dict, n_samples: int, init: str | None) -> List[str]:
    dev = device_of(cfg)
    a = []
    for key in OPEN_CLIP_TRAIN_FLAGS:
        value = cfg[key]
        if value is None or value is False or value == "":
            continue
        a += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    a += [
        "--dataset-type", "webdataset",
        "--train-num-samples", str(n_samples),
        "--batch-size", str(sched["batch_size"]),
        "--epochs", str(sched["epochs"]),
        "--lr", repr(sched["lr"]),
        "--warmup", str(sched["warmup"]),
        "--save-most-recent",
        "--resume", "latest",
        "--zeroshot-frequency", "0",
        "--device", dev.name,
        "--dist-backend", cfg["dist_backend"] or dev.dist_backend,
    ] + dev.open_clip_train_args()
    if init:
        a += ["--pretrained", init]
    return a


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(recipe: str | None, overrides=(), dry_run: bool = False) -> dict:
    cfg = load(recipe, overrides)
    device_of(cfg).check_ready()
    if cfg["lock_text"] and not cfg["text_init"] and not cfg["init_from"]:
        raise RecipeError("lock_text=True would freeze a randomly initialised text tower: set text_init=CHECKPOINT "
                          "(an open_clip checkpoint with a pre-trained text encoder) or lock_text=False")
    urls = check_shards(cfg["train_data"], "training data (train_data)")
    n = int(cfg["train_num_samples"] or count_samples(urls))
    world = device_of(cfg).world_size()
    sched = schedule(cfg, world, n)
    run_dir = Path(cfg["logs"]) / cfg["name"]
    if dry_run:
        run_folder.check(run_dir, run_folder.CLIP_RUN)
        _resuming(cfg, run_dir, n)
        return _plan(cfg, sched, n, world, run_dir, None)
    if _rank() != 0:
        return _train(cfg, sched, n, world, run_dir)
    run_folder.claim(run_dir, run_folder.CLIP_RUN)
    with run_folder.locked(run_dir):
        return _train(cfg, sched, n, world, run_dir)


def _resuming(cfg: dict, run_dir: Path, n: int) -> bool:
    """Whether ``run_dir`` holds a run to resume; refuses one whose recipe differs in a key that matters."""
    if not checkpoint_path(cfg["logs"], cfg["name"]).exists():
        return False
    if (run_dir / "recipe.json").is_file():
        saved = json.loads((run_dir / "recipe.json").read_text())["recipe"]
        keys = [k for k in cfg if k not in RESUMABLE_CHANGES]
        check_resume_compatible(saved, dict(cfg, train_num_samples=cfg["train_num_samples"] or n), run_dir, keys)
    return True


def _plan(cfg: dict, sched: dict, n: int, world: int, run_dir: Path, init) -> dict:
    args = open_clip_args(cfg, sched, n, init)
    return {"recipe": dict(cfg, train_num_samples=n), "schedule": sched, "train_num_samples": n, "world_size": world,
            "open_clip_train_args": args}


def _keep_segment_records(run_dir: Path, info: dict) -> None:
    """A resumed run keeps the first run's recipe.json and params.txt; each resumption is a row of segments.jsonl."""
    params = run_dir / "params.txt"  # open_clip_train rewrites it at every start
    if params.is_file():
        k = 1 + len(list(run_dir.glob("params.*.txt")))
        os.replace(params, run_dir / f"params.{k}.txt")
    with open(run_dir / "segments.jsonl", "a") as f:
        f.write(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S"), **info}, default=str) + "\n")


def _train(cfg: dict, sched: dict, n: int, world: int, run_dir: Path) -> dict:
    resuming = _resuming(cfg, run_dir, n)
    init = None
    if (cfg["init_from"] or cfg["text_init"]) and not resuming:
        init_path = run_dir / "init.pt"
        if _rank() == 0:
            init = prepare_init(cfg, run_dir)
        else:
            deadline = time.time() + 3600
            while not init_path.exists():
                if time.time() > deadline:
                    raise CheckpointError(f"rank 0 did not write {init_path} within an hour")
                time.sleep(0.5)
            init = str(init_path)
    info = _plan(cfg, sched, n, world, run_dir, init)
    args = info["open_clip_train_args"]
    if _rank() == 0:
        if resuming and (run_dir / "recipe.json").is_file():
            _keep_segment_records(run_dir, info)
        else:
            write_json(info, run_dir / "recipe.json")

    t0 = time.time()
    # in this process (CPU, CUDA: torchrun started the others) or in the device's own (XLA)
    skipped = device_of(cfg).launch(_process, args=(args, _run_settings(cfg), str(run_dir), sched["epochs"], n, t0))
    info["seconds"] = time.time() - t0
    if skipped is not None:
        info["skipped_damaged"] = skipped
    return info


def _run_settings(cfg: dict) -> dict:
    return {"device": cfg["device"], "fsdp": cfg["fsdp"], "fast_decode": cfg["fast_decode"],
            "prefetch_factor": cfg["prefetch_factor"]}


def _process(index: int, args: List[str], settings: dict, run_dir: str, epochs: int, n: int, t0: float) -> int:
    """One training process: open_clip_train on this process's device; the samples it skipped."""
    from .patches import ClipRun

    dev = for_name(settings["device"], fsdp=settings["fsdp"])
    dev.join_process_group(init_group=False)  # open_clip_train joins the group itself
    run = ClipRun(dev, SkipCounter(), settings["fast_decode"], settings["prefetch_factor"])
    rank = _rank()
    metrics = Path(run_dir) / "xla_metrics.json" if rank == 0 else None
    _open_clip_train(args, run, metrics)
    if rank == 0:
        _summary(Path(run_dir), t0, run.counter.count, epochs, n)
    return run.counter.count


def _open_clip_train(args: List[str], run, metrics_path=None) -> None:
    import open_clip_train.main as ocm

    from .patches import patched

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        with patched(run), run.device.optimizer_hooks(metrics_path):
            rc = ocm.main(args)
    finally:
        # open_clip_train adds its own handlers (one writes this run's out.log); drop them so a
        # second run in the same process (make demo) does not also write into this run's log
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
            h.close()
    for noisy in ("torch._dynamo", "torch._subclasses"):  # open_clip_train set the root logger to INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if rc not in (None, 0):
        raise CrateAlphaError(f"open_clip_train exited with {rc} (its log above says why)")
    if run.counter.count:
        logging.warning("skipped %d damaged samples or shards", run.counter.count)


def _summary(run_dir: Path, t0: float, skipped: int, epochs: int, n: int) -> None:
    write_json({"seconds": time.time() - t0, "skipped_damaged": skipped, "epochs": epochs, "samples_seen": epochs * n,
                "checkpoint": str(run_dir / "checkpoints" / "epoch_latest.pt")}, run_dir / "train_summary.json")
