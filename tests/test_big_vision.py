"""Released JAX (big_vision) checkpoints -> timm / open_clip folders, with parity."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch

import crate_alpha  # noqa: F401
import reference_big_vision as ref
from conftest import rel_err
from crate_alpha.convert import ConversionError, convert_big_vision

TOL = 1e-4


def _nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _timm(out_dir, images):
    m = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    with torch.no_grad():
        f = m.forward_features(images)
        return m.forward_head(f), m.forward_head(f, pre_logits=True)


def _clip(out_dir, images, tokens):
    m = open_clip.create_model(f"local-dir:{out_dir}").eval()
    with torch.no_grad():
        return m.encode_image(images), m.encode_text(torch.from_numpy(tokens).long()), m


def test_classifier_fixture(fixtures, tmp_path):
    d = fixtures / "bigvision"
    io = np.load(d / "crate_cls_io.npz")
    convert_big_vision(str(d / "crate_cls_params.npz"), tmp_path / "o")
    logits, pre = _timm(tmp_path / "o", _nchw(io["images"]))
    assert rel_err(logits, torch.from_numpy(io["logits"])) <= TOL
    assert rel_err(pre, torch.from_numpy(io["pre_logits"])) <= TOL


def test_clipa_fixture(fixtures, tmp_path):
    d = fixtures / "bigvision"
    io = np.load(d / "clipa_io.npz")
    convert_big_vision(str(d / "clipa_params.npz"), tmp_path / "o")
    img, txt, model = _clip(tmp_path / "o", _nchw(io["images"]), io["tokens"])
    assert rel_err(img, torch.from_numpy(io["zimg_unnormalized"])) <= TOL
    assert rel_err(txt, torch.from_numpy(io["ztxt_unnormalized"])) <= TOL
    assert abs(model.logit_scale.exp().item() - io["temperature"][0]) / io["temperature"][0] <= TOL
    # Key biases cancel in the softmax, so they are compared tensor by tensor.
    params = np.load(d / "clipa_params.npz")
    for i in range(2):
        kb = params[f"txt/Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/key/bias"].reshape(-1)
        in_bias = model.transformer.resblocks[i].attn.in_proj_bias.detach()
        assert torch.equal(in_bias[128:256], torch.from_numpy(kb))


def test_image_tower_alone(fixtures, tmp_path):
    d = fixtures / "bigvision"
    io = np.load(d / "clipa_io.npz")
    convert_big_vision(f"{d / 'clipa_params.npz'}:img", tmp_path / "o")
    logits, _ = _timm(tmp_path / "o", _nchw(io["images"]))
    assert rel_err(logits, torch.from_numpy(io["zimg_unnormalized"])) <= TOL


def test_oracle_matches_fixtures(fixtures):
    d = fixtures / "bigvision"
    p, io = dict(np.load(d / "clipa_params.npz")), np.load(d / "clipa_io.npz")
    img, _ = ref.crate_forward(ref._sub(p, "img/"), io["images"].astype(np.float64))
    assert rel_err(torch.from_numpy(img), torch.from_numpy(io["zimg_unnormalized"])) <= TOL
    txt = ref.text_forward(ref._sub(p, "txt/"), io["tokens"])
    assert rel_err(torch.from_numpy(txt), torch.from_numpy(io["ztxt_unnormalized"])) <= TOL


def test_other_size_trees(tmp_path):
    rng = np.random.default_rng(3)
    cls = ref.random_crate_tree(rng, width=48, depth=3, heads=3, patch=4, res=16, n_out=5)
    np.savez(tmp_path / "cls.npz", **cls)
    images = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    convert_big_vision(str(tmp_path / "cls.npz"), tmp_path / "cls")
    logits, pre = _timm(tmp_path / "cls", _nchw(images))
    ref_logits, ref_pre = ref.crate_forward(cls, images.astype(np.float64))
    assert rel_err(logits, torch.from_numpy(ref_logits)) <= TOL and rel_err(pre, torch.from_numpy(ref_pre)) <= TOL

    two = ref.random_crate_tree(rng, width=32, depth=1, heads=2, patch=8, res=16, n_out=24, bias=False, prefix="img/")
    two.update(ref.random_text_tree(rng, width=48, depth=2, heads=4, vocab=30, context=6, embed=24, mlp=96))
    two["t"] = np.array([2.3], np.float32)
    np.savez(tmp_path / "two.npz", **two)
    convert_big_vision(str(tmp_path / "two.npz"), tmp_path / "two")
    tokens = rng.integers(0, 30, (3, 6))
    img, txt, _ = _clip(tmp_path / "two", _nchw(images), tokens)
    assert rel_err(img, torch.from_numpy(ref.crate_forward(ref._sub(two, "img/"), images.astype(np.float64))[0])) <= TOL
    assert rel_err(txt, torch.from_numpy(ref.text_forward(ref._sub(two, "txt/"), tokens))) <= TOL


def _to_bf16_void(a):
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view("V2")


def test_training_checkpoint_with_bf16(fixtures, tmp_path):
    params = dict(np.load(fixtures / "bigvision" / "crate_cls_params.npz"))
    rounded = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in params.items()}
    ckpt = {f"params/{k}": _to_bf16_void(v) for k, v in params.items()}
    ckpt["opt/0/mu/cls"] = np.zeros(3, np.float32)
    ckpt["chrono/accum_train_time"] = np.array(1.0)
    np.savez(tmp_path / "ckpt.npz", **ckpt)
    np.savez(tmp_path / "rounded.npz", **rounded)
    convert_big_vision(str(tmp_path / "ckpt.npz"), tmp_path / "a")
    convert_big_vision(str(tmp_path / "rounded.npz"), tmp_path / "b")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["cls_token"], torch.from_numpy(params["cls"]))  # really bf16-rounded


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".npz"))


def test_pickled_npz_refused(tmp_path):
    np.savez(tmp_path / "p.npz", cls=np.array([object()], dtype=object))
    with pytest.raises(ConversionError, match="allow_pickle"):
        convert_big_vision(str(tmp_path / "p.npz"), tmp_path / "o")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("Transformer/encoderblock_1/OvercompleteISTABlock_0/D1"),
     "missing parameters: Transformer/encoderblock_1/OvercompleteISTABlock_0/D1"),
    (lambda t: t.__setitem__("Transformer/encoderblock_0/extra", np.zeros(2, np.float32)),
     "unexpected parameters: Transformer/encoderblock_0/extra"),
    (lambda t: t.__setitem__("Transformer/encoderblock_0/OvercompleteISTABlock_0/D", np.zeros((64, 9), np.float32)),
     r"OvercompleteISTABlock_0/D has shape \(64, 9\)"),
])
def test_bad_parameters_named(fixtures, tmp_path, edit, match):
    tree = dict(np.load(fixtures / "bigvision" / "crate_cls_params.npz"))
    edit(tree)
    np.savez(tmp_path / "x.npz", **tree)
    with pytest.raises(ConversionError, match=match):
        convert_big_vision(str(tmp_path / "x.npz"), tmp_path / "o")
    assert _leftovers(tmp_path) == []


def test_unknown_layout_and_existing_out(fixtures, tmp_path):
    np.savez(tmp_path / "u.npz", **{"Encoder/layer/w": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError, match="unknown layout"):
        convert_big_vision(str(tmp_path / "u.npz"), tmp_path / "o")
    assert _leftovers(tmp_path) == []
    (tmp_path / "o").mkdir()
    src = str(fixtures / "bigvision" / "crate_cls_params.npz")
    with pytest.raises(ConversionError, match="--force"):
        convert_big_vision(src, tmp_path / "o")
    convert_big_vision(src, tmp_path / "o", force=True)
    assert (tmp_path / "o" / "config.json").exists()


def test_cli(fixtures, tmp_path):
    exe = Path(sys.executable).parent / "crate-alpha"
    src = fixtures / "bigvision" / "clipa_params.npz"
    r = subprocess.run([str(exe), "convert", "big-vision", f"{src}:img", str(tmp_path / "o")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "config.json").exists()
