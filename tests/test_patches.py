"""Each patch of another library's attribute (crate_alpha.clip.patches) fails here when the attribute moves."""
import importlib
import inspect

import open_clip
import pytest
import timm

import crate_alpha
from crate_alpha.clip.patches import PATCHES


@pytest.mark.parametrize("module,attribute,use", PATCHES, ids=[f"{m}.{a}" for m, a, _ in PATCHES])
def test_patched_attribute_is_where_the_patch_expects_it(module, attribute, use):
    mod = importlib.import_module(module)
    assert hasattr(mod, attribute), f"{module}.{attribute} moved: crate_alpha.clip.patches must follow it"
    assert use in inspect.getsource(mod), f"{module} no longer uses {attribute} as `{use}`"


def test_open_clip_train_patches_take_effect():
    import open_clip_train.data as data
    import open_clip_train.main as main

    from crate_alpha.data.decode import SkipCounter
    from crate_alpha.clip.patches import SeededShuffle, _whole_save, cpu_safe_ddp, install

    counter = SkipCounter()
    install(counter, fast_decode=True)
    assert main.torch.nn.parallel.DistributedDataParallel is cpu_safe_ddp
    # open_clip_train's saving, each file written beside its name and renamed (whole or absent)
    assert main.torch.save is _whole_save
    assert isinstance(data.wds.shuffle(100), SeededShuffle)
    # installed once per process: a later install counts into its own counter's shared value
    assert data.tarfile_to_samples_nothrow.__defaults__[0].value is counter.value
    data.log_and_continue(ValueError("damaged"))
    assert counter.count == 1
    opt = main.optim.AdamW([__import__("torch").nn.Parameter(__import__("torch").zeros(2))], lr=1e-3)
    assert opt.defaults["fused"] is True
    from crate_alpha.data.tokenize import CachedTokenizer

    assert isinstance(main.get_tokenizer("crate-alpha-demo"), CachedTokenizer)


def test_loader_prefetch_and_shared_memory_collation():
    import open_clip_train.data as data
    import torch
    import webdataset as wds

    from crate_alpha.data.decode import SkipCounter
    from crate_alpha.clip.patches import install

    install(SkipCounter(), fast_decode=True, prefetch_factor=5)
    pipeline = wds.DataPipeline(lambda: iter([(torch.ones(3), torch.zeros(2))] * 4), data.wds.batched(2))
    loader = data.wds.WebLoader(pipeline, batch_size=None, num_workers=1)
    assert loader.pipeline[0].prefetch_factor == 5  # WebLoader wraps a torch DataLoader
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3) and batches[0][0].is_shared()
    install(SkipCounter(), fast_decode=True)  # a second run in the process gets its own setting
    assert data.wds.WebLoader(pipeline, batch_size=None, num_workers=1).pipeline[0].prefetch_factor == 2


def test_no_private_registry_is_replaced():
    # timm names through register_model, open_clip configs through add_model_config: both public
    from timm.models import _registry

    assert type(_registry._model_entrypoints) is dict
    assert timm.is_model("crate_alpha_base_patch16_224")
    assert set(crate_alpha.list_open_clip_models()) <= set(open_clip.list_models())


def test_compiled_model_type_for_clip_benchmark():
    from clip_benchmark import models

    from crate_alpha.clip.patches import COMPILED_OPEN_CLIP, register_compiled_open_clip

    register_compiled_open_clip()
    register_compiled_open_clip()  # twice: registered once
    assert models.MODEL_TYPES.count(COMPILED_OPEN_CLIP) == 1
    model, _, _ = models.load_clip(COMPILED_OPEN_CLIP, "crate-alpha-demo", "", None, device="cpu")
    assert type(model.encode_image).__name__ != "method"  # torch.compile's wrapper, not the plain method
