"""The members of a streamed tar shard, read at a fraction of ``tarfile``'s per-member cost.

webdataset reads shards with Python's ``tarfile`` in stream mode, which builds a
``TarInfo`` per member through a generic header decoder (~35 µs per member here; a
CLIPA sample is two or three members, so ~90 µs of a ~650 µs per-sample budget at 84 px).
The shards img2dataset writes are plain ustar/PAX archives, whose headers are fixed
512-byte records: this reader decodes only the fields a loader needs (name, size, type),
checks each header's checksum as ``tarfile`` does (how a damaged shard is recognised), and
understands the PAX and GNU long-name records. Anything else it cannot read as a plain
archive (a compressed ``.tar.gz``) goes to ``tarfile`` itself. ``tar_file_expander`` is a
drop-in for webdataset's, used by open_clip_train's loader through ``patches``;
tests/test_data_pipeline.py checks it yields what webdataset's yields.
"""
from __future__ import annotations

import re
import tarfile
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from webdataset.handlers import reraise_exception

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta


class _Prefixed:
    """A stream with ``head`` put back in front of it (for handing a peeked stream to ``tarfile``)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        if len(out) < n:
            out += self.stream.read(n - len(out))
        return out


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes may return short reads
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (sizes of 8 GiB and more)
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(data: bytes) -> Optional[str]:
    i, path = 0, None
    while i < len(data):
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        i += length
    return path


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    return stored == sum(header) - sum(header[148:156]) + 256


def _plain_members(stream, first: bytes) -> Iterator[Tuple[str, bytes]]:
    header, long_name = first, None
    while True:
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        if header == _ZERO:
            return  # end of archive
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad checksum")
        size, kind = _number(header[124:136]), header[156:157]
        data = _read(stream, size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        pad = -size % BLOCK
        if pad and len(_read(stream, pad)) < pad:
            raise tarfile.ReadError("unexpected end of data")
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == b"x":  # PAX extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"g", b"K"):  # PAX global header, GNU long link target: nothing a loader needs
            pass
        else:
            if long_name is not None:
                name = long_name
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            long_name = None
            if kind in _REGULAR:
                yield name, data
        header = _read(stream, BLOCK)


def tar_members(stream) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of each regular file of the tar ``stream``, in order; ``tarfile.ReadError`` on damage."""
    first = _read(stream, BLOCK)
    if not first:
        raise tarfile.ReadError("empty file")
    if len(first) == BLOCK and (first == _ZERO or _checksum_ok(first)):  # an uncompressed tar
        yield from _plain_members(stream, first)
        return
    with tarfile.open(fileobj=_Prefixed(first, stream), mode="r|*") as tar:  # compressed, or not ustar
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            tar.members = []


def tar_file_expander(data: Iterable[Dict[str, Any]], handler: Callable[[Exception], bool] = reraise_exception,
                      select_files: Optional[Callable[[str], bool]] = None,
                      rename_files: Optional[Callable[[str], str]] = None) -> Iterator[Dict[str, Any]]:
    """webdataset's ``tar_file_expander`` (same arguments, same samples), over ``tar_members``."""
    for source in data:
        url = source["url"]
        try:
            for fname, payload in tar_members(source["stream"]):
                if ("/" not in fname and fname.startswith("__") and fname.endswith("__")) or _SKIP_META.match(fname):
                    continue  # webdataset's metadata entries
                if rename_files:
                    fname = rename_files(fname)
                if select_files is not None and not select_files(fname):
                    continue
                yield {"fname": fname, "data": payload, "__url__": url}
        except Exception as exn:
            exn.args = exn.args + (source.get("stream"), source.get("url"))
            if handler(exn):
                continue
            break
