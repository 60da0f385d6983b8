"""The fast reader of plain layer tars gives exactly the members ``tarfile`` gives.

``apply_layer_tar`` parses the plain ustar headers of an uncompressed tar file itself and hands
every other header to ``tarfile`` (``_tarreader._PlainTarReader``). Each test here writes a tar in
one of the shapes layers come in (tarfile's three formats, GNU tar's sparse and long names,
PAX global headers, base-256 numbers, V7 directories, names that are not UTF-8) and compares
the reader's members, field by field and data byte by byte, with tarfile's own stream reader.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_layers import _tarlimits, _tarreader, layertar

FIELDS = (
    "name", "type", "mode", "uid", "gid", "size", "mtime", "linkname", "uname", "gname",
    "devmajor", "devminor", "offset", "offset_data", "pax_headers", "sparse", "chksum",
)  # fmt: skip


def _members_tarfile(path: Path) -> list[tuple[dict[str, object], bytes]]:
    out = []
    with tarfile.open(path, mode="r|") as tf:
        for m in tf:
            data = b""
            if m.isreg() and m.sparse is None:
                f = tf.extractfile(m)
                data = f.read() if f else b""
            out.append(({k: getattr(m, k) for k in FIELDS}, data))
    return out


def _members_fast(path: Path) -> tuple[list[tuple[dict[str, object], bytes]], int]:
    out = []
    with open(path, "rb") as f:
        reader = _tarreader._PlainTarReader(f, _tarlimits._BoundedTarInfo)
        delegated = 0
        real_next = reader.tf.next

        def counting_next() -> tarfile.TarInfo | None:
            nonlocal delegated
            delegated += 1
            return real_next()

        reader.tf.next = counting_next  # type: ignore[method-assign]
        with reader.tf:
            while (m := reader.next()) is not None:
                data = b""
                if m.isreg() and m.sparse is None:
                    data = b"".join(reader.read_data(m))
                out.append(({k: getattr(m, k) for k in FIELDS}, data))
    return out, delegated


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
         **attrs: object) -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1_700_000_000
    info.mode = 0o4755 if kind == tarfile.REGTYPE else 0o755
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if info.size else None)


def _sample(tf: tarfile.TarFile, *, long_link: bool = True) -> None:
    _add(tf, "etc", tarfile.DIRTYPE)
    _add(tf, "etc/hostname", data=b"box\n", uid=1000, gid=1000, uname="u", gname="g")
    _add(tf, "etc/empty")
    _add(tf, "etc/big", data=os.urandom(3 * 512 + 7))
    _add(tf, "etc/link", tarfile.SYMTYPE, linkname="../etc/hostname")
    _add(tf, "etc/hard", tarfile.LNKTYPE, linkname="etc/hostname")
    _add(tf, "dev", tarfile.DIRTYPE)
    _add(tf, "dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
    _add(tf, "dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0)
    _add(tf, "run.fifo", tarfile.FIFOTYPE)
    _add(tf, "d/" * 40 + "deep-file", data=b"deep")  # 100+ bytes: prefix, L or PAX path
    _add(tf, "usr/" + "x" * 99, data=b"long base name")
    # A link target past 100 bytes (ustar has no room for it: a short one there).
    _add(tf, "s", tarfile.SYMTYPE, linkname="t/" * (60 if long_link else 30))
    _add(tf, "caf\u00e9/\u00fcml\u00e4ut", data=b"unicode")
    _add(tf, "etc/.wh.gone")
    _add(tf, "opt/.wh..wh..opq")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_tarfile_format_reads_the_same(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        _sample(tf, long_link=fmt != tarfile.USTAR_FORMAT)
    fast, delegated = _members_fast(path)
    assert fast == _members_tarfile(path)
    assert len(fast) == 16
    if fmt == tarfile.USTAR_FORMAT:
        # tarfile reads the first header and the end of the archive, the reader the rest.
        assert delegated == 2
    else:
        assert delegated < len(fast)


def test_base256_numbers_pax_records_and_global_headers(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "a", data=b"1")
        _add(tf, "huge-uid", data=b"2", uid=8**8 + 5, gid=8**8 + 6)  # base-256 in GNU format
        _add(tf, "b", data=b"3")
    fast, delegated = _members_fast(path)
    assert fast == _members_tarfile(path)
    assert fast[1][0]["uid"] == 8**8 + 5
    assert delegated == 3  # the first member, the base-256 one, the end

    path = tmp_path / "global.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "hi"}) as tf:
        _add(tf, "a", data=b"1")
        _add(tf, "b", data=b"2", pax_headers={"SCHILY.xattr.user.k": "v"})
        _add(tf, "c", data=b"3")
    fast, _ = _members_fast(path)
    assert fast == _members_tarfile(path)
    assert all(m["pax_headers"].get("comment") == "hi" for m, _ in fast)  # type: ignore[attr-defined]


def _patch(raw: bytearray, header: int, field: slice, value: bytes) -> None:
    """Put ``value`` in ``field`` of the header at block ``header`` and fix its checksum."""
    at = header * 512
    raw[at + field.start : at + field.stop] = value.ljust(field.stop - field.start, b"\0")
    raw[at + 148 : at + 156] = b"        "
    raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])


@pytest.mark.parametrize("size", [b"-7", b"+1", b"0o1", b"1_0", b"  1 ", b"\x1c1"])
def test_numbers_only_tarfile_understands_go_to_tarfile(tmp_path: Path, size: bytes) -> None:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "a", data=b"1")
        _add(tf, "b", data=b"2")
        _add(tf, "c", data=b"3")
    raw = bytearray(path.read_bytes())
    _patch(raw, 2, slice(124, 136), size)  # b's size
    path.write_bytes(bytes(raw))
    fast, _ = _members_fast(path)
    assert fast == _members_tarfile(path)
    root = tmp_path / "root"
    root.mkdir()
    layertar.apply_layer_tar(path, root)  # never a crash (ValueError) whatever the number says


def test_v7_directories_trailing_slashes_and_names_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "first", data=b"x")
        _add(tf, "v7dir/", tarfile.AREGTYPE)  # an old tar's directory
        _add(tf, "dir//", tarfile.DIRTYPE)
        _add(tf, os.fsdecode(b"latin-\xe9"), data=b"y")
    fast, _ = _members_fast(path)
    assert fast == _members_tarfile(path)
    assert fast[1][0]["type"] == tarfile.DIRTYPE
    assert fast[1][0]["name"] == "v7dir"
    assert fast[3][0]["name"] == os.fsdecode(b"latin-\xe9")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar for sparse archives")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_files_and_long_names(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    (src / ("n" * 120)).mkdir(parents=True)
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    (src / ("n" * 120) / "file").write_bytes(b"in a long-named directory")
    (src / "plain").write_bytes(b"plain")
    path = tmp_path / "layer.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "-cf", str(path), "-C", str(src), "."],
        check=True,
    )
    fast, _ = _members_fast(path)
    assert fast == _members_tarfile(path)
    assert any(m["sparse"] for m, _ in fast)


def test_damage_is_reported_as_tarfile_reports_it(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "a", data=b"1" * 600)
        _add(tf, "b", data=b"2" * 600)
    raw = good.read_bytes()
    # Cut inside b's data: the applier says where, nothing is kept.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: 512 * 5 + 100])
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(layertar.InvalidLayerError, match="'b'"):
        layertar.apply_layer_tar(cut, root)
    # A header whose checksum does not add up, after the first: tarfile ends the archive
    # there, and so does the fast reader (the layer's DiffID check catches the rest).
    bad = bytearray(raw)
    bad[512 * 3 + 10] ^= 0xFF
    flipped = tmp_path / "flipped.tar"
    flipped.write_bytes(bytes(bad))
    fast, _ = _members_fast(flipped)
    assert fast == _members_tarfile(flipped)
    assert len(fast) == 1


def test_apply_of_a_plain_tar_file_equals_apply_of_its_stream(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _sample(tf)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    stats_file = layertar.apply_layer_tar(path, a)
    with open(path, "rb") as f:
        stats_stream = layertar.apply_layer_tar(f, b)  # a file object: the stream reader
    assert stats_file == stats_stream
    # A directory the tar only implies (d/, usr/, opt/...) is made at apply time, with that
    # moment's mtime: the same in both trees, or the two applies that straddle a second differ.
    with tarfile.open(path) as tf:
        named = {m.name.rstrip("/") for m in tf.getmembers()}
    for root in (a, b):
        for dirpath, _, _ in os.walk(root):
            if Path(dirpath) != root and str(Path(dirpath).relative_to(root)) not in named:
                os.utime(dirpath, (0, 0), follow_symlinks=False)
    assert layertar.layer_diff_id(a, flavor="marker") == layertar.layer_diff_id(b, flavor="marker")
