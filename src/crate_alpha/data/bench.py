"""Where the training input path spends its time, per sample and per core (``crate-alpha data bench``).

``profile_stages`` times each stage of what open_clip_train's webdataset pipeline does to
a sample, one at a time on one core: tar read, JPEG decode (plain, and reduced-size with
the crop), random resized crop, to-tensor + normalise, caption tokenisation, and
collation into a batch. The shards are made on the spot from real photos (scikit-learn's
sample images, random crops stored as img2dataset stores them: shorter side = source
size) with captions of DataComp's typical length. ``bench_decode`` compares the plain and
the reduced-size decode end to end.
"""
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


CAPTION_WORDS = ("a photo of the old stone building near the river with trees and people walking on a sunny day "
                 "in summer close up view of red flowers in a garden macro shot").split()


def _photo_shards(folder: Path, n: int, size: int, seed: int = 0) -> list:
    """``n`` JPEG samples cut from real photos, shorter side ``size`` (img2dataset's keep_ratio)."""
    from sklearn.datasets import load_sample_images

    from .digits import write_tar

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        crop = im.crop((x, y, x + cw, y + ch))
        r = size / min(cw, ch)
        crop = crop.resize((max(size, round(cw * r)), max(size, round(ch * r))), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=95)
        words = rng.choice(CAPTION_WORDS, int(rng.integers(6, 20)))
        samples.append((f"{i:06d}", {"jpg": buf.getvalue(), "txt": " ".join(words).encode()}))
    write_tar(folder / "000000.tar", samples)
    return [str(folder / "000000.tar")]


def _per_sample(fn, items, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds per item of ``fn`` over ``items``."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, (time.perf_counter() - t) / max(len(items), 1))
    return best


def profile_stages(size: int, source_size: int, samples: int = 256, batch: int = 64) -> dict:
    """Seconds per sample of each input stage on one core, for ``size`` px from ``source_size`` px shards."""
    import tarfile

    import open_clip
    from torchvision import transforms
    from webdataset.filters import default_collation_fn

    from .decode import decode_crop

    torch.set_num_threads(1)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    tokenizer = open_clip.get_tokenizer("crate-alpha-demo")
    crop = transforms.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    with tempfile.TemporaryDirectory() as tmp:
        url = _photo_shards(Path(tmp), samples, source_size)[0]

        def read_tar(_):
            with tarfile.open(url) as tar:
                return [tar.extractfile(m).read() for m in tar]

        t_tar = _per_sample(read_tar, [None]) / samples
        with tarfile.open(url) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
    jpgs = [v for k, v in files.items() if k.endswith(".jpg")]
    texts = [v.decode() for k, v in files.items() if k.endswith(".txt")]
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs]
    crops = [crop(im) for im in decoded]
    tensors = [to_tensor(c) for c in crops]
    tokens = [tokenizer(t)[0] for t in texts]
    pairs = list(zip(tensors, tokens))
    batches = [pairs[i:i + batch] for i in range(0, len(pairs) - batch + 1, batch)]
    stages = {
        "tar read": t_tar,
        "JPEG decode (full)": _per_sample(lambda b: Image.open(io.BytesIO(b)).convert("RGB"), jpgs),
        "random resized crop": _per_sample(crop, decoded),
        "JPEG decode + crop (reduced-size)": _per_sample(lambda b: decode_crop(b, size, scale=(0.9, 1.0)), jpgs),
        "to-tensor + normalise": _per_sample(to_tensor, crops),
        "caption tokenisation": _per_sample(lambda t: tokenizer(t)[0], texts),
        "collation": _per_sample(default_collation_fn, batches) / batch,
    }
    return {"size": size, "source_size": source_size, "samples": samples, "seconds_per_sample": stages}


def plot_profile(profiles: list, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..visualize import save_png

    fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 3.8), squeeze=False)
    for ax, prof in zip(axes[0], profiles):
        names = list(prof["seconds_per_sample"])
        ax.barh(names, [1e6 * prof["seconds_per_sample"][n] for n in names], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("µs per sample (one core)")
        ax.set_title(f"{prof['source_size']} px shards -> {prof['size']} px")
    fig.tight_layout()
    return save_png(fig, Path(path))


def profile(out="runs/bench/data_profile.json", samples: int = 256) -> list:
    """The stage profile at the demo's settings (32 px from 64 px) and the paper's (84 from 256)."""
    from ..common import write_json

    profiles = [profile_stages(32, 64, samples), profile_stages(84, 256, samples)]
    for prof in profiles:
        print(f"\n{prof['source_size']} px shards -> {prof['size']} px, one core:")
        for name, sec in prof["seconds_per_sample"].items():
            print(f"  {name:<36} {1e6 * sec:8.1f} µs/sample  ({1 / sec:9.0f} samples/s)")
    write_json(profiles, out)
    png = plot_profile(profiles, Path(out).with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return profiles


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
