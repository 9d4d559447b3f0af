"""The built-in demo corpus: scikit-learn's 1,797 real handwritten digits.

Training images are served over loopback HTTP and fetched through ``download`` (so the
real img2dataset path runs end to end) into webdataset shards; the held-out split is
written for clip_benchmark (``wds/``) and as an ImageFolder tree for classification.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..common import atomic_write, write_json

from .download import download
from .loopback import serve_folder
from .ownership import claim, clear_owned, owner_kind

DEMO_KIND = "demo corpus"

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a photo of the handwritten digit {}.",
    "a handwritten {}.",
    "the number {} written by hand.",
    "a scan of a handwritten digit {}.",
    "a black and white image of the digit {}.",
    "a blurry handwritten {}.",
]
ZEROSHOT_TEMPLATES = [
    "a photo of the handwritten digit {c}.",
    "a handwritten {c}.",
    "the number {c} written by hand.",
]


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit (values 0..16) upsampled to a size x size RGB image."""
    gray = Image.fromarray(np.clip(pixels.reshape(8, 8) * 16, 0, 255).astype(np.uint8), "L")
    return gray.resize((size, size), Image.BICUBIC).convert("RGB")


def jpeg_q95(img: Image.Image) -> bytes:
    """JPEG at quality 95 (img2dataset's default encode quality), as the demo corpus stores images."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_tar(path: Path, samples) -> None:
    def write(tmp):
        with tarfile.open(tmp, "w") as tar:
            for key, files in samples:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))

    atomic_write(path, write)


def build_demo(out_dir: os.PathLike, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0,
               samples_per_shard: int = 256, processes: int = 2, force: bool = False) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out_dir)
    if not force and owner_kind(out) == DEMO_KIND and (out / "demo.json").exists():
        return json.loads((out / "demo.json").read_text())
    clear_owned(out, DEMO_KIND)  # an earlier (perhaps killed) demo build, or an empty folder; nothing else
    claim(out, DEMO_KIND)
    t0 = time.time()
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                           stratify=digits.target)
    rng = np.random.default_rng(seed)

    # 1. training images on a loopback server, fetched through the real downloader
    serve = out / "_serve"
    serve.mkdir()
    rows = []
    for i in sorted(train_idx):
        label = int(digits.target[i])
        data = jpeg_q95(digit_image(digits.data[i], image_size))
        uid = f"digit{i:04d}"
        (serve / f"{uid}.jpg").write_bytes(data)
        caption = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(CLASSNAMES[label])
        rows.append({"uid": uid, "text": caption, "label": label, "original_width": image_size,
                     "original_height": image_size, "sha256": hashlib.sha256(data).hexdigest()})
    with serve_folder(serve) as base:
        for r in rows:
            r["url"] = f"{base}/{r['uid']}.jpg"
        (out / "metadata").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), out / "metadata" / "train.parquet")
        summary = download([out / "metadata" / "train.parquet"], out / "train", image_size=image_size,
                           samples_per_shard=samples_per_shard, processes=processes, threads=16,
                           timeout=10, resume=False)
    shutil.rmtree(serve)

    # 2. held-out split for clip_benchmark (wds/) and for classification (ImageFolder)
    test_dir = out / "wds" / "test"
    test_dir.mkdir(parents=True)
    samples = []
    for n, i in enumerate(sorted(test_idx)):
        img = digit_image(digits.data[i], image_size)
        label = int(digits.target[i])
        samples.append((f"s{n:05d}", {"jpg": jpeg_q95(img), "cls": str(label).encode()}))
        d = out / "imagefolder" / "val" / CLASSNAMES[label]
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"digit{i:04d}.png")
    write_tar(test_dir / "0.tar", samples)
    (test_dir / "nshards.txt").write_text("1\n")
    (out / "wds" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "wds" / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    (out / "wds" / "dataset_type.txt").write_text("classification\n")
    for i in sorted(train_idx):
        d = out / "imagefolder" / "train" / CLASSNAMES[int(digits.target[i])]
        d.mkdir(parents=True, exist_ok=True)
        digit_image(digits.data[i], image_size).save(d / f"digit{i:04d}.png")

    info = {"train_samples": summary["successes"], "test_samples": len(test_idx), "image_size": image_size,
            "train_shards": str(out / "train") + "/{00000..%05d}.tar" % (summary["shards"] - 1),
            "download": summary, "seconds": time.time() - t0}
    write_json(info, out / "demo.json")
    return info
