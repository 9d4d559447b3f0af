"""Check a folder of webdataset shards: counts, and every kind of damage, by shard and key.

Samples are grouped exactly as webdataset groups them (its own ``base_plus_ext`` split, a
sample is a run of adjacent members with one key), so what is reported here is what the
training loader will see: a duplicate member that webdataset raises on, a name that it
silently drops, a key that comes back as a second sample. Members are read by the training
loader's own tar reader (``tarstream``) and images are checked against its pixel limit
before they are decoded, so a shard is damaged here exactly where the loader skips it.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import DataError
from . import storage
from .decode import check_area, image_size
from .tarstream import tar_members

from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from webdataset.tariterators import base_plus_ext

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)

# What to do about each kind of damage; the caption policy is the one ``download`` applies
# (rows without a caption are never fetched), so an empty caption is not fixed by fetching again.
ADVICE = {
    "tar": "re-download: delete the shard and its NNNNN_stats.json, then rerun the same download command "
           "(it resumes and fetches only that shard)",
    "image": "re-download the shard as above; if the image is bad at its source too, the loader skips the sample",
    "name": "the shard was altered or not written by this pipeline: rebuild it or drop it "
            "(webdataset raises on duplicate members and silently drops or splits the others)",
    "caption": "the metadata had no caption for these rows, so fetching again cannot help: drop the samples, "
               "or pass --no-caption if you train without captions (download drops such rows itself)",
    "empty": "the shard holds no sample (every row of it failed to download, or it was written empty): "
             "leave it out of train_data, or re-download it as above",
    "file": "not a regular file (a named pipe, a device or a folder named *.tar): this pipeline never writes one; "
            "move it out of the shard folder",
}


@dataclass
class ShardReport:
    shard: str
    samples: int = 0   # samples as webdataset groups them
    usable: int = 0    # samples without any problem
    problems: List[str] = field(default_factory=list)  # "key: what is wrong"
    kinds: set = field(default_factory=set)            # keys of ADVICE that apply
    notes: List[str] = field(default_factory=list)     # what is worth knowing but not damage

    @property
    def ok(self) -> bool:
        return not self.problems

    def flag(self, kind: str, message: str) -> None:
        self.kinds.add(kind)
        self.problems.append(message)


def _check_image(data: bytes) -> str:
    try:
        check_area(data, image_size(data))  # the loader's limit, from the header: a bomb is not decoded here either
    except ValueError as e:
        return str(e)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: a truncated file raises here
    except Exception as e:  # noqa: BLE001 - any decoder error means "does not decode"
        return f"image does not decode ({type(e).__name__}: {e})"
    return ""


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in posixpath.normpath(name).split("/")


def verify_shard(path: storage.Where, require_caption: bool = True) -> ShardReport:
    """Check one shard, a local path or an fsspec URL (read as a stream, as the loader reads it)."""
    rep = ShardReport(shard=os.path.basename(str(path).rstrip("/")))
    not_file = _not_a_file(path)
    if not_file:  # opening a named pipe would wait for a writer forever
        rep.flag("file", f"(file): {not_file}, not a shard")
        return rep
    groups: List[tuple] = []   # (key, {ext: bytes}, [problems])
    seen_keys: Dict[str, int] = {}
    try:
        with storage.open_read(path) as stream:
            for name, data in tar_members(stream):
                if _unsafe(name):
                    rep.flag("name", f"{name}: member name points outside the shard")
                    continue
                key, ext = base_plus_ext(name)
                if key is None:
                    rep.flag("name", f"{name}: member name has no key (it starts with a dot or has no "
                                     "extension); webdataset drops it silently")
                    continue
                ext = ext.lower()
                if groups and groups[-1][0] == key:
                    parts, problems = groups[-1][1], groups[-1][2]
                    if ext in parts:
                        rep.kinds.add("name")
                        problems.append(f"duplicate member {key}.{ext} (webdataset raises on it)")
                else:
                    parts, problems = {}, []
                    if key in seen_keys:
                        rep.kinds.add("name")
                        problems.append("key appears again after other samples (webdataset reads it as a "
                                        "second sample)")
                    seen_keys[key] = seen_keys.get(key, 0) + 1
                    groups.append((key, parts, problems))
                parts[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        rep.flag("tar", f"(tar): truncated or unreadable tar after {len(groups)} samples ({e})")
    for key, parts, problems in groups:
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None:
            rep.kinds.add("image")
            problems.append("sample without image")
        else:
            err = _check_image(parts[image_ext])
            if err:
                rep.kinds.add("image")
                problems.append(err)
        if require_caption:
            present = [e for e in CAPTION_EXTS if e in parts]
            if not any(parts[e].strip() for e in present):
                rep.kinds.add("caption")
                problems.append("empty caption" if present else "sample without caption")
        rep.problems += [f"{key}: {p}" for p in problems]
        rep.usable += not problems
    rep.samples = len(groups)
    if not groups and rep.ok:
        failed = _all_rows_failed(path)
        if failed is not None:  # img2dataset writes a shard whose every row failed as an empty tar: its output, not damage
            rep.notes.append(f"(tar): no samples: all {failed} rows of it failed to download (training skips it)")
        else:
            rep.flag("empty", "(tar): no samples: the shard is empty")
    return rep


def _all_rows_failed(path: storage.Where) -> Optional[int]:
    """The row count of ``path``'s img2dataset statistics when they record no success, else None."""
    stats = re.sub(r"\.tar$", "_stats.json", str(path))
    try:
        with storage.open_read(stats) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("successes") != 0:
        return None
    return int(record.get("count") or 0)


def _not_a_file(path: storage.Where) -> str:
    """What a local ``path`` is if not a regular file ("a named pipe", ...), else ""."""
    fs, local = storage.location(path)
    if not isinstance(fs, LocalFileSystem):
        return ""  # object stores hold only files
    try:
        mode = os.stat(local).st_mode
    except OSError:
        return ""  # opening it reports what is wrong
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def verify_folder(folder: storage.Where, require_caption: bool = True) -> List[ShardReport]:
    """Check every ``*.tar`` of ``folder`` (a local path or an fsspec URL such as ``s3://bucket/shards``)."""
    if not storage.isdir(folder):
        raise DataError(f"shard folder {folder} does not exist")
    shards = storage.glob(folder, "*.tar")
    if not shards:
        raise DataError(f"no .tar shards in {folder}")
    return [verify_shard(s, require_caption) for s in shards]


def format_report(reports: List[ShardReport]) -> str:
    width = max(len(r.shard) for r in reports)
    lines = [f"{'shard':<{width}}  samples   usable  status", "-" * (width + 33)]
    for r in reports:
        status = "ok" if r.ok else f"{len(r.problems)} problem(s)"
        lines.append(f"{r.shard:<{width}}  {r.samples:7d}  {r.usable:7d}  {status}")
        lines += [f"    {r.shard}: {p}" for p in r.problems]
        lines += [f"    {r.shard}: note: {n}" for n in r.notes]
    total = sum(r.samples for r in reports)
    usable = train_num_samples(reports)
    bad = sum(len(r.problems) for r in reports)
    lines.append("-" * (width + 33))
    lines.append(f"{'total':<{width}}  {total:7d}  {usable:7d}  {'ok' if not bad else f'{bad} problem(s)'}")
    return "\n".join(lines)


def advice(reports: List[ShardReport]) -> List[str]:
    """One line of advice per kind of damage found, naming the shards it concerns."""
    lines = []
    for kind, text in ADVICE.items():
        shards = [r.shard for r in reports if kind in r.kinds]
        if shards:
            lines.append(f"{kind} damage in {', '.join(shards)}: {text}")
    return lines


def train_num_samples(reports: List[ShardReport]) -> int:
    """Samples the loader can use: those verify found nothing wrong with."""
    return sum(r.usable for r in reports)
