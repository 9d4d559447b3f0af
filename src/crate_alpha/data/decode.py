"""Reduced-size JPEG decoding for low-resolution training, and a shard loader that skips damage.

Training at 84 px from 256 px JPEGs spends most of its data time decoding pixels that the
random resized crop then throws away. libjpeg can decode at 1/2, 1/4 or 1/8 scale almost
for free (PIL's ``draft``), so the crop is drawn in the original image's coordinates (the
header gives its size without decoding), the JPEG is decoded at the smallest scale that
still has at least the output resolution inside the crop, and the crop box is mapped onto
the reduced image. The result equals the plain decode-then-crop up to resampling error.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Callable, Optional, Sequence, Tuple

from PIL import Image
from torchvision import transforms

_log = logging.getLogger(__name__)
Box = Tuple[int, int, int, int]  # top, left, height, width (torchvision's order)


def sample_crop(im: Image.Image, scale, ratio) -> Box:
    """torchvision's RandomResizedCrop parameters; ``im`` may be a lazily opened (undecoded) image."""
    return transforms.RandomResizedCrop.get_params(im, list(scale), list(ratio))


def decode_crop(data: bytes, size: int, box: Optional[Box] = None, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                draft: bool = True, resample=Image.BICUBIC) -> Image.Image:
    """Decode ``data`` and return the (random or given) crop resized to size x size."""
    im = Image.open(io.BytesIO(data))
    W, H = im.size
    top, left, h, w = box if box is not None else sample_crop(im, scale, ratio)
    if draft and im.format == "JPEG":
        reduce = max(1, min(w, h) // size)  # how far the crop may shrink and keep >= size px
        im.draft("RGB", (math.ceil(W / reduce), math.ceil(H / reduce)))
    sx, sy = im.size[0] / W, im.size[1] / H
    im = im.convert("RGB")
    return im.resize((size, size), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


class DraftRandomResizedCrop:
    """``RandomResizedCrop`` that takes encoded image bytes and decodes only what it needs."""

    def __init__(self, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), draft: bool = True):
        self.size, self.scale, self.ratio, self.draft = size, tuple(scale), tuple(ratio), draft

    def __call__(self, data: bytes) -> Image.Image:
        return decode_crop(data, self.size, scale=self.scale, ratio=self.ratio, draft=self.draft)

    def __repr__(self) -> str:
        return f"DraftRandomResizedCrop(size={self.size}, scale={self.scale}, draft={self.draft})"


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], scale=(0.9, 1.0),
                    draft: bool = True) -> Callable[[bytes], "object"]:
    """Bytes -> normalised tensor, as open_clip's training transform (random resized crop)."""
    return transforms.Compose([
        DraftRandomResizedCrop(size, scale=scale, draft=draft),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class SkipCounter:
    """A webdataset handler that skips a damaged sample or shard and counts it, across the
    data-loader worker processes too (the count lives in shared memory)."""

    def __init__(self):
        import multiprocessing

        self.value = multiprocessing.Value("l", 0)

    def __call__(self, exn: BaseException) -> bool:
        with self.value.get_lock():
            self.value.value += 1
        _log.warning("skipping damaged data (%s: %s)", type(exn).__name__, exn)
        return True

    @property
    def count(self) -> int:
        return int(self.value.value)


def shard_loader(urls, image_transform: Callable, text_transform: Callable = lambda s: s,
                 batch_size: int = 32, counter: Optional[SkipCounter] = None, image_keys="jpg;jpeg;png;webp"):
    """Batches of (images, texts) from webdataset shards; damaged samples are skipped and counted."""
    import webdataset as wds

    handler = counter if counter is not None else SkipCounter()

    def decode_text(b: bytes) -> str:
        text = b.decode("utf-8").strip()
        if not text:
            raise ValueError("sample without caption")
        return text_transform(text)

    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=handler),
        wds.to_tuple(image_keys, "txt", handler=handler),
        wds.map_tuple(image_transform, decode_text, handler=handler),
        wds.batched(batch_size, partial=True),
    )
