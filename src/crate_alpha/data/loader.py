"""The training input pipeline of both trainers: webdataset shards in, collated batches out.

open_clip_train gets it through its ``get_data`` (see ``crate_alpha.clip.patches``), the
classifier calls it for shard data, so both read shards alike:

* shard order: one permutation per (``seed``, epoch), the same in every process and loader
  worker, then split by process and by worker, so each shard is read by exactly one worker
  and a run repeats with the same seed (webdataset's ``shuffle`` seeds from the clock);
* tar reader: ``tarstream`` (bounded reads, checked headers) and webdataset's grouping;
* sample shuffle: a buffer seeded from (seed, process, worker, epoch, pass); a loader
  worker's ``random`` and torch generators, which the crops and flips draw from, are
  reseeded from the same numbers at each pass, so a resumed run at epoch k sees what the
  uninterrupted one saw at epoch k;
* skips: a damaged shard or sample, a sample without an image or target, an image that does
  not decode or is over ``MAX_IMAGE_AREA`` is skipped and counted (``SkipCounter``, shared
  with the workers), never raised in a worker;
* decode: only what is used (the caption's text; the image bytes go to the image
  transform, which may decode at reduced size into uint8; ``.json`` metadata is not read);
* collation: torch's ``default_collate``, which stacks straight into shared memory in a
  worker (webdataset's stacks into ordinary memory, which the worker then copies again);
* a worker whose shards give no batch ends its epoch instead of re-reading them forever;
* prefetch: the recipe's ``prefetch_factor``; workers are forked where fork exists;
* normalisation: uint8 batches become float where the batch goes (``NormalizedLoader``).
"""
from __future__ import annotations

import math
import multiprocessing
import random
from typing import Callable, List, Optional, Sequence

import torch
import webdataset as wds

from ..errors import DamagedImage, DataError
from .decode import FiniteRepeatPipeline, SkipCounter, tar_samples

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
SAMPLE_SHUFFLE = (5000, 1000)   # open_clip_train's buffer and initial fill for the sample shuffle


class MissingMember(DataError):
    """A sample without the image or target it needs (skipped and counted)."""


class Epoch:
    """The epoch, shared with the loader workers (set in the main process before each epoch).

    ``set_value`` / ``get_value`` are open_clip_train's ``SharedEpoch`` interface, so its
    ``DataInfo.set_epoch`` sets it; ``set_epoch`` is the sampler interface the classifier calls.
    """

    def __init__(self, epoch: int = 0):
        self.value = multiprocessing.Value("i", epoch)

    def set_value(self, epoch: int) -> None:
        self.value.value = int(epoch)

    set_epoch = set_value

    def get_value(self) -> int:
        return int(self.value.value)


def _worker() -> tuple:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _mix(*numbers: int) -> int:
    # one 63-bit seed from several small integers (distinct tuples give distinct streams)
    return random.Random(repr(numbers)).getrandbits(63)


class ShardOrder:
    """The first stage: this process's and this worker's shards for the current epoch."""

    def __init__(self, urls: Sequence[str], seed: int, epoch: Epoch, shuffle: bool, rank: int = 0, world: int = 1):
        self.urls, self.seed, self.epoch, self.shuffle = list(urls), seed, epoch, shuffle
        self.rank, self.world = rank, world

    def __call__(self):
        urls = list(self.urls)
        if self.shuffle:
            random.Random(_mix(self.seed, self.epoch.get_value())).shuffle(urls)
        worker, workers = _worker()
        for url in urls[self.rank::self.world][worker::workers]:
            yield {"url": url}


class SampleShuffle:
    """A buffered sample shuffle seeded from (seed, rank, worker, epoch, pass)."""

    def __init__(self, seed: int, epoch: Epoch, rank: int = 0, bufsize: int = SAMPLE_SHUFFLE[0],
                 initial: int = SAMPLE_SHUFFLE[1]):
        self.seed, self.epoch, self.rank, self.bufsize, self.initial = seed, epoch, rank, bufsize, initial
        self._passes = (None, 0)  # (epoch, passes over this worker's shards within it)

    def __call__(self, src):
        epoch = self.epoch.get_value()
        passes = self._passes[1] + 1 if self._passes[0] == epoch else 0
        self._passes = (epoch, passes)
        worker, _ = _worker()
        seed = _mix(self.seed, self.rank, worker, epoch, passes)
        if torch.utils.data.get_worker_info() is not None:
            # a worker's augmentation follows the same numbers; the main process's generators
            # belong to the training step and are left alone
            torch.manual_seed(seed)
            random.seed(seed)
        return wds.shuffle(self.bufsize, self.initial, rng=random.Random(seed))(src)


class ToPair:
    """A sample dict -> (image, target), both through their transforms; what is missing raises
    ``MissingMember`` (the pipeline's handler skips and counts it)."""

    def __init__(self, image_transform: Callable, target_key: str, target_transform: Callable):
        self.image_transform, self.target_key, self.target_transform = image_transform, target_key, target_transform

    def __call__(self, sample: dict):
        key = next((k for k in IMAGE_KEYS if sample.get(k) is not None), None)
        target = sample.get(self.target_key)
        if key is None or target is None:
            what = "an image" if key is None else f"a .{self.target_key}"
            raise MissingMember(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')} has no {what}")
        name = f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')}"
        try:
            image = self.image_transform(bytes(sample[key]))
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises on these bytes, the image is damaged
            raise DamagedImage(f"{name}.{key}: {type(e).__name__}: {e}") from None
        try:
            return image, self.target_transform(bytes(target))
        except MissingMember as e:
            raise MissingMember(f"{name}: {e}") from None


def caption(tokenizer) -> Callable[[bytes], torch.Tensor]:
    """The ``.txt`` member -> its token ids (as open_clip_train's ``tokenizer(text)[0]``); an empty caption is missing."""
    return _Caption(tokenizer)


class _Caption:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, data: bytes) -> torch.Tensor:
        text = data.decode("utf-8")
        if not text.strip():
            raise MissingMember("a sample has an empty caption")
        return self.tokenizer(text)[0]


def class_label(data: bytes) -> int:
    """The ``.cls`` member -> its class number."""
    try:
        return int(data.decode("utf-8").strip())
    except ValueError:
        raise MissingMember(f".cls is not a class number: {data[:20]!r}") from None


def _collate(batch):
    return torch.utils.data.default_collate(batch)


def shard_pipeline(urls: Sequence[str], sample: ToPair, batch_size: int, *, train: bool, seed: int, epoch: Epoch,
                   counter: SkipCounter, rank: int = 0, world: int = 1) -> FiniteRepeatPipeline:
    """The webdataset pipeline: shards -> samples -> (image, target) batches (see the module docstring)."""
    stages: List = [ShardOrder(urls, seed, epoch, shuffle=train, rank=rank, world=world), tar_samples(counter)]
    if train:
        stages.append(SampleShuffle(seed, epoch, rank))
    stages += [wds.map(sample, handler=counter), wds.batched(batch_size, partial=not train, collation_fn=_collate)]
    return FiniteRepeatPipeline(*stages)


def loader(dataset, workers: int, prefetch_factor: Optional[int] = None):
    """webdataset's ``WebLoader`` over ``dataset`` (already batched), its workers kept between epochs."""
    kwargs = {"batch_size": None, "shuffle": False, "num_workers": workers, "persistent_workers": workers > 0}
    if workers:
        if prefetch_factor:
            kwargs["prefetch_factor"] = prefetch_factor
        if multiprocessing.get_start_method() != "fork" and "fork" in multiprocessing.get_all_start_methods():
            # a process started by spawn (torch_xla's launcher) would spawn its workers too: each
            # would import torch again and receive the pipeline by pickling; forked, they start at once
            kwargs["multiprocessing_context"] = "fork"
    return wds.WebLoader(dataset, **kwargs)


def train_batches(num_samples: int, batch_size: int, world: int, workers: int, round_up: bool = True) -> int:
    """Batches per worker and epoch: every worker gives the same number, so every process sees
    the same number of full batches (open_clip_train's arithmetic with ``round_up``)."""
    rnd = math.ceil if round_up else math.floor
    return max(rnd(rnd(num_samples / (batch_size * world)) / max(workers, 1)), 1)


class NormalizedLoader:
    """A loader whose uint8 image batches are normalised as they come out, on ``device``.

    On the training device where it takes them (a GPU then receives a quarter of the bytes
    and normalises there; from pinned memory the copy overlaps the step in flight); on the
    CPU before torch_xla's device loader. Float batches pass unchanged.
    """

    def __init__(self, batches, normalize, device="cpu", pin_memory: bool = False):
        self._batches, self._normalize, self._device, self._pin = batches, normalize, device, pin_memory

    def __iter__(self):
        for images, *rest in self._batches:
            if images.dtype == torch.uint8 and self._normalize is not None:
                images = self._normalize((images.pin_memory() if self._pin else images).to(self._device,
                                                                                         non_blocking=True))
            yield (images, *rest)

    def __len__(self):
        return len(self._batches)

    def __getattr__(self, name):  # num_batches, num_samples, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._batches, name)
