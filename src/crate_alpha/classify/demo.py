"""``make demo-cls``: digits classification from scratch and from the CLIP demo's image tower."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..demo import REPO

CLIP_CKPT = Path("runs/demo/crate-alpha_finetune/checkpoints/epoch_latest.pt")


def main(a) -> int:
    from ..data.digits import build_demo
    from .train import train

    out = Path(a.out)
    data = Path("runs/demo/data")
    build_demo(data)
    if not CLIP_CKPT.is_file():
        print("=== no CLIP demo checkpoint yet: running the CLIP demo first ===", flush=True)
        from ..demo import run_model

        run_model("crate-alpha", Path("runs/demo"), data, REPO / "configs")
    rows = []
    for init, recipe in (("scratch", "demo_cls_scratch.py"), ("clip-demo-encoder", "demo_cls_finetune.py")):
        if a.fresh:
            shutil.rmtree(out / init, ignore_errors=True)
        print(f"\n=== classification: {init} ===", flush=True)
        t0 = time.time()
        s = train(str(REPO / "configs" / recipe), [f"output={out}", f"name={init}"])
        rows.append({"init": init, "model": "crate_alpha_demo_patch8_64", "top1": s.get("top1"), "top5": s.get("top5"),
                     "epochs": s["epochs"], "seconds": time.time() - t0, "checkpoint": s["checkpoint"]})
    print(f"\n{'init':<20} {'top-1':>7} {'top-5':>7} {'epochs':>7} {'seconds':>8}")
    for r in rows:
        print(f"{r['init']:<20} {r['top1']:>6.2f}% {r['top5']:>6.2f}% {r['epochs']:>7} {r['seconds']:>8.0f}")
    path = out / "results.json"
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, path)
    print(f"written to {path}")
    return 0
