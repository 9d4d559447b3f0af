"""The CRATE-α encoder as a timm model: operators, variants, timm features."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import crate_alpha
from crate_alpha import MSSA, ODL, CrateAlpha
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
