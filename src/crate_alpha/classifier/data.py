"""Classification data: an ImageFolder tree or webdataset shards (``.jpg`` + ``.cls``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Tuple

import torch
from timm.data import create_transform

from ..common import check_shards, count_samples
from ..data.decode import SkipCounter
from ..recipe import RecipeError


def is_folder(path) -> bool:
    return Path(str(path)).is_dir()


def check_path(path, what: str) -> None:
    if not path:
        raise RecipeError(f"no {what}: set it to an ImageFolder directory or a shard pattern")
    if is_folder(path):
        return
    if "{" in str(path) or str(path).endswith(".tar"):
        check_shards(path, what)
        return
    raise RecipeError(f"{what} {path} does not exist (expected an ImageFolder directory or a .tar shard pattern)")


def eval_transform(image_size: int, mean, std, crop_pct: float = 0.875, interpolation: str = "bilinear"):
    # the official evaluation: resize 256, centre crop 224 (crop_pct 0.875), ImageNet mean/std
    return create_transform(input_size=image_size, is_training=False, crop_pct=crop_pct,
                            interpolation=interpolation, mean=mean, std=std)


def num_classes_of(path) -> Optional[int]:
    if is_folder(path):
        return len([p for p in Path(path).iterdir() if p.is_dir()])
    return None


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
    if is_folder(path):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(path), transform=transform)
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=train,
                                                          seed=seed, drop_last=train)
        else:
            sampler = torch.utils.data.RandomSampler(ds) if train else None
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                             drop_last=train, pin_memory=torch.cuda.is_available(), **overlap)
        return loader, len(ds), sampler
    import webdataset as wds

    urls = check_shards(path)
    n = int(num_samples or count_samples(urls))
    handler = counter or SkipCounter()
    stages = [wds.SimpleShardList(urls)]
    if train:
        stages += [wds.shuffle(len(urls))]
    stages += [wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(handler=handler)]
    if train:
        stages += [wds.shuffle(1000, initial=100)]
    stages += [wds.decode("pilrgb", handler=handler), wds.to_tuple("jpg;png;jpeg;webp", "cls", handler=handler),
               wds.map_tuple(transform, lambda c: int(c), handler=handler),
               wds.batched(batch_size, partial=not train)]
    ds = wds.DataPipeline(*stages)
    steps = math.ceil(n / (batch_size * world)) if not train else n // (batch_size * world)
    if train:
        ds = ds.with_epoch(max(steps // max(workers, 1), 1) if workers else steps)
    loader = wds.WebLoader(ds, batch_size=None, shuffle=False, num_workers=workers, **overlap)
    return loader, n, None

