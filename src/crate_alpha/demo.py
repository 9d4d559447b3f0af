"""``make demo``: the whole CLIPA pipeline on the built-in digits corpus, on one laptop.

Builds the demo corpus (through the real downloader), pre-trains a small CRATE-α CLIP at
32 px, fine-tunes it at 64 px, evaluates zero-shot on the held-out digits with
clip_benchmark, and prints a table also written to ``runs/demo/results.json``. With
``--baseline`` the same recipe runs on an open_clip ViT of the same size.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = {"crate-alpha": "crate-alpha-demo", "vit": "vit-demo"}


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_model(tag: str, out: Path, data: Path, configs: Path, extra=()) -> dict:
    from .train.clip import run
    from .zeroshot import clip_benchmark_eval

    model = MODELS[tag]
    shards = json.loads((data / "demo.json").read_text())["train_shards"]
    common = [f"model={model}", f"output={out}", f"train_data={shards}", *extra]
    _banner(f"{tag}: pre-training at 32 px")
    t0 = time.time()
    pre = run(str(configs / "demo_pretrain.py"), common + [f"name={tag}_pretrain"])
    t1 = time.time()
    _banner(f"{tag}: fine-tuning at 64 px")
    ckpt = out / f"{tag}_pretrain" / "checkpoints" / "epoch_latest.pt"
    fin = run(str(configs / "demo_finetune.py"), common + [f"name={tag}_finetune", f"init_from={ckpt}"])
    t2 = time.time()
    _banner(f"{tag}: zero-shot evaluation with clip_benchmark")
    final = out / f"{tag}_finetune" / "checkpoints" / "epoch_latest.pt"
    res = clip_benchmark_eval(model, "wds/digits", str(data / "wds"), str(out / f"zeroshot_{tag}.json"),
                              checkpoint=str(final))
    t3 = time.time()
    n_pre = pre["schedule"]["epochs"] * pre["train_num_samples"]
    n_fin = fin["schedule"]["epochs"] * fin["train_num_samples"]
    return {
        "model": model,
        "zeroshot_top1": res["metrics"]["acc1"],
        "zeroshot_top5": res["metrics"]["acc5"],
        "seconds": t3 - t0,
        "pretrain_seconds": t1 - t0,
        "finetune_seconds": t2 - t1,
        "eval_seconds": t3 - t2,
        "pretrain_samples_per_s": n_pre / (t1 - t0),
        "finetune_samples_per_s": n_fin / (t2 - t1),
        "checkpoint": str(final),
    }


def _pictures(out: Path, tags) -> None:
    """Loss curves of every run, and CRATE-α's attention maps on held-out digits, as PNG."""
    import io
    import tarfile

    import open_clip
    import torch
    from PIL import Image

    from .visualize import open_clip_losses, plot_attention, plot_curves

    curves = {}
    for tag in tags:
        for stage in ("pretrain", "finetune"):
            log = out / f"{tag}_{stage}" / "out.log"
            if log.is_file():
                curves[f"{tag} {stage}"] = open_clip_losses(log)
    print(f"curves: {plot_curves(curves, out / 'curves.png')}")
    if "crate-alpha" not in tags:
        return
    model, _, pp = open_clip.create_model_and_transforms(
        MODELS["crate-alpha"], pretrained=str(out / "crate-alpha_finetune" / "checkpoints" / "epoch_latest.pt"))
    imgs = []
    with tarfile.open(out / "data" / "wds" / "test" / "0.tar") as tar:
        for m in tar:
            if m.name.endswith(".jpg") and len(imgs) < 64:
                imgs.append(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    x = torch.stack([pp(im) for im in imgs])
    import torchvision.transforms.functional as TF

    shown = torch.stack([TF.to_tensor(im.resize(tuple(x.shape[-2:]))) for im in imgs[:6]])
    print(f"attention maps: {plot_attention(model.visual.trunk, x[:6], shown, out / 'attention.png')}")
    # the white-box measures of the trained image tower, layer by layer, on 64 held-out digits
    from .interpret import layer_diagnostics
    from .whitebox import _write_json, plot_diagnostics

    layers = layer_diagnostics(model.visual.trunk, x)
    _write_json({"model": MODELS["crate-alpha"], "images": len(imgs), "layers": layers}, out / "diagnostics.json")
    png = plot_diagnostics(layers, out / "diagnostics.png", title="crate-alpha-demo CLIP image tower, held-out digits")
    print(f"layer diagnostics: {png}")


def table(rows) -> str:
    head = (f"{'model':<18} {'zero-shot top-1':>15} {'top-5':>7} {'pretrain s':>11} {'finetune s':>11} "
            f"{'eval s':>7} {'total s':>8} {'pretrain samples/s':>19}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18} {100 * r['zeroshot_top1']:>14.1f}% {100 * r['zeroshot_top5']:>6.1f}% "
                     f"{r['pretrain_seconds']:>11.0f} {r['finetune_seconds']:>11.0f} {r['eval_seconds']:>7.0f} "
                     f"{r['seconds']:>8.0f} {r['pretrain_samples_per_s']:>19.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--configs", default=str(REPO / "configs"))
    p.add_argument("--baseline", action="store_true", help="also run the open_clip ViT baseline")
    p.add_argument("--only-baseline", action="store_true", help="run only the ViT baseline")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo runs first (the corpus is kept)")
    a = p.parse_args(argv)
    from .data.digits import build_demo

    out = Path(a.out)
    t0 = time.time()
    _banner("building the digits demo corpus")
    info = build_demo(out / "data")
    data_seconds = time.time() - t0
    print(f"{info['train_samples']} training samples, {info['test_samples']} held out ({data_seconds:.0f} s)")
    tags = ["vit"] if a.only_baseline else (["crate-alpha", "vit"] if a.baseline else ["crate-alpha"])
    rows = []
    for tag in tags:
        if a.fresh:
            import shutil

            for stage in ("pretrain", "finetune"):
                shutil.rmtree(out / f"{tag}_{stage}", ignore_errors=True)
        rows.append(run_model(tag, out, out / "data", Path(a.configs)))
    for r in rows:
        r["data_seconds"] = data_seconds
    _pictures(out, tags)
    _banner("results (held-out digits, zero-shot through clip_benchmark)")
    print(table(rows))
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, path)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
