"""The original CRATE (Yu et al., 2023) on timm, and the ablation ladder to CRATE-α."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import crate_alpha
from crate_alpha import ISTA, Crate, CrateAlpha
from crate_alpha.models.crate import ABLATION_LADDER, CrateBlock, checkpoint_filter_fn, list_crate_models
from conftest import rel_err

# --------------------------------------------------------------------------------------
# A plain-torch CRATE written from the paper's formulas, with the official code's module
# names (so its state dict has the layout of an official checkpoint).
# --------------------------------------------------------------------------------------


class _Patchify(nn.Module):
    """'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, img):
        b, c, h, w = img.shape
        p = self.p
        out = torch.empty(b, (h // p) * (w // p), p * p * c, dtype=img.dtype)
        for i in range(h // p):
            for j in range(w // p):
                patch = img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # b c p1 p2
                out[:, i * (w // p) + j] = patch.permute(0, 2, 3, 1).reshape(b, -1)
        return out


class _PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class _RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.))

    def forward(self, x):
        b, n, d = x.shape
        w = self.qkv(x).reshape(b, n, self.heads, d // self.heads)
        dots = torch.einsum("bihd,bjhd->bhij", w, w) / math.sqrt(d // self.heads)
        out = torch.einsum("bhij,bjhd->bihd", dots.softmax(-1), w).reshape(b, n, d)
        return self.to_out(out)


class _RefISTA(nn.Module):
    def __init__(self, dim, eta=0.1, lambd=0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.eta, self.lambd = eta, lambd

    def forward(self, x):
        D = self.weight  # D x = x @ D^T in row-vector form
        Dx = x @ D.T
        return torch.relu(x + self.eta * (x @ D - Dx @ D) - self.eta * self.lambd)


class _RefTransformer(nn.Module):
    def __init__(self, dim, depth, heads):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_PreNorm(dim, _RefAttention(dim, heads)), _PreNorm(dim, _RefISTA(dim))])
            for _ in range(depth))

    def forward(self, x):
        for attn, ff in self.layers:
            x = ff(attn(x) + x)  # no residual around the ISTA step
        return x


class RefCRATE(nn.Module):
    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, channels=3):
        super().__init__()
        patch_dim = channels * patch_size * patch_size
        n = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Sequential(
            _Patchify(patch_size), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = _RefTransformer(dim, depth, heads)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.to_patch_embedding(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        return self.mlp_head(self.transformer(x)[:, 0])


SMALL = dict(image_size=32, patch_size=8, num_classes=7, dim=64, depth=3, heads=4)


def _small_pair():
    ref = RefCRATE(**SMALL)
    with torch.no_grad():  # make every LayerNorm affine and bias matter
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1. if name.endswith("weight") else 0.))
    model = timm.create_model("crate_demo_patch8_64", img_size=32, embed_dim=64, depth=3, num_heads=4,
                              num_classes=7)
    return ref.eval(), model.eval()


def _hand_mapping(depth):
    m = {
        "to_patch_embedding.1.weight": "patch_embed.norm_in.weight",
        "to_patch_embedding.1.bias": "patch_embed.norm_in.bias",
        "to_patch_embedding.2.weight": "patch_embed.proj.weight",
        "to_patch_embedding.2.bias": "patch_embed.proj.bias",
        "to_patch_embedding.3.weight": "patch_embed.norm.weight",
        "to_patch_embedding.3.bias": "patch_embed.norm.bias",
        "pos_embedding": "pos_embed",
        "cls_token": "cls_token",
        "mlp_head.0.weight": "norm.weight",
        "mlp_head.0.bias": "norm.bias",
        "mlp_head.1.weight": "head.weight",
        "mlp_head.1.bias": "head.bias",
    }
    for i in range(depth):
        t, b = f"transformer.layers.{i}", f"blocks.{i}"
        m.update({
            f"{t}.0.norm.weight": f"{b}.norm1.weight", f"{t}.0.norm.bias": f"{b}.norm1.bias",
            f"{t}.0.fn.qkv.weight": f"{b}.attn.qkv.weight",
            f"{t}.0.fn.to_out.0.weight": f"{b}.attn.proj.weight", f"{t}.0.fn.to_out.0.bias": f"{b}.attn.proj.bias",
            f"{t}.1.norm.weight": f"{b}.norm2.weight", f"{t}.1.norm.bias": f"{b}.norm2.bias",
            f"{t}.1.fn.weight": f"{b}.mlp.weight",
        })
    return m


def test_forward_matches_hand_written_reference():
    ref, model = _small_pair()
    ref_sd = ref.state_dict()
    mapping = _hand_mapping(SMALL["depth"])
    assert set(mapping) == set(ref_sd)
    assert set(mapping.values()) == set(model.state_dict())  # nothing left out on either side
    model.load_state_dict({mapping[k]: v for k, v in ref_sd.items()})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, out = ref(x), model(x)
    assert out.shape == (3, 7)
    assert (out - expected).abs().max() < 1e-5 * max(1., expected.abs().max().item())
    assert rel_err(out, expected) < 1e-6


def test_official_checkpoint_loads_through_timm(tmp_path):
    ref, _ = _small_pair()
    # The official training script saves {'state_dict': DDP-wrapped model.state_dict(), ...}.
    ckpt = {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 1}
    torch.save(ckpt, tmp_path / "crate.pth.tar")
    # num_classes in the overlay: timm drops the head when it differs from the checkpoint's cfg.
    model = timm.create_model("crate_demo_patch8_64", img_size=32, embed_dim=64, depth=3, num_heads=4,
                              num_classes=7, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "crate.pth.tar"), num_classes=7)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-6
    # timm-named state dicts pass through the filter unchanged.
    sd = model.state_dict()
    assert checkpoint_filter_fn(sd, model).keys() == sd.keys()


def test_official_checkpoint_at_another_resolution():
    ref, _ = _small_pair()
    model = timm.create_model("crate_demo_patch8_64", img_size=48, embed_dim=64, depth=3, num_heads=4,
                              num_classes=7)
    model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model))
    assert model.pos_embed.shape == (1, 37, 64)
    assert torch.equal(model.pos_embed[0, 0], ref.pos_embedding[0, 0])


def test_ista_against_numpy():
    m = ISTA(16, eta=0.3, lmbda=0.05)
    x = torch.randn(2, 5, 16)
    W = m.weight.detach().numpy().astype(np.float64)
    xn = x.numpy().astype(np.float64)
    x1 = xn @ W.T  # F.linear(x, W)
    grad_1 = x1 @ W  # F.linear(x1, W.t())
    grad_2 = xn @ W  # F.linear(x, W.t())
    expected = np.maximum(xn + 0.3 * (grad_2 - grad_1) - 0.3 * 0.05, 0.)
    out = m(x).detach().numpy()
    assert np.abs(out - expected).max() < 1e-5
    assert (out == 0).any() and (out > 0).any()
    assert m.weight.shape == (16, 16) and ISTA(16, 16).weight.shape == (16, 16)
    bound = math.sqrt(6 / 16)  # kaiming-uniform, fan_in 16
    assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound
    with pytest.raises(ValueError, match="square"):
        ISTA(16, 64)


def test_block_has_no_residual_around_ista():
    blk = timm.create_model("crate_demo_patch8_64").blocks[0]
    assert isinstance(blk, CrateBlock) and not blk.mlp_residual
    x = torch.randn(2, 5, 128)
    z = x + blk.attn(blk.norm1(x))
    assert torch.allclose(blk(x), blk.mlp(blk.norm2(z)), atol=1e-6)


# The official CRATE_tiny/small/base/large: (width, depth, heads).
OFFICIAL = {"tiny": (384, 12, 6), "small": (576, 12, 12), "base": (768, 12, 12), "large": (1024, 24, 16),
            "demo": (128, 4, 4)}


@pytest.mark.parametrize("name", list_crate_models())
def test_every_registered_crate_builds(name):
    model = timm.create_model(name, num_classes=5).eval()
    size = name.split("_")[1]
    width, depth, heads = OFFICIAL[size]
    assert isinstance(model, Crate)
    assert model.embed_dim == width and len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["classifier"] == "head" and cfg["first_conv"] == "patch_embed.proj" and cfg["num_classes"] == 1000
    assert not cfg.get("url") and not cfg.get("hf_hub_id")
    res = model.patch_embed.img_size[0] if width <= 576 else 32  # the wide ones at a reduced input size
    if res != model.patch_embed.img_size[0]:
        model.set_input_size(res)
    with torch.no_grad():
        y = model(torch.randn(1, 3, res, res))
    assert y.shape == (1, 5) and torch.isfinite(y).all()


def test_crate_base_parameter_count():
    d, depth, p, n_cls = 768, 12, 16, 1000
    patch_dim = 3 * p * p
    tokens = (224 // p) ** 2 + 1
    embed = 2 * patch_dim + (patch_dim * d + d) + 2 * d  # LN, Linear, LN
    block = 2 * d + d * d + (d * d + d) + 2 * d + d * d  # norm1, qkv, to_out, norm2, ISTA
    expected = embed + d + tokens * d + depth * block + 2 * d + d * n_cls + n_cls
    model = timm.create_model("crate_base_patch16_224")
    assert sum(p.numel() for p in model.parameters()) == expected == 22_796_008
    ref = RefCRATE(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12)
    assert sum(p.numel() for p in ref.parameters()) == expected


def test_demo_with_ten_classes():
    model = timm.create_model("crate_demo_patch8_64", num_classes=10)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_one_step_trains_through_ista():
    model = timm.create_model("crate_demo_patch8_64", num_classes=10, img_size=32)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss0 = F.cross_entropy(model(x), y)
    loss0.backward()
    for blk in model.blocks:
        assert blk.mlp.weight.grad is not None and blk.mlp.weight.grad.abs().sum() > 0
    before = model.blocks[0].mlp.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.blocks[0].mlp.weight)
    with torch.no_grad():
        loss1 = F.cross_entropy(model(x), y)
    assert abs(loss1.item() - loss0.item()) > 1e-6 and loss1 < loss0


def test_default_init_is_the_originals():
    m = timm.create_model("crate_tiny_patch16_224")
    assert 0.9 < m.pos_embed.std() < 1.1 and 0.8 < m.cls_token.std() < 1.2  # torch.randn
    qkv = m.blocks[0].attn.qkv.weight  # nn.Linear default: uniform(+-1/sqrt(fan_in))
    assert qkv.abs().max() <= 1 / math.sqrt(384) and qkv.abs().max() > 0.95 / math.sqrt(384)
    assert torch.equal(m.blocks[0].norm1.weight, torch.ones(384)) and m.blocks[0].norm1.eps == 1e-5
    ista = m.blocks[0].mlp.weight
    assert ista.abs().max() <= math.sqrt(6 / 384) and ista.abs().max() > 0.95 * math.sqrt(6 / 384)
    t = timm.create_model("crate_tiny_patch16_224", weight_init="")  # timm's
    assert t.pos_embed.std() < 0.03 and t.blocks[0].mlp.weight.abs().max() > 0.95 * math.sqrt(6 / 384)


def test_timm_features():
    m = timm.create_model("crate_demo_patch8_64", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    final, inter = m.forward_intermediates(x, indices=2)
    assert len(inter) == 2 and inter[0].shape == (1, 128, 8, 8) and final.shape == (1, 65, 128)
    with torch.no_grad():
        assert torch.allclose(m.forward_head(final), m(x), atol=1e-6)
    feats = timm.create_model("crate_demo_patch8_64", features_only=True, out_indices=(1, 3))(x)
    assert [f.shape for f in feats] == [(1, 128, 8, 8)] * 2
    dyn = timm.create_model("crate_demo_patch8_64", dynamic_img_size=True, num_classes=3)
    assert dyn(torch.randn(1, 3, 48, 80)).shape == (1, 3)
    m.set_input_size(32)
    assert m.pos_embed.shape == (1, 17, 128) and m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="patch size"):
        m.set_input_size(patch_size=4)


def test_gradient_checkpointing_same_gradients():
    m = timm.create_model("crate_demo_patch8_64", num_classes=3, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    g = m.blocks[1].mlp.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    assert torch.allclose(g, m.blocks[1].mlp.weight.grad, atol=1e-6)


# --------------------------------------------------------------------------------------
# The ablation ladder
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", list(ABLATION_LADDER))
def test_ablation_ladder_steps_build_and_run(step):
    m = timm.create_model("crate_demo_patch8_64", num_classes=4, **ABLATION_LADDER[step])
    blk = m.blocks[0]
    if step == "crate":
        assert isinstance(blk.mlp, ISTA)
    else:
        assert isinstance(blk.mlp, crate_alpha.ODL) and blk.mlp.D.shape == (128, 512)
    assert blk.mlp_residual == (step in ("residual", "crate_alpha"))
    x = torch.randn(2, 5, 128)
    z = x + blk.attn(blk.norm1(x))
    expected = z + blk.mlp(blk.norm2(z)) if blk.mlp_residual else blk.mlp(blk.norm2(z))
    assert torch.allclose(blk(x), expected, atol=1e-6)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_ladder_top_is_crate_alpha():
    alpha = timm.create_model("crate_alpha_demo_patch8_64", num_classes=6).eval()
    top = timm.create_model("crate_demo_patch8_64", num_classes=6, **ABLATION_LADDER["crate_alpha"]).eval()
    assert isinstance(alpha, CrateAlpha)
    a_sd, t_sd = alpha.state_dict(), top.state_dict()
    assert {k: v.shape for k, v in a_sd.items()} == {k: v.shape for k, v in t_sd.items()}
    top.load_state_dict(a_sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(top(x), alpha(x))
    # and the same initialisation scheme: MSSA normal(0.02), kaiming D, timm's tiny class token
    fresh = timm.create_model("crate_demo_patch8_64", **ABLATION_LADDER["crate_alpha"])
    assert abs(fresh.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.003
    assert fresh.cls_token.abs().max() < 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="mlp"):
        Crate(embed_dim=64, depth=1, num_heads=4, img_size=32, patch_size=8, mlp="swiglu")
    with pytest.raises(ValueError, match="fixes mlp_layer"):
        Crate(embed_dim=64, depth=1, num_heads=4, img_size=32, patch_size=8, mlp_layer=nn.Identity)
    with pytest.raises(ValueError, match="divisible"):
        timm.create_model("crate_demo_patch8_64", num_heads=3)
