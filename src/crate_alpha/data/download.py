"""DataComp metadata (parquet) -> webdataset shards, through img2dataset.

img2dataset does the downloading, resizing, sharding, retries and incremental resume;
this module adds what DataComp users set around it: row filters on metadata columns,
hash verification against the metadata's sha256 (which rejects truncated or altered
files), http(s)-only fetching and a header-checked decompression-bomb limit (see
``sample_checks``), one caption policy shared with ``verify``, a record of the first
run's settings that a resume must match, and a summary of img2dataset's statistics.
"""
from __future__ import annotations

import glob
import hashlib
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

from ..common import atomic_write, write_json

from .ownership import DataError, check_may_write, claim, clear_owned
from .sample_checks import checked_img2dataset

# Columns img2dataset fills itself (it measures sizes and hashes the bytes it fetched).
RESERVED_COLUMNS = {"key", "url", "caption", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512"}
PIPELINE_DIR = "_pipeline"  # our files; img2dataset globs *.json at the top level only
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_FILTER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
SHARDS_KIND = "shards"
SETTINGS = "settings.json"
NO_CAPTION = "no caption (row dropped before download)"
_STATS = re.compile(r"^\d+_stats\.json$")
# Settings a resume must share with the first run: any of them changes which rows land in
# which shard or what a sample holds, so mixing two runs would duplicate or lose samples.
BINDING_SETTINGS = ("metadata", "filters", "url_col", "caption_col", "hash_col", "image_size", "resize_mode",
                    "samples_per_shard", "encode_quality", "max_image_area")


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
                    url_col: str = "url", caption_col: str = "text", hash_col: Optional[str] = None) -> dict:
    """Concatenate metadata parquet files, keep the rows passing every filter, write one parquet."""
    import pyarrow.compute as pc

    tables = [pq.read_table(f) for f in _metadata_files(inputs)]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    for col in (url_col, caption_col):
        if col not in table.column_names:
            raise DataError(f"metadata has no {col!r} column; columns are: {', '.join(table.column_names)}")
    n_in = table.num_rows
    if hash_col and hash_col in table.column_names:
        # an all-null column is typed null, and img2dataset writes the computed digest into it
        i = table.column_names.index(hash_col)
        table = table.set_column(i, hash_col, pc.cast(table[hash_col], pa.string()))
    # One caption policy with ``verify``: a sample needs a non-blank caption, so rows without
    # one are dropped here (and counted) rather than fetched and flagged later.
    has_caption = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(
        pc.cast(table[caption_col], pa.string()))), 0), False)
    no_caption = n_in - pc.sum(pc.cast(has_caption, pa.int64())).as_py() if n_in else 0
    table = table.filter(has_caption)
    for expr in filters:
        col, op, value = parse_filter(expr)
        if col not in table.column_names:
            raise DataError(f"filter {expr!r}: no column {col!r}; columns are: {', '.join(table.column_names)}")
        fn = {">=": pc.greater_equal, "<=": pc.less_equal, "==": pc.equal, "!=": pc.not_equal,
              ">": pc.greater, "<": pc.less}[op]
        table = table.filter(pc.fill_null(fn(table[col], value), False))
    atomic_write(out_path, lambda tmp: pq.write_table(table, tmp))
    return {"rows_in": n_in, "rows_kept": table.num_rows, "no_caption": no_caption, "columns": table.column_names}


def _reason(message: str) -> str:
    m = message.lower()
    if m.startswith("unsupported url scheme"):
        return message.split(" (")[0]
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
    settings = {
        "metadata": [_file_record(f) for f in _metadata_files(metadata)],
        "filters": list(filters), "url_col": url_col, "caption_col": caption_col, "hash_col": hash_col or None,
        "image_size": image_size, "resize_mode": resize_mode, "samples_per_shard": samples_per_shard,
        "encode_quality": encode_quality, "max_image_area": max_image_area,
    }
    if not resume:
        # Start over ourselves: img2dataset's "overwrite" mode deletes whatever the folder holds.
        clear_owned(output_dir, SHARDS_KIND)
    check_may_write(output_dir, SHARDS_KIND)
    work = output_dir / PIPELINE_DIR
    _check_resume_settings(work / SETTINGS, settings, output_dir)
    _check_no_stray_json(output_dir)
    claim(output_dir, SHARDS_KIND)
    work.mkdir(exist_ok=True)
    if not (work / SETTINGS).exists():
        write_json(settings, work / SETTINGS)
    info = filter_metadata(metadata, work / "metadata.parquet", filters, url_col, caption_col, hash_col)
    if info["rows_kept"] == 0:
        raise DataError(f"no metadata rows left after filters {list(filters)} and the caption policy "
                        f"(of {info['rows_in']}; {info['no_caption']} had no caption)")
    columns = info["columns"]
    verify = [hash_col, "sha256"] if hash_col and hash_col in columns else None
    extra = [c for c in columns if c not in (url_col, caption_col, hash_col) and c not in RESERVED_COLUMNS]
    try:
        with checked_img2dataset():
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
    finally:
        # img2dataset removes its work folder only when it succeeds; a resume writes it anew.
        shutil.rmtree(output_dir / "_tmp", ignore_errors=True)
    summary = summarize(output_dir)
    if info["no_caption"]:
        summary["failures_by_reason"] = {NO_CAPTION: info["no_caption"], **summary["failures_by_reason"]}
    summary.update(rows_in=info["rows_in"], rows_kept=info["rows_kept"], filters=list(filters))
    write_json(summary, work / "summary.json")
    return summary


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"name": path.name, "size": path.stat().st_size, "sha256": h.hexdigest()}


def _check_resume_settings(path: Path, now: dict, output_dir: Path) -> None:
    """Refuse to resume a shard folder with settings other than its first run's."""
    if not path.exists():
        return
    first = json.loads(path.read_text())
    diffs = []
    for key in BINDING_SETTINGS:
        a, b = first.get(key), now.get(key)
        if key == "metadata":
            if [(m["size"], m["sha256"]) for m in a or []] != [(m["size"], m["sha256"]) for m in b]:
                names = lambda ms: ", ".join(f"{m['name']} ({m['size']} B, sha256 {m['sha256'][:12]})" for m in ms)  # noqa: E731
                diffs.append(f"metadata files: first run {names(a or [])}; now {names(b)}")
        elif a != b:
            diffs.append(f"{key}: first run {a!r}, now {b!r}")
    if diffs:
        raise DataError(
            f"{output_dir} was downloaded with other settings, and resuming would duplicate or lose samples: "
            + "; ".join(diffs) + ". Rerun with the first run's settings to resume, or start over with "
            "--no-resume (deletes this shard folder) or a new --out")


def _check_no_stray_json(output_dir: Path) -> None:
    # img2dataset parses every top-level *.json of its output folder as "<shard>_stats.json"
    if not output_dir.is_dir():
        return
    stray = sorted(p.name for p in output_dir.glob("*.json") if not _STATS.match(p.name))
    if stray:
        raise DataError(f"{output_dir} holds {', '.join(stray)}, which img2dataset would read as shard statistics; "
                        "move these files out of the shard folder and rerun")
