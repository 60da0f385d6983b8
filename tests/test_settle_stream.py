"""A build with no parent settles its tree in the walk that streams the layer: what that gives
must be exactly what settling the tree first (``changeset.settle_tree``) and streaming it after
gave: the same diff_id, the same stored tree, the same ``files.json`` and ``layer.json``, and
the same refusal of a bad name."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from pytest_layers import _storecore, changeset, errors
from pytest_layers.store import Store

pytestmark = pytest.mark.requires_root  # owners, trusted.* xattrs and device nodes

LATE = 1_700_000_000  # later than the clamp: stored as 1980-01-01
EARLY = 200_000_000  # earlier: kept
ROOM = 300_000_000  # a directory's own time: kept, and put back after a socket goes


def _fill(root: Path, outside: Path) -> None:
    """A builder's tree with everything settling changes."""
    (root / "etc").mkdir()
    (root / "etc/app.conf").write_bytes(b"port = 80\n")
    os.setxattr(root / "etc/app.conf", "user.keep", b"k")
    os.setxattr(root / "etc/app.conf", "user.overlay.origin", b"gone")
    os.setxattr(root / "etc/app.conf", "trusted.note", b"gone")
    os.setxattr(root / "etc", "user.overlay.opaque", b"y")  # not opaque once settled
    os.setxattr(root / "etc", "user.dir", b"d")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\n" * 300)
    os.setxattr(root / "bin/tool", "trusted.overlay.opaque", b"y")
    os.link(root / "bin/tool", root / "etc/tool-link")  # a group inside the tree
    os.link(outside / "shared", root / "etc/linked-in")  # a group reaching outside
    os.link(outside / "shared", root / "bin/linked-too")
    os.link(outside / "fifo", root / "fifo")  # special files linked in from outside
    os.link(outside / "sym", root / "bin/sym", follow_symlinks=False)
    os.symlink("tool", root / "bin/own-sym")
    os.link(root / "bin/own-sym", root / "bin/own-sym-2", follow_symlinks=False)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chown(root / "etc/app.conf", 1000, 1001)
    deep = root / "a/b/c"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"x" * 5000)
    (root / "room").mkdir()
    for n in range(3):
        (root / f"room/f{n}").write_bytes(b"%d" % n)
    here = os.getcwd()
    for where in (root / "room", root):  # sockets, in a directory and at the root
        os.chdir(where)  # a socket's path must fit in 108 bytes
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind("sock")
        finally:
            os.chdir(here)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in [*filenames, *dirnames]:
            p = os.path.join(dirpath, n)
            when = EARLY if n in ("app.conf", "b", "own-sym") else LATE
            if n in ("room", "linked-in", "linked-too", "fifo", "sym"):
                continue
            os.utime(p, (when, when), follow_symlinks=False)
    os.utime(root / "room", (ROOM, ROOM))


def _preallocate(path: Path, size: int) -> None:
    """Blocks for ``size`` bytes beyond the end of the file (``FALLOC_FL_KEEP_SIZE``): a copy of
    it is smaller on disk, which the recorded disk use of a layer must show."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_WRONLY)
    try:
        if libc.fallocate(fd, 1, 0, size) != 0:
            pytest.skip(f"fallocate: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared").write_bytes(b"shared with the tree\n")
    _preallocate(outside / "shared", 1 << 20)
    os.setxattr(outside / "shared", "user.overlay.origin", b"mine")
    os.mkfifo(outside / "fifo", 0o640)
    os.symlink("/nowhere", outside / "sym")
    for name in ("shared", "fifo", "sym"):
        os.utime(outside / name, (LATE, LATE), follow_symlinks=False)
    return outside


def _tree(root: Path) -> dict[str, Any]:
    """Everything a stored tree says: per path its metadata, content, xattrs and link group."""
    out: dict[str, Any] = {}
    first: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted([*dirnames, *filenames]):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            rec: dict[str, Any] = {
                "mode": st.st_mode,
                "owner": (st.st_uid, st.st_gid),
                "mtime_ns": st.st_mtime_ns,
                "nlink": st.st_nlink,
                "rdev": st.st_rdev,
                "xattrs": sorted(
                    (k, os.getxattr(p, k, follow_symlinks=False))
                    for k in os.listxattr(p, follow_symlinks=False)
                ),
            }
            if stat.S_ISREG(st.st_mode):
                rec["data"] = Path(p).read_bytes()
                rec["group"] = first.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            out[rel] = rec
    return out


def _stored(store: Store, chain_id: str) -> tuple[Any, ...]:
    info = store.layer_info(chain_id)
    layer = store.layer_dir(chain_id)
    return (
        info.diff_id,
        info.size,
        info.files,
        info.disk_use,
        (layer.parent / "files.json").read_bytes(),
        _tree(layer),
    )


@pytest.mark.parametrize("flavor", ["overlay", "marker"])
@pytest.mark.parametrize("source_date_epoch", [None, "2000000000"])
def test_settling_in_the_stream_is_settling_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flavor: str, source_date_epoch: str | None
) -> None:
    if source_date_epoch is None:
        monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    else:  # a clamp later than every time in the tree: nothing clamped, times kept
        monkeypatch.setenv("SOURCE_DATE_EPOCH", source_date_epoch)
    monkeypatch.setattr(_storecore, "probe_flavor", lambda _directory: flavor)
    outside = _outside(tmp_path)
    before = _tree(outside)
    first, streamed = Store(tmp_path / "first"), Store(tmp_path / "streamed")
    if first.flavor != flavor:
        pytest.skip(f"this filesystem cannot hold a {flavor} store")
    with first.staging() as staged:
        _fill(staged, outside)
        changeset.settle_tree(staged)
        want = first.add_layer(staged, parent=None, name=None, source="build").chain_id
    with streamed.staging() as staged:
        _fill(staged, outside)
        got = streamed.write_layer([], parent=None, name=None, source="build", tree=staged)
    assert got.chain_id == want
    assert _stored(streamed, got.chain_id) == _stored(first, want)
    assert _tree(outside) == before  # settling touched nothing outside the tree
    assert streamed.verify() == []


def _bad_names(root: Path) -> None:
    (root / "z").mkdir()
    (root / "z/.wh.a").write_text("")
    for n in "zyxwvutsrqponmlkjihgfedcb":  # the filesystem lists them in its own order
        (root / f".wh.{n}").write_text("")
    os.mknod(root / "a-device", 0o600 | stat.S_IFCHR, os.makedev(0, 0))


def _devices(root: Path) -> None:
    for d in ("q", "p", "m"):
        (root / d).mkdir()
        os.mknod(root / d / "dev", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    (root / "p/file").write_text("x")


def _socket_name(root: Path) -> None:
    (root / "f").write_text("x")
    os.mknod(root / "dev", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    here = os.getcwd()
    os.chdir(root)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(".wh.sock")
    finally:
        os.chdir(here)


@pytest.mark.parametrize("fill", [_bad_names, _devices, _socket_name])
def test_settling_in_the_stream_refuses_what_settling_first_refused(
    tmp_path: Path, fill: Any
) -> None:
    """The first bad entry in layer order (a ``.wh.`` name before a 0/0 device), whatever order
    the walk meets them in; nothing is stored."""
    store = Store(tmp_path / "store")
    with store.staging() as staged:
        fill(staged)
        with pytest.raises(errors.InvalidLayerError) as first:
            changeset.settle_tree(staged)
    with store.staging() as staged:
        fill(staged)
        with pytest.raises(errors.InvalidLayerError) as streamed:
            store.write_layer([], parent=None, name=None, source="build", tree=staged)
    assert (str(streamed.value), streamed.value.path) == (str(first.value), first.value.path)
    assert store.layers() == []


@pytest.mark.parametrize("how", ["stream", "settle_tree"])
def test_refused_device_linked_from_outside_is_not_touched(tmp_path: Path, how: str) -> None:
    """A 0/0 device hardlinked in from outside (an overlay whiteout elsewhere on the filesystem)
    is refused; its shared inode keeps its time, so the file outside is left as it was."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mknod(outside / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.utime(outside / "wh", (LATE, LATE))
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        os.link(outside / "wh", staged / "x")

        def build() -> None:
            if how == "stream":
                store.write_layer([], parent=None, name=None, source="build", tree=staged)
            else:
                changeset.settle_tree(staged)

        with pytest.raises(errors.InvalidLayerError, match="character device 0/0"):
            build()
    assert os.lstat(outside / "wh").st_mtime_ns == LATE * 1_000_000_000
