"""python -m zeroshot eval|imagenet|table"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zeroshot", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="zero-shot classification or retrieval on a clip_benchmark dataset")
    e.add_argument("--model", required=True, help="open_clip name (e.g. crate-alpha-demo) or local-dir:FOLDER")
    e.add_argument("--checkpoint", help="training checkpoint (open_clip_train's epoch_*.pt)")
    e.add_argument("--dataset", required=True, help="clip_benchmark dataset, e.g. wds/digits, cifar10, mscoco_captions")
    e.add_argument("--dataset-root", required=True)
    e.add_argument("--task", default="auto")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--output", required=True)
    i = sub.add_parser("imagenet", help="ImageNet-1K zero-shot (80 prompt templates) from a local val folder")
    i.add_argument("--model", required=True)
    i.add_argument("--checkpoint")
    i.add_argument("--val-dir", required=True, help="ImageFolder of the 50,000 validation images (WordNet-id folders)")
    i.add_argument("--cache", default="runs/imagenet_root")
    i.add_argument("--batch-size", type=int, default=64)
    i.add_argument("--workers", type=int, default=4)
    i.add_argument("--output", required=True)
    t = sub.add_parser("table", help="CSV and markdown table over clip_benchmark result files")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", default="runs/zeroshot_results")
    a = p.parse_args(argv)

    from crate_alpha.zeroshot import EvalError, clip_benchmark_eval, imagenet_root, results_table

    try:
        if a.cmd == "eval":
            r = clip_benchmark_eval(a.model, a.dataset, a.dataset_root, a.output, a.checkpoint, a.task,
                                    a.batch_size, a.workers)
            print(json.dumps(r["metrics"], indent=2))
        elif a.cmd == "imagenet":
            root = imagenet_root(a.val_dir, a.cache)
            r = clip_benchmark_eval(a.model, "imagenet1k", root, a.output, a.checkpoint, "zeroshot_classification",
                                    a.batch_size, a.workers)
            print(json.dumps(r["metrics"], indent=2))
        else:
            print(results_table(a.files, a.out))
    except EvalError as err:
        print(f"zeroshot: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
