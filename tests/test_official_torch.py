"""Official PyTorch release -> timm / open_clip folders, with numerical parity."""
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch

import crate_alpha  # noqa: F401
from crate_alpha.convert import ConversionError, convert_official_torch
from crate_alpha.convert import folders
from conftest import rel_err
import reference_official as ref

TOL = 1e-4


def _timm_outputs(out_dir, images):
    model = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
    with torch.no_grad():
        feats = model.forward_features(images)
        return model.forward_head(feats), model.forward_head(feats, pre_logits=True)


def _clip_outputs(out_dir, images, tokens):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens), model, preprocess


def test_classifier_fixture_parity(fixtures, tmp_path):
    d = fixtures / "official_torch"
    io = torch.load(d / "crate_alpha_cls_shared.io.pt", weights_only=True)
    convert_official_torch(d / "crate_alpha_cls_shared.pth", tmp_path / "cls", heads=4)
    logits, pre = _timm_outputs(tmp_path / "cls", io["images"])
    assert rel_err(logits, io["logits"]) <= TOL
    assert rel_err(pre, io["pre_logits"]) <= TOL


def test_clipa_fixture_parity(fixtures, tmp_path):
    d = fixtures / "official_torch"
    io = torch.load(d / "crate_alpha_clipa_shared.io.pt", weights_only=True)
    convert_official_torch(d / "crate_alpha_clipa_shared.pth", tmp_path / "clip", heads=4, text_heads=2)
    img, txt, model, preprocess = _clip_outputs(tmp_path / "clip", io["images"], io["text_tokens"])
    assert rel_err(img, io["image_features"]) <= TOL
    assert rel_err(txt, io["text_features"]) <= TOL
    # The released models' preprocessing: ImageNet mean/std.
    norm = preprocess.transforms[-1]
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)


def test_reference_oracle_matches_fixtures(fixtures):
    """The oracle used below for other sizes computes what the official code computed."""
    d = fixtures / "official_torch"
    sd = torch.load(d / "crate_alpha_cls_shared.pth", weights_only=True)
    io = torch.load(d / "crate_alpha_cls_shared.io.pt", weights_only=True)
    logits, _ = ref.classifier_forward(sd, io["images"], heads=4)
    assert rel_err(logits, io["logits"]) <= TOL
    sd = torch.load(d / "crate_alpha_clipa_shared.pth", weights_only=True)
    io = torch.load(d / "crate_alpha_clipa_shared.io.pt", weights_only=True)
    assert rel_err(ref.clipa_image(sd, io["images"], 4), io["image_features"]) <= TOL
    assert rel_err(ref.clipa_text(sd, io["text_tokens"], 2), io["text_features"]) <= TOL


def test_classifier_other_size(tmp_path):
    sd = ref.random_classifier_sd(width=48, depth=3, patch=4, res=24, num_classes=7, seed=1)
    torch.save(sd, tmp_path / "c.pth")
    info = convert_official_torch(tmp_path / "c.pth", tmp_path / "out", heads=3)
    assert info["model_args"]["depth"] == 3 and info["model_args"]["img_size"] == 24
    images = torch.randn(2, 3, 24, 24)
    logits, pre = _timm_outputs(tmp_path / "out", images)
    ref_logits, ref_pre = ref.classifier_forward(sd, images, heads=3)
    assert logits.shape == (2, 7)
    assert rel_err(logits, ref_logits) <= TOL and rel_err(pre, ref_pre) <= TOL


def test_clipa_other_size(tmp_path):
    # embed != text width, so a missing transpose of text_projection cannot load.
    sd = ref.random_clipa_sd(width=32, depth=1, patch=4, res=16, embed=24, text_width=48,
                             text_layers=3, vocab=50, context=8, seed=2)
    torch.save(sd, tmp_path / "c.pth")
    convert_official_torch(tmp_path / "c.pth", tmp_path / "out", heads=2, text_heads=3)
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (3, 8))
    img, txt, _, _ = _clip_outputs(tmp_path / "out", images, tokens)
    assert rel_err(img, ref.clipa_image(sd, images, 2)) <= TOL
    assert rel_err(txt, ref.clipa_text(sd, tokens, 3)) <= TOL


def test_square_text_projection_is_transposed(fixtures, tmp_path):
    """A square, non-symmetric text projection loads either way; only the transpose is right."""
    sd = torch.load(fixtures / "official_torch" / "crate_alpha_clipa_shared.pth", weights_only=True)
    assert not torch.allclose(sd["text_projection"], sd["text_projection"].T)
    convert_official_torch(fixtures / "official_torch" / "crate_alpha_clipa_shared.pth", tmp_path / "o",
                           heads=4, text_heads=2)
    model = open_clip.create_model(f"local-dir:{tmp_path / 'o'}")
    assert torch.equal(model.text_projection.detach(), sd["text_projection"].T)


def test_heads_from_model_name(tmp_path):
    # width 192 is the paper's tiny size (3 heads, what the width alone gives); the name's 6 win
    sd = ref.random_classifier_sd(width=192, depth=1, patch=16, res=32, num_classes=3)
    torch.save(sd, tmp_path / "c.pth")
    info = convert_official_torch(tmp_path / "c.pth", tmp_path / "a", model="crate_alpha_custom.w192_d1_h6_patch16_32")
    assert info["model_args"]["num_heads"] == 6
    images = torch.randn(1, 3, 32, 32)
    assert rel_err(_timm_outputs(tmp_path / "a", images)[0], ref.classifier_forward(sd, images, 6)[0]) <= TOL
    # the tiny name is another shape (12 blocks at 224 px): refused, not converted with its heads
    with pytest.raises(ConversionError, match=r"not crate_alpha_tiny_patch16_224: their depth 1 \(not 12\)"):
        convert_official_torch(tmp_path / "c.pth", tmp_path / "b", model="crate_alpha_tiny_patch16_224")


# ---- bad input -----------------------------------------------------------------------

def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_unknown_model_name_lists_names(tmp_path):
    sd = ref.random_classifier_sd(width=32, depth=1, patch=4, res=8, num_classes=2)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(ConversionError, match="crate_alpha_base_patch16_224.*crate-alpha-CLIPA-L-14"):
        convert_official_torch(tmp_path / "c.pth", tmp_path / "out", model="crate_alpha_giant")
    _no_leftovers(tmp_path, "out")


def test_unknown_width_needs_heads(tmp_path):
    sd = ref.random_classifier_sd(width=40, depth=1, patch=4, res=8, num_classes=2)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(ConversionError, match="--heads"):
        convert_official_torch(tmp_path / "c.pth", tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_neither_layout(tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(ConversionError, match="neither"):
        convert_official_torch(tmp_path / "x.pth", tmp_path / "out", heads=1)
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("transformer.layers.0.1.fn.D1"), "missing keys: transformer.layers.0.1.fn.D1"),
    (lambda sd: sd.__setitem__("transformer.layers.0.extra", torch.zeros(1)),
     "unexpected keys: transformer.layers.0.extra"),
    (lambda sd: sd.__setitem__("transformer.layers.0.1.fn.D", torch.zeros(32, 100)),
     r"transformer.layers.0.1.fn.D has shape \(32, 100\)"),
    (lambda sd: sd.__setitem__("cls_token", torch.zeros(1, 2, 32)), r"cls_token has shape \(1, 2, 32\)"),
])
def test_bad_keys_and_shapes_are_named(tmp_path, edit, match):
    sd = ref.random_classifier_sd(width=32, depth=1, patch=4, res=8, num_classes=2)
    edit(sd)
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(ConversionError, match=match):
        convert_official_torch(tmp_path / "c.pth", tmp_path / "out", heads=2)
    _no_leftovers(tmp_path, "out")


def test_untied_qkv_refused(tmp_path):
    sd = ref.random_clipa_sd(width=32, depth=1, patch=4, res=8, embed=16, text_width=16,
                             text_layers=1, vocab=10, context=4)
    w = sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    w[32:64] += 0.01
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(ConversionError, match="query, key and value blocks differ.*MSSA"):
        convert_official_torch(tmp_path / "c.pth", tmp_path / "out", heads=2, text_heads=1)
    _no_leftovers(tmp_path, "out")


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_with_code_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "evil": _Payload()}, tmp_path / "p.pth")
    with pytest.raises(ConversionError, match="weights_only"):
        convert_official_torch(tmp_path / "p.pth", tmp_path / "out", heads=1)
    _no_leftovers(tmp_path, "out")


def test_existing_out_dir_needs_force(fixtures, tmp_path):
    src = fixtures / "official_torch" / "crate_alpha_cls_shared.pth"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--force"):
        convert_official_torch(src, out, heads=4)
    assert (out / "keep.txt").exists()
    # --force never deletes files this tool did not write
    with pytest.raises(ConversionError, match="empty it yourself"):
        convert_official_torch(src, out, heads=4, force=True)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    convert_official_torch(src, out, heads=4, force=True)
    convert_official_torch(src, out, heads=4, force=True)  # its own folder, replaced
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_conversion_leaves_nothing(fixtures, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(folders, "write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_official_torch(fixtures / "official_torch" / "crate_alpha_cls_shared.pth",
                               tmp_path / "out", heads=4)
    assert list(tmp_path.iterdir()) == []


def test_cli(fixtures, tmp_path):
    exe = Path(sys.executable).parent / "crate-alpha"
    src = fixtures / "official_torch" / "crate_alpha_clipa_shared.pth"
    r = subprocess.run([str(exe), "convert", "official-torch", str(src), str(tmp_path / "o"),
                        "--heads", "4", "--text-heads", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "open_clip_config.json").exists()
    r = subprocess.run([str(exe), "convert", "official-torch", str(src), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
