"""White-box commands end to end: explain, diagnose and segment-eval on the converted shared fixture."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from crate_alpha import cli

from crate_alpha.whitebox import interpret

from crate_alpha.whitebox import segment_eval
from crate_alpha.convert import convert_official_torch


@pytest.fixture(scope="module")
def fixture_model(fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "cls"
    convert_official_torch(fixtures / "official_torch" / "crate_alpha_cls_shared.pth", out, heads=4)
    return f"local-dir:{out}"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Crops of the real photos scikit-learn ships, with a solid square pasted on each (the object)."""
    from sklearn.datasets import load_sample_images

    d = tmp_path_factory.mktemp("photos")
    objects = []
    for i, arr in enumerate(load_sample_images().images):
        for j, (y, x) in enumerate([(40, 60), (150, 300)]):
            img = arr[y:y + 120, x:x + 160].copy()
            box = (30 + 10 * j, 20 + 5 * i, 50, 40)  # x, y, w, h
            img[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = (250, 30 * j, 40)
            name = f"p{i}{j}.jpg"
            Image.fromarray(img).save(d / name, quality=95)
            objects.append((name, box))
    return d, objects


def _coco(photos, tmp_path):
    d, objects = photos
    images, anns = [], []
    for k, (name, (x, y, w, h)) in enumerate(objects):
        images.append({"id": k + 1, "file_name": name, "width": 160, "height": 120})
        poly = [x, y, x + w, y, x + w, y + h, x, y + h]
        anns.append({"id": k + 1, "image_id": k + 1, "category_id": 7, "bbox": [x, y, w, h], "area": w * h,
                     "iscrowd": 0, "segmentation": [poly]})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "box"}]}))
    return path


def _voc(photos, tmp_path):
    d, objects = photos
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    ids = []
    for name, (x, y, w, h) in objects:
        stem = name[:-4]
        ids.append(stem)
        Image.open(d / name).save(root / "JPEGImages" / f"{stem}.jpg")
        seg = np.zeros((120, 160), np.uint8)
        seg[y:y + h, x:x + w] = 15
        seg[y - 1, x:x + w] = 255  # a void border, as VOC draws them
        png = Image.frombytes("P", (160, 120), seg.tobytes())  # class indices, as VOC stores them
        png.putpalette([v for i in range(256) for v in (i, i, i)])
        png.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def test_explain_writes_one_png_per_image(fixture_model, photos, tmp_path, capsys):
    d, objects = photos
    assert cli.main(["explain", str(d / objects[0][0]), str(d / objects[1][0]), "--model", fixture_model,
                     "--out", str(tmp_path / "ex")]) == 0
    pngs = sorted((tmp_path / "ex").glob("*.png"))
    assert len(pngs) == 2
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    summary = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert [len(s["mask_fraction"]) for s in summary] == [3, 3]


def test_diagnose_writes_json_and_png(fixture_model, photos, tmp_path):
    d, _ = photos
    assert cli.main(["diagnose", "--model", fixture_model, "--images", str(d), "--out", str(tmp_path / "dg")]) == 0
    res = json.loads((tmp_path / "dg" / "diagnostics.json").read_text())
    assert res["images"] == 4 and [r["layer"] for r in res["layers"]] == [1, 2]
    for r in res["layers"]:
        assert r["coding_rate"] > 0 and 0 < r["sparsity"] <= 1 and r["recon_error"] > 0
    # the same numbers as the library on the same batch
    from crate_alpha.whitebox.commands import normalisation, prepare, read_images

    enc = interpret.encoder(fixture_model)
    mean, std, size = normalisation(fixture_model, enc)
    x, _ = prepare([im for _, im in read_images(d, 10)], size, mean, std)
    lib = interpret.layer_diagnostics(enc, x)
    for a, b in zip(res["layers"], lib):
        assert a["coding_rate"] == pytest.approx(b["coding_rate"], rel=1e-5)
    with Image.open(tmp_path / "dg" / "diagnostics.png") as im:
        assert im.format == "PNG"


def test_segment_eval_runs_on_coco_and_voc(fixture_model, photos, tmp_path):
    ann, voc = _coco(photos, tmp_path), _voc(photos, tmp_path)
    out = tmp_path / "seg.json"
    assert cli.main(["segment-eval", "--model", fixture_model, "--coco-images", str(photos[0]),
                     "--coco-annotations", str(ann), "--voc", str(voc), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["coco"]["images"] == 4 and res["voc"]["images"] == 4
    for t in ("bbox", "segm"):
        assert 0 <= res["coco"][t]["AP"] <= 1 and 0 <= res["coco"][t]["AP50"] <= 1
    assert 0 <= res["voc"]["miou"] <= 1


def test_segment_eval_scores_a_perfect_predictor_as_perfect(photos, tmp_path, monkeypatch):
    """The scoring itself: masks equal to the ground truth give AP 1 and mIoU 1."""
    ann, voc = _coco(photos, tmp_path), _voc(photos, tmp_path)
    objects = photos[1]
    truth = torch.zeros(len(objects), 120, 160, dtype=torch.bool)
    for k, (_, (x, y, w, h)) in enumerate(objects):
        truth[k, y:y + h, x:x + w] = True
    # masks of any resolution are resized to each image's own size before scoring: give the exact one
    state = {"i": 0}

    def fake(kind):
        def run(enc, x, **kw):
            i = state["i"]
            state["i"] += x.shape[0]
            m = truth[i:i + x.shape[0]]
            return m[:, None].repeat(1, kw.get("num_masks", 1), 1, 1) if kind == "maskcut" else m
        return run

    model = "crate_alpha_custom.w32_d2_h2_patch8_32"
    monkeypatch.setattr(interpret, "maskcut", fake("maskcut"))
    res = segment_eval.coco_maskcut_ap(model, photos[0], ann, num_masks=1)
    assert res["segm"]["AP"] == pytest.approx(1.0) and res["bbox"]["AP"] == pytest.approx(1.0)
    state["i"] = 0
    monkeypatch.setattr(interpret, "coarse_segmentation", fake("coarse"))
    res = segment_eval.voc_coarse_miou(model, voc)
    assert res["miou"] == pytest.approx(1.0) and res["iou_foreground"] == pytest.approx(1.0)


def test_whitebox_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["diagnose", "--model", "crate_alpha_custom.w32_d2_h2_patch8_32", "--images", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crate-alpha: error:") and str(tmp_path / "none") in err and "Traceback" not in err
    assert cli.main(["segment-eval", "--model", "crate_alpha_custom.w32_d2_h2_patch8_32", "--out", str(tmp_path / "r")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
