"""The regular files of a tar archive, read front to back through one buffered file: memory holds one member.

Why not ``tarfile``: its streaming mode parses every header field and buffers in Python, about 40 us per member
(85 of the ~550 us a two-member sample of ``benchmarks/stream.py`` costs to read and preprocess, against 14 here);
a shard streamed for training only needs each file's name and bytes.

Handled: ustar/POSIX and GNU headers (the ustar ``prefix``, GNU ``././@LongLink`` names, pax ``path`` and ``size``
records), octal and base-256 numbers, both header checksums. Directories, links, devices, GNU sparse files and pax
global headers are skipped. Damage (a bad checksum, a member cut short, a file that ends without the end-of-archive
marker) raises ``tarfile.ReadError`` saying what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from tarfile import BLOCKSIZE, ReadError

END_BLOCK = bytes(BLOCKSIZE)
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
NEXT_MEMBER = (b"L", b"K", b"x", b"g")  # headers about the next member(s): GNU long name/link, pax local/global
READ_BUFFER = 1 << 20


def number(field: bytes) -> int:
    """A header number: NUL/space-terminated octal, or base-256 (first byte 0x80 or 0xff) for large values."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0o377 else value
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ReadError(f"invalid number {field!r} in a header") from None


def text(field: bytes) -> str:
    """A NUL-terminated header string (tarfile's encoding: UTF-8, undecodable bytes kept as surrogates)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def check_sum(header: bytes) -> None:
    """The header's checksum: the sum of its bytes with the checksum field as spaces (unsigned, or signed as some
    old tars wrote it)."""
    stored = number(header[148:156])
    unsigned = 256 + sum(header) - sum(header[148:156])
    if stored == unsigned:
        return
    signed = unsigned - 256 * sum(1 for byte in header[:148] + header[156:] if byte > 127)
    if stored != signed:
        raise ReadError("bad checksum")


def pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's ``LENGTH key=value\\n`` records."""
    records, at = {}, 0
    while at < len(data) and data[at] != 0:
        space = data.find(b" ", at)
        try:
            length = int(data[at:space])
        except ValueError:
            raise ReadError("invalid pax header") from None
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records


def tar_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of the tar at ``path``, in archive order."""
    with path.open("rb", buffering=READ_BUFFER) as file:
        long_name: str | None = None
        pax: dict[str, str] = {}
        first = True
        while True:
            header = file.read(BLOCKSIZE)
            if header == END_BLOCK:
                return
            if len(header) < BLOCKSIZE:
                if first and not header:
                    raise ReadError("empty file")
                raise ReadError("the file ends without the end-of-archive marker")
            check_sum(header)
            first = False
            kind = header[156:157]
            size = number(header[124:136])
            if "size" in pax and kind not in NEXT_MEMBER:
                size = int(pax["size"])
            if size < 0:
                raise ReadError(f"negative member size {size}")
            data = file.read(size)
            if len(data) < size:
                raise ReadError("unexpected end of data")
            file.seek(-size % BLOCKSIZE, 1)
            if kind == b"L":  # GNU: the next member's long name
                long_name = text(data)
            elif kind == b"x":  # pax: records for the next member
                pax = pax_records(data)
            elif kind in (b"g", b"K"):  # pax global header, GNU long link name
                continue
            else:
                name = pax.get("path") or long_name or joined_name(header)
                long_name, pax = None, {}
                if kind in REGULAR and not name.endswith("/"):
                    yield name, data


def joined_name(header: bytes) -> str:
    """The header's name, ``prefix/name`` when a POSIX ustar header sets the prefix field (GNU headers use those
    bytes for other things)."""
    name = text(header[0:100])
    prefix = text(header[345:500]) if header[257:263] == b"ustar\0" else ""
    return f"{prefix}/{name}" if prefix else name
