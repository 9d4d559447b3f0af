"""crate_alpha.models.layers: the operators say what they compute, one position-grid resampling for
both models, and the official layouts mapped in the model layer as the converters map them."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import crate_alpha
from crate_alpha.convert import official_torch
from crate_alpha.models import crate as crate_module
from crate_alpha.models import crate_alpha as crate_alpha_module
from crate_alpha.models import layers
from crate_alpha.models.official_layout import classifier_state, clipa_trunk_state


def test_the_operators_are_one_set_of_classes():
    for name in ("MSSA", "ODL", "sincos_2d_pos_embed"):
        assert getattr(crate_alpha, name) is getattr(layers, name) is getattr(crate_alpha_module, name)
    assert crate_alpha.ISTA is layers.ISTA is crate_module.ISTA
    assert issubclass(layers.ODL, layers.SparseCodingLayer) and issubclass(layers.ISTA, layers.SparseCodingLayer)


def test_odl_sparse_code_is_what_its_forward_decodes():
    odl = layers.ODL(8, 32, eta=0.2, lmbda=0.05).eval()
    x = torch.randn(2, 5, 8)
    z = odl.sparse_code(x)
    assert z.shape == (2, 5, 32) and (z >= 0).all() and (z == 0).any()
    assert torch.equal(odl(x), F.linear(z, odl.D1))  # the same ops as forward: bit for bit
    D, xn = odl.D.detach().double().numpy(), x.double().numpy()
    z1 = np.maximum(0.2 * xn @ D - 0.01, 0)
    z2 = np.maximum(z1 - 0.2 * (z1 @ D.T - xn) @ D - 0.01, 0)
    np.testing.assert_allclose(z.detach().numpy(), z2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(odl.reconstruct(z), z @ odl.D.T)  # decoded by D, not D1


def test_ista_output_is_its_sparse_code():
    ista = layers.ISTA(16, eta=0.3, lmbda=0.05).eval()
    x = torch.randn(2, 5, 16)
    assert torch.equal(ista(x), ista.sparse_code(x))
    W, xn = ista.weight.detach().double().numpy(), x.double().numpy()
    z = np.maximum(xn + 0.3 * (xn @ W - (xn @ W.T) @ W) - 0.3 * 0.05, 0)
    np.testing.assert_allclose(ista.sparse_code(x).detach().numpy(), z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ista.reconstruct(torch.from_numpy(z).float()), torch.from_numpy(z @ W.T).float())


def test_mssa_subspace_features_and_attention_map_are_its_forward():
    mssa = layers.MSSA(32, num_heads=4).eval()
    x = torch.randn(2, 7, 32)
    w = mssa.subspace_features(x)
    assert w.shape == (2, 4, 7, 8)
    # head k's slice of the shared projection: U_k^T z
    torch.testing.assert_close(w[:, 1], x @ mssa.qkv.weight[8:16].T)
    a = mssa.attention_map(x)
    assert a.shape == (2, 4, 7, 7)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 7))
    with torch.no_grad():
        torch.testing.assert_close(mssa.proj((a @ w).transpose(1, 2).reshape(2, 7, 32)), mssa(x), rtol=1e-5,
                                   atol=1e-6)


def test_resample_pos_embed():
    pe = torch.randn(1, 1 + 16, 8)
    assert torch.equal(layers.resample_pos_embed(pe, (4, 4), 1), pe)
    out = layers.resample_pos_embed(pe, (6, 6), 1)
    assert out.shape == (1, 37, 8) and torch.equal(out[:, 0], pe[:, 0])
    # bilinear without antialiasing, on the (h, w, d) grid
    grid = pe[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 8)
    torch.testing.assert_close(out[:, 1:], ref)
    with pytest.raises(ValueError, match="do not form a square grid"):
        layers.resample_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4), 1)


@pytest.mark.parametrize("small,large", [
    (("crate_alpha_custom.w32_d1_h2_patch8_32", {}), ("crate_alpha_custom.w32_d1_h2_patch8_48", {})),
    (("crate_demo_patch8_64", dict(img_size=32, depth=1)), ("crate_demo_patch8_64", dict(img_size=48, depth=1))),
])
def test_both_models_resample_on_any_load_alike(small, large):
    src = timm.create_model(small[0], **small[1])
    dst = timm.create_model(large[0], **large[1])
    dst.load_state_dict(src.state_dict())  # plain torch load_state_dict
    assert torch.equal(dst.pos_embed, layers.resample_pos_embed(src.pos_embed, (6, 6), 1))


def test_the_model_maps_the_official_layouts_as_convert_does(fixtures):
    d = fixtures / "official_torch"
    sd = torch.load(d / "crate_alpha_cls_shared.pth", weights_only=True)
    _, args, converted = official_torch.convert_classifier(sd, heads=4)
    info, mapped = classifier_state(sd, 4)
    assert info == dict(width=64, depth=2, patch=8, res=32, heads=4, num_classes=args["num_classes"])
    assert mapped.keys() == converted.keys() and all(torch.equal(mapped[k], converted[k]) for k in mapped)
    model = timm.create_model("crate_alpha_custom.w64_d2_h4_patch8_32", num_classes=args["num_classes"])
    filtered = crate_alpha.checkpoint_filter_fn(sd, model)
    assert all(torch.equal(filtered[k], converted[k]) for k in converted)

    sd = torch.load(d / "crate_alpha_clipa_shared.pth", weights_only=True)
    _, _, full = official_torch.convert_clipa(sd, heads=4, text_heads=2)
    info, trunk = clipa_trunk_state(sd)
    assert info == dict(width=64, depth=2, patch=8, res=32, num_classes=128)
    for k, v in trunk.items():
        if k.startswith("head."):
            continue
        assert torch.equal(v, full["visual.trunk." + k]), k
    assert torch.equal(trunk["head.weight"], full["visual.head.proj.weight"]) and not trunk["head.bias"].any()
