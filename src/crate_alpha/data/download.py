"""DataComp metadata (parquet) -> webdataset shards, through img2dataset.

img2dataset does the downloading, resizing, sharding, retries and incremental resume;
this module adds what DataComp users set around it: row filters on metadata columns,
hash verification against the metadata's sha256 (which rejects truncated or altered
files), PIL's decompression-bomb limit, and a summary of img2dataset's per-shard
statistics.
"""
from __future__ import annotations

import glob
import json
import operator
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# Columns img2dataset fills itself (it measures sizes and hashes the bytes it fetched).
RESERVED_COLUMNS = {"key", "url", "caption", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512"}
PIPELINE_DIR = "_pipeline"  # our files; img2dataset globs *.json at the top level only
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_FILTER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


class DataError(ValueError):
    """Bad data input; the message names the problem and what to do."""


def parse_filter(expr: str):
    m = _FILTER.match(expr)
    if not m:
        raise DataError(f"cannot parse filter {expr!r}; write COLUMN OP VALUE with OP one of {', '.join(_OPS)}, "
                        "e.g. 'clip_l14_similarity_score>=0.3'")
    col, op, raw = m.groups()
    try:
        value = float(raw)
    except ValueError:
        value = raw.strip("'\"")
    return col, op, value


def _metadata_files(inputs: Sequence[os.PathLike]) -> List[Path]:
    files: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(p.glob("*.parquet"))
        elif p.is_file():
            files.append(p)
        else:
            matched = sorted(Path(x) for x in glob.glob(str(item)))
            if not matched:
                raise DataError(f"metadata path {item} does not exist and matches no file")
            files += matched
    if not files:
        raise DataError(f"no .parquet metadata files found in {', '.join(map(str, inputs))}")
    return files


def filter_metadata(inputs: Sequence[os.PathLike], out_path: os.PathLike, filters: Iterable[str] = (),
                    url_col: str = "url", caption_col: str = "text") -> dict:
    """Concatenate metadata parquet files, keep the rows passing every filter, write one parquet."""
    import pyarrow.compute as pc

    tables = [pq.read_table(f) for f in _metadata_files(inputs)]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    for col in (url_col, caption_col):
        if col not in table.column_names:
            raise DataError(f"metadata has no {col!r} column; columns are: {', '.join(table.column_names)}")
    n_in = table.num_rows
    for expr in filters:
        col, op, value = parse_filter(expr)
        if col not in table.column_names:
            raise DataError(f"filter {expr!r}: no column {col!r}; columns are: {', '.join(table.column_names)}")
        fn = {">=": pc.greater_equal, "<=": pc.less_equal, "==": pc.equal, "!=": pc.not_equal,
              ">": pc.greater, "<": pc.less}[op]
        table = table.filter(pc.fill_null(fn(table[col], value), False))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out_path)
    return {"rows_in": n_in, "rows_kept": table.num_rows, "columns": table.column_names}


def _reason(message: str) -> str:
    m = message.lower()
    if "hash mismatch" in m:
        return "hash mismatch (truncated or altered file)"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "http error" in m or re.search(r"\b[45]\d\d\b", m):
        code = re.search(r"\b([45]\d\d)\b", m)
        return f"http {code.group(1)}" if code else "http error"
    if "decoding" in m or "cannot identify" in m:
        return "not a decodable image"
    if "area too large" in m:
        return "image too large (decompression-bomb limit)"
    if "too small" in m:
        return "image too small"
    if "connection" in m or "refused" in m or "reset" in m:
        return "connection error"
    return message.strip()[:80]


def summarize(output_dir: os.PathLike) -> dict:
    """Aggregate img2dataset's ``*_stats.json`` files of a shard folder."""
    output_dir = Path(output_dir)
    stats = [json.loads(p.read_text()) for p in sorted(output_dir.glob("*_stats.json"))]
    if not stats:
        raise DataError(f"no img2dataset statistics (*_stats.json) in {output_dir}")
    raw = Counter()
    for s in stats:
        raw.update(s.get("status_dict", {}))
    reasons = Counter()
    for msg, n in raw.items():
        if msg != "success":
            reasons[_reason(msg)] += n
    start = min(s["start_time"] for s in stats)
    end = max(s["end_time"] for s in stats)
    successes = sum(s["successes"] for s in stats)
    return {
        "shards": len(stats),
        "count": sum(s["count"] for s in stats),
        "successes": successes,
        "failed_to_download": sum(s["failed_to_download"] for s in stats),
        "failed_to_resize": sum(s["failed_to_resize"] for s in stats),
        "failures_by_reason": dict(reasons.most_common()),
        "raw_status": dict(raw.most_common()),
        "wall_seconds": end - start,
        "images_per_second": successes / max(end - start, 1e-9),
    }


def format_summary(s: dict) -> str:
    lines = [f"shards {s['shards']}  samples {s['count']}  successes {s['successes']}  "
             f"failed to download {s['failed_to_download']}  failed to resize {s['failed_to_resize']}  "
             f"{s['images_per_second']:.1f} images/s"]
    for reason, n in s["failures_by_reason"].items():
        lines.append(f"  {n:8d}  {reason}")
    return "\n".join(lines)


def download(
        metadata: Sequence[os.PathLike],
        output_dir: os.PathLike,
        image_size: int = 256,
        resize_mode: str = "keep_ratio",
        samples_per_shard: int = 10000,
        processes: int = 1,
        threads: int = 32,
        retries: int = 0,
        timeout: float = 10,
        filters: Iterable[str] = (),
        resume: bool = True,
        url_col: str = "url",
        caption_col: str = "text",
        hash_col: Optional[str] = "sha256",
        max_image_area: float = float(Image.MAX_IMAGE_PIXELS),
        encode_quality: int = 95,
) -> dict:
    """Download the rows of DataComp-style metadata into webdataset shards.

    Defaults suit CLIPA: shorter side resized to 256 keeping the aspect ratio. With
    ``resume`` a rerun skips the shards img2dataset finished (it writes a shard's stats
    file last) and rewrites unfinished ones, so a killed run completes without duplicates.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network
    from img2dataset import download as img2dataset_download

    output_dir = Path(output_dir)
    if not resume and output_dir.exists():
        # Start over ourselves: img2dataset's "overwrite" mode would also delete our metadata.
        shutil.rmtree(output_dir)
    work = output_dir / PIPELINE_DIR
    info = filter_metadata(metadata, work / "metadata.parquet", filters, url_col, caption_col)
    if info["rows_kept"] == 0:
        raise DataError(f"no metadata rows left after filters {list(filters)} (of {info['rows_in']})")
    columns = info["columns"]
    verify = [hash_col, "sha256"] if hash_col and hash_col in columns else None
    extra = [c for c in columns if c not in (url_col, caption_col, hash_col) and c not in RESERVED_COLUMNS]
    img2dataset_download(
        url_list=str(work / "metadata.parquet"),
        input_format="parquet",
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=extra,
        output_format="webdataset",
        output_folder=str(output_dir),
        image_size=image_size,
        resize_mode=resize_mode,
        encode_quality=encode_quality,
        number_sample_per_shard=samples_per_shard,
        processes_count=processes,
        thread_count=threads,
        retries=retries,
        timeout=timeout,
        verify_hash=verify,
        compute_hash="sha256",
        max_image_area=max_image_area,
        incremental_mode="incremental",
        distributor="multiprocessing",
        enable_wandb=False,
    )
    summary = summarize(output_dir)
    summary.update(rows_in=info["rows_in"], rows_kept=info["rows_kept"], filters=list(filters))
    tmp = work / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, work / "summary.json")
    return summary
