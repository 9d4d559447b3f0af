"""What every command shares: one atomic writer, and model folders and checkpoints read
through open_clip and timm (the project's errors are in ``errors``, shard patterns in
``data.shards``).

Packages of crate_alpha import from here, never each other's private helpers. This module
is the lowest layer with ``errors``: it imports nothing else of crate_alpha's.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from .errors import CheckpointError, CrateAlphaError  # CrateAlphaError also for its old import path

LOCAL_DIR = "local-dir:"


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


def check_writable_parent(path: os.PathLike, what: str = "", error=CrateAlphaError) -> Path:
    """Refuse, before any work, a ``path`` that could not be created: its nearest existing
    ancestor must be a folder we may create entries in. Returns that ancestor.

    Root passes ``os.access`` regardless, so a read-only folder can still fail later, as an
    OSError with its errno."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    named = f"{what} {path}" if what else str(path)
    if not parent.is_dir():
        raise error(f"cannot write {named}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write {named}: no permission to create entries in {parent}")
    return parent


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
        raise CheckpointError(f"model folder {folder} does not exist")
    return folder


def folder_kind(folder: Path) -> str:
    """'open_clip' or 'timm', from the config file the folder holds."""
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    if (folder / "config.json").is_file():
        return "timm"
    raise CheckpointError(f"{folder} holds neither open_clip_config.json (an open_clip model) nor config.json "
                          "(a timm model): convert or export one with `crate-alpha convert` / `crate-alpha export`")


def timm_folder_config(folder: Path) -> dict:
    """timm's ``config.json`` of a model folder (architecture, model_args, pretrained_cfg)."""
    if folder_kind(folder) != "timm":
        raise CheckpointError(f"{folder} is an open_clip folder; a timm model folder (config.json) is needed here")
    return json.loads((folder / "config.json").read_text())


def _torch_file_kind(path: Path) -> Optional[str]:
    """'torch' for torch.save's zip archive (``*/data.pkl`` inside) or its legacy raw pickle,
    'damaged' for a zip archive that does not open (a cut-short copy), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:1] == b"\x80":
            return "torch"
        if not zipfile.is_zipfile(path):
            return "damaged" if head == b"PK\x03\x04" else None
        with zipfile.ZipFile(path) as z:
            return "torch" if any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()) else None
    except (OSError, zipfile.BadZipFile):
        return None


def _refusal(e: BaseException) -> str:
    """The line of torch's weights_only refusal that says what it met (its other lines are advice)."""
    lines = [ln.strip().removeprefix("WeightsUnpickler error:").strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines[1:] if ln and not ln.startswith(("Please file", "Check the documentation"))]
    return lines[0] if lines else type(e).__name__


def read_checkpoint(path: os.PathLike, what: str = "checkpoint", error=CheckpointError) -> dict:
    """The dict a checkpoint file holds, read with ``torch.load(weights_only=True)``: a pickle
    that would run code when loaded is refused unrun, and every other reason a file cannot be
    a checkpoint is named in one line (``error``: the exception type to raise)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise error(f"{what} {path} is not a readable safetensors file: {e}") from None
    kind = _torch_file_kind(path)
    if kind == "damaged":
        raise error(f"{what} {path} is a damaged or truncated checkpoint (its zip archive does not open)")
    if kind is None:
        raise error(f"{what} {path} is not a PyTorch checkpoint (a file written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # what weights_only names when the pickle asks for a function or class
            raise error(f"{what} {path} was not loaded: it is not a plain weights file (its pickle would run code "
                        f"when loaded, which torch.load(weights_only=True) refused: {_refusal(e)})") from None
        raise error(f"{what} {path} is not a readable PyTorch checkpoint (damaged?): {_refusal(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # a truncated or damaged archive
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{what} {path} is not a readable PyTorch checkpoint (damaged or truncated?): {first}") from None
    if not isinstance(obj, dict):
        raise error(f"{what} {path} holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise error(f"{what} {path} holds no weights (an empty dict)")
    return obj


def state_dict_of(obj: dict, source, error=CheckpointError) -> Dict[str, "object"]:
    """The tensors of a loaded checkpoint: inside the ``state_dict`` (open_clip_train), ``model``
    (this project's classifier trainer) or ``module`` wrapper, DDP's ``module.`` prefix removed."""
    import torch

    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise error(f"{source} holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise error(f"{source} holds no weights (an empty state dict)")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise error(f"{source}: keys that are not parameter names (strings): {', '.join(map(repr, bad[:10]))}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise error(f"{source}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def read_state_dict(path: os.PathLike, what: str = "checkpoint", error=CheckpointError) -> Dict[str, "object"]:
    """The state dict of a checkpoint file (see :func:`read_checkpoint` and :func:`state_dict_of`):
    the one reader of checkpoints given to a command, so each is checked the same way."""
    return state_dict_of(read_checkpoint(path, what, error), f"{what} {path}", error)


def _listed(keys, n: int = 8, sep: str = ", ") -> str:
    keys = list(keys)
    return sep.join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _fit_problems(missing=(), unexpected=(), error: Optional[RuntimeError] = None) -> List[str]:
    """What kept a state dict from loading, as phrases. With strict=False torch returns the
    missing and unexpected keys and raises only for shapes (after the model's own loading
    hooks: a model that resamples its position grid accepts another grid size)."""
    problems = []
    if error is not None:
        text = str(error)
        if not text.startswith("Error(s) in loading state_dict"):
            raise error  # not a fitting problem: a bug keeps its traceback
        shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^]]*\])\)", text)
        found = [f"size mismatch for {k}: {a} in the file, {b} in the model" for k, a, b in shapes]
        problems.append(_listed(found, 4, "; ") if found else "; ".join(ln.strip() for ln in text.splitlines()[1:4]))
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
    return problems


def load_weights(model, state_dict: dict, source, what: str = "the model", allow_missing=lambda key: False) -> list:
    """Load ``state_dict`` into ``model``; a file of another model is refused in one line naming
    its missing, unexpected and mis-shaped keys. Returns the missing keys ``allow_missing`` let pass."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit {what}: " + "; ".join(_fit_problems(error=e))) from None
    bad = [k for k in missing if not allow_missing(k)]
    if bad or unexpected:
        raise CheckpointError(f"{source} does not fit {what}: " + "; ".join(_fit_problems(bad, unexpected)))
    return list(missing)


def load_open_clip_checkpoint(model, path: os.PathLike, what: str = "checkpoint", model_name: str = "the model"):
    """open_clip's ``load_checkpoint`` (its grid and context resizing, old text layouts) after the
    checked read, with another model's file named in one line. ``model`` may be on the meta
    device: then only the fit is checked, at no memory cost."""
    import warnings

    import open_clip

    read_state_dict(path, what)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # a meta model's no-op
        try:
            result = open_clip.load_checkpoint(model, str(path), strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"{what} {path} does not fit {model_name}: "
                                  + "; ".join(_fit_problems(error=e))) from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{what} {path} does not fit {model_name}: "
                              + "; ".join(_fit_problems(result.missing_keys, result.unexpected_keys)))


def check_open_clip_checkpoint(model_name: str, path: os.PathLike, what: str = "checkpoint") -> None:
    """Refuse, before any work, a checkpoint that ``open_clip.create_model(model_name, pretrained=path)``
    would fail to load (checked on a meta-device model: no weights are allocated)."""
    import warnings

    import open_clip

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        model = open_clip.create_model(model_name, device="meta")
    load_open_clip_checkpoint(model, path, what, model_name)


@contextlib.contextmanager
def swapped(module, **attrs) -> Iterator[None]:
    """``module``'s attributes set to ``attrs`` for this block, and what was there put back after,
    also when the block raises: for libraries with no hooks (img2dataset, open_clip_train),
    changed through the globals their code looks up, for one call or one run only."""
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
