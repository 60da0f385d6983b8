"""The copy backend's reusable copies: after each test's operations the copy is reset and handed
out again, and it must then equal a fresh copy of the image in every entry (type, mode, owner,
size, content hash, xattrs, link target, hard link grouping, mtime), or have been thrown away.

Each case runs with the scratch on the machine's ordinary filesystem and, as root with overlay,
on an overlayfs (a store inside a container's filesystem).
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require
from faults_util import overlayfs_mount
from treeutil import diff_snapshots, snapshot_tree

from pytest_layers.backends import _inotify, copyreuse
from pytest_layers.backends.base import MountPolicy
from pytest_layers.backends.copy import CopyBackend, CopyView
from pytest_layers.changeset import ImageView, to_changes

# As root, a copy is bind-mounted nosuid,nodev where mounting works, and a bound copy is not
# reused; "suid,dev" keeps the copy unbound, as in a container that refuses mounts.
POLICY = MountPolicy(suid=True, dev=True)


def _image(where: Path) -> list[Path]:
    """Two layers (marker flavor): a hard link pair across directories, a big directory,
    xattrs, a symlink, an executable, a whiteout."""
    low = where / "l0"
    top = where / "l1"
    for d in ("etc", "a", "b", "big/sub", "tree/deep/er"):
        (low / d).mkdir(parents=True)
    top.mkdir()
    (low / "etc/app.conf").write_text("debug=false\n")
    (low / "a/x").write_text("linked\n")
    os.link(low / "a/x", low / "b/y")
    for i in range(300):
        (low / "big" / f"f{i}").write_text(f"{i}\n")
    (low / "big/sub/inner").write_text("inner\n")
    (low / "tree/deep/er/leaf").write_text("leaf\n")
    (low / "data.bin").write_bytes(b"\0" * 8192)
    (low / "tool").write_text("#!/bin/sh\n")
    os.chmod(low / "tool", 0o755)
    os.symlink("etc/app.conf", low / "conf-link")
    os.setxattr(low / "etc/app.conf", "user.origin", b"image")
    os.setxattr(low / "a", "user.dir", b"d")
    (low / "gone").write_text("hidden by the top layer\n")
    (top / ".wh.gone").touch()
    (top / "etc").mkdir()
    (top / "etc/extra.conf").write_text("extra=1\n")
    return [top, low]


@pytest.fixture(params=["tmp", "overlayfs"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Where the image and the copies live: the ordinary temp filesystem, or an overlay mount
    (what a container's root filesystem is)."""
    if request.param == "tmp":
        yield tmp_path
        return
    require("root")
    require("overlay")
    with overlayfs_mount(tmp_path) as merged:
        yield merged


class Harness:
    def __init__(self, where: Path) -> None:
        self.where = where
        self.lowers = _image(where / "image")
        self.backend = CopyBackend(policy=POLICY)
        self.backend.keep_copies_in(where / "home")
        self.n = 0
        fresh = CopyBackend(policy=POLICY, reuse=False)
        view = fresh.open(self.lowers, self._scratch(), flavor="marker")
        try:
            self.pristine = snapshot_tree(view.path)
        finally:
            view.close()

    def _scratch(self) -> Path:
        self.n += 1
        scratch = self.where / f"scratch{self.n}"
        scratch.mkdir()
        return scratch

    def open(self) -> CopyView:
        return self.backend.open(self.lowers, self._scratch(), flavor="marker")

    def diff(self, view: CopyView) -> list[str]:
        entries = self.backend.changes(view, ImageView(self.lowers, "marker"))
        return [str(c) for c in to_changes(entries)]

    def check_pristine(self, view: CopyView) -> None:
        assert diff_snapshots(self.pristine, snapshot_tree(view.path)) == []
        assert self.diff(view) == []


@pytest.fixture
def harness(place: Path) -> Iterator[Harness]:
    h = Harness(place)
    yield h
    h.backend.close()


def _cycle(h: Harness, ops: Callable[[Path], None]) -> tuple[list[str], CopyView]:
    """A first test runs ``ops`` in a copy (already reused once, so its reset is the one under
    test), then the next test's copy is returned: the same copy, reset."""
    warm = h.open()
    warm.close()
    view = h.open()
    assert h.backend.reused == 1
    ops(view.path)
    changes = h.diff(view)
    view.close()
    return changes, h.open()


def write_through_hardlink(root: Path) -> None:
    (root / "a/x").write_text("written through one name\n")


def new_hardlink_written(root: Path) -> None:
    (root / "newdir").mkdir()
    os.link(root / "etc/app.conf", root / "newdir/alias")
    with open(root / "newdir/alias", "a") as f:
        f.write("through a new name\n")


def new_hardlink_written_and_removed(root: Path) -> None:
    # The only name the write went through is gone: no watched directory saw the write.
    os.link(root / "tool", root / "etc/alias")
    with open(root / "etc/alias", "a") as f:
        f.write("echo changed\n")
    os.unlink(root / "etc/alias")


def rename_big_dir(root: Path) -> None:
    os.rename(root / "big", root / "big-moved")
    (root / "big-moved/f7").write_text("changed after the move\n")
    os.rename(root / "tree/deep", root / "deep-out")


def swap_dirs(root: Path) -> None:
    os.rename(root / "a", root / "tmp")
    os.rename(root / "b", root / "a")
    os.rename(root / "tmp", root / "b")


def xattrs(root: Path) -> None:
    os.setxattr(root / "etc/app.conf", "user.origin", b"test")
    os.setxattr(root / "etc/extra.conf", "user.added", b"1")
    os.removexattr(root / "a", "user.dir")
    os.setxattr(root / "tree", "user.new", b"x")


def mode_and_owner(root: Path) -> None:
    os.chmod(root / "tool", 0o4700)
    os.chmod(root / "etc", 0o700)
    os.chmod(root / "big", 0)
    if os.geteuid() == 0:
        os.chown(root / "etc/app.conf", 1234, 5678)
        os.lchown(root / "conf-link", 1234, 5678)


def mmap_write(root: Path) -> None:
    with open(root / "data.bin", "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
    # The file's descriptor is closed; the mapping keeps writing to it.
    mapped[0:5] = b"mmap!"
    mapped.flush()
    mapped.close()


def dir_to_file(root: Path) -> None:
    shutil.rmtree(root / "tree")
    (root / "tree").write_text("now a file\n")


def file_to_dir_and_symlinks(root: Path) -> None:
    os.unlink(root / "tool")
    (root / "tool").mkdir()
    (root / "tool/inside").write_text("x\n")
    os.unlink(root / "conf-link")
    os.symlink("/elsewhere", root / "conf-link")
    (root / "gone").write_text("back\n")


def truncate_and_utime(root: Path) -> None:
    os.truncate(root / "big/f3", 0)
    os.utime(root / "big/f4", (1, 1))
    os.utime(root / "etc", (2, 2))


CASES = {
    "write_through_hardlink": write_through_hardlink,
    "new_hardlink_written": new_hardlink_written,
    "new_hardlink_written_and_removed": new_hardlink_written_and_removed,
    "rename_big_dir": rename_big_dir,
    "swap_dirs": swap_dirs,
    "xattrs": xattrs,
    "mode_and_owner": mode_and_owner,
    "mmap_write": mmap_write,
    "dir_to_file": dir_to_file,
    "file_to_dir_and_symlinks": file_to_dir_and_symlinks,
    "truncate_and_utime": truncate_and_utime,
}


@pytest.mark.parametrize("case", list(CASES))
def test_reset_copy_equals_fresh_copy(harness: Harness, case: str) -> None:
    changes, view = _cycle(harness, CASES[case])
    try:
        assert changes, "the operations changed nothing: the case tests nothing"
        assert harness.backend.reused == 2, "the reset copy was thrown away"
        harness.check_pristine(view)
    finally:
        view.close()


def test_store_files_untouched(harness: Harness) -> None:
    """A write through a hard link name never reaches the layer files."""
    before = snapshot_tree(harness.lowers[1])
    _changes, view = _cycle(harness, write_through_hardlink)
    view.close()
    assert diff_snapshots(before, snapshot_tree(harness.lowers[1])) == []


def test_diff_same_as_walk(harness: Harness) -> None:
    """The events narrow diff()'s walk, never its answer."""
    warm = harness.open()
    warm.close()
    view = harness.open()
    try:
        xattrs(view.path)
        truncate_and_utime(view.path)
        (view.path / "tree/deep/er/new").write_text("n\n")
        narrowed = harness.diff(view)
        copy = harness.backend._live[id(view)]
        assert copy.dirty_dirs() is not None
        harness.backend._live.pop(id(view))
        full = harness.diff(view)
        harness.backend._live[id(view)] = copy
        assert narrowed == full
        assert "A /tree/deep/er/new" in narrowed
    finally:
        view.close()


def test_open_file_at_the_end_throws_the_copy_away(harness: Harness) -> None:
    """A process still writing when the test ends (here: holding the file open, its writes
    still to come): the copy cannot be reset with certainty."""
    warm = harness.open()
    warm.close()
    view = harness.open()
    target = view.path / "etc/app.conf"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "f = open(sys.argv[1], 'a')\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "while True:\n"
            "    f.write('x'); f.flush(); time.sleep(0.001)\n",
            os.fspath(target),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
        view.close()
        assert harness.backend.discarded == 1
        assert harness.backend.reused == 1
        nxt = harness.open()
        try:
            # Only now does the writer write (nothing it did before the end showed a change):
            # into the thrown-away copy only.
            assert writer.stdin is not None
            writer.stdin.write(b"go\n")
            writer.stdin.flush()
            time.sleep(0.05)
            assert harness.backend.reused == 1, "a dirty copy was handed out"
            harness.check_pristine(nxt)
        finally:
            nxt.close()
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        assert writer.stdin is not None
        writer.stdout.close()
        writer.stdin.close()


def test_a_process_working_in_the_copy_throws_it_away(harness: Harness) -> None:
    """A process the test left running with its working directory in the copy, between two
    writes (no file open at the end): its next relative write must not reach the next test."""
    warm = harness.open()
    warm.close()
    view = harness.open()
    worker = subprocess.Popen(
        ["sh", "-c", "read line; echo late > late.txt"],
        cwd=view.path / "etc",
        stdin=subprocess.PIPE,
    )
    try:
        view.close()
        assert harness.backend.discarded == 1, "a copy a process works in was kept"
        nxt = harness.open()
        try:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
            worker.wait(timeout=10)
            assert not (nxt.path / "etc/late.txt").exists()
            harness.check_pristine(nxt)
        finally:
            nxt.close()
    finally:
        worker.kill()
        worker.wait()
        assert worker.stdin is not None
        worker.stdin.close()


def test_queue_overflow_falls_back_to_the_walk(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())

    def flood(root: Path) -> None:
        for i in range(limit + 10):
            os.utime(root / "big" / f"f{i % 300}", (i, i))
        (root / "big/sub/inner").write_text("changed\n")

    seen = []
    walk = copyreuse.walk_changes

    def spy(copy: copyreuse.ReusableCopy) -> set[str] | None:
        seen.append(copy.trusted)
        return walk(copy)

    monkeypatch.setattr(copyreuse, "walk_changes", spy)
    _changes, view = _cycle(harness, flood)
    try:
        assert seen == [False], "the overflow did not send the reset to the walk"
        assert harness.backend.reused == 2
        harness.check_pristine(view)
    finally:
        view.close()


def test_watch_limit_falls_back_to_the_walk(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: _inotify.Inotify, path: str, mask: int) -> int:
        raise OSError(errno.ENOSPC, "inotify_add_watch: No space left on device")

    monkeypatch.setattr(_inotify.Inotify, "add", refuse)
    _changes, view = _cycle(harness, rename_big_dir)
    try:
        copy = harness.backend._live[id(view)]
        assert not copy.trusted
        assert not copy.wds
        assert harness.backend.reused == 2
        harness.check_pristine(view)
    finally:
        view.close()


def test_without_a_home_every_view_is_a_new_copy(tmp_path: Path) -> None:
    lowers = _image(tmp_path / "image")
    backend = CopyBackend(policy=POLICY)
    for n in range(2):
        scratch = tmp_path / f"s{n}"
        scratch.mkdir()
        backend.open(lowers, scratch, flavor="marker").close()
        assert not scratch.exists()
    assert backend.reused == 0


def test_layers_changed_under_a_path_are_a_new_image(tmp_path: Path) -> None:
    """A layer dir replaced at the same path (a pruned and rebuilt store) never gets an old
    copy."""
    h = Harness(tmp_path)
    h.open().close()
    shutil.rmtree(h.lowers[0])
    h.lowers[0].mkdir()
    (h.lowers[0] / "only-new").write_text("n\n")
    view = h.open()
    try:
        assert h.backend.reused == 0
        assert (view.path / "only-new").exists()
        assert (view.path / "gone").exists()
    finally:
        view.close()


def test_view_pool_helper_resets_copies_in_place(tmp_path: Path) -> None:
    """In the view pool the helper process resets the copy (``reset_view``) after the test
    and hands the same copy out again, pristine."""
    import dataclasses
    import itertools

    from pytest_layers.backends.pool import Maker, ViewPool

    h = Harness(tmp_path)
    counter = itertools.count()

    def make() -> CopyView:
        scratch = tmp_path / f"pool{next(counter)}"
        scratch.mkdir()
        return h.backend.open(h.lowers, scratch, flavor="marker")

    pool: ViewPool[CopyView] = ViewPool(depth=1)
    pool.register(
        "image",
        Maker(
            make,
            lambda view: view.close(),
            lambda view: dataclasses.replace(view, _closer=None),
            reset=h.backend.reset_view,
        ),
    )
    try:
        first = pool.take("image")
        assert first is not None
        for ops in (write_through_hardlink, rename_big_dir, dir_to_file, xattrs):
            ops(first.path)
            assert pool.retire(first)
            again = pool.take("image")
            assert again is not None
            assert again.path == first.path, "the helper made a new copy instead of a reset"
            assert diff_snapshots(h.pristine, snapshot_tree(again.path)) == []
            first = again
        pool.retire(first)
    finally:
        pool.close()


def test_diff_sees_a_write_through_a_new_hardlink(harness: Harness) -> None:
    """The events name only the new link's directory; the image file it shares an inode with
    changed too and must be in diff(), as a walk finds it."""
    warm = harness.open()
    warm.close()
    view = harness.open()
    try:
        new_hardlink_written(view.path)
        narrowed = harness.diff(view)
        copy = harness.backend._live.pop(id(view))
        full = harness.diff(view)
        harness.backend._live[id(view)] = copy
        assert narrowed == full
        assert "C /etc/app.conf" in narrowed
    finally:
        view.close()


def test_copy_written_while_it_waits_is_reset_again(harness: Harness) -> None:
    """A process of an earlier test (its working directory in the copy) writes into the kept
    copy between two tests: the next open sees the events and resets it once more."""
    view = harness.open()
    view.close()
    kept = harness.backend._spares[next(iter(harness.backend._spares))][0]
    (Path(kept.path) / "etc/app.conf").write_text("late write\n")
    os.unlink(Path(kept.path) / "big/f1")
    nxt = harness.open()
    try:
        assert harness.backend.reused == 1
        harness.check_pristine(nxt)
    finally:
        nxt.close()
