"""What every command shares: one error type, one atomic writer, model folders and
checkpoints read through open_clip and timm, and webdataset shard listing and counting.

Packages of crate_alpha import from here, never each other's private helpers.
"""
from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

LOCAL_DIR = "local-dir:"


class CrateAlphaError(ValueError):
    """Bad input to a command: the message names the problem and what to do."""


# --------------------------------------------------------------------------------------
# Writing: whole or not at all
# --------------------------------------------------------------------------------------

# disk full, over quota, or over the process's file-size limit
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def atomic_write(path: os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``.

    A kill mid-write leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except Exception as e:
        full = _no_space(e)
        if full is not None:
            raise CrateAlphaError(f"no space left to write {path} ({os.strerror(full.errno)}); it was not written "
                                  "(what was there before is unchanged): free space and run the command again") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _no_space(error: BaseException) -> Optional[OSError]:
    """The full-disk OSError behind ``error``, if any: torch's writer turns the one it meets
    while writing into a RuntimeError raised on top of it (the OSError is its context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error
        error = error.__cause__ or error.__context__
    return None


def write_json(obj, path: os.PathLike) -> Path:
    def write(tmp):
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n")

    return atomic_write(path, write)


def save_checkpoint(obj, path: os.PathLike) -> Path:
    import torch

    def write(tmp):
        # through a Python file, so that a failed write is an OSError with its errno (torch's own
        # file writer reports a full disk as a RuntimeError without one)
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------
# Models and checkpoints
# --------------------------------------------------------------------------------------

def local_dir(spec) -> Optional[Path]:
    """The folder of ``local-dir:FOLDER`` (timm and open_clip's spelling), else None."""
    if isinstance(spec, str) and spec.startswith(LOCAL_DIR):
        return Path(spec[len(LOCAL_DIR):]).expanduser()
    return None


def model_folder(spec) -> Optional[Path]:
    """A model folder named by ``local-dir:FOLDER`` or a plain folder path; None for a model name."""
    folder = local_dir(spec)
    if folder is None and isinstance(spec, (str, os.PathLike)) and Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
    if folder is not None and not folder.is_dir():
        raise CrateAlphaError(f"model folder {folder} does not exist")
    return folder


def folder_kind(folder: Path) -> str:
    """'open_clip' or 'timm', from the config file the folder holds."""
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    if (folder / "config.json").is_file():
        return "timm"
    raise CrateAlphaError(f"{folder} holds neither open_clip_config.json (an open_clip model) nor config.json "
                          "(a timm model): convert or export one with `crate-alpha convert` / `crate-alpha export`")


def timm_folder_config(folder: Path) -> dict:
    """timm's ``config.json`` of a model folder (architecture, model_args, pretrained_cfg)."""
    if folder_kind(folder) != "timm":
        raise CrateAlphaError(f"{folder} is an open_clip folder; a timm model folder (config.json) is needed here")
    return json.loads((folder / "config.json").read_text())


def read_state_dict(path: os.PathLike, what: str = "checkpoint") -> Dict[str, "object"]:
    """A state dict from a checkpoint file, through open_clip's loader (``state_dict`` key and
    DDP's ``module.`` prefix handled there)."""
    from open_clip.factory import load_state_dict

    if not os.path.isfile(str(path)):
        raise CrateAlphaError(f"{what} {path} does not exist")
    return load_state_dict(str(path))


# --------------------------------------------------------------------------------------
# Webdataset shards
# --------------------------------------------------------------------------------------

def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(pattern: str) -> List[str]:
    """The shard URLs of a webdataset pattern (brace ranges, ``::`` between patterns)."""
    from braceexpand import braceexpand

    urls = []
    for part in str(pattern).split("::"):
        urls += list(braceexpand(part))
    return urls


def check_shards(pattern, what: str = "training data") -> List[str]:
    """The shards of ``pattern``; fails before anything is built when local ones are missing."""
    if not pattern:
        raise CrateAlphaError(f"no {what}: set it to webdataset shards, e.g. 'shards/{{00000..00099}}.tar'")
    urls = expand_shards(pattern)
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(local):
        parent = os.path.dirname(local[0]) or "."
        hint = "" if os.path.isdir(parent) else f" (folder {parent} does not exist)"
        raise CrateAlphaError(f"{what} {pattern!r} matches no file{hint}")
    if missing:
        raise CrateAlphaError(f"{what} {pattern!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return urls


def count_samples(urls: List[str]) -> int:
    """Samples in the shards: img2dataset's per-shard statistics, or the tar headers."""
    remote = [u for u in urls if is_remote(u)]
    if remote:
        raise CrateAlphaError(f"cannot count the samples of remote shards such as {remote[0]!r}: "
                              "set train_num_samples=N (img2dataset's stats give N)")
    total = 0
    for u in urls:
        stats = Path(u[: -len(".tar")] + "_stats.json") if u.endswith(".tar") else None
        if stats is not None and stats.is_file():
            total += int(json.loads(stats.read_text())["successes"])
            continue
        with tarfile.open(u) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar})
    return total
