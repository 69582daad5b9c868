"""``tar_files``, the shard reader's tar parser: the same (name, bytes) as ``tarfile`` for every header format it
meets, and damage that ``tarfile``'s streaming mode let through unnoticed (a bad header mid-archive) is an error."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from codebridge.data.sources.tar import number, tar_files
from codebridge.data.sources.webdataset import read_shard
from test_sources import write_tar

LONG = "deep/" * 30 + "sample-0001.png"  # > 100 bytes: a ustar prefix, a GNU long name or a pax path
MEMBERS = [
    ("a.txt", b"caption a"),
    ("a.png", bytes(range(256)) * 3),  # not a multiple of the block size
    ("empty.txt", b""),
    ("block.json", b"{}" * 256),  # exactly one block
    (LONG, b"long"),
    ("l\u00e9gende-\u732b.txt", "un chat \u732b".encode()),  # non-ASCII: a pax path record in PAX format
]


def write(path: Path, fmt: int, extra: bool = True) -> Path:
    """MEMBERS in ``fmt``, with a directory, a symlink and a hard link between them when ``extra``."""
    with tarfile.open(path, "w", format=fmt, encoding="utf-8") as tar:
        for i, (name, data) in enumerate(MEMBERS):
            if extra and i == 2:
                for other, kind in (
                    ("folder/", tarfile.DIRTYPE),
                    ("sym.png", tarfile.SYMTYPE),
                    ("hard.png", tarfile.LNKTYPE),
                ):
                    info = tarfile.TarInfo(other)
                    info.type, info.linkname = kind, "" if kind == tarfile.DIRTYPE else "a.png"
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def with_tarfile(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_files_as_tarfile_in_every_format(tmp_path: Path, fmt: int) -> None:
    path = write(tmp_path / "s.tar", fmt)
    assert list(tar_files(path)) == with_tarfile(path) == MEMBERS


def test_base256_and_octal_numbers() -> None:
    assert number(b"0000644\0") == 0o644 and number(b"     17 ") == 0o17 and number(b"\0" * 8) == 0
    assert number(b"\x80" + (2**40).to_bytes(11, "big")) == 2**40
    with pytest.raises(tarfile.ReadError, match="invalid number"):
        number(b"12x4\0\0\0\0")


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (1536 + 100, "unexpected end of data"),  # inside a.png's data (a.txt: blocks 0-1, a.png's header: 2)
        (1024 + 200, "ends without the end-of-archive marker"),  # inside the second header
        (-1024, "ends without the end-of-archive marker"),  # the end-of-archive blocks cut off
        (0, "empty file"),
    ],
)
def test_damage_is_a_read_error(tmp_path: Path, cut: int, why: str) -> None:
    path = tmp_path / "s.tar"
    whole = write(tmp_path / "whole.tar", tarfile.USTAR_FORMAT, extra=False).read_bytes()
    end = len(whole.rstrip(b"\0")) // 512 * 512 + 512 if cut < 0 else cut  # cut < 0: just after the last member
    path.write_bytes(whole[:end])
    with pytest.raises(tarfile.ReadError, match=why):
        list(tar_files(path))


def test_a_bad_header_mid_shard_is_a_corrupt_shard_not_its_end(tmp_path: Path) -> None:
    """tarfile's streaming mode took a damaged header after the first one for the end of the archive: the rest of
    the shard was dropped without a word."""
    path = write_tar(tmp_path / "s.tar", [(f"{k}.txt", f"caption {k}".encode()) for k in "abcd"])
    data = bytearray(path.read_bytes())
    data[2 * 1024 + 10] ^= 0xFF  # a byte of c.txt's name: its header's checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(tar_files(path))
    read = [(source, getattr(found, "reason", "")) for source, found in read_shard(path)]
    assert read[0] == (f"{path}:a", "") and len(read) == 2  # b may have more members: dropped with the damage
    assert read[1][0] == str(path) and "bad checksum" in read[1][1] and "after key 'a'" in read[1][1]
