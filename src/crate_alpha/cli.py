"""The ``crate-alpha`` command."""
from __future__ import annotations

import argparse
import json
import sys

_FORCE_HELP = ("replace an existing OUT_DIR, if it is empty or a model folder written by crate-alpha "
               "(any other files are never deleted)")


def _add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="convert released weights to a timm / open_clip folder")
    csub = conv.add_subparsers(dest="source", required=True)
    p = csub.add_parser("official-torch", help="the official PyTorch .pth (classifier or CLIPA)")
    p.add_argument("src", help="official .pth state dict")
    p.add_argument("out_dir", help="model folder to write (must not exist unless --force)")
    p.add_argument("--heads", type=int, help="vision attention heads (not stored in the weights)")
    p.add_argument("--text-heads", type=int, help="text attention heads (default: width // 64)")
    p.add_argument("--model", help="a released model name whose head counts to use")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p = csub.add_parser("big-vision", help="a big_vision .npz (classifier, CLIPA two towers, or FILE.npz:img)")
    p.add_argument("src", help="big_vision .npz; FILE.npz:img converts only the image tower to a timm folder")
    p.add_argument("out_dir", help="model folder to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a training checkpoint (epoch_*.pt) as an open_clip local-dir folder")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--model", required=True, help="the open_clip model name it was trained as")
    p.add_argument("--image-size", type=int, help="resolution it was trained at (default: from the weights)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)


_MODEL_HELP = "a local-dir:FOLDER (timm or open_clip, e.g. converted release weights), a folder, or a timm name"


def _add_whitebox(sub) -> None:
    p = sub.add_parser("explain", help="one PNG per image: attention per layer, PCA colours, MaskCut masks")
    p.add_argument("images", nargs="+", help="image files, folders of images, or webdataset shards")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the PNGs and explain.json")
    p.add_argument("--num-masks", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.15, help="MaskCut affinity threshold")
    p.add_argument("--size", type=int, help="input size (default: the model's)")
    p = sub.add_parser("diagnose", help="per-layer coding rate, sparsity and reconstruction error (JSON + PNG)")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--images", required=True, help="a folder of images or webdataset shards, or one .tar")
    p.add_argument("--out", required=True, help="folder for diagnostics.json and diagnostics.png")
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--size", type=int, help="input size (default: the model's)")
    p = sub.add_parser("segment-eval", help="coarse segmentation mIoU on VOC 2012, MaskCut box/mask AP on COCO")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--voc", help="the VOC2012 folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)")
    p.add_argument("--coco-images", help="COCO images folder, e.g. val2017/")
    p.add_argument("--coco-annotations", help="COCO instances json, e.g. annotations/instances_val2017.json")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--num-masks", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--out", default="runs/segment-eval/results.json", help="results JSON")


def _run_whitebox(args) -> None:
    if args.command == "explain":
        from .whitebox import explain

        paths = explain(args.images, args.model, args.out, num_masks=args.num_masks, tau=args.tau, size=args.size)
        print(f"wrote {len(paths)} PNG(s) to {args.out}")
    elif args.command == "diagnose":
        from .whitebox import diagnose

        res = diagnose(args.model, args.images, args.out, max_images=args.max_images, size=args.size)
        for r in res["layers"]:
            print(json.dumps(r))
        print(f"wrote {args.out}/diagnostics.json and diagnostics.png ({res['images']} images)")
    else:
        from .segment_eval import segment_eval

        res = segment_eval(args.model, args.out, voc=args.voc, coco_images=args.coco_images,
                           coco_annotations=args.coco_annotations, limit=args.limit, num_masks=args.num_masks,
                           tau=args.tau)
        print(json.dumps(res, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="crate-alpha", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_export(sub)
    _add_whitebox(sub)
    args = parser.parse_args(argv)

    from .convert import ConversionError

    try:
        if args.command == "convert" and args.source == "official-torch":
            from .convert import convert_official_torch

            info = convert_official_torch(args.src, args.out_dir, heads=args.heads,
                                          text_heads=args.text_heads, model=args.model,
                                          force=args.force)
            print(json.dumps(info, indent=2))
        elif args.command == "convert" and args.source == "big-vision":
            from .convert.big_vision import convert_big_vision

            print(json.dumps(convert_big_vision(args.src, args.out_dir, force=args.force), indent=2))
        elif args.command == "export":
            from .convert.folders import export_open_clip_checkpoint

            out = export_open_clip_checkpoint(args.checkpoint, args.model, args.out_dir, args.image_size, args.force)
            print(f"wrote {out}; load with open_clip.create_model_and_transforms('local-dir:{out}')")
        else:
            _run_whitebox(args)
    except (ConversionError, ValueError, OSError) as e:
        # ValueError: an impossible model shape refused by the model factory (e.g. 0 heads);
        # OSError: reading a source or writing outside the converters' own checks.
        print(f"crate-alpha: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
