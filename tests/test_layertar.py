"""The canonical layer tar: format, order, reproducibility, digests and chain ids."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from treeutil import make_tree, set_mtime, set_tree_mtimes, whiteout

from pytest_layers import layertar
from pytest_layers.errors import InvalidLayerError
from pytest_layers.layertar import (
    DEFAULT_EPOCH,
    chain_id,
    chain_ids,
    clamp_epoch,
    layer_diff_id,
    write_layer_tar,
)

EMPTY_LAYER = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
T = 1_600_000_000


@pytest.fixture(autouse=True)
def _no_sde(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


def tar_bytes(layer: Path, flavor: layertar.Flavor = "overlay") -> bytes:
    buf = io.BytesIO()
    digest = write_layer_tar(layer, buf, flavor=flavor)
    data = buf.getvalue()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    return data


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def sample_tree(root: Path, order: int = 1) -> Path:
    """A tree with one of most kinds of entry; ``order`` reverses creation order."""
    spec = {
        "etc": None,
        "etc/os-release": "ID=demo\n",
        "etc/app.conf": ("file", "debug=false\n", 0o640),
        "bin": None,
        "bin/tool": ("file", b"\x7fELF" + bytes(3000), 0o4755),
        "bin/tool-link": ("hardlink", "bin/tool"),
        "lib": ("symlink", "/usr/lib"),
        "usr/lib/libx.so": b"lib",
        "usr/lib/rel": ("symlink", "../../etc/os-release"),
        "tmp": ("dir",),
        "run/fifo": ("fifo",),
    }
    items = list(spec.items())
    if order < 0:
        # make_tree creates missing parents, so reversed order works; links need their target.
        items.reverse()
        items.sort(key=lambda item: isinstance(item[1], tuple) and item[1][0] == "hardlink")
    make_tree(root, dict(items))
    os.chmod(root / "tmp", 0o1777)
    os.setxattr(root / "etc/app.conf", "user.comment", b"hello")
    set_tree_mtimes(root, T)
    return root


def test_empty_layer_is_the_well_known_empty_diff_id(tmp_path: Path) -> None:
    data = tar_bytes(tmp_path)
    assert data == bytes(1024)
    assert layer_diff_id(tmp_path, flavor="overlay") == EMPTY_LAYER


def test_digest_equals_sha256_of_written_bytes(tmp_path: Path) -> None:
    sample_tree(tmp_path / "t")
    data = tar_bytes(tmp_path / "t")
    assert layer_diff_id(tmp_path / "t", flavor="overlay") == (
        "sha256:" + hashlib.sha256(data).hexdigest()
    )


def test_reproducible_across_directories_times_and_creation_order(tmp_path: Path) -> None:
    a = sample_tree(tmp_path / "a", order=1)
    time.sleep(0.05)  # different ctimes
    b = sample_tree(tmp_path / "b", order=-1)
    for path in (b / "etc/os-release", b / "bin/tool"):
        os.utime(path, (T + 12345, T))  # different atime, same mtime
    # Sub-second mtime differences vanish: mtimes are truncated to the second.
    os.utime(b / "etc/os-release", ns=(T * 10**9, T * 10**9 + 999_999_999))
    assert layer_diff_id(a, flavor="overlay") == layer_diff_id(b, flavor="overlay")
    set_mtime(b / "etc/os-release", T + 1)
    assert layer_diff_id(a, flavor="overlay") != layer_diff_id(b, flavor="overlay")


def test_entries_sorted_by_components_parents_first_no_root_no_dot(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a/b": "1", "a-b": "2", "a.c": "3", "a/a": "4", "Z": "5", "a0/x": "6"})
    names = [m.name for m in members(tar_bytes(tmp_path))]
    assert names == ["Z", "a", "a/a", "a/b", "a-b", "a.c", "a0", "a0/x"]


def test_directory_names_have_no_trailing_slash(tmp_path: Path) -> None:
    make_tree(tmp_path, {"d": None})
    raw = tar_bytes(tmp_path)
    assert raw[:100] == b"d".ljust(100, b"\0")
    assert raw[156:157] == tarfile.DIRTYPE


def test_header_fields_are_canonical(tmp_path: Path) -> None:
    sample_tree(tmp_path)
    for m in members(tar_bytes(tmp_path)):
        assert m.uname == ""
        assert m.gname == ""
        assert m.mtime == T
        assert "atime" not in m.pax_headers
        assert "ctime" not in m.pax_headers
    by_name = {m.name: m for m in members(tar_bytes(tmp_path))}
    assert by_name["bin/tool"].mode == 0o4755
    assert by_name["tmp"].mode == 0o1777
    assert by_name["etc/app.conf"].mode == 0o640
    assert by_name["lib"].issym()
    assert by_name["lib"].linkname == "/usr/lib"
    assert by_name["run/fifo"].isfifo()


def test_mtime_truncated_not_clamped_without_source_date_epoch(tmp_path: Path) -> None:
    make_tree(tmp_path, {"f": "x"})
    future = 4_000_000_000
    os.utime(tmp_path / "f", ns=(0, future * 10**9 + 700_000_000))
    assert members(tar_bytes(tmp_path))[0].mtime == future


def test_source_date_epoch_clamps_later_mtimes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, {"new": "x", "old": "y"})
    set_mtime(tmp_path / "new", 2_000_000_000)
    set_mtime(tmp_path / "old", 1_000_000_000)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1500000000")
    mt = {m.name: m.mtime for m in members(tar_bytes(tmp_path))}
    assert mt == {"new": 1_500_000_000, "old": 1_000_000_000}


def test_clamp_epoch_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert clamp_epoch() == DEFAULT_EPOCH == 315532800
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert clamp_epoch() == 1_700_000_000


@pytest.mark.parametrize("bad", ["yesterday", "1.5", "-3", "0x10"])
def test_clamp_epoch_rejects_non_integer(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", bad)
    with pytest.raises(ValueError, match=r"SOURCE_DATE_EPOCH=.*whole number"):
        clamp_epoch()


def test_hardlinks_one_data_entry_then_links(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {"b/data": "payload", "a/first": ("hardlink", "b/data"), "c": ("hardlink", "b/data")},
    )
    ms = members(tar_bytes(tmp_path))
    by_name = {m.name: m for m in ms}
    assert by_name["a/first"].isreg()
    assert by_name["a/first"].size == 7
    for name in ("b/data", "c"):
        assert by_name[name].islnk()
        assert by_name[name].linkname == "a/first"
        assert by_name[name].size == 0


def test_user_xattrs_kept_bookkeeping_dropped(tmp_path: Path) -> None:
    make_tree(tmp_path, {"f": "x", "d": None})
    os.setxattr(tmp_path / "f", "user.keep", b"\x00\xffbinary")
    os.setxattr(tmp_path / "f", "user.overlay.redirect", b"x")
    os.setxattr(tmp_path / "f", "user.fuseoverlayfs.foo", b"x")
    os.setxattr(tmp_path / "d", "user.a", b"1")
    by_name = {m.name: m for m in members(tar_bytes(tmp_path))}
    f_records = {k: v for k, v in by_name["f"].pax_headers.items() if k.startswith("SCHILY")}
    assert f_records == {"SCHILY.xattr.user.keep": "\x00\udcffbinary"}
    assert f_records["SCHILY.xattr.user.keep"].encode("utf-8", "surrogateescape") == (
        b"\x00\xffbinary"
    )
    assert by_name["d"].pax_headers == {"SCHILY.xattr.user.a": "1"}


@pytest.mark.requires_root
def test_security_capability_kept_trusted_dropped(tmp_path: Path) -> None:
    make_tree(tmp_path, {"ping": "x"})
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
    os.setxattr(tmp_path / "ping", "security.capability", cap)
    os.setxattr(tmp_path / "ping", "trusted.overlay.origin", b"x")
    os.setxattr(tmp_path / "ping", "trusted.other", b"x")
    (m,) = members(tar_bytes(tmp_path))
    assert set(m.pax_headers) == {"SCHILY.xattr.security.capability"}
    assert (
        m.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == cap
    )


def test_overlay_whiteouts_become_wh_files(tmp_path: Path) -> None:
    make_tree(tmp_path, {"etc/keep": "k"})
    whiteout(tmp_path / "etc/gone")
    whiteout(tmp_path / "zz")
    set_tree_mtimes(tmp_path, T)
    by_name = {m.name: m for m in members(tar_bytes(tmp_path))}
    assert list(by_name) == [".wh.zz", "etc", "etc/.wh.gone", "etc/keep"]
    for name in ("etc/.wh.gone", ".wh.zz"):
        m = by_name[name]
        assert (m.type, m.mode, m.uid, m.gid, m.mtime, m.size) == (
            tarfile.REGTYPE,
            0o600,
            0,
            0,
            0,
            0,
        )


def test_marker_and_overlay_flavors_give_the_same_tar(tmp_path: Path) -> None:
    ov = make_tree(tmp_path / "ov", {"d/f": "x"})
    whiteout(ov / "d/gone")
    mk = make_tree(tmp_path / "mk", {"d/f": "x", "d/.wh.gone": ("file", "", 0o644)})
    set_tree_mtimes(ov, T)
    set_tree_mtimes(mk, T)
    assert tar_bytes(ov, "overlay") == tar_bytes(mk, "marker")


def test_overlay_opaque_xattr_becomes_opaque_marker(tmp_path: Path) -> None:
    make_tree(tmp_path, {"d/new": "x"})
    os.setxattr(tmp_path / "d", "user.overlay.opaque", b"y")
    names = [m.name for m in members(tar_bytes(tmp_path))]
    assert names == ["d", "d/.wh..wh..opq", "d/new"]


def test_wh_named_file_in_overlay_flavor_cannot_be_committed(tmp_path: Path) -> None:
    make_tree(tmp_path, {"etc/.wh.secret": "x"})
    with pytest.raises(InvalidLayerError, match=r"\.wh\.secret.*cannot be committed"):
        layer_diff_id(tmp_path, flavor="overlay")


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", ".wh..wh.plnk"])
def test_invalid_marker_names_rejected(tmp_path: Path, name: str) -> None:
    make_tree(tmp_path, {f"d/{name}": ""})
    with pytest.raises(InvalidLayerError, match="not a valid whiteout name"):
        layer_diff_id(tmp_path, flavor="marker")


def test_unknown_flavor_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown whiteout flavor 'aufs'"):
        layer_diff_id(tmp_path, flavor="aufs")  # type: ignore[arg-type]


def test_sockets_are_skipped(tmp_path: Path) -> None:
    import socket

    make_tree(tmp_path, {"f": "x"})
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.fspath(tmp_path / "s"))
        assert [m.name for m in members(tar_bytes(tmp_path))] == ["f"]
    finally:
        sock.close()


@pytest.mark.requires_root
def test_devices_fifos_and_numeric_owners(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {"dev/null": ("chardev", 1, 3), "dev/loop0": ("blockdev", 7, 0), "dev/p": ("fifo",)},
    )
    os.chown(tmp_path / "dev/null", 1234, 5678)
    os.chown(tmp_path / "dev/p", 3_000_000, 7)  # beyond the 7-digit octal field: PAX uid
    by_name = {m.name: m for m in members(tar_bytes(tmp_path))}
    null = by_name["dev/null"]
    assert null.ischr()
    assert (null.devmajor, null.devminor) == (1, 3)
    assert (null.uid, null.gid, null.uname, null.gname) == (1234, 5678, "", "")
    assert by_name["dev/loop0"].isblk()
    assert by_name["dev/loop0"].devmajor == 7
    assert by_name["dev/p"].isfifo()
    assert by_name["dev/p"].uid == 3_000_000
    assert by_name["dev/p"].pax_headers == {"uid": "3000000"}


def test_long_unicode_and_non_utf8_names(tmp_path: Path) -> None:
    long_dir = "d" * 120
    long_name = "n" * 200
    raw = b"caf\xe9-\xff"
    make_tree(tmp_path, {f"{long_dir}/{long_name}": "x", "ünïcödé ✓": "u"})
    (tmp_path / os.fsdecode(raw)).write_bytes(b"raw")
    os.symlink("t" * 300, tmp_path / "longlink")
    ms = members(tar_bytes(tmp_path))
    names = {m.name.encode("utf-8", "surrogateescape") for m in ms}
    assert raw in names
    assert "ünïcödé ✓".encode() in names
    assert f"{long_dir}/{long_name}".encode() in names
    link = next(m for m in ms if m.name == "longlink")
    assert link.linkname == "t" * 300


def test_readable_by_gnu_tar_without_complaint(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    layer = sample_tree(tmp_path / "layer")
    whiteout(layer / "etc/gone")
    (layer / os.fsdecode(b"bad-\xff")).write_bytes(b"x")
    (layer / ("L" * 180)).write_bytes(b"y")
    os.setxattr(layer / "etc/os-release", "user.bin", b"\xff\xfe")
    archive = tmp_path / "layer.tar"
    with archive.open("wb") as f:
        write_layer_tar(layer, f, flavor="overlay")
    listing = subprocess.run(["tar", "--xattrs", "-tvf", archive], capture_output=True, check=False)
    assert listing.returncode == 0
    assert listing.stderr == b""
    assert len(listing.stdout.splitlines()) == len(members(archive.read_bytes()))
    out = tmp_path / "out"
    out.mkdir()
    extract = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "-xf", archive, "-C", out],
        capture_output=True,
        check=False,
    )
    assert extract.returncode == 0
    assert extract.stderr == b""
    assert (out / os.fsdecode(b"bad-\xff")).read_bytes() == b"x"
    assert (out / ("L" * 180)).read_bytes() == b"y"
    assert (out / "etc/.wh.gone").stat().st_size == 0
    assert os.getxattr(out / "etc/os-release", "user.bin") == b"\xff\xfe"
    assert (out / "bin/tool").stat().st_ino == (out / "bin/tool-link").stat().st_ino


class _NoSlashTarInfo(tarfile.TarInfo):
    """tarfile's own header encoder, minus the trailing slash it adds to directory names."""

    def get_info(self):  # type: ignore[no-untyped-def]
        info = super().get_info()
        info["name"] = self.name
        return info


def reference_tar(root: Path) -> bytes:
    """The canonical tar built independently with tarfile.TarFile.gettarinfo/addfile."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.tarinfo = _NoSlashTarInfo

        def walk(rel: bytes) -> None:
            base = os.path.join(os.fsencode(root), rel) if rel else os.fsencode(root)
            for name in sorted(os.listdir(base)):
                path = os.path.join(base, name)
                arc = os.path.join(rel, name) if rel else name
                ti = tf.gettarinfo(os.fsdecode(path), arcname=os.fsdecode(arc))
                ti.uname = ti.gname = ""
                ti.mtime = int(os.lstat(path).st_mtime)
                ti.pax_headers = {
                    f"SCHILY.xattr.{k}": os.getxattr(path, k, follow_symlinks=False).decode(
                        "utf-8", "surrogateescape"
                    )
                    for k in sorted(os.listxattr(path, follow_symlinks=False))
                    if k.startswith("user.")
                }
                if ti.isreg():
                    with open(path, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
                if ti.isdir():
                    walk(arc)

        walk(b"")
    return buf.getvalue()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tarfile < 3.11 fills device fields")
def test_byte_identical_to_tarfile_reference(tmp_path: Path) -> None:
    layer = sample_tree(tmp_path / "layer")
    make_tree(layer, {"x" * 150: "long", "ünï/çödé": "u", "big": bytes(range(256)) * 5000})
    set_tree_mtimes(layer, T)
    mine = tar_bytes(layer)
    ref = reference_tar(layer)
    # tarfile pads the archive to a 10 KiB record; the canonical tar stops after two zero blocks.
    assert ref[: len(mine)] == mine
    assert ref[len(mine) :] == bytes(len(ref) - len(mine))


def test_sparse_file_digest_matches_plain_read(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    with open(layer / "sparse", "wb") as f:
        f.truncate(5 * 2**20 + 123)
        f.seek(2**20 + 17)
        f.write(b"data in the middle")
        f.seek(4 * 2**20)
        f.write(os.urandom(70_000))
    (layer / "dense").write_bytes(os.urandom(3 * 2**20 + 5))
    set_tree_mtimes(layer, T)
    assert (layer / "sparse").stat().st_blocks * 512 < 5 * 2**20
    mine = tar_bytes(layer)
    assert mine == reference_tar(layer)[: len(mine)]


class _CountingSink:
    def __init__(self) -> None:
        self.head = bytearray()
        self.total = 0

    def write(self, data: bytes) -> int:
        if len(self.head) < 8192:
            self.head += bytes(data[: 8192 - len(self.head)])
        self.total += len(data)
        return len(data)


@pytest.mark.slow
def test_sparse_file_larger_than_8_gib(tmp_path: Path) -> None:
    size = 8 * 2**30 + 4097
    layer = tmp_path / "layer"
    layer.mkdir()
    with open(layer / "huge", "wb") as f:
        f.truncate(size)
        f.seek(3 * 2**30)
        f.write(b"needle")
    assert (layer / "huge").stat().st_blocks < 1024  # the test must not fill the disk
    sink = _CountingSink()
    digest = write_layer_tar(layer, sink, flavor="overlay")  # type: ignore[arg-type]
    assert digest.startswith("sha256:")
    with tarfile.open(fileobj=io.BytesIO(bytes(sink.head)), mode="r|") as tf:
        m = next(iter(tf))
    assert m.name == "huge"
    assert m.size == size
    assert m.pax_headers["size"] == str(size)
    # PAX header block + records block + ustar block + data padded + two zero blocks.
    padded = size + (-size % 512)
    assert sink.total == 512 * 3 + padded + 1024


def test_chain_id_worked_example() -> None:
    d = [
        "sha256:" + hashlib.sha256(b"layer0").hexdigest(),
        "sha256:" + hashlib.sha256(b"layer1").hexdigest(),
        "sha256:" + hashlib.sha256(b"layer2").hexdigest(),
    ]
    c1 = "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d[2]}".encode()).hexdigest()
    assert chain_ids(d) == [d[0], c1, c2]
    assert chain_id(d) == c2
    assert chain_id(d[:1]) == d[0]


def test_chain_id_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        chain_id([])
    with pytest.raises(ValueError, match="not a diff_id"):
        chain_ids(["md5:abc"])
    assert chain_ids([]) == []


def test_hardlinked_whiteouts_are_not_a_hardlink_group(tmp_path: Path) -> None:
    # overlayfs shares one whiteout inode between many whiteouts; each must stay a whiteout.
    whiteout(tmp_path / "a")
    os.link(tmp_path / "a", tmp_path / "b")
    ms = members(tar_bytes(tmp_path))
    assert [(m.name, m.type) for m in ms] == [
        (".wh.a", tarfile.REGTYPE),
        (".wh.b", tarfile.REGTYPE),
    ]
    assert all(stat.S_IMODE(m.mode) == 0o600 for m in ms)
