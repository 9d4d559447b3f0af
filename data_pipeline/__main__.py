"""python -m data_pipeline download|verify|demo|bench"""
from __future__ import annotations

import argparse
import json
import sys

from crate_alpha.data.download import DataError


def _download(a) -> int:
    from crate_alpha.data.download import download, format_summary

    filters = list(a.filter or [])
    if a.min_clip_score is not None:
        filters.append(f"{a.clip_score_col}>={a.min_clip_score}")
    s = download(a.metadata, a.out, image_size=a.image_size, resize_mode=a.resize_mode,
                 samples_per_shard=a.samples_per_shard, processes=a.processes, threads=a.threads,
                 retries=a.retries, timeout=a.timeout, filters=filters, resume=not a.no_resume,
                 url_col=a.url_col, caption_col=a.caption_col, hash_col=a.hash_col or None)
    print(f"kept {s['rows_kept']} of {s['rows_in']} metadata rows")
    print(format_summary(s))
    return 0


def _verify(a) -> int:
    from crate_alpha.data.verify import advice, format_report, train_num_samples, verify_folder

    reports = verify_folder(a.folder, require_caption=not a.no_caption)
    print(format_report(reports))
    print(f"--train-num-samples {train_num_samples(reports)}  (usable samples only)")
    for line in advice(reports):
        print(line, file=sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


def _demo(a) -> int:
    from crate_alpha.data.digits import build_demo

    info = build_demo(a.out, image_size=a.image_size, force=a.force, processes=a.processes)
    print(json.dumps({k: v for k, v in info.items() if k != "download"}, indent=2))
    return 0


def _bench(a) -> int:
    from .bench import main as bench_main

    bench_main(a)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("download", help="DataComp metadata parquet -> webdataset shards (img2dataset)")
    d.add_argument("metadata", nargs="+", help="parquet files, folders of them, or glob patterns")
    d.add_argument("--out", required=True, help="shard folder")
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

    v = sub.add_parser("verify", help="check a shard folder; exits 1 on damage")
    v.add_argument("folder")
    v.add_argument("--no-caption", action="store_true", help="do not require a .txt caption")
    v.set_defaults(fn=_verify)

    m = sub.add_parser("demo", help="build the digits demo corpus")
    m.add_argument("--out", default="runs/demo/data")
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--processes", type=int, default=2)
    m.add_argument("--force", action="store_true",
                   help="rebuild an existing demo corpus (a folder it did not write is never touched)")
    m.set_defaults(fn=_demo)

    b = sub.add_parser("bench", help="decode throughput: plain vs reduced-size JPEG decode")
    b.add_argument("--size", type=int, default=84)
    b.add_argument("--source-size", type=int, default=256)
    b.add_argument("--samples", type=int, default=600)
    b.add_argument("--out", default="runs/bench/data.json")
    b.set_defaults(fn=_bench)

    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (DataError, FileNotFoundError) as e:
        print(f"data_pipeline: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
