"""What the change-list modules share: :class:`Change` (the public ``docker diff`` line),
:class:`Entry` (one entry of a layer being made), :class:`LayerStats`, relative-path
helpers, the kept xattrs of an entry (the layer's xattr policy is :mod:`._ocirules`'),
:func:`open_source` and :func:`ctime_mark`."""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_layers import _dirfd, _ocirules

_KINDS = ("A", "C", "D")
_CHUNK = 1 << 20
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never blocks on a FIFO
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # a tree's root (may be a symlink to it)


@functools.total_ordering
@dataclass(frozen=True, eq=True)
class Change:
    """One line of a ``docker diff``: ``kind`` is ``"A"``, ``"C"`` or ``"D"``.

    ``str(change)`` is ``"A /etc/app.conf"``. Changes sort by path (then kind), which is the
    order ``Rootfs.diff()`` and ``Layer.changes()`` return them in.
    """

    kind: str
    path: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Change kind must be one of A, C, D, not {self.kind!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"Change path must be absolute (start with '/'), not {self.path!r}")

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"

    def __repr__(self) -> str:
        return f"Change({self.kind!r}, {self.path!r})"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Change):
            return NotImplemented
        return (self.path, self.kind) < (other.path, other.kind)


class Entry:
    """One entry of a layer being made.

    ``kind`` is ``"A"`` (not in the image), ``"C"`` (in the image: changed, or an ancestor or
    hardlink partner of a change) or ``"D"`` (deleted; its children are implied). ``source`` is
    where the new entry is (in the upper dir or the new tree), ``None`` for ``"D"``.

    The change lists give entries a ``root`` (the upper dir or tree) instead of a ``source``:
    ``source`` is then ``root / path``, made only when asked for. Such a path can be longer
    than ``PATH_MAX`` (a test may nest 10,000 directories), and the kernel refuses those, so
    read an entry with :func:`open_source` (any depth) rather than passing ``source`` to ``os``
    calls; :func:`write_layer` walks the root with directory fds and never builds the path.
    """

    __slots__ = ("_read", "_source", "kind", "path", "root")
    path: str
    kind: str
    root: str | None
    _source: Path | None
    #: What the change list already read of a small regular file (see :class:`Read`), so that
    #: the layer writer does not open and read it again; not part of the entry's identity.
    _read: Read | None

    def __init__(
        self,
        path: str,
        kind: str,
        source: Path | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "root", None if root is None else os.fspath(root))
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_read", None)

    @property
    def source(self) -> Path | None:
        """Where the new entry is; ``None`` for ``"D"``."""
        if self._source is not None or self.root is None or self.kind == "D":
            return self._source
        return Path(self.root, self.path) if self.path else Path(self.root)

    def _key(self) -> tuple[str, str, str | None, Path | None]:
        return (self.path, self.kind, self.root, self._source)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Entry is immutable; cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Entry({self.path!r}, {self.kind!r}, {self.source!r})"

    def __reduce__(self) -> tuple[object, ...]:
        return (_make_entry, self._key())


def _make_entry(path: str, kind: str, root: str | None, source: Path | None) -> Entry:
    return Entry(path, kind, source, root=root)


@dataclass(frozen=True)
class Read:
    """A small dense regular file of a change list's tree, as its comparison with the image
    read it: its ``lstat`` (the one the change list decided on), its whole content and its
    kept xattrs. The layer writer copies from this instead of the file."""

    st: os.stat_result
    data: bytes
    xattrs: dict[str, bytes]


def _entry_with_read(path: str, kind: str, root: str, read: Read | None) -> Entry:
    entry = Entry(path, kind, root=root)
    object.__setattr__(entry, "_read", read)
    return entry


@dataclass(frozen=True)
class LayerStats:
    """What :func:`write_layer` wrote: ``files`` counts every non-directory entry that is not a
    whiteout (regular files, hardlinks, symlinks, devices, fifos); ``size`` is the apparent size
    of the regular-file data, each hardlinked inode counted once."""

    files: int
    size: int


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _split(rel: str) -> tuple[str, str]:
    parent, _, name = rel.rpartition("/")
    return parent, name


def _sort_key(rel: str) -> str:
    # Component order puts every parent before its children ("a" < "a/b" < "a-b"): with "/"
    # as NUL, which no name holds, plain string order is component order. One flat string per
    # path, where a list of components would cost a pointer per level of a 10,000-deep path.
    return rel.replace("/", "\0")


def _xattrs(target: int | str) -> dict[str, bytes]:
    """The kept xattrs of an open fd (not ``O_PATH``) or of a path (not followed)."""
    try:
        names = (
            os.listxattr(target)
            if isinstance(target, int)
            else os.listxattr(target, follow_symlinks=False)
        )
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if _ocirules.layer_keeps_xattr(name):
            try:
                if isinstance(target, int):
                    out[name] = os.getxattr(target, name)
                else:
                    out[name] = os.getxattr(target, name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
    return out


def _has_xattrs(st: os.stat_result) -> bool:
    # user.* xattrs exist only on regular files and directories, as does security.capability.
    return stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)


def _xattrs_at(dir_fd: int, name: str, st: os.stat_result) -> dict[str, bytes]:
    """The kept xattrs of ``name`` in the directory open as ``dir_fd`` (any depth)."""
    return _xattrs(_dirfd.at(dir_fd, name)) if _has_xattrs(st) else {}


def kept_xattrs(path: str | os.PathLike[str], st: os.stat_result | None = None) -> dict[str, bytes]:
    """The xattrs a layer carries for ``path`` (``user.*`` and ``security.capability``, minus the
    overlay and fuse-overlayfs bookkeeping). Only regular files and directories can hold them.
    ``path`` may be longer than ``PATH_MAX``."""
    spath = os.fspath(path)
    if _dirfd.fits(spath):
        if st is None:
            st = os.lstat(spath)
        return _xattrs(spath) if _has_xattrs(st) else {}
    parent, name = os.path.split(spath)
    pfd = _dirfd.open_path(parent, _O_PATH_DIR)
    try:
        if st is None:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        return _xattrs_at(pfd, name, st)
    finally:
        os.close(pfd)


def _xattr_is_y(target: int, names: Sequence[str]) -> bool:
    """Whether the directory open as ``target`` carries any of the xattrs ``names`` as ``y``."""
    for name in names:
        try:
            if os.getxattr(target, name) == b"y":
                return True
        except OSError as exc:
            # trusted.* is unreadable without CAP_SYS_ADMIN and simply absent for us then.
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
    return False


def open_source(entry: Entry, flags: int = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC) -> int:
    """An fd of ``entry``'s new content, at any depth (the caller closes it).

    With the default ``flags`` it is an ``O_PATH`` fd of the entry itself (a symlink stays the
    symlink): ``os.fstat`` gives its metadata. Pass ``os.O_RDONLY | os.O_NOFOLLOW`` to read a
    regular file. Deletions have no source.
    """
    if entry.kind == "D":
        raise ValueError(f"{entry.path!r} is a deletion: a D entry has no source")
    if entry.root is not None and entry._source is None:
        root_fd = os.open(entry.root, _dirfd.O_DIR)
        try:
            return _dirfd.open_path(entry.path or ".", flags, dir_fd=root_fd)
        finally:
            os.close(root_fd)
    if entry._source is None:
        raise ValueError(f"entry {entry.path!r} has no source")
    return _dirfd.open_path(os.fspath(entry._source), flags)


def ctime_mark(directory: str | os.PathLike[str]) -> int:
    """A ``since_ns`` for :func:`changes_from_tree`, read from the filesystem's own clock.

    Uses a scratch file in ``directory`` (on the tree's filesystem but **outside** the tree),
    removed again. Taking ``time.time_ns()`` instead is wrong: the kernel stamps ctimes from a
    coarse clock that lags the fine one by up to a tick, so a change made just after
    ``time.time_ns()`` could carry an earlier ctime and be missed. The mark is the first ctime
    stamped after the one the scratch file got on creation, so everything written before the
    call is older than the mark and everything written after is not (at most one clock tick,
    a few milliseconds, of waiting).
    """
    path = os.path.join(os.fspath(directory), f".ctime-mark-{os.getpid()}-{id(directory)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        first = os.fstat(fd).st_ctime_ns
        deadline = time.monotonic() + 1.0
        while True:
            os.utime(fd)  # restamps ctime from the same clock as every other change
            mark = os.fstat(fd).st_ctime_ns
            if mark > first or time.monotonic() > deadline:
                return mark
            time.sleep(0.0005)
    finally:
        os.close(fd)
        os.unlink(path)
