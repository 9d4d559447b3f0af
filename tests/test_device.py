"""The device seam (crate_alpha.device) on the CPU; its XLA side is in tests/xla/test_xla.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.optim.optimizer as torch_optimizer

from crate_alpha.device import CpuDevice, CudaDevice, XlaDevice, for_name
from crate_alpha.errors import RecipeError

SRC = Path(__file__).resolve().parents[1] / "src" / "crate_alpha"


def test_for_name_picks_each_device(monkeypatch):
    assert isinstance(for_name("cpu"), CpuDevice)
    assert isinstance(for_name("cuda"), CudaDevice)
    assert isinstance(for_name("xla"), XlaDevice)
    assert for_name("xla", fsdp=True).fsdp
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert for_name(None).name == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert for_name(None).name == "cuda"


@pytest.mark.parametrize("name", ["tpu", "CPU", "cuda:0", "", 0])
def test_for_name_refuses_other_devices_in_one_line(name):
    with pytest.raises(RecipeError, match="device must be cpu, cuda or xla") as e:
        for_name(name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", [None, "cpu", "cuda"])
def test_fsdp_needs_xla(name):
    with pytest.raises(RecipeError, match="fsdp=True is the SPMD sharding of XLA devices"):
        for_name(name, fsdp=True)


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="no CUDA device"):
        for_name("cuda").check_ready()
    for_name("cpu").check_ready()


def test_what_each_device_tells_the_trainers():
    cpu, cuda, xla = for_name("cpu"), for_name("cuda"), for_name("xla")
    assert [d.name for d in (cpu, cuda, xla)] == ["cpu", "cuda", "xla"]
    assert [d.dist_backend for d in (cpu, cuda, xla)] == ["gloo", "nccl", "xla"]
    # DistributedDataParallel refuses device_ids for CPU and XLA modules
    assert cpu.ddp_device_ids([torch.device("cpu")]) is None
    assert xla.ddp_device_ids(["xla:0"]) is None
    assert cuda.ddp_device_ids([3]) == [3]
    assert (cpu.pin_memory, cuda.pin_memory, xla.pin_memory) == (False, True, False)
    assert (cpu.fused_optimizer, cuda.fused_optimizer, xla.fused_optimizer) == (True, True, False)
    assert cpu.batch_device == xla.batch_device == torch.device("cpu")
    assert cuda.batch_device.type == "cuda"
    assert cpu.open_clip_train_args() == cuda.open_clip_train_args() == []
    assert xla.open_clip_train_args() == ["--dist-url", "xla://", "--no-set-device-rank"]
    assert cpu.ddp_kwargs == {} and xla.ddp_kwargs == {"gradient_as_bucket_view": True}


def test_world_size_and_process_group_from_torchrun_variables(monkeypatch):
    dev = for_name("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dev.world_size() == 1
    assert tuple(dev.join_process_group()) == (0, 0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()  # one process: no group
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dev.world_size() == 4
    assert for_name("xla", fsdp=True).world_size() == 1  # SPMD: one process drives every device


def test_launch_runs_in_this_process_on_cpu():
    seen = []
    assert for_name("cpu").launch(lambda i, a, b: seen.append((i, a, b)) or "done", ("a", 2)) == "done"
    assert seen == [(0, "a", 2)]


def _global_post_hooks():
    return dict(torch_optimizer._global_optimizer_post_hooks)


def test_optimizer_hooks_run_the_step_boundary_and_are_removed(monkeypatch):
    dev = for_name("cpu")
    calls = []
    monkeypatch.setattr(dev, "step_boundary", lambda: calls.append(1))
    before = _global_post_hooks()
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=dev.fused_optimizer)
    with dev.optimizer_hooks() as d:
        assert d is dev
        assert len(_global_post_hooks()) == len(before) + 1
        for _ in range(3):
            p.sum().backward()
            opt.step()
    assert calls == [1, 1, 1]
    assert _global_post_hooks() == before
    opt.step()
    assert calls == [1, 1, 1]  # no boundary once outside


def test_optimizer_hooks_are_removed_when_the_loop_raises():
    dev = for_name("cpu")
    before = _global_post_hooks()
    with pytest.raises(KeyboardInterrupt):
        with dev.optimizer_hooks():
            raise KeyboardInterrupt
    assert _global_post_hooks() == before


def test_save_writes_a_whole_loadable_checkpoint(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "history": "[]"}
    path = for_name("cpu").save(state, tmp_path / "ckpt" / "latest.pt")
    assert Path(path) == tmp_path / "ckpt" / "latest.pt"
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["latest.pt"]  # no partial file left


def test_loader_and_model_pass_unchanged_on_cpu():
    dev = for_name("cpu")
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2)
    assert dev.wrap_loader(loader) is loader
    model = torch.nn.Linear(2, 2)
    assert dev.shard(model) == 0
    assert dev.to_cpu(loader) is loader
    assert dev.peak_memory(lambda: None) is None  # no allocator counter on the CPU


def test_no_module_outside_device_compares_device_strings():
    out = subprocess.run(["grep", "-rnE", r'== "(xla|cuda|cpu)"|"cpu", "xla"|"cpu", "cuda"', str(SRC),
                          "--include=*.py"], capture_output=True, text=True).stdout
    outside = [line for line in out.splitlines() if f"{SRC}/device/" not in line]
    assert outside == [], "\n".join(outside)


def test_importing_the_seam_needs_no_torch_xla():
    code = "import sys, crate_alpha.device; sys.exit('torch_xla' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
