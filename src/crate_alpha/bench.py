"""Speed of the CRATE-α encoder on this machine (``make bench``).

Measures training-step and inference throughput of a model (images/s, fp32 and bf16
autocast) and the ODL operator against the official einsum formulation, and writes the
figures to ``runs/bench/model.json``. Timings are medians over repeated runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from .crate_alpha import ODL


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _official_odl(x, D, D1, eta=0.1, lmbda=0.1):
    z1 = F.relu(eta * torch.einsum("pd,nlp->nld", D, x) - eta * lmbda)
    dz1 = torch.einsum("dp,nlp->nld", D, z1)
    z2 = F.relu(z1 - eta * torch.einsum("pd,nlp->nld", D, dz1 - x) - eta * lmbda)
    return torch.einsum("dp,nlp->nld", D1, z2)


def bench_model(name: str, res: int, batch: int, repeats: int) -> list:
    model = timm.create_model(name, img_size=res, num_classes=10)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = []
    for precision in ("fp32", "bf16"):
        autocast = precision == "bf16"

        def infer():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.eval()(x)

        def train():
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

        for mode, fn in (("inference", infer), ("train step", train)):
            s = _median_seconds(fn, repeats)
            rows.append({"model": name, "res": res, "batch": batch, "precision": precision, "mode": mode,
                         "images_per_s": batch / s})
    return rows


def bench_xla(name: str, res: int, batch: int, repeats: int) -> list:
    """One training step, eager CPU beside XLA:CPU (``--xla``, in .venv-xla; information only).

    The XLA step ends at ``torch_xla.sync()`` and waits for the device, so both columns
    time a whole, finished step; the first XLA steps (compilation) are left out.
    """
    import torch_xla.core.xla_model as xm

    from .train import xla

    xla.device()  # before the first backward: autograd sizes its per-device queues once
    x, y = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))
    rows = []
    for precision in ("fp32", "bf16"):
        row = {"model": name, "res": res, "batch": batch, "precision": precision, "mode": "train step"}
        for where in ("cpu", "xla"):
            torch.manual_seed(0)
            dev = xla.device() if where == "xla" else torch.device("cpu")
            model = timm.create_model(name, img_size=res, num_classes=10).to(dev).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            xd, yd = x.to(dev), y.to(dev)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = F.cross_entropy(model(xd), yd)
                loss.backward()
                opt.step()
                opt.zero_grad()
                if where == "xla":
                    xla.sync()
                    xm.wait_device_ops()

            before = xla.compile_count()
            row[f"{where}_ms"] = _median_seconds(step, repeats, warmup=3) * 1e3
            if where == "xla":
                row["xla_compiles"] = xla.compile_count() - before
        rows.append(row)
    return rows


def bench_odl(width: int, tokens: int, repeats: int) -> dict:
    odl = ODL(width)
    x = torch.randn(8, tokens, width)
    with torch.no_grad():
        ours = _median_seconds(lambda: odl(x), repeats)
        official = _median_seconds(lambda: _official_odl(x, odl.D, odl.D1), repeats)
        err = ((odl(x) - _official_odl(x, odl.D, odl.D1)).norm() / _official_odl(x, odl.D, odl.D1).norm()).item()
    return {"op": "ODL", "width": width, "tokens": tokens, "ours_ms": ours * 1e3, "official_einsum_ms": official * 1e3,
            "speedup": official / ours, "rel_err": err}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="crate_alpha_demo_patch8_64")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench/model.json")
    p.add_argument("--xla", action="store_true", help="train step on XLA:CPU beside eager CPU (needs torch_xla: "
                                                      ".venv-xla); writes runs/bench/xla.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.xla:
        return _main_xla(a)
    rows = bench_model(a.model, a.res, a.batch, a.repeats)
    odl = [bench_odl(w, 197, a.repeats) for w in (384, 768)]
    print(f"threads: {torch.get_num_threads()}")
    for r in rows:
        print(f"{r['model']} {r['res']}px batch {r['batch']} {r['precision']:>4} {r['mode']:<10}: "
              f"{r['images_per_s']:8.1f} images/s")
    for o in odl:
        print(f"ODL width {o['width']} x {o['tokens']} tokens: ours {o['ours_ms']:.2f} ms, official einsum "
              f"{o['official_einsum_ms']:.2f} ms ({o['speedup']:.2f}x), rel err {o['rel_err']:.1e}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": rows, "ops": odl, "threads": torch.get_num_threads()}, indent=2))
    tmp.replace(out)


def _main_xla(a) -> None:
    from .train import xla

    xla.require()
    rows = bench_xla(a.model, a.res, a.batch, a.repeats)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, PJRT_DEVICE={xla.os.environ['PJRT_DEVICE']}")
    for r in rows:
        print(f"{r['model']} {r['res']}px batch {r['batch']} {r['precision']:>4} train step: eager CPU "
              f"{r['cpu_ms']:7.1f} ms, XLA:CPU {r['xla_ms']:7.1f} ms ({r['xla_compiles']} compilations)")
    out = Path(a.out).with_name("xla.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"train_step": rows, "torch": torch.__version__}, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
