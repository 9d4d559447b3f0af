"""Speed of CRATE-α on this machine (``make bench``, ``crate-alpha bench``).

Side by side, in one run, for one model size: CRATE-α eager, CRATE-α under
``torch.compile``, CRATE-α computed in the official einsum form (``crate_alpha.models.official``,
same weights) and timm's ViT of the same width, depth, heads and patch; each in fp32 and
bf16 autocast, for inference and for a train step (forward, backward, AdamW). Per row:
median step time, images/s, peak memory, model FLOPs (``FlopCounterMode``) and achieved
FLOP/s against a GEMM peak measured here with a large matmul in the same precision.

Writes ``runs/bench/model.json`` and ``runs/bench/model.png`` (throughput and fraction of
peak per variant). ``--quick`` runs the tiny demo model at 32 px (seconds, for tests).
``--xla`` instead times a train step on XLA:CPU beside eager CPU (run it from .venv-xla,
which has torch_xla) and writes ``runs/bench/xla.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..common import atomic_write, write_json
from ..device import Device, default_name, for_name
from ..models.official import official_form

VARIANTS = ("crate-alpha eager", "crate-alpha compiled", "official einsum", "timm vit")
PRECISIONS = ("fp32", "bf16")
MODES = ("inference", "train step")

# Sized for a default run within ~10 minutes on 2 CPU cores: B/16 at 224 took 3.7 minutes there
# with torch.compile's cache warm; a cold cache adds the four compilations (~30-80 s each).
# Each row runs 2 untimed steps plus the repeats, and the train step (about 3x the forward
# per image) gets half the inference batch.
DEFAULTS = dict(model="crate_alpha_base_patch16_224", res=224, batch=8, train_batch=4, repeats=3, gemm_size=4096)
QUICK = dict(model="crate_alpha_demo_patch8_64", res=32, batch=8, train_batch=4, repeats=2, gemm_size=512)
# --xla keeps the sizes it had before the model benchmark grew: the demo model, batch 64.
XLA_DEFAULTS = dict(model="crate_alpha_demo_patch8_64", res=32, batch=64, repeats=5)
XLA_QUICK = dict(model="crate_alpha_demo_patch8_64", res=32, batch=8, repeats=2)

PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated over one step",
    "cpu": "parameters, buffers, optimizer state and input resident before the step, plus the peak of the "
           "step's own allocations replayed from torch.profiler memory events",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"a CRATE-α timm name (default {DEFAULTS['model']}; --quick: {QUICK['model']})")
    p.add_argument("--res", type=int, help=f"input resolution (default {DEFAULTS['res']}; --quick: {QUICK['res']})")
    p.add_argument("--batch", type=int, help=f"images per inference step (default {DEFAULTS['batch']}); with --xla "
                                             f"the train-step batch (default {XLA_DEFAULTS['batch']})")
    p.add_argument("--train-batch", type=int, help=f"images per train step (default {DEFAULTS['train_batch']})")
    p.add_argument("--repeats", type=int, help=f"timed steps per row, median reported (default "
                                               f"{DEFAULTS['repeats']}; --clipa: {CLIPA_DEVICE_REPEATS} on an "
                                               f"accelerator, {CLIPA_CPU_REPEATS} on a CPU)")
    p.add_argument("--gemm-size", type=int, help=f"N of the N x N x N matmul that measures the peak "
                                                 f"(default {DEFAULTS['gemm_size']})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if there is one, else cpu)")
    p.add_argument("--quick", action="store_true", help="the tiny demo model at 32 px: seconds instead of minutes")
    p.add_argument("--out", default="runs/bench/model.json", help="results JSON; the PNG and --xla's xla.json go "
                                                                  "beside it")
    p.add_argument("--clipa", action="store_true", help="the CLIPA resolution effect instead: the L/14 image tower's "
                                                        "train step at 84, 112 and 224 px (writes clipa.json + PNG)")
    p.add_argument("--clipa-batch", type=int, help=f"per-device batch of --clipa (default {CLIPA_DEVICE_BATCH} on a "
                                                   f"GPU, the recipe's; {CLIPA_CPU_BATCH} on a CPU)")
    p.add_argument("--xla", action="store_true", help="train step on XLA:CPU beside eager CPU (needs torch_xla: "
                                                      ".venv-xla); writes xla.json beside --out")
    p.add_argument("--optimizer", action="store_true", help="one AdamW step, torch's fused kernel against its default, "
                                                            "over CRATE-α parameters (writes optimizer.json beside --out)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crate_alpha.apps.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _resolve(args: argparse.Namespace, defaults: Dict) -> argparse.Namespace:
    # Options left unset take the mode's own default, so --quick and --xla can still be
    # combined with, say, --res.
    a = argparse.Namespace(**vars(args))
    for key, value in defaults.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def run(args: argparse.Namespace) -> int:
    if getattr(args, "clipa", False):
        return _run_clipa(args)
    if getattr(args, "optimizer", False):
        from .bench_optimizer import run as bench_optimizer

        bench_optimizer(_device(args.device), Path(args.out).with_name("optimizer.json"))
        return 0
    if args.xla:
        return _run_xla(_resolve(args, XLA_QUICK if args.quick else XLA_DEFAULTS))
    a = _resolve(args, QUICK if args.quick else DEFAULTS)
    device = _device(a.device)
    result = bench(a.model, a.res, a.batch, a.train_batch, a.repeats, a.gemm_size, device)
    print_table(result)
    out = Path(a.out)
    write_json(result, out)
    png = plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return 0


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------

def _device(spec: str) -> torch.device:
    """--device: 'auto' is what a recipe without a device trains on (cuda when there is one, else cpu)."""
    device = torch.device(default_name() if spec == "auto" else spec)
    for_name(device.type)  # one line for a device the trainers have no seam for
    return device


def _seam(device: torch.device) -> Device:
    return for_name(device.type)


def _sync(device: torch.device) -> None:
    _seam(device).synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def gemm_peak(device: torch.device, n: int, repeats: int) -> Dict[str, float]:
    """FLOP/s of an n x n x n matmul per precision, the best of a few: the machine's practical peak."""
    peaks = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b
        best = min(_timed(lambda: a @ b, device) for _ in range(max(repeats, 3)))
        peaks[precision] = 2 * n ** 3 / best
    return peaks


@contextlib.contextmanager
def _quiet_stderr():
    # Kineto prints its start/stop lines (and, without a GPU, a device-count error) straight
    # to file descriptor 2 on every profiled step; Python-level redirection cannot catch them.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _resident_bytes(*objs) -> int:
    """Bytes of the distinct storages behind the given tensors (shared storages counted once)."""
    storages = {}
    for t in objs:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def peak_memory(fn: Callable[[], object], device: torch.device, resident: Callable[[], int]) -> int:
    """Peak bytes held while ``fn`` runs once, including what was resident before it.

    CUDA: the caching allocator's own peak counter. CPU has no such counter, so: the
    bytes already resident (``resident()``: weights, optimizer state, input) plus the
    highest point of the running sum of the step's allocations and frees, as recorded by
    torch.profiler's memory events. Those events come from c10's CPU allocator, so they
    also see the buffers of torch.compile's generated code, which a TorchDispatchMode
    tracker would miss, and they need no fresh process (peak RSS in a subprocess would
    have to compile the model again, and counts the allocator's cached pages too).
    Memory that oneDNN or OpenMP allocate outside torch's allocator is not counted.
    """
    counted = _seam(device).peak_memory(fn, device)
    if counted is not None:
        return counted
    from torch.profiler import ProfilerActivity, profile

    base = resident()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # Device Type 0 is the CPU; frees of tensors allocated before profiling started carry
    # no size (the allocator did not record them), so they do not lower the baseline.
    mem = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                 if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
    level = peak = 0
    for _, nbytes in mem:
        level += nbytes
        peak = max(peak, level)
    return base + peak


def count_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> int:
    """FLOPs of one step of ``mode`` at batch ``len(x)``, counted on one image and scaled.

    Attention runs through the math SDPA backend while counting, because the fused CPU
    kernel is not in FlopCounterMode's table and would count as zero; the math backend's
    matmuls do the same arithmetic, so eager, compiled and official CRATE-α (explicit
    matmuls) and timm's ViT are all counted alike. Every op here is per-image, so
    counting one image and scaling is exact.
    """
    x1, y1 = x[:1], y[:1]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if mode == "inference":
            with torch.no_grad():
                model.eval()(x1)
        else:
            model.train()
            F.cross_entropy(model(x1), y1).backward()
            model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * len(x)


# --------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------

def _same_size_vit(crate: nn.Module, name: str, res: int) -> tuple:
    """timm's ViT with CRATE-α's width, depth, heads and patch: (model, its name).

    The registered timm name (crate_alpha_base_patch16_224 -> vit_base_patch16_224) when
    one has these sizes (CRATE-α-S is wider than ViT-S), else timm's VisionTransformer
    built with them.
    """
    size = dict(embed_dim=crate.embed_dim, depth=len(crate.blocks), num_heads=crate.blocks[0].attn.num_heads,
                patch_size=tuple(crate.patch_embed.patch_size))
    vit_name = name.replace("crate_alpha_", "vit_", 1)
    if timm.is_model(vit_name):
        vit = timm.create_model(vit_name, img_size=res, num_classes=crate.num_classes)
        if dict(embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=vit.blocks[0].attn.num_heads,
                patch_size=tuple(vit.patch_embed.patch_size)) == size:
            return vit, vit_name
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=res, num_classes=crate.num_classes, **size)
    p = size["patch_size"][0]
    return vit, f"VisionTransformer(w{size['embed_dim']}, d{size['depth']}, h{size['num_heads']}, patch {p})"


def build_variant(variant: str, name: str, res: int, device: torch.device) -> tuple:
    """(module to run, module that owns the parameters, model name) of one variant.

    Every CRATE-α variant starts from the same seed, so all three hold the same weights.
    """
    torch.manual_seed(0)
    crate = timm.create_model(name, img_size=res).to(device)
    if variant == "crate-alpha eager":
        return crate, crate, name
    if variant == "crate-alpha compiled":
        # Static shapes: inference and train batches differ, and a dynamic-shape graph
        # after the second size would time different code than the first.
        return torch.compile(crate, dynamic=False), crate, name
    if variant == "official einsum":
        official = official_form(crate)
        return official, official, f"{name} (official einsum form)"
    if variant == "timm vit":
        vit, vit_name = _same_size_vit(crate, name, res)
        return vit.to(device), vit, vit_name
    raise ValueError(f"unknown variant {variant!r}")


def _step(model: nn.Module, params: nn.Module, x, y, mode: str, precision: str, device: torch.device):
    """The step function of one row and the optimizer (None for inference) it updates."""
    if mode == "inference":
        params.eval()

        def infer():
            with torch.no_grad(), _autocast(device, precision):
                return model(x)
        return infer, None
    params.train()
    opt = torch.optim.AdamW(params.parameters(), lr=1e-4)

    def train():
        with _autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train, opt


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def measure(model: nn.Module, params: nn.Module, x, y, mode: str, precision: str, device: torch.device,
            repeats: int) -> dict:
    fn, opt = _step(model, params, x, y, mode, precision, device)
    # The first call compiles (compiled variant) and creates AdamW's state (train step);
    # the profiled memory step then serves as a second warm-up before the timed ones.
    first = _timed(fn, device)

    def resident() -> int:
        state = [t for s in (opt.state.values() if opt else ()) for t in s.values()]
        inputs = (x,) if opt is None else (x, y)
        return _resident_bytes(*params.parameters(), *params.buffers(), *state, *inputs)

    mem = peak_memory(fn, device, resident)
    times = [_timed(fn, device) for _ in range(repeats)]
    return {"seconds": statistics.median(times), "first_call_s": first, "peak_mem_bytes": mem}


def bench(name: str, res: int, batch: int, train_batch: int, repeats: int, gemm_size: int,
          device: torch.device) -> dict:
    print(f"measuring the GEMM peak ({gemm_size}^3 matmul) ...", flush=True)
    peaks = gemm_peak(device, gemm_size, repeats)
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for mode, n in (("inference", batch), ("train step", train_batch)):
        x = torch.randn(n, 3, res, res, generator=g).to(device)
        inputs[mode] = (x, torch.randint(0, 1000, (n,), generator=g).to(device))
    rows: List[dict] = []
    flops: Dict[tuple, int] = {}
    official_err: Optional[float] = None
    for variant in VARIANTS:
        model, params, model_name = build_variant(variant, name, res, device)
        # Compiled CRATE-α does the eager model's arithmetic; counting needs eager code.
        arch = "crate-alpha" if variant.startswith("crate-alpha") else variant
        for mode in MODES:
            x, y = inputs[mode]
            if (arch, mode) not in flops:
                flops[arch, mode] = count_flops(params, x, y, mode)
            for precision in PRECISIONS:
                print(f"{variant}: {precision} {mode} ...", flush=True)
                r = measure(model, params, x, y, mode, precision, device, repeats)
                r.update(variant=variant, model=model_name, precision=precision, mode=mode, batch=len(x), res=res,
                         images_per_s=len(x) / r["seconds"], flops=flops[arch, mode])
                r["flop_per_s"] = r["flops"] / r["seconds"]
                if variant != "crate-alpha compiled":
                    # Only a compiled first call is a compilation; elsewhere it is ordinary warm-up.
                    r.pop("first_call_s")
                rows.append(r)
        if variant == "official einsum":
            official_err = _official_rel_err(params, name, res, inputs["inference"][0][:2], device)
        del model, params
        if variant == "crate-alpha compiled":
            torch._dynamo.reset()
        gc.collect()
    # A peak is a maximum, so a busy moment can only lower it; a second sample at the end
    # keeps one such moment from setting it.
    print("measuring the GEMM peak again ...", flush=True)
    peaks = {k: max(v, peaks[k]) for k, v in gemm_peak(device, gemm_size, repeats).items()}
    for r in rows:
        r["peak_fraction"] = r["flop_per_s"] / peaks[r["precision"]]
        eager = next(e for e in rows if e["variant"] == "crate-alpha eager" and e["mode"] == r["mode"]
                     and e["precision"] == r["precision"])
        r["speedup_vs_eager"] = eager["seconds"] / r["seconds"]
    return {"model": name, "res": res, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "repeats": repeats, "gemm_size": gemm_size,
            "gemm_peak_flop_per_s": peaks, "peak_mem_method": PEAK_MEMORY_METHOD[_seam(device).name],
            "official_vs_eager_rel_err": official_err, "rows": rows}


def _official_rel_err(official: nn.Module, name: str, res: int, x: torch.Tensor, device: torch.device) -> float:
    """How far the official form's fp32 output is from the eager model's on the same weights."""
    torch.manual_seed(0)
    crate = timm.create_model(name, img_size=res).to(device).eval()
    official.load_state_dict(crate.state_dict())  # the timed steps trained it; compare fresh weights
    with torch.no_grad():
        a, b = official.eval()(x), crate(x)
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------

def print_table(result: dict) -> None:
    peaks = result["gemm_peak_flop_per_s"]
    print(f"\n{result['model']} at {result['res']} px on {result['device']} ({result['threads']} threads), "
          f"torch {result['torch']}, median of {result['repeats']}")
    print(f"GEMM peak ({result['gemm_size']}^3 matmul): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    head = (f"{'mode':<10} {'prec':<4} {'variant':<20} {'batch':>5} {'ms/step':>9} {'img/s':>8} {'GFLOP/img':>9} "
            f"{'GFLOP/s':>8} {'% peak':>6} {'peak MiB':>9} {'vs eager':>8}")
    print(head)
    print("-" * len(head))
    for mode in MODES:
        for precision in PRECISIONS:
            for r in result["rows"]:
                if r["mode"] == mode and r["precision"] == precision:
                    print(f"{mode:<10} {precision:<4} {r['variant']:<20} {r['batch']:>5} {r['seconds'] * 1e3:>9.1f} "
                          f"{r['images_per_s']:>8.2f} {r['flops'] / r['batch'] / 1e9:>9.2f} "
                          f"{r['flop_per_s'] / 1e9:>8.1f} {r['peak_fraction'] * 100:>5.1f}% "
                          f"{r['peak_mem_bytes'] / 2 ** 20:>9.0f} {r['speedup_vs_eager']:>7.2f}x")
    compiles = [f"{r['precision']} {r['mode']} {r['first_call_s']:.1f} s"
                for r in result["rows"] if "first_call_s" in r]
    print(f"compilation (first call of the compiled model): {', '.join(compiles)}")
    vit = next(r["model"] for r in result["rows"] if r["variant"] == "timm vit")
    err = result["official_vs_eager_rel_err"]
    print(f"timm vit = {vit}; official einsum vs eager output (fp32): rel err {err:.1e}")
    print(f"peak memory: {result['peak_mem_method']}")


def plot(result: dict, path: Path) -> Path:
    """Grouped bars: images/s (top) and fraction of the GEMM peak (bottom), per mode."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(12, 7.5))
    axes = fig.subplots(2, len(MODES), squeeze=False)
    width = 0.8 / len(VARIANTS)
    for col, mode in enumerate(MODES):
        for row, (key, label, scale) in enumerate((("images_per_s", "images/s", 1.0),
                                                   ("peak_fraction", "% of GEMM peak", 100.0))):
            ax = axes[row][col]
            for i, variant in enumerate(VARIANTS):
                vals = [next((r[key] * scale for r in result["rows"] if r["variant"] == variant
                              and r["mode"] == mode and r["precision"] == p), 0.0) for p in PRECISIONS]
                xs = [j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(PRECISIONS))]
                bars = ax.bar(xs, vals, width, label=variant)
                ax.bar_label(bars, fmt="%.3g", fontsize=7)
            ax.set_xticks(range(len(PRECISIONS)), PRECISIONS)
            batch = next(r["batch"] for r in result["rows"] if r["mode"] == mode)
            ax.set_title(f"{mode}, batch {batch}: {label}")
            ax.set_ylabel(label)
            ax.margins(y=0.15)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['model']} at {result['res']} px, {result['device']} ({result['threads']} threads)")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# --------------------------------------------------------------------------------------
# --xla: a train step on XLA:CPU beside eager CPU
# --------------------------------------------------------------------------------------

def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_xla(name: str, res: int, batch: int, repeats: int) -> list:
    """One training step, eager CPU beside XLA:CPU (information only).

    The XLA step ends at ``torch_xla.sync()`` and waits for the device, so both columns
    time a whole, finished step; the first XLA steps (compilation) are left out.
    """
    from ..device import xla

    on_xla = for_name("xla")
    xla.device()  # before the first backward: autograd sizes its per-device queues once
    x, y = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))
    rows = []
    for precision in PRECISIONS:
        row = {"model": name, "res": res, "batch": batch, "precision": precision, "mode": "train step"}
        for where in (for_name("cpu"), on_xla):  # the comparison measured: the same step on each
            torch.manual_seed(0)
            dev = where.torch_device()
            model = timm.create_model(name, img_size=res, num_classes=10).to(dev).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            xd, yd = x.to(dev), y.to(dev)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = F.cross_entropy(model(xd), yd)
                loss.backward()
                opt.step()
                opt.zero_grad()
                where.synchronize(dev)  # XLA: the step's graph ends and runs to completion

            before = xla.compile_count()
            row[f"{where.name}_ms"] = _median_seconds(step, repeats, warmup=3) * 1e3
            if where is on_xla:
                row["xla_compiles"] = xla.compile_count() - before
        rows.append(row)
    return rows


def _run_xla(a: argparse.Namespace) -> int:
    from ..device import xla

    xla.require()
    torch.manual_seed(0)
    rows = bench_xla(a.model, a.res, a.batch, a.repeats)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, PJRT_DEVICE={os.environ['PJRT_DEVICE']}")
    for r in rows:
        print(f"{r['model']} {r['res']}px batch {r['batch']} {r['precision']:>4} train step: eager CPU "
              f"{r['cpu_ms']:7.1f} ms, XLA:CPU {r['xla_ms']:7.1f} ms ({r['xla_compiles']} compilations)")
    out = write_json({"train_step": rows, "torch": torch.__version__}, Path(a.out).with_name("xla.json"))
    print(f"wrote {out}")
    return 0




# --------------------------------------------------------------------------------------
# The CLIPA resolution effect
# --------------------------------------------------------------------------------------

# The recipe's per-device batch: 32,768 over the 256 devices of a TPU v3-256, the machine
# CLIPA's scripts were run on. One L/14 step at 224 px and batch 128 is ~120 TFLOP, minutes
# on a 2-core CPU, so there the default is a small batch (and the ratios are smaller: fixed
# per-step costs, the optimizer step included, weigh more).
CLIPA_DEVICE_BATCH = 128
CLIPA_CPU_BATCH = 8
# timed steps per size: a CPU step at 224 px takes minutes, an accelerator's well under a second
CLIPA_DEVICE_REPEATS = 10
CLIPA_CPU_REPEATS = 1
CLIPA_SIZES = (84, 112, 224)


def clipa_resolution(model: str, sizes, batch: int, device: torch.device, repeats: int = 1) -> dict:
    """Seconds per train step of the CLIPA image tower at each resolution (bf16 autocast,
    gradient checkpointing and AdamW, as the recipe), beside its token count and FLOPs."""
    # the open_clip configs are registered already: importing this module imported crate_alpha
    rows = []
    for size in sizes:
        seconds, flops, tokens = _tower_step(model, size, batch, device, repeats)
        rows.append({"size": size, "tokens": tokens, "batch": batch, "seconds_per_step": seconds,
                     "forward_gflop_per_image": flops / 1e9})
        print(f"{model} image tower, {size:>3} px ({rows[-1]['tokens']:>3} tokens), batch {batch}: "
              f"{seconds:7.2f} s/step", flush=True)
    top = rows[-1]
    for r in rows:
        r["speedup_vs_largest"] = top["seconds_per_step"] / r["seconds_per_step"]
        r["token_ratio_vs_largest"] = top["tokens"] / r["tokens"]
        r["flop_ratio_vs_largest"] = top["forward_gflop_per_image"] / r["forward_gflop_per_image"]
    return {"model": model, "device": str(device), "batch": batch, "repeats": repeats, "rows": rows}


def _tower_step(model: str, size: int, batch: int, device: torch.device, repeats: int) -> tuple:
    """(median seconds of one train step, forward FLOPs per image, tokens) of ``model``'s image tower."""
    import open_clip

    tower = open_clip.create_model(model, force_image_size=size).visual.to(device)
    patch = getattr(tower, "trunk", tower).patch_embed.patch_size[0]
    x = torch.randn(batch, 3, size, size, device=device)
    flops = count_flops(tower, x[:1], x[:1], "inference")
    tower.train().set_grad_checkpointing(True)
    opt = torch.optim.AdamW(tower.parameters(), lr=1e-4, fused=_seam(device).fused_optimizer)

    def step():
        with _autocast(device, "bf16"):
            loss = tower(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    return _median_seconds(step, repeats, warmup=1), flops, (size // patch) ** 2 + 1


def plot_clipa(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..visualize import save_png

    rows = result["rows"]
    labels = [f"{r['size']} px" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.27 for x in xs], [r["speedup_vs_largest"] for r in rows], 0.27, label="measured step speed-up")
    ax.bar(list(xs), [r["token_ratio_vs_largest"] for r in rows], 0.27, label="fewer tokens")
    ax.bar([x + 0.27 for x in xs], [r["flop_ratio_vs_largest"] for r in rows], 0.27, label="fewer FLOPs")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel(f"x vs {rows[-1]['size']} px")
    ax.set_title(f"{result['model']} image tower, batch {result['batch']}, {result['device']}")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def _run_clipa(args: argparse.Namespace) -> int:
    device = _device(args.device)
    accelerator = _seam(device).is_accelerator
    batch = args.clipa_batch or (CLIPA_DEVICE_BATCH if accelerator else CLIPA_CPU_BATCH)
    repeats = args.repeats or (CLIPA_DEVICE_REPEATS if accelerator else CLIPA_CPU_REPEATS)
    model = "crate-alpha-demo" if args.quick else "crate-alpha-CLIPA-L-14"
    result = clipa_resolution(model, CLIPA_SIZES if not args.quick else (16, 32, 64), batch, device, repeats)
    for r in result["rows"]:
        print(f"{r['size']:>3} px: {r['speedup_vs_largest']:.1f}x faster than {result['rows'][-1]['size']} px "
              f"with {r['token_ratio_vs_largest']:.1f}x fewer tokens, {r['flop_ratio_vs_largest']:.1f}x fewer FLOPs")
    out = Path(args.out).with_name("clipa.json")
    write_json(result, out)
    print(f"wrote {out} and {plot_clipa(result, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(_parser().parse_args()))
