"""Training-time image decoding: crop first, then decode only the pixels the crop needs.

Training at 84 px from 256 px JPEGs spends most of its data time in the JPEG decoder.
libjpeg can decode at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling, which low-passes
as it shrinks), so the random resized crop is drawn in the original image's coordinates
(the JPEG header gives the size without decoding), the image is decoded at the smallest
scale that still has the output resolution inside the crop, and the crop box is mapped
onto the reduced image; what remains is a downscale by less than 2x, where bilinear
interpolation sees every source pixel. The result equals open_clip's plain
decode-then-``RandomResizedCrop`` up to resampling error (tests/test_data_pipeline.py).

JPEGs are decoded by simplejpeg (libjpeg-turbo's TurboJPEG API, straight to RGB): the same
pixels as OpenCV's reduced decode, ~15% faster, and the decode is ~70% of a sample's time
at 84 px. What it refuses, and every other format, goes to OpenCV.

Written here rather than taken from a library because none decodes at reduced scale
inside a crop: torchvision's ``decode_jpeg`` has no scaling, PIL's ``draft`` does but its
decode plus antialiased bicubic resize costs ~2x OpenCV's (``make bench-data`` measures
both), and torchvision's ``RandomResizedCrop.get_params`` draws from torch's generator with
a dozen tensor operations per crop (~0.1 ms, a sixth of the per-sample budget), so the
same parameter search is done with Python's ``random`` (seeded per loader worker by torch).

Shards are untrusted: an image's size is read from its header and checked against
download's decompression-bomb limit before any decoding (neither the reduced-size path nor
OpenCV has PIL's check), so a 17 KB PNG of 12000x12000 is a skipped sample, not 800 MB.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import random
import struct
import warnings
from typing import Callable, Optional, Sequence, Tuple

import cv2
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, url_opener

from .tarstream import tar_file_expander

_log = logging.getLogger(__name__)
Box = Tuple[int, int, int, int]  # top, left, height, width (torchvision's order)
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}
# PIL (what open_clip's transform decodes with) ignores EXIF orientation; so must we
_IGNORE_ORIENTATION = cv2.IMREAD_IGNORE_ORIENTATION


# download's decompression-bomb limit (its max_image_area default): PIL's MAX_IMAGE_PIXELS,
# 89.5 M px. PIL itself only warns between it and twice it; OpenCV's own limit is 1 G px.
MAX_IMAGE_AREA = float(Image.MAX_IMAGE_PIXELS)


def header_area(data: bytes) -> Optional[float]:
    """Pixel count read from the image header, without decoding; None if PIL cannot parse it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return float(im.size[0] * im.size[1])
        except Image.DecompressionBombError:
            # over twice PIL's own limit: PIL refuses it at open, and so would the training loader
            return float("inf")
        except Exception:  # noqa: BLE001 - any header PIL cannot parse is not an image we can train on
            return None


def check_area(data: bytes, wh: Optional[Tuple[int, int]] = None) -> None:
    """``ValueError`` unless the image's header gives a size within ``MAX_IMAGE_AREA``
    (``wh``: a JPEG's size from ``image_size``; other formats are read by PIL)."""
    area = float(wh[0] * wh[1]) if wh is not None else header_area(data)
    if area is None:
        raise ValueError("image does not decode (PIL cannot read its header)")
    if area > MAX_IMAGE_AREA:
        size = f"{wh[0]}x{wh[1]} px" if wh is not None else \
            "over twice that" if math.isinf(area) else f"{area:.0f} px"
        raise ValueError(f"image too large ({size}; the limit is {MAX_IMAGE_AREA:.0f} px, download's "
                         "decompression-bomb limit): not decoded")


def image_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a JPEG's frame header, or None if ``data`` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame marker
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def sample_crop(width: int, height: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), rng=random) -> Box:
    """torchvision's ``RandomResizedCrop.get_params``, drawn from Python's ``random``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the centred crop of the whole image within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _decode(data: bytes, reduce: int, wh: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) of ``data`` at 1/``reduce`` scale (``wh``: a JPEG's size, from its header)."""
    if wh is not None:
        try:
            # the smallest TurboJPEG scale with both sides >= ceil(side / reduce) is 1/reduce;
            # strict=False: a truncated file decodes as far as it goes, as with OpenCV
            return simplejpeg.decode_jpeg(data, "RGB", min_width=-(-wh[0] // reduce),
                                          min_height=-(-wh[1] // reduce), strict=False)
        except ValueError:
            pass  # OpenCV gets its chance; its refusal is the error below
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduce] | _IGNORE_ORIENTATION)
    if bgr is None:
        raise ValueError("image does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _reduction(side: int, size: int) -> int:
    """The largest libjpeg scale-down (1, 2, 4 or 8) that leaves ``side`` px at least ``size`` px."""
    r = 1
    while r < 8 and side // (2 * r) >= size:
        r *= 2
    return r


def decode_crop(data: bytes, size: int, box: Optional[Box] = None, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                draft: bool = True) -> np.ndarray:
    """Decode ``data`` and return the (random or given) crop resized to size x size, RGB uint8 (H, W, 3)."""
    wh = header = image_size(data)
    check_area(data, header)  # before any decoding
    rgb = None
    if wh is None:  # not a JPEG (PNG, WebP, ...): decoded whole
        rgb = _decode(data, 1)
        wh = (rgb.shape[1], rgb.shape[0])
    top, left, h, w = box if box is not None else sample_crop(*wh, scale, ratio)
    if rgb is None:
        rgb = _decode(data, _reduction(min(w, h), size) if draft else 1, header)
    sy, sx = rgb.shape[0] / wh[1], rgb.shape[1] / wh[0]
    y0, x0 = int(round(top * sy)), int(round(left * sx))
    y1, x1 = max(y0 + 1, int(round((top + h) * sy))), max(x0 + 1, int(round((left + w) * sx)))
    crop = rgb[y0:y1, x0:x1]
    # below 2x, bilinear sees every source pixel; further down it would alias, so area-average
    shrink = min(crop.shape[0], crop.shape[1]) / size
    interp = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR if shrink >= 1 else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


class DecodeRandomResizedCrop:
    """``RandomResizedCrop`` that takes encoded image bytes and decodes only what it needs."""

    def __init__(self, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), draft: bool = True):
        self.size, self.scale, self.ratio, self.draft = size, tuple(scale), tuple(ratio), draft

    def __call__(self, data: bytes) -> np.ndarray:
        return decode_crop(data, self.size, scale=self.scale, ratio=self.ratio, draft=self.draft)

    def __repr__(self) -> str:
        return f"DecodeRandomResizedCrop(size={self.size}, scale={self.scale}, draft={self.draft})"


class ToNormalizedTensor:
    """RGB uint8 (H, W, 3) -> float (3, H, W): ``ToTensor`` then ``Normalize`` in one pass
    (``BatchNormalize`` on a batch of one)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.normalize = BatchNormalize(mean, std)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        return self.normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0]

    def __repr__(self) -> str:
        return "ToNormalizedTensor()"


class ToUint8Tensor:
    """RGB uint8 (H, W, 3) -> uint8 (3, H, W); ``BatchNormalize`` finishes it after the loader.

    A loader worker that sends uint8 images hands over a quarter of the bytes of float ones
    (21 KB instead of 85 KB per 84 px image; ~60 µs per sample less on this machine's worker
    core), and the normalisation runs once per batch where the batch goes: on the GPU there.
    """

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        # numpy's strided copy: ~7 µs at 84 px against ~16 for torch's permute().contiguous()
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return "ToUint8Tensor()"


class BatchNormalize:
    """uint8 images (N, 3, H, W) -> float ``(x / 255 - mean) / std``, on the batch's device.

    The same arithmetic as ``ToNormalizedTensor``, so a batch equals its images normalised one by one.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        # Copied to each device once: a blocking host-to-GPU copy per batch would make the
        # host wait for every queued step, so the loader could no longer run ahead of the GPU.
        self._on = {self.mean.device: (self.mean, self.scale)}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32, memory_format=torch.contiguous_format)
        if x.device not in self._on:
            self._on[x.device] = (self.mean.to(x.device), self.scale.to(x.device))
        mean, scale = self._on[x.device]
        return x.sub_(mean).mul_(scale)


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], scale=(0.9, 1.0),
                    draft: bool = True, uint8: bool = False) -> Callable[[bytes], torch.Tensor]:
    """Bytes -> normalised tensor, as open_clip's training transform (random resized crop);
    with ``uint8`` the image stays uint8 for a ``BatchNormalize`` after the loader."""
    from torchvision import transforms

    last = ToUint8Tensor() if uint8 else ToNormalizedTensor(mean, std)
    return transforms.Compose([DecodeRandomResizedCrop(size, scale=scale, draft=draft), last])


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


class FiniteRepeatPipeline(wds.DataPipeline):
    """webdataset's ``DataPipeline``, whose repetition ends at the first pass that yields nothing.

    ``with_epoch(n)`` (open_clip_train's training pipeline) repeats a loader worker's shards
    up to ``sys.maxsize`` times until the worker has given ``n`` batches. Shards that give no
    batch at all (empty, damaged, or fewer samples than a batch) would be read again forever,
    and the training waits on that worker at "Start epoch 0"; every pass gives as many
    batches as the first, so a pass without any ends the worker's epoch instead.
    """

    def iterator(self):
        for _ in range(self.repetitions):
            empty = True
            for sample in self.iterator1():
                empty = False
                yield sample
            if empty:
                return


def _tar_samples(src, handler):
    """webdataset's ``tarfile_to_samples`` over the training loader's tar reader (``tarstream``)."""
    return group_by_keys(tar_file_expander(url_opener(src, handler=handler), handler=handler), handler=handler)


def tar_samples(handler):
    """A pipeline stage: ``wds.tarfile_to_samples(handler=...)`` read by ``tarstream`` (bounded reads, checked headers)."""
    return functools.partial(_tar_samples, handler=handler)


def shard_loader(urls, image_transform: Callable, text_transform: Callable = lambda s: s,
                 batch_size: int = 32, counter: Optional[SkipCounter] = None, image_keys="jpg;jpeg;png;webp"):
    """Batches of (images, texts) from webdataset shards; damaged samples are skipped and counted."""
    handler = counter if counter is not None else SkipCounter()

    def decode_text(b: bytes) -> str:
        text = b.decode("utf-8").strip()
        if not text:
            raise ValueError("sample without caption")
        return text_transform(text)

    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        functools.partial(_tar_samples, handler=handler),
        wds.to_tuple(image_keys, "txt", handler=handler),
        wds.map_tuple(image_transform, decode_text, handler=handler),
        wds.batched(batch_size, partial=True),
    )
