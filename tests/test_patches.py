"""The replacements of open_clip_train's attributes (crate_alpha.clip.patches): where they point, scoped to a run."""
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


def _attributes():
    import open_clip_train.data as data
    import open_clip_train.main as main

    return {(m.__name__, a): getattr(m, a) for m in (main, data) for a in dir(m) if not a.startswith("__")}


def test_patches_take_effect_for_one_run_and_are_undone(tmp_path):
    import open_clip_train.main as main
    import torch

    from crate_alpha.clip.patches import ClipRun, patched
    from crate_alpha.device import CpuDevice

    before = _attributes()
    with patched(ClipRun(CpuDevice(), prefetch_factor=3)) as run:
        assert main.get_data.__closure__ and run in [c.cell_contents for c in main.get_data.__closure__]
        ddp = main.torch.nn.parallel.DistributedDataParallel
        assert ddp is not torch.nn.parallel.DistributedDataParallel
        main.torch.save({"w": torch.ones(2)}, tmp_path / "epoch_1.pt")  # open_clip_train's call, whole or absent
        assert torch.load(tmp_path / "epoch_1.pt")["w"].sum() == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt"]
        opt = main.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        assert opt.defaults["fused"] is True
        assert main.torch.zeros(1).shape == (1,)  # the rest of torch is torch
    assert _attributes() == before, "an attribute of open_clip_train was left replaced"
    with pytest.raises(KeyError):  # undone on an error too
        with patched(ClipRun(CpuDevice())):
            raise KeyError("boom")
    assert _attributes() == before


def test_two_runs_get_their_own_settings():
    import open_clip_train.main as main

    from crate_alpha.clip.patches import ClipRun, patched
    from crate_alpha.device import CpuDevice

    seen = []
    for prefetch in (3, 5):
        with patched(ClipRun(CpuDevice(), prefetch_factor=prefetch)):
            seen.append([c.cell_contents.prefetch_factor for c in main.get_data.__closure__
                         if isinstance(c.cell_contents, ClipRun)])
    assert seen == [[3], [5]]


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
