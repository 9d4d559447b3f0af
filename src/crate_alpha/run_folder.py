"""The folders the trainers and tools write: created and marked by the command, resumed
only by the same kind of command, used by one run at a time.

The rule is the data pipeline's (``data.ownership``): a folder that does not exist or is
empty is created and marked; one that carries this project's marker of the same kind is
reused (a training run resumes there); anything else is refused with its name, before a
file is written. A training run also holds an exclusive lock on its folder for as long as
it runs, so a second run started into the same folder is refused naming the first's pid;
the operating system drops the lock when the process ends, even by kill -9, so a killed
run is resumed without any clean-up.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .data import ownership
from .errors import DataError, RunFolderError

LOCK = ".crate-alpha-lock"

# the kinds of folder each command writes (recorded in the marker)
CLIP_RUN = "CLIP training run"
CLASSIFIER_RUN = "classifier training run"
EXPLAIN = "explain output"
DIAGNOSE = "diagnose output"


def check(folder: os.PathLike, kind: str) -> None:
    """Refuse ``folder`` unless it is absent, empty, or a ``kind`` folder (writes nothing)."""
    try:
        ownership.check_may_write(str(folder), kind)
    except DataError as e:
        raise RunFolderError(str(e)) from None


def claim(folder: os.PathLike, kind: str) -> Path:
    """Create (or take an empty or already-ours) ``folder`` and mark it as a ``kind`` folder."""
    check(folder, kind)
    ownership.claim(str(folder), kind)
    return Path(folder)


@contextlib.contextmanager
def locked(folder: os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (already claimed) while the block runs."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield Path(folder)
        return
    path = Path(folder) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise RunFolderError(f"{folder} is in use by a run still going (pid {holder}); wait for it to end, "
                                 "or give this run another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield Path(folder)
    finally:
        os.close(fd)  # closing the descriptor releases the lock
