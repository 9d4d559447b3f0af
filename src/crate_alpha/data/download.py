"""DataComp metadata (parquet) -> webdataset shards, through img2dataset.

img2dataset does the downloading, resizing, sharding, retries and incremental resume;
this module adds what DataComp users set around it: row filters on metadata columns,
hash verification against the metadata's sha256 (which rejects truncated or altered
files), http(s)-only fetching and a header-checked decompression-bomb limit (see
``sample_checks``), one caption policy shared with ``verify``, a record of the first
run's settings that a resume must match, and a summary of img2dataset's statistics.

It runs on one machine (img2dataset's multiprocessing distributor) or on a Spark cluster
(its pyspark distributor: the active SparkSession when there is one, as under
``spark-submit``, else a local one), and writes to a local folder or any fsspec URL
img2dataset writes to (``s3://``, ``gs://``, ``hdfs://``). The metadata is filtered one
input file at a time, in record batches, so the driver's memory does not grow with the
pool (DataComp-1B's metadata is ~1.4 billion rows).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import multiprocessing
import numbers
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from typing import Iterable, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from . import storage
from .decode import MAX_IMAGE_AREA
from .ownership import check_may_write, claim, clear_owned
from ..common import swapped
from .sample_checks import checked_img2dataset

# img2dataset's package namespace shadows its module names with functions; take the modules
_i2d_main = importlib.import_module("img2dataset.main")
_i2d_distributor = importlib.import_module("img2dataset.distributor")

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
                    "samples_per_shard", "encode_quality", "max_image_area", "metadata_layout")
# how filtered rows are laid out for img2dataset (its shard numbering follows it): one filtered
# parquet per metadata file. Runs before this layout concatenated all files into one.
METADATA_LAYOUT = "one filtered parquet per metadata file"
DISTRIBUTORS = ("multiprocessing", "pyspark")
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")  # img2dataset's ResizeMode
# fsspec file systems img2dataset's worker processes cannot write to, and why
UNWRITABLE = {"memory": "a memory:// folder exists only in this process, out of reach of img2dataset's workers",
              "http": "http(s) is read-only", "https": "http(s) is read-only"}
FILTER_BATCH_ROWS = 1 << 16


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


def _metadata_files(inputs: Sequence[storage.Where]) -> List[str]:
    """The parquet files named by ``inputs`` (files, folders, glob patterns; paths or URLs)."""
    files: List[str] = []
    for item in inputs:
        fs, path = storage.location(item)
        if fs.isdir(path):
            files += storage.glob(item, "*.parquet")
        elif fs.isfile(path):
            files.append(str(item))
        else:
            matched = sorted(fs.glob(path))
            if not matched:
                raise DataError(f"metadata path {item} does not exist and matches no file")
            files += [fs.unstrip_protocol(m) if storage.is_url(item) else m for m in matched]
    if not files:
        raise DataError(f"no .parquet metadata files found in {', '.join(map(str, inputs))}")
    return files


def _schema(files: Sequence[str], url_col: str, caption_col: str, parsed, filters, hash_col: Optional[str]):
    """The union of the metadata files' columns (a column's first type wins), read from the footers.

    Every filtered file is given all of them (nulls where a file lacks one), so img2dataset
    reads the same columns from each; the hash column is always there and a string, so each
    row is verified when it has a digest, whichever file it comes from (a null is not checked).
    """
    fields = {}
    for name in files:
        with storage.open_read(name) as f:
            schema = pq.ParquetFile(f).schema_arrow
        for col in (url_col, caption_col):
            if col not in schema.names:
                raise DataError(f"metadata {name} has no {col!r} column; columns are: {', '.join(schema.names)}")
        for (col, _, _), expr in zip(parsed, filters):
            if col not in schema.names:
                raise DataError(f"filter {expr!r}: no column {col!r} in {name}; columns are: {', '.join(schema.names)}")
        for field in schema:
            fields.setdefault(field.name, field)
    if hash_col:
        # an all-null column is typed null, and img2dataset writes the computed digest into it
        fields[hash_col] = pa.field(hash_col, pa.string())
    return pa.schema(list(fields.values()))


def _keep(batch: pa.RecordBatch, filters, caption_col: str, schema: pa.Schema):
    """(rows kept, rows without a caption) of one record batch, with the columns of ``schema``."""
    import pyarrow.compute as pc

    table = pa.Table.from_batches([batch])
    table = pa.table([pc.cast(table[f.name], f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                      for f in schema], schema=schema)
    # One caption policy with ``verify``: a sample needs a non-blank caption, so rows without
    # one are dropped here (and counted) rather than fetched and flagged later.
    has_caption = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(
        pc.cast(table[caption_col], pa.string()))), 0), False)
    no_caption = table.num_rows - pc.sum(pc.cast(has_caption, pa.int64())).as_py() if table.num_rows else 0
    table = table.filter(has_caption)
    for col, op, value in filters:
        fn = {">=": pc.greater_equal, "<=": pc.less_equal, "==": pc.equal, "!=": pc.not_equal,
              ">": pc.greater, "<": pc.less}[op]
        table = table.filter(pc.fill_null(fn(table[col], value), False))
    return table, no_caption


def filter_metadata(inputs: Sequence[storage.Where], out_dir: storage.Where, filters: Iterable[str] = (),
                    url_col: str = "url", caption_col: str = "text", hash_col: Optional[str] = None) -> dict:
    """Keep the metadata rows passing every filter: one parquet in ``out_dir`` per input file.

    Each file is streamed in record batches, so memory stays at one batch whatever the pool size.
    """
    files = _metadata_files(inputs)
    filters = list(filters)
    parsed = [parse_filter(expr) for expr in filters]
    schema = _schema(files, url_col, caption_col, parsed, filters, hash_col)
    n_in = kept = no_caption = 0
    storage.remove(out_dir)  # ours (inside the pipeline folder); rewritten whole on every run
    storage.makedirs(out_dir)
    for n, name in enumerate(files):
        with storage.open_read(name) as f:
            pf = pq.ParquetFile(f)

            # the file's own types where it has the column (files may differ), the union's elsewhere
            own = pf.schema_arrow
            file_schema = pa.schema([own.field(f.name) if f.name in own.names and f.name != hash_col else f
                                     for f in schema])

            def write(out, pf=pf, file_schema=file_schema):
                nonlocal n_in, kept, no_caption
                with pq.ParquetWriter(out, file_schema) as writer:
                    for batch in pf.iter_batches(batch_size=FILTER_BATCH_ROWS):
                        table, dropped = _keep(batch, parsed, caption_col, file_schema)
                        n_in, kept, no_caption = n_in + batch.num_rows, kept + table.num_rows, no_caption + dropped
                        writer.write_table(table)

            storage.write_with(storage.join(out_dir, f"{n:05d}.parquet"), write)
    return {"rows_in": n_in, "rows_kept": kept, "no_caption": no_caption, "columns": schema.names, "files": len(files)}


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


def summarize(output_dir: storage.Where) -> dict:
    """Aggregate img2dataset's ``*_stats.json`` files of a shard folder (every shard's, from any worker)."""
    stats = [storage.read_json(p) for p in storage.glob(output_dir, "*_stats.json")]
    if not stats:
        raise DataError(f"no img2dataset statistics (*_stats.json) in {output_dir}")
    raw = Counter()
    for s in stats:
        raw.update(s.get("status_dict", {}))
    reasons = Counter()
    for msg, n in raw.items():
        if msg != "success":
            reasons[_reason(msg)] += n
    successes = sum(s["successes"] for s in stats)
    busy = _busy_seconds([(s["start_time"], s["end_time"]) for s in stats])
    return {
        "shards": len(stats),
        "count": sum(s["count"] for s in stats),
        "successes": successes,
        "failed_to_download": sum(s["failed_to_download"] for s in stats),
        "failed_to_resize": sum(s["failed_to_resize"] for s in stats),
        "failures_by_reason": dict(reasons.most_common()),
        "raw_status": dict(raw.most_common()),
        "wall_seconds": busy,
        "images_per_second": successes / max(busy, 1e-9),
    }


def _busy_seconds(spans) -> float:
    """Seconds in which some shard was downloading: the union of the shards' (start, end) spans.

    Parallel shards overlap and count once; the gap between a killed run and its resume,
    when no shard ran, does not count at all.
    """
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        total += max(b - max(a, end), 0.0)
        end = max(end, b)
    return total


def format_summary(s: dict) -> str:
    lines = [f"shards {s['shards']}  samples {s['count']}  successes {s['successes']}  "
             f"failed to download {s['failed_to_download']}  failed to resize {s['failed_to_resize']}  "
             f"{s['images_per_second']:.1f} images/s"]
    for reason, n in s["failures_by_reason"].items():
        lines.append(f"  {n:8d}  {reason}")
    return "\n".join(lines)


def download(
        metadata: Sequence[storage.Where],
        output_dir: storage.Where,
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
        max_image_area: float = MAX_IMAGE_AREA,
        encode_quality: int = 95,
        distributor: str = "multiprocessing",
        subjob_size: int = 1000,
) -> dict:
    """Download the rows of DataComp-style metadata into webdataset shards.

    Defaults suit CLIPA: shorter side resized to 256 keeping the aspect ratio. With
    ``resume`` a rerun skips the shards img2dataset finished (it writes a shard's stats
    file last) and rewrites unfinished ones, so a killed run completes without duplicates.
    ``distributor="pyspark"`` runs the shards as Spark tasks (``subjob_size`` shards per
    Spark job; ``processes`` is the core count of a local session started when none is
    active); ``output_dir`` may be an fsspec URL the Spark executors can all write to.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network
    from img2dataset import download as img2dataset_download

    # Everything is checked before the folder is claimed or settings are recorded, so a
    # refused run leaves nothing that would block its corrected rerun.
    output_dir = str(output_dir)
    _check_output(output_dir)
    _check_settings(distributor=distributor, resize_mode=resize_mode, image_size=image_size,
                    samples_per_shard=samples_per_shard, processes=processes, threads=threads, retries=retries,
                    subjob_size=subjob_size, timeout=timeout, encode_quality=encode_quality,
                    max_image_area=max_image_area)
    filters = list(filters)
    files = _metadata_files(metadata)
    _schema(files, url_col, caption_col, [parse_filter(expr) for expr in filters], filters, hash_col)
    settings = {
        "metadata": [_file_record(f) for f in files],
        "filters": filters, "url_col": url_col, "caption_col": caption_col, "hash_col": hash_col or None,
        "image_size": image_size, "resize_mode": resize_mode, "samples_per_shard": samples_per_shard,
        "encode_quality": encode_quality, "max_image_area": max_image_area, "metadata_layout": METADATA_LAYOUT,
    }
    if not resume:
        # Start over ourselves: img2dataset's "overwrite" mode deletes whatever the folder holds.
        clear_owned(output_dir, SHARDS_KIND)
    check_may_write(output_dir, SHARDS_KIND)
    work = storage.join(output_dir, PIPELINE_DIR)
    _check_resume_settings(storage.join(work, SETTINGS), settings, output_dir)
    _check_no_stray_json(output_dir)
    claim(output_dir, SHARDS_KIND)
    storage.makedirs(work)
    rows = storage.join(work, "metadata")
    info = filter_metadata(files, rows, filters, url_col, caption_col, hash_col)
    if info["rows_kept"] == 0:
        raise DataError(f"no metadata rows left after filters {filters} and the caption policy "
                        f"(of {info['rows_in']}; {info['no_caption']} had no caption)")
    if not storage.exists(storage.join(work, SETTINGS)):  # recorded before the first shard is written
        storage.write_json(settings, storage.join(work, SETTINGS))
    columns = info["columns"]
    verify = [hash_col, "sha256"] if hash_col else None  # every filtered file has the column (_schema)
    extra = [c for c in columns if c not in (url_col, caption_col, hash_col) and c not in RESERVED_COLUMNS]
    spark = _spark_session(processes) if distributor == "pyspark" else None
    try:
        with checked_img2dataset(), _children_die_with_driver():
            img2dataset_download(
                url_list=rows,
                input_format="parquet",
                url_col=url_col,
                caption_col=caption_col,
                save_additional_columns=extra,
                output_format="webdataset",
                output_folder=output_dir,
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
                distributor=distributor,
                subjob_size=subjob_size,
                enable_wandb=False,
            )
    finally:
        # img2dataset removes its work folder only when it succeeds; a resume writes it anew.
        storage.remove(storage.join(output_dir, "_tmp"))
        if spark is not None:
            spark.stop()
    summary = summarize(output_dir)
    if info["no_caption"]:
        summary["failures_by_reason"] = {NO_CAPTION: info["no_caption"], **summary["failures_by_reason"]}
    summary.update(rows_in=info["rows_in"], rows_kept=info["rows_kept"], filters=filters,
                   distributor=distributor)
    storage.write_json(summary, storage.join(work, "summary.json"))
    return summary


def _check_output(output_dir: str) -> None:
    fs, _ = storage.location(output_dir)  # a missing fsspec back-end is reported before any work
    protocols = [fs.protocol] if isinstance(fs.protocol, str) else list(fs.protocol)
    for p in protocols:
        if p in UNWRITABLE:
            raise DataError(f"cannot download into {output_dir}: {UNWRITABLE[p]}; give a local folder or a store "
                            "every worker can write to (s3://, gs://, hdfs://)")


def _check_settings(distributor: str, resize_mode: str, timeout, encode_quality, max_image_area, **counts) -> None:
    """One line naming the first impossible setting (img2dataset would fail late, or silently store junk)."""
    if distributor not in DISTRIBUTORS:
        raise DataError(f"unknown distributor {distributor!r}; use one of {', '.join(DISTRIBUTORS)}")
    if resize_mode not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    for name, value in counts.items():
        least = 0 if name == "retries" else 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise DataError(f"{name} (--{name.replace('_', '-')}) is {value!r}; it must be a whole number "
                            f"of at least {least}")
    for name, value in (("timeout", timeout), ("max_image_area", max_image_area)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise DataError(f"{name} (--{name.replace('_', '-')}) is {value!r}; it must be a number above 0")
    if isinstance(encode_quality, bool) or not isinstance(encode_quality, numbers.Integral) \
            or not 0 <= encode_quality <= 100:
        raise DataError(f"encode_quality is {encode_quality!r}; it must be a whole number from 0 to 100 (JPEG quality)")


def _die_with(driver: int) -> None:
    """In a child img2dataset spawned: be killed when the driver dies, even by kill -9 (Linux only).

    Without it img2dataset's logger polls for shard statistics forever, pool workers wait on
    a task pipe they hold both ends of, and multiprocessing's resource tracker waits on them.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: such children outlive a killed driver
        return
    prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != driver:  # the driver died before prctl: no signal will come
        os._exit(1)


class _LoggerDyingWithDriver(_i2d_main.LoggerProcess):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.driver = os.getpid()

    def run(self):
        _die_with(self.driver)
        super().run()


class _ContextDyingWithDriver:
    """img2dataset's multiprocessing context, its pool workers set to die with the driver."""

    def __init__(self, method):
        self.context = multiprocessing.get_context(method)

    def Pool(self, *args, **kwargs):  # noqa: N802 - multiprocessing's name
        return self.context.Pool(*args, initializer=_die_with, initargs=(os.getpid(),), **kwargs)


@contextlib.contextmanager
def _children_die_with_driver():
    """For this block, the processes img2dataset spawns die with this one (Spark's JVM does already)."""
    with (swapped(_i2d_main, LoggerProcess=_LoggerDyingWithDriver),
          swapped(_i2d_distributor, get_context=_ContextDyingWithDriver)):
        yield


def check_java() -> str:
    """The ``java -version`` line Spark will use; a one-line DataError when there is no Java."""
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.path.exists(java):
        where = f"JAVA_HOME={home} has no bin/java" if home else "no java on PATH and JAVA_HOME is not set"
        raise DataError(f"--distributor pyspark needs Java 17 or newer ({where}); install a JDK "
                        "(e.g. apt install openjdk-17-jre-headless) or set JAVA_HOME, or use --distributor "
                        "multiprocessing")
    r = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    return (r.stderr or r.stdout).splitlines()[0] if (r.stderr or r.stdout) else java


def _spark_session(processes: int):
    """A local SparkSession when none is active (returned, to be stopped), else None.

    Under ``spark-submit`` or a managed Spark service a session is already active and
    img2dataset uses it as it is. The local one runs ``processes`` cores, its Python workers
    on this interpreter (Spark's default would be whatever ``python3`` is on PATH), no web UI.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError("--distributor pyspark needs pyspark: pip install 'crate-alpha[spark]' "
                        "(make venv installs it)") from None
    if SparkSession.getActiveSession() is not None:
        return None
    check_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (SparkSession.builder.master(f"local[{max(1, processes)}]").appName("crate-alpha download")
            .config("spark.ui.enabled", "false").config("spark.driver.memory", "2g")
            .getOrCreate())


def _file_record(path: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"name": os.path.basename(path.rstrip("/")), "size": size, "sha256": h.hexdigest()}


def _check_resume_settings(path: str, now: dict, output_dir: str) -> None:
    """Refuse to resume a shard folder with settings other than its first run's."""
    if not storage.exists(path):
        return
    first = storage.read_json(path)
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


def _check_no_stray_json(output_dir: str) -> None:
    # img2dataset parses every top-level *.json of its output folder as "<shard>_stats.json"
    if not storage.isdir(output_dir):
        return
    found = (os.path.basename(p) for p in storage.glob(output_dir, "*.json"))
    stray = sorted(name for name in found if not _STATS.match(name))
    if stray:
        raise DataError(f"{output_dir} holds {', '.join(stray)}, which img2dataset would read as shard statistics; "
                        "move these files out of the shard folder and rerun")
