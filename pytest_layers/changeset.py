"""Changes between an image and a new tree, and writing them as a layer directory.

An image is a chain of stored layer directories; :class:`ImageView` reads their union the way
overlayfs would, without mounting anything. A test's writes reach us in one of two shapes: the
upper directory of an overlay or fuse-overlayfs mount (:func:`changes_from_upper`), or a full
copy of the image that the test modified (:func:`changes_from_tree`, the copy backend). Both give
the same minimal list of :class:`Entry` for the same operations, and :func:`write_layer` turns
that list into a self-contained layer directory (no opaque markers: DESIGN 6), so the layer's
canonical tar depends only on the parent tree and the new tree, never on the backend.

Paths are relative POSIX strings without a leading slash (``"etc/app.conf"``); non-UTF-8 names
travel as ``surrogateescape`` strings, which every ``os`` call here accepts as they are.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_layers import layertar
from pytest_layers.errors import InvalidLayerError

__all__ = [
    "Change",
    "Entry",
    "ImageView",
    "LayerStats",
    "changes_from_upper",
    "changes_from_tree",
    "write_layer",
    "to_changes",
    "layer_changes",
    "kept_xattrs",
    "ctime_mark",
]

_KINDS = ("A", "C", "D")
_OPAQUE_MARKER = ".wh..wh..opq"
_WH_PREFIX = ".wh."
_OPAQUE_XATTRS = {
    # Which xattrs mark a directory opaque in an upper dir of each flavor. Overlay writes the
    # user.* name when mounted with userxattr, the trusted.* name otherwise.
    "overlay": ("user.overlay.opaque", "trusted.overlay.opaque"),
    "fuse": ("user.fuseoverlayfs.opaque", "trusted.overlay.opaque", "user.overlay.opaque"),
}
_CHUNK = 1 << 20
_SCAN_AFTER = 8  # lookups in one layer directory before it is listed and cached whole


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


@dataclass(frozen=True)
class Entry:
    """One entry of a layer being made.

    ``kind`` is ``"A"`` (not in the image), ``"C"`` (in the image: changed, or an ancestor or
    hardlink partner of a change) or ``"D"`` (deleted; its children are implied). ``source`` is
    where the new entry is (in the upper dir or the new tree), ``None`` for ``"D"``.
    """

    path: str
    kind: str
    source: Path | None


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


def _abs(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


def _sort_key(rel: str) -> list[str]:
    # Component order puts every parent before its children ("a" < "a/b" < "a-b").
    return rel.split("/")


def _is_whiteout_dev(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _keep_xattr(name: str) -> bool:
    if name.startswith(("user.overlay.", "user.fuseoverlayfs.")):
        return False
    return name.startswith("user.") or name == "security.capability"


def kept_xattrs(path: str | os.PathLike[str], st: os.stat_result | None = None) -> dict[str, bytes]:
    """The xattrs a layer carries for ``path`` (``user.*`` and ``security.capability``, minus the
    overlay and fuse-overlayfs bookkeeping). Only regular files and directories can hold them."""
    if st is None:
        st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if _keep_xattr(name):
            try:
                out[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
    return out


def _xattr_is_y(path: str, names: Sequence[str]) -> bool:
    for name in names:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError as exc:
            # trusted.* is unreadable without CAP_SYS_ADMIN and simply absent for us then.
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
    return False


def _data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """(start, end) of every data extent, or None when the filesystem cannot say."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size)))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP):
            return None
        raise
    return out


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


def _same_content(a: str, b: str, size: int) -> bool:
    fa = os.open(a, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fb = os.open(b, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            ea, eb = _data_extents(fa, size), _data_extents(fb, size)
            if ea is not None and ea == eb:
                # Identical hole maps: holes read as zeros on both sides, so only data counts.
                # This keeps a multi-GiB sparse file cheap to compare.
                return all(_ranges_equal(fa, fb, s, e) for s, e in ea)
            return _ranges_equal(fa, fb, 0, size)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = min(end - pos, 1 << 30)
        try:
            done = os.copy_file_range(src, dst, n, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = 0
            buf = os.pread(src, min(n, _CHUNK), pos)
            if buf:
                done = os.pwrite(dst, buf, pos)
        if done == 0:  # source shrank while we copied
            return
        pos += done


def _copy_file_data(src: str, dst: str, size: int) -> None:
    """Copy a regular file's bytes, keeping holes (a sparse 8 GiB file stays sparse)."""
    fs = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            extents = _data_extents(fs, size)
            for start, end in extents if extents is not None else [(0, size)]:
                _copy_range(fs, fd, start, end)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    finally:
        os.close(fs)


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
    """

    def __init__(self, layers_top_first: Sequence[Path], flavor: layertar.Flavor) -> None:
        if flavor not in ("overlay", "marker"):
            raise ValueError(f"unknown whiteout flavor {flavor!r}; expected 'overlay' or 'marker'")
        self.layers: tuple[Path, ...] = tuple(Path(p) for p in layers_top_first)
        self.flavor: layertar.Flavor = flavor
        self._listings: dict[str, dict[str, os.DirEntry[str]]] = {}
        self._stacks: dict[str, tuple[str, ...] | None] = {}
        self._found: dict[str, tuple[str, os.stat_result] | None] = {}
        self._merged: dict[str, list[str]] = {}
        self._probes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"ImageView({[os.fspath(p) for p in self.layers]!r}, flavor={self.flavor!r})"

    # -- caches over the layer directories

    def _entries(self, abs_dir: str) -> dict[str, os.DirEntry[str]]:
        ents = self._listings.get(abs_dir)
        if ents is None:
            try:
                with os.scandir(abs_dir) as it:
                    ents = {e.name: e for e in it}
            except (FileNotFoundError, NotADirectoryError):
                ents = {}
            self._listings[abs_dir] = ents
        return ents

    def _get(self, abs_dir: str, name: str) -> tuple[str, os.stat_result] | None:
        """(path, lstat) of ``name`` in one layer's directory, None when absent.

        A few lookups in a directory are single lstat calls (a diff of ten files must not read
        ten 1000-entry directories); past ``_SCAN_AFTER`` the directory is listed once and the
        rest are dictionary hits.
        """
        ents = self._listings.get(abs_dir)
        if ents is None:
            probes = self._probes.get(abs_dir, 0) + 1
            self._probes[abs_dir] = probes
            if probes > _SCAN_AFTER:
                ents = self._entries(abs_dir)
        if ents is not None:
            entry = ents.get(name)
            return None if entry is None else (entry.path, entry.stat(follow_symlinks=False))
        path = os.path.join(abs_dir, name)
        try:
            return path, os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _is_whiteout(self, st: os.stat_result) -> bool:
        return self.flavor == "overlay" and _is_whiteout_dev(st)

    def _marked(self, abs_dir: str, name: str) -> bool:
        return self.flavor == "marker" and self._get(abs_dir, _WH_PREFIX + name) is not None

    def _opaque(self, abs_dir: str) -> bool:
        if self.flavor == "marker":
            return self._get(abs_dir, _OPAQUE_MARKER) is not None
        return _xattr_is_y(abs_dir, _OPAQUE_XATTRS["overlay"])

    def _stack(self, rel: str) -> tuple[str, ...] | None:
        """The directories, top first, whose union is the merged directory ``rel``; None when
        ``rel`` is not a directory of the image."""
        if rel in self._stacks:
            return self._stacks[rel]
        out: list[str] = []
        if rel == "":
            for layer in self.layers:
                out.append(os.fspath(layer))
                if self._opaque(out[-1]):
                    break
        else:
            parent, name = _split(rel)
            for d in self._stack(parent) or ():
                got = self._get(d, name)
                marked = self._marked(d, name)
                if got is not None and not self._is_whiteout(got[1]):
                    if not stat.S_ISDIR(got[1].st_mode):
                        break  # a non-directory hides everything below it
                    out.append(got[0])
                    if marked or self._opaque(got[0]):
                        break
                elif got is not None or marked:
                    break
        result = tuple(out) if (out or rel == "") else None
        self._stacks[rel] = result
        return result

    def _find(self, rel: str) -> tuple[str, os.stat_result] | None:
        if rel in self._found:
            return self._found[rel]
        found: tuple[str, os.stat_result] | None = None
        if rel == "":
            if self.layers:
                top = os.fspath(self.layers[0])
                found = (top, os.lstat(top))
        else:
            parent, name = _split(rel)
            if not (self.flavor == "marker" and name.startswith(_WH_PREFIX)):
                for d in self._stack(parent) or ():
                    got = self._get(d, name)
                    if got is not None:
                        if not self._is_whiteout(got[1]):
                            found = got
                        break
                    if self._marked(d, name):
                        break
        self._found[rel] = found
        return found

    # -- the contract

    def lookup(self, rel: str) -> Path | None:
        """Real path of ``rel`` in the topmost layer that has it, None when the image lacks it."""
        found = self._find(rel)
        return Path(found[0]) if found is not None else None

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
        for d in self._stack(rel) or ():
            hidden_here: list[str] = []
            for name, entry in self._entries(d).items():
                if name in seen:
                    continue
                if self.flavor == "marker" and name.startswith(_WH_PREFIX):
                    if name != _OPAQUE_MARKER:
                        # Applies to lower layers only: the layer's own NAME stays visible.
                        hidden_here.append(name[len(_WH_PREFIX) :])
                    continue
                seen.add(name)
                if not self._is_whiteout(entry.stat(follow_symlinks=False)):
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

    def _source(self, rel: str) -> Path:
        return Path(_abs(self.root, rel))

    def consider(
        self, rel: str, path: str, st: os.stat_result, img: tuple[str, os.stat_result] | None
    ) -> None:
        """A candidate of the new tree: included when it is new or differs from the image."""
        if img is None:
            self.entries[rel] = Entry(rel, "A", Path(path))
        elif self.differs(path, st, img[0], img[1]):
            self.entries[rel] = Entry(rel, "C", Path(path))
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            self.inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)

    def delete(self, rel: str) -> None:
        self.entries[rel] = Entry(rel, "D", None)

    def differs(self, new: str, ns: os.stat_result, old: str, os_: os.stat_result) -> bool:
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
            same = os.readlink(new) == os.readlink(old)
        elif stat.S_ISCHR(ns.st_mode) or stat.S_ISBLK(ns.st_mode):
            same = ns.st_rdev == os_.st_rdev
        elif stat.S_ISREG(ns.st_mode):
            same = ns.st_size == os_.st_size and _same_content(new, old, ns.st_size)
        else:
            same = True
        if not same:
            return True
        return kept_xattrs(new, ns) != kept_xattrs(old, os_)

    def finish(self) -> list[Entry]:
        # Hardlink partners travel together: the layer must hold the whole inode group, or
        # applying it would split a link the new tree has.
        for group in self.inodes.values():
            if len(group) > 1 and any(rel in self.entries for rel in group):
                for rel in group:
                    if rel not in self.entries:
                        self.entries[rel] = Entry(rel, "C", self._source(rel))
        done: set[str] = set()
        for rel in list(self.entries):
            parent = _split(rel)[0]
            while parent and parent not in done:
                done.add(parent)
                if parent not in self.entries:
                    kind = "C" if self.image.lstat(parent) is not None else "A"
                    self.entries[parent] = Entry(parent, kind, self._source(parent))
                parent = _split(parent)[0]
        return sorted(self.entries.values(), key=lambda e: _sort_key(e.path))


def _norm_exclude(exclude: Collection[str]) -> frozenset[str]:
    return frozenset(p.strip("/") for p in exclude if p.strip("/"))


def _scan(abs_dir: str) -> list[os.DirEntry[str]]:
    with os.scandir(abs_dir) as it:
        return sorted(it, key=lambda e: e.name)


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
    change; ``exclude`` (the init layer's paths) and everything below never appear.
    """
    if upper_flavor not in _OPAQUE_XATTRS:
        raise ValueError(f"unknown upper flavor {upper_flavor!r}; expected 'overlay' or 'fuse'")
    fuse = upper_flavor == "fuse"
    skip = _norm_exclude(exclude)
    root = os.fspath(upper)
    col = _Collector(root, image)
    # (rel_dir, parent_hidden): parent_hidden says an opaque ancestor already hides the lower.
    stack: list[tuple[str, bool]] = [("", False)]
    while stack:
        rel_dir, parent_hidden = stack.pop()
        abs_dir = _abs(root, rel_dir)
        ents = _scan(abs_dir)
        names = {e.name for e in ents}
        hidden = parent_hidden or _xattr_is_y(abs_dir, _OPAQUE_XATTRS[upper_flavor])
        if fuse and _OPAQUE_MARKER in names:
            hidden = True
        present: set[str] = set()
        deleted: list[str] = []
        for e in ents:
            name = e.name
            if fuse and name.startswith(_WH_PREFIX):
                if name != _OPAQUE_MARKER:
                    deleted.append(name[len(_WH_PREFIX) :])
                continue
            rel = _join(rel_dir, name)
            if rel in skip:
                continue
            st = e.stat(follow_symlinks=False)
            if _is_whiteout_dev(st):
                deleted.append(name)
                continue
            present.add(name)
            col.consider(rel, e.path, st, image._find(rel))
            if stat.S_ISDIR(st.st_mode):
                stack.append((rel, hidden))
        gone = [n for n in deleted if n not in present]
        if hidden:
            gone.extend(n for n in image.listdir(rel_dir) if n not in present)
        for name in gone:
            rel = _join(rel_dir, name)
            if rel not in skip and image.lstat(rel) is not None:
                col.delete(rel)
    return col.finish()


def changes_from_tree(
    tree: Path,
    image: ImageView,
    *,
    since_ns: int | None = None,
    exclude: Collection[str] = (),
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
    operations.
    """
    skip = _norm_exclude(exclude)
    root = os.fspath(tree)
    col = _Collector(root, image)
    # Each directory is walked in one of three modes: "new" (not a directory of the image:
    # everything below is added), "exact" (compare every entry), "fast" (trust ctimes).
    stack: list[tuple[str, int, str]] = [
        ("", os.lstat(root).st_ctime_ns, "exact" if since_ns is None else "fast")
    ]
    while stack:
        rel_dir, dir_ctime, mode = stack.pop()
        ents = []
        for e in _scan(_abs(root, rel_dir)):
            rel = _join(rel_dir, e.name)
            if rel not in skip:
                ents.append((e, rel, e.stat(follow_symlinks=False)))
        changed_dir = mode == "exact" or (since_ns is not None and dir_ctime >= since_ns)
        if mode == "fast" and changed_dir:
            # A directory renamed into place keeps its children's old ctimes. Children that do
            # not even match the image's metadata give it away; then nothing below it can be
            # trusted and the whole subtree is compared.
            assert since_ns is not None
            for _e, rel, st in ents:
                if st.st_ctime_ns < since_ns and _moved(st, image._find(rel)):
                    mode = "exact"
                    break
        for e, rel, st in ents:
            img: tuple[str, os.stat_result] | None
            known = True
            if mode == "new":
                img = None
                col.consider(rel, e.path, st, None)
            elif mode == "exact" or (since_ns is not None and st.st_ctime_ns >= since_ns):
                img = image._find(rel)
                col.consider(rel, e.path, st, img)
            else:
                img, known = None, False  # untouched since the copy: as in the image
            if stat.S_ISDIR(st.st_mode):
                child = mode
                if known and (img is None or not stat.S_ISDIR(img[1].st_mode)):
                    child = "new"
                stack.append((rel, st.st_ctime_ns, child))
        if mode != "new" and changed_dir:
            present = {e.name for e, _rel, _st in ents}
            for name in image.listdir(rel_dir):
                rel = _join(rel_dir, name)
                if name not in present and rel not in skip:
                    col.delete(rel)
    return col.finish()


def _moved(st: os.stat_result, img: tuple[str, os.stat_result] | None) -> bool:
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
    each parent child they hide."""
    root = os.fspath(layer_dir)
    out: list[Change] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = _abs(root, rel_dir)
        ents = _scan(abs_dir)
        names = {e.name for e in ents}
        present: set[str] = set()
        gone: set[str] = set()
        for e in ents:
            if flavor == "marker" and e.name.startswith(_WH_PREFIX):
                if e.name != _OPAQUE_MARKER:
                    gone.add(e.name[len(_WH_PREFIX) :])
                continue
            rel = _join(rel_dir, e.name)
            st = e.stat(follow_symlinks=False)
            if flavor == "overlay" and _is_whiteout_dev(st):
                gone.add(e.name)
                continue
            present.add(e.name)
            out.append(Change("C" if parent.lstat(rel) is not None else "A", "/" + rel))
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
        if rel_dir:
            opaque = (
                _OPAQUE_MARKER in names
                if flavor == "marker"
                else _xattr_is_y(abs_dir, _OPAQUE_XATTRS["overlay"])
            )
            if opaque:
                gone.update(n for n in parent.listdir(rel_dir) if n not in present)
        out.extend(Change("D", "/" + _join(rel_dir, n)) for n in gone if n not in present)
    return sorted(out)


# --------------------------------------------------------------------------------------------
# writing a layer


def _check_name(rel: str, st: os.stat_result) -> None:
    name = _split(rel)[1]
    if name.startswith(_WH_PREFIX):
        raise InvalidLayerError(
            f"{rel!r}: a file whose name starts with '.wh.' cannot be committed, because OCI "
            "layers use that prefix for deletions; rename or remove it before the layer is made"
        )
    if _is_whiteout_dev(st):
        raise InvalidLayerError(
            f"{rel!r}: a character device 0/0 cannot be committed, because overlayfs uses it "
            "to mark a deletion; remove it before the layer is made"
        )


def _chown(path: str, uid: int, gid: int, rel: str) -> None:
    cur = os.lstat(path)
    if (cur.st_uid, cur.st_gid) == (uid, gid):
        return
    try:
        os.chown(path, uid, gid, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
        raise PermissionError(
            exc.errno,
            f"cannot give {rel!r} owner {uid}:{gid} in the layer ({os.strerror(exc.errno)}); "
            "only root can store files owned by other users: commit as root",
            path,
        ) from exc


def _set_xattrs(path: str, xattrs: dict[str, bytes]) -> None:
    for name, value in sorted(xattrs.items()):
        os.setxattr(path, name, value, follow_symlinks=False)


def write_layer(entries: Sequence[Entry], dest: Path, *, flavor: layertar.Flavor) -> LayerStats:
    """Materialise ``entries`` in the empty staging directory ``dest``.

    Regular files are copied (holes kept; hardlink groups of the new tree stay hardlinks within
    the layer), symlinks, devices, fifos, modes, owners and kept xattrs are reproduced, deletions
    become whiteouts in ``flavor``, sockets are skipped. Mtimes later than
    :func:`layertar.clamp_epoch` are set to it, directories last so their mtimes stick.
    A file named ``.wh.*`` raises :class:`InvalidLayerError`.
    """
    if flavor not in ("overlay", "marker"):
        raise ValueError(f"unknown whiteout flavor {flavor!r}; expected 'overlay' or 'marker'")
    root = os.fspath(dest)
    if os.listdir(root):
        raise ValueError(f"write_layer needs an empty staging directory, {root!r} is not empty")
    epoch_ns = layertar.clamp_epoch() * 1_000_000_000
    ordered = sorted(entries, key=lambda e: _sort_key(e.path))
    links: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result, dict[str, bytes]]] = []
    written: set[str] = {""}
    files = size = 0

    def mtime_of(st: os.stat_result) -> int:
        return min(st.st_mtime_ns, epoch_ns)

    for entry in ordered:
        rel = entry.path
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"bad layer entry path {rel!r}: must be relative and inside the layer")
        parent, name = _split(rel)
        if parent not in written:
            raise ValueError(
                f"entry {rel!r} has no entry for its parent directory {parent!r}; the entry "
                "lists from changes_from_upper/changes_from_tree always include ancestors"
            )
        out = os.path.join(root, rel)
        if entry.kind == "D":
            if flavor == "overlay":
                os.mknod(out, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            else:
                out = os.path.join(root, parent, _WH_PREFIX + name)
                os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.utime(out, ns=(0, 0), follow_symlinks=False)
            continue
        if entry.kind not in ("A", "C") or entry.source is None:
            raise ValueError(f"bad layer entry {entry!r}: A and C entries need a source")
        src = os.fspath(entry.source)
        st = os.lstat(src)
        if stat.S_ISSOCK(st.st_mode):
            continue  # sockets cannot travel in a layer (DESIGN 6)
        _check_name(rel, st)
        written.add(rel)
        mode = stat.S_IFMT(st.st_mode)
        if mode == stat.S_IFDIR:
            os.mkdir(out, 0o700)  # final mode later: children must still be writable
            dirs.append((rel, st, kept_xattrs(src, st)))
            continue
        if mode == stat.S_IFREG:
            files += 1
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], out)
                continue
            _copy_file_data(src, out, st.st_size)
            size += st.st_size
            if st.st_nlink > 1:
                links[key] = out
        elif mode == stat.S_IFLNK:
            files += 1
            os.symlink(os.readlink(src), out)
        elif mode == stat.S_IFIFO:
            files += 1
            os.mkfifo(out, 0o600)
        elif mode in (stat.S_IFCHR, stat.S_IFBLK):
            files += 1
            try:
                os.mknod(out, mode | 0o600, st.st_rdev)
            except PermissionError as exc:
                raise PermissionError(
                    exc.errno,
                    f"cannot store device node {rel!r}: creating devices needs CAP_MKNOD; "
                    "commit as root",
                    out,
                ) from exc
        else:
            raise InvalidLayerError(f"{rel!r}: unsupported file type {oct(mode)}")
        _chown(out, st.st_uid, st.st_gid, rel)
        if mode != stat.S_IFLNK:
            # After chown, which clears setuid/setgid and file capabilities.
            os.chmod(out, stat.S_IMODE(st.st_mode))
            _set_xattrs(out, kept_xattrs(src, st))
        os.utime(out, ns=(mtime_of(st), mtime_of(st)), follow_symlinks=False)
    for rel, st, xattrs in reversed(dirs):
        out = os.path.join(root, rel)
        _chown(out, st.st_uid, st.st_gid, rel)
        os.chmod(out, stat.S_IMODE(st.st_mode))
        _set_xattrs(out, xattrs)
        os.utime(out, ns=(mtime_of(st), mtime_of(st)))
    return LayerStats(files=files, size=size)
