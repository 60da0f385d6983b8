"""Removing a tree that a test, an image or a killed session left: :func:`remove_tree`.

Every caller that throws a directory away (a view's scratch, a staged layer, a dead session's
scratch, the copy backend's copies) goes through here, so the rules hold everywhere: mounts
below the tree are detached first and never entered, nothing is followed through a symlink,
and trees deeper than ``PATH_MAX`` or the recursion limit go as well. No pytest here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from pytest_layers import _dirfd, _linux
from pytest_layers._mounts import detach_mounts_under

__all__ = ["remove_tree", "remove_tree_seen_unmounted"]


#: Directory fds :func:`remove_tree` keeps open along its path; deeper ancestors are reopened
#: through ``..`` and checked to be the same directory (module-level so tests can lower it).
_KEEP_OPEN = 16

#: Called with each directory's relative path as :func:`remove_tree` enters it. Tests set it
#: to move directories under the walk at a known moment; nothing in the package sets it.
_walk_hook: Callable[[str], None] | None = None


def _mount_of(fd: int) -> tuple[int, bool]:
    """The mount id of the directory open as ``fd``, and whether it is that mount's root
    (``..`` from a mount's root is the mount point's parent, on another mount)."""
    mnt = _linux.mount_id("", fd)
    return mnt, mnt != _linux.mount_id("..", fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, best effort.

    Every mount at or below ``path`` is detached first (a bind mount a test left in its rootfs
    would otherwise be emptied through it), and the walk never enters a directory on another
    mount (mount id, not ``st_dev``: a bind of the same filesystem shares the device).

    Copes with the mode-000 ``work/work`` dirs overlay leaves behind (they are opened up first)
    and with trees deeper than ``PATH_MAX`` or Python's recursion limit, which a test's rw layer
    may hold (``shutil.rmtree`` fails on both): the walk is iterative, every name relative to a
    directory fd, never following a symlink. Climbing back to a parent uses the parent's fd
    kept from the way down, or (for deep trees) ``..`` checked to be the same directory
    (device and inode) as on the way down: a directory moved out of the tree during the walk
    stops it instead of leading it into the directory it was moved to.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    if detach_mounts_under(path):
        try:  # a mount on path itself hid the directory now there
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return
    try:
        fd = _open_dir(os.fspath(path), None, (st.st_dev, st.st_ino))
    except OSError:
        return
    try:
        # Still a mount's root: one that could not be detached (another user's, a locked one
        # in a user namespace). Its content is not the tree's to remove.
        mnt, foreign = _mount_of(fd)
    except OSError:
        foreign = True
    if foreign:
        os.close(fd)
        return
    try:
        _remove_contents(_dirfd.DirStack(fd, keep=_KEEP_OPEN), mnt)
    except OSError:
        return  # best effort: a tree changed under the walk is left, never chased
    with contextlib.suppress(OSError):
        os.rmdir(path)


def remove_tree_seen_unmounted(path: Path) -> None:
    """:func:`remove_tree` without reading the mount table first, for a tree its caller expects
    no mount in (a fuse view's scratch whose mount it has just seen go: reading the mount table
    was a fifth of the pool's cleanup of a fuse view). The walk never enters another mount
    either way; a mount on ``path`` itself, or anything left (a mount inside after all), goes
    to :func:`remove_tree`, which detaches it and finishes."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            remove_tree(path)
            return
        fd = _open_dir(os.fspath(path), None, (st.st_dev, st.st_ino))
        try:
            mnt, on_path = _mount_of(fd)
        except OSError:
            os.close(fd)
            raise
        if on_path:  # a mount on the tree itself: detached, never emptied through
            os.close(fd)
            remove_tree(path)
            return
        _remove_contents(_dirfd.DirStack(fd, keep=_KEEP_OPEN), mnt)
        os.rmdir(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            remove_tree(path)
    except OSError:
        remove_tree(path)


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None, ident: tuple[int, int]) -> int:
    """Open the directory ``name`` that was lstat'ed as ``ident``; never through a symlink,
    and refuse (``ESTALE``) a different directory swapped in since the lstat."""
    try:
        fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    except PermissionError:
        # A mode-000 dir (overlay's work/work; a test's chmod): open it up. chmod on an O_PATH
        # fd's /proc link changes the inode the fd holds, never a symlink's target.
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            pst = os.fstat(path_fd)
            if not stat.S_ISDIR(pst.st_mode) or (pst.st_dev, pst.st_ino) != ident:
                raise OSError(errno.ESTALE, f"{name} changed under the walk") from None
            os.chmod(f"/proc/self/fd/{path_fd}", stat.S_IRWXU)
        finally:
            os.close(path_fd)
        fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != ident:
        os.close(fd)
        raise OSError(errno.ESTALE, f"{name} changed under the walk")
    return fd


def _remove_contents(dirs: _dirfd.DirStack, mnt: int) -> None:
    """Empty the directory at the bottom of ``dirs`` (which it closes), staying on mount
    ``mnt``."""
    with dirs:
        # Per level below the top: the directory's name in its parent and the names still to
        # remove in the parent. Sorted so that the walk's order is reproducible.
        stack: list[tuple[str, list[str]]] = []
        rel = ""
        pending = sorted(os.listdir(dirs.top), reverse=True)
        while True:
            if pending:
                name = pending.pop()
                try:
                    st = os.stat(name, dir_fd=dirs.top, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    _unlink_at(name, dirs.top)
                    continue
                try:
                    if _linux.mount_id(name, dirs.top) != mnt:
                        continue  # a mount nobody could detach: never enter it
                    child = _open_dir(name, dirs.top, (st.st_dev, st.st_ino))
                except OSError as exc:
                    if exc.errno == errno.ESTALE:
                        raise
                    continue
                try:
                    names = sorted(os.listdir(child), reverse=True)
                except OSError:
                    os.close(child)
                    continue
                dirs.push(child, (st.st_dev, st.st_ino))
                stack.append((name, pending))
                pending = names
                rel = f"{rel}/{name}" if rel else name
                if _walk_hook is not None:
                    _walk_hook(rel)
                continue
            if not stack:
                return
            name, pending = stack.pop()
            rel = rel.rpartition("/")[0]
            # The parent is the fd kept from the way down or ".." checked against it (ESTALE).
            os.close(dirs.pop())
            _unlink_at(name, dirs.top, directory=True)


def _unlink_at(name: str, dir_fd: int, *, directory: bool = False) -> None:
    remove = os.rmdir if directory else os.unlink
    try:
        remove(name, dir_fd=dir_fd)
    except PermissionError:
        # The parent lacks write permission for an ordinary user: open it up and retry.
        with contextlib.suppress(OSError):
            os.chmod(dir_fd, stat.S_IRWXU)
            remove(name, dir_fd=dir_fd)
    except OSError:
        pass
