"""Shard folders that are local paths or fsspec URLs (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

img2dataset writes through fsspec, so a download can go straight to the object store a
cluster shares; the pipeline's own files (ownership marker, settings manifest, filtered
metadata, summary) go the same way. Local paths keep the atomic temp-file-and-rename
writes of ``common.atomic_write``; elsewhere a file is written under a temporary name
and moved into place (on object stores the final object appears whole or not at all).
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Callable, List, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..common import atomic_write
from ..errors import DataError

Where = Union[str, os.PathLike]

# the back-end each URL scheme needs, for the error when it is missing (setup.py extras)
BACKENDS = {"s3": "s3fs (pip install 'crate-alpha[s3]')", "gs": "gcsfs (pip install 'crate-alpha[gcs]')",
            "gcs": "gcsfs (pip install 'crate-alpha[gcs]')", "hdfs": "pyarrow with libhdfs (a Hadoop client)"}


def is_url(where: Where) -> bool:
    return "://" in str(where)


def location(where: Where):
    """(filesystem, path on it) for a local path or an fsspec URL; a clear error if the back-end is missing."""
    try:
        return fsspec.core.url_to_fs(str(where))
    except (ImportError, ValueError) as e:
        scheme = str(where).split("://", 1)[0]
        need = BACKENDS.get(scheme, f"the fsspec back-end for {scheme}://")
        raise DataError(f"cannot open {where}: {e}. Install {need}") from None


def join(where: Where, *parts: str) -> str:
    """``where``/``parts``, keeping a URL a URL."""
    if not is_url(where):
        return str(Path(where, *parts))
    return posixpath.join(str(where).rstrip("/"), *parts)


def exists(where: Where) -> bool:
    fs, path = location(where)
    return fs.exists(path)


def isdir(where: Where) -> bool:
    fs, path = location(where)
    return fs.isdir(path)


def names(where: Where) -> List[str]:
    """Names of the entries of folder ``where``."""
    fs, path = location(where)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def glob(where: Where, pattern: str) -> List[str]:
    """Entries of folder ``where`` matching ``pattern``, as paths or URLs like ``where``."""
    fs, path = location(where)
    return [join(where, posixpath.basename(p)) for p in sorted(fs.glob(path.rstrip("/") + "/" + pattern))]


def makedirs(where: Where) -> None:
    fs, path = location(where)
    fs.makedirs(path, exist_ok=True)


def remove(where: Where) -> None:
    """Delete a file or a whole folder."""
    fs, path = location(where)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_bytes(where: Where) -> bytes:
    fs, path = location(where)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(where: Where):
    return json.loads(read_bytes(where).decode("utf-8"))


def write_with(where: Where, write: Callable) -> None:
    """``write(file)`` into a temporary file next to ``where``, then moved onto ``where``."""
    fs, path = location(where)
    if isinstance(fs, LocalFileSystem):
        def to_path(tmp):
            with open(tmp, "wb") as f:
                write(f)
        atomic_write(path, to_path)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_json(obj, where: Where) -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8")
    write_with(where, lambda f: f.write(data))


def open_read(where: Where):
    fs, path = location(where)
    return fs.open(path, "rb")
