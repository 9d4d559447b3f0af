"""Per-sample checks that run inside img2dataset's workers, before a sample is kept.

img2dataset gives no hook for three checks a data set built from untrusted metadata needs:

* URL scheme: ``urllib`` fetches ``file://`` and ``ftp://`` as readily as ``https://``, so a
  crafted parquet could pack local files into a shard. Only http(s) is fetched.
* Hash: its ``verify_hash`` compares hex digests case-sensitively and treats a null hash as
  a mismatch. Here the comparison ignores case and a null hash means "not checked".
* Decompression bombs: its ``max_image_area`` is tested after OpenCV has decoded the whole
  image (a 1.2 MB PNG of 20000x20000 costs gigabytes). Here the size is read from the header.

So :func:`checked_img2dataset` hands img2dataset subclasses of its own ``Downloader`` and
``Resizer`` (swapped in for the call only). They travel to the workers by pickling, which
resolves them by this module's import path: the multiprocessing (spawn) and Spark workers
import this module themselves, so the checks run wherever img2dataset runs a shard.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from typing import List, Optional
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations: no update check
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402

# the header reading the training loader's decode and ``data verify`` use too: one function,
# so that download, verify and training agree on which images are too large
from ..common import swapped  # noqa: E402  (img2dataset has no hooks: its globals, for one call)
from .decode import header_area  # noqa: E402

# img2dataset's package namespace exports functions named like its modules ("main",
# "download"), so the modules whose globals are swapped are taken from importlib.
_main_mod = importlib.import_module("img2dataset.main")
_downloader_mod = importlib.import_module("img2dataset.downloader")

ALLOWED_SCHEMES = ("http", "https")
HASH_MISMATCH = "hash mismatch"
# Messages img2dataset's own resizer uses, so that summaries count one reason under one name.
DECODE_ERROR = "Image decoding error"
AREA_TOO_LARGE = "image area too large"


def unsupported_scheme(url) -> Optional[str]:
    """The error message for a URL that must not be fetched, or None for http(s)."""
    scheme = urlsplit(str(url)).scheme.lower() if url is not None else ""
    if scheme in ALLOWED_SCHEMES:
        return None
    return f"unsupported url scheme {scheme + '://' if scheme else '(none)'} (only http and https are fetched)"


def hash_matches(data: bytes, expected) -> bool:
    """sha256 of ``data`` against a hex digest in any case; a null or blank digest is not checked."""
    if expected is None or not str(expected).strip():
        return True
    return hashlib.sha256(data).hexdigest() == str(expected).strip().lower()


class HeaderCheckedResizer(Resizer):
    """img2dataset's resizer, with the area limit applied from the header before any decoding.

    An image PIL cannot identify is refused too: the training loader decodes with PIL, so a
    sample only OpenCV can read would be skipped at training time anyway.
    """

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        area = header_area(img_stream.read())
        img_stream.seek(0)
        if area is None:
            return None, None, None, None, None, DECODE_ERROR
        if area > self.max_image_area:
            return None, None, None, None, None, AREA_TOO_LARGE
        return super().__call__(img_stream, blurring_bbox_list)


def _checked_fetch(original, expected: Optional[List], row, *args, **kwargs):
    key, url = row
    bad_scheme = unsupported_scheme(url)
    if bad_scheme:
        return key, None, bad_scheme
    key, stream, err = original(row, *args, **kwargs)
    if stream is not None and expected is not None:
        stream.seek(0)
        if not hash_matches(stream.read(), expected[key]):
            stream.close()
            return key, None, HASH_MISMATCH
        stream.seek(0)
    return key, stream, err


class CheckedDownloader(Downloader):
    """img2dataset's downloader with the URL-scheme and case/null-tolerant hash checks.

    img2dataset is told to verify nothing itself (its comparison is the one being replaced);
    the expected digest still reaches the worker as the shard's ``sha256`` column.
    """

    def __init__(self, *args, verify_hash_type=None, **kwargs):
        super().__init__(*args, verify_hash_type=None, **kwargs)
        self.expected_hash_column = verify_hash_type

    def download_shard(self, row):
        _, shard_file = row
        fs, path = fsspec.core.url_to_fs(shard_file)
        with fs.open(path, "rb") as f:
            table = pa.ipc.open_file(f).read_all()
        expected = (table.column(self.expected_hash_column).to_pylist()
                    if self.expected_hash_column and self.expected_hash_column in table.column_names else None)
        # img2dataset looks this function up as a module global for every sample; a worker runs
        # one shard at a time, so replacing it for the duration of the shard is safe.
        original = _downloader_mod.download_image_with_retry
        with swapped(_downloader_mod,
                     download_image_with_retry=lambda r, *a, **k: _checked_fetch(original, expected, r, *a, **k)):
            return super().download_shard(row)


def checked_img2dataset():
    """Make ``img2dataset.download`` build the checked downloader and resizer, for this block."""
    return swapped(_main_mod, Downloader=CheckedDownloader, Resizer=HeaderCheckedResizer)
