"""The ``crate-alpha`` command never loses data and fails with one line, not a traceback."""
from pathlib import Path

import pytest
import timm
import torch

import crate_alpha
import reference_official as ref
from crate_alpha.cli import main


def run_cli(capsys, *args) -> tuple:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.err


def assert_one_line_error(capsys, *args, match: str = "") -> str:
    rc, err = run_cli(capsys, *args)
    assert rc == 2, err
    assert err.startswith("crate-alpha: error:"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match in err, err
    return err


def hidden_leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def cls_pth(tmp_path) -> Path:
    """A small official classifier (width 32, 2 heads) in a folder of its own."""
    d = tmp_path / "weights"
    d.mkdir()
    torch.save(ref.random_classifier_sd(width=32, depth=1, patch=4, res=8, num_classes=2), d / "c.pth")
    return d / "c.pth"


def convert_args(src, out, *extra):
    return ["convert", "official-torch", src, out, "--heads", "2", *extra]


# ---- impossible model shapes -----------------------------------------------------------

@pytest.mark.parametrize("name,match", [
    ("crate_alpha_w0_d2_h2_patch8_32", "width 0"),
    ("crate_alpha_w64_d2_h0_patch8_32", "heads 0"),
    ("crate_alpha_w64_d0_h2_patch8_32", "depth 0"),
    ("crate_alpha_w64_d2_h2_patch0_32", "patch size 0"),
    ("crate_alpha_w64_d2_h2_patch8_0", "resolution 0"),
    ("crate_alpha_w64_d2_h2_patch64_32", "patch size 64 is larger than the resolution 32"),
    ("crate_alpha_w64_d2_h3_patch8_32", "width 64 is not divisible by 3 heads"),
])
def test_impossible_shape_names_refused(name, match):
    with pytest.raises(ValueError, match=match):
        crate_alpha.variant_args(name)
    with pytest.raises(ValueError, match=match):
        timm.create_model(name)


def test_shape_arguments_checked_after_overrides():
    with pytest.raises(ValueError, match="heads 0"):
        timm.create_model("crate_alpha_demo_patch8_64", num_heads=0)
    with pytest.raises(ValueError, match="larger than the resolution"):
        timm.create_model("crate_alpha_w64_d1_h2_patch8_32", img_size=4)
    assert timm.create_model("crate_alpha_w64_d1_h2_patch8_8").patch_embed.grid_size == (1, 1)


def test_cli_impossible_shape_is_one_line(capsys, cls_pth, tmp_path):
    assert_one_line_error(capsys, "convert", "official-torch", cls_pth, tmp_path / "o",
                          "--model", "crate_alpha_w32_d1_h0_patch4_8", match="heads 0")
    assert_one_line_error(capsys, "convert", "official-torch", cls_pth, tmp_path / "o",
                          "--model", "crate_alpha_w32_d1_h3_patch4_8", match="not divisible by 3 heads")
    assert not (tmp_path / "o").exists() and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("heads", ["0", "-2"])
def test_nonpositive_heads(capsys, cls_pth, tmp_path, heads):
    assert_one_line_error(capsys, "convert", "official-torch", cls_pth, tmp_path / "o", "--heads", heads,
                          match=f"--heads must be a positive number of heads, got {heads}")
    assert not (tmp_path / "o").exists()


def test_zero_text_heads_not_taken_as_default(capsys, tmp_path):
    sd = ref.random_clipa_sd(width=32, depth=1, patch=4, res=8, embed=16, text_width=16,
                             text_layers=1, vocab=10, context=4)
    torch.save(sd, tmp_path / "clip.pth")
    assert_one_line_error(capsys, "convert", "official-torch", tmp_path / "clip.pth", tmp_path / "o",
                          "--heads", "2", "--text-heads", "0", match="--text-heads")
    assert not (tmp_path / "o").exists()
