"""The members of a streamed tar shard, read at a fraction of ``tarfile``'s per-member cost.

webdataset reads shards with Python's ``tarfile`` in stream mode, which builds a
``TarInfo`` per member through a generic header decoder (~35 µs per member here; a
CLIPA sample is two or three members, so ~90 µs of a ~650 µs per-sample budget at 84 px).
The shards img2dataset writes are plain ustar/PAX archives, whose headers are fixed
512-byte records: this reader decodes only the fields a loader needs (name, size, type),
checks each header's checksum as ``tarfile`` does (how a damaged shard is recognised), and
understands the PAX and GNU long-name records; a compressed shard (``.tar.gz``, ``.bz2``,
``.xz``, the compressions ``tarfile`` reads) is decompressed as it is read. ``tar_file_expander``
is a drop-in for webdataset's, used by open_clip_train's loader through ``patches``;
tests/test_data_pipeline.py checks it yields what webdataset's yields. ``data verify`` and
``count_samples`` read shards with this reader too, so all three agree on what is damaged.

A shard is untrusted input: a header's size is checked against what a sample can hold
before anything is allocated, and data is read in bounded pieces, so a header claiming
gigabytes costs what the stream really holds (or nothing, over the limit), never the claim;
a malformed PAX record is damage, never a loop (tests/test_shard_safety.py).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from webdataset.handlers import reraise_exception

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_HEADER_RECORDS = (b"L", b"K", b"x", b"g")  # records about the next member (GNU long names, PAX headers)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta

# The largest member read. A sample's files are an image within download's pixel limit
# (PIL's MAX_IMAGE_PIXELS, 89.5 M px; the loader skips larger ones unread) and small text:
# such an image as 8-bit RGB, even stored uncompressed, is 256 MiB. A header claiming more
# is damage, refused before anything is read or allocated.
MAX_MEMBER_BYTES = 256 << 20
# A GNU long-name record or a PAX header holds the next member's name and attributes:
# 1 MiB is far above any path (PATH_MAX is 4 KiB) and the records an archiver writes.
MAX_HEADER_RECORD_BYTES = 1 << 20
# Data is read in pieces of this size, so that memory follows the bytes the stream really
# holds (a header claiming 200 MiB over 600 bytes costs 600 bytes), not the claim.
CHUNK = 1 << 20

# (magic, opener) of the compressions tarfile's stream mode reads
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))


class _Prefixed:
    """A stream with ``head`` put back in front of it (for handing a peeked stream to a decompressor)."""

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


class _Decompressed:
    """A decompressor's output; its errors on damaged data are the tar reader's ``ReadError``."""

    def __init__(self, f):
        self.f = f

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise tarfile.ReadError(f"compressed data is damaged ({e})") from e


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes may return short reads
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _read_chunked(stream, n: int) -> bytes:
    """Up to ``n`` bytes in pieces of ``CHUNK`` (a file's ``read(n)`` allocates ``n`` bytes before
    it knows how many there are)."""
    parts, got = [], 0
    while got < n:
        part = _read(stream, min(CHUNK, n - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_data(stream, size: int) -> bytes:
    """A member's ``size`` bytes and its padding to the next block; ``ReadError`` if the stream ends first."""
    data = _read(stream, size) if size <= CHUNK else _read_chunked(stream, size)
    if len(data) < size:
        raise tarfile.ReadError(f"unexpected end of data ({len(data)} of a member's {size} bytes)")
    pad = -size % BLOCK
    if pad and len(_read(stream, pad)) < pad:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _skip(stream, n: int) -> None:
    """Move over ``n`` bytes: a seek where the stream has one (the next header read finds
    out if the data was not there), else pieces read and dropped."""
    if getattr(stream, "seekable", lambda: False)():
        stream.seek(n, 1)
        return
    while n > 0:
        part = _read(stream, min(CHUNK, n))
        if not part:
            raise tarfile.ReadError("unexpected end of data")
        n -= len(part)


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (sizes of 8 GiB and more)
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> Dict[bytes, bytes]:
    """The ``"%d %s=%s\\n"`` records of a PAX header; ``ReadError`` on a malformed one (a length
    of 0, negative or past the end would never move on to the next record)."""
    records, i, n = {}, 0, len(data)
    while i < n:
        if data[i] == 0:  # NUL padding after the last record
            if data[i:].strip(b"\0"):
                raise tarfile.ReadError("bad PAX header (data after its NUL padding)")
            break
        space = data.find(b" ", i, i + 21)
        digits = data[i:space] if space > i else b""
        end = i + int(digits) if digits.isdigit() else -1
        if end <= space + 1 or end > n or data[end - 1:end] != b"\n":
            raise tarfile.ReadError(f"bad PAX header record at byte {i} (its length {digits[:20]!r} "
                                    "does not end the record)")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise tarfile.ReadError(f"bad PAX header record at byte {i} (no key=value)")
        records[key] = value
        i = end
    return records


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored == unsigned:
        return True
    # some old archivers summed signed chars; tarfile accepts either sum, and so does this reader
    return stored == unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b >= 128)


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    if prefix:
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name


def _size_error(header: bytes, kind: bytes, size: int, limit: int, long_name: Optional[str]) -> str:
    if kind in (b"x", b"g"):
        what = "a PAX header"
    elif kind in _HEADER_RECORDS:
        what = "a GNU long-name record"
    else:
        what = f"member {long_name if long_name is not None else _header_name(header)}"
    if size < 0:
        return f"{what} claims a negative size ({size} bytes)"
    return f"{what} claims {size} bytes, over the {limit}-byte limit of what a sample can hold"


def _plain_members(stream, first: bytes, with_data: bool = True) -> Iterator[Tuple[str, Optional[bytes]]]:
    header, long_name, pax_size = first, None, None
    while True:
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        if header == _ZERO:
            return  # end of archive
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad checksum")
        kind = header[156:157]
        record = kind in _HEADER_RECORDS
        try:
            size = _number(header[124:136]) if pax_size is None or record else pax_size
        except ValueError:
            raise tarfile.ReadError(f"bad size field {header[124:136]!r}") from None
        limit = MAX_HEADER_RECORD_BYTES if record else MAX_MEMBER_BYTES
        if not 0 <= size <= limit:
            raise tarfile.ReadError(_size_error(header, kind, size, limit, long_name))
        if record:
            data = _read_data(stream, size)
            if kind == b"L":  # GNU long name of the next member
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":  # PAX extended header of the next member
                records = _pax_records(data)
                if b"path" in records:
                    long_name = records[b"path"].decode("utf-8", "surrogateescape")
                if b"size" in records:  # overrides the header's (how members of 8 GiB and more are written)
                    if not records[b"size"].isdigit():
                        raise tarfile.ReadError(f"bad PAX size {records[b'size'][:20]!r}")
                    pax_size = int(records[b"size"])
            elif kind == b"g":  # PAX global header: nothing a loader needs, but malformed is damage as in "x"
                _pax_records(data)
            # "K", a GNU long link target: nothing a loader needs
        else:
            regular = kind in _REGULAR
            if regular and with_data:
                data = _read_data(stream, size)
            else:  # a folder, a link, a GNU sparse member (img2dataset writes none): not read
                data = None
                _skip(stream, size + -size % BLOCK)
            name = long_name if long_name is not None else _header_name(header)
            long_name = pax_size = None
            if regular:
                yield name, data
        header = _read(stream, BLOCK)


def _members(stream, with_data: bool) -> Iterator[Tuple[str, Optional[bytes]]]:
    first = _read(stream, BLOCK)
    if not first:
        raise tarfile.ReadError("empty file")
    if len(first) == BLOCK and (first == _ZERO or _checksum_ok(first)):  # an uncompressed tar
        yield from _plain_members(stream, first, with_data)
        return
    for magic, opener in _COMPRESSED:
        if first.startswith(magic):
            plain = _Decompressed(opener(_Prefixed(first, stream)))
            head = _read(plain, BLOCK)
            if len(head) == BLOCK and (head == _ZERO or _checksum_ok(head)):
                yield from _plain_members(plain, head, with_data)
                return
            raise tarfile.ReadError("compressed, but not a tar archive inside")
    raise tarfile.ReadError("not a tar archive (its first header has a bad checksum)")


def tar_members(stream) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of each regular file of the tar ``stream``, in order; ``tarfile.ReadError`` on damage."""
    return _members(stream, with_data=True)


def tar_names(stream) -> Iterator[str]:
    """The names of the regular files of the tar ``stream``, their data skipped (seeked over
    where the stream can seek); the same damage as ``tar_members`` is a ``ReadError``."""
    return (name for name, _ in _members(stream, with_data=False))


def is_meta(fname: str) -> bool:
    """Whether webdataset's expander drops ``fname`` as a metadata entry (``__key__``, ``__x__/...``)."""
    return ("/" not in fname and fname.startswith("__") and fname.endswith("__")) or bool(_SKIP_META.match(fname))


def tar_file_expander(data: Iterable[Dict[str, Any]], handler: Callable[[Exception], bool] = reraise_exception,
                      select_files: Optional[Callable[[str], bool]] = None,
                      rename_files: Optional[Callable[[str], str]] = None) -> Iterator[Dict[str, Any]]:
    """webdataset's ``tar_file_expander`` (same arguments, same samples), over ``tar_members``."""
    for source in data:
        url = source["url"]
        try:
            for fname, payload in tar_members(source["stream"]):
                if is_meta(fname):
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
