"""Directory file descriptors, for trees deeper than ``PATH_MAX``.

The kernel refuses a path string longer than ``PATH_MAX`` (4096 bytes) with ``ENAMETOOLONG``,
and a test's rw layer can nest deeper than that (10,000 levels of ``d/`` is 20 KB of path). So
the tree walkers (``layertar``, ``changeset``) open every directory relative to its parent's fd,
one component per lookup, and name entries relative to that fd. :class:`DirStack` holds the fds
of the directories along the walk's current path and keeps only the deepest few open (an
ordinary user's ``RLIMIT_NOFILE`` is 1024). :func:`open_path` opens a path of any length, and
:func:`at` gives a path for the ``os`` calls that have no ``dir_fd`` form (the xattr calls).
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable
from typing import TypeVar

__all__ = ["O_DIR", "KEEP_OPEN", "DirStack", "Ident", "Visit", "walk", "open_path", "at", "fits"]

#: Opening a directory of a walk: never through a symlink, never inherited by a child process.
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _keep_open() -> int:
    # Several walks run side by side (a change list walks the upper dir and the image, a
    # layer writer its output and its source), each with a DirStack: a sixteenth of the fd
    # limit each, 64 at most, keeps `ulimit -n 64` working (4 each, re-opened through "..").
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 64
    return max(4, min(64, soft // 16))


#: Directory fds a :class:`DirStack` keeps open at most (the deepest levels of its path).
KEEP_OPEN = _keep_open()
#: Path strings at most this long are handed to the kernel as they are; longer ones are opened
#: a component at a time. (PATH_MAX counts the terminating NUL, so 4095 bytes would fit.)
_FITS = 4000

Ident = tuple[int, int]  # (st_dev, st_ino) of a directory

_T = TypeVar("_T")
#: What a :func:`walk` does in one directory: given its rel path, its fd (valid during the
#: call) and the state its parent passed down, the subdirectories to enter, each as (name, its
#: (st_dev, st_ino) from the listing, state for it).
Visit = Callable[[str, int, _T], list[tuple[str, Ident, _T]]]
#: A tree's root (may be a symlink to it).
_O_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def fits(path: str | bytes) -> bool:
    """Whether the kernel accepts ``path`` as one string (shorter than ``PATH_MAX``)."""
    return len(path if isinstance(path, bytes) else os.fsencode(path)) <= _FITS


def _ident(fd: int) -> Ident:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class DirStack:
    """The fds of the directories along a depth-first walk's current path, root first.

    ``push`` an fd (owned by the stack from then on) when the walk enters a directory, ``pop``
    when it leaves it. Only the deepest :data:`KEEP_OPEN` are open; an ancestor whose fd was
    closed is reopened through ``..`` of its child when the walk climbs back to it, and must be
    the same directory (device and inode) it was on the way down, so a tree moved under the
    walk raises ``OSError(ESTALE)`` instead of being read somewhere else. ``..`` costs one
    lookup per level, where reopening by a path from the root would cost the whole depth.
    """

    def __init__(self, root_fd: int, ident: Ident | None = None, *, keep: int = KEEP_OPEN) -> None:
        self._fds: list[int] = [root_fd]
        self._ids: list[Ident] = [ident if ident is not None else _ident(root_fd)]
        self._keep = max(2, keep)

    def __len__(self) -> int:
        return len(self._fds)

    def __enter__(self) -> DirStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def top(self) -> int:
        """The fd of the current (deepest) directory; always open."""
        return self._fds[-1]

    def push(self, fd: int, ident: Ident | None = None) -> None:
        """Enter the directory open as ``fd`` (a child of :attr:`top`); the stack owns it.

        ``ident`` is the directory's ``(st_dev, st_ino)`` when the caller has it from a stat,
        saving an ``fstat``.
        """
        self._fds.append(fd)
        self._ids.append(ident if ident is not None else _ident(fd))
        old = len(self._fds) - self._keep - 1
        if old >= 0 and self._fds[old] >= 0:
            os.close(self._fds[old])
            self._fds[old] = -1

    def pop(self) -> int:
        """Leave the current directory: returns its fd (still open, now the caller's to close),
        after making sure its parent, the new :attr:`top`, is open again.

        The parent is reopened before the caller gets the child, so a caller may then take the
        search permission away from the child (``chmod 0``) and still climb."""
        if len(self._fds) < 2:
            raise IndexError("DirStack.pop: the root is not popped; close() the stack instead")
        fd = self._fds.pop()
        self._ids.pop()
        if self._fds[-1] < 0:
            try:
                parent = os.open("..", O_DIR, dir_fd=fd)
            except BaseException:
                os.close(fd)
                raise
            if _ident(parent) != self._ids[-1]:
                os.close(parent)
                os.close(fd)
                raise OSError(
                    errno.ESTALE,
                    "a directory was moved while the tree was being read; read it again when "
                    "nothing is writing to it",
                )
            self._fds[-1] = parent
        return fd

    def close(self) -> None:
        """Close every fd still open, the root's included."""
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds = [-1]


def walk(root: str | os.PathLike[str], state: _T, visit: Visit[_T]) -> None:
    """Depth-first over the directories of ``root`` (any depth), in the order ``visit`` lists
    them; ``state`` goes to the root's visit.

    Every directory is opened relative to its parent's fd (``O_NOFOLLOW``: a symlink planted in
    the tree is never entered); a :class:`DirStack` keeps only the deepest few open. Iterative,
    so a tree deeper than Python's recursion limit is fine.
    """
    with DirStack(os.open(root, _O_ROOT)) as dirs:
        stack = [("", iter(visit("", dirs.top, state)))]
        while stack:
            rel_dir, todo = stack[-1]
            nxt = next(todo, None)
            if nxt is None:
                stack.pop()
                if stack:
                    os.close(dirs.pop())
                continue
            name, ident, sub_state = nxt
            dirs.push(os.open(name, O_DIR, dir_fd=dirs.top), ident)
            rel = f"{rel_dir}/{name}" if rel_dir else name
            stack.append((rel, iter(visit(rel, dirs.top, sub_state))))


def open_path(
    path: str | bytes, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
) -> int:
    """``os.open`` for a path of any length.

    A path that fits is opened as it is (one lookup, as ``os.open`` would). A longer one is
    opened one component at a time: every directory on the way with ``O_NOFOLLOW``, so no
    symlink inside the path is followed, the last component with ``flags``. That costs a lookup
    per level, so walkers keep directory fds instead and use this only for one-off access.
    """
    if fits(path):
        return os.open(path, flags, mode, dir_fd=dir_fd)
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if not parts:
        return os.open(raw, flags, mode, dir_fd=dir_fd)
    start, start_fd = (b"/", None) if raw.startswith(b"/") else (b".", dir_fd)
    cur = os.open(start, O_DIR, dir_fd=start_fd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, O_DIR, dir_fd=cur)
            os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags, mode, dir_fd=cur)
    finally:
        os.close(cur)


def at(dir_fd: int, name: str) -> str:
    """A path naming ``name`` in the directory open as ``dir_fd``, for the ``os`` calls without
    a ``dir_fd`` argument (``listxattr``, ``getxattr``): ``/proc/self/fd/N/name``.

    The kernel resolves the magic link to the fd's own directory; ``name`` is then looked up
    there like any component, so with ``follow_symlinks=False`` nothing is followed.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"
