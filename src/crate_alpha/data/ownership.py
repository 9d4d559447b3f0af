"""Which folders this project may clear: only those it wrote itself, or empty ones.

A folder the pipeline creates gets a marker file first thing, so that even a run killed
half-way leaves a folder the next run recognises as its own. The marker has no ``.json``
suffix on purpose: img2dataset reads every top-level ``*.json`` of its output folder as a
shard's statistics. Folders may be local paths or fsspec URLs (``storage``).
"""
from __future__ import annotations

from ..errors import DataError
from . import storage

MARKER = ".crate-alpha-output"


def owner_kind(folder: storage.Where):
    """The kind recorded in ``folder``'s marker, or None when this project did not write it."""
    try:
        return storage.read_json(storage.join(folder, MARKER)).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def is_empty_dir(folder: storage.Where) -> bool:
    return storage.isdir(folder) and not storage.names(folder)


def mark(folder: storage.Where, kind: str) -> None:
    """Record that this project wrote ``folder`` (a run folder its trainer has just filled)."""
    storage.write_json({"written_by": "crate-alpha", "kind": kind}, storage.join(folder, MARKER))


def claim(folder: storage.Where, kind: str):
    """Create ``folder`` (or take an empty or already-ours one) and mark it as written by us."""
    if storage.exists(folder):
        check_may_write(folder, kind)
    storage.makedirs(folder)
    if owner_kind(folder) != kind:
        mark(folder, kind)
    return folder


def check_may_write(folder: storage.Where, kind: str) -> None:
    """Refuse a path that is a file, or a non-empty folder this project did not write as ``kind``."""
    if not storage.exists(folder):
        return
    if not storage.isdir(folder):
        raise DataError(f"{folder} exists and is not a folder; choose another output path")
    if is_empty_dir(folder):
        return
    found = owner_kind(folder)
    if found == kind:
        return
    what = f"a crate-alpha {found} folder" if found else "not written by crate-alpha"
    raise DataError(f"{folder} is not empty and is {what}; nothing was changed. Choose a new or empty "
                    f"folder for the {kind}, or move its contents away yourself")


def clear_owned(folder: storage.Where, kind: str) -> None:
    """Delete ``folder`` only if it is empty or this project wrote it as ``kind``; refuse otherwise."""
    check_may_write(folder, kind)
    storage.remove(folder)
