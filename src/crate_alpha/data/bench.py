"""Samples/s per core of the training decode at 84 px from 256 px JPEG shards: plain vs draft."""
from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _make_shards(folder: Path, n: int, size: int) -> list:
    from .digits import CLASSNAMES, digit_image, write_tar
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        k = i % len(digits.target)
        img = digit_image(digits.data[k], size)
        # texture so JPEG decode work is realistic, not a flat upsampled digit
        noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        samples.append((f"{i:06d}", {"jpg": buf.getvalue(), "txt": CLASSNAMES[digits.target[k]].encode()}))
    write_tar(folder / "000000.tar", samples)
    return [str(folder / "000000.tar")]


def bench_decode(size: int = 84, source_size: int = 256, samples: int = 600, out="runs/bench/data.json") -> list:
    from ..common import write_json
    from .decode import shard_loader, train_transform

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        urls = _make_shards(Path(tmp), samples, source_size)
        for draft in (False, True):
            tf = train_transform(size, (0.5,) * 3, (0.5,) * 3, scale=(0.4, 1.0), draft=draft)
            best = 0.0
            for _ in range(3):
                t = time.perf_counter()
                n = sum(len(x[1]) for x in shard_loader(urls, tf, batch_size=64))
                best = max(best, n / (time.perf_counter() - t))
            rows.append({"path": "draft (reduced-size JPEG decode)" if draft else "plain (full decode)",
                         "size": size, "source_size": source_size, "samples_per_s_per_core": best})
    for r in rows:
        print(f"{r['path']:<36} {r['source_size']} px -> {r['size']} px: {r['samples_per_s_per_core']:8.1f} samples/s/core")
    print(f"speed-up: {rows[1]['samples_per_s_per_core'] / rows[0]['samples_per_s_per_core']:.2f}x")
    write_json(rows, out)
    return rows
