"""Which folders this project may clear: only those it wrote itself, or empty ones.

A folder the pipeline creates gets a marker file first thing, so that even a run killed
half-way leaves a folder the next run recognises as its own. The marker has no ``.json``
suffix on purpose: img2dataset reads every top-level ``*.json`` of its output folder as a
shard's statistics.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..common import CrateAlphaError, write_json

MARKER = ".crate-alpha-output"


class DataError(CrateAlphaError):
    """Bad data input; the message names the problem and what to do."""


def owner_kind(folder: os.PathLike):
    """The kind recorded in ``folder``'s marker, or None when this project did not write it."""
    marker = Path(folder) / MARKER
    try:
        return json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def is_empty_dir(folder: os.PathLike) -> bool:
    p = Path(folder)
    return p.is_dir() and not any(p.iterdir())


def claim(folder: os.PathLike, kind: str) -> Path:
    """Create ``folder`` (or take an empty or already-ours one) and mark it as written by us."""
    folder = Path(folder)
    if folder.exists():
        check_may_write(folder, kind)
    folder.mkdir(parents=True, exist_ok=True)
    if owner_kind(folder) != kind:
        write_json({"written_by": "crate-alpha", "kind": kind}, folder / MARKER)
    return folder


def mark(folder: os.PathLike, kind: str) -> None:
    """Record that this project wrote ``folder`` (a run folder its trainer has just filled)."""
    write_json({"written_by": "crate-alpha", "kind": kind}, Path(folder) / MARKER)


def check_may_write(folder: os.PathLike, kind: str) -> None:
    """Refuse a path that is a file, or a non-empty folder this project did not write as ``kind``."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DataError(f"{folder} exists and is not a folder; choose another output path")
    if is_empty_dir(folder):
        return
    found = owner_kind(folder)
    if found == kind:
        return
    what = f"a crate-alpha {found} folder" if found else "not written by crate-alpha"
    raise DataError(f"{folder} is not empty and is {what}; nothing was changed. Choose a new or empty "
                    f"folder for the {kind}, or move its contents away yourself")


def clear_owned(folder: os.PathLike, kind: str) -> None:
    """Delete ``folder`` only if it is empty or this project wrote it as ``kind``; refuse otherwise."""
    folder = Path(folder)
    check_may_write(folder, kind)
    if folder.exists():
        shutil.rmtree(folder)
