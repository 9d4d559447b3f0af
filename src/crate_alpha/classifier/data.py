"""Classification data: an ImageFolder tree or webdataset shards (``.jpg`` + ``.cls``).

An image that does not decode (truncated, not an image, or over PIL's decompression-bomb
limit) is skipped, named in one warning line and counted by a ``SkipCounter``, as the CLIP
loader does: one bad file costs a run one sample, not the run.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image
from timm.data import create_transform

from ..data.decode import SkipCounter
from ..data.shards import check_shards, count_samples
from ..errors import DamagedImage, DataError



def is_folder(path) -> bool:
    return Path(str(path)).is_dir()


def check_path(path, what: str) -> None:
    if not path:
        raise DataError(f"no {what}: set it to an ImageFolder directory or a shard pattern")
    if is_folder(path):
        return
    if "{" in str(path) or str(path).endswith(".tar"):
        check_shards(path, what)
        return
    raise DataError(f"{what} {path} does not exist (expected an ImageFolder directory or a .tar shard pattern)")


def eval_transform(image_size: int, mean, std, crop_pct: float = 0.875, interpolation: str = "bilinear"):
    # the official evaluation: resize 256, centre crop 224 (crop_pct 0.875), ImageNet mean/std
    return create_transform(input_size=image_size, is_training=False, crop_pct=crop_pct,
                            interpolation=interpolation, mean=mean, std=std)


def class_names_of(path) -> Optional[List[str]]:
    """An ImageFolder's classes in torchvision's order (its sorted class folders); None for shards."""
    if is_folder(path):
        return sorted(p.name for p in Path(path).iterdir() if p.is_dir())
    return None


def num_classes_of(path) -> Optional[int]:
    names = class_names_of(path)
    return None if names is None else len(names)


def open_rgb(source) -> Image.Image:
    """An RGB image from a path or file object, decoded by PIL as torchvision's loader does;
    PIL's decompression-bomb warning (over ``Image.MAX_IMAGE_PIXELS``) is an error here, so
    such an image is refused from its header before its pixels are allocated."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as im:
            return im.convert("RGB")


def _damaged(name: str, e: BaseException) -> DamagedImage:
    return DamagedImage(f"{name}: {type(e).__name__}: {e}")


class CheckedImageFolder:
    """torchvision's ``ImageFolder``, whose images that do not decode come back as None
    (counted and named by ``counter``) for :func:`collate_present` to leave out."""

    def __init__(self, root, transform, counter: SkipCounter):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root), transform=transform)
        self.counter = counter

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index):
        path, target = self.folder.samples[index]
        try:
            image = open_rgb(path)
        except Exception as e:  # noqa: BLE001 - whatever PIL raises on the file's bytes, the file is damaged
            self.counter(_damaged(path, e))
            return None
        transform = self.folder.transform
        return (transform(image) if transform is not None else image), target


def collate_present(batch):
    """torch's default collation of the samples that decoded; None when none did."""
    batch = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(batch) if batch else None


class PresentBatches:
    """The batches of a loader, without the empty ones (every image of them was damaged)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return (b for b in self.loader if b is not None)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # the loader's own attributes (dataset, sampler, batch_size, ...)
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class DecodedThen:
    """Encoded image bytes -> PIL RGB (``open_rgb``) -> ``transform``."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, data: bytes):
        image = open_rgb(io.BytesIO(data))
        return self.transform(image) if self.transform is not None else image


def make_loader(path, transform, batch_size: int, train: bool, workers: int, rank: int = 0, world: int = 1,
                seed: int = 0, num_samples: Optional[int] = None, counter=None,
                prefetch_factor: Optional[int] = None) -> Tuple[object, int, object]:
    """(loader, samples per epoch, sampler-or-None).

    Loaders keep their worker processes between epochs (no re-fork and re-import at every
    epoch start or evaluation, which the step would wait for).
    """
    overlap = {"persistent_workers": workers > 0}
    if workers and prefetch_factor:
        overlap["prefetch_factor"] = prefetch_factor
    handler = counter or SkipCounter()
    if is_folder(path):
        ds = CheckedImageFolder(path, transform, handler)
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=train,
                                                          seed=seed, drop_last=train)
        else:
            sampler = torch.utils.data.RandomSampler(ds) if train else None
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                             drop_last=train, pin_memory=torch.cuda.is_available(),
                                             collate_fn=collate_present, **overlap)
        return PresentBatches(loader), len(ds), sampler
    from ..data import loader as shard_loader

    urls = check_shards(path)
    n = int(num_samples or count_samples(urls))
    # the CLIP trainer's pipeline: shard and sample order follow `seed` (and the epoch the
    # trainer sets through the returned sampler), each shard read by exactly one worker
    epoch = shard_loader.Epoch(0)
    sample = shard_loader.ToPair(DecodedThen(transform), "cls", shard_loader.class_label)
    ds = shard_loader.shard_pipeline(urls, sample, batch_size, train=train, seed=seed, epoch=epoch, counter=handler,
                                     rank=rank, world=world)
    if train:
        ds = ds.with_epoch(shard_loader.train_batches(n, batch_size, world, workers, round_up=False))
    return shard_loader.loader(ds, workers, prefetch_factor), n, epoch
