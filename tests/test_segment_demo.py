"""make demo-segment: the digits-on-photos generator and a tiny end-to-end run."""
import json

import numpy as np
import pytest
import torch

from crate_alpha.apps import segment_demo as sd


@pytest.fixture(scope="module")
def split():
    return sd.digits_split(0)


@pytest.fixture(scope="module")
def batch(split):
    (px, y), _ = split
    return sd.make_images(px[:48], y[:48], "train", seed=3)


def test_splits_are_the_demo_corpus_split(split):
    (tp, ty), (vp, vy) = split
    assert len(ty) == 1437 and len(vy) == 360
    assert tp.shape == (1437, 64) and vp.shape == (360, 64)
    assert np.bincount(vy, minlength=10).min() >= 35          # stratified


def test_shapes_and_ranges(batch):
    n = 48
    assert batch["images"].shape == (n, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["backgrounds"].shape == (n, 3, 64, 64)
    assert batch["masks"].shape == (n, 64, 64) and batch["masks"].dtype == torch.bool
    assert batch["labels"].shape == (n,) and batch["labels"].dtype == torch.long
    assert batch["images"].min() >= 0 and batch["images"].max() <= 1
    area = batch["masks"].flatten(1).float().mean(1)
    assert (area > 0.005).all() and (area < 0.5).all()            # every image has a digit, none fills it


def test_mask_is_the_pasted_digit(batch):
    img, bg, mask, alpha = batch["images"], batch["backgrounds"], batch["masks"], batch["alpha"]
    assert torch.equal(mask, alpha > 0.5)
    diff = (img - bg).abs().amax(1)                                # (N, H, W)
    # Outside the digit's ink the image is the background crop, untouched.
    assert torch.equal(img * (alpha == 0)[:, None], bg * (alpha == 0)[:, None])
    # Inside the mask the pasted colour contrasts with the background.
    assert (diff[mask] > 0.1).float().mean() > 0.9
    changed = diff > 0
    assert changed[mask].all()                                     # every mask pixel was painted
    assert (alpha[changed] > 0).all()                              # and only the digit's ink was painted
    # Faint ink (0 < alpha <= 0.5) is painted but is not ground truth; it stays a minority.
    assert changed.sum() < 2.5 * mask.sum()


def test_deterministic_per_seed(split):
    (px, y), _ = split
    a = sd.make_images(px[:16], y[:16], "train", seed=7)
    b = sd.make_images(px[:16], y[:16], "train", seed=7)
    c = sd.make_images(px[:16], y[:16], "train", seed=8)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["images"], c["images"])
    assert torch.equal(a["labels"], torch.as_tensor(y[:16]))


def test_train_and_heldout_backgrounds_are_disjoint(split):
    (tp, ty), (vp, vy) = split
    width = sd._photos().shape[-1]
    tr = sd.make_images(tp[:200], ty[:200], "train", seed=0)["boxes"]
    te = sd.make_images(vp[:200], vy[:200], "test", seed=0)["boxes"]
    # boxes: photo, x0, y0, side in the original photo's pixels
    assert (tr[:, 1] >= 0).all() and (tr[:, 1] + tr[:, 3] <= width // 2 + 1).all()
    assert (te[:, 1] >= width // 2).all() and (te[:, 1] + te[:, 3] <= width + 1).all()
    assert set(tr[:, 0].tolist()) == {0, 1} and set(te[:, 0].tolist()) == {0, 1}
    assert len(set(tr[:, 3].tolist())) > 3                        # random scales
    assert sd.photo_region("train").stop <= sd.photo_region("test").start
    # The held-out pyramid is built from the right half alone, so no train pixel reaches it.
    for (_, lt), (_, lv) in zip(sd._pyramid("train"), sd._pyramid("test")):
        assert not torch.equal(lt, lv)


def test_foreground_iou():
    gt = torch.zeros(2, 64, 64, dtype=torch.bool)
    gt[:, :32] = True
    pred = torch.zeros(2, 8, 8, dtype=torch.bool)                  # a patch-grid mask is resized
    pred[0, :4] = True
    pred[1, :2] = True
    assert torch.allclose(sd.foreground_iou(pred, gt), torch.tensor([1.0, 0.5]))


def test_patch_oracle_is_an_upper_bound_of_patch_masks():
    gt = torch.zeros(1, 64, 64, dtype=torch.bool)
    gt[0, :8, :8] = True
    assert torch.allclose(sd.patch_oracle_iou(gt), torch.tensor([1.0]))
    gt[0, 8, :8] = True                                            # 8 pixels spill into the next cell row
    assert torch.allclose(sd.patch_oracle_iou(gt), torch.tensor([64 / 72]))
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(4, 64, 64, generator=g) < 0.1
    best = sd.patch_oracle_iou(gt)
    for _ in range(20):
        cells = torch.rand(4, 8, 8, generator=g) < 0.5
        assert (sd.foreground_iou(cells, gt) <= best + 1e-6).all()


def test_curriculum_easy_end_is_large_central_and_dark(split):
    (px, y), _ = split
    easy = sd.make_images(px[:32], y[:32], "train", seed=5, difficulty=0.0)
    hard = sd.make_images(px[:32], y[:32], "train", seed=5, difficulty=1.0)
    assert torch.equal(hard["labels"], easy["labels"])
    assert torch.allclose(easy["backgrounds"], torch.full_like(easy["backgrounds"], 0.15))
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    a = easy["alpha"]
    cy, cx = (a * ys).sum((1, 2)) / a.sum((1, 2)), (a * xs).sum((1, 2)) / a.sum((1, 2))
    assert ((cy - 31.5).abs() < 8).all() and ((cx - 31.5).abs() < 8).all()
    assert easy["masks"].sum() > hard["masks"].sum()
    t = sd.Trainer("x", torch.nn.Linear(1, 1), px, y, budget_s=10)
    assert [t.difficulty(f) for f in (0.0, 0.2, 0.4, 0.6, 0.9)] == pytest.approx([0, 0, 0.5, 1, 1])


def test_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "seg"
    out.mkdir()
    (out / "mine.txt").write_text("not the demo's")
    from crate_alpha import cli
    assert cli.main(["demo-segment", "--out", str(out), "--budget-s", "3", "--eval-images", "16"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["model"] for r in rows] == ["crate-alpha-demo", "crate-demo", "vit-demo"]
    for r in rows:
        assert set(r) == {"model", "top1", "maskcut_miou", "attention_miou", "seconds"}
        for k in ("top1", "maskcut_miou", "attention_miou"):
            assert 0 <= r[k] <= 1, (r["model"], k, r[k])
        assert r["seconds"] > 0
    assert "foreground IoU" in res["notes"]
    assert res["config"]["eval_images"] == 16
    png = (out / "segmentation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "segmentation.png") as im:
        im.verify()
    for r in rows:
        assert (out / f"{r['model']}.safetensors").stat().st_size > 0
    assert (out / "mine.txt").read_text() == "not the demo's"
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*partial*"))
    assert "vit-demo" in capsys.readouterr().out
