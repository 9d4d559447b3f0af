"""Webdataset shard patterns: listed, checked before anything is built, and counted.

Both trainers and the data benchmark take their shards through here, so a missing shard,
a named pipe or an empty corpus is refused the same way everywhere.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path
from typing import List

from ..errors import DataError


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
        raise DataError(f"no {what}: set it to webdataset shards, e.g. 'shards/{{00000..00099}}.tar'")
    urls = expand_shards(pattern)
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if local and len(missing) == len(local):
        parent = os.path.dirname(local[0]) or "."
        hint = "" if os.path.isdir(parent) else f" (folder {parent} does not exist)"
        raise DataError(f"{what} {pattern!r} matches no file{hint}")
    if missing:
        raise DataError(f"{what} {pattern!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    # a named pipe would make the loader (and the sample count) wait for a writer forever
    odd = [u for u in local if not os.path.isfile(u)]
    if odd:
        raise DataError(f"{what} {pattern!r}: {odd[0]} is not a regular file (a folder, a named pipe or a "
                              "device): shards are .tar files; leave it out of the pattern")
    return urls


def count_samples(urls: List[str]) -> int:
    """Samples in the shards: img2dataset's per-shard statistics, or the tar headers.

    A shard that cannot be read is counted up to its damage, as the training loader reads it
    (it skips the rest), with one warning naming it; no sample in any shard is an error.
    """
    remote = [u for u in urls if is_remote(u)]
    if remote:
        raise DataError(f"cannot count the samples of remote shards such as {remote[0]!r}: "
                              "set train_num_samples=N (img2dataset's stats give N)")
    total = 0
    for u in urls:
        stats = Path(u[: -len(".tar")] + "_stats.json") if u.endswith(".tar") else None
        if stats is not None and stats.is_file():
            total += _stats_successes(stats)
        else:
            total += _tar_samples(u)
    if not total:
        raise DataError(f"the shards hold no samples ({len(urls)} shard(s), e.g. {urls[0]}): check them "
                              "with `crate-alpha data verify FOLDER`")
    return total


def _stats_successes(stats: Path) -> int:
    """The ``successes`` count of img2dataset's ``NNNNN_stats.json``."""
    try:
        n = json.loads(stats.read_text())["successes"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        n = e
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"{stats} has no sample count (img2dataset's stats give 'successes' as a number "
                              "of samples): remove it to have the shard's tar counted, or set train_num_samples=N")
    return n


def _tar_samples(url: str) -> int:
    """Samples of a tar shard as webdataset groups them (adjacent members with one key), from
    its headers alone; up to the damage, with a warning, if it cannot be read to the end."""
    from webdataset.tariterators import base_plus_ext

    from .tarstream import is_meta, tar_names

    samples, last = 0, None
    try:
        with open(url, "rb") as f:
            for name in tar_names(f):
                if is_meta(name):
                    continue
                key = base_plus_ext(name)[0]
                if key is not None and key != last:
                    samples += 1
                    last = key
    except (tarfile.TarError, OSError) as e:
        logging.getLogger(__name__).warning(
            "shard %s is damaged (%s): %d sample(s) before the damage counted; the training loader skips the "
            "rest (`crate-alpha data verify FOLDER` lists what is wrong)", url, e, samples)
    return samples
