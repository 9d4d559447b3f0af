"""crate_alpha.whitebox.interpret: the forward walker, the graph cut, the objectives, on tiny models and synthetic data."""
import math

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import crate_alpha
from crate_alpha.whitebox import interpret
from crate_alpha.convert import convert_official_torch
from crate_alpha.whitebox.interpret import BlockTrace, Trace

TINY = "crate_alpha_custom.w32_d2_h2_patch8_32"  # a shape name: registered on demand


@pytest.fixture
def tiny():
    return timm.create_model(TINY).eval()


def _images(b=2, size=32):
    return torch.randn(b, 3, size, size)


# --------------------------------------------------------------------------------------
# Graph cut on synthetic features
# --------------------------------------------------------------------------------------

def _blob_features(grid, regions, noise=0.01, seed=0):
    """Patch features: region r (a bool grid) gets basis vector r+1, the rest basis vector 0, plus noise."""
    gen = np.random.default_rng(seed)
    gh, gw = grid
    dim = len(regions) + 1
    f = np.zeros((gh, gw, dim))
    f[..., 0] = 1
    for r, region in enumerate(regions):
        f[region] = 0
        f[region, r + 1] = 1
    return (f + noise * gen.standard_normal(f.shape)).reshape(gh * gw, dim)


def _square(grid, rows, cols):
    m = np.zeros(grid, dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_ncut_finds_the_square():
    grid = (8, 8)
    square = _square(grid, (2, 5), (3, 6))
    feats = _blob_features(grid, [square])
    mask, vec = interpret.ncut_bipartition(feats, grid, tau=0.15)
    assert mask.dtype == bool and mask.shape == grid
    assert np.array_equal(mask, square)
    assert (vec[square] > 0).all() and (vec[~square] <= 0).all()  # signed: foreground side positive
    # the same cut from the affinity itself (cosine similarities) or from torch features
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    assert np.array_equal(interpret.ncut_bipartition(unit @ unit.T, grid, 0.15, affinity=True)[0], square)
    assert np.array_equal(interpret.ncut_bipartition(torch.from_numpy(feats).float(), grid, 0.15)[0], square)


def _raw_fiedler(feats, tau=0.15, eps=1e-5):
    """The second generalised eigenvector, computed independently through D^-1/2 (L_sym)."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    A = np.where(unit @ unit.T > tau, 1.0, eps)
    d = A.sum(1)
    lsym = np.eye(len(d)) - A / np.sqrt(d[:, None] * d[None, :])
    _, u = np.linalg.eigh(lsym)
    return u[:, 1] / np.sqrt(d)


def test_ncut_corner_rule_flips_a_frame_to_the_object(monkeypatch):
    """A large object (6x6 of 8x8) framed by background: the frame has the smaller volume, so the
    eigenvector's largest |v| (the seed) lies on the frame; the frame holds all 4 corners and is flipped."""
    grid = (8, 8)
    square = _square(grid, (1, 7), (1, 7))
    feats = _blob_features(grid, [square])
    v = _raw_fiedler(feats)
    assert not square.reshape(-1)[np.argmax(np.abs(v))]  # the seed lies in the background frame
    mask, _ = interpret.ncut_bipartition(feats, grid, tau=0.15)
    assert np.array_equal(mask, square)
    # without the corner rule the salient-patch rule alone would return the frame
    monkeypatch.setattr(interpret, "CORNER_FLIP", 5)
    assert np.array_equal(interpret.ncut_bipartition(feats, grid, tau=0.15)[0], ~square)


def test_ncut_keeps_the_seed_component_only():
    """Two separate blobs of the same kind: one cut puts both on one side; only the seed's component is kept."""
    grid = (10, 10)
    a, b = _square(grid, (1, 3), (1, 3)), _square(grid, (5, 9), (4, 8))
    feats = _blob_features(grid, [a | b])
    mask, _ = interpret.ncut_bipartition(feats, grid, tau=0.15)
    assert np.array_equal(mask, a) or np.array_equal(mask, b)


def test_maskcut_from_features_finds_both_objects():
    grid = (10, 10)
    a, b = _square(grid, (1, 4), (1, 4)), _square(grid, (6, 9), (5, 9))
    feats = _blob_features(grid, [a, b])
    masks = interpret.maskcut_from_features(feats, grid, num_masks=2, tau=0.15).numpy()
    assert masks.shape == (2, 10, 10) and masks.dtype == bool
    assert not (masks[0] & masks[1]).any()
    assert {masks[0].tobytes(), masks[1].tobytes()} == {a.tobytes(), b.tobytes()}


def test_maskcut_from_features_excluded_patches_and_degenerate_graphs():
    grid = (4, 4)
    # all patches alike: a complete graph has nothing to cut worth keeping after the first mask
    masks = interpret.maskcut_from_features(np.ones((16, 3)), grid, num_masks=3)
    assert masks.shape == (3, 4, 4)
    # everything excluded: an empty mask, no error
    mask, vec = interpret.ncut_bipartition(np.eye(16), grid, exclude=np.ones(grid, bool))
    assert not mask.any() and not vec.any()
    with pytest.raises(ValueError):
        interpret.ncut_bipartition(np.ones((15, 3)), grid)


# --------------------------------------------------------------------------------------
# The objectives
# --------------------------------------------------------------------------------------

def _rate_by_gram(x, weight, heads, key_offset=0, eps=0.01):
    """Σ_k ½ Σ log(1 + p/(Nε) λ(W_k W_k^T)) from the N x N Gram matrix, per image."""
    B, N, d = x.shape
    p = d // heads
    rates = torch.zeros(B, dtype=torch.float64)
    for k in range(heads):
        U = weight[key_offset + k * p: key_offset + (k + 1) * p].double().T  # (d, p)
        W = F.normalize(x.double() @ U, dim=-1)
        lam = torch.linalg.eigvalsh(W @ W.transpose(1, 2)).clamp_min(0)
        rates += 0.5 * torch.log1p(p / (N * eps) * lam).sum(dim=1)
    return rates


def test_coding_rate_equals_the_gram_form(tiny):
    x = _images(3)
    tr = interpret.trace(tiny, x, with_attention=False)
    rows = interpret.layer_diagnostics(tiny, x)
    assert [r["layer"] for r in rows] == [1, 2]
    for blk, rec, row in zip(tiny.blocks, tr.blocks, rows):
        ref = _rate_by_gram(rec.attn_in, blk.attn.qkv.weight.detach(), heads=2).mean().item()
        assert row["coding_rate"] == pytest.approx(ref, rel=1e-6)


def test_coding_rate_of_a_vit_uses_the_keys():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    x = _images(2, 64)
    tr = interpret.trace(vit, x, with_attention=False)
    rows = interpret.layer_diagnostics(vit, x)
    for blk, rec, row in zip(vit.blocks, tr.blocks, rows):
        ref = _rate_by_gram(rec.attn_in, blk.attn.qkv.weight.detach(), heads=3, key_offset=192).mean().item()
        assert row["coding_rate"] == pytest.approx(ref, rel=1e-6)
        assert row["recon_error"] is None and 0 <= row["sparsity"] <= 1


def _odl_by_hand(x, D, eta=0.1, lmbda=0.1):
    z1 = np.maximum(eta * x @ D - eta * lmbda, 0)
    z2 = np.maximum(z1 - eta * (z1 @ D.T - x) @ D - eta * lmbda, 0)
    sparsity = (z2 == 0).reshape(len(x), -1).mean(axis=1)
    err = (z2 @ D.T - x).reshape(len(x), -1)
    recon = np.linalg.norm(err, axis=1) / np.linalg.norm(x.reshape(len(x), -1), axis=1)
    return z2, sparsity, recon


def _identity_dictionary(d, k, scale=1.0):
    D = torch.zeros(d, k)
    D[:, :d] = scale * torch.eye(d)
    return D


def test_sparsity_and_recon_of_a_hand_built_odl():
    odl = crate_alpha.ODL(8, 32)
    with torch.no_grad():
        odl.D.copy_(_identity_dictionary(8, 32))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    z2_np, sp_np, rec_np = _odl_by_hand(x.numpy(), odl.D.detach().double().numpy())
    odl = odl.double()
    z2 = interpret.sparse_code(odl, x)
    np.testing.assert_allclose(z2.numpy(), z2_np, rtol=1e-12, atol=1e-14)
    assert z2[..., 8:].eq(0).all()  # atoms the identity block does not use are never active
    np.testing.assert_allclose(interpret.code_sparsity(z2).numpy(), sp_np)
    np.testing.assert_allclose(interpret.dictionary_error(odl, x, z2).numpy(), rec_np, rtol=1e-12)
    assert (sp_np >= 0.75).all()


def test_layer_diagnostics_on_a_model_with_known_dictionaries(tiny):
    with torch.no_grad():
        for i, blk in enumerate(tiny.blocks):
            blk.mlp.D.copy_(_identity_dictionary(32, 128, scale=1.0 + i))
    x = _images(2)
    tr = interpret.trace(tiny, x, with_attention=False)
    rows = interpret.layer_diagnostics(tiny, x)
    for blk, rec, row in zip(tiny.blocks, tr.blocks, rows):
        xin = rec.mlp_in.double().numpy()
        z2, sp, recon = _odl_by_hand(xin, blk.mlp.D.detach().double().numpy())
        np.testing.assert_allclose(rec.code.numpy(), z2, rtol=1e-4, atol=1e-6)
        # the recorded code is what the block decodes: D1 z2 is the module's own output
        torch.testing.assert_close(F.linear(rec.code, blk.mlp.D1.detach()), blk.mlp(rec.mlp_in), rtol=1e-5, atol=1e-6)
        assert row["sparsity"] == pytest.approx(sp.mean(), abs=1e-3)
        assert row["recon_error"] == pytest.approx(recon.mean(), rel=1e-5)


# --------------------------------------------------------------------------------------
# A new operator: interpret asks the layer, so nothing in interpret names it
# --------------------------------------------------------------------------------------

class _GatedSubspaces(nn.Module):
    """A new attention operator (token statistics, no N x N attention, as ToST's TSSA): per-head
    projections U_k^T z, each token weighted by a softmax over the tokens of its energy in the head."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.U = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def subspace_features(self, x):
        B, N, _ = x.shape
        return self.U(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, attn_mask=None, is_causal=False):
        w = self.subspace_features(x)
        gate = w.pow(2).mean(-1, keepdim=True).softmax(dim=2)
        return self.out((gate * w * w.shape[2]).transpose(1, 2).flatten(2))


class _SubspaceAttention(_GatedSubspaces):
    """The same operator with N x N attention, which it says through attention_map."""

    def attention_map(self, x):
        w = self.subspace_features(x)
        return (w @ w.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(dim=-1)

    def forward(self, x, attn_mask=None, is_causal=False):
        return self.out((self.attention_map(x) @ self.subspace_features(x)).transpose(1, 2).flatten(2))


class _Threshold(nn.Module):
    """A new sparse-coding operator: one non-negative soft threshold of x A, decoded by A."""

    def __init__(self, dim, atoms, threshold=0.3):
        super().__init__()
        self.atoms = nn.Parameter(torch.randn(dim, atoms) / math.sqrt(dim))
        self.threshold = threshold

    def sparse_code(self, x):
        return F.relu(x @ self.atoms - self.threshold)

    def reconstruct(self, z):
        return z @ self.atoms.T

    def forward(self, x):
        return self.reconstruct(self.sparse_code(x))


def _with_new_operators(model, attention=_GatedSubspaces):
    for blk in model.blocks:
        blk.attn, blk.mlp = attention(32, 2), _Threshold(32, 96)
    return model.eval()


def test_a_new_operator_needs_no_change_in_interpret(tiny):
    model = _with_new_operators(tiny)
    x = _images(3)
    tr = interpret.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(tr.output, model.forward_features(x), rtol=0, atol=1e-5)
    rows = interpret.layer_diagnostics(model, x)
    assert [r["layer"] for r in rows] == [1, 2]
    for blk, rec, row in zip(model.blocks, tr.blocks, rows):
        assert rec.kind == "_threshold" and rec.attn is None  # no attention_map: none recorded
        torch.testing.assert_close(rec.features, blk.attn.subspace_features(rec.attn_in), rtol=0, atol=0)
        # the code, its sparsity and its reconstruction error, by hand from the operator's weights
        u, A = rec.mlp_in.double(), blk.mlp.atoms.detach().double()
        z = F.relu(u @ A - 0.3)
        torch.testing.assert_close(rec.code.double(), z, rtol=1e-5, atol=1e-6)
        assert row["sparsity"] == pytest.approx((rec.code == 0).double().mean().item())
        assert 0.05 < row["sparsity"] < 0.95
        err = (z @ A.T - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)
        assert row["recon_error"] == pytest.approx(err.mean().item(), rel=1e-5)
        ref = _rate_by_gram(rec.attn_in, blk.attn.U.weight.detach(), heads=2).mean().item()
        assert row["coding_rate"] == pytest.approx(ref, rel=1e-6)
    assert interpret.maskcut(model, x, num_masks=2).shape == (3, 2, 32, 32)
    assert interpret.pca_features(model, x)["rgb"].shape == (3, 4, 4, 3)
    # the class-token attention needs an attention map, which this operator does not have
    for f in (interpret.attention, interpret.coarse_segmentation):
        with pytest.raises(ValueError, match="attention_map"):
            f(model, x)


def test_a_new_operator_with_an_attention_map(tiny):
    model = _with_new_operators(tiny, attention=_SubspaceAttention)
    x = _images(2)
    att = interpret.attention(model, x)
    assert att.shape == (2, 2, 2, 4, 4)
    tr = interpret.trace(model, x)
    for blk, rec, rows in zip(model.blocks, tr.blocks, att.unbind(1)):
        with torch.no_grad():
            probs = blk.attn.attention_map(rec.attn_in)
        torch.testing.assert_close(rec.attn, probs)
        torch.testing.assert_close(rows, probs[:, :, 0, 1:].reshape(2, 2, 4, 4))
    assert interpret.coarse_segmentation(model, x).shape == (2, 32, 32)


def test_an_operator_outside_the_protocol_is_refused(tiny):
    tiny.blocks[1].attn = nn.Identity()  # neither subspace_features nor timm's Attention
    with pytest.raises(ValueError, match="block 1's attention Identity has no subspace_features"):
        interpret.encoder(tiny)
    with pytest.raises(ValueError, match="not a sparse-coding operator"):
        interpret.sparse_code(nn.Linear(4, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="no dictionary"):
        interpret.dictionary_error(nn.Linear(4, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4))


def test_the_operators_say_what_interpret_records(tiny):
    """CRATE-α's MSSA and ODL: the trace holds exactly what their methods compute."""
    x = _images(2)
    tr = interpret.trace(tiny, x)
    for blk, rec in zip(tiny.blocks, tr.blocks):
        with torch.no_grad():
            assert torch.equal(rec.features, blk.attn.subspace_features(rec.attn_in))
            assert torch.equal(rec.attn, blk.attn.attention_map(rec.attn_in))
            assert torch.equal(rec.code, blk.mlp.sparse_code(rec.mlp_in))
            assert torch.equal(interpret.sparse_code(blk.mlp, rec.mlp_in), rec.code)


@pytest.mark.parametrize("size", [64, 96])
def test_the_crate_module(size):
    """The original CRATE (crate_alpha.models.crate): its non-convolutional patch embedding, ISTA blocks, any size."""
    crate = pytest.importorskip("crate_alpha.models.crate")
    model = timm.create_model("crate_demo_patch8_64", depth=2).eval()
    assert isinstance(model, crate.Crate)
    x = _images(2, size)
    tr = interpret.trace(model, x)
    dyn = timm.create_model("crate_demo_patch8_64", depth=2, dynamic_img_size=True).eval()
    dyn.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(tr.output, dyn.forward_features(x), rtol=0, atol=1e-5)
        if size == 64:
            torch.testing.assert_close(tr.output, model.forward_features(x), rtol=0, atol=1e-5)
    assert all(b.kind == "ista" for b in tr.blocks) and tr.grid == (size // 8, size // 8)
    for blk, rec, row in zip(model.blocks, tr.blocks, interpret.layer_diagnostics(model, x)):
        torch.testing.assert_close(rec.code, rec.out)
        z, u = rec.code.double(), rec.mlp_in.double()
        ref = (F.linear(z, blk.mlp.weight.double()) - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)
        assert row["recon_error"] == pytest.approx(ref.mean().item(), rel=1e-6)
        assert math.isfinite(row["coding_rate"]) and 0 <= row["sparsity"] <= 1
    assert interpret.maskcut(model, x, num_masks=2).shape == (2, 2, size, size)


# --------------------------------------------------------------------------------------
# The walker
# --------------------------------------------------------------------------------------

def test_trace_reproduces_forward_features_and_attention(tiny):
    x = _images(2)
    tr = interpret.trace(tiny, x)
    with torch.no_grad():
        torch.testing.assert_close(tr.output, tiny.forward_features(x), rtol=0, atol=1e-5)
    assert tr.grid == (4, 4) and tr.num_prefix_tokens == 1 and tr.class_token
    for blk, rec in zip(tiny.blocks, tr.blocks):
        assert rec.attn.shape == (2, 2, 17, 17) and rec.features.shape == (2, 2, 17, 16)
        torch.testing.assert_close(rec.attn.sum(-1), torch.ones(2, 2, 17))
        # the recorded attention is the one MSSA applies: proj(A (xU)) is the branch's output
        mixed = (rec.attn @ rec.features).transpose(1, 2).reshape(2, 17, 32)
        torch.testing.assert_close(blk.attn.proj(mixed), rec.attn_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.blocks[1].x, tr.blocks[0].out)


def test_trace_at_another_size_matches_timm_dynamic_size(tiny):
    x = _images(2, 48)
    tr = interpret.trace(tiny, x)
    assert tr.grid == (6, 6) and tr.output.shape == (2, 37, 32)
    dyn = timm.create_model(TINY, dynamic_img_size=True).eval()
    dyn.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(tr.output, dyn.forward_features(x), rtol=0, atol=1e-5)
    assert interpret.attention(tiny, x).shape == (2, 2, 2, 6, 6)
    assert interpret.maskcut(tiny, x, num_masks=2).shape == (2, 2, 48, 48)
    wide = interpret.trace(tiny, torch.randn(1, 3, 32, 56))  # not square either
    assert wide.grid == (4, 7)
    with pytest.raises(ValueError, match="multiple of the patch"):
        interpret.trace(tiny, _images(1, 36))


def test_sincos_position_embedding_is_regenerated_at_another_size():
    model = timm.create_model(TINY, pos_embed="sincos").eval()
    x = _images(1, 48)
    tr = interpret.trace(model, x)
    big = timm.create_model(TINY, pos_embed="sincos").eval()
    big.load_state_dict(model.state_dict())
    big.set_input_size(img_size=48)  # CrateAlpha regenerates sin-cos at the new grid
    with torch.no_grad():
        torch.testing.assert_close(tr.output, big.forward_features(x), rtol=0, atol=1e-5)
    assert model.patch_embed.grid_size == (4, 4)  # the traced model is left as it was


def test_trace_records_only_the_asked_layers(tiny):
    tr = interpret.trace(tiny, _images(1), layers=[-1], with_attention=False)
    assert tr.blocks[0] is None and tr.blocks[1].attn is None and tr.blocks[1].code is not None
    with pytest.raises(ValueError):
        interpret.trace(tiny, _images(1), layers=[2])


def test_open_clip_model_and_tower():
    clip = open_clip.create_model("crate-alpha-demo").eval()
    x = _images(1, 64)
    assert interpret.encoder(clip) is clip.visual.trunk and interpret.encoder(clip.visual) is clip.visual.trunk
    att = interpret.attention(clip, x)
    assert att.shape == (1, 4, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(interpret.trace(clip, x).output, clip.visual.trunk.forward_features(x),
                                   rtol=0, atol=1e-5)
    assert type(interpret.encoder("crate-alpha-demo")).__name__ == "CrateAlpha"


def test_vit_with_and_without_class_token():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    x = _images(2, 64)
    tr = interpret.trace(vit, x)
    with torch.no_grad():
        torch.testing.assert_close(tr.output, vit.forward_features(x), rtol=0, atol=1e-5)
    att = interpret.attention(vit, x)
    assert att.shape == (2, 2, 3, 4, 4) and (att.sum((-1, -2)) <= 1 + 1e-6).all()
    assert interpret.maskcut(vit, x).shape == (2, 3, 64, 64)
    assert interpret.coarse_segmentation(vit, x).shape == (2, 64, 64)
    # no class token: the mean over queries, which sums to one over the patches
    gap = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, class_token=False,
                            global_pool="avg").eval()
    att = interpret.attention(gap, x)
    assert att.shape == (2, 2, 3, 4, 4)
    torch.testing.assert_close(att.sum((-1, -2)), torch.ones(2, 2, 3))


def test_encoder_resolves_names_and_refuses_the_rest(tiny, tmp_path):
    enc = interpret.encoder("crate_alpha_demo_patch8_64")
    assert type(enc).__name__ == "CrateAlpha" and not enc.training
    tiny.train()
    assert interpret.encoder(tiny) is tiny and not tiny.training
    for bad in ("no_such_model_anywhere", str(tmp_path), f"local-dir:{tmp_path / 'missing'}", nn.Linear(2, 2), 3):
        with pytest.raises(ValueError):
            interpret.encoder(bad)


# --------------------------------------------------------------------------------------
# Pictures: shapes, ranges and the rules on controlled features
# --------------------------------------------------------------------------------------

def test_picture_shapes(tiny):
    x = _images(2)
    masks = interpret.maskcut(tiny, x, num_masks=3)
    assert masks.dtype == torch.bool and masks.shape == (2, 3, 32, 32)
    assert not (masks[:, 0] & masks[:, 1]).any()  # later masks never reuse earlier patches
    seg = interpret.coarse_segmentation(tiny, x, keep=0.6)
    assert seg.dtype == torch.bool and seg.shape == (2, 32, 32) and seg.any()
    pca = interpret.pca_features(tiny, x)
    assert pca["rgb"].shape == (2, 4, 4, 3) and pca["rgb"].dtype == torch.float32
    assert pca["rgb"].min() >= 0 and pca["rgb"].max() <= 1
    for c in range(3):
        assert pca["rgb"][..., c].min() == 0 and pca["rgb"][..., c].max() == 1
    assert pca["foreground"].shape == (2, 4, 4) and pca["foreground"].dtype == torch.bool


def _fake_trace(out=None, attn=None, grid=(8, 8), depth=2):
    n = grid[0] * grid[1] + 1
    blank = torch.zeros(1, n, 4)
    rec = BlockTrace(x=blank, attn_in=blank, features=torch.zeros(1, 1, n, 4), attn=attn, attn_out=blank,
                     mlp_in=blank, code=None, kind="mlp", out=blank if out is None else out)
    return Trace(blocks=[rec] * depth, output=rec.out, grid=grid, num_prefix_tokens=1, class_token=True)


@pytest.mark.parametrize("rows,cols", [((3, 5), (2, 5)), ((1, 7), (1, 7))])
def test_pca_foreground_is_the_side_off_the_border(monkeypatch, tiny, rows, cols):
    """A small object, and one larger than the background but not touching the border."""
    grid = (8, 8)
    obj = torch.from_numpy(_square(grid, rows, cols))
    feats = torch.randn(*grid, 4) * 0.01
    feats[obj, 0] += 3.0
    out = torch.cat([torch.zeros(1, 4), feats.reshape(-1, 4)])[None]
    for sign in (1, -1):  # either sign of the features: the eigenvector's sign must not matter
        monkeypatch.setattr(interpret, "trace", lambda *a, **k: _fake_trace(out=sign * out))
        pca = interpret.pca_features(tiny, _images(1, 64))
        assert torch.equal(pca["foreground"][0], obj)
        assert pca["rgb"][0][obj][:, 0].min() > pca["rgb"][0][~obj][:, 0].max()  # the object is red


def test_keep_mass_rule():
    w = torch.tensor([[0.1, 0.5, 0.1, 0.3]])
    assert interpret._keep_mass(w, 0.6).tolist() == [[False, True, False, True]]
    assert interpret._keep_mass(w, 0.5).tolist() == [[False, True, False, False]]
    assert interpret._keep_mass(w * 7, 1.0).all()


def test_coarse_segmentation_merges_heads(monkeypatch, tiny):
    grid = (4, 4)
    n = 17
    obj = torch.zeros(grid, dtype=torch.bool)
    obj[1:3, 1:3] = True
    corner = torch.zeros(grid, dtype=torch.bool)
    corner[0, 0] = True
    attn = torch.full((1, 3, n, n), 1e-4)
    for h, region in enumerate([obj, obj, corner]):  # two heads on the object, one on a corner
        attn[0, h, 0, 1:] += region.flatten().float()
    attn = attn / attn.sum(-1, keepdim=True)
    monkeypatch.setattr(interpret, "trace", lambda *a, **k: _fake_trace(attn=attn, grid=grid))
    x = _images(1, 32)
    # each object patch holds a quarter of its head's mass: keeping 90% needs all four
    big = obj.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(interpret.coarse_segmentation(tiny, x, keep=0.9)[0], big)
    both = (obj | corner).repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(interpret.coarse_segmentation(tiny, x, keep=0.9, merge="union")[0], both)


# --------------------------------------------------------------------------------------
# The converted official classifier
# --------------------------------------------------------------------------------------

def test_official_fixture_diagnostics(fixtures, tmp_path):
    d = fixtures / "official_torch"
    io = torch.load(d / "crate_alpha_cls_shared.io.pt", weights_only=True)
    out = tmp_path / "cls"
    convert_official_torch(d / "crate_alpha_cls_shared.pth", out, heads=4)
    enc = interpret.encoder(f"local-dir:{out}")
    assert torch.equal(interpret.encoder(str(out)).blocks[0].mlp.D, enc.blocks[0].mlp.D)  # weights loaded
    images = io["images"]
    tr = interpret.trace(enc, images)
    with torch.no_grad():
        pre = enc.forward_head(tr.output, pre_logits=True)
    assert ((pre - io["pre_logits"]).norm() / io["pre_logits"].norm()).item() <= 1e-4
    rows = interpret.layer_diagnostics(enc, images)
    assert [r["layer"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["coding_rate"]) and r["coding_rate"] > 0
        assert 0 < r["sparsity"] <= 1
        assert math.isfinite(r["recon_error"]) and r["recon_error"] > 0


def test_open_clip_folder_resolves_to_its_trunk(fixtures, tmp_path):
    d = fixtures / "official_torch"
    out = tmp_path / "clip"
    convert_official_torch(d / "crate_alpha_clipa_shared.pth", out, heads=4, text_heads=2)
    sd = torch.load(d / "crate_alpha_clipa_shared.pth", weights_only=True)
    for spec in (f"local-dir:{out}", str(out), out):
        enc = interpret.encoder(spec)
        assert type(enc).__name__ == "CrateAlpha" and not enc.training
        assert torch.equal(enc.patch_embed.proj.weight, sd["visual.conv1.weight"])  # the folder's weights
    assert interpret.attention(enc, _images(1, 32)).shape == (1, 2, 4, 4, 4)
