"""The demos: the whole pipeline on the built-in digits corpus, on one laptop.

``make demo`` (``crate-alpha demo``): builds the demo corpus (through the real
downloader), pre-trains a small CRATE-α CLIP at 32 px, fine-tunes it at 64 px, evaluates
zero-shot on the held-out digits with clip_benchmark, and prints a table also written to
``RUNS/demo/results.json``. With ``--baseline`` the same recipe runs on an open_clip ViT of
the same size. The recipes are the paper's, in their ``:demo`` variant.

``make demo-cls`` (``crate-alpha demo-cls``): digits classification from scratch and from
the CLIP demo's image tower.

Every path derives from ``--runs`` (default ``runs``), so the demos run the same from a
checkout and from an installed package.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..clip.trainer import checkpoint_path
from ..common import write_json
from .. import run_folder
from ..data.ownership import check_may_write, clear_owned, mark, owner_kind

# the demos mark the run folders they write, so --fresh deletes those and nothing else
DEMO_RUN = "demo run"


def clear_runs(folders) -> None:
    """``--fresh``: delete these run folders if the demo wrote them; refuse (nothing deleted) otherwise.

    A demo stopped during a training has not marked that run folder yet: it still carries the
    trainer's own mark, which at the demo's own path is the demo's run too.
    """
    folders = [Path(f) for f in folders]
    trainers = (run_folder.CLIP_RUN, run_folder.CLASSIFIER_RUN)
    kinds = {f: k if (k := owner_kind(f)) in trainers else DEMO_RUN for f in folders}
    for f in folders:  # every folder checked before any is deleted
        check_may_write(f, kinds[f])
    for f in folders:
        clear_owned(f, kinds[f])


MODELS = {"crate-alpha": "crate-alpha-demo", "vit": "vit-demo"}
PRETRAIN = "clipa_crate_alpha_L14_84_pretrain:demo"
FINETUNE = "clipa_crate_alpha_L14_224_finetune:demo"
CLS_RECIPES = {"scratch": "cls_crate_alpha_B16_in21k_pretrain:demo",
               "clip-demo-encoder": "cls_crate_alpha_B16_in1k_finetune:demo"}


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def clip_checkpoint(out: Path, tag: str, stage: str = "finetune") -> Path:
    """The CLIP demo's checkpoint of model ``tag`` after ``stage``."""
    return checkpoint_path(out, f"{tag}_{stage}")


def run_model(tag: str, out: Path, data: Path, extra=()) -> dict:
    from ..clip.trainer import run
    from ..visualize import open_clip_data_wait
    from ..clip.zeroshot import clip_benchmark_eval

    model = MODELS[tag]
    shards = json.loads((data / "demo.json").read_text())["train_shards"]
    common = [f"model={model}", f"logs={out}", f"train_data={shards}", *extra]
    _banner(f"{tag}: pre-training at 32 px")
    t0 = time.time()
    pre = run(PRETRAIN, common + [f"name={tag}_pretrain"])
    mark(out / f"{tag}_pretrain", DEMO_RUN)
    t1 = time.time()
    _banner(f"{tag}: fine-tuning at 64 px")
    fin = run(FINETUNE, common + [f"name={tag}_finetune", f"init_from={clip_checkpoint(out, tag, 'pretrain')}"])
    mark(out / f"{tag}_finetune", DEMO_RUN)
    t2 = time.time()
    _banner(f"{tag}: zero-shot evaluation with clip_benchmark")
    final = clip_checkpoint(out, tag)
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
        # open_clip_train's own Data (t) over Batch (t), the whole run
        "pretrain_data_wait": open_clip_data_wait(out / f"{tag}_pretrain" / "out.log"),
        "finetune_data_wait": open_clip_data_wait(out / f"{tag}_finetune" / "out.log"),
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

    from ..visualize import open_clip_losses, plot_curves
    from ..whitebox.commands import plot_attention

    curves = {}
    for tag in tags:
        for stage in ("pretrain", "finetune"):
            log = out / f"{tag}_{stage}" / "out.log"
            if log.is_file():
                curves[f"{tag} {stage}"] = open_clip_losses(log)
    print(f"curves: {plot_curves(curves, out / 'curves.png')}")
    if "crate-alpha" not in tags:
        return
    model, _, pp = open_clip.create_model_and_transforms(MODELS["crate-alpha"],
                                                         pretrained=str(clip_checkpoint(out, "crate-alpha")))
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
    from ..whitebox.interpret import layer_diagnostics
    from ..whitebox.commands import plot_diagnostics

    layers = layer_diagnostics(model.visual.trunk, x)
    write_json({"model": MODELS["crate-alpha"], "images": len(imgs), "layers": layers}, out / "diagnostics.json")
    png = plot_diagnostics(layers, out / "diagnostics.png", title="crate-alpha-demo CLIP image tower, held-out digits")
    print(f"layer diagnostics: {png}")


def table(rows) -> str:
    head = (f"{'model':<18} {'zero-shot top-1':>15} {'top-5':>7} {'pretrain s':>11} {'finetune s':>11} "
            f"{'eval s':>7} {'total s':>8} {'pretrain samples/s':>19} {'data wait pre/fine':>19}")
    lines, nan = [head, "-" * len(head)], float("nan")
    for r in rows:
        lines.append(f"{r['model']:<18} {100 * r['zeroshot_top1']:>14.1f}% {100 * r['zeroshot_top5']:>6.1f}% "
                     f"{r['pretrain_seconds']:>11.0f} {r['finetune_seconds']:>11.0f} {r['eval_seconds']:>7.0f} "
                     f"{r['seconds']:>8.0f} {r['pretrain_samples_per_s']:>19.0f} "
                     f"{100 * r.get('pretrain_data_wait', nan):>9.1f}%/{100 * r.get('finetune_data_wait', nan):.1f}%")
    return "\n".join(lines)


def demo(runs: str = "runs", baseline: bool = False, only_baseline: bool = False, fresh: bool = False) -> list:
    from ..data.digits import build_demo

    out = Path(runs) / "demo"
    t0 = time.time()
    _banner("building the digits demo corpus")
    info = build_demo(out / "data")
    data_seconds = time.time() - t0
    print(f"{info['train_samples']} training samples, {info['test_samples']} held out ({data_seconds:.0f} s)")
    tags = ["vit"] if only_baseline else (["crate-alpha", "vit"] if baseline else ["crate-alpha"])
    rows = []
    for tag in tags:
        if fresh:  # only run folders the demo itself wrote (refused otherwise)
            clear_runs([out / f"{tag}_{stage}" for stage in ("pretrain", "finetune")])
        rows.append(run_model(tag, out, out / "data"))
    for r in rows:
        r["data_seconds"] = data_seconds
    _pictures(out, tags)
    _banner("results (held-out digits, zero-shot through clip_benchmark)")
    print(table(rows))
    print(f"\nwritten to {write_json(rows, out / 'results.json')}")
    return rows


def demo_cls(runs: str = "runs", fresh: bool = False) -> list:
    from ..classifier.trainer import train
    from ..data.digits import build_demo

    clip_out, out = Path(runs) / "demo", Path(runs) / "demo-cls"
    data = clip_out / "data"
    build_demo(data)
    encoder = clip_checkpoint(clip_out, "crate-alpha")
    if not encoder.is_file():
        _banner("no CLIP demo checkpoint yet: running the CLIP demo first")
        run_model("crate-alpha", clip_out, data)
    common = [f"train_data={data / 'imagefolder' / 'train'}", f"val_data={data / 'imagefolder' / 'val'}",
              f"output={out}"]
    rows = []
    if fresh:
        clear_runs([out / init for init in CLS_RECIPES])
    for init, recipe in CLS_RECIPES.items():
        _banner(f"classification: {init}")
        t0 = time.time()
        extra = [] if init == "scratch" else [f"initial_checkpoint={encoder}"]
        s = train(recipe, common + extra + [f"experiment={init}"])
        mark(out / init, DEMO_RUN)
        rows.append({"init": init, "model": "crate_alpha_demo_patch8_64", "top1": s.get("top1"), "top5": s.get("top5"),
                     "epochs": s["epochs"], "seconds": time.time() - t0, "checkpoint": s["checkpoint"],
                     "data_wait": s.get("data_wait_share")})
    print(f"\n{'init':<20} {'top-1':>7} {'top-5':>7} {'epochs':>7} {'seconds':>8} {'data wait':>10}")
    for r in rows:
        print(f"{r['init']:<20} {r['top1']:>6.2f}% {r['top5']:>6.2f}% {r['epochs']:>7} {r['seconds']:>8.0f} "
              f"{100 * (r['data_wait'] or 0):>9.1f}%")
    print(f"written to {write_json(rows, out / 'results.json')}")
    return rows
