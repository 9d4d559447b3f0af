"""python -m crate_alpha.classify train|eval|demo"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m crate_alpha.classify", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a classifier from a recipe in configs/")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key=value")
    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint or a local-dir: folder")
    e.add_argument("--model", help="local-dir:FOLDER (converted weights) or a timm name")
    e.add_argument("--checkpoint", help="a checkpoint of this trainer (latest.pt)")
    e.add_argument("--data", required=True, help="ImageFolder directory or .tar shard pattern (.jpg + .cls)")
    e.add_argument("--output", required=True)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    d = sub.add_parser("demo", help="digits: from scratch and from the CLIP demo's encoder")
    d.add_argument("--out", default="runs/demo-cls")
    d.add_argument("--fresh", action="store_true")
    a = p.parse_args(argv)

    from ..train.recipe import RecipeError

    try:
        if a.cmd == "train":
            from .train import train

            s = train(a.recipe, a.overrides)
            print(json.dumps({k: v for k, v in s.items() if k != "history"}, indent=2))
        elif a.cmd == "eval":
            from .evaluate import run_eval

            print(json.dumps(run_eval(a.data, a.output, a.model, a.checkpoint, a.batch_size, a.workers, a.ema),
                             indent=2))
        else:
            from .demo import main as demo_main

            return demo_main(a)
    except RecipeError as err:
        print(f"crate_alpha.classify: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
