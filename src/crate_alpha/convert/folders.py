"""Model folders in timm's and open_clip's local formats, written atomically.

A folder is assembled under a hidden sibling path and renamed into place only once it is
complete and its state dict has loaded strictly into the model it describes, so an
interrupted or failed conversion never leaves a half-written OUT_DIR behind.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..common import check_writable_parent, read_state_dict, write_json
from ..errors import ConversionError  # noqa: F401  (also importable from here, its old home)
from ..models.official_layout import check_names, check_shape  # noqa: F401  (the key checks, re-exported)

TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
# What transformers' AutoTokenizer reads from a folder; open_clip 3.3 reads the HF tokenizer
# of a local-dir: model from that folder only (factory.get_tokenizer).
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.txt", "tokenizer.json", "special_tokens_map.json")


def _resolved(path: os.PathLike) -> set:
    """``path`` both as written (made absolute) and with symlinks followed."""
    return {Path(os.path.abspath(path)), Path(path).resolve()}


def _contains(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def is_replaceable(folder: Path) -> bool:
    """Whether --force may replace ``folder``: empty, or exactly a model folder this project writes.

    Anything else (a user's files, a folder with our files plus others) is never deleted.
    """
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    if not entries:
        return True
    if not all(p.is_file() and not p.is_symlink() for p in entries):
        return False
    names = {p.name for p in entries}
    if names == {TIMM_CONFIG, TIMM_WEIGHTS}:
        cfg = _read_json(folder / TIMM_CONFIG)
        return str(cfg.get("architecture", "")).startswith("crate_alpha_") and "pretrained_cfg" in cfg
    if {OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS} <= names <= {OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, *TOKENIZER_FILES}:
        cfg = _read_json(folder / OPEN_CLIP_CONFIG)
        return isinstance(cfg.get("model_cfg"), dict) and "preprocess_cfg" in cfg
    return False


def check_out_dir(out_dir: os.PathLike, force: bool = False, protect=()) -> None:
    """Refuse an OUT_DIR whose replacement would lose data, before any work is done.

    ``protect`` holds the source files: OUT_DIR must be neither one of them nor a folder
    holding one, and the same goes for the current directory (``.``, ``..``).
    """
    out_dir = Path(out_dir)
    outs = _resolved(out_dir)
    for kept, what in [(p, "the current directory") for p in _resolved(Path.cwd())] + \
                      [(p, f"the source {src}") for src in protect for p in _resolved(src)]:
        if any(_contains(o, kept) for o in outs):
            raise ConversionError(
                f"output folder {out_dir} is or contains {what}; replacing it would delete it. "
                "Choose a new folder for OUT_DIR")
    if out_dir.is_symlink():
        raise ConversionError(f"output path {out_dir} is a symbolic link; choose a new folder for OUT_DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output path {out_dir} exists and is not a folder; choose a new folder for OUT_DIR")
    if out_dir.exists():
        if not force:
            raise ConversionError(f"output folder {out_dir} already exists; pass --force to replace it")
        if not is_replaceable(out_dir):
            raise ConversionError(
                f"output folder {out_dir} holds files that this tool did not write; --force only replaces "
                "an empty folder or a model folder written by crate-alpha. Choose a new folder or empty it yourself")
    # The nearest existing ancestor must be a folder we may write in ("cannot write OUT_DIR: ...").
    check_writable_parent(out_dir, error=ConversionError)


# Every hidden partial / old folder holds this file naming its writer, so that a later run
# can tell a folder orphaned by a kill (remove it) from one being written right now (keep it).
WRITER_MARKER = ".crate-alpha-writer"
# Without a marker nothing tells whether a writer is alive: such a folder comes from a run
# killed in the instant between creating it and writing the marker, or from an older version
# of this tool, whose writer could still be busy saving a huge model for a while.
MARKERLESS_STALE_S = 3600
# A writer on another machine (shared file system) cannot be probed; a day is far longer
# than any conversion takes.
FOREIGN_STALE_S = 86400


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int):
    """Start time of ``pid`` in clock ticks since boot (Linux), or None where unknown.

    With the PID it identifies a process even after the PID is reused.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def writer_record(pid: int) -> dict:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": _start_time(pid)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _is_stale(folder: Path, now: float) -> bool:
    marker = folder / WRITER_MARKER
    try:
        rec = json.loads(marker.read_text())
        age = now - marker.stat().st_mtime
    except (OSError, ValueError):
        try:
            return now - folder.stat().st_mtime > MARKERLESS_STALE_S
        except OSError:
            return False
    if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int):
        return age > MARKERLESS_STALE_S
    if rec.get("host") != socket.gethostname():
        return age > FOREIGN_STALE_S
    if rec.get("boot") != _boot_id():
        return True  # the machine rebooted since: its writer is gone
    if not _pid_alive(rec["pid"]):
        return True
    start = rec.get("start")
    return start is not None and _start_time(rec["pid"]) not in (None, start)  # the PID was reused


def remove_stale_partials(out_dir: Path) -> list:
    """Remove hidden folders of ``out_dir`` left behind by killed runs; returns those removed.

    Only names made by :func:`atomic_dir` for this very OUT_DIR qualify (``.NAME.partial-``
    or ``.NAME.old-`` plus mkdtemp's 8 characters), and only when their writer is gone.
    """
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(partial|old)-[a-z0-9_]{{8}}")
    removed = []
    now = time.time()
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and _is_stale(p, now):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _current_umask() -> int:
    try:  # Linux shows it without changing it, which matters when other threads create files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it, restored at once
    os.umask(mask)
    return mask


def _hidden_dir(out_dir: Path, kind: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-", dir=out_dir.parent))
    (d / WRITER_MARKER).write_text(json.dumps(writer_record(os.getpid())))
    return d


def _cannot_write(out_dir: Path, e: OSError, hidden=()) -> ConversionError:
    reason = e.strerror or str(e)
    # A path inside the hidden folders means nothing to the user (they are gone by now).
    where = Path(os.path.abspath(e.filename)) if e.filename else None
    if where is not None and where != Path(os.path.abspath(out_dir)) and \
            not any(d is not None and _contains(d, where) for d in hidden):
        reason += f" ({e.filename})"
    return ConversionError(f"cannot write {out_dir}: {reason}")


@contextlib.contextmanager
def atomic_dir(out_dir: os.PathLike, force: bool = False, protect=()) -> Iterator[Path]:
    """A hidden folder to fill, renamed to ``out_dir`` once the body finishes without error.

    ``out_dir`` is checked by :func:`check_out_dir`, and checked again just before an
    existing one is replaced. Any OSError while writing becomes a ConversionError
    "cannot write OUT_DIR: reason", with nothing left behind.
    """
    shown = Path(out_dir)
    check_out_dir(shown, force, protect)
    # abspath, not resolve: a symlinked parent stays as named, and "a/.." becomes a real name.
    out_dir = Path(os.path.abspath(shown))
    tmp = old = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir)
        tmp = _hidden_dir(out_dir, "partial")
        yield tmp
        (tmp / WRITER_MARKER).unlink()
        # mkdtemp makes 0700 and safetensors writes 0600; a model folder is shared like any
        # other file the user makes, so it gets the umask's modes.
        umask = _current_umask()
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out_dir.exists():
            check_out_dir(shown, force, protect)
            old = _hidden_dir(out_dir, "old")
            os.replace(out_dir, old / "dir")
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old / "dir", out_dir)
                raise
        else:
            os.replace(tmp, out_dir)
    except OSError as e:
        raise _cannot_write(shown, e, (tmp, old)) from None
    finally:
        for d in (tmp, old):
            if d is not None and d.exists():
                shutil.rmtree(d, ignore_errors=True)


def _save_tensors(state: Dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path),
                  metadata={"format": "pt"})
    except SafetensorError as e:
        # safetensors reports I/O failures (a full disk) as its own error; as an OSError
        # they read "cannot write OUT_DIR: No space left on device" like any other.
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def load_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly, naming every missing, extra or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong)}")
    if problems:
        raise ConversionError(f"{what} does not fit the model it describes: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


# Where the weights came from, not what they are: timm fills these in when it loads a folder.
_SOURCE_KEYS = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag"}


def check_trunk(name) -> None:
    """Refuse an impossible CRATE-α shape name before a model is built by it (timm's own
    names are left to timm)."""
    from ..models.crate_alpha import variant_args

    if isinstance(name, str) and name.startswith("crate_alpha_"):
        try:
            variant_args(name)
        except ValueError as e:
            raise ConversionError(str(e)) from None


def write_timm_folder(out_dir: os.PathLike, architecture: str, model_args: dict,
                      state: Dict[str, torch.Tensor], force: bool = False,
                      crop_pct: float = 0.875, interpolation: str = "bilinear", protect=()) -> Path:
    """A folder for ``timm.create_model("local-dir:OUT_DIR", pretrained=True)``.

    Its pretrained_cfg is the architecture's registered one (license, paper, fixed input
    size, ...), with this checkpoint's input size, preprocessing and classes, as timm's own
    exports carry the whole cfg.
    """
    import timm

    check_trunk(architecture)
    # A shape without a fixed name is crate_alpha_custom, its shape in model_args (which
    # timm's local-dir: applies), so the folder loads in any process without registration.
    architecture = architecture.partition(".")[0]
    model = timm.create_model(architecture, pretrained=False, **model_args)
    load_strict(model, state, "converted classifier")
    res = model_args["img_size"]
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if v is not None and k not in _SOURCE_KEYS}
    pretrained_cfg.update({
        "input_size": [3, res, res],
        "pool_size": None,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD),
        "num_classes": model_args["num_classes"],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    })
    config = {
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "num_features": model_args["embed_dim"],
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }
    with atomic_dir(out_dir, force, protect) as tmp:
        _save_tensors(state, tmp / TIMM_WEIGHTS)
        write_json(config, tmp / TIMM_CONFIG)
    return Path(out_dir)


def tokenizer_files(name: str, folder: os.PathLike | None = None) -> Dict[str, Path]:
    """The files of the HF tokenizer ``name``: from ``folder`` when given, else through
    huggingface_hub (its cache first; ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` honoured).

    Raises ConversionError naming what is missing and what to do.
    """
    if folder is not None:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ConversionError(f"--tokenizer {folder} is not a folder")
        found = {f: folder / f for f in TOKENIZER_FILES if (folder / f).is_file()}
        if "vocab.txt" not in found and "tokenizer.json" not in found:
            raise ConversionError(f"--tokenizer {folder} holds neither vocab.txt nor tokenizer.json")
        return found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    found = {}
    for f in TOKENIZER_FILES:
        try:
            found[f] = Path(hf_hub_download(name, f))
        except EntryNotFoundError:
            continue
        except Exception as e:  # offline, unreachable, unknown repo: all mean "not here"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConversionError(f"the {name} tokenizer is neither in the Hugging Face cache nor downloadable "
                                  f"({type(e).__name__}: {first}); pass --tokenizer DIR") from None
    if "vocab.txt" not in found and "tokenizer.json" not in found:
        raise ConversionError(f"the Hub repo {name} has no tokenizer files; pass --tokenizer DIR")
    return found


def write_open_clip_folder(out_dir: os.PathLike, model_cfg: dict, state: Dict[str, torch.Tensor],
                           preprocess_cfg: dict, force: bool = False, protect=(), tokenizer=None) -> Path:
    """A folder for ``open_clip.create_model_and_transforms("local-dir:OUT_DIR")``.

    A model with an HF tokenizer (CLIPA: bert-base-uncased) gets that tokenizer's files
    (``tokenizer``: a folder, or None for the Hub / its cache), so that
    ``open_clip.get_tokenizer("local-dir:OUT_DIR")`` works. When they cannot be had, the
    folder is written without them and one warning line says how to add them.
    """
    import open_clip

    check_trunk((model_cfg.get("vision_cfg") or {}).get("timm_model_name"))
    model = open_clip.model.CLIP(**copy.deepcopy(model_cfg))
    load_strict(model, state, "converted CLIP model")
    files = {}
    hf_name = (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
    if hf_name:
        try:
            files = tokenizer_files(hf_name, tokenizer)
        except ConversionError as e:
            if tokenizer is not None:  # asked for explicitly: a wrong folder is an error
                raise
            print(f"crate-alpha: warning: {out_dir} gets no tokenizer, so open_clip.get_tokenizer and zero-shot "
                  f"cannot use it: {e}", file=sys.stderr)
    with atomic_dir(out_dir, force, protect) as tmp:
        _save_tensors(state, tmp / OPEN_CLIP_WEIGHTS)
        write_json({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, tmp / OPEN_CLIP_CONFIG)
        for f, src in files.items():
            shutil.copyfile(src, tmp / f)
    return Path(out_dir)


def _load_error(e: Exception) -> str:
    # torch's message opens with "Error(s) in loading state_dict for CLIP:"; the lines after name the keys.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    return "; ".join(lines[:5]) or type(e).__name__


def export_open_clip_checkpoint(checkpoint: os.PathLike, model_name: str, out_dir: os.PathLike,
                                image_size: int | None = None, force: bool = False) -> Path:
    """A training checkpoint (open_clip_train's epoch_*.pt) as an open_clip ``local-dir:`` folder."""
    import math

    import open_clip
    from open_clip.model import resize_pos_embed

    from ..models.crate_alpha import custom_variant_name, variant_args

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        names = ", ".join(n for n in open_clip.list_models() if "crate" in n or "demo" in n)
        raise ConversionError(f"unknown open_clip model {model_name!r}; CRATE-α models: {names}")
    if image_size is not None and image_size < 1:
        raise ConversionError(f"--image-size must be a positive number of pixels, got {image_size}")
    check_out_dir(out_dir, force, protect=[checkpoint])
    state = read_state_dict(checkpoint, "checkpoint", ConversionError)
    vision = cfg["vision_cfg"]
    timm_name = vision.get("timm_model_name")
    if image_size is None and timm_name is not None:
        trunk_pos = state.get("visual.trunk.pos_embed")
        if trunk_pos is not None:
            n = trunk_pos.shape[1] - 1 if trunk_pos.ndim == 3 else -1
            side = math.isqrt(max(n, 0))
            if n < 1 or side * side != n:
                raise ConversionError(f"visual.trunk.pos_embed has shape {tuple(trunk_pos.shape)}; "
                                      "expected (1, 1 + a square number of tokens, width)")
            image_size = side * variant_args(timm_name)["patch_size"]
    if image_size is not None and image_size != vision.get("image_size"):
        vision["image_size"] = image_size
        if timm_name is not None:
            a = variant_args(timm_name)
            vision["timm_model_name"] = custom_variant_name(
                a["embed_dim"], a["depth"], a["num_heads"], a["patch_size"], image_size)
    try:
        check_trunk(vision.get("timm_model_name"))  # another image size is another shape name
        model = open_clip.model.CLIP(**copy.deepcopy(cfg))
    except ValueError as e:
        raise ConversionError(f"{model_name} at image size {vision.get('image_size')}: {e}") from None
    # Loaded through the model, so that a checkpoint of another resolution is resampled.
    try:
        resize_pos_embed(state, model)
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as e:
        raise ConversionError(f"{checkpoint} does not fit {model_name}: {_load_error(e)}") from None
    problems = []
    for what, keys in (("missing keys", result.missing_keys), ("unexpected keys", result.unexpected_keys)):
        if keys:
            more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{what}: {', '.join(keys[:10])}{more}")
    if problems:
        raise ConversionError(f"{checkpoint} does not fit {model_name}: " + " | ".join(problems))
    pp = {"size": vision.get("image_size", 224)}  # open_clip's default normalisation, as trained
    return write_open_clip_folder(out_dir, cfg, model.state_dict(), pp, force=force, protect=[checkpoint])
