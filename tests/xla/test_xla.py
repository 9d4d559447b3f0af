"""Both trainers on an XLA device (XLA:CPU, PJRT_DEVICE=CPU): parity with CPU eager, one
compilation, resume after kill -9, SPMD FSDP over several CPU devices. Run by `make test-xla`
in .venv-xla (torch 2.9.0 + torch_xla 2.9.0)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import timm
import torch

import crate_alpha  # noqa: F401
from crate_alpha.classifier.evaluate import run_eval
from crate_alpha.clip.zeroshot import clip_benchmark_eval

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(crate_alpha.__file__).parent / "model_configs"
STEPS = 20


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU")
    env.pop("CPU_NUM_DEVICES", None)
    if devices > 1:
        env["CPU_NUM_DEVICES"] = str(devices)
    return env


def _run(args, devices=1, check=True):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=_env(devices),
                       timeout=900)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _clip(demo_data, out, name, *extra, workers=0):
    # workers=0 where runs are compared: the data order then depends on --seed alone, not on a
    # loader worker's seed (drawn from the main process's generator, which model building on
    # XLA advances differently)
    return ["crate_alpha.cli", "pretrain", "clipa_crate_alpha_L14_84_pretrain:demo",
            f"train_data={demo_data[1]['train_shards']}", f"logs={out}", f"name={name}", f"workers={workers}",
            *extra]


def _cls(demo_data, out, name, *extra):
    return ["crate_alpha.cli", "cls-train", "cls_crate_alpha_B16_in21k_pretrain:demo",
            f"train_data={demo_data[0] / 'imagefolder' / 'train'}", "val_data=None", f"output={out}",
            f"experiment={name}",
            *extra]


def _clip_losses(run_dir: Path):
    # open_clip_train's own log (5 significant digits), one line per step with log_every_n_steps=1
    return [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+) ", (run_dir / "out.log").read_text())]


def _cls_losses(run_dir: Path):
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _compiles(run_dir: Path):
    return [s["compiles"] for s in json.loads((run_dir / "xla_metrics.json").read_text())["steps"]]


def _close(a, b, rel=1e-3):
    assert len(a) == len(b) >= STEPS
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst <= rel, f"largest relative loss difference {worst:.2e} (CPU {a}, XLA {b})"


# ---- forward parity --------------------------------------------------------------------

CONFIGS_CRATE_ALPHA = sorted(p.stem for p in CONFIG_DIR.glob("crate-alpha-*.json"))


@pytest.fixture
def two_layers(monkeypatch):
    """Every config's widths, heads and patch size, but two layers per tower (small shapes)."""
    create = timm.create_model

    def shallow(name, **kw):
        return create(name, **({"depth": 2} if name.startswith("crate_alpha") else {}), **kw)

    monkeypatch.setattr(open_clip.timm_model.timm, "create_model", shallow)
    return 2


@pytest.mark.parametrize("name", CONFIGS_CRATE_ALPHA)
def test_forward_each_open_clip_config_matches_cpu(name, two_layers):
    import torch_xla

    assert len(CONFIGS_CRATE_ALPHA) >= 10
    cfg = open_clip.get_model_config(name)
    patch = int(re.search(r"patch(\d+)", cfg["vision_cfg"]["timm_model_name"]).group(1))
    text = dict(cfg["text_cfg"], layers=two_layers)
    torch.manual_seed(0)
    model = open_clip.create_model(name, force_image_size=patch * 3, text_cfg=text).eval()
    assert len(model.visual.trunk.blocks) == two_layers and len(model.transformer.resblocks) == two_layers
    images = torch.randn(2, 3, patch * 3, patch * 3)
    tokens = torch.randint(0, cfg["text_cfg"]["vocab_size"], (2, text["context_length"]))
    with torch.no_grad():
        img_cpu, txt_cpu = model.encode_image(images), model.encode_text(tokens)
        dev = torch_xla.device()
        model.to(dev)
        img_xla = model.encode_image(images.to(dev)).cpu()
        txt_xla = model.encode_text(tokens.to(dev)).cpu()
    torch.testing.assert_close(img_xla, img_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(txt_xla, txt_cpu, atol=1e-4, rtol=1e-4)


# ---- trainers: parity, compile count ---------------------------------------------------

def test_clip_recipe_20_steps_match_cpu_and_compile_once(demo_data, tmp_path):
    common = ("epochs=1", f"train_num_samples={64 * STEPS}", "log_every_n_steps=1", "precision=fp32")
    _run(_clip(demo_data, tmp_path, "cpu", "device=cpu", *common))
    _run(_clip(demo_data, tmp_path, "xla", "device=xla", *common))
    _close(_clip_losses(tmp_path / "cpu"), _clip_losses(tmp_path / "xla"))
    compiles = _compiles(tmp_path / "xla")
    assert len(compiles) == STEPS and len(set(compiles[2:])) == 1, compiles  # constant after step 3
    # the XLA run's checkpoint is a CPU/GPU checkpoint: zero-shot on CPU without torch_xla tensors
    ckpt = tmp_path / "xla" / "checkpoints" / "epoch_latest.pt"
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {v.device.type for v in sd["state_dict"].values()} == {"cpu"} and sd["epoch"] == 1
    res = clip_benchmark_eval("crate-alpha-demo", "wds/digits", str(demo_data[0] / "wds"),
                              str(tmp_path / "zs.json"), checkpoint=str(ckpt))
    assert 0.0 <= res["metrics"]["acc1"] <= 1.0


def test_clip_recipe_bf16_on_xla(demo_data, tmp_path):
    # the recipe's own precision (amp_bf16) and loader worker (a forked one: torch_xla's
    # launcher starts the device process by spawn): runs, learns, and compiles once
    _run(_clip(demo_data, tmp_path, "bf16", "device=xla", "epochs=1", f"train_num_samples={64 * STEPS}",
               "log_every_n_steps=1", workers=1))
    losses = _clip_losses(tmp_path / "bf16")
    assert len(losses) == STEPS and sum(losses[-5:]) < sum(losses[:5])
    assert len(set(_compiles(tmp_path / "bf16")[2:])) == 1


def test_device_loader_raises_what_the_cpu_loader_raised():
    from crate_alpha.device.xla import DeviceLoader

    def broken():
        yield torch.zeros(2, 3)
        raise RuntimeError("shard list is broken")

    class Loader:
        def __iter__(self):
            return broken()

        def __len__(self):
            return 2

    got = []
    with pytest.raises(RuntimeError, match="shard list is broken"):
        for batch in DeviceLoader(Loader()):
            got.append(batch.cpu())
    assert len(got) == 1 and got[0].shape == (2, 3)


def test_xla_device_seam(tmp_path):
    """crate_alpha.device's XLA side in this process: no launcher and no SPMD (those run in subprocesses)."""
    import torch.optim.optimizer as torch_optimizer

    from crate_alpha.device import XlaDevice, for_name
    from crate_alpha.device.xla import DeviceLoader, has_xla_tensors

    dev = for_name("xla")
    assert isinstance(dev, XlaDevice)
    dev.check_ready()
    assert dev.world_size() == 1
    rank, local, world, device = dev.join_process_group()
    assert (rank, local, world, device.type) == (0, 0, 1, "xla")
    assert dev.ddp_device_ids([device]) is None and not dev.fused_optimizer
    assert dev.batch_device == torch.device("cpu")  # uint8 batches are normalised before the device loader

    loader = dev.wrap_loader([torch.ones(2, 3), torch.zeros(2, 3)])
    assert isinstance(loader, DeviceLoader) and len(loader) == 2
    assert [b.device.type for b in loader] == ["xla", "xla"]
    assert dev.shard(torch.nn.Linear(3, 3)) == 0  # sharding is fsdp's

    # the step boundary after each optimizer step: one compilation, metrics per step, hook removed after
    model = torch.nn.Linear(3, 1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = dict(torch_optimizer._global_optimizer_post_hooks)
    with dev.optimizer_hooks(tmp_path / "xla_metrics.json"):
        for x in loader:
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        assert len(dev.metrics.steps) == 2
    assert dict(torch_optimizer._global_optimizer_post_hooks) == before and dev.metrics is None
    steps = json.loads((tmp_path / "xla_metrics.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["compiles"] >= 1 for s in steps)

    # a checkpoint saved from XLA tensors loads without torch_xla's tensors (it is a CPU one)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}
    assert has_xla_tensors(state)
    dev.save(state, tmp_path / "latest.pt")
    back = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert not has_xla_tensors(back) and back["epoch"] == 1
    torch.testing.assert_close(back["model"]["weight"], model.weight.cpu())


def test_cls_recipe_20_steps_match_cpu_and_compile_once(demo_data, tmp_path):
    common = ("epochs=1", "global_batch=64", "log_interval=1", "amp=False")
    _run(_cls(demo_data, tmp_path, "cpu", "device=cpu", *common))
    _run(_cls(demo_data, tmp_path, "xla", "device=xla", *common))
    cpu, xla = _cls_losses(tmp_path / "cpu"), _cls_losses(tmp_path / "xla")
    _close(cpu, xla)
    compiles = _compiles(tmp_path / "xla")
    assert len(compiles) >= STEPS and len(set(compiles[2:])) == 1, compiles
    # evaluates on CPU with cls-eval
    r = run_eval(str(demo_data[0] / "imagefolder" / "val"), str(tmp_path / "e.json"),
                 checkpoint=str(tmp_path / "xla" / "checkpoints" / "latest.pt"))
    assert r["samples"] == demo_data[1]["test_samples"]
    # SPMD FSDP over four CPU devices: the same losses from the same recipe
    _run(_cls(demo_data, tmp_path, "fsdp", "device=xla", "fsdp=True", *common), devices=4)
    _close(cpu, _cls_losses(tmp_path / "fsdp"))


def test_cls_mixup_runs_on_host(demo_data, tmp_path):
    # Mixup/CutMix on the device would give each step a new graph; on the host it compiles once
    _run(_cls(demo_data, tmp_path, "mix", "device=xla", "epochs=1", "global_batch=64", "mixup=0.8", "cutmix=1.0"))
    compiles = _compiles(tmp_path / "mix")
    assert len(compiles) >= STEPS and len(set(compiles[2:])) == 1, compiles


# ---- resume after kill -9 --------------------------------------------------------------

def test_kill_mid_run_then_resume_on_xla(demo_data, tmp_path):
    args = _clip(demo_data, tmp_path, "r", "device=xla", "epochs=4", "global_batch=32", "train_num_samples=256",
                 "save_frequency=1")
    ckpts = tmp_path / "r" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", *args], start_new_session=True, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts / "epoch_2.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its device process
    proc.wait()
    assert not (ckpts / "epoch_4.pt").exists()
    _run(args)
    log = (tmp_path / "r" / "out.log").read_text()
    assert "resuming checkpoint" in log and log.count("Start epoch 0") == 1
    for p in ckpts.glob("epoch_*.pt"):  # rewritten by the second run, or written whole before the kill
        if p.name != "epoch_2.pt":  # the kill may land while it is written; resuming reads epoch_latest.pt
            torch.load(p, map_location="cpu", weights_only=True)
    assert torch.load(ckpts / "epoch_latest.pt", weights_only=True)["epoch"] == 4


# ---- SPMD FSDP -------------------------------------------------------------------------

FSDP_STEP = r"""
import json, sys, torch, timm, crate_alpha
from crate_alpha.device import xla
mesh = xla.use_spmd()
import torch_xla, torch_xla.runtime as xr
torch.manual_seed(0)
model = timm.create_model("crate_alpha_demo_patch8_64", num_classes=10, img_size=32)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
def step(m, x, y):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    opt.step()
    return loss
ref = timm.create_model("crate_alpha_demo_patch8_64", num_classes=10, img_size=32)
ref.load_state_dict(model.state_dict())
loss_cpu = step(ref, x, y).item()
dev = torch_xla.device()
model.to(dev)
n = xla.shard_module(model, mesh)
specs = [torch_xla._XLAC._get_xla_sharding_spec(p) for p in model.parameters() if p.dim() >= 2]
loss = step(model, *xla.shard_batch((x.to(dev), y.to(dev)), mesh))
xla.sync()
diff = max((a.cpu() - b).abs().max().item() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
print(json.dumps({"devices": xr.global_runtime_device_count(), "sharded": n, "specs": specs,
                  "loss": loss.item(), "loss_cpu": loss_cpu, "param_diff": diff}))
"""


def test_fsdp_sharded_step_equals_unsharded():
    r = subprocess.run([sys.executable, "-c", FSDP_STEP], capture_output=True, text=True, env=_env(4), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["sharded"] > 10
    assert all("devices=[4" in s for s in out["specs"]), out["specs"][:3]  # really split four ways
    assert out["loss"] == pytest.approx(out["loss_cpu"], rel=1e-5)
    assert out["param_diff"] < 1e-4  # one AdamW step of lr 1e-3: a tenth of the step size


def test_xla_errors_are_one_line(demo_data, tmp_path):
    r = _run(_clip(demo_data, tmp_path, "e", "device=xla"), devices=4, check=False)
    assert r.returncode == 2 and "one device per process" in r.stderr and "fsdp=True" in r.stderr
    r = _run(_clip(demo_data, tmp_path, "e", "fsdp=True"), check=False)
    assert r.returncode == 2 and "set device=xla" in r.stderr
