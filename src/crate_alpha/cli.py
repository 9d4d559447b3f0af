"""crate-alpha: train, convert, evaluate and look inside CRATE-α models.

One command for everything; each subcommand calls one library function. Bad input and the
operating system's refusals (a missing file, a full disk) end with one line,
``crate-alpha: error: ...``, and exit status 2; any other failure is a bug and keeps its
traceback. Under torchrun:
``torchrun --nproc_per_node 8 -m crate_alpha.cli pretrain RECIPE key=value ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CrateAlphaError

_FORCE_HELP = ("replace an existing OUT_DIR, if it is empty or a model folder written by crate-alpha "
               "(any other files are never deleted)")
_MODEL_HELP = ("a released model (crate_alpha_base_patch16_224.in21k_ft_in1k, crate-alpha-CLIPA-L-14; "
               "see `crate-alpha released`), hf://OWNER/REPO/PATH, a local-dir:FOLDER or folder, or a timm name")
_SRC_HELP = ("a file, a released name (see `crate-alpha released`) or a Hub file hf://OWNER/REPO[@REVISION]/PATH "
             "(downloaded through huggingface_hub)")
_TOKENIZER_HELP = ("CLIPA: a folder of the bert-base-uncased tokenizer files to copy into OUT_DIR "
                   "(default: from the Hugging Face cache, else downloaded)")
_COMPILE_HELP = "run the model under torch.compile (the first batches are slower while it compiles)"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _model(spec):
    """A Hub reference as a local-dir: folder (converted once into the Hub cache); else as given."""
    from .convert.hub import resolve_model

    return resolve_model(spec)


def _file(spec):
    from .convert.hub import resolve_file

    return resolve_file(spec)


# ---- convert / export ------------------------------------------------------------------

def _convert_official(a):
    from .convert import convert_official_torch

    from .convert.hub import released_model

    model = a.model or (released_model(a.src) if a.heads is None else None)
    _print_json(convert_official_torch(_file(a.src), a.out_dir, heads=a.heads, text_heads=a.text_heads,
                                       model=model, force=a.force, tokenizer=a.tokenizer))


def _convert_big_vision(a):
    from .convert.big_vision import convert_big_vision

    src = a.src
    if src.startswith("hf://") and src.endswith(":img"):
        src = _file(src[:-len(":img")]) + ":img"
    _print_json(convert_big_vision(_file(src), a.out_dir, force=a.force, tokenizer=a.tokenizer))


def _export(a):
    from .convert.folders import export_open_clip_checkpoint

    out = export_open_clip_checkpoint(_file(a.checkpoint), a.model, a.out_dir, a.image_size, a.force)
    print(f"wrote {out}; load with open_clip.create_model_and_transforms('local-dir:{out}')")


def _add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="convert released weights to a timm / open_clip folder")
    csub = conv.add_subparsers(dest="source", required=True)
    p = csub.add_parser("official-torch", help="the official PyTorch .pth (classifier or CLIPA)")
    p.add_argument("src", help="official .pth state dict: " + _SRC_HELP)
    p.add_argument("out_dir", help="model folder to write (must not exist unless --force)")
    p.add_argument("--heads", type=int, help="vision attention heads (not stored in the weights)")
    p.add_argument("--text-heads", type=int, help="text attention heads (default: width // 64)")
    p.add_argument("--model", help="a released model name whose head counts to use")
    p.add_argument("--tokenizer", help=_TOKENIZER_HELP)
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=_convert_official)
    p = csub.add_parser("big-vision", help="a big_vision .npz (classifier, CLIPA two towers, or FILE.npz:img)")
    p.add_argument("src", help="big_vision .npz; FILE.npz:img converts only the image tower to a timm folder; "
                   + _SRC_HELP)
    p.add_argument("out_dir", help="model folder to write (must not exist unless --force)")
    p.add_argument("--tokenizer", help=_TOKENIZER_HELP)
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=_convert_big_vision)
    p = sub.add_parser("export", help="a training checkpoint (epoch_*.pt) as an open_clip local-dir folder")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--model", required=True, help="the open_clip model name it was trained as")
    p.add_argument("--image-size", type=int, help="resolution it was trained at (default: from the weights)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=_export)


# ---- data ----------------------------------------------------------------------------

def _download(a):
    from .data.download import download, format_summary

    filters = list(a.filter or [])
    if a.min_clip_score is not None:
        filters.append(f"{a.clip_score_col}>={a.min_clip_score}")
    s = download(a.metadata, a.out, image_size=a.image_size, resize_mode=a.resize_mode,
                 samples_per_shard=a.samples_per_shard, processes=a.processes, threads=a.threads,
                 retries=a.retries, timeout=a.timeout, filters=filters, resume=not a.no_resume,
                 url_col=a.url_col, caption_col=a.caption_col, hash_col=a.hash_col or None,
                 distributor=a.distributor, subjob_size=a.subjob_size)
    print(f"kept {s['rows_kept']} of {s['rows_in']} metadata rows")
    print(format_summary(s))


def _verify(a) -> int:
    from .data.verify import advice, format_report, train_num_samples, verify_folder

    reports = verify_folder(a.folder, require_caption=not a.no_caption)
    print(format_report(reports))
    print(f"--train-num-samples {train_num_samples(reports)}  (usable samples only)")
    for line in advice(reports):
        print(line, file=sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


def _data_demo(a):
    from .data.digits import build_demo

    info = build_demo(a.out, image_size=a.image_size, force=a.force, processes=a.processes)
    _print_json({k: v for k, v in info.items() if k != "download"})


def _data_bench(a):
    from .apps.bench_data import bench_download, bench_loader, profile

    if a.download:
        bench_download(images=a.download, processes=a.processes, out=str(Path(a.out).with_name("download.json")))
        return
    profile(str(Path(a.out).with_name("data_profile.json")), samples=a.profile_samples)
    bench_loader(unique=a.unique, copies=a.copies, out=a.out)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="DataComp shards: download, verify, the digits demo corpus, decode speed")
    dsub = data.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("download", help="DataComp metadata parquet -> webdataset shards (img2dataset)")
    d.add_argument("metadata", nargs="+", help="parquet files, folders of them, or glob patterns")
    d.add_argument("--out", required=True,
                   help="shard folder: a path or an fsspec URL (s3://, gs://, hdfs://) every worker can write to")
    d.add_argument("--distributor", choices=("multiprocessing", "pyspark"), default="multiprocessing",
                   help="img2dataset's: processes on this machine, or Spark tasks (the active SparkSession, "
                        "e.g. under spark-submit; else a local one with --processes cores)")
    d.add_argument("--subjob-size", type=int, default=1000, help="pyspark: shards per Spark job")
    d.add_argument("--image-size", type=int, default=256)
    d.add_argument("--resize-mode", default="keep_ratio",
                   help="img2dataset resize mode (keep_ratio: shorter side = image size)")
    d.add_argument("--samples-per-shard", type=int, default=10000)
    d.add_argument("--processes", type=int, default=1)
    d.add_argument("--threads", type=int, default=32)
    d.add_argument("--retries", type=int, default=0)
    d.add_argument("--timeout", type=float, default=10)
    d.add_argument("--filter", action="append", help="row filter COLUMN OP VALUE, e.g. 'clip_l14_similarity_score>=0.3'")
    d.add_argument("--min-clip-score", type=float, help="shorthand for --filter '<clip-score-col>>=X'")
    d.add_argument("--clip-score-col", default="clip_l14_similarity_score")
    d.add_argument("--no-resume", action="store_true",
                   help="start over: deletes OUT only if this pipeline wrote it (or it is empty)")
    d.add_argument("--url-col", default="url")
    d.add_argument("--caption-col", default="text")
    d.add_argument("--hash-col", default="sha256", help="sha256 column to verify against ('' to skip)")
    d.set_defaults(fn=_download)
    v = dsub.add_parser("verify", help="check a shard folder; exits 1 on damage")
    v.add_argument("folder", help="shard folder: a path or an fsspec URL")
    v.add_argument("--no-caption", action="store_true", help="do not require a .txt caption")
    v.set_defaults(fn=_verify)
    m = dsub.add_parser("demo", help="build the digits demo corpus")
    m.add_argument("--out", default="runs/demo/data")
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--processes", type=int, default=2)
    m.add_argument("--force", action="store_true",
                   help="rebuild an existing demo corpus (a folder it did not write is never touched)")
    m.set_defaults(fn=_data_demo)
    b = dsub.add_parser("bench", help="input path per stage (JSON + PNG), and open_clip_train's loader end to end "
                        "(samples/s on one worker core, open_clip's decode vs reduced-size decode)")
    b.add_argument("--profile-samples", type=int, default=256, help="samples per stage in the stage profile")
    b.add_argument("--unique", type=int, default=512, help="distinct encoded images in the loader benchmark")
    b.add_argument("--copies", type=int, default=8, help="shards, each holding the --unique samples")
    b.add_argument("--out", default="runs/bench/data.json")
    b.add_argument("--download", type=int, metavar="IMAGES",
                   help="instead: download IMAGES loopback photos with img2dataset's multiprocessing and pyspark "
                        "(local mode) distributors, images/s of each (runs/bench/download.json)")
    b.add_argument("--processes", type=int, default=2, help="--download: processes / local Spark cores")
    b.set_defaults(fn=_data_bench)


# ---- training ------------------------------------------------------------------------

def _recipe_and_overrides(items, default):
    """``[RECIPE] [key=value ...]``: the recipe is the first item unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return default, items


def _clip_train(default):
    def run_(a):
        from .clip.trainer import run

        recipe, overrides = _recipe_and_overrides(a.items, default)
        info = run(recipe, overrides, dry_run=a.dry_run)
        if a.dry_run:
            _print_json({k: info[k] for k in ("schedule", "train_num_samples", "world_size", "open_clip_train_args")})

    return run_


def _cls_train(a):
    from .classifier.trainer import train

    recipe, overrides = _recipe_and_overrides(a.items, None)
    _print_json({k: v for k, v in train(recipe, overrides).items() if k != "history"})


def _cls_eval(a):
    from .classifier.evaluate import run_eval

    _print_json(run_eval(a.data, a.output, _model(a.model), _file(a.checkpoint), a.batch_size, a.workers, a.ema,
                         torchcompile=a.torchcompile or None))


def _recipes(a):
    from .recipe import list_recipes, shipped_recipes_dir

    print(f"recipes in {shipped_recipes_dir()} (add :demo for the demo variant):")
    for name in list_recipes():
        print(f"  {name}")


def _add_training(sub) -> None:
    for name, default, what in (("pretrain", "clipa_crate_alpha_L14_84_pretrain", "CLIPA pre-training"),
                                ("finetune", "clipa_crate_alpha_L14_224_finetune", "CLIPA fine-tuning")):
        p = sub.add_parser(name, help=f"{what} with open_clip_train (default recipe: {default})")
        p.add_argument("items", nargs="*", metavar="[RECIPE] [key=value]",
                       help="a recipe file or shipped recipe name (NAME:VARIANT for a variant), then overrides "
                            "of its keys (open_clip_train's names)")
        p.add_argument("--dry-run", action="store_true", help="print open_clip_train's arguments and stop")
        p.set_defaults(fn=_clip_train(default))
    p = sub.add_parser("cls-train", help="train a classifier from a recipe (timm's parts)")
    p.add_argument("items", nargs="+", metavar="RECIPE [key=value]",
                   help="a recipe file or shipped recipe name, then overrides of its keys (timm train.py's names)")
    p.set_defaults(fn=_cls_train)
    e = sub.add_parser("cls-eval", help="top-1/top-5 of a classifier checkpoint or a local-dir: folder")
    e.add_argument("--model", help=_MODEL_HELP)
    e.add_argument("--checkpoint", help="a checkpoint of the classification trainer (latest.pt)")
    e.add_argument("--data", required=True, help="ImageFolder directory or .tar shard pattern (.jpg + .cls)")
    e.add_argument("--output", required=True)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("--torchcompile", nargs="?", const="inductor", help=_COMPILE_HELP + " (optional backend)")
    e.set_defaults(fn=_cls_eval)
    r = sub.add_parser("recipes", help="list the recipes shipped with the package")
    r.set_defaults(fn=_recipes)


# ---- zero-shot -----------------------------------------------------------------------

def _zs_eval(a):
    from .clip.zeroshot import clip_benchmark_eval

    r = clip_benchmark_eval(_model(a.model), a.dataset, a.dataset_root, a.output, _file(a.checkpoint), a.task,
                            a.batch_size,
                            a.workers, torchcompile=a.torchcompile)
    _print_json(r["metrics"])


def _zs_imagenet(a):
    from .clip.zeroshot import clip_benchmark_eval, imagenet_root

    root = imagenet_root(a.val_dir, a.cache)
    r = clip_benchmark_eval(_model(a.model), "imagenet1k", root, a.output, _file(a.checkpoint), "zeroshot_classification",
                            a.batch_size, a.workers, torchcompile=a.torchcompile)
    _print_json(r["metrics"])


def _zs_table(a):
    from .clip.zeroshot import results_table

    print(results_table(a.files, a.out))


def _add_zeroshot(sub) -> None:
    zs = sub.add_parser("zeroshot", help="zero-shot evaluation with clip_benchmark")
    zsub = zs.add_subparsers(dest="zeroshot_command", required=True)
    e = zsub.add_parser("eval", help="zero-shot classification or retrieval on a clip_benchmark dataset")
    e.add_argument("--dataset", required=True, help="clip_benchmark dataset, e.g. wds/digits, cifar10, mscoco_captions")
    e.add_argument("--dataset-root", required=True)
    e.add_argument("--task", default="auto")
    e.set_defaults(fn=_zs_eval, workers=0)
    i = zsub.add_parser("imagenet", help="ImageNet-1K zero-shot (80 prompt templates) from a local val folder")
    i.add_argument("--val-dir", required=True, help="ImageFolder of the 50,000 validation images (WordNet-id folders)")
    i.add_argument("--cache", default="runs/imagenet_root")
    i.set_defaults(fn=_zs_imagenet, workers=4)
    for p in (e, i):
        p.add_argument("--model", required=True, help="a released CLIPA model (crate-alpha-CLIPA-L-14), "
                       "hf://OWNER/REPO/PATH, an open_clip name (e.g. crate-alpha-demo) or local-dir:FOLDER")
        p.add_argument("--checkpoint", help="training checkpoint (open_clip_train's epoch_*.pt): " + _SRC_HELP)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--workers", type=int, help="data-loader workers")
        p.add_argument("--output", required=True)
        p.add_argument("--torchcompile", action="store_true", help=_COMPILE_HELP)
    t = zsub.add_parser("table", help="CSV and markdown table over clip_benchmark result files")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", default="runs/zeroshot_results")
    t.set_defaults(fn=_zs_table)


# ---- white-box tools -----------------------------------------------------------------

def _explain(a):
    from .whitebox.commands import explain

    paths = explain(a.images, _model(a.model), a.out, num_masks=a.num_masks, tau=a.tau, size=a.size)
    print(f"wrote {len(paths)} PNG(s) to {a.out}")


def _diagnose(a):
    from .whitebox.commands import diagnose

    res = diagnose(_model(a.model), a.images, a.out, max_images=a.max_images, size=a.size)
    for r in res["layers"]:
        print(json.dumps(r))
    print(f"wrote {a.out}/diagnostics.json and diagnostics.png ({res['images']} images)")


def _segment_eval(a):
    from .whitebox.segment_eval import segment_eval

    _print_json(segment_eval(_model(a.model), a.out, voc=a.voc, coco_images=a.coco_images,
                             coco_annotations=a.coco_annotations, limit=a.limit, num_masks=a.num_masks, tau=a.tau))


def _add_whitebox(sub) -> None:
    p = sub.add_parser("explain", help="one PNG per image: attention per layer, PCA colours, MaskCut masks")
    p.add_argument("images", nargs="+", help="image files, folders of images, or webdataset shards")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the PNGs and explain.json")
    p.add_argument("--num-masks", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.15, help="MaskCut affinity threshold")
    p.add_argument("--size", type=int, help="input size (default: the model's)")
    p.set_defaults(fn=_explain)
    p = sub.add_parser("diagnose", help="per-layer coding rate, sparsity and reconstruction error (JSON + PNG)")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--images", required=True, help="a folder of images or webdataset shards, or one .tar")
    p.add_argument("--out", required=True, help="folder for diagnostics.json and diagnostics.png")
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--size", type=int, help="input size (default: the model's)")
    p.set_defaults(fn=_diagnose)
    p = sub.add_parser("segment-eval", help="coarse segmentation mIoU on VOC 2012, MaskCut box/mask AP on COCO")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--voc", help="the VOC2012 folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)")
    p.add_argument("--coco-images", help="COCO images folder, e.g. val2017/")
    p.add_argument("--coco-annotations", help="COCO instances json, e.g. annotations/instances_val2017.json")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--num-masks", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--out", default="runs/segment-eval/results.json", help="results JSON")
    p.set_defaults(fn=_segment_eval)


# ---- demos, benchmarks, tables -------------------------------------------------------

def _demo(a):
    from .apps.demo import demo

    demo(a.runs, baseline=a.baseline, only_baseline=a.only_baseline, fresh=a.fresh)


def _demo_cls(a):
    from .apps.demo import demo_cls

    demo_cls(a.runs, fresh=a.fresh)


def _demo_segment(a):
    from .apps.segment_demo import run

    if a.budget_s <= 0 or a.eval_images < 1:
        raise CrateAlphaError("--budget-s must be positive and --eval-images at least 1")
    run(a.out, budget_s=a.budget_s, eval_images=a.eval_images, seed=a.seed, models=a.models)


def _bench(a):
    from .apps import bench

    return bench.run(a)


def _released(a):
    from .models.released import table

    print(table(), end="")


def _model_table(a):
    from .apps.model_table import model_table

    print(model_table(a.res, a.num_classes))


def _add_demos(sub) -> None:
    from .apps.segment_demo import MODELS as SEGMENT_MODELS

    p = sub.add_parser("demo", help="the CLIPA pipeline on the digits demo corpus (pre-train, fine-tune, zero-shot)")
    p.add_argument("--runs", default="runs", help="the runs folder: corpus and runs go to RUNS/demo")
    p.add_argument("--baseline", action="store_true", help="also run the open_clip ViT baseline")
    p.add_argument("--only-baseline", action="store_true", help="run only the ViT baseline")
    p.add_argument("--fresh", action="store_true", help="delete the demo's earlier runs first (the corpus is kept)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("demo-cls", help="digits classification: from scratch and from the CLIP demo's encoder")
    p.add_argument("--runs", default="runs", help="the runs folder: runs go to RUNS/demo-cls")
    p.add_argument("--fresh", action="store_true", help="delete the demo's earlier runs first")
    p.set_defaults(fn=_demo_cls)
    p = sub.add_parser("demo-segment", help="CRATE-α, CRATE and ViT on digits pasted into photos: MaskCut mIoU")
    p.add_argument("--out", default="runs/demo-segment")
    p.add_argument("--budget-s", type=float, default=250.0, help="wall-clock training seconds per model")
    p.add_argument("--eval-images", type=int, default=360, help="held-out images to segment (top-1 uses all 360)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="*", default=None, choices=[m[0] for m in SEGMENT_MODELS])
    p.set_defaults(fn=_demo_segment)
    from .apps import bench

    p = sub.add_parser("bench", help="model speed: eager, compiled, official einsum form, timm ViT (JSON + PNG)")
    bench.add_arguments(p)
    p.set_defaults(fn=_bench)
    p = sub.add_parser("released", help="every released weight file: model, tag, paper figure, the call that loads it")
    p.set_defaults(fn=_released)
    p = sub.add_parser("model-table", help="parameters and GFLOPs of every registered CRATE-α variant")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(fn=_model_table)


def parser(prog: str = "crate-alpha") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_data(sub)
    _add_training(sub)
    _add_zeroshot(sub)
    _add_whitebox(sub)
    _add_demos(sub)
    return p


def main(argv=None, prog: str = "crate-alpha") -> int:
    args = parser(prog).parse_args(argv)  # a bad command line: argparse's usage line, exit status 2
    try:
        return args.fn(args) or 0
    except (CrateAlphaError, OSError) as e:
        # our own refusals (bad input, named with what to do) and the operating system's
        # (file not found, disk full, permission): one line, no traceback
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        # anything else is a bug, here or in a library below: it keeps its traceback
        _after_traceback(e, f"{prog}: this looks like a bug; please report it with the traceback above "
                            f"and the command line")
        raise


def _after_traceback(e: BaseException, line: str) -> None:
    """Have ``line`` printed after ``e``'s traceback, when the interpreter prints it."""
    if hasattr(e, "add_note"):  # Python >= 3.11: printed at the end of the traceback itself
        e.add_note(line)
        return
    hook = sys.excepthook

    def print_then_line(kind, value, tb):
        hook(kind, value, tb)
        if value is e:
            print(line, file=sys.stderr)

    sys.excepthook = print_then_line


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
