"""Classification: recipes, training (short), encoder reuse, evaluation, resume, bad input."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

import crate_alpha  # noqa: F401
from crate_alpha.classifier.evaluate import run_eval
from crate_alpha.classifier.trainer import DEFAULTS, load, train
from crate_alpha.errors import CheckpointError, CrateAlphaError
from crate_alpha.convert import convert_official_torch
from crate_alpha.recipe import RecipeError
from data_helpers import write_tar

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SCRATCH = "cls_crate_alpha_B16_in21k_pretrain:demo"
FINETUNE = "cls_crate_alpha_B16_in1k_finetune:demo"


def test_paper_recipes():
    pre = load(str(CONFIGS / "cls_crate_alpha_B16_in21k_pretrain.py"))
    assert (pre["num_classes"], pre["epochs"], pre["lr_base"], pre["weight_decay"], pre["opt_betas"][1]) == \
        (19167, 91, 5e-5, 0.1, 0.95)
    assert (pre["warmup_epochs"], pre["min_lr"], pre["mixup"], pre["cutmix"], pre["mixup_switch_prob"]) == \
        (10, 1e-6, 0.8, 1.0, 0.5)
    assert pre["scale"][0] == 0.08 and pre["hflip"] == 0.5 and pre["clip_grad"] == 1.0
    ft = load("cls_crate_alpha_B16_in1k_finetune")
    assert (ft["lr_base"], ft["smoothing"], ft["epochs"], ft["new_head"], ft["load_patch_embed"]) == \
        (1e-5, 0.1, 91, True, False)
    assert ft["aa"].startswith("rand-m9-n2")
    demo = load(FINETUNE)  # a variant: the paper's regularisation, the laptop's size
    assert demo["smoothing"] == 0.1 and demo["opt_betas"] == ft["opt_betas"] and demo["img_size"] == 64
    with pytest.raises(RecipeError, match="'label_smoothing' .* is now called 'smoothing'"):
        load(SCRATCH, ["label_smoothing=0.1"])


# timm's train.py argument names (timm 1.0's train.py; the script is not in timm's wheel)
TIMM_TRAIN_ARGS = {"model", "num_classes", "img_size", "drop_path", "torchcompile", "workers", "epochs", "min_lr",
                   "warmup_epochs", "warmup_lr", "weight_decay", "opt", "opt_betas", "clip_grad", "amp", "amp_dtype",
                   "model_ema", "model_ema_decay", "scale", "ratio", "hflip", "aa", "mixup", "cutmix",
                   "mixup_switch_prob", "smoothing", "crop_pct", "initial_checkpoint", "output", "experiment", "seed",
                   "log_interval", "device", "lr_base"}


def test_recipe_keys_are_timm_train_arguments():
    # ours, and torch DataLoader's prefetch_factor (timm's train.py has no flag for it)
    ours = {"train_data", "val_data", "train_num_samples", "global_batch", "new_head", "load_patch_embed", "fsdp",
            "prefetch_factor"}
    assert sorted(set(DEFAULTS) - TIMM_TRAIN_ARGS - ours) == []


def _scratch(demo_data, tmp_path, name, *extra):
    return [SCRATCH, [f"train_data={demo_data[0] / 'imagefolder' / 'train'}",
                      f"val_data={demo_data[0] / 'imagefolder' / 'val'}", f"output={tmp_path}", f"experiment={name}",
                      *extra]]


def test_short_training_from_scratch_and_eval(demo_data, tmp_path):
    recipe, over = _scratch(demo_data, tmp_path, "s", "epochs=4", "warmup_epochs=1")
    s = train(recipe, over)
    assert s["epochs"] == 4 and len(s["history"]) == 4
    assert s["top1"] > 25.0  # it learns: 10 classes, chance is 10% (the demo measures quality)
    assert (tmp_path / "s" / "curves.png").stat().st_size > 0
    # timm's Data / Batch timing: in the log rows and over the run
    rows = [json.loads(line) for line in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= r["data_time"] <= r["batch_time"] for r in rows)
    assert 0 <= s["data_wait_share"] < 1 and s["batch_time"] > 0
    r = run_eval(str(demo_data[0] / "imagefolder" / "val"), str(tmp_path / "e.json"), checkpoint=s["checkpoint"])
    assert r["samples"] == demo_data[1]["test_samples"]
    # the same evaluation over webdataset shards (.jpg + .cls)
    from PIL import Image
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(demo_data[0] / "imagefolder" / "val"))
    samples = []
    for i, (path, label) in enumerate(ds.samples):
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, "PNG")
        samples.append((f"{i:05d}", {"png": buf.getvalue(), "cls": str(label).encode()}))
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "0.tar", samples)
    r2 = run_eval(str(tmp_path / "shards" / "0.tar"), str(tmp_path / "e2.json"), checkpoint=s["checkpoint"])
    assert r2["samples"] == r["samples"] and r2["top1"] == pytest.approx(r["top1"])
    # a checkpoint whose class count differs, without a new head asked for
    from crate_alpha.classifier.init import load_encoder
    from crate_alpha.classifier.trainer import build_model
    model = build_model({"model": "crate_alpha_demo_patch8_64", "img_size": 32, "drop_path": 0}, 1000)
    with pytest.raises(CheckpointError, match="10-class head but the model has 1000 classes; set new_head=True"):
        load_encoder(model, s["checkpoint"], new_head=False, load_patch_embed=True)


def test_finetune_from_clip_tower(demo_data, tmp_path):
    clip = open_clip.create_model("crate-alpha-demo")
    torch.save({"state_dict": clip.state_dict(), "epoch": 1}, tmp_path / "clip.pt")
    s = train(FINETUNE,
              [f"train_data={demo_data[0] / 'imagefolder' / 'train'}", f"val_data={demo_data[0] / 'imagefolder' / 'val'}",
               f"output={tmp_path}", "experiment=ft", "epochs=1", f"initial_checkpoint={tmp_path / 'clip.pt'}"])
    rec = json.loads((tmp_path / "ft" / "recipe.json").read_text())
    assert rec["init"]["new"] == ["head.bias", "head.weight"]
    ck = torch.load(s["checkpoint"], weights_only=True)
    assert ck["num_classes"] == 10 and ck["image_size"] == 64


def test_eval_converted_released_classifier(fixtures, demo_data, tmp_path):
    convert_official_torch(fixtures / "official_torch" / "crate_alpha_cls_shared.pth", tmp_path / "cls", heads=4)
    r = run_eval(str(demo_data[0] / "imagefolder" / "val"), str(tmp_path / "e.json"), model=f"local-dir:{tmp_path / 'cls'}")
    assert r["samples"] == demo_data[1]["test_samples"] and r["image_size"] == 32 and 0 <= r["top1"] <= 100
    # the same under torch.compile (cls-eval --torchcompile)
    rc = run_eval(str(demo_data[0] / "imagefolder" / "val"), str(tmp_path / "c.json"),
                  model=f"local-dir:{tmp_path / 'cls'}", torchcompile="inductor")
    assert rc["torchcompile"] == "inductor" and rc["top1"] == pytest.approx(r["top1"], abs=0.5)
    r = subprocess.run(["make", "-s", "cls-eval", f"VAL={demo_data[0] / 'imagefolder' / 'val'}",
                        f"MODEL=local-dir:{tmp_path / 'cls'}", f"EVAL_OUT={tmp_path / 'm.json'}"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "m.json").read_text())["samples"] == demo_data[1]["test_samples"]


def test_bad_data_path_fails_first(tmp_path, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("model built before the data check"))
    with pytest.raises(CrateAlphaError, match=f"{tmp_path / 'none'} does not exist"):
        train(SCRATCH, [f"train_data={tmp_path / 'none'}", f"output={tmp_path}"])


def test_resume_after_sigkill(demo_data, tmp_path):
    recipe, over = _scratch(demo_data, tmp_path, "r", "epochs=5")
    cmd = [sys.executable, "-m", "crate_alpha.cli", "cls-train", recipe, *over]
    latest = tmp_path / "r" / "checkpoints" / "latest.pt"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200  # a loaded machine is slow; the loop ends at epoch 2
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        if latest.exists() and torch.load(latest, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(latest, weights_only=True)["epoch"]
    assert 2 <= done < 5
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [h["epoch"] for h in s["history"]] == [1, 2, 3, 4, 5]
    assert r.stdout.count('"epoch"') == 5 - done  # only the remaining epochs ran
    # resuming the folder with another schedule is refused rather than mixed
    r = subprocess.run(cmd + ["epochs=6"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "another recipe (epochs 5 -> 6)" in r.stderr
    assert not [p for p in latest.parent.iterdir() if ".partial" in p.name]
    assert (tmp_path / "r" / "curves.png").stat().st_size > 0


def test_finetune_from_converted_released_weights(fixtures, demo_data, tmp_path):
    convert_official_torch(fixtures / "official_torch" / "crate_alpha_cls_shared.pth", tmp_path / "cls", heads=4)
    src = f"local-dir:{tmp_path / 'cls'}"
    s = train(FINETUNE,
              [f"model={src}", f"initial_checkpoint={src}", "img_size=48", "load_patch_embed=True", "epochs=1",
               f"train_data={demo_data[0] / 'imagefolder' / 'train'}", f"output={tmp_path}", "experiment=rel",
               "val_data=None"])
    rec = json.loads((tmp_path / "rel" / "recipe.json").read_text())
    assert rec["init"]["new"] == ["head.bias", "head.weight"]  # 48 px: the 4x4 grid was resampled to 6x6
    assert torch.load(s["checkpoint"], weights_only=True)["model"]["pos_embed"].shape == (1, 37, 64)


def test_train_on_shards(demo_data, tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(demo_data[0] / "imagefolder" / "train"))
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        samples = []
        for i in range(shard, 256, 2):
            path, label = ds.samples[i * 5]
            buf = io.BytesIO()
            Image.open(path).convert("RGB").save(buf, "JPEG")
            samples.append((f"{i:05d}", {"jpg": buf.getvalue(), "cls": str(label).encode()}))
        write_tar(tmp_path / "shards" / f"{shard}.tar", samples)
    s = train(SCRATCH,
              [f"train_data={tmp_path / 'shards' / '{0..1}.tar'}", "num_classes=10", "val_data=None", "epochs=2",
               "global_batch=32", f"output={tmp_path}", "experiment=wds"])
    assert [h["epoch"] for h in s["history"]] == [1, 2] and s["history"][-1]["train_loss"] < 2.4
    with pytest.raises(RecipeError, match="num_classes is needed for shard data"):
        train(SCRATCH,
              [f"train_data={tmp_path / 'shards' / '{0..1}.tar'}", "val_data=None", f"output={tmp_path}", "experiment=x"])


def test_torchrun_two_processes(demo_data, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    recipe, over = _scratch(demo_data, tmp_path, "ddp", "epochs=1", "global_batch=64", "warmup_epochs=0")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "crate_alpha.cli", "cls-train",
                        recipe, *over], capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "ddp" / "recipe.json").read_text())
    assert rec["world_size"] == 2 and rec["batch_per_process"] == 32
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["history"][0]["samples"] == demo_data[1]["test_samples"]
