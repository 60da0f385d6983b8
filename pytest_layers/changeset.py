"""Changes between an image and a new tree, and writing them as a layer directory.

An image is a chain of stored layer directories; :class:`ImageView` reads their union the way
overlayfs would, without mounting anything. A test's writes reach us in one of two shapes: the
upper directory of an overlay or fuse-overlayfs mount (:func:`changes_from_upper`), or a full
copy of the image that the test modified (:func:`changes_from_tree`, the copy backend). Both give
the same minimal list of :class:`Entry` for the same operations, and :func:`write_layer` turns
that list into a self-contained layer directory (no opaque markers, docs/concepts), so the layer's
canonical tar depends only on the parent tree and the new tree, never on the backend.

Paths are relative POSIX strings without a leading slash (``"etc/app.conf"``); non-UTF-8 names
travel as ``surrogateescape`` strings, which every ``os`` call here accepts as they are.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_layers import _datacopy, _dirfd, _ocirules, layertar
from pytest_layers._datacopy import data_extents
from pytest_layers.errors import InvalidLayerError

__all__ = [
    "Change",
    "Entry",
    "ImageView",
    "LayerStats",
    "changes_from_upper",
    "changes_from_tree",
    "write_layer",
    "settle_tree",
    "to_changes",
    "layer_changes",
    "kept_xattrs",
    "ctime_mark",
    "open_source",
    "data_extents",
]

_KINDS = ("A", "C", "D")
_CHUNK = 1 << 20
_SCAN_AFTER = 8  # lookups in one layer directory before it is listed and cached whole
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never blocks on a FIFO
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_IMAGE_DIRS = 64  # directory fds an ImageView keeps open at most
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

    __slots__ = ("_source", "kind", "path", "root")
    path: str
    kind: str
    root: str | None
    _source: Path | None

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
class LayerStats:
    """What :func:`write_layer` wrote: ``files`` counts every non-directory entry that is not a
    whiteout (regular files, hardlinks, symlinks, devices, fifos); ``size`` is the apparent size
    of the regular-file data, each hardlinked inode counted once."""

    files: int
    size: int


# --------------------------------------------------------------------------------------------
# small helpers


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


def _ranges_equal(fa: int, fb: int, start: int, end: int) -> bool:
    pos = start
    while pos < end:
        n = min(_CHUNK, end - pos)
        a = os.pread(fa, n, pos)
        b = os.pread(fb, n, pos)
        if a != b:
            return False
        if not a:  # both shrank under us: nothing more to compare
            return True
        pos += len(a)
    return True


def _same_content(
    fa: int,
    fb: int,
    size: int,
    sta: os.stat_result | None = None,
    stb: os.stat_result | None = None,
) -> bool:
    """Whether two open regular files hold the same first ``size`` bytes (``sta``/``stb``:
    their ``lstat``, which lets two small dense files skip the hole maps)."""
    if _datacopy.dense(sta, size) and _datacopy.dense(stb, size):
        return _ranges_equal(fa, fb, 0, size)
    ea, eb = data_extents(fa, size), data_extents(fb, size)
    if ea is not None and ea == eb:
        # Identical hole maps: holes read as zeros on both sides, so only data counts. This
        # keeps a multi-GiB sparse file cheap to compare.
        return all(_ranges_equal(fa, fb, s, e) for s, e in ea)
    return _ranges_equal(fa, fb, 0, size)


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


# --------------------------------------------------------------------------------------------
# the image


class ImageView:
    """Read-only merged view of a chain of layer directories (top first), without a mount.

    Deletions are honoured in the given ``flavor`` (``"overlay"``: character device 0/0;
    ``"marker"``: ``.wh.NAME``), as are opaque directories, although stored layers never hold
    those. Every answer is cached, and a layer directory that sees more than a few lookups is
    listed once, so repeated lookups cost dictionary hits while a handful of lookups never read
    a big directory; the layers must not change while a view is in use (they never do).

    Layer directories are read through directory fds, each opened relative to its parent's,
    so paths deeper than ``PATH_MAX`` work; the view keeps the most recently used few open.
    The change-list functions close them when done; whoever uses a view directly may call
    :meth:`close` (or use it as a context manager), else they are closed with the view.
    """

    def __init__(self, layers_top_first: Sequence[Path], flavor: layertar.Flavor) -> None:
        _ocirules.check_flavor(flavor)
        self.layers: tuple[Path, ...] = tuple(Path(p) for p in layers_top_first)
        self.flavor: layertar.Flavor = flavor
        # A directory of layer i at rel is keyed (i, rel): without redirects, the merged
        # directory rel is made of the rel of some of the layers, nothing else.
        self._fds: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._listings: dict[tuple[int, str], dict[str, bool]] = {}  # name -> 0/0 whiteout
        self._probes: dict[tuple[int, str], int] = {}
        self._stacks: dict[str, tuple[int, ...] | None] = {}
        self._found: dict[str, tuple[int, os.stat_result] | None] = {}
        self._merged: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"ImageView({[os.fspath(p) for p in self.layers]!r}, flavor={self.flavor!r})"

    def __enter__(self) -> ImageView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Close the directory fds the view holds; the view stays usable (it reopens them)."""
        fds = getattr(self, "_fds", None)
        while fds:
            os.close(fds.popitem()[1])

    # -- directories of the layers

    def _dir_fd(self, i: int, rel: str) -> int:
        """An fd of layer ``i``'s directory ``rel``, opened from the nearest open ancestor.

        Valid until the next call (it may be closed to make room)."""
        fds = self._fds
        key = (i, rel)
        fd = fds.get(key)
        if fd is not None:
            fds.move_to_end(key)
            return fd
        missing: list[str] = []
        cur = rel
        while cur and (i, cur) not in fds:
            cur, name = _split(cur)
            missing.append(name)
        base = fds.get((i, cur))
        if base is None:
            base = self._keep((i, ""), os.open(self.layers[i], _dirfd.O_DIR))
        else:
            fds.move_to_end((i, cur))
        for name in reversed(missing):
            cur = _join(cur, name)
            base = self._keep((i, cur), os.open(name, _dirfd.O_DIR, dir_fd=base))
        return base

    def _keep(self, key: tuple[int, str], fd: int) -> int:
        self._fds[key] = fd
        if len(self._fds) > _OPEN_IMAGE_DIRS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _entries(self, i: int, rel: str) -> dict[str, bool]:
        key = (i, rel)
        ents = self._listings.get(key)
        if ents is None:
            ents = {}
            try:
                with os.scandir(self._dir_fd(i, rel)) as it:
                    for e in it:
                        # d_type answers file/dir/symlink without a stat; only the rest can
                        # be a 0/0 whiteout.
                        ents[e.name] = (
                            self.flavor == "overlay"
                            and not e.is_file(follow_symlinks=False)
                            and not e.is_dir(follow_symlinks=False)
                            and not e.is_symlink()
                            and _ocirules.is_whiteout_device(e.stat(follow_symlinks=False))
                        )
            except (FileNotFoundError, NotADirectoryError):
                ents = {}
            self._listings[key] = ents
        return ents

    def _get(self, i: int, rel_dir: str, name: str) -> os.stat_result | None:
        """lstat of ``name`` in layer ``i``'s directory ``rel_dir``, None when absent.

        A few lookups in a directory are single stat calls (a diff of ten files must not read
        ten 1000-entry directories); past ``_SCAN_AFTER`` the directory is listed once and
        names it lacks are dictionary misses.
        """
        key = (i, rel_dir)
        ents = self._listings.get(key)
        if ents is None:
            probes = self._probes.get(key, 0) + 1
            self._probes[key] = probes
            if probes > _SCAN_AFTER:
                ents = self._entries(i, rel_dir)
        if ents is not None and name not in ents:
            return None
        try:
            return os.stat(name, dir_fd=self._dir_fd(i, rel_dir), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _is_whiteout(self, st: os.stat_result) -> bool:
        return self.flavor == "overlay" and _ocirules.is_whiteout_device(st)

    def _marked(self, i: int, rel_dir: str, name: str) -> bool:
        return (
            self.flavor == "marker"
            and self._get(i, rel_dir, _ocirules.WHITEOUT_PREFIX + name) is not None
        )

    def _opaque(self, i: int, rel: str) -> bool:
        if self.flavor == "marker":
            return self._get(i, rel, _ocirules.OPAQUE_MARKER) is not None
        return _xattr_is_y(self._dir_fd(i, rel), _ocirules.OPAQUE_XATTRS["overlay"])

    def _stack(self, rel: str) -> tuple[int, ...] | None:
        """The layers, top first, whose directory ``rel`` makes up the merged directory
        ``rel``; None when ``rel`` is not a directory of the image."""
        stacks = self._stacks
        if rel in stacks:
            return stacks[rel]
        pending: list[str] = []
        cur = rel
        while cur and cur not in stacks:
            pending.append(cur)
            cur = _split(cur)[0]
        if cur not in stacks:  # the root
            out: list[int] = []
            for i in range(len(self.layers)):
                out.append(i)
                if self._opaque(i, ""):
                    break
            stacks[""] = tuple(out)
        result = stacks[cur]
        for sub in reversed(pending):  # iterative: a path may be 10,000 levels deep
            if result is not None:
                parent, name = _split(sub)
                found: list[int] = []
                for i in result:
                    got = self._get(i, parent, name)
                    marked = self._marked(i, parent, name)
                    if got is not None and not self._is_whiteout(got):
                        if not stat.S_ISDIR(got.st_mode):
                            break  # a non-directory hides everything below it
                        found.append(i)
                        if marked or self._opaque(i, sub):
                            break
                    elif got is not None or marked:
                        break
                result = tuple(found) if found else None
            stacks[sub] = result
        return result

    def _find(self, rel: str, parent: str | None = None) -> tuple[int, os.stat_result] | None:
        """(layer, lstat) of ``rel`` in the image. ``parent``, when given, is ``rel``'s parent
        (the walkers have it: this saves a copy of a deep path per entry)."""
        if rel in self._found:
            return self._found[rel]
        found: tuple[int, os.stat_result] | None = None
        if rel == "":
            if self.layers:
                found = (0, os.lstat(self.layers[0]))
        else:
            if parent is None:
                parent, name = _split(rel)
            else:
                name = rel[len(parent) + 1 :] if parent else rel
            if not (self.flavor == "marker" and name.startswith(_ocirules.WHITEOUT_PREFIX)):
                for i in self._stack(parent) or ():
                    got = self._get(i, parent, name)
                    if got is not None:
                        if not self._is_whiteout(got):
                            found = (i, got)
                        break
                    if self._marked(i, parent, name):
                        break
        self._found[rel] = found
        return found

    # -- reading an entry of the image (for comparisons)

    def _open(self, i: int, rel: str, flags: int) -> int:
        parent, name = _split(rel)
        return os.open(name, flags, dir_fd=self._dir_fd(i, parent))

    def _readlink(self, i: int, rel: str) -> str:
        parent, name = _split(rel)
        return os.readlink(name, dir_fd=self._dir_fd(i, parent))

    def _xattrs(self, i: int, rel: str, st: os.stat_result) -> dict[str, bytes]:
        if not _has_xattrs(st):
            return {}
        parent, name = _split(rel)
        return _xattrs(_dirfd.at(self._dir_fd(i, parent), name))

    # -- the contract

    def lookup(self, rel: str) -> Path | None:
        """Real path of ``rel`` in the topmost layer that has it, None when the image lacks it.

        Beyond ``PATH_MAX`` such a path cannot be passed to ``os`` calls (see :class:`Entry`).
        """
        found = self._find(rel)
        if found is None:
            return None
        return self.layers[found[0]] / rel if rel else self.layers[found[0]]

    def lstat(self, rel: str) -> os.stat_result | None:
        """``os.lstat`` of ``rel`` in the image, None when the image lacks it."""
        found = self._find(rel)
        return found[1] if found is not None else None

    def listdir(self, rel: str) -> list[str]:
        """Sorted child names of the merged directory ``rel`` (whiteouts applied); ``[]`` when
        ``rel`` is not a directory of the image."""
        cached = self._merged.get(rel)
        if cached is not None:
            return list(cached)
        seen: set[str] = set()
        out: list[str] = []
        for i in self._stack(rel) or ():
            hidden_here: list[str] = []
            for name, whiteout in self._entries(i, rel).items():
                if name in seen:
                    continue
                if self.flavor == "marker" and name.startswith(_ocirules.WHITEOUT_PREFIX):
                    if name != _ocirules.OPAQUE_MARKER:
                        # Applies to lower layers only: the layer's own NAME stays visible.
                        hidden_here.append(name[len(_ocirules.WHITEOUT_PREFIX) :])
                    continue
                seen.add(name)
                if not whiteout:
                    out.append(name)
            seen.update(hidden_here)
        out.sort()
        self._merged[rel] = out
        return list(out)


# --------------------------------------------------------------------------------------------
# the change list


class _Collector:
    """Builds the minimal entry list from candidates of a new tree (an upper dir or a copy)."""

    def __init__(self, root: str, image: ImageView) -> None:
        self.root = root
        self.image = image
        self.epoch_ns = layertar.clamp_epoch() * 1_000_000_000
        self.entries: dict[str, Entry] = {}
        self.inodes: dict[tuple[int, int], list[str]] = {}

    def consider(
        self,
        rel: str,
        dir_fd: int,
        name: str,
        st: os.stat_result,
        img: tuple[int, os.stat_result] | None,
    ) -> None:
        """A candidate of the new tree, ``name`` in the directory open as ``dir_fd``: included
        when it is new or differs from the image."""
        if img is None:
            self.entries[rel] = Entry(rel, "A", root=self.root)
        elif self.differs(dir_fd, name, st, rel, img):
            self.entries[rel] = Entry(rel, "C", root=self.root)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            self.inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)

    def delete(self, rel: str) -> None:
        self.entries[rel] = Entry(rel, "D", None)

    def differs(
        self,
        dir_fd: int,
        name: str,
        ns: os.stat_result,
        rel: str,
        img: tuple[int, os.stat_result],
    ) -> bool:
        layer, os_ = img
        if stat.S_IFMT(ns.st_mode) != stat.S_IFMT(os_.st_mode):
            return True
        if stat.S_IMODE(ns.st_mode) != stat.S_IMODE(os_.st_mode):
            return True
        if ns.st_uid != os_.st_uid or ns.st_gid != os_.st_gid:
            return True
        new_s, old_s = ns.st_mtime_ns // 1_000_000_000, os_.st_mtime_ns // 1_000_000_000
        # The layer will store min(mtime, epoch) (write_layer clamps), so a touch that clamps to
        # the image's mtime changes nothing; an untouched mtime above the epoch (imported
        # layers keep theirs) is no change either.
        if new_s != old_s and min(ns.st_mtime_ns, self.epoch_ns) // 1_000_000_000 != old_s:
            return True
        if stat.S_ISLNK(ns.st_mode):
            same = os.readlink(name, dir_fd=dir_fd) == self.image._readlink(layer, rel)
        elif stat.S_ISCHR(ns.st_mode) or stat.S_ISBLK(ns.st_mode):
            same = ns.st_rdev == os_.st_rdev
        elif stat.S_ISREG(ns.st_mode):
            return ns.st_size != os_.st_size or not self.same_file(
                dir_fd, name, layer, rel, ns, os_
            )
        else:
            same = True
        if not same:
            return True
        return _xattrs_at(dir_fd, name, ns) != self.image._xattrs(layer, rel, os_)

    def same_file(
        self,
        dir_fd: int,
        name: str,
        layer: int,
        rel: str,
        st: os.stat_result,
        img_st: os.stat_result,
    ) -> bool:
        """Same content and kept xattrs (read through the open fds: no more lookups)."""
        fa = os.open(name, _O_READ, dir_fd=dir_fd)
        try:
            fb = self.image._open(layer, rel, _O_READ)
            try:
                return _same_content(fa, fb, st.st_size, st, img_st) and _xattrs(fa) == _xattrs(fb)
            finally:
                os.close(fb)
        finally:
            os.close(fa)

    def finish(self) -> list[Entry]:
        # Hardlink partners travel together: the layer must hold the whole inode group, or
        # applying it would split a link the new tree has.
        for group in self.inodes.values():
            if len(group) > 1 and any(rel in self.entries for rel in group):
                for rel in group:
                    if rel not in self.entries:
                        self.entries[rel] = Entry(rel, "C", root=self.root)
        done: set[str] = set()
        for rel in list(self.entries):
            parent = _split(rel)[0]
            while parent and parent not in done:
                done.add(parent)
                if parent not in self.entries:
                    kind = "C" if self.image.lstat(parent) is not None else "A"
                    self.entries[parent] = Entry(parent, kind, root=self.root)
                parent = _split(parent)[0]
        return sorted(self.entries.values(), key=lambda e: _sort_key(e.path))


def _norm_exclude(exclude: Collection[str]) -> frozenset[str]:
    return frozenset(p.strip("/") for p in exclude if p.strip("/"))


def changes_from_upper(
    upper: Path,
    image: ImageView,
    *,
    upper_flavor: str = "overlay",
    exclude: Collection[str] = (),
) -> list[Entry]:
    """The minimal entry list of an overlay (``"overlay"``) or fuse-overlayfs (``"fuse"``) upper
    directory over ``image``.

    0/0 character devices (and, from fuse-overlayfs, ``.wh.NAME`` files) are deletions; an
    opaque directory becomes ``C dir``, one ``D`` per lower child it hides, and its own entries.
    Overlay's own xattrs (``user.overlay.*``, ``trusted.overlay.*``) are ignored. Entries
    identical to the image are dropped unless they are an ancestor or a hardlink partner of a
    change; ``exclude`` (the init layer's paths) and everything below never appear. Works at
    any depth (directory fds); the entries carry ``upper`` as their ``root``.
    """
    if upper_flavor not in _ocirules.OPAQUE_XATTRS:
        raise ValueError(f"unknown upper flavor {upper_flavor!r}; expected 'overlay' or 'fuse'")
    fuse = upper_flavor == "fuse"
    opaque_xattrs = _ocirules.OPAQUE_XATTRS[upper_flavor]
    skip = _norm_exclude(exclude)
    col = _Collector(os.fspath(upper), image)

    # state: whether an opaque ancestor already hides the lower directories.
    def visit(rel_dir: str, fd: int, parent_hidden: bool) -> list[tuple[str, _dirfd.Ident, bool]]:
        with os.scandir(fd) as it:
            ents = list(it)
        hidden = parent_hidden or _xattr_is_y(fd, opaque_xattrs)
        if fuse and any(e.name == _ocirules.OPAQUE_MARKER for e in ents):
            hidden = True
        present: set[str] = set()
        deleted: list[str] = []
        subdirs: list[tuple[str, _dirfd.Ident, bool]] = []
        for e in ents:
            name = e.name
            if fuse and name.startswith(_ocirules.WHITEOUT_PREFIX):
                if name != _ocirules.OPAQUE_MARKER:
                    deleted.append(name[len(_ocirules.WHITEOUT_PREFIX) :])
                continue
            rel = _join(rel_dir, name)
            if rel in skip:
                continue
            st = e.stat(follow_symlinks=False)
            if _ocirules.is_whiteout_device(st):
                deleted.append(name)
                continue
            present.add(name)
            col.consider(rel, fd, name, st, image._find(rel, rel_dir))
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((name, (st.st_dev, st.st_ino), hidden))
        gone = [n for n in deleted if n not in present]
        if hidden:
            gone.extend(n for n in image.listdir(rel_dir) if n not in present)
        for name in gone:
            rel = _join(rel_dir, name)
            if rel not in skip and image._find(rel, rel_dir) is not None:
                col.delete(rel)
        return subdirs

    try:
        _dirfd.walk(col.root, False, visit)
        return col.finish()
    finally:
        image.close()


def changes_from_tree(
    tree: Path,
    image: ImageView,
    *,
    since_ns: int | None = None,
    exclude: Collection[str] = (),
    only: Collection[str] | None = None,
) -> list[Entry]:
    """The minimal entry list of ``tree``, a full copy of ``image`` that a test modified.

    With ``since_ns`` (take it from :func:`ctime_mark` after the copy), only entries whose ctime
    is at least ``since_ns`` are compared with the image, and only directories whose ctime is
    are checked for deletions: unchanged entries are stat'ed, never read or looked up in the
    image. A directory renamed into place keeps its children's ctimes, so every entry below a
    path that is not a directory of the image is new, and a changed directory whose untouched
    children do not match the image's metadata is compared whole. (A directory renamed over
    one whose children match it in name, type, mode, owner, size and mtime second but not in
    content goes unnoticed; ``since_ns=None`` catches that too.) ``since_ns=None`` compares
    everything (exact, slow). Gives the same list as :func:`changes_from_upper` for the same
    operations. Works at any depth (directory fds); the entries carry ``tree`` as their
    ``root``.

    ``only`` (with ``since_ns``): the directories that can hold a change, with all their
    ancestors, as the copy backend's inotify watches report them; an image directory not in it
    is not entered (a directory that is new or compared whole still is).
    """
    skip = _norm_exclude(exclude)
    col = _Collector(os.fspath(tree), image)

    # Each directory is walked in one of three modes: "new" (not a directory of the image:
    # everything below is added), "exact" (compare every entry), "fast" (trust ctimes). The
    # state is (the directory's ctime, its mode).
    def visit(
        rel_dir: str, fd: int, state: tuple[int, str]
    ) -> list[tuple[str, _dirfd.Ident, tuple[int, str]]]:
        dir_ctime, mode = state
        ents: list[tuple[str, str, os.stat_result]] = []
        with os.scandir(fd) as it:
            for e in it:
                rel = _join(rel_dir, e.name)
                if rel not in skip:
                    ents.append((e.name, rel, e.stat(follow_symlinks=False)))
        changed_dir = mode == "exact" or (since_ns is not None and dir_ctime >= since_ns)
        if mode == "fast" and changed_dir:
            # A directory renamed into place keeps its children's old ctimes. Children that do
            # not even match the image's metadata give it away; then nothing below it can be
            # trusted and the whole subtree is compared.
            assert since_ns is not None
            for _name, rel, st in ents:
                if st.st_ctime_ns < since_ns and _moved(st, image._find(rel, rel_dir)):
                    mode = "exact"
                    break
        subdirs: list[tuple[str, _dirfd.Ident, tuple[int, str]]] = []
        for name, rel, st in ents:
            img: tuple[int, os.stat_result] | None
            known = True
            if mode == "new":
                img = None
                col.consider(rel, fd, name, st, None)
            elif mode == "exact" or (since_ns is not None and st.st_ctime_ns >= since_ns):
                img = image._find(rel, rel_dir)
                col.consider(rel, fd, name, st, img)
            else:
                img, known = None, False  # untouched since the copy: as in the image
            if stat.S_ISDIR(st.st_mode):
                child = mode
                if known and (img is None or not stat.S_ISDIR(img[1].st_mode)):
                    child = "new"
                if child == "fast" and only is not None and rel not in only:
                    continue
                subdirs.append((name, (st.st_dev, st.st_ino), (st.st_ctime_ns, child)))
        if mode != "new" and changed_dir:
            present = {name for name, _rel, _st in ents}
            for name in image.listdir(rel_dir):
                rel = _join(rel_dir, name)
                if name not in present and rel not in skip:
                    col.delete(rel)
        return subdirs

    try:
        root_ctime = os.lstat(col.root).st_ctime_ns
        _dirfd.walk(col.root, (root_ctime, "exact" if since_ns is None else "fast"), visit)
        return col.finish()
    finally:
        image.close()


def _moved(st: os.stat_result, img: tuple[int, os.stat_result] | None) -> bool:
    """Whether an entry whose ctime predates the copy cannot be the image's entry there."""
    if img is None:
        return True
    old = img[1]
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(old.st_mode):
        return True
    if (st.st_mode, st.st_uid, st.st_gid) != (old.st_mode, old.st_uid, old.st_gid):
        return True
    if st.st_mtime_ns // 1_000_000_000 != old.st_mtime_ns // 1_000_000_000:
        return True
    return stat.S_ISREG(st.st_mode) and st.st_size != old.st_size


def to_changes(entries: Sequence[Entry]) -> list[Change]:
    """The ``docker diff`` list of an entry list, sorted by path."""
    return sorted(Change(e.kind, "/" + e.path) for e in entries)


def layer_changes(layer_dir: Path, parent: ImageView, *, flavor: layertar.Flavor) -> list[Change]:
    """A stored layer's own changeset: a whiteout is ``D``, an entry the parent image lacks is
    ``A``, any other entry ``C``. Opaque directories (only in foreign layer dirs) give ``D`` for
    each parent child they hide. Works at any depth (directory fds)."""
    out: list[Change] = []

    def visit(rel_dir: str, fd: int, _state: None) -> list[tuple[str, _dirfd.Ident, None]]:
        with os.scandir(fd) as it:
            ents = list(it)
        names = {e.name for e in ents}
        present: set[str] = set()
        gone: set[str] = set()
        subdirs: list[tuple[str, _dirfd.Ident, None]] = []
        for e in ents:
            if flavor == "marker" and e.name.startswith(_ocirules.WHITEOUT_PREFIX):
                if e.name != _ocirules.OPAQUE_MARKER:
                    gone.add(e.name[len(_ocirules.WHITEOUT_PREFIX) :])
                continue
            rel = _join(rel_dir, e.name)
            st = e.stat(follow_symlinks=False)
            if flavor == "overlay" and _ocirules.is_whiteout_device(st):
                gone.add(e.name)
                continue
            present.add(e.name)
            known = parent._find(rel, rel_dir) is not None
            out.append(Change("C" if known else "A", "/" + rel))
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((e.name, (st.st_dev, st.st_ino), None))
        if rel_dir:
            opaque = (
                _ocirules.OPAQUE_MARKER in names
                if flavor == "marker"
                else _xattr_is_y(fd, _ocirules.OPAQUE_XATTRS["overlay"])
            )
            if opaque:
                gone.update(n for n in parent.listdir(rel_dir) if n not in present)
        out.extend(Change("D", "/" + _join(rel_dir, n)) for n in gone if n not in present)
        return subdirs

    try:
        _dirfd.walk(os.fspath(layer_dir), None, visit)
    finally:
        parent.close()
    return sorted(out)


# --------------------------------------------------------------------------------------------
# writing a layer


def _check_name(rel: str, st: os.stat_result) -> None:
    name = _split(rel)[1]
    if name.startswith(_ocirules.WHITEOUT_PREFIX):
        raise InvalidLayerError(
            f"{rel!r}: a file whose name starts with '.wh.' cannot be committed, because OCI "
            "layers use that prefix for deletions; rename or remove it before the layer is made"
        )
    if _ocirules.is_whiteout_device(st):
        raise InvalidLayerError(
            f"{rel!r}: a character device 0/0 cannot be committed, because overlayfs uses it "
            "to mark a deletion; remove it before the layer is made"
        )


def _chown(where: int, name: str | None, st: os.stat_result, rel: str) -> None:
    """Give the written entry (the fd ``where``, or ``name`` in the directory ``where``) the
    owner of ``st``."""
    cur = os.fstat(where) if name is None else os.stat(name, dir_fd=where, follow_symlinks=False)
    uid, gid = st.st_uid, st.st_gid
    if (cur.st_uid, cur.st_gid) == (uid, gid):
        return
    try:
        if name is None:
            os.chown(where, uid, gid)
        else:
            os.chown(name, uid, gid, dir_fd=where, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
        raise PermissionError(
            exc.errno,
            f"cannot give {rel!r} owner {uid}:{gid} in the layer ({os.strerror(exc.errno)}); "
            "only root can store files owned by other users: commit as root",
        ) from exc


def _set_xattrs(fd: int, xattrs: dict[str, bytes]) -> None:
    for name, value in sorted(xattrs.items()):
        os.setxattr(fd, name, value)


def _bad_rel(rel: str) -> bool:
    # Without splitting: a 10,000-deep path would be a 10,000-item list per entry.
    return (
        not rel
        or rel.startswith("/")
        or rel == ".."
        or rel.startswith("../")
        or rel.endswith("/..")
        or "/../" in rel
    )


_DirMeta = tuple[os.stat_result, dict[str, bytes]]


class _Cursor:
    """The current directory of a walk over sorted relative paths below a root.

    :meth:`goto` leaves the directories that do not contain the target (calling ``on_leave``
    with each one's fd, while it is still open and after its parent is reopened) and enters the
    missing ones by name, one lookup per level; the fds live in a :class:`_dirfd.DirStack`, so
    any depth works with a bounded number of open fds.
    """

    def __init__(
        self, root_fd: int, on_leave: Callable[[str, int, _DirMeta], None] | None = None
    ) -> None:
        self.dirs = _dirfd.DirStack(root_fd)
        self.rel = ""
        self._starts: list[int] = []  # per level below the root: where its own name starts
        self._meta: list[_DirMeta | None] = []
        self._on_leave = on_leave

    def goto(self, rel_dir: str) -> int:
        """Make ``rel_dir`` the current directory; returns its fd (valid until the next move)."""
        while self.rel and not (
            rel_dir.startswith(self.rel)
            and (len(rel_dir) == len(self.rel) or rel_dir[len(self.rel)] == "/")
        ):
            self.leave()
        if rel_dir != self.rel:
            rest = rel_dir[len(self.rel) + 1 :] if self.rel else rel_dir
            for name in rest.split("/"):
                self.enter(name)
        return self.dirs.top

    def enter(self, name: str, meta: _DirMeta | None = None) -> int:
        """Enter the subdirectory ``name``; ``meta`` is handed to ``on_leave`` later."""
        self.dirs.push(os.open(name, _dirfd.O_DIR, dir_fd=self.dirs.top))
        self._starts.append(len(self.rel))
        self.rel = _join(self.rel, name)
        self._meta.append(meta)
        return self.dirs.top

    def leave(self) -> None:
        fd = self.dirs.pop()
        rel, meta = self.rel, self._meta.pop()
        self.rel = rel[: self._starts.pop()]
        try:
            if self._on_leave is not None and meta is not None:
                self._on_leave(rel, fd, meta)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.dirs.close()


class _LayerWriter:
    """:func:`write_layer`'s state: the layer's current directory, the source tree's, and the
    hardlink groups seen so far."""

    def __init__(
        self,
        root: str,
        flavor: layertar.Flavor,
        *,
        clamp_mtimes: bool = True,
        written: layertar.WrittenFiles | None = None,
    ) -> None:
        self.flavor = flavor
        self.written_files = written
        self.budget = layertar.WRITTEN_BUDGET
        # Not clamping is clamping to a time no file has (the largest time_t, in ns).
        self.epoch_ns = layertar.clamp_epoch() * 1_000_000_000 if clamp_mtimes else 2**63 - 1
        self.links: dict[tuple[int, int], str] = {}
        self.written: set[str] = {""}
        self.files = self.size = 0
        self.src: _Cursor | None = None
        self.src_root: str | None = None
        self.root_fd = os.open(root, _O_ROOT)  # hardlinks reach back from here
        self.dev = os.fstat(self.root_fd).st_dev
        try:
            self.out = _Cursor(os.open(root, _O_ROOT), self.finish_dir)
        except BaseException:
            os.close(self.root_fd)
            raise

    def close(self) -> None:
        try:
            self.out.close()
            if self.src is not None:
                self.src.close()
        finally:
            os.close(self.root_fd)

    def mtime(self, st: os.stat_result) -> int:
        return min(st.st_mtime_ns, self.epoch_ns)

    def add(self, entry: Entry) -> None:
        rel = entry.path
        if _bad_rel(rel):
            raise ValueError(f"bad layer entry path {rel!r}: must be relative and inside the layer")
        parent, name = _split(rel)
        if parent not in self.written:
            raise ValueError(
                f"entry {rel!r} has no entry for its parent directory {parent!r}; the entry "
                "lists from changes_from_upper/changes_from_tree always include ancestors"
            )
        out = self.out.goto(parent)
        if entry.kind == "D":
            self.whiteout(out, name)
            return
        if entry.kind not in ("A", "C") or (entry.root is None and entry._source is None):
            raise ValueError(f"bad layer entry {entry!r}: A and C entries need a source")
        if entry._source is None and entry.root is not None:
            if self.src is None:
                self.src = _Cursor(os.open(entry.root, _O_ROOT))
                self.src_root = entry.root
            if entry.root == self.src_root:
                self.copy(rel, out, name, self.src.goto(parent), name)
                return
            where = os.path.join(entry.root, parent)
            src_name = name
        else:
            assert entry._source is not None  # checked above
            where, src_name = os.path.split(os.fspath(entry._source))
        # A source outside the one tree the cursor follows: opened by its path (any length).
        src_dir = _dirfd.open_path(where or ".", _O_PATH_DIR)
        try:
            self.copy(rel, out, name, src_dir, src_name or ".")
        finally:
            os.close(src_dir)

    def whiteout(self, out: int, name: str) -> None:
        if self.flavor == "overlay":
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=out)
            os.utime(name, ns=(0, 0), dir_fd=out, follow_symlinks=False)
            return
        fd = os.open(_ocirules.WHITEOUT_PREFIX + name, _O_CREATE, 0o600, dir_fd=out)
        try:
            os.utime(fd, ns=(0, 0))
        finally:
            os.close(fd)

    def copy(self, rel: str, out: int, name: str, src_dir: int, src_name: str) -> None:
        """Write the entry ``src_name`` of the directory ``src_dir`` as ``name`` in ``out``."""
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        if stat.S_ISSOCK(st.st_mode):
            return  # sockets cannot travel in a layer (docs/concepts/layers.md)
        _check_name(rel, st)
        self.written.add(rel)
        mode = stat.S_IFMT(st.st_mode)
        if mode == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=out)  # final mode on leaving: children come first
            self.out.enter(name, (st, _xattrs_at(src_dir, src_name, st)))
            return
        self.files += 1
        if mode == stat.S_IFREG:
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                self.link(first, out, name)
                return
            self.copy_file(rel, out, name, src_dir, src_name, st)
            self.size += st.st_size
            if st.st_nlink > 1:
                self.links[key] = rel
            return
        if mode == stat.S_IFLNK:
            os.symlink(os.readlink(src_name, dir_fd=src_dir), name, dir_fd=out)
        elif mode == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=out)
        elif mode in (stat.S_IFCHR, stat.S_IFBLK):
            try:
                os.mknod(name, mode | 0o600, st.st_rdev, dir_fd=out)
            except PermissionError as exc:
                raise PermissionError(
                    exc.errno,
                    f"cannot store device node {rel!r}: creating devices needs CAP_MKNOD; "
                    "commit as root",
                ) from exc
        else:
            raise InvalidLayerError(f"{rel!r}: unsupported file type {oct(mode)}")
        _chown(out, name, st, rel)
        if mode != stat.S_IFLNK:
            # After chown, which clears setuid/setgid. (No xattrs: only regular files and
            # directories carry the kept ones.)
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=out)
        os.utime(name, ns=(self.mtime(st), self.mtime(st)), dir_fd=out, follow_symlinks=False)

    def copy_file(
        self, rel: str, out: int, name: str, src_dir: int, src_name: str, st: os.stat_result
    ) -> None:
        """Copy a regular file, holes kept, and give it the source's metadata through its fd."""
        src = os.open(src_name, _O_READ, dir_fd=src_dir)
        try:
            fd = os.open(name, _O_CREATE, 0o600, dir_fd=out)
            try:
                data = _datacopy.copy_data(src, fd, st.st_size, st, dst_dev=self.dev)
                xattrs = _xattrs(src)
                self.set_meta(fd, st, xattrs, rel)
                if data is not None and self.written_files is not None and self.budget >= len(data):
                    self.budget -= len(data)
                    done = os.fstat(fd)
                    self.written_files[os.fsencode(rel)] = layertar.Written(
                        done.st_ino,
                        done.st_mtime_ns,
                        done.st_ctime_ns,
                        data,
                        layertar.kept_xattr_items(xattrs),
                    )
            finally:
                os.close(fd)
        finally:
            os.close(src)

    def set_meta(self, fd: int, st: os.stat_result, xattrs: dict[str, bytes], rel: str) -> None:
        _chown(fd, None, st, rel)
        # After chown, which clears setuid/setgid and file capabilities; before chmod, which
        # may take away the write permission that setting user.* xattrs needs.
        _set_xattrs(fd, xattrs)
        os.chmod(fd, stat.S_IMODE(st.st_mode))
        os.utime(fd, ns=(self.mtime(st), self.mtime(st)))

    def finish_dir(self, rel: str, fd: int, meta: _DirMeta) -> None:
        st, xattrs = meta
        self.set_meta(fd, st, xattrs, rel)

    def link(self, first: str, out: int, name: str) -> None:
        parent, first_name = _split(first)
        if parent == self.out.rel:
            os.link(first_name, name, src_dir_fd=out, dst_dir_fd=out, follow_symlinks=False)
            return
        # The first path of the group is in a directory already left: reach it from the root
        # (a path of our own layer, so only directories we made are on the way).
        where = _dirfd.open_path(parent or ".", _O_PATH_DIR, dir_fd=self.root_fd)
        try:
            os.link(first_name, name, src_dir_fd=where, dst_dir_fd=out, follow_symlinks=False)
        finally:
            os.close(where)

    def finish(self) -> None:
        self.out.goto("")  # leaves every directory, setting its metadata


def write_layer(
    entries: Sequence[Entry],
    dest: Path,
    *,
    flavor: layertar.Flavor,
    clamp_mtimes: bool = True,
    written: layertar.WrittenFiles | None = None,
) -> LayerStats:
    """Materialise ``entries`` in the empty staging directory ``dest``.

    Regular files are copied (holes kept; hardlink groups of the new tree stay hardlinks within
    the layer), symlinks, devices, fifos, modes, owners and kept xattrs are reproduced, deletions
    become whiteouts in ``flavor``, sockets are skipped. Mtimes later than
    :func:`layertar.clamp_epoch` are set to it, each directory's once its children are written
    so its mtime sticks (``clamp_mtimes=False`` keeps them as they are: an imported layer keeps
    its image's). A file named ``.wh.*`` raises :class:`InvalidLayerError`.

    Works at any depth: the layer and the entries' ``root`` are walked in step with directory
    fds, in the order of the sorted entries; an entry with an explicit ``source`` instead is
    opened by that path.

    ``written``: filled with the small files written (up to :data:`layertar.WRITTEN_BUDGET`
    bytes of them), for :func:`layertar.stream_layer` to take instead of reading them back.
    """
    _ocirules.check_flavor(flavor)
    root = os.fspath(dest)
    if os.listdir(root):
        raise ValueError(f"write_layer needs an empty staging directory, {root!r} is not empty")
    writer = _LayerWriter(root, flavor, clamp_mtimes=clamp_mtimes, written=written)
    try:
        for entry in sorted(entries, key=lambda e: _sort_key(e.path)):
            writer.add(entry)
        writer.finish()
    finally:
        writer.close()
    return LayerStats(files=writer.files, size=writer.size)


def settle_tree(tree: Path, *, clamp_mtimes: bool = True) -> LayerStats:
    """Make the whole tree ``tree`` what :func:`write_layer` would have written of it, in place.

    For a tree that is all of a new layer and nothing else's (a build with no parent fills a
    staging directory of the store): copying it would be writing every file a second time.
    Sockets are removed, mtimes later than :func:`layertar.clamp_epoch` are set to it
    (``clamp_mtimes=False`` keeps them), xattrs a layer does not keep are removed, and a
    hardlink group with members outside the tree (a builder may link a file in from elsewhere
    on the filesystem) is given a private copy first, so nothing outside ``tree`` is touched. A
    name or device that marks a deletion raises :class:`InvalidLayerError`, as in
    :func:`write_layer`. Works at any depth (directory fds).
    """
    epoch_ns = layertar.clamp_epoch() * 1_000_000_000 if clamp_mtimes else 2**63 - 1
    shared: dict[tuple[int, int], tuple[int, list[tuple[str, str]]]] = {}
    dir_mtimes: dict[str, int] = {}  # what each directory's mtime was made, for _settle_group
    files = size = 0

    def clamp(fd: int, name: str, st: os.stat_result) -> None:
        if st.st_mtime_ns > epoch_ns:
            os.utime(name, ns=(epoch_ns, epoch_ns), dir_fd=fd, follow_symlinks=False)

    def visit(
        rel_dir: str, fd: int, st_dir: os.stat_result | None
    ) -> list[tuple[str, _dirfd.Ident, os.stat_result | None]]:
        nonlocal files, size
        subdirs: list[tuple[str, _dirfd.Ident, os.stat_result | None]] = []
        kept: list[tuple[str, os.stat_result]] = []
        with os.scandir(fd) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISSOCK(st.st_mode):
                    os.unlink(e.name, dir_fd=fd)  # cannot travel in a layer, as in write_layer
                    continue
                kept.append((e.name, st))
        for name, st in kept:
            rel = _join(rel_dir, name)
            _check_name(rel, st)
            grouped = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
            if _has_xattrs(st) and not grouped:  # a group's inode may be outside: later
                _drop_unkept_xattrs(_dirfd.at(fd, name))
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((name, (st.st_dev, st.st_ino), st))
                continue
            files += 1
            if grouped:
                # Settled once the whole group is known: it may reach outside the tree.
                seen = shared.setdefault((st.st_dev, st.st_ino), (st.st_nlink, []))
                if not seen[1]:
                    size += st.st_size
                seen[1].append((rel_dir, name))
                continue
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
            clamp(fd, name, st)
        if st_dir is not None:
            # After the sockets went (an unlink restamps the directory); files' utimes do not.
            mtime = dir_mtimes[rel_dir] = min(st_dir.st_mtime_ns, epoch_ns)
            os.utime(fd, ns=(mtime, mtime))
        return subdirs

    no_stat: os.stat_result | None = None  # the root's own metadata is not the layer's
    _dirfd.walk(tree, no_stat, visit)
    root_fd = os.open(tree, _O_ROOT)
    try:
        for nlink, members in shared.values():
            _settle_group(root_fd, nlink, members, epoch_ns, dir_mtimes)
    finally:
        os.close(root_fd)
    return LayerStats(files=files, size=size)


def _drop_unkept_xattrs(path: str) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT):
            return
        raise
    for name in names:
        if not _ocirules.layer_keeps_xattr(name) and name.startswith(("user.", "trusted.")):
            # security.* labels are the filesystem's own (a copy gets them too); user.overlay.*
            # and trusted.* would mean something to an overlay mount of the layer.
            os.removexattr(path, name, follow_symlinks=False)


def _settle_group(
    root_fd: int,
    nlink: int,
    members: list[tuple[str, str]],
    epoch_ns: int,
    dir_mtimes: dict[str, int],
) -> None:
    """Settle a hardlink group of the tree (the xattrs a layer does not keep removed, the mtime
    clamped); one that reaches outside the tree first becomes a private copy, linked at every
    member's place, so the file outside keeps its own."""
    first_dir, first_name = members[0]
    where = _dirfd.open_path(first_dir or ".", _O_PATH_DIR, dir_fd=root_fd)
    try:
        st = os.stat(first_name, dir_fd=where, follow_symlinks=False)
        if len(members) < nlink:
            tmp = f".settle-{os.getpid()}-{st.st_ino}"
            src = os.open(first_name, _O_READ, dir_fd=where)
            try:
                fd = os.open(tmp, _O_CREATE, 0o600, dir_fd=where)
                try:
                    _datacopy.copy_data(src, fd, st.st_size)
                    _chown(fd, None, st, _join(first_dir, first_name))
                    _set_xattrs(fd, _xattrs(src))
                    os.chmod(fd, stat.S_IMODE(st.st_mode))
                finally:
                    os.close(fd)
            finally:
                os.close(src)
            os.rename(tmp, first_name, src_dir_fd=where, dst_dir_fd=where)
        # The inode is the tree's own now (private, or every link inside): its xattrs may go.
        _drop_unkept_xattrs(_dirfd.at(where, first_name))
        mtime = min(st.st_mtime_ns, epoch_ns)
        os.utime(first_name, ns=(mtime, mtime), dir_fd=where, follow_symlinks=False)
        if len(members) >= nlink:
            return
        for rel_dir, name in members[1:]:
            other = _dirfd.open_path(rel_dir or ".", _O_PATH_DIR, dir_fd=root_fd)
            try:
                tmp = f".settle-{os.getpid()}-link"
                os.link(first_name, tmp, src_dir_fd=where, dst_dir_fd=other)
                os.rename(tmp, name, src_dir_fd=other, dst_dir_fd=other)
            finally:
                os.close(other)
        # The renames restamped the members' directories: give them their settled times back.
        for rel_dir in {d for d, _ in members}:
            if rel_dir:
                parent, name = _split(rel_dir)
                pfd = _dirfd.open_path(parent or ".", _O_PATH_DIR, dir_fd=root_fd)
                try:
                    mt = dir_mtimes[rel_dir]
                    os.utime(name, ns=(mt, mt), dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(pfd)
    finally:
        os.close(where)
