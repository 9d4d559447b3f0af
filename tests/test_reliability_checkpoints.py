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
import struct
import zlib

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

import crate_alpha  # noqa: F401
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


# ---- helpers: tiny classifier checkpoints, image folders, bad files ---------------------------

TINY = "crate_alpha_custom.w32_d1_h2_patch8_32"


def cls_checkpoint(path, classes=3, names=None, model=TINY, weights_of=None):
    """A checkpoint as the classification trainer writes it (weights of ``weights_of`` when given)."""
    from crate_alpha.classifier.trainer import build_model

    m = build_model({"model": weights_of or model, "img_size": 32, "drop_path": 0.0}, classes)
    torch.save({"model": m.state_dict(), "model_name": model, "num_classes": classes, "image_size": 32,
                "class_names": names, "epoch": 1}, path)
    return path


def png(seed, size=32) -> bytes:
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def image_folder(root, classes, per_class=2):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png(10 * c + i))
    return root


class _Payload:
    """Unpickling this opens (creates) a file: code a checkpoint must never get to run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoints(tmp_path):
    """{kind: (file, what the one line says)}; the marker file exists only if pickled code ran."""
    d = tmp_path / "bad"
    d.mkdir()
    torch.save({}, d / "empty.pt")
    (d / "garbage.pt").write_bytes(b"these are not the weights you are looking for\n" * 20)
    torch.save({"state_dict": {"w": torch.zeros(1), "x": _Payload(tmp_path / "code-ran")}}, d / "pickle.pt")
    return {"empty": (d / "empty.pt", "holds no weights"),
            "garbage": (d / "garbage.pt", "is not a PyTorch checkpoint"),
            "pickle": (d / "pickle.pt", "was not loaded: it is not a plain weights file")}


def assert_one_line(e: Exception, path, says: str):
    msg = str(e)
    assert "\n" not in msg and str(path) in msg and says in msg, msg


# ---- 14: cls-eval on data of other classes ---------------------------------------------------

def test_cls_eval_refuses_data_of_other_classes(capsys, tmp_path):
    from data_helpers import write_tar

    ck = cls_checkpoint(tmp_path / "ck.pt", classes=3, names=["a", "b", "c"])
    out = tmp_path / "e.json"
    evaluate = ["cls-eval", "--checkpoint", ck, "--output", out, "--workers", "0", "--data"]
    err = one_line_error(capsys, *evaluate, image_folder(tmp_path / "ten", [f"c{i}" for i in range(10)], 1))
    assert f"has 10 class folders but {ck} has a 3-class head" in err
    err = one_line_error(capsys, *evaluate, image_folder(tmp_path / "other", ["a", "b", "d"]))
    assert "are not the classes" in err and "class 2 is 'd' here but 'c' there" in err
    write_tar(tmp_path / "s.tar", [(f"{i:03d}", {"png": png(i), "cls": str(i % 6).encode()}) for i in range(12)])
    err = one_line_error(capsys, *evaluate, tmp_path / "s.tar")
    assert f"has class label 5 but {ck} has a 3-class head" in err
    assert not out.exists()
    # its own classes: evaluated
    assert main([str(a) for a in evaluate] + [str(image_folder(tmp_path / "same", ["a", "b", "c"]))]) == 0
    res = json.loads(out.read_text())
    assert res["samples"] == 6 and res["skipped_images"] == 0


# ---- 19: checkpoints that are not plain weights, or another model's --------------------------

def test_bad_checkpoints_are_one_line_everywhere(capsys, tmp_path):
    from crate_alpha.classifier.init import load_encoder
    from crate_alpha.classifier.trainer import build_model
    from crate_alpha.clip.trainer import load, prepare_init
    from crate_alpha.common import CrateAlphaError

    classifier = build_model({"model": TINY, "img_size": 32, "drop_path": 0.0}, 3)
    for kind, (f, says) in bad_checkpoints(tmp_path).items():
        with pytest.raises(CrateAlphaError) as e:
            load_encoder(classifier, str(f), new_head=False, load_patch_embed=True)
        assert_one_line(e.value, f, says)
        for recipe, key in (("clipa_crate_alpha_L14_224_finetune:demo", "init_from"),
                            ("clipa_crate_alpha_L14_84_pretrain:demo", "text_init")):
            with pytest.raises(CrateAlphaError) as e:
                prepare_init(load(recipe, [f"{key}={f}"]), tmp_path / "run")
            assert_one_line(e.value, f, says)
        err = one_line_error(capsys, "cls-eval", "--checkpoint", f, "--data", image_folder(tmp_path / kind, "abc"),
                             "--output", tmp_path / "e.json", "--workers", "0")
        assert str(f) in err and says in err
        err = one_line_error(capsys, "zeroshot", "eval", "--model", "crate-alpha-demo", "--checkpoint", f,
                             "--dataset", "wds/digits", "--dataset-root", tmp_path, "--output", tmp_path / "z.json")
        assert str(f) in err and says in err
    assert not (tmp_path / "code-ran").exists()  # the pickle was refused, never run
    assert not (tmp_path / "run" / "init.pt").exists()


def test_another_models_checkpoint_is_named_in_one_line(capsys, tmp_path):
    from crate_alpha.classifier.init import load_encoder
    from crate_alpha.classifier.trainer import build_model
    from crate_alpha.clip.trainer import load, prepare_init
    from crate_alpha.common import CrateAlphaError

    # a classifier of another width: as initial_checkpoint and as a cls-eval checkpoint
    wide = build_model({"model": "crate_alpha_custom.w64_d1_h2_patch8_32", "img_size": 32, "drop_path": 0.0}, 3)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    tiny = build_model({"model": TINY, "img_size": 32, "drop_path": 0.0}, 3)
    with pytest.raises(CrateAlphaError) as e:
        load_encoder(tiny, str(tmp_path / "wide.pt"), new_head=False, load_patch_embed=False)
    assert_one_line(e.value, tmp_path / "wide.pt",
                    "size mismatch for cls_token: [1, 1, 64] in the file, [1, 1, 32] in the model")
    ck = cls_checkpoint(tmp_path / "ck.pt", weights_of="crate_alpha_custom.w64_d1_h2_patch8_32")
    err = one_line_error(capsys, "cls-eval", "--checkpoint", ck, "--data", image_folder(tmp_path / "abc", "abc"),
                         "--output", tmp_path / "e.json", "--workers", "0")
    assert f"{ck} does not fit {TINY} with 3 classes: size mismatch for" in err
    # a classifier's weights as a CLIP model's init_from: missing and unexpected keys, named
    with pytest.raises(CrateAlphaError) as e:
        prepare_init(load("clipa_crate_alpha_L14_224_finetune:demo", [f"init_from={tmp_path / 'wide.pt'}"]),
                     tmp_path / "run")
    assert_one_line(e.value, tmp_path / "wide.pt", "does not fit crate-alpha-demo")
    assert "missing keys: " in str(e.value) and "16 unexpected keys: cls_token, pos_embed" in str(e.value)
    # zero-shot: refused before clip_benchmark starts, from a model that holds no weights (meta device)
    sd = open_clip.create_model("crate-alpha-demo").state_dict()
    sd["text_projection"] = torch.zeros(3, 3)
    torch.save({"state_dict": sd}, tmp_path / "clip.pt")
    err = one_line_error(capsys, "zeroshot", "eval", "--model", "crate-alpha-demo", "--checkpoint", tmp_path / "clip.pt",
                         "--dataset", "wds/digits", "--dataset-root", tmp_path, "--output", tmp_path / "z.json")
    assert "size mismatch for text_projection: [3, 3] in the file, [128, 128] in the model" in err
    assert not (tmp_path / "z.json").exists()


# ---- 20: corrupt images in cls-train data ----------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (as a decompression bomb's does) around no pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def corrupt_images() -> dict:
    from data_helpers import jpeg_bytes

    jpeg = jpeg_bytes(1, (32, 32))
    return {"truncated.jpg": jpeg[: len(jpeg) // 2], "noise.jpg": np.random.default_rng(0).bytes(600),
            "bomb.png": png_header(20000, 20000),  # over twice PIL's limit: its DecompressionBombError
            "big.png": png_header(12000, 12000)}   # over the limit: PIL only warns, then decodes it all


def test_corrupt_images_are_skipped_named_and_counted(capsys, caplog, tmp_path):
    from data_helpers import write_tar

    train = image_folder(tmp_path / "train", ["a", "b"], per_class=4)
    bad = corrupt_images()
    for i, (name, data) in enumerate(bad.items()):
        (train / "ab"[i % 2] / name).write_bytes(data)
    samples = [(f"{i:03d}", {"png": png(i), "cls": str(i % 2).encode()}) for i in range(8)]
    samples += [(f"bad{i}", {name.split(".")[1]: data, "cls": b"0"}) for i, (name, data) in enumerate(bad.items())]
    write_tar(tmp_path / "train.tar", samples)
    common = ["cls-train", "cls_crate_alpha_B16_in21k_pretrain:demo", f"output={tmp_path / 'runs'}", "epochs=1",
              "warmup_epochs=0", "global_batch=4", "workers=0", "model=" + TINY]
    folder_names = [str(train / "ab"[i % 2] / n) for i, n in enumerate(bad)]
    shard_names = [f"{tmp_path / 'train.tar'}: bad{i}.{n.split('.')[1]}" for i, n in enumerate(bad)]
    for data, run, names in ((train, "folder", folder_names), (tmp_path / "train.tar", "shards", shard_names)):
        caplog.clear()
        extra = ["num_classes=2"] if run == "shards" else []
        rc = main(common + [f"train_data={data}", f"experiment={run}", *extra])
        err = capsys.readouterr().err
        assert rc == 0 and "Traceback" not in err, err
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        warned = [r.getMessage() for r in caplog.records if "skipping damaged data" in r.getMessage()]
        # an image folder is read once per epoch; shards are read again when the epoch needs more batches
        assert summary["skipped_images"] == len(warned) == summary["history"][0]["skipped_images"]
        assert len(warned) == 4 if run == "folder" else len(warned) >= 4
        assert all(len(w) < 400 for w in warned), warned
        for name in names:  # each file named in a warning line of its own
            assert any(name + ":" in w for w in warned), (name, warned)
        assert any("DecompressionBombError" in w for w in warned) and any("DecompressionBombWarning" in w for w in warned)
    # one pass of cls-eval over the shards: each damaged sample once
    caplog.clear()
    assert main(["cls-eval", "--checkpoint", str(tmp_path / "runs" / "folder" / "checkpoints" / "latest.pt"),
                 "--data", str(tmp_path / "train.tar"), "--output", str(tmp_path / "e.json"), "--workers", "0"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["samples"] == 8 and res["skipped_images"] == 4
