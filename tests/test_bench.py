"""The model benchmark and the official-form model it times (no timing assertions)."""
import argparse
import json

import pytest
import timm
import torch

import crate_alpha  # noqa: F401
from crate_alpha.apps import bench
from crate_alpha.models.crate_alpha import MSSA, ODL
from crate_alpha.models.official import EinsumMSSA, EinsumODL, official_form
from conftest import rel_err

DEMO = "crate_alpha_demo_patch8_64"


def _demo(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(DEMO, img_size=32)


def test_official_form_computes_the_eager_model():
    model = _demo().eval()
    official = official_form(model).eval()
    assert not any(isinstance(m, (MSSA, ODL)) for m in official.modules())
    assert sum(isinstance(m, (EinsumMSSA, EinsumODL)) for m in official.modules()) == 2 * len(model.blocks)
    assert any(isinstance(m, MSSA) for m in model.modules())  # the original keeps its own operators
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(official(x), model(x), rtol=1e-4, atol=1e-5)
    # Same parameter names, so one state dict serves both, and gradients agree too
    # (the benchmark trains the official form).
    assert list(official.state_dict()) == list(model.state_dict())
    official.load_state_dict(model.state_dict())
    y = torch.tensor([1, 2, 3])
    for m in (model, official):
        torch.nn.functional.cross_entropy(m.train()(x), y).backward()
    assert rel_err(official.blocks[0].mlp.D.grad, model.blocks[0].mlp.D.grad) < 1e-4
    assert rel_err(official.blocks[0].attn.qkv.weight.grad, model.blocks[0].attn.qkv.weight.grad) < 1e-4


def test_official_form_needs_crate_layers():
    with pytest.raises(ValueError, match="no MSSA or ODL"):
        official_form(torch.nn.Linear(2, 2))


def test_quick_bench_writes_every_row(tmp_path):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "model.json"
    assert bench.run(p.parse_args(["--quick", "--repeats", "1", "--gemm-size", "256", "--out", str(out)])) == 0
    res = json.loads(out.read_text())
    rows = {(r["variant"], r["precision"], r["mode"]): r for r in res["rows"]}
    assert len(rows) == len(res["rows"])
    assert set(rows) == {(v, p, m) for v in bench.VARIANTS for p in bench.PRECISIONS for m in bench.MODES}
    for key, r in rows.items():
        for field in ("seconds", "images_per_s", "flops", "flop_per_s", "peak_fraction", "peak_mem_bytes",
                      "speedup_vs_eager"):
            assert r[field] > 0, (key, field)
        assert r["model"] and r["batch"] == (8 if r["mode"] == "inference" else 4)
        assert (r["variant"] == "crate-alpha compiled") == ("first_call_s" in r)
    assert all(res["gemm_peak_flop_per_s"][p] > 0 for p in bench.PRECISIONS)
    assert res["peak_mem_method"]
    # The three CRATE-α variants do the same arithmetic and are counted alike.
    for mode in bench.MODES:
        counts = {rows[v, "fp32", mode]["flops"] for v in bench.VARIANTS if v != "timm vit"}
        assert len(counts) == 1
    # Backward is about twice the forward (less the patch embedding's input gradient).
    per_image = {m: rows["crate-alpha eager", "fp32", m]["flops"] / rows["crate-alpha eager", "fp32", m]["batch"]
                 for m in bench.MODES}
    assert 2.5 < per_image["train step"] / per_image["inference"] <= 3.0
    # A train step holds at least the weights and AdamW's two moments (fp32, under bf16 autocast too).
    weight_bytes = sum(t.numel() * 4 for t in _demo().parameters())
    for p in bench.PRECISIONS:
        assert rows["crate-alpha eager", p, "train step"]["peak_mem_bytes"] > 3 * weight_bytes
        assert rows["crate-alpha eager", p, "inference"]["peak_mem_bytes"] > weight_bytes
    assert res["official_vs_eager_rel_err"] < 1e-4
    png = tmp_path / "model.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.json", "model.png"]  # no temp files left


def test_clipa_resolution_effect(tmp_path):
    from crate_alpha.apps.bench import clipa_resolution, plot_clipa

    result = clipa_resolution("crate-alpha-demo", (16, 32), batch=2, device=torch.device("cpu"))
    low, high = result["rows"]
    assert (low["size"], high["size"]) == (16, 32) and low["batch"] == 2
    assert low["tokens"] < high["tokens"] and low["forward_gflop_per_image"] < high["forward_gflop_per_image"]
    assert high["speedup_vs_largest"] == 1.0 and low["token_ratio_vs_largest"] == high["tokens"] / low["tokens"]
    assert all(r["seconds_per_step"] > 0 for r in result["rows"])
    assert plot_clipa(result, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_clipa_cli_repeats_and_files(tmp_path):
    from crate_alpha.cli import main

    assert main(["bench", "--clipa", "--quick", "--repeats", "2", "--clipa-batch", "2", "--device", "cpu",
                 "--out", str(tmp_path / "model.json")]) == 0
    result = json.loads((tmp_path / "clipa.json").read_text())
    assert result["repeats"] == 2 and result["batch"] == 2 and [r["size"] for r in result["rows"]] == [16, 32, 64]
    assert (tmp_path / "clipa.png").read_bytes()[:4] == b"\x89PNG"
