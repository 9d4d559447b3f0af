"""Where the training input path spends its time, per sample and per core (``crate-alpha data bench``).

``profile_stages`` times each stage of what open_clip_train's webdataset pipeline does to
a sample, one at a time on one core: tar read, JPEG decode (plain, and reduced-size with
the crop), random resized crop, to-tensor + normalise, caption tokenisation, and
collation into a batch. The shards are made on the spot from real photos (scikit-learn's
sample images, random crops stored as img2dataset stores them: shorter side = source
size) with captions of DataComp's typical length. ``bench_loader`` runs the loader
open_clip_train trains from (its ``get_data``, served by ``crate_alpha.data.loader``) end to
end on one worker process, with open_clip's decode and with the reduced-size decode.
"""
from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


CAPTION_WORDS = ("a photo of the old stone building near the river with trees and people walking on a sunny day "
                 "in summer close up view of red flowers in a garden macro shot").split()


def _sample(i: int, jpg: bytes, caption: str, size, original_size) -> tuple:
    """One sample with the members img2dataset writes: image, caption and its metadata ``.json``."""
    meta = {"uid": f"{i:032x}", "url": f"https://example.com/images/{i}.jpg", "caption": caption, "key": f"{i:06d}",
            "status": "success", "error_message": None, "width": size[0], "height": size[1],
            "original_width": original_size[0], "original_height": original_size[1], "exif": "{}",
            "sha256": f"{i:064x}", "clip_l14_similarity_score": 0.31}
    return f"{i:06d}", {"jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta).encode()}


def _photo_shards(folder: Path, n: int, size: int, seed: int = 0) -> list:
    """``n`` JPEG samples cut from real photos, shorter side ``size`` (img2dataset's keep_ratio)."""
    from sklearn.datasets import load_sample_images

    from ..data.digits import write_tar

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
        caption = " ".join(words)
        samples.append(_sample(i, buf.getvalue(), caption, crop.size, (cw, ch)))
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
    from torch.utils.data import default_collate

    from ..data.decode import ToNormalizedTensor, decode_crop
    from ..data.tarstream import tar_members
    from ..data.tokenize import fast_tokenizer

    torch.set_num_threads(1)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    tokenizer = open_clip.get_tokenizer("crate-alpha-demo")
    cached = fast_tokenizer(tokenizer)
    crop = transforms.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=transforms.InterpolationMode.BICUBIC)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    one_pass = ToNormalizedTensor(mean, std)
    with tempfile.TemporaryDirectory() as tmp:
        url = _photo_shards(Path(tmp), samples, source_size)[0]

        def read_tar(_):
            with tarfile.open(url) as tar:
                return [tar.extractfile(m).read() for m in tar]

        t_tar = _per_sample(read_tar, [None]) / samples

        def read_tarstream(_):
            with open(url, "rb") as f:
                return list(tar_members(f))

        t_tarstream = _per_sample(read_tarstream, [None]) / samples
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
        "tar read (tarstream)": t_tarstream,
        "JPEG decode (full, PIL)": _per_sample(lambda b: Image.open(io.BytesIO(b)).convert("RGB"), jpgs),
        "random resized crop (torchvision)": _per_sample(crop, decoded),
        "JPEG decode + crop (reduced-size)": _per_sample(lambda b: decode_crop(b, size, scale=(0.9, 1.0)), jpgs),
        "to-tensor + normalise": _per_sample(to_tensor, crops),
        "to-tensor + normalise (one pass)": _per_sample(one_pass, [np.array(c) for c in crops]),
        "caption tokenisation": _per_sample(lambda t: tokenizer(t)[0], texts),
        "caption tokenisation (cached)": _per_sample(lambda t: cached(t)[0], texts),
        "collation": _per_sample(default_collate, batches) / batch,
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


def _demo_shards(folder: Path, n: int, size: int, seed: int = 0) -> list:
    """``n`` samples as ``make demo``'s corpus stores them: digits at ``size`` px, JPEG q95, templated captions."""
    from sklearn.datasets import load_digits

    from ..data.digits import CAPTION_TEMPLATES, CLASSNAMES, digit_image, jpeg_q95, write_tar

    digits = load_digits()
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        k = i % len(digits.target)
        caption = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(CLASSNAMES[digits.target[k]])
        samples.append(_sample(i, jpeg_q95(digit_image(digits.data[k], size)), caption, (size, size), (size, size)))
    write_tar(folder / "000000.tar", samples)
    return [str(folder / "000000.tar")]


def _replicate(url: str, copies: int) -> str:
    """``copies`` shards with the samples of ``url`` (keys made unique): a long run from a few encoded images."""
    import tarfile

    from ..data.digits import write_tar

    with tarfile.open(url) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    folder = Path(url).parent
    for c in range(copies):
        samples = {}
        for name, data in members:
            key, ext = name.split(".", 1)
            samples.setdefault(f"c{c}_{key}", {})[ext] = data
        write_tar(folder / f"shard{c:03d}.tar", list(samples.items()))
    return str(folder / ("shard{000..%03d}.tar" % (copies - 1)))


def train_loader(urls: str, size: int, reduced_decode: bool, batch: int = 64, workers: int = 1,
                 model: str = "crate-alpha-demo"):
    """The training loader open_clip_train gets from its ``get_data`` in a CLIP run (tar read,
    seeded shuffles, decode, crop, tokenise, shared-memory collation, per-batch normalisation),
    over ``urls`` on the CPU.

    ``reduced_decode=False`` gives the images the decode open_clip_train does itself
    (PIL decode) followed by open_clip's own training transform.
    """
    import argparse

    import open_clip

    from ..clip.patches import ClipRun, get_data_for
    from ..data.decode import SkipCounter
    from ..data.shards import count_samples, expand_shards
    from ..device import CpuDevice

    preprocess = open_clip.image_transform(size, is_train=True)
    args = argparse.Namespace(train_data=urls, val_data=None, dataset_type="webdataset", dataset_resampled=False,
                              train_num_samples=count_samples(expand_shards(urls)), seed=0, batch_size=batch,
                              world_size=1, rank=0, workers=workers)
    get_data = get_data_for(ClipRun(CpuDevice(), SkipCounter(), fast_decode=reduced_decode), open_clip_get_data())
    data = get_data(args, (preprocess, None), epoch=0, tokenizer=open_clip.get_tokenizer(model))
    return data["train"].dataloader


def open_clip_get_data():
    import open_clip_train.data as data

    return data.get_data


def loader_throughput(urls: str, size: int, reduced_decode: bool, batch: int = 64, workers: int = 1,
                      passes: int = 2) -> float:
    """Samples/s of ``train_loader`` with ``workers`` loader processes (best of ``passes``)."""
    loader = train_loader(urls, size, reduced_decode, batch, workers)
    best = 0.0
    for _ in range(passes):  # the worker persists: the second pass has no process start-up
        t = time.perf_counter()
        seen = sum(len(images) for images, _ in loader)
        best = max(best, seen / (time.perf_counter() - t))
    return best


SETTINGS = (  # (name, output px, shard px, shards maker, batch)
    ("demo", 32, 64, _demo_shards, 64),
    ("paper", 84, 256, _photo_shards, 128),
)


def bench_loader(unique: int = 512, copies: int = 8, out="runs/bench/data.json") -> list:
    """End-to-end loader throughput per worker core at the demo's and the paper's settings."""
    from ..common import write_json

    torch.set_num_threads(1)
    rows = []
    for name, size, source, make, batch in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            urls = _replicate(make(Path(tmp), unique, source)[0], copies)
            for reduced in (False, True):
                rate = loader_throughput(urls, size, reduced, batch=batch)
                rows.append({"setting": name, "size": size, "source_size": source, "batch": batch, "workers": 1,
                             "path": "reduced-size decode (crate_alpha)" if reduced else "PIL decode (open_clip)",
                             "samples_per_s_per_core": rate})
                print(f"{name:<6} {source:>4} px -> {size:>3} px  {rows[-1]['path']:<36} {rate:8.0f} samples/s "
                      "(open_clip_train's loader, one worker)", flush=True)
    write_json(rows, out)
    return rows


def bench_download(images: int = 2000, processes: int = 2, out="runs/bench/download.json") -> list:
    """img2dataset's two distributors on the same loopback corpus: multiprocessing vs Spark local mode.

    ``images`` photos (512 px, JPEG) are served from 127.0.0.1 and downloaded into 256 px
    shards once per distributor with ``processes`` processes / local cores. Rates are
    img2dataset's own (successes over the span of its shard statistics) and end to end
    (wall time of the whole call, Spark's start-up included).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..common import write_json
    from ..data.download import download
    from ..data.loopback import serve_folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        url = _photo_shards(tmp / "src", min(images, 256), 512)[0]  # real photos, cut and encoded once
        import hashlib
        import tarfile

        with tarfile.open(url) as tar:
            jpgs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
        (tmp / "www").mkdir()
        meta = []
        with serve_folder(tmp / "www") as base:
            for i in range(images):
                data = jpgs[i % len(jpgs)]
                (tmp / "www" / f"{i:06d}.jpg").write_bytes(data)
                meta.append({"uid": f"{i:06d}", "url": f"{base}/{i:06d}.jpg", "text": f"photo {i}",
                             "sha256": hashlib.sha256(data).hexdigest()})
            pq.write_table(pa.Table.from_pylist(meta), tmp / "meta.parquet")
            for distributor in ("multiprocessing", "pyspark"):
                t = time.perf_counter()
                s = download([tmp / "meta.parquet"], tmp / distributor, image_size=256, samples_per_shard=250,
                             processes=processes, threads=16, distributor=distributor)
                wall = time.perf_counter() - t
                rows.append({"distributor": distributor, "processes": processes, "images": images,
                             "successes": s["successes"], "images_per_s": s["images_per_second"],
                             "images_per_s_end_to_end": s["successes"] / wall, "wall_seconds": wall})
                print(f"{distributor:<16} {s['successes']:6d} images  {s['images_per_second']:7.1f} images/s "
                      f"(img2dataset)  {rows[-1]['images_per_s_end_to_end']:7.1f} images/s end to end "
                      f"({wall:.0f} s)", flush=True)
    write_json(rows, out)
    return rows
