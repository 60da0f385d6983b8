"""Edges of a build settled by the walk that streams it (no parent, ``Store.write_layer(...,
tree=)``): a file hardlinked in from outside that changes meanwhile, a lone link to such a
file, a file swapped for a fifo, and the order of a refusal. None needs root."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_layers import _layerwriter, _linux, _storewrite, _tarwrite, changeset, errors
from pytest_layers._layerindex import disk_use
from pytest_layers.store import Store


def test_outside_file_written_before_the_copy_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream read a file linked in from outside; the private copy made afterwards must be
    what was streamed, or the stored layer would not match its DiffID."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "log").write_bytes(b"line 1\n")

    def write_outside(_tree: Path) -> None:
        with open(outside / "log", "ab") as f:  # a writer outside, between stream and copy
            f.write(b"line 2\n")

    _before_finish(monkeypatch, write_outside)
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "a").write_bytes(b"a\n")
        os.link(outside / "log", staged / "log")
        with pytest.raises(errors.InvalidLayerError, match="changed while the layer was read"):
            store.write_layer([], parent=None, name=None, source="build", tree=staged)
        assert not [p.name for p in staged.iterdir() if p.name.startswith(".settle-")]
    assert store.layers() == []
    assert (outside / "log").read_bytes() == b"line 1\nline 2\n"


def test_outside_file_unchanged_is_stored_private(tmp_path: Path) -> None:
    """The check passes an unchanged file: the layer holds a private copy that verifies."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "log").write_bytes(b"line 1\n" * 5000)  # past the stream's one-piece size
    os.setxattr(outside / "log", "user.keep", b"k")
    os.setxattr(outside / "log", "user.overlay.origin", b"not in a layer")
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        os.link(outside / "log", staged / "log")
        os.link(outside / "log", staged / "log2")
        info = store.write_layer([], parent=None, name=None, source="build", tree=staged)
    assert store.verify() == []
    stored = store.layer_dir(info.chain_id)
    assert os.stat(stored / "log").st_nlink == 2
    assert os.stat(outside / "log").st_nlink == 1
    assert os.listxattr(stored / "log") == ["user.keep"]
    assert os.getxattr(outside / "log", "user.overlay.origin") == b"not in a layer"


def _fill_lone_link(root: Path, outside: Path) -> None:
    (root / "a").write_bytes(b"private\n")
    os.link(outside / "shared", root / "linked-in")


def test_lone_link_to_outside_file_is_no_group(tmp_path: Path) -> None:
    """One link inside the tree to a file outside becomes a private file with one link: its
    files.json record names no hardlink group, as when the tree was settled first."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared").write_bytes(b"shared\n")
    first, streamed = Store(tmp_path / "first"), Store(tmp_path / "streamed")
    with first.staging() as staged:
        _fill_lone_link(staged, outside)
        changeset.settle_tree(staged)
        want = first.add_layer(staged, parent=None, name=None, source="build").chain_id
    with streamed.staging() as staged:
        _fill_lone_link(staged, outside)
        got = streamed.write_layer([], parent=None, name=None, source="build", tree=staged)
    assert got.chain_id == want
    files = (streamed.layer_dir(want).parent / "files.json").read_text()
    assert "link_group" not in files
    assert files == (first.layer_dir(want).parent / "files.json").read_text()


class _Hung(Exception):
    pass


def test_file_swapped_for_a_fifo_is_refused_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regular file replaced by a fifo after its directory was listed (a builder's process
    still running) is refused as changed; opening it must not wait for a writer."""
    real = _tarwrite._settle_children

    def listed_then_swapped(dir_fd: int, prefix: bytes, settle: _tarwrite.Settle) -> Any:
        children = real(dir_fd, prefix, settle)
        if prefix == b"":
            os.unlink("f", dir_fd=dir_fd)
            os.mkfifo("f", dir_fd=dir_fd)
        return children

    def hung(signum: int, frame: object) -> None:
        raise _Hung("the build waits on a fifo for a writer")

    monkeypatch.setattr(_tarwrite, "_settle_children", listed_then_swapped)
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "f").write_bytes(b"x")
        # Only a guard that turns a hang into a failure: a build that works never meets it.
        old = signal.signal(signal.SIGALRM, hung)
        signal.alarm(120)
        try:
            with pytest.raises(errors.InvalidLayerError, match="changed type"):
                store.write_layer([], parent=None, name=None, source="build", tree=staged)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    assert store.layers() == []


def _swap_for_fifo_after_listing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = _tarwrite._settle_children

    def listed_then_swapped(dir_fd: int, prefix: bytes, settle: _tarwrite.Settle) -> Any:
        children = real(dir_fd, prefix, settle)
        if prefix == b"":
            os.unlink(name, dir_fd=dir_fd)
            os.mkfifo(name, dir_fd=dir_fd)
        return children

    monkeypatch.setattr(_tarwrite, "_settle_children", listed_then_swapped)


def test_refusal_comes_before_a_read_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A '.wh.' name deep in the tree is refused, not the failure the stream met first on a file
    it reached before (here one that changed type), as when the tree was settled first."""
    _swap_for_fifo_after_listing(monkeypatch, "a")
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "a").write_bytes(b"x")
        (staged / "z/y").mkdir(parents=True)
        (staged / "z/y/.wh.gone").write_bytes(b"")
        (staged / "z/.wh.first").write_bytes(b"")
        with pytest.raises(errors.InvalidLayerError, match=r"'z/\.wh\.first': a file whose name"):
            store.write_layer([], parent=None, name=None, source="build", tree=staged)
    assert store.layers() == []


@contextlib.contextmanager
def _as_one_who_cannot_read_mode_000() -> Iterator[None]:
    """This thread without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH in its effective set (root,
    or the session's user namespace, has them), given back after."""
    caps = _linux.capget()
    dac = (1 << 1) | (1 << 2)
    if not caps.effective & dac:
        yield
        return
    _linux.capset(_linux.Capabilities(caps.effective & ~dac, caps.permitted, caps.inheritable))
    try:
        yield
    finally:
        _linux.capset(caps)


def test_refusal_comes_before_permission_denied(tmp_path: Path) -> None:
    """The same with a file the builder made unreadable (as a user who cannot read it)."""
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "a-secret").write_bytes(b"x")
        (staged / "a-secret").chmod(0)
        (staged / "b").mkdir()
        (staged / "b/.wh.gone").write_bytes(b"")
        try:
            with _as_one_who_cannot_read_mode_000():
                with pytest.raises(PermissionError):
                    os.close(os.open(staged / "a-secret", os.O_RDONLY))
                with pytest.raises(errors.InvalidLayerError, match=r"'b/\.wh\.gone'"):
                    store.write_layer([], parent=None, name=None, source="build", tree=staged)
        finally:
            (staged / "a-secret").chmod(0o600)
    assert store.layers() == []


def _fill_full_dir(root: Path, n: int, outside: Path, twin: bool) -> None:
    d = root / "d"
    d.mkdir()
    for i in range(n):
        (d / f"filler-{i:05d}-abcdefgh").write_bytes(b"")
    os.link(outside / "shared", d / "zz-linked-in")
    os.link(outside / "shared", d / "zz-linked-too")
    if twin:  # a twin made by the walk, besides the group's copy made after it
        os.link(outside / "sym", d / "zz-sym", follow_symlinks=False)


@pytest.mark.parametrize("twin", [False, True])
def test_disk_use_counts_directories_grown_by_settling(tmp_path: Path, twin: bool) -> None:
    """Settling makes a private copy under a temporary name beside the link: a directory whose
    last block was full grows (and never shrinks). The recorded disk use is what the stored
    layer uses, for directory sizes up to the first one settling grows."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared").write_bytes(b"s")
    os.symlink("shared", outside / "sym")
    for n in range(100, 200):  # until settling grows the directory (a block's edge is crossed)
        store = Store(tmp_path / f"s{n}")
        with store.staging() as staged:
            _fill_full_dir(staged, n, outside, twin)
            before = os.lstat(staged / "d").st_blocks
            got = store.write_layer([], parent=None, name=None, source="build", tree=staged)
        tree = store.layer_dir(got.chain_id)
        # What the layer's record counts: its container, its tree (no blob is kept here).
        assert got.disk_use == disk_use([tree]) + os.lstat(tree.parent).st_blocks * 512, n
        if os.lstat(tree / "d").st_blocks > before:
            break
    else:
        pytest.skip("no directory grew here (a filesystem sizing directories otherwise)")


def _outside_and_victim(tmp_path: Path) -> tuple[Path, Path, os.stat_result]:
    """``outside`` holds a file a builder links in; ``victim`` a directory a process the builder
    left running may swap into the tree, holding a file of the same name and content (only its
    identity tells it from the one the walk read) in a hardlink group of its own. Returns them
    and the victim file's lstat."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared").write_bytes(b"shared\n")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "linked-in").write_bytes(b"shared\n")
    os.link(victim / "linked-in", victim / "other-name")
    os.utime(victim / "linked-in", (1_700_000_000, 1_700_000_000))
    return outside, victim, os.lstat(victim / "linked-in")


def _before_finish(monkeypatch: pytest.MonkeyPatch, act: Callable[[Path], object]) -> None:
    """``act(tree)`` runs right after the stream read ``tree``, before its groups are settled."""
    real_finish = _layerwriter.TreeSettler.finish

    def finish(self: _layerwriter.TreeSettler, tree: Path) -> None:
        act(tree)
        real_finish(self, tree)

    monkeypatch.setattr(_layerwriter.TreeSettler, "finish", finish)


def _settle(how: str, store: Store, tree: Path) -> None:
    """Settle ``tree`` the way ``how`` names: by the stream that stores it (a staging tree of
    ``store``), or by :func:`changeset.settle_tree` on its own."""
    if how == "stream":
        store.write_layer([], parent=None, name=None, source="build", tree=tree)
    else:
        changeset.settle_tree(tree)


def _assert_untouched(after: os.stat_result, before: os.stat_result) -> None:
    """The victim file kept its inode, its links and its time: nothing settled it."""
    assert (after.st_ino, after.st_nlink, after.st_mtime_ns) == (
        before.st_ino,
        before.st_nlink,
        before.st_mtime_ns,
    )


def test_directory_swapped_for_a_symlink_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory of the tree swapped for a symlink after the stream read it (a process the
    builder left running) is refused: the hardlink group settled after the stream is not looked
    for where the symlink points, so the file there keeps its inode, links and time."""
    outside, victim, before = _outside_and_victim(tmp_path)

    def swap(tree: Path) -> None:
        os.rename(tree / "d", tree / "d.real")
        os.symlink(victim, tree / "d")

    _before_finish(monkeypatch, swap)
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "d").mkdir()
        os.link(outside / "shared", staged / "d/linked-in")
        with pytest.raises(errors.InvalidLayerError, match="'d' changed while the layer was read"):
            store.write_layer([], parent=None, name=None, source="build", tree=staged)
    after = os.lstat(victim / "linked-in")
    _assert_untouched(after, before)
    assert store.layers() == []


@pytest.mark.parametrize("how", ["stream", "settle_tree"])
def test_directory_swapped_for_another_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A directory of the tree swapped for another real directory after the walk read it (a
    process the builder left running moved one in) is refused: the hardlink group settled
    after the walk is looked for only in the directories the walk read, by identity, so the
    files of the one moved in keep their inodes, links and times."""
    outside, victim, before = _outside_and_victim(tmp_path)
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "d").mkdir()
        os.link(outside / "shared", staged / "d/linked-in")

        def swap() -> None:
            if not victim.exists():
                return  # swapped already
            os.rename(staged / "d", staged / "d.real")
            os.rename(victim, staged / "d")

        # Right after the walk, before the groups are settled.
        if how == "stream":
            _before_finish(monkeypatch, lambda _tree: swap())
        else:
            real_group = _layerwriter._settle_group

            def group(*args: Any) -> None:
                swap()
                real_group(*args)

            monkeypatch.setattr(_layerwriter, "_settle_group", group)

        with pytest.raises(errors.InvalidLayerError, match="'d' changed while the layer was read"):
            _settle(how, store, staged)
        after = os.lstat(staged / "d/linked-in")
    _assert_untouched(after, before)
    assert store.layers() == []


def test_settle_tree_names_a_directory_by_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """settle_tree knows each directory by the one it opened and read, not by the entry its
    parent listed: a directory swapped for another between the listing and the open, and
    swapped back before the hardlink groups are settled, is refused, not settled as read."""
    from pytest_layers import _dirfd

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared").write_bytes(b"shared\n")
    other = tmp_path / "other"
    other.mkdir()
    os.link(outside / "shared", other / "linked-in")  # a group the walk meets under d
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    os.link(outside / "shared", tree / "d/linked-in")

    def swap() -> None:  # d <-> other, through a third name
        os.rename(tree / "d", tmp_path / "parked")
        os.rename(other, tree / "d")
        os.rename(tmp_path / "parked", other)

    real_walk = _dirfd.walk

    def walk(root: Any, state: Any, visit: Any) -> None:
        def listed_then_swapped(rel: str, fd: int, st: Any) -> Any:
            subdirs = visit(rel, fd, st)
            if rel == "":
                swap()  # the root listed d; the walk opens the other one under its name
            return subdirs

        real_walk(root, state, listed_then_swapped)

    real_group = _layerwriter._settle_group

    def group(*args: Any) -> None:
        swap()  # back: d is the directory the root listed again
        real_group(*args)

    monkeypatch.setattr(_dirfd, "walk", walk)
    monkeypatch.setattr(_layerwriter, "_settle_group", group)
    with pytest.raises(errors.InvalidLayerError, match="'d' changed while the layer was read"):
        changeset.settle_tree(tree)


@pytest.mark.parametrize("into", ["symlink", "directory"])
@pytest.mark.parametrize("how", ["stream", "settle_tree"])
def test_tree_root_swapped_after_the_walk_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, into: str
) -> None:
    """The tree's root itself swapped after the walk read it (a process the builder left
    running renamed it and put a symlink, or another directory, in its place) is refused: a
    hardlink group at the root is settled only in the root the walk read, so the files of the
    directory put there keep their inodes, links and times."""
    outside, victim, before = _outside_and_victim(tmp_path)
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        os.link(outside / "shared", staged / "linked-in")
        tree = staged if how == "stream" else tmp_path / "tree"
        if how == "settle_tree":
            tree.mkdir()
            os.link(outside / "shared", tree / "linked-in")

        def swap() -> None:
            if tree.is_symlink() or not victim.exists():
                return  # swapped already
            os.rename(tree, tree.with_name(tree.name + ".real"))
            if into == "symlink":
                os.symlink(victim, tree)
            else:
                os.rename(victim, tree)

        if how == "stream":
            _before_finish(monkeypatch, lambda _tree: swap())
        else:
            from pytest_layers import _dirfd

            real_walk = _dirfd.walk

            def walk(*args: Any) -> None:
                real_walk(*args)
                swap()  # after the walk, before the root is opened again for the groups

            monkeypatch.setattr(_dirfd, "walk", walk)

        with pytest.raises(errors.InvalidLayerError, match="the tree's root changed while"):
            _settle(how, store, tree)
        after = os.lstat(tree / "linked-in")
        if tree.is_symlink():
            os.unlink(tree)  # so that staging's cleanup removes nothing through it
    _assert_untouched(after, before)
    assert store.layers() == []


@pytest.mark.parametrize("planted", ["symlink", "hardlink"])
@pytest.mark.parametrize("how", ["stream", "settle_tree"])
def test_special_twin_swapped_as_it_is_made_changes_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, planted: str
) -> None:
    """A fifo with two links gets a private twin under a temporary name; a process the builder
    left running that puts a symlink to a file outside, or a link to a fifo outside, under
    that name right after it is made must not get that file's mode, owner or xattrs changed:
    the build is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    if planted == "symlink":
        victim.write_text("secret\n")
    else:
        os.mkfifo(victim)
    os.chmod(victim, 0o600)
    real_mknod = os.mknod

    def mknod_then_swap(path: Any, mode: int = 0o600, device: int = 0, **kw: Any) -> None:
        real_mknod(path, mode, device, **kw)
        if str(path).startswith(".settle-"):
            where = kw["dir_fd"]
            os.rename(path, f"{path}.moved", src_dir_fd=where, dst_dir_fd=where)
            if planted == "symlink":
                os.symlink(victim, path, dir_fd=where)
            else:
                os.link(victim, path, dst_dir_fd=where)

    monkeypatch.setattr(os, "mknod", mknod_then_swap)
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        os.mkfifo(staged / "p")
        os.chmod(staged / "p", 0o777)
        os.link(staged / "p", staged / "p2")  # two links: settling makes each its own twin
        refused: errors.InvalidLayerError | None = None
        try:
            _settle(how, store, staged)
        except errors.InvalidLayerError as exc:
            refused = exc
    assert stat.S_IMODE(os.lstat(victim).st_mode) == 0o600  # first: nothing outside changed
    assert refused is not None
    assert re.match(r"'p2?' changed while the layer was read", str(refused)), refused
    assert store.layers() == []


@pytest.mark.parametrize("how", ["stream", "settle_tree"])
def test_group_member_swapped_for_a_link_outside_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A hardlink group wholly inside the tree, one of whose names a process the builder left
    running points at a file outside after the walk: settling the group must not drop that
    file's xattrs or clamp its time, nor store its content under the walk's digest."""
    from pytest_layers import _dirfd

    victim = tmp_path / "victim"
    victim.write_text("outside content\n")
    os.setxattr(victim, "user.overlay.origin", b"outside metadata")
    os.utime(victim, ns=(4_000_000_000 * 10**9, 4_000_000_000 * 10**9))
    before = (os.listxattr(victim), os.stat(victim).st_mtime_ns)
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "a").write_text("inside\n")
        os.link(staged / "a", staged / "b")  # a group wholly inside the tree

        def swap(_tree: Path) -> None:
            os.unlink(staged / "a")
            os.link(victim, staged / "a")

        if how == "stream":
            _before_finish(monkeypatch, swap)
        else:
            real_walk = _dirfd.walk

            def walk(*args: Any) -> None:
                real_walk(*args)
                swap(staged)

            monkeypatch.setattr(_dirfd, "walk", walk)
        with pytest.raises(errors.InvalidLayerError, match="'a' changed while the layer was read"):
            _settle(how, store, staged)
    assert (os.listxattr(victim), os.stat(victim).st_mtime_ns) == before
    assert store.layers() == []


@pytest.mark.parametrize("into", ["symlink", "directory"])
@pytest.mark.parametrize("how", ["in place", "staged copy"])
def test_tree_swapped_after_the_stream_is_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, into: str
) -> None:
    """The layer's tree swapped for a symlink to a host directory, or for another directory,
    after the stream named it and before it is stored (a process the builder left running;
    in a shared store, another member): the layer is refused, not stored as what it now is."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "id_rsa").write_text("host secret\n")
    real_assemble = _storewrite._StoreWriter._assemble

    def swap_then_assemble(self: Any, container: Path, *args: Any, **kw: Any) -> Any:
        tree = container / "diff"
        os.rename(tree, container / "diff.real")
        if into == "symlink":
            os.symlink(host, tree)
        else:
            tree.mkdir()
            (tree / "id_rsa").write_text("planted\n")
        return real_assemble(self, container, *args, **kw)

    monkeypatch.setattr(_storewrite._StoreWriter, "_assemble", swap_then_assemble)
    store = Store(tmp_path / "s")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("what the digest covers\n")

    def store_it() -> None:
        if how == "in place":
            with store.staging() as staged:
                (staged / "f").write_text("what the digest covers\n")
                store.write_layer([], parent=None, name=None, source="build", tree=staged)
        else:  # a change list written into staging, as a commit is
            entries = changeset.changes_from_tree(src, changeset.ImageView([], store.flavor))
            store.write_layer(entries, parent=None, name=None, source="commit")

    with pytest.raises(errors.InvalidLayerError, match="changed while the layer was read"):
        store_it()
    assert store.layers() == []
    assert not list((tmp_path / "s" / "layers").glob("*/diff"))
    assert (host / "id_rsa").read_text() == "host secret\n"


def test_a_written_fifo_swapped_as_it_is_made_changes_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change list written into staging (a commit's layer): a fifo whose name is pointed at
    a file outside right after it is made (in a shared store, another member can write in the
    staging area) must not get that file's mode changed; the layer is refused."""
    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    os.chmod(victim, 0o600)
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "p")
    os.chmod(src / "p", 0o777)
    real_mkfifo = os.mkfifo

    def mkfifo_then_swap(path: Any, mode: int = 0o666, **kw: Any) -> None:
        real_mkfifo(path, mode, **kw)
        if "dir_fd" in kw:  # the layer writer's, not this test's
            where = kw["dir_fd"]
            os.rename(path, f"{path}.moved", src_dir_fd=where, dst_dir_fd=where)
            os.symlink(victim, path, dir_fd=where)

    store = Store(tmp_path / "s")
    entries = changeset.changes_from_tree(src, changeset.ImageView([], store.flavor))
    monkeypatch.setattr(os, "mkfifo", mkfifo_then_swap)
    with pytest.raises(errors.InvalidLayerError, match="'p' changed while the layer was read"):
        store.write_layer(entries, parent=None, name=None, source="commit")
    assert stat.S_IMODE(os.lstat(victim).st_mode) == 0o600
    assert store.layers() == []


def test_a_stored_tree_turned_into_a_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    """A stored layer whose tree someone replaced by a symlink (in a shared store, another
    member can) is refused where a view, a diff or an export would take its tree; verify
    reports it too."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "id_rsa").write_text("host secret\n")
    store = Store(tmp_path / "s")
    with store.staging() as staged:
        (staged / "f").write_text("layer\n")
        info = store.write_layer([], parent=None, name=None, source="build", tree=staged)
    tree = store.layer_dir(info.chain_id)
    os.rename(tree, tree.with_name("diff.real"))
    tree.symlink_to(host)
    fresh = Store(tmp_path / "s")  # no cached record: the path a new session takes
    for st in (store, fresh):
        with pytest.raises(errors.StoreError, match="is a symlink, which the store never makes"):
            st.layer_dir(info.chain_id)
    assert fresh.verify() != []
