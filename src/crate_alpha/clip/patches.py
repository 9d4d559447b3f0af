"""What this project changes in open_clip_train for one run, and undoes after it.

open_clip_train has no plug-in points, so a run replaces a few attributes of
``open_clip_train.main`` while it runs (``patched``, a context manager) and restores them
when it ends, so a second run in the same process gets its own settings and code outside a
run sees open_clip_train as it is. The run's settings travel one way: the recipe becomes
open_clip_train's arguments (its own flags) and a ``ClipRun`` (the rest), which the
replacements close over. ``PATCHES`` names each attribute with a line of open_clip_train's
source that uses it; tests/test_patches.py fails when one of them moves.

* ``main.get_data`` -> ``get_data`` below: the training data comes from this project's
  input pipeline (``crate_alpha.data.loader``: seeded shard and sample order, the tar
  reader, counted skips, reduced-size decode to uint8, shared-memory collation, prefetch,
  normalisation where the batch goes). Removable when open_clip_train's ``get_data`` takes a
  dataset factory (its 4.x ``task`` rewrite moves data building behind one function).
* ``main.torch`` -> a view of torch with two differences: ``DistributedDataParallel``
  gets the device's ``device_ids`` (open_clip_train passes ``[device]``, which DDP refuses
  for CPU and XLA modules), and ``torch.save`` writes whole checkpoints (``epoch_N.pt`` is
  written in place, so a full disk left a truncated file under its final name; on XLA the
  tensors are copied to the CPU first). Removable when open_clip_train drops device_ids on
  CPU and saves through a temporary file for every checkpoint.
* ``main.optim`` -> torch.optim whose ``AdamW`` is the fused kernel where the device has
  one (``make bench``'s optimizer row measures fused against torch's default). Removable
  when open_clip_train takes an optimizer option (4.x's ``create_optimizer`` does).
* ``main.create_model_and_transforms``, with XLA FSDP only: the model's weights are
  sharded over the devices as it is built. Removable with a sharding hook in open_clip_train.

The XLA step boundary is not a patch: it is torch's public optimizer post-hook, registered
by the device for the run (``Device.optimizer_hooks``). clip_benchmark's model-type table
is its own extension point; a model type is added to it (``register_compiled_open_clip``).
"""
from __future__ import annotations

import contextlib
import io
import os
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from PIL import Image

from ..common import swapped
from ..data.decode import SkipCounter, check_area

# (module, attribute, a line of that module's source that uses the attribute as replaced)
PATCHES = (
    ("open_clip_train.main", "get_data", "data = get_data("),
    ("open_clip_train.main", "torch", "torch.nn.parallel.DistributedDataParallel(model, device_ids=[device]"),
    ("open_clip_train.main", "torch", "torch.save(checkpoint_dict, tmp_save_path)"),
    ("open_clip_train.main", "optim", "optimizer = optim.AdamW("),
    ("open_clip_train.main", "create_model_and_transforms", "= create_model_and_transforms("),
    ("clip_benchmark.models", "TYPE2FUNC", "load_func = TYPE2FUNC[model_type]"),
)

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


@dataclass
class ClipRun:
    """One CLIP training run's settings that are not open_clip_train flags."""

    device: object                                  # a crate_alpha.device.Device
    counter: SkipCounter = field(default_factory=SkipCounter)
    fast_decode: bool = True                        # reduced-size JPEG decode to uint8
    prefetch_factor: Optional[int] = None           # batches each loader worker keeps ready


class _View(types.ModuleType):
    """A module that is ``real`` except for the attributes in ``overrides``."""

    def __init__(self, real, overrides: dict):
        super().__init__(real.__name__)
        self._real, self._overrides = real, overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._real, name)


def _torch_view(device):
    def ddp(module, device_ids=None, **kwargs):
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device.ddp_device_ids(device_ids),
                                                         **kwargs)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and not args and not kwargs:
            return device.save(obj, f)  # beside its final name, then renamed: whole or absent
        return torch.save(obj, f, *args, **kwargs)

    parallel = _View(torch.nn.parallel, {"DistributedDataParallel": ddp})
    return _View(torch, {"nn": _View(torch.nn, {"parallel": parallel}), "save": save})


def _optim_view():
    def adamw(params, **kwargs):
        kwargs.setdefault("fused", True)
        return torch.optim.AdamW(params, **kwargs)

    return _View(torch.optim, {"AdamW": adamw})


def fast_image_transform(preprocess) -> Optional[Callable[[bytes], torch.Tensor]]:
    """``preprocess`` (open_clip's training transform) as a reduced-size decode to uint8, or
    None when it does more than a random resized crop, RGB conversion and normalisation."""
    from torchvision import transforms as T

    from ..data.decode import DecodeRandomResizedCrop, ToUint8Tensor

    steps = getattr(preprocess, "transforms", None)
    crops = [t for t in steps or () if isinstance(t, T.RandomResizedCrop)]
    known = (T.RandomResizedCrop, T.Normalize, T.ToTensor)
    rest = [t for t in steps or () if not isinstance(t, known)
            and type(t).__name__ not in ("MaybeConvertMode", "MaybeToTensor", "function")]
    if len(crops) != 1 or rest or not any(isinstance(t, T.Normalize) for t in steps):
        return None
    crop = crops[0]
    size = crop.size[0] if isinstance(crop.size, (tuple, list)) else crop.size
    return T.Compose([DecodeRandomResizedCrop(size, scale=tuple(crop.scale), ratio=tuple(crop.ratio)),
                      ToUint8Tensor()])


def _normalisation(preprocess):
    from torchvision import transforms as T

    from ..data.decode import BatchNormalize

    norm = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))
    return BatchNormalize(norm.mean, norm.std)


class _PilThen:
    """Encoded image -> PIL RGB -> open_clip's own transform (``fast_decode=False``)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, data: bytes):
        check_area(data)
        with Image.open(io.BytesIO(data)) as im:
            return self.transform(im.convert("RGB"))


def get_data_for(run: ClipRun, original: Callable) -> Callable:
    """open_clip_train's ``get_data(args, preprocess_fns, epoch, tokenizer)``, served by our pipeline."""

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        if (not args.train_data or args.dataset_type != "webdataset" or args.val_data
                or getattr(args, "dataset_resampled", False)):
            return original(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)  # not a run of ours
        from open_clip_train.data import DataInfo

        from ..data import loader as L
        from ..data.shards import expand_shards
        from ..data.tokenize import fast_tokenizer
        from ..errors import DataError

        preprocess_train = preprocess_fns[0]
        image = fast_image_transform(preprocess_train) if run.fast_decode else None
        normalize = _normalisation(preprocess_train) if image is not None else None
        image = image or _PilThen(preprocess_train)
        urls = expand_shards(args.train_data)
        world, workers = args.world_size, args.workers
        if len(urls) < max(workers, 1) * world:
            raise DataError(f"train_data has {len(urls)} shard(s) but {world} process(es) x {max(workers, 1)} "
                            f"loader worker(s) each need one: lower workers or split the data into more shards")
        shared = L.Epoch(epoch)
        sample = L.ToPair(image, "txt", L.caption(fast_tokenizer(tokenizer)))
        pipeline = L.shard_pipeline(urls, sample, args.batch_size, train=True, seed=args.seed, epoch=shared,
                                    counter=run.counter, rank=args.rank, world=world)
        per_worker = L.train_batches(args.train_num_samples, args.batch_size, world, workers)
        batches = L.loader(pipeline.with_epoch(per_worker), workers, run.prefetch_factor)
        batches.num_batches = per_worker * max(workers, 1)
        batches.num_samples = batches.num_batches * args.batch_size * world
        batches = L.NormalizedLoader(batches, normalize, run.device.batch_device, run.device.pin_memory)
        return {"train": DataInfo(dataloader=run.device.wrap_loader(batches), shared_epoch=shared)}

    return get_data


@contextlib.contextmanager
def patched(run: ClipRun) -> Iterator[ClipRun]:
    """open_clip_train as this run needs it (the module docstring's list), restored on leaving."""
    import open_clip_train.main as main

    with contextlib.ExitStack() as stack:
        stack.enter_context(swapped(main, get_data=get_data_for(run, main.get_data)))
        stack.enter_context(swapped(main, torch=_torch_view(run.device)))
        if run.device.fused_optimizer:
            stack.enter_context(swapped(main, optim=_optim_view()))
        if run.device.fsdp:
            create = main.create_model_and_transforms

            def create_sharded(*args, **kwargs):
                import logging

                model, pp_train, pp_val = create(*args, **kwargs)
                logging.getLogger(__name__).info("FSDP: %d weight matrices sharded", run.device.shard(model))
                return model, pp_train, pp_val

            stack.enter_context(swapped(main, create_model_and_transforms=create_sharded))
        yield run
