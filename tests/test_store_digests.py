"""Content addressing is a format: the same trees give the same digests in every version.

The digests below were taken with the store as it was before layers were written in one pass
(commit df4189b). A change to how a layer is written, hashed or indexed must keep them: a
different diff_id is a different layer for every store and registry that holds the old one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from pytest_layers import _storecore, changeset
from pytest_layers import store as store_mod
from pytest_layers.store import Store

pytestmark = pytest.mark.requires_root  # owners and a device node are part of the tree

EPOCH_MTIME = 1_700_000_000  # later than the clamp: stored as 1980-01-01
OLD_MTIME = 200_000_000  # earlier: kept


def _source(root: Path) -> None:
    """A small tree with every kind of entry a layer holds."""
    (root / "etc").mkdir()
    (root / "etc/app.conf").write_bytes(b"port = 80\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "bin").mkdir(mode=0o755)
    tool = root / "bin/tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n" * 100)
    os.chmod(tool, 0o4755)
    os.setxattr(tool, "user.origin", b"test")
    os.setxattr(root / "etc", "user.dir", b"d")
    os.link(tool, root / "tool-link")  # a hardlink group across directories
    os.symlink("../etc/app.conf", root / "bin/conf")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with open(root / "sparse", "wb") as f:  # larger than a read chunk, mostly hole
        f.seek(3 << 20)
        f.write(b"end")
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.chown(root / "etc/app.conf", 1000, 1001)
    deep = root / "a/b/c"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"x" * 5000)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in [*filenames, *dirnames]:
            p = os.path.join(dirpath, n)
            when = OLD_MTIME if n in ("app.conf", "b") else EPOCH_MTIME
            os.utime(p, (when, when), follow_symlinks=False)


def _upper(root: Path) -> None:
    """What a second layer changes: one file rewritten, one deleted, one directory removed."""
    (root / "etc/app.conf").write_bytes(b"port = 8080\n")
    os.utime(root / "etc/app.conf", (OLD_MTIME, OLD_MTIME))
    os.unlink(root / "etc/empty")
    os.unlink(root / "a/b/c/leaf")
    for d in ("a/b/c", "a/b"):
        os.rmdir(root / d)
    os.utime(root / "etc", (OLD_MTIME, OLD_MTIME))
    os.utime(root / "a", (OLD_MTIME, OLD_MTIME))


def _write(store: Store, tree: Path, parent: str | None, *, in_place: bool = False) -> str:
    lowers = [store.layer_dir(c.chain_id) for c in reversed(store.chain(parent))] if parent else []
    entries = changeset.changes_from_tree(tree, changeset.ImageView(lowers, store.flavor))
    info = store.write_layer(
        entries, parent=parent, name=None, source="build", what="test tree", in_place=in_place
    )
    return info.chain_id


# flavor -> (diff_id of the bottom layer, of the top layer, sha256 of each files.json)
PINNED = {
    "overlay": (
        "sha256:e3b5c729e9f8d63ad4116a996c2d06a724ea3a9922b4abe79d62f3fc5a3a9623",
        "sha256:c7a0def09a53ab5bb493b4eb94140b0b92a633e451a29eb23894defb64596734",
        "d61750f3fbc3f55674382622823ce69c86b47ba60cadf66bec6f9f3d4780d1e9",
        "357d6f39921ff1d3b70518f3930fc148c42aaf495f2ad4918a94afead5fa0565",
    ),
    "marker": (
        "sha256:e3b5c729e9f8d63ad4116a996c2d06a724ea3a9922b4abe79d62f3fc5a3a9623",
        "sha256:c7a0def09a53ab5bb493b4eb94140b0b92a633e451a29eb23894defb64596734",
        "d61750f3fbc3f55674382622823ce69c86b47ba60cadf66bec6f9f3d4780d1e9",
        "48b5d793028fb8c213b0b53dd5789bb08a8206ed7a0d62a6d3e76defab01bd4a",
    ),
}


@pytest.mark.parametrize("flavor", ["overlay", "marker"])
def test_layer_digests_are_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flavor: str
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.setattr(_storecore, "probe_flavor", lambda _directory: flavor)
    store = Store(tmp_path / "store")
    if store.flavor != flavor:
        pytest.skip(f"this filesystem cannot hold a {flavor} store")
    tree = tmp_path / "tree"
    tree.mkdir()
    _source(tree)
    bottom = _write(store, tree, None)
    _upper(tree)
    top = _write(store, tree, bottom)
    # The bottom layer once more, settled in place in a staging dir as a build with no parent
    # is: the same layer (a layer already stored is not stored twice; verify hashes it anew).
    with store.staging() as staged:
        _source(staged)
        assert _write(store, staged, None, in_place=True) == bottom
    # And given as the tree itself, with no change list.
    with store.staging() as staged:
        _source(staged)
        info = store.write_layer([], parent=None, name=None, source="build", tree=staged)
        assert info.chain_id == bottom
    got = (
        store.layer_info(bottom).diff_id,
        store.layer_info(top).diff_id,
        *(
            hashlib.sha256((store.layer_dir(c).parent / "files.json").read_bytes()).hexdigest()
            for c in (bottom, top)
        ),
    )
    assert got == PINNED[flavor]
    assert store.verify() == []


def test_settling_in_place_writes_what_a_copy_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree settled in place (a build with no parent) is the layer a copy would make: same
    diff_id, same index; sockets gone, unkept xattrs gone, and a hardlink reaching outside the
    tree made private without touching the outside file."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"shared with the tree\n")
    # A layer does not keep it; the file outside the tree must.
    os.setxattr(outside, "user.overlay.origin", b"mine")
    os.utime(outside, (EPOCH_MTIME, EPOCH_MTIME))
    store = Store(tmp_path / "store")

    def fill(root: Path) -> None:
        _source(root)
        os.link(outside, root / "etc/linked-in")
        os.link(outside, root / "bin/linked-too")
        os.setxattr(root / "etc/app.conf", "user.overlay.opaque", b"y")
        os.setxattr(root / "etc/app.conf", "trusted.note", b"x")
        with monkeypatch.context() as m, socket.socket(socket.AF_UNIX) as sock:
            m.chdir(root / "a")  # a socket's path must fit in 108 bytes
            sock.bind("sock")
        os.utime(root / "a", (OLD_MTIME, OLD_MTIME))

    tree = tmp_path / "tree"
    tree.mkdir()
    fill(tree)
    copied = store.layer_info(_write(store, tree, None))
    with store.staging() as staged:
        fill(staged)
        settled = store.layer_info(_write(store, staged, None, in_place=True))
        assert not staged.exists()  # moved into the store, not copied
    assert settled.chain_id == copied.chain_id
    stored = store.layer_dir(settled.chain_id)
    assert not (stored / "a/sock").exists()
    assert os.listxattr(stored / "etc/app.conf") == []
    linked = os.stat(stored / "etc/linked-in")
    assert linked.st_ino != os.stat(outside).st_ino
    assert linked.st_ino == os.stat(stored / "bin/linked-too").st_ino
    assert os.stat(outside).st_mtime == EPOCH_MTIME  # untouched
    assert os.getxattr(outside, "user.overlay.origin") == b"mine"
    assert "user.overlay.origin" not in os.listxattr(stored / "etc/linked-in")
    assert store.verify() == []


def test_in_place_needs_one_staged_tree(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    entries = changeset.changes_from_tree(tree, changeset.ImageView([], store.flavor))
    with pytest.raises(ValueError, match=r"one tree made with Store\.staging"):
        store.write_layer(entries, parent=None, name=None, source="build", in_place=True)
    assert (tree / "f").read_bytes() == b"x"


def test_recorded_disk_use_is_what_du_counts(tmp_path: Path) -> None:
    """The disk use add_layer records, taken from its one read of the tree, is disk_use() of
    the layer's directory without the two records written after it was measured."""
    store = Store(tmp_path / "store")
    tree = tmp_path / "tree"
    tree.mkdir()
    _source(tree)
    info = store.layer_info(_write(store, tree, None))
    layer_root = store.layer_dir(info.chain_id).parent
    records = sum(os.lstat(layer_root / n).st_blocks * 512 for n in ("files.json", "layer.json"))
    assert info.disk_use == store_mod.disk_use([layer_root]) - records
    assert info.disk_use > 3 << 10  # not just the directories: the files' blocks too


def test_settling_in_place_leaves_a_linked_in_fifo_and_symlink_outside_alone(
    tmp_path: Path,
) -> None:
    """A builder may hardlink any non-directory in from elsewhere, not only a regular file:
    settling clamps the layer's copy, never the inode outside (a later change there would
    change the stored layer)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo", 0o640)
    (outside / "target").write_text("outside only\n")
    os.symlink(outside / "target", outside / "sym")
    later = 1_924_992_000  # 2031: past any clamp epoch
    for name in ("fifo", "sym"):
        os.utime(outside / name, (later, later), follow_symlinks=False)
    store = Store(tmp_path / "store")

    def fill(root: Path) -> None:
        os.link(outside / "fifo", root / "fifo")
        os.link(outside / "sym", root / "sym", follow_symlinks=False)
        os.link(outside / "sym", root / "sym-too", follow_symlinks=False)

    tree = tmp_path / "tree"
    tree.mkdir()
    fill(tree)
    copied = store.layer_info(_write(store, tree, None))
    shutil.rmtree(tree)
    with store.staging() as staged:
        fill(staged)
        settled = store.layer_info(_write(store, staged, None, in_place=True))
    assert settled.chain_id == copied.chain_id
    stored = store.layer_dir(settled.chain_id)
    for name in ("fifo", "sym"):
        out = os.lstat(outside / name)
        assert (out.st_mtime, out.st_nlink) == (later, 1), name
        assert os.lstat(stored / name).st_mtime < later, name
    assert stat.S_ISFIFO(os.lstat(stored / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(stored / "fifo").st_mode) == 0o640
    for name in ("sym", "sym-too"):  # the link itself, never its target's file
        assert os.readlink(stored / name) == os.fspath(outside / "target"), name
        assert os.lstat(stored / name).st_nlink == 1, name  # its own, as write_layer makes it
    os.utime(outside / "fifo", (later + 1, later + 1))
    assert store.verify() == []
