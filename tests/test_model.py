"""The CRATE-α encoder as a timm model: operators, variants, timm features, registration,
and timm's own model checks."""
import math
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import crate_alpha
import reference_official as ref
from crate_alpha import MSSA, ODL, CrateAlpha
from crate_alpha.convert import convert_official_torch
from conftest import rel_err


def test_mssa_is_shared_qkv_attention():
    m = MSSA(32, num_heads=4).eval()
    x = torch.randn(2, 5, 32)
    w = (x @ m.qkv.weight.T).reshape(2, 5, 4, 8).transpose(1, 2)
    a = torch.softmax(w @ w.transpose(-1, -2) / math.sqrt(8), -1) @ w
    expected = a.transpose(1, 2).reshape(2, 5, 32) @ m.proj.weight.T
    assert rel_err(m(x), expected) < 1e-5
    assert m.qkv.bias is None and m.proj.bias is None


def test_odl_two_ista_steps():
    m = ODL(16, 64)
    x = torch.randn(3, 4, 16)
    D, D1 = m.D, m.D1
    z1 = F.relu(0.1 * x @ D - 0.01)
    z2 = F.relu(z1 - 0.1 * (z1 @ D.T - x) @ D - 0.01)
    assert rel_err(m(x), z2 @ D1.T) < 1e-5
    assert D.shape == (16, 64) and not torch.equal(D, D1)


def test_paper_initialisation():
    m = timm.create_model("crate_alpha_demo_patch8_64")
    blk = m.blocks[0]
    bound = math.sqrt(6 / 512)  # kaiming-uniform on (d, 4d): fan_in 4d
    assert blk.mlp.D.abs().max() <= bound and blk.mlp.D.abs().max() > 0.9 * bound
    assert abs(blk.attn.qkv.weight.std().item() - 0.02) < 0.003
    assert blk.attn.qkv.weight.abs().max() > 0.04  # normal, not truncated at 2 std
    assert m.cls_token.abs().max() < 1e-4


ALL_TIMM = crate_alpha.list_crate_alpha_models()


@pytest.mark.parametrize("name", ALL_TIMM)
def test_every_timm_variant_runs(name):
    args = crate_alpha.variant_args(name)
    model = timm.create_model(name, num_classes=5).eval()
    assert isinstance(model, CrateAlpha)
    assert model.embed_dim == args["embed_dim"] and len(model.blocks) == args["depth"]
    assert model.blocks[0].attn.num_heads == args["num_heads"]
    res = args["img_size"] if args["embed_dim"] <= 768 else 2 * args["patch_size"]
    if res != args["img_size"]:
        model.set_input_size(res)  # large ones at a reduced input size
    with torch.no_grad():
        y = model(torch.randn(1, 3, res, res))
    assert y.shape == (1, 5) and torch.isfinite(y).all()


@pytest.mark.parametrize("num_classes", [1000, 19167, 3])
def test_classifier_heads(num_classes):
    m = timm.create_model("crate_alpha_tiny_patch16_224", num_classes=num_classes, img_size=32)
    assert m.head.out_features == num_classes
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, num_classes)


def test_avg_pool_layer_scale_drop_path():
    m = timm.create_model("crate_alpha_demo_patch8_64", global_pool="avg", init_values=1e-5,
                          drop_path_rate=0.1, num_classes=4)
    assert m.blocks[0].ls1.gamma.shape == (128,) and m.blocks[-1].drop_path1.drop_prob > 0
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_gradient_checkpointing_same_gradients():
    m = timm.create_model("crate_alpha_demo_patch8_64", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()
    g = m.blocks[1].mlp.D.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    assert torch.allclose(g, m.blocks[1].mlp.D.grad, atol=1e-6)


def test_forward_intermediates_and_groups():
    m = timm.create_model("crate_alpha_demo_patch8_64", num_classes=3).eval()
    final, inter = m.forward_intermediates(torch.randn(1, 3, 64, 64), indices=2)
    assert len(inter) == 2 and inter[0].shape == (1, 128, 8, 8) and final.shape == (1, 65, 128)
    assert {"pos_embed", "cls_token"} <= m.no_weight_decay()
    from timm.models import group_parameters
    groups = group_parameters(m, m.group_matcher())
    assert len(groups) == 4 + 2  # stem, 4 blocks, final norm


def test_set_input_size():
    m = timm.create_model("crate_alpha_demo_patch8_64", num_classes=3)
    m.set_input_size(32)
    assert m.pos_embed.shape == (1, 17, 128)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_sincos_position_embedding():
    m = timm.create_model("crate_alpha_demo_patch8_64", pos_embed="sincos", num_classes=0)
    assert not m.pos_embed.requires_grad
    pe = m.pos_embed[0]
    assert torch.equal(pe[0], torch.zeros(128))
    # big_vision layout: [sin x, cos x, sin y, cos y]; token 1 is (y=0, x=1).
    omega = 1.0 / 10000 ** (torch.arange(32) / 31)
    assert torch.allclose(pe[2, :32], torch.sin(omega))
    assert torch.allclose(pe[2, 64:96], torch.zeros(32))
    m.set_input_size(32)
    assert m.pos_embed.shape == (1, 17, 128) and torch.allclose(m.pos_embed[0, 2, :32], torch.sin(omega))


def _grid_resample(pe, new):
    cls, grid = pe[:, :1], pe[:, 1:]
    old = int(grid.shape[1] ** 0.5)
    g = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(new, new), mode="bilinear", align_corners=False)
    return torch.cat([cls, g.permute(0, 2, 3, 1).reshape(1, new * new, -1)], 1)


@pytest.mark.parametrize("src_res,dst_res", [(84, 224), (224, 84)])
def test_checkpoint_other_grid_loads_with_plain_torch(src_res, dst_res):
    src = timm.create_model("crate_alpha_tiny_patch16_224", img_size=src_res - src_res % 16)
    dst = timm.create_model("crate_alpha_tiny_patch16_224", img_size=dst_res - dst_res % 16)
    dst.load_state_dict(src.state_dict())  # plain torch, strict
    expected = _grid_resample(src.pos_embed.detach(), dst.patch_embed.grid_size[0])
    assert torch.allclose(dst.pos_embed, expected, atol=1e-6)
    assert torch.equal(dst.pos_embed[0, 0], src.pos_embed[0, 0])  # class token kept apart
    assert torch.equal(dst.blocks[0].mlp.D, src.blocks[0].mlp.D)


def test_checkpoint_other_grid_loads_through_timm(tmp_path):
    src = timm.create_model("crate_alpha_demo_patch8_64", img_size=32, num_classes=2)
    torch.save(src.state_dict(), tmp_path / "ckpt.pth")
    dst = timm.create_model("crate_alpha_demo_patch8_64", num_classes=2, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt.pth")))
    assert dst.pos_embed.shape == (1, 65, 128)
    assert torch.allclose(dst.pos_embed, _grid_resample(src.pos_embed.detach(), 8), atol=1e-6)


def test_timm_features_only_like_vit():
    # dense-prediction users: timm's feature getter, as for vit_* (it failed with "Return layers ... not present")
    x = torch.randn(2, 3, 64, 64)
    feat = timm.create_model("crate_alpha_demo_patch8_64", features_only=True, out_indices=(0, 2)).eval()
    full = timm.create_model("crate_alpha_demo_patch8_64").eval()
    full.load_state_dict(feat.model.state_dict(), strict=False)
    with torch.no_grad():
        got = feat(x)
        _, want = full.forward_intermediates(x, indices=[0, 2])
    assert feat.feature_info.channels() == [128, 128] and feat.feature_info.reduction() == [8, 8]
    assert [f.shape for f in got] == [(2, 128, 8, 8)] * 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---- registration: timm's public register_model only ------------------------------------

def test_timm_registry_is_left_as_timm_made_it():
    # Names are added with timm.models.register_model; timm's table is never swapped for another type.
    from timm.models import _registry
    assert type(_registry._model_entrypoints) is dict
    for name in ALL_TIMM:
        assert timm.models.model_entrypoint(name).__module__ == "crate_alpha.models.crate_alpha"


def test_custom_shape_name_needs_no_registration():
    name = "crate_alpha_custom.w24_d3_h2_patch4_16"  # a shape spelled by its tag: timm resolves it as it is
    assert timm.is_model(name)
    m = timm.create_model(name, num_classes=3).eval()
    assert isinstance(m, CrateAlpha) and m.embed_dim == 24 and len(m.blocks) == 3
    assert m.blocks[0].attn.num_heads == 2 and m.pretrained_cfg["input_size"] == (3, 16, 16)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    feat = timm.create_model(name, features_only=True, out_indices=(0, 2)).eval()
    assert feat.feature_info.channels() == [24, 24] and feat.feature_info.reduction() == [4, 4]
    assert [f.shape for f in feat(torch.randn(2, 3, 16, 16))] == [(2, 24, 4, 4)] * 2
    with pytest.raises(ValueError, match="no released weights"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(ValueError, match="width 32 is not divisible by 3 heads"):
        timm.create_model("crate_alpha_custom.w32_d1_h3_patch8_32")


# A new interpreter: folders of other shapes load with the libraries' plain calls.
_LOAD_IN_A_FRESH_PROCESS = """
import sys
import open_clip, timm, torch
import crate_alpha  # noqa: F401

cls, clip, out = sys.argv[1:4]
x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
with torch.no_grad():
    logits = timm.create_model("local-dir:" + cls, pretrained=True).eval()(x[..., :8, :8])
    image = open_clip.create_model("local-dir:" + clip).eval().encode_image(x)
torch.save({"logits": logits, "image": image}, out)
"""


def test_custom_shape_folders_load_in_a_fresh_process(tmp_path):
    sd = ref.random_classifier_sd(width=32, depth=1, patch=4, res=8, num_classes=2)
    torch.save(sd, tmp_path / "c.pth")
    convert_official_torch(tmp_path / "c.pth", tmp_path / "cls", heads=2)
    clip_sd = ref.random_clipa_sd(width=32, depth=1, patch=4, res=16, embed=24, text_width=48, text_layers=1,
                                  vocab=50, context=8)
    torch.save(clip_sd, tmp_path / "clip.pth")
    convert_official_torch(tmp_path / "clip.pth", tmp_path / "clip", heads=2, text_heads=3)
    r = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "cls"), str(tmp_path / "clip"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    x = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    logits, _ = ref.classifier_forward(sd, x[..., :8, :8], heads=2)
    assert rel_err(got["logits"], logits) <= 1e-4
    assert rel_err(got["image"], ref.clipa_image(clip_sd, x, heads=2)) <= 1e-4


# ---- timm's own model checks (its tests/test_models.py), for every registered name ---------

# What a timm ViT entry carries, weight locations aside (checked apart: only some names have released files).
CFG_KEYS = ("architecture", "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean",
            "std", "num_classes", "first_conv", "classifier", "license", "paper_ids", "paper_name", "origin_url")


def _small(name, depth=1, **kwargs):
    """``name`` (its width and heads) at two patches a side and few blocks: timm's checks, cheaply."""
    res = 2 * crate_alpha.variant_args(name)["patch_size"]
    return timm.create_model(name, img_size=res, depth=depth, **kwargs).eval(), torch.randn(1, 3, res, res)


@pytest.mark.parametrize("name", ALL_TIMM)
def test_pretrained_cfg_complete(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert [k for k in CFG_KEYS if cfg.get(k) is None] == []
    res = crate_alpha.variant_args(name)["img_size"]
    assert cfg["architecture"] == name and cfg["input_size"] == (3, res, res) and cfg["fixed_input_size"]
    assert len(cfg["mean"]) == len(cfg["std"]) == 3 and 0 < cfg["crop_pct"] <= 1
    assert timm.get_pretrained_cfg_value(name, "input_size") == cfg["input_size"]
    # a name with released weights: its default tag is the first released file; other names have no source
    released_files = [r.path for r in crate_alpha.models.released.RELEASES if r.model == name]
    assert timm.models.is_model_pretrained(name) == bool(released_files) and not cfg.get("url")
    if released_files:
        assert cfg["hf_hub_id"] == crate_alpha.models.released.REPO and cfg["hf_hub_filename"] == released_files[0]
        assert cfg["license"] == "apache-2.0"
    else:
        assert not cfg.get("hf_hub_id")
    # the full-size model (on the meta device, no memory): the cfg names its real modules and input
    m = timm.create_model(name, device="meta")
    assert m.pretrained_cfg["architecture"] == name and tuple(m.patch_embed.img_size) == cfg["input_size"][1:]
    first, head = m.get_submodule(cfg["first_conv"]), m.get_submodule(cfg["classifier"])
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == cfg["input_size"][0]
    assert head.out_features == cfg["num_classes"] == m.num_classes
    state = m.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    data = timm.data.resolve_model_data_config(m)
    assert data["input_size"] == cfg["input_size"] and data["interpolation"] == cfg["interpolation"]
    assert data["mean"] == cfg["mean"] and data["std"] == cfg["std"] and data["crop_pct"] == cfg["crop_pct"]
    timm.data.create_transform(**data)


@pytest.mark.parametrize("name", ALL_TIMM)
def test_timm_default_cfgs_non_std(name):
    # timm's test_model_default_cfgs_non_std: features, pre-logits and a removed classifier agree
    m, x = _small(name)
    assert m.num_classes >= 0 and m.num_features > 0 and m.head_hidden_size > 0
    with torch.no_grad():
        feats = m.forward_features(x)
        pre = m.forward_head(feats, pre_logits=True)
        assert feats.shape[-1] == m.num_features and pre.shape[1] == m.head_hidden_size
        m.reset_classifier(0)
        assert m.num_classes == 0
        out = m(x)
        assert out.shape == pre.shape and out.shape[-1] == m.head_hidden_size
        headless, _ = _small(name, num_classes=0)
        assert headless(x).shape[-1] == headless.num_features


@pytest.mark.parametrize("name", ALL_TIMM)
def test_timm_forward_and_backward(name):
    # timm's test_model_forward (with grad checkpointing) and test_model_backward
    m, x = _small(name, num_classes=42)
    with torch.no_grad():
        y = m(x)
        m.set_grad_checkpointing()
        torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)
    assert y.shape == (1, 42) and not torch.isnan(y).any()
    m.train()
    out = m(torch.randn(2, *x.shape[1:]))
    out.mean().backward()
    assert out.shape == (2, 42) and [n for n, p in m.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", ALL_TIMM)
def test_timm_forward_intermediates(name):
    # timm's test_model_forward_intermediates and test_model_forward_intermediates_features

    def check(outs, info, side):
        assert len(outs) == len(info.channels())
        for c, r, o in zip(info.channels(), info.reduction(), outs):
            assert o.shape[:2] == (1, c) and not torch.isnan(o).any()
            assert o.shape[2] <= math.ceil(side / r) + 1 and o.shape[3] <= math.ceil(side / r) + 1

    m, x = _small(name, depth=3)  # timm asks for at least three feature levels
    info = timm.models.FeatureInfo(m.feature_info, len(m.feature_info))
    assert len(info.channels()) >= 3
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, output_fmt="NCHW")
        check(inter, info, x.shape[-1])
        torch.testing.assert_close(final, m.forward_features(x))
        m.set_grad_checkpointing()
        torch.testing.assert_close(m.forward_intermediates(x, output_fmt="NCHW")[0], final, rtol=1e-4, atol=1e-5)
        feat, x = _small(name, features_only=True, feature_cls="getter", out_indices=1)  # the last of 1 block
        check(feat(x), feat.feature_info, x.shape[-1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", ALL_TIMM)
def test_timm_torchscript_and_fx(name):
    # timm's test_model_forward_torchscript and test_model_forward_fx
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    from timm.models import get_notrace_functions, get_notrace_modules

    with timm.layers.set_scriptable(True):
        m, x = _small(name)
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(torch.jit.script(m)(x), y)
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = fx.get_graph_node_names(m, tracer_kwargs=tracer)
    traced = fx.create_feature_extractor(m, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:],
                                         tracer_kwargs=tracer)
    with torch.no_grad():
        assert torch.equal(next(iter(traced(x).values())), y)
