"""CLIPA training launcher on open_clip_train: recipes, data checks, initialisation, resume, torchrun."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

import crate_alpha
from crate_alpha.train.clip import prepare_init, run
from crate_alpha.train.recipe import RecipeError, load_recipe, schedule
from crate_alpha.zeroshot import clip_benchmark_eval

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def test_official_recipes():
    pre = load_recipe(str(CONFIGS / "clipa_crate_alpha_L14_84_pretrain.py"))
    s = schedule(pre, world_size=1, train_num_samples=1_000_000_000)
    assert (pre["image_size"], pre["context_length"], pre["global_batch"]) == (84, 32, 32768)
    assert s["lr"] == pytest.approx(1.024e-3) and s["warmup"] == 1600 and s["epochs"] == 3
    assert (pre["beta2"], pre["weight_decay"], pre["grad_clip"], pre["lock_text"]) == (0.95, 0.2, 1.0, True)
    # another machine: 8 processes, global batch 4096 -> per-process 512, lr and warm-up scaled
    s8 = schedule(dict(pre, global_batch=4096), world_size=8, train_num_samples=1_000_000_000)
    assert s8["batch_size"] == 512 and s8["lr"] == pytest.approx(1.28e-4) and s8["warmup"] == 12800
    ft = load_recipe(str(CONFIGS / "clipa_crate_alpha_L14_224_finetune.py"))
    s = schedule(ft, world_size=1, train_num_samples=512_000_000)
    assert ft["image_size"] == 224 and ft["pos_embed_init"] == "sincos" and ft["lock_text"]
    assert s["lr"] == pytest.approx(5.12e-5) and s["warmup"] == 800 and s["epochs"] == 1


def test_unknown_recipe_key(tmp_path):
    (tmp_path / "bad.py").write_text("def get_config():\n    return dict(lr=1e-3)\n")
    with pytest.raises(RecipeError, match="unknown recipe key.*lr in .*known keys:.*lr_per_256"):
        load_recipe(str(tmp_path / "bad.py"))
    with pytest.raises(RecipeError, match="unknown recipe key.*learning_rate"):
        load_recipe(str(CONFIGS / "demo_pretrain.py"), ["learning_rate=1"])
    r = subprocess.run([sys.executable, "-m", "crate_alpha.train", str(CONFIGS / "demo_pretrain.py"), "foo=1"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "unknown recipe key(s) foo" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def no_model_build(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)


def test_missing_data_fails_first(tmp_path, no_model_build):
    missing = tmp_path / "nowhere" / "{00000..00003}.tar"
    with pytest.raises(RecipeError, match=f"{tmp_path / 'nowhere'}.*does not exist"):
        run(str(CONFIGS / "demo_pretrain.py"), [f"train_data={missing}", f"output={tmp_path}"])
    (tmp_path / "shards").mkdir()
    with pytest.raises(RecipeError, match="matches no file"):
        run(str(CONFIGS / "demo_pretrain.py"), [f"train_data={tmp_path / 'shards' / '{0..9}.tar'}",
                                                f"output={tmp_path}"])


def _small_checkpoint(path, size=32):
    m = open_clip.create_model("crate-alpha-demo", force_image_size=size)
    torch.save({"state_dict": m.state_dict(), "epoch": 1}, path)
    return m


@pytest.mark.parametrize("how", ["sincos", "resample"])
def test_finetune_init_position_grid(tmp_path, how):
    src = _small_checkpoint(tmp_path / "pre.pt", 32)
    cfg = load_recipe(str(CONFIGS / "demo_finetune.py"), [f"init_from={tmp_path / 'pre.pt'}", f"pos_embed_init={how}"])
    sd = torch.load(prepare_init(cfg, tmp_path / "run"), weights_only=True)["state_dict"]
    pe = sd["visual.trunk.pos_embed"]
    assert pe.shape == (1, 65, 128)
    if how == "sincos":
        assert torch.allclose(pe[0, 1:], crate_alpha.sincos_2d_pos_embed((8, 8), 128))
    else:
        from timm.layers import resample_abs_pos_embed
        expected = resample_abs_pos_embed(src.visual.trunk.pos_embed.detach(), (8, 8), (4, 4), num_prefix_tokens=1,
                                          interpolation="bilinear", antialias=False)
        assert torch.allclose(pe, expected, atol=1e-6)
    assert torch.equal(sd["visual.trunk.blocks.0.mlp.D"], src.visual.trunk.blocks[0].mlp.D)


def test_text_init_loads_text_tower_only(tmp_path):
    torch.manual_seed(123)  # prepare_init seeds with the recipe's seed (0): make the source differ
    src = _small_checkpoint(tmp_path / "text.pt")
    cfg = load_recipe(str(CONFIGS / "demo_pretrain.py"), [f"text_init={tmp_path / 'text.pt'}", "lock_text=True"])
    sd = torch.load(prepare_init(cfg, tmp_path / "run"), weights_only=True)["state_dict"]
    assert torch.equal(sd["transformer.resblocks.0.attn.in_proj_weight"],
                       src.transformer.resblocks[0].attn.in_proj_weight)
    assert torch.equal(sd["text_projection"], src.text_projection)
    assert not torch.equal(sd["visual.trunk.blocks.0.mlp.D"], src.visual.trunk.blocks[0].mlp.D)
    big = open_clip.create_model("crate-alpha-B-32", force_image_size=64)
    torch.save({"state_dict": big.state_dict()}, tmp_path / "big.pt")
    cfg = load_recipe(str(CONFIGS / "demo_pretrain.py"), [f"text_init={tmp_path / 'big.pt'}"])
    with pytest.raises(RecipeError, match="does not fit crate-alpha-demo's text tower"):
        prepare_init(cfg, tmp_path / "run2")


def _train_cmd(demo_data, out, name, *extra):
    shards = demo_data[1]["train_shards"]
    return [sys.executable, "-m", "crate_alpha.train", str(CONFIGS / "demo_pretrain.py"), f"train_data={shards}",
            f"output={out}", f"name={name}", "global_batch=32", "train_num_samples=256", *extra]


def test_resume_after_sigkill(demo_data, tmp_path):
    cmd = _train_cmd(demo_data, tmp_path, "r", "epochs=4", "save_every_epochs=1")
    ckpts = tmp_path / "r" / "checkpoints"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "epoch_2.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "epoch_4.pt").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "r" / "out.log").read_text()
    assert "resuming checkpoint" in log
    assert log.count("Start epoch 0") == 1  # the second run did not start over
    for p in ckpts.iterdir():
        assert ".partial" not in p.name
        torch.load(p, map_location="cpu", weights_only=True)  # every checkpoint is whole
    assert torch.load(ckpts / "epoch_latest.pt", weights_only=True)["epoch"] == 4
    r = subprocess.run(cmd + ["epochs=5"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "another recipe (epochs 4 -> 5)" in r.stderr


def test_torchrun_two_processes_then_zeroshot(demo_data, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2"] + _train_cmd(
        demo_data, tmp_path, "ddp", "epochs=1", "local_loss=True", "gather_with_grad=True")[1:]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "ddp" / "out.log").read_text()
    assert "distributed mode with multiple processes" in log and "total 2." in log
    ckpt = tmp_path / "ddp" / "checkpoints" / "epoch_1.pt"
    res = clip_benchmark_eval("crate-alpha-demo", "wds/digits", str(demo_data[0] / "wds"),
                              str(tmp_path / "zs_ckpt.json"), checkpoint=str(ckpt))
    assert 0.0 <= res["metrics"]["acc1"] <= 1.0 and res["dataset"] == "wds/digits"
    # the same weights as a local-dir folder, evaluated by the same runner
    from crate_alpha.convert.folders import export_open_clip_checkpoint
    export_open_clip_checkpoint(ckpt, "crate-alpha-demo", tmp_path / "folder", image_size=64)
    res2 = clip_benchmark_eval(f"local-dir:{tmp_path / 'folder'}", "wds/digits", str(demo_data[0] / "wds"),
                               str(tmp_path / "zs_dir.json"))
    assert res2["metrics"]["acc1"] == pytest.approx(res["metrics"]["acc1"])


def test_two_runs_in_one_process_keep_separate_logs(demo_data, tmp_path):
    over = [f"train_data={demo_data[1]['train_shards']}", f"output={tmp_path}", "epochs=1", "train_num_samples=64",
            "global_batch=32"]
    run(str(CONFIGS / "demo_pretrain.py"), over + ["name=a"])
    run(str(CONFIGS / "demo_pretrain.py"), over + ["name=b"])
    a = (tmp_path / "a" / "out.log").read_text()
    assert a.count("Start epoch 0") == 1 and str(tmp_path / "b") not in a


def test_sample_shuffle_follows_the_seed():
    from crate_alpha.train.hooks import SeededShuffle

    def order(seed):
        torch.manual_seed(seed)
        stage = SeededShuffle(bufsize=50, initial=10)
        return [list(stage.run(iter(range(200)))) for _ in range(2)]  # two passes

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c and a[0] != a[1] and sorted(a[0]) == list(range(200))


def test_xla_and_remote_data_errors_are_clear(tmp_path, no_model_build):
    from crate_alpha.train.clip import count_samples

    with pytest.raises(RecipeError, match="set train_num_samples=N"):
        count_samples(["pipe:gcloud storage cat gs://b/0.tar"])
    with pytest.raises(RecipeError, match="set device=xla"):
        load_recipe(str(CONFIGS / "demo_pretrain.py"), ["fsdp=True"])
    with pytest.raises(RecipeError, match="device must be cpu, cuda or xla"):
        load_recipe(str(CONFIGS / "demo_pretrain.py"), ["device=tpu"])
    try:
        import torch_xla  # noqa: F401
    except ImportError:  # the main environment: the error names the XLA one
        with pytest.raises(RecipeError, match="make venv-xla"):
            run(str(CONFIGS / "demo_pretrain.py"), ["device=xla", f"output={tmp_path}"])
