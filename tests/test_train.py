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
from crate_alpha.clip.trainer import OPEN_CLIP_TRAIN_FLAGS, load, prepare_init, run, schedule
from crate_alpha.errors import CheckpointError, CrateAlphaError
from crate_alpha.recipe import RecipeError
from crate_alpha.clip.zeroshot import clip_benchmark_eval

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEMO_PRETRAIN = "clipa_crate_alpha_L14_84_pretrain:demo"
DEMO_FINETUNE = "clipa_crate_alpha_L14_224_finetune:demo"


def test_official_recipes():
    pre = load(str(CONFIGS / "clipa_crate_alpha_L14_84_pretrain.py"))
    s = schedule(pre, world_size=1, train_num_samples=1_000_000_000)
    assert (pre["force_image_size"], pre["force_context_length"], pre["global_batch"]) == (84, 32, 32768)
    assert s["lr"] == pytest.approx(1.024e-3) and s["warmup"] == 1600 and s["epochs"] == 3
    assert (pre["beta2"], pre["wd"], pre["grad_clip_norm"], pre["lock_text"]) == (0.95, 0.2, 1.0, True)
    # another machine: 8 processes, global batch 4096 -> per-process 512, lr and warm-up scaled
    s8 = schedule(dict(pre, global_batch=4096), world_size=8, train_num_samples=1_000_000_000)
    assert s8["batch_size"] == 512 and s8["lr"] == pytest.approx(1.28e-4) and s8["warmup"] == 12800
    ft = load("clipa_crate_alpha_L14_224_finetune")  # a shipped recipe, by name
    s = schedule(ft, world_size=1, train_num_samples=512_000_000)
    assert ft["force_image_size"] == 224 and ft["pos_embed_init"] == "sincos" and ft["lock_text"]
    assert s["lr"] == pytest.approx(5.12e-5) and s["warmup"] == 800 and s["epochs"] == 1


def test_unknown_recipe_key(tmp_path):
    (tmp_path / "bad.py").write_text("def get_config():\n    return dict(lr=1e-3)\n")
    with pytest.raises(RecipeError, match="unknown recipe key.*lr in .*known keys:.*lr_per_256"):
        load(str(tmp_path / "bad.py"))
    with pytest.raises(RecipeError, match="unknown recipe key.*learning_rate"):
        load(DEMO_PRETRAIN, ["learning_rate=1"])
    with pytest.raises(RecipeError, match="'weight_decay' .* is now called 'wd'"):
        load(DEMO_PRETRAIN, ["weight_decay=0.1"])
    with pytest.raises(RecipeError, match="unknown variant 'tiny'"):
        load("clipa_crate_alpha_L14_84_pretrain:tiny")
    with pytest.raises(RecipeError, match="neither a file nor a shipped recipe"):
        load("no_such_recipe")
    r = subprocess.run([sys.executable, "-m", "crate_alpha.cli", "pretrain", DEMO_PRETRAIN, "foo=1"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "unknown recipe key(s) foo" in r.stderr and "Traceback" not in r.stderr


def test_recipe_keys_are_open_clip_train_flags():
    from open_clip_train.params import parse_args

    known = vars(parse_args(["--model", "x"]))
    assert [k for k in (*OPEN_CLIP_TRAIN_FLAGS, "epochs") if k not in known] == []
    cfg = load(DEMO_PRETRAIN, ["train_data=x.tar", "torchcompile=True", "wd=0.05"])
    from crate_alpha.clip.trainer import open_clip_args
    args = open_clip_args(cfg, {"batch_size": 8, "lr": 1e-3, "warmup": 1, "epochs": 1}, 64, None)
    parsed = parse_args(args)  # open_clip_train itself reads what the recipe says
    assert parsed.torchcompile and parsed.wd == 0.05 and parsed.grad_clip_norm == 1.0
    assert parsed.force_image_size == [32] and parsed.logs == "runs/demo" and parsed.save_frequency == 0


def test_demo_recipes_are_variants_of_the_paper_recipes():
    paper, demo = load("clipa_crate_alpha_L14_84_pretrain"), load(DEMO_PRETRAIN)
    changed = {k for k in paper if paper[k] != demo[k]}
    # the schedule is the paper's; only size, batch and bookkeeping are the laptop's
    assert {"beta2", "wd", "grad_clip_norm", "lr_scheduler"}.isdisjoint(changed)
    from crate_alpha.device import bf16_is_fast

    # the paper's bf16 autocast, except on a CPU that would emulate bf16 (fp32 there)
    assert demo["precision"] == ("amp_bf16" if bf16_is_fast() else "fp32") and paper["precision"] == "amp_bf16"
    assert demo["model"] == "crate-alpha-demo" and demo["name"] == "clipa_crate_alpha_L14_84_pretrain-demo"


def test_missing_data_fails_first(tmp_path, no_model_build):
    missing = tmp_path / "nowhere" / "{00000..00003}.tar"
    with pytest.raises(CrateAlphaError, match=f"{tmp_path / 'nowhere'}.*does not exist"):
        run(DEMO_PRETRAIN, [f"train_data={missing}", f"logs={tmp_path}"])
    (tmp_path / "shards").mkdir()
    with pytest.raises(CrateAlphaError, match="matches no file"):
        run(DEMO_PRETRAIN, [f"train_data={tmp_path / 'shards' / '{0..9}.tar'}", f"logs={tmp_path}"])


def _small_checkpoint(path, size=32):
    m = open_clip.create_model("crate-alpha-demo", force_image_size=size)
    torch.save({"state_dict": m.state_dict(), "epoch": 1}, path)
    return m


@pytest.mark.parametrize("how", ["sincos", "resample"])
def test_finetune_init_position_grid(tmp_path, how):
    src = _small_checkpoint(tmp_path / "pre.pt", 32)
    cfg = load(DEMO_FINETUNE, [f"init_from={tmp_path / 'pre.pt'}", f"pos_embed_init={how}"])
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
    cfg = load(DEMO_PRETRAIN, [f"text_init={tmp_path / 'text.pt'}", "lock_text=True"])
    sd = torch.load(prepare_init(cfg, tmp_path / "run"), weights_only=True)["state_dict"]
    assert torch.equal(sd["transformer.resblocks.0.attn.in_proj_weight"],
                       src.transformer.resblocks[0].attn.in_proj_weight)
    assert torch.equal(sd["text_projection"], src.text_projection)
    assert not torch.equal(sd["visual.trunk.blocks.0.mlp.D"], src.visual.trunk.blocks[0].mlp.D)
    big = open_clip.create_model("crate-alpha-B-32", force_image_size=64)
    torch.save({"state_dict": big.state_dict()}, tmp_path / "big.pt")
    cfg = load(DEMO_PRETRAIN, [f"text_init={tmp_path / 'big.pt'}"])
    with pytest.raises(CheckpointError, match="does not fit crate-alpha-demo's text tower"):
        prepare_init(cfg, tmp_path / "run2")


def _train_cmd(demo_data, out, name, *extra):
    shards = demo_data[1]["train_shards"]
    return [sys.executable, "-m", "crate_alpha.cli", "pretrain", DEMO_PRETRAIN, f"train_data={shards}",
            f"logs={out}", f"name={name}", "global_batch=32", "train_num_samples=256", *extra]


def test_resume_after_sigkill(demo_data, tmp_path):
    cmd = _train_cmd(demo_data, tmp_path, "r", "epochs=4", "save_frequency=1")
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
    for p in ckpts.glob("epoch_*.pt"):  # rewritten by the second run, or written whole before the kill
        if p.name != "epoch_2.pt":  # the kill may land while it is written; resuming reads epoch_latest.pt
            torch.load(p, map_location="cpu", weights_only=True)
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


def test_two_runs_in_one_process_each_get_their_own(demo_data, tmp_path, monkeypatch):
    import open_clip_train.main as ocm

    from crate_alpha.data import loader

    seen = []
    make_loader, make_pair = loader.loader, loader.ToPair

    def spy_loader(dataset, workers, prefetch_factor=None):
        seen.append(("prefetch", prefetch_factor))
        return make_loader(dataset, workers, prefetch_factor)

    def spy_pair(image_transform, *args):
        seen.append(("image", type(image_transform).__name__))
        return make_pair(image_transform, *args)

    monkeypatch.setattr(loader, "loader", spy_loader)
    monkeypatch.setattr(loader, "ToPair", spy_pair)
    originals = (ocm.get_data, ocm.torch, ocm.optim, ocm.create_model_and_transforms)
    over = [f"train_data={demo_data[1]['train_shards']}", f"logs={tmp_path}", "epochs=1", "train_num_samples=64",
            "global_batch=32"]
    run(DEMO_PRETRAIN, over + ["name=a", "prefetch_factor=3"])
    run(DEMO_PRETRAIN, over + ["name=b", "fast_decode=False"])
    # the reduced-size decode and prefetch 3 for the first run only; open_clip_train restored after each
    assert seen == [("image", "Compose"), ("prefetch", 3), ("image", "_PilThen"), ("prefetch", 4)]  # 4: the recipe's
    assert (ocm.get_data, ocm.torch, ocm.optim, ocm.create_model_and_transforms) == originals
    a = (tmp_path / "a" / "out.log").read_text()
    assert a.count("Start epoch 0") == 1 and str(tmp_path / "b") not in a


def test_sample_shuffle_follows_the_seed():
    from crate_alpha.data.loader import Epoch, SampleShuffle

    def order(seed):
        epoch = Epoch(0)
        stage = SampleShuffle(seed, epoch, bufsize=50, initial=10)
        first = [list(stage(iter(range(200)))) for _ in range(2)]  # two passes within epoch 0
        epoch.set_value(1)
        return first + [list(stage(iter(range(200))))]

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c and a[0] != a[1] != a[2] and sorted(a[0]) == list(range(200))


def test_xla_and_remote_data_errors_are_clear(tmp_path, no_model_build):
    from crate_alpha.data.shards import count_samples

    with pytest.raises(CrateAlphaError, match="set train_num_samples=N"):
        count_samples(["pipe:gcloud storage cat gs://b/0.tar"])
    with pytest.raises(RecipeError, match="set device=xla"):
        load(DEMO_PRETRAIN, ["fsdp=True"])
    with pytest.raises(RecipeError, match="device must be cpu, cuda or xla"):
        load(DEMO_PRETRAIN, ["device=tpu"])
    try:
        import torch_xla  # noqa: F401
    except ImportError:  # the main environment: the error names the XLA one
        with pytest.raises(CrateAlphaError, match="make venv-xla"):
            run(DEMO_PRETRAIN, ["device=xla", f"logs={tmp_path}"])
