"""The white-box commands: ``crate-alpha explain`` and ``crate-alpha diagnose``.

``explain`` draws, for each image, what the encoder attends to and how it segments it
(class-token attention per layer, PCA colours of the patch features, MaskCut masks).
``diagnose`` measures each layer's objective terms (coding rate, sparsity, dictionary
reconstruction error) over a folder of images or webdataset shards, as JSON and a PNG.
Both take a model as anything :func:`crate_alpha.whitebox.interpret.encoder` accepts: a timm or
open_clip ``local-dir:`` folder (converted release weights, exported training runs), a bare
folder path, or a registered timm name.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

import torch

from .. import run_folder
from ..common import model_folder, write_json
from ..errors import WhiteboxError
from ..visualize import save_png

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalisation(spec, enc) -> Tuple[tuple, tuple, int]:
    """(mean, std, input size) the model was trained with.

    An open_clip folder records its preprocessing in ``open_clip_config.json`` (open_clip's
    own defaults, OpenAI's statistics, apply when it does not); timm models carry theirs in
    ``pretrained_cfg``.
    """
    size = int(enc.patch_embed.img_size[0])
    folder = model_folder(spec) if isinstance(spec, str) else None
    if folder is not None and (folder / "open_clip_config.json").is_file():
        pp = json.loads((folder / "open_clip_config.json").read_text()).get("preprocess_cfg", {})
        return tuple(pp.get("mean", OPENAI_MEAN)), tuple(pp.get("std", OPENAI_STD)), int(pp.get("size", size))
    is_clip = not isinstance(spec, str) and hasattr(spec, "visual")
    cfg = getattr(enc, "pretrained_cfg", None) or {}
    if is_clip or not cfg:
        return OPENAI_MEAN, OPENAI_STD, size
    return tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)), size


def prepare(images: Sequence, size: int, mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    """PIL images -> (normalised batch, the same pixels in [0, 1] for drawing): resize + centre crop."""
    import torchvision.transforms.functional as TF

    shown = []
    for im in images:
        im = TF.resize(im.convert("RGB"), size, interpolation=TF.InterpolationMode.BICUBIC)
        shown.append(TF.to_tensor(TF.center_crop(im, [size, size])))
    shown_t = torch.stack(shown)
    return TF.normalize(shown_t, list(mean), list(std)), shown_t


def read_images(source: os.PathLike, limit: int) -> Iterator[Tuple[str, "object"]]:
    """(name, PIL image) from image files, a folder of them, or webdataset shards (.tar files or a folder)."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES + (".tar",) and p.is_file())
    elif src.is_file():
        files = [src]
    elif src.exists():  # a FIFO or a device would block the read
        raise WhiteboxError(f"{source} is not a regular file; give image files, folders or webdataset .tar shards")
    else:
        raise WhiteboxError(f"{source} does not exist; give image files, a folder of images or webdataset shards")
    n = 0
    for f in files:
        if n >= limit:
            return
        if f.suffix.lower() == ".tar":
            for name, data in _tar_images(f):
                if n >= limit:
                    return
                yield f"{f.name}:{name}", _open_image(io.BytesIO(data), f"{f}:{name}")
                n += 1
        else:
            yield str(f), _open_image(f, str(f))
            n += 1


def _open_image(source, name: str):
    from PIL import Image

    try:
        im = Image.open(source)
        im.load()
    except Exception as e:  # noqa: BLE001 - any unreadable file is named, not fatal
        raise WhiteboxError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    return im


def _tar_images(path: Path) -> Iterator[Tuple[str, bytes]]:
    """(member name, bytes) of the images in a tar shard, read by the training loader's reader."""
    from ..data.tarstream import tar_members

    if not path.is_file():
        raise WhiteboxError(f"{path} is not a regular file; give image files, folders or webdataset .tar shards")
    try:
        with open(path, "rb") as stream:
            for name, data in tar_members(stream):
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    yield name, data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise WhiteboxError(f"{path} is not a readable tar shard ({type(e).__name__}: {e}); "
                            "check it with `crate-alpha data verify`") from None


def _input_size(model, enc, size) -> int:
    """``size``, or the model's own; a size that is not a positive multiple of the patch is refused."""
    native = normalisation(model, enc)[2]
    if size is None:
        return native
    patch = int(enc.patch_embed.patch_size[0])
    if size < patch or size % patch:
        raise WhiteboxError(f"--size {size} is not a positive multiple of the model's patch size {patch} "
                            f"(its own size is {native})")
    return size


def batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _overlay(ax, image: torch.Tensor, masks: torch.Tensor) -> None:
    import numpy as np

    colours = np.array([[1.0, 0.2, 0.2], [0.2, 0.8, 1.0], [1.0, 0.9, 0.1], [0.4, 1.0, 0.4]])
    img = image.permute(1, 2, 0).clamp(0, 1).numpy().copy()
    for k, m in enumerate(masks.numpy()):
        img[m] = 0.45 * img[m] + 0.55 * colours[k % len(colours)]
    ax.imshow(img)


def explain(images: Sequence[os.PathLike], model, out_dir: os.PathLike, num_masks: int = 3, tau: float = 0.15,
            size: int | None = None) -> List[Path]:
    """One PNG per image: the image, class-token attention per layer, PCA colours, MaskCut masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import interpret

    run_folder.check(out_dir, run_folder.EXPLAIN)
    enc = interpret.encoder(model)
    size = _input_size(model, enc, size)
    mean, std, _ = normalisation(model, enc)
    pics = []
    for item in images:
        pics += list(read_images(item, limit=10 ** 6))
    if not pics:
        raise WhiteboxError(f"no images found in {', '.join(map(str, images))}")
    out = run_folder.claim(out_dir, run_folder.EXPLAIN)
    written = []
    summary = []
    for batch in batches(pics, 8):
        x, shown = prepare([im for _, im in batch], size, mean, std)
        att = interpret.attention(enc, x).mean(2)          # (B, layers, gh, gw), heads averaged
        pca = interpret.pca_features(enc, x)
        masks = interpret.maskcut(enc, x, num_masks=num_masks, tau=tau)
        layers = att.shape[1]
        for i, (name, _) in enumerate(batch):
            cols = layers + 3
            fig, axes = plt.subplots(1, cols, figsize=(1.9 * cols, 2.2), squeeze=False)
            axes = axes[0]
            axes[0].imshow(shown[i].permute(1, 2, 0).numpy())
            axes[0].set_title("image", fontsize=8)
            for j in range(layers):
                axes[j + 1].imshow(att[i, j].numpy(), cmap="magma")
                axes[j + 1].set_title(f"attn L{j + 1}", fontsize=8)
            axes[layers + 1].imshow(pca["rgb"][i].numpy())
            axes[layers + 1].set_title("PCA", fontsize=8)
            _overlay(axes[layers + 2], shown[i], masks[i])
            axes[layers + 2].set_title("MaskCut", fontsize=8)
            for ax in axes:
                ax.axis("off")
            fig.tight_layout()
            stem = Path(name.split(":")[-1]).stem
            path = out / f"{len(written):03d}_{stem}.png"
            written.append(save_png(fig, path))
            summary.append({"image": name, "png": str(path),
                            "mask_fraction": [float(m.float().mean()) for m in masks[i]]})
    write_json(summary, out / "explain.json")
    return written


def diagnose(model, source: os.PathLike, out_dir: os.PathLike, max_images: int = 64, batch_size: int = 16,
             size: int | None = None) -> dict:
    """Per-layer coding rate, sparsity and reconstruction error over ``source``: JSON + PNG."""
    from . import interpret

    run_folder.check(out_dir, run_folder.DIAGNOSE)
    if max_images < 1:
        raise WhiteboxError(f"--max-images must be at least 1, got {max_images}")
    enc = interpret.encoder(model)
    size = _input_size(model, enc, size)
    mean, std, _ = normalisation(model, enc)
    totals, n = None, 0
    for batch in batches(read_images(source, max_images), batch_size):
        x, _ = prepare([im for _, im in batch], size, mean, std)
        rows = interpret.layer_diagnostics(enc, x)
        b = len(batch)
        if totals is None:
            totals = [{k: (v * b if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        else:
            for t, r in zip(totals, rows):
                for k, v in r.items():
                    if k != "layer" and v is not None:
                        t[k] += v * b
        n += b
    if not n:
        raise WhiteboxError(f"no images found in {source}")
    layers = [{k: (v / n if k != "layer" and v is not None else v) for k, v in t.items()} for t in totals]
    out = run_folder.claim(out_dir, run_folder.DIAGNOSE)
    result = {"model": str(model) if isinstance(model, str) else type(model).__name__, "images": n,
              "image_size": size, "layers": layers}
    write_json(result, out / "diagnostics.json")
    plot_diagnostics(layers, out / "diagnostics.png", title=result["model"])
    return result


def plot_diagnostics(layers: List[dict], path: os.PathLike, title: str = "") -> Path:
    """The three measures across layers, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("coding_rate", "coding rate R^c (lower: more compressed)"), ("sparsity", "sparsity (zeros in code)"),
            ("recon_error", "dictionary reconstruction error")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    xs = [r["layer"] for r in layers]
    for ax, (k, label) in zip(axes, keys):
        ys = [r.get(k) for r in layers]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o")
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(xs)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, Path(path))


def plot_attention(trunk, images: torch.Tensor, shown: torch.Tensor, path: os.PathLike) -> Path:
    """One row per image: the image, then the class token's attention in each layer (mean over heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .interpret import attention

    maps = attention(trunk, images).mean(2)  # average heads
    b, layers = maps.shape[:2]
    fig, axes = plt.subplots(b, layers + 1, figsize=(1.6 * (layers + 1), 1.6 * b), squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(shown[i].permute(1, 2, 0).clamp(0, 1).numpy())
        for j in range(layers):
            axes[i, j + 1].imshow(maps[i, j].numpy(), cmap="magma")
            if i == 0:
                axes[i, j + 1].set_title(f"layer {j + 1}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return save_png(fig, Path(path))
