"""Issue 22, round-3 reliability: checkpoints and images that are not what a command was told.

12: ``convert official-torch --model NAME`` on weights of another shape is refused, naming
    what differs, instead of writing a model with NAME's head counts;
14: ``cls-eval`` checks the checkpoint's classes against the data's;
19: a checkpoint given to ``initial_checkpoint`` / ``init_from`` / ``text_init`` /
    ``cls-eval --checkpoint`` / ``zeroshot eval`` that is empty, garbage, a pickle that would
    run code, or another model's ends in one line naming the file;
20: a corrupt image in ``cls-train`` data is skipped, named and counted.
"""
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

import crate_alpha  # noqa: F401
import reference_official as ref
from conftest import FIXTURES, rel_err
from crate_alpha.cli import main

CLS = FIXTURES / "official_torch" / "crate_alpha_cls_shared.pth"     # width 64, depth 2, 4 heads, patch 8, 32 px
CLIPA = FIXTURES / "official_torch" / "crate_alpha_clipa_shared.pth"  # + text width 128, 2 heads, vocab 1000


def one_line_error(capsys, *args) -> str:
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- 12: convert --model NAME on weights of another shape ----------------------------------

def test_convert_model_name_of_another_shape_is_refused(capsys, tmp_path):
    # 16 heads divide both widths, so the named model's head counts used to be applied silently
    err = one_line_error(capsys, "convert", "official-torch", CLS, tmp_path / "cls",
                         "--model", "crate_alpha_large_patch14_224")
    assert "not crate_alpha_large_patch14_224" in err
    assert "width 64 (not 1024)" in err and "depth 2 (not 24)" in err and "patch 8 (not 14)" in err
    err = one_line_error(capsys, "convert", "official-torch", CLIPA, tmp_path / "clip",
                         "--model", "crate-alpha-CLIPA-L-14")
    assert "width 64 (not 1024)" in err and "text width 128 (not 1024)" in err and "vocabulary 1000 (not 32000)" in err
    # --heads and --model that disagree: neither is guessed
    err = one_line_error(capsys, "convert", "official-torch", CLS, tmp_path / "cls", "--heads", "4",
                         "--model", "crate_alpha_custom.w64_d2_h2_patch8_32")
    assert "--heads 4 contradicts --model crate_alpha_custom.w64_d2_h2_patch8_32, which has 2 vision heads" in err
    assert not (tmp_path / "cls").exists() and not (tmp_path / "clip").exists()


def test_convert_model_name_of_the_same_shape_converts(capsys, tmp_path):
    io_ = torch.load(FIXTURES / "official_torch" / "crate_alpha_cls_shared.io.pt", weights_only=True)
    assert main(["convert", "official-torch", str(CLS), str(tmp_path / "cls"),
                 "--model", "crate_alpha_custom.w64_d2_h4_patch8_32"]) == 0
    m = timm.create_model(f"local-dir:{tmp_path / 'cls'}", pretrained=True).eval()
    with torch.no_grad():
        assert rel_err(m(io_["images"]), io_["logits"]) <= 1e-4
