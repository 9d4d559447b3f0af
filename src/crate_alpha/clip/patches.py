"""Every change this project makes to another library's attributes, in one place.

open_clip_train has no plug-in points, so each patch replaces one module attribute of
``open_clip_train.main`` / ``open_clip_train.data`` (never a file), in the trainer's own
process, when ``install`` is called. ``PATCHES`` names each attribute and a line of the
library's source that uses it; tests/test_patches.py fails when one of them moves.
What open_clip_train or timm already do is not patched: open_clip_train writes
``epoch_latest.pt`` (what ``--resume latest`` reads) atomically itself, the open_clip
configs are added with ``open_clip.add_model_config`` and timm names with
``register_model``.

* whole checkpoints: ``epoch_N.pt`` is written beside its final name and renamed (it is
  written in place, so a full disk left a truncated file there); a full disk is one line;
* DDP on CPU: it passes ``device_ids=[device]`` to DistributedDataParallel, which DDP
  refuses for CPU (gloo) and XLA processes; they are dropped there;
* counted skips: damaged samples and shards are skipped (as before) and also counted in a
  counter shared with the data-loader workers, reported at the end of training;
* fused AdamW: one fused kernel per step instead of a Python loop over parameter
  tensors (on the 2-core demo, 0.23 -> 0.19 s per step);
* seeded sample shuffle: its sample-level ``wds.shuffle`` seeds from the clock and the
  pid, so two runs with the same ``--seed`` see different data orders; it is given a
  shuffle seeded from ``--seed`` and the epoch (see ``SeededShuffle``), so that a resumed
  run repeats the uninterrupted one;
* tar members: the training pipeline's tar expander is ``crate_alpha.data.tarstream``'s
  (the same samples as webdataset's, ~5x less time per member than ``tarfile``);
* cached tokenizer: the tokenizer open_clip_train gets from ``get_tokenizer`` is wrapped in
  ``crate_alpha.data.tokenize.CachedTokenizer`` (same ids, ~3x less time per caption);
* reduced-size JPEG decode: images stay encoded through webdataset's decode stage and the
  training transform decodes them with ``crate_alpha.data.decode`` (DCT-domain downscaling)
  into uint8 tensors, normalised per batch after the loader on the training device
  (``NormalizedLoader`` around ``get_data``'s training loader);
* loader prefetch: open_clip_train's ``WebLoader`` takes no ``prefetch_factor`` (torch's
  default is 2 batches per worker); the recipe's is passed on; its workers are forked even
  where the start method is spawn (in torch_xla's launched processes), since the pipeline
  holds lambdas that a spawned worker cannot receive;
* batches collated into shared memory: webdataset's collation stacks into ordinary memory,
  which the loader worker then copies into shared memory to send (10.8 MB per 128 x 84 px
  batch); torch's ``default_collate`` stacks straight into shared memory in a worker;
* XLA devices (``install(..., xla=XlaOptions(...))``, see ``xla.py``): a step boundary
  after each optimizer step, batches moved to the device by torch_xla's loader, optional
  FSDP sharding, and checkpoints copied to the CPU before ``torch.save``.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import random
import types
from dataclasses import dataclass
from typing import Optional

import torch
import webdataset as wds

from ..device import xla as _xla
from ..data.decode import FiniteRepeatPipeline, SkipCounter

_log = logging.getLogger(__name__)

# (module, attribute, a line of that module's source that uses the attribute as patched)
PATCHES = (
    ("open_clip_train.main", "torch", "torch.nn.parallel.DistributedDataParallel(model, device_ids=[device]"),
    ("open_clip_train.main", "optim", "optimizer = optim.AdamW("),
    ("open_clip_train.main", "create_model_and_transforms", "= create_model_and_transforms("),
    ("open_clip_train.main", "get_data", "data = get_data("),
    ("open_clip_train.main", "get_tokenizer", "tokenizer = get_tokenizer("),
    ("open_clip_train.data", "log_and_continue", "handler=log_and_continue"),
    ("open_clip_train.data", "tarfile_to_samples_nothrow", "tarfile_to_samples_nothrow,"),
    ("open_clip_train.data", "tar_file_expander", "files = tar_file_expander(streams, handler=handler)"),
    ("open_clip_train.data", "filter_no_caption_or_no_image", "wds.select(filter_no_caption_or_no_image)"),
    ("open_clip_train.data", "wds", "wds.shuffle("),
    ("open_clip_train.data", "wds", "dataset = wds.DataPipeline(*pipeline)"),
    ("open_clip_train.main", "torch", "torch.save(checkpoint_dict, tmp_save_path)"),
    ("open_clip_train.data", "wds", 'wds.decode("pilrgb"'),
    ("open_clip_train.data", "wds", "dataloader = wds.WebLoader("),
    ("open_clip_train.data", "wds", "wds.batched(args.batch_size, partial=not is_train)"),
    ("open_clip_train.data", "wds", "wds.map_dict(image=preprocess_img"),
    ("clip_benchmark.models", "TYPE2FUNC", "load_func = TYPE2FUNC[model_type]"),
)

# clip_benchmark's model-type table is its own extension point: a model type is added to it
COMPILED_OPEN_CLIP = "open_clip_compiled"


def register_compiled_open_clip() -> None:
    """``--model_type open_clip_compiled``: open_clip's loader, encoders under torch.compile."""
    from clip_benchmark import models
    from clip_benchmark.models.open_clip import load_open_clip

    def load_compiled(**kwargs):
        model, transform, tokenizer = load_open_clip(**kwargs)
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text)
        return model, transform, tokenizer

    models.TYPE2FUNC[COMPILED_OPEN_CLIP] = load_compiled
    if COMPILED_OPEN_CLIP not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(COMPILED_OPEN_CLIP)  # the same list clip_benchmark's CLI checks against


def _whole_save(obj, f, *args, **kwargs):
    # epoch_N.pt is written in place by open_clip_train: a full disk would leave a truncated
    # checkpoint under its final name; written beside it and renamed, it is whole or absent
    if isinstance(f, (str, os.PathLike)) and not args and not kwargs:
        from ..common import save_checkpoint

        save_checkpoint(obj, f)
    else:
        torch.save(obj, f, *args, **kwargs)


def _save_on_cpu(obj, f, *args, **kwargs):
    # an XLA checkpoint is the same file a CPU/GPU run writes (XLA tensors would need torch_xla to load)
    _whole_save(_xla.to_cpu(obj), f, *args, **kwargs)


class _Proxy(types.ModuleType):
    """A module that is ``real`` except for the attributes in ``overrides``."""

    def __init__(self, real, overrides: dict):
        super().__init__(real.__name__)
        self._real, self._overrides = real, overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._real, name)


def cpu_safe_ddp(module, device_ids=None, **kwargs):
    if device_ids and all(torch.device(d).type in ("cpu", "xla") for d in device_ids):
        device_ids = None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def _torch_for_open_clip_train(on_xla: bool):
    parallel = _Proxy(torch.nn.parallel, {"DistributedDataParallel": cpu_safe_ddp})
    overrides = {"nn": _Proxy(torch.nn, {"parallel": parallel}), "save": _save_on_cpu if on_xla else _whole_save}
    return _Proxy(torch, overrides)


class SeededShuffle(wds.detshuffle):
    """open_clip_train's sample shuffle, seeded from --seed (it seeds from the clock).

    The seed is the loader worker's torch seed (or, without workers, the process's, which
    open_clip_train sets to --seed + rank) and the epoch, so a run's data order can be
    repeated (the XLA-vs-CPU parity tests need it). The epoch is open_clip_train's own
    (its ``SharedEpoch``, handed over by the pipeline; see ``install``), not a count of
    passes, and a worker's crops and flips are reseeded from it at each pass: a run
    resumed at epoch k sees the same samples, in the same order, with the same
    augmentation, as the uninterrupted run did at epoch k.
    """

    def __init__(self, bufsize=1000, initial=100):
        super().__init__(bufsize, initial)
        self.shared_epoch = None

    def run(self, src):
        if self.shared_epoch is not None:
            epoch = self.shared_epoch.get_value()
        else:
            self.epoch += 1
            epoch = self.epoch
        worker = torch.utils.data.get_worker_info()
        base = worker.seed if worker is not None else torch.initial_seed()
        seed = base * 1_000_003 + epoch
        if worker is not None:  # the main process's generators are the training step's: left alone
            torch.manual_seed(seed % 2 ** 63)
            random.seed(seed)
        return wds.shuffle(self.bufsize, self.initial, rng=random.Random(seed))(src)


def decode_caption(sample: dict) -> dict:
    """webdataset's text decoding of the ``txt`` member alone."""
    if isinstance(sample.get("txt"), (bytes, bytearray)):
        sample["txt"] = bytes(sample["txt"]).decode("utf-8")
    return sample


class BytesOrImage:
    """Apply ``on_bytes`` to still-encoded images and ``on_image`` to PIL images."""

    def __init__(self, on_bytes, on_image):
        self.on_bytes, self.on_image = on_bytes, on_image

    def __call__(self, x):
        if isinstance(x, (bytes, bytearray)):
            return self.on_bytes(bytes(x))
        return self.on_image(x)

    def __repr__(self):
        return f"BytesOrImage(bytes={self.on_bytes!r})"


@dataclass
class XlaOptions:
    """How open_clip_train runs on an XLA device (see ``xla.py``)."""

    metrics_path: Optional[str] = None   # xla_metrics.json (compile count per step)
    fsdp: bool = False                   # SPMD FSDP over all devices of this process
    metrics: Optional[object] = None     # set by install(): the StepMetrics it records into


def _synced(optimizer_cls, metrics):
    class Synced(optimizer_cls):
        # the step boundary of XLA's lazy tensors: the whole training step is one graph
        def step(self, closure=None):
            out = super().step(closure)
            _xla.sync()
            metrics.step()
            return out

    Synced.__name__ = optimizer_cls.__name__
    return Synced


# per-run loader settings, read when open_clip_train builds its loader (a second run in the
# same process, as in `make demo`, installs again with its own)
_loader_settings = {"prefetch_factor": None, "normalize": None}


def train_normalize():
    """The batch normalisation of the current run's uint8 training images (None before a model is built)."""
    return _loader_settings["normalize"]


class NormalizedLoader:
    """open_clip_train's training loader, its uint8 image batches normalised as they come out.

    On ``device`` (the training device; the CPU before torch_xla's device loader), so a GPU
    receives a quarter of the bytes and normalises there. Float batches pass unchanged.
    """

    def __init__(self, loader, normalize, device="cpu"):
        self._loader, self._normalize, self._device = loader, normalize, device

    def __iter__(self):
        # webdataset's loader does not pin its batches; from pinned memory the copy to a GPU
        # is a DMA that overlaps the step in flight
        pin = torch.device(self._device).type == "cuda"
        for images, *rest in self._loader:
            if images.dtype == torch.uint8:
                images = self._normalize((images.pin_memory() if pin else images).to(self._device, non_blocking=True))
            yield (images, *rest)

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):  # num_batches, num_samples, ...
        return getattr(self._loader, name)


def install(counter: SkipCounter, fast_decode: bool, xla: Optional[XlaOptions] = None,
            prefetch_factor: Optional[int] = None) -> None:
    import open_clip_train.data as data
    import open_clip_train.main as main

    _loader_settings["prefetch_factor"] = prefetch_factor
    if getattr(main, "_crate_alpha_hooks", None) is not None:
        main._crate_alpha_hooks.value = counter.value  # already installed: count into the new counter
        return
    main._crate_alpha_hooks = counter
    main.torch = _torch_for_open_clip_train(xla is not None)
    metrics = _xla.StepMetrics(xla.metrics_path) if xla is not None else None
    if xla is not None:
        xla.metrics = metrics

    class _Optim(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch.optim, name)

        @staticmethod
        def AdamW(params, **kwargs):  # noqa: N802 - mirrors torch.optim.AdamW
            params = list(params)
            tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            if all(p.device.type in ("cpu", "cuda") for p in tensors):
                kwargs.setdefault("fused", True)
            if metrics is not None:
                return _synced(torch.optim.AdamW, metrics)(params, **kwargs)
            return torch.optim.AdamW(params, **kwargs)

    main.optim = _Optim("torch.optim")
    get_data = main.get_data

    def get_data_normalized(args, *rest, **kwargs):
        data = get_data(args, *rest, **kwargs)
        if "train" in data and _loader_settings["normalize"] is not None:
            device = "cpu" if xla is not None else getattr(args, "device", "cpu")
            data["train"].dataloader = NormalizedLoader(data["train"].dataloader, _loader_settings["normalize"],
                                                        device)
        return data

    main.get_data = get_data_normalized  # before the XLA device loader, which then wraps it
    get_tokenizer = main.get_tokenizer

    def cached_get_tokenizer(*args, **kwargs):
        from ..data.tokenize import fast_tokenizer

        return fast_tokenizer(get_tokenizer(*args, **kwargs))

    main.get_tokenizer = cached_get_tokenizer
    if xla is not None:
        _install_xla(main, xla, metrics)

    data.log_and_continue = counter
    from ..data.tarstream import tar_file_expander

    data.tar_file_expander = tar_file_expander
    data.tarfile_to_samples_nothrow.__defaults__ = (counter,)
    keep = data.filter_no_caption_or_no_image

    def counted_filter(sample):
        ok = keep(sample)
        if not ok:
            counter(ValueError(f"sample {sample.get('__key__')} has no image or no caption"))
        return ok

    data.filter_no_caption_or_no_image = counted_filter

    class _Wds(types.ModuleType):
        def __getattr__(self, name):
            return getattr(wds, name)

        @staticmethod
        def shuffle(bufsize=1000, initial=100, **kwargs):
            return SeededShuffle(bufsize, initial)

        @staticmethod
        def DataPipeline(*stages, **kwargs):  # noqa: N802 - mirrors wds.DataPipeline
            # the shard shuffle's SharedEpoch (the epoch open_clip_train sets) is the sample shuffle's too
            epochs = [st.epoch for st in stages if isinstance(getattr(st, "epoch", None), data.SharedEpoch)]
            for st in stages:
                if isinstance(st, SeededShuffle) and epochs:
                    st.shared_epoch = epochs[0]
            # its with_epoch repeats a worker's shards until it has its batches: shards that give
            # none (empty, damaged) would be re-read forever, so a pass without a batch ends there
            return FiniteRepeatPipeline(*stages, **kwargs)

        @staticmethod
        def map_dict(handler=None, **kwargs):
            # with the fast decode the image transform decodes: a damaged or too large image is
            # skipped and counted, as in webdataset's decode stage, not raised in the loader worker
            return wds.map_dict(handler=handler or counter, **kwargs)

        @staticmethod
        def batched(batchsize, partial=True, **kwargs):
            from torch.utils.data import default_collate

            return wds.batched(batchsize, partial=partial, collation_fn=default_collate)

        @staticmethod
        def WebLoader(*args, **kwargs):  # noqa: N802 - mirrors wds.WebLoader
            if kwargs.get("num_workers"):
                if _loader_settings["prefetch_factor"]:
                    kwargs["prefetch_factor"] = _loader_settings["prefetch_factor"]
                if multiprocessing.get_start_method() != "fork" and "fork" in multiprocessing.get_all_start_methods():
                    # open_clip_train's pipeline holds lambdas, which spawned workers cannot
                    # unpickle; a process started by spawn (torch_xla's launcher) defaults to it
                    kwargs.setdefault("multiprocessing_context", "fork")
            return wds.WebLoader(*args, **kwargs)

        if fast_decode:
            @staticmethod
            def decode(*handlers, handler=None, **kwargs):
                # only the caption is decoded: images stay encoded for the reduced-size decode, and
                # the rest (img2dataset's .json of metadata) is never read by open_clip_train
                return wds.map(decode_caption, handler=handler or wds.reraise_exception)

    data.wds = _Wds("webdataset")
    if not fast_decode:
        return
    from PIL import Image

    from ..data.decode import BatchNormalize, train_transform

    create = main.create_model_and_transforms

    def create_with_fast_decode(*args, **kwargs):
        model, pp_train, pp_val = create(*args, **kwargs)
        cfg = model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        # uint8 out of the worker, normalised per batch after the loader (NormalizedLoader)
        fast = train_transform(size, cfg["mean"], cfg["std"], scale=(0.9, 1.0), uint8=True)
        _loader_settings["normalize"] = BatchNormalize(cfg["mean"], cfg["std"])

        def pil(b):
            return Image.open(io.BytesIO(b)).convert("RGB")

        return (model, BytesOrImage(fast, pp_train),
                BytesOrImage(lambda b: pp_val(pil(b)), pp_val))

    main.create_model_and_transforms = create_with_fast_decode


def _install_xla(main, options: XlaOptions, metrics) -> None:
    mesh = _xla.use_spmd() if options.fsdp else None
    get_data = main.get_data

    def get_data_on_device(*args, **kwargs):
        data = get_data(*args, **kwargs)
        for info in data.values():
            info.dataloader = _xla.DeviceLoader(info.dataloader, mesh=mesh)
        return data

    main.get_data = get_data_on_device
    if mesh is None:
        return
    create = main.create_model_and_transforms

    def create_sharded(*args, **kwargs):
        model, pp_train, pp_val = create(*args, **kwargs)
        n = _xla.shard_module(model, mesh)
        _log.info("FSDP: %d weight matrices sharded over %d devices", n, mesh.size())
        return model, pp_train, pp_val

    main.create_model_and_transforms = create_sharded
