"""The CLIPA training launcher: a recipe from ``configs/`` run by open_clip_train.

    python -m crate_alpha.train configs/demo_pretrain.py train_data='shards/{00000..00005}.tar'
    torchrun --nproc_per_node 8 -m crate_alpha.train configs/clipa_crate_alpha_L14_84_pretrain.py ...

open_clip_train does the loop, loss, distributed training, checkpointing, resuming and
logging. This module checks the data before anything is built, turns the recipe into
open_clip_train's arguments for the hardware at hand (batch, lr and warm-up scaled),
prepares the initial weights (text tower from a CLIPA checkpoint; fine-tuning from a
pre-training checkpoint with the position grid resampled or re-initialised), and installs
the hooks in ``hooks.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from .recipe import RecipeError, check_resume_compatible, load_recipe, schedule


def expand_shards(pattern: str) -> List[str]:
    from braceexpand import braceexpand

    urls = []
    for part in str(pattern).split("::"):
        urls += list(braceexpand(part))
    return urls


def check_data(pattern) -> List[str]:
    """Fail before any model is built when the training data is not there."""
    if not pattern:
        raise RecipeError("no training data: set train_data=PATTERN (webdataset shards, e.g. "
                          "'shards/{00000..00099}.tar')")
    urls = expand_shards(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(local):
        parent = os.path.dirname(local[0]) or "."
        hint = "" if os.path.isdir(parent) else f" (folder {parent} does not exist)"
        raise RecipeError(f"training data {pattern!r} matches no file{hint}")
    if missing:
        raise RecipeError(f"training data {pattern!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return urls


def count_samples(urls: List[str]) -> int:
    """Samples in the shards: img2dataset's per-shard statistics, or the tar headers."""
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise RecipeError(f"cannot count the samples of remote shards such as {remote[0]!r}: "
                          "set train_num_samples=N (img2dataset's stats give N)")
    total = 0
    for u in urls:
        stats = Path(u[: -len(".tar")] + "_stats.json") if u.endswith(".tar") else None
        if stats is not None and stats.is_file():
            total += int(json.loads(stats.read_text())["successes"])
            continue
        keys = set()
        with tarfile.open(u) as tar:
            for m in tar:
                keys.add(m.name.split(".", 1)[0])
        total += len(keys)
    return total


def _load_state_dict(path) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(str(path)):
        raise RecipeError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def prepare_init(cfg: dict, run_dir: Path) -> str:
    """An open_clip checkpoint with the recipe's starting weights; returns its path."""
    import open_clip

    import crate_alpha  # noqa: F401

    torch.manual_seed(cfg["seed"])
    size = cfg["image_size"] if cfg["init_from"] else None
    model = open_clip.create_model(cfg["model"], force_image_size=size,
                                   force_context_length=cfg["context_length"])
    if cfg["init_from"]:
        if not os.path.isfile(str(cfg["init_from"])):
            raise RecipeError(f"init_from checkpoint {cfg['init_from']} does not exist")
        # open_clip's loader (resamples a ViT's grid; a CRATE-α trunk resamples its own)
        open_clip.load_checkpoint(model, str(cfg["init_from"]), strict=True)
        trunk = getattr(model.visual, "trunk", None)
        if cfg["pos_embed_init"] == "sincos":
            if trunk is None or not hasattr(trunk, "reset_pos_embed_sincos"):
                raise RecipeError("pos_embed_init='sincos' needs a CRATE-α image tower")
            trunk.reset_pos_embed_sincos()  # the official fine-tuning's choice
    if cfg["text_init"]:
        own = model.state_dict()
        text = {k: v for k, v in _load_state_dict(cfg["text_init"]).items()
                if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
        missing = sorted(k for k in own if not k.startswith("visual.") and k not in text
                         and k not in ("logit_scale", "logit_bias"))
        wrong = [k for k in text if k in own and own[k].shape != text[k].shape]
        extra = sorted(k for k in text if k not in own)
        if missing or wrong or extra:
            raise RecipeError(f"text_init {cfg['text_init']} does not fit {cfg['model']}'s text tower: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {wrong[:5]}")
        model.load_state_dict(text, strict=False)
    from .hooks import atomic_save

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "init.pt"
    atomic_save({"state_dict": model.state_dict()}, path)
    return str(path)


def device_of(cfg: dict) -> str:
    return cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


def open_clip_args(cfg: dict, sched: dict, n_samples: int, init: str | None) -> List[str]:
    dev = device_of(cfg)
    backend = {"cuda": "nccl", "xla": "xla"}.get(dev, "gloo")
    a = [
        "--model", cfg["model"],
        "--train-data", str(cfg["train_data"]),
        "--dataset-type", "webdataset",
        "--train-num-samples", str(n_samples),
        "--batch-size", str(sched["batch_size"]),
        "--epochs", str(sched["epochs"]),
        "--lr", repr(sched["lr"]),
        "--warmup", str(sched["warmup"]),
        "--lr-scheduler", cfg["lr_scheduler"],
        "--wd", repr(cfg["weight_decay"]),
        "--beta1", repr(cfg["beta1"]),
        "--beta2", repr(cfg["beta2"]),
        "--eps", repr(cfg["eps"]),
        "--grad-clip-norm", repr(cfg["grad_clip"]),
        "--precision", cfg["precision"],
        "--accum-freq", str(cfg["accum_freq"]),
        "--workers", str(cfg["workers"]),
        "--seed", str(cfg["seed"]),
        "--logs", str(cfg["output"]),
        "--name", cfg["name"],
        "--save-frequency", str(cfg["save_every_epochs"]),
        "--save-most-recent",
        "--resume", "latest",
        "--zeroshot-frequency", "0",
        "--log-every-n-steps", str(cfg["log_every_n_steps"]),
        "--force-image-size", str(cfg["image_size"]),
        "--report-to", cfg["report_to"] or "",
        "--device", dev,
        "--dist-backend", cfg["dist_backend"] or backend,
    ]
    if dev == "xla":
        # each launcher process sees its one device as xla:0, so no per-rank device index
        a += ["--dist-url", "xla://", "--no-set-device-rank"]
    if cfg["context_length"]:
        a += ["--force-context-length", str(cfg["context_length"])]
    if init:
        a += ["--pretrained", init]
    if cfg["lock_text"]:
        a += ["--lock-text"]
    for flag in ("local_loss", "gather_with_grad", "grad_checkpointing"):
        if cfg[flag]:
            a.append("--" + flag.replace("_", "-"))
    return a


def _world_size(cfg: dict) -> int:
    if device_of(cfg) == "xla":
        if cfg["fsdp"]:
            return 1  # SPMD: one process drives every device; the batch is sharded, not split
        from . import xla

        return xla.launcher_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(recipe: str | None, overrides: List[str], dry_run: bool = False) -> dict:
    cfg = load_recipe(recipe, overrides)
    if device_of(cfg) == "xla":
        from . import xla

        try:
            xla.require()
            if not cfg["fsdp"]:
                xla.launcher_world_size()
        except xla.XlaUnavailable as e:
            raise RecipeError(str(e)) from None
    if cfg["lock_text"] and not cfg["text_init"] and not cfg["init_from"]:
        raise RecipeError("lock_text=True would freeze a randomly initialised text tower: set text_init=CHECKPOINT "
                          "(an open_clip checkpoint with a pre-trained text encoder) or lock_text=False")
    urls = check_data(cfg["train_data"])
    n = int(cfg["train_num_samples"] or count_samples(urls))
    world = _world_size(cfg)
    sched = schedule(cfg, world, n)
    run_dir = Path(cfg["output"]) / cfg["name"]
    resuming = (run_dir / "checkpoints" / "epoch_latest.pt").exists()
    if resuming and (run_dir / "recipe.json").is_file():
        saved = json.loads((run_dir / "recipe.json").read_text())["recipe"]
        check_resume_compatible(saved, dict(cfg, train_num_samples=cfg["train_num_samples"] or n), run_dir)
    init = None
    if (cfg["init_from"] or cfg["text_init"]) and not resuming and not dry_run:
        init_path = run_dir / "init.pt"
        if int(os.environ.get("RANK", "0")) == 0:
            init = prepare_init(cfg, run_dir)
        else:
            deadline = time.time() + 3600
            while not init_path.exists():
                if time.time() > deadline:
                    raise RecipeError(f"rank 0 did not write {init_path} within an hour")
                time.sleep(0.5)
            init = str(init_path)
    args = open_clip_args(cfg, sched, n, init)
    info = {"recipe": dict(cfg, train_num_samples=n), "schedule": sched, "train_num_samples": n, "world_size": world,
            "open_clip_train_args": args}
    if dry_run:
        return info
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        for stale in (run_dir / "checkpoints").glob("*.partial-*"):  # a write cut short by a kill
            stale.unlink()
        (run_dir / "recipe.json").write_text(json.dumps(info, indent=2, default=str))

    t0 = time.time()
    if device_of(cfg) == "xla":
        from . import xla

        job = (args, cfg["fast_decode"], cfg["fsdp"], str(run_dir), sched["epochs"], n, t0)
        if cfg["fsdp"]:
            _xla_process(0, *job)  # SPMD is one process; torch_xla's launcher does not support it
        else:
            xla.launch(_xla_process, args=job)
        info["seconds"] = time.time() - t0
        return info
    counter = _open_clip_train(args, cfg["fast_decode"])
    info["seconds"] = time.time() - t0
    info["skipped_damaged"] = counter.count
    if int(os.environ.get("RANK", "0")) == 0:
        _summary(run_dir, t0, counter.count, sched["epochs"], n)
    return info


def _open_clip_train(args: List[str], fast_decode: bool, xla_options=None):
    import open_clip_train.main as ocm

    import crate_alpha  # noqa: F401  (registers the models in this process)

    from .hooks import SharedSkipCounter, install

    counter = SharedSkipCounter()
    install(counter, fast_decode=fast_decode, xla=xla_options)
    root = logging.getLogger()
    before = list(root.handlers)
    try:
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
        raise RuntimeError(f"open_clip_train exited with {rc}")
    if counter.count:
        logging.warning("skipped %d damaged samples or shards", counter.count)
    return counter


def _summary(run_dir: Path, t0: float, skipped: int, epochs: int, n: int) -> None:
    (run_dir / "train_summary.json").write_text(json.dumps(
        {"seconds": time.time() - t0, "skipped_damaged": skipped, "epochs": epochs, "samples_seen": epochs * n,
         "checkpoint": str(run_dir / "checkpoints" / "epoch_latest.pt")}, indent=2))


def _xla_process(index: int, args: List[str], fast_decode: bool, fsdp: bool, run_dir: str, epochs: int, n: int,
                 t0: float) -> None:
    """One launcher process: open_clip_train on this process's XLA device."""
    from . import xla
    from .hooks import XlaOptions

    if not fsdp:
        rank, local, world = xla.ordinals()
        if world > 1:  # open_clip_train reads the torchrun variables; the XLA process group does the rest
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the 'xla' backend)

            os.environ.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world))
    rank = int(os.environ.get("RANK", "0"))
    metrics = str(Path(run_dir) / "xla_metrics.json") if rank == 0 else None
    options = XlaOptions(metrics_path=metrics, fsdp=fsdp)
    counter = _open_clip_train(args, fast_decode, options)
    if rank == 0:
        options.metrics.write()
        _summary(Path(run_dir), t0, counter.count, epochs, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m crate_alpha.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe file in configs/ (a Python file with get_config())")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    p.add_argument("--dry-run", action="store_true", help="print open_clip_train's arguments and stop")
    a = p.parse_args(argv)
    try:
        info = run(a.recipe, a.overrides, dry_run=a.dry_run)
    except RecipeError as e:
        print(f"crate_alpha.train: error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(json.dumps({k: info[k] for k in ("schedule", "train_num_samples", "world_size",
                                               "open_clip_train_args")}, indent=2))
    return 0
