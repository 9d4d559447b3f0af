"""Check a folder of webdataset shards: counts, and every kind of damage, by shard and key."""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)


@dataclass
class ShardReport:
    shard: str
    samples: int = 0
    problems: List[str] = field(default_factory=list)  # "key: what is wrong"

    @property
    def ok(self) -> bool:
        return not self.problems


def _split_key(name: str):
    base = os.path.basename(name)
    dirname = os.path.dirname(name)
    key, _, ext = base.partition(".")
    return (f"{dirname}/{key}" if dirname else key), ext.lower()


def _check_image(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: a truncated file raises here
    except Exception as e:  # noqa: BLE001 - any decoder error means "does not decode"
        return f"image does not decode ({type(e).__name__}: {e})"
    return ""


def verify_shard(path: os.PathLike, require_caption: bool = True) -> ShardReport:
    path = Path(path)
    rep = ShardReport(shard=path.name)
    samples: Dict[str, Dict[str, bytes]] = {}
    order: List[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        rep.problems.append(f"(tar): truncated or unreadable tar after {len(order)} samples ({e})")
    for key in order:
        parts = samples[key]
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None:
            rep.problems.append(f"{key}: sample without image")
        else:
            err = _check_image(parts[image_ext])
            if err:
                rep.problems.append(f"{key}: {err}")
        if require_caption and not any(parts.get(e, b"").strip() for e in CAPTION_EXTS):
            rep.problems.append(f"{key}: sample without caption")
    rep.samples = len(order)
    return rep


def verify_folder(folder: os.PathLike, require_caption: bool = True) -> List[ShardReport]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder {folder} does not exist")
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {folder}")
    return [verify_shard(s, require_caption) for s in shards]


def format_report(reports: List[ShardReport]) -> str:
    width = max(len(r.shard) for r in reports)
    lines = [f"{'shard':<{width}}  samples  status", "-" * (width + 24)]
    for r in reports:
        lines.append(f"{r.shard:<{width}}  {r.samples:7d}  {'ok' if r.ok else f'{len(r.problems)} problem(s)'}")
        lines += [f"    {r.shard}: {p}" for p in r.problems]
    total = sum(r.samples for r in reports)
    bad = sum(len(r.problems) for r in reports)
    lines.append("-" * (width + 24))
    lines.append(f"{'total':<{width}}  {total:7d}  {'ok' if not bad else f'{bad} problem(s)'}")
    return "\n".join(lines)


def train_num_samples(reports: List[ShardReport]) -> int:
    return sum(r.samples for r in reports)
