"""The minimal change list between an image and a new tree: an overlay or fuse-overlayfs
upper directory (:func:`changes_from_upper`) or a full copy the test modified
(:func:`changes_from_tree`, the copy backend); both give the same :class:`Entry` list for
the same operations. Also the ``docker diff`` form (:func:`to_changes`) and the changes
a stored layer makes (:func:`layer_changes`)."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from pytest_layers import _datacopy, _dirfd, _ocirules, layertar
from pytest_layers._changebase import (
    _CHUNK,
    _O_READ,
    Change,
    Entry,
    Read,
    _entry_with_read,
    _join,
    _sort_key,
    _split,
    _xattr_is_y,
    _xattrs,
    _xattrs_at,
)
from pytest_layers._datacopy import data_extents
from pytest_layers._imageview import ImageView


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
    *,
    keep: list[bytes] | None = None,
) -> bool:
    """Whether two open regular files hold the same first ``size`` bytes (``sta``/``stb``:
    their ``lstat``, which lets two small dense files skip the hole maps). Two small dense
    files are read whole; ``keep`` then gets the first one's content."""
    if _datacopy.dense(sta, size) and _datacopy.dense(stb, size):
        a = os.pread(fa, size, 0)
        b = os.pread(fb, size, 0)
        if len(a) != size or len(b) != size:  # shrinking under us: compare what is there
            return _ranges_equal(fa, fb, 0, size)
        if keep is not None:
            keep.append(a)
        return a == b
    ea, eb = data_extents(fa, size), data_extents(fb, size)
    if ea is not None and ea == eb:
        # Identical hole maps: holes read as zeros on both sides, so only data counts. This
        # keeps a multi-GiB sparse file cheap to compare.
        return all(_ranges_equal(fa, fb, s, e) for s, e in ea)
    return _ranges_equal(fa, fb, 0, size)


class _Collector:
    """Builds the minimal entry list from candidates of a new tree (an upper dir or a copy)."""

    def __init__(self, root: str, image: ImageView) -> None:
        self.root = root
        self.image = image
        self.epoch_ns = layertar.clamp_epoch() * 1_000_000_000
        self.entries: dict[str, Entry] = {}
        self.inodes: dict[tuple[int, int], list[str]] = {}
        # What comparing a changed small file read of it, handed to the layer writer with its
        # entry (bounded like the writer's own cache of what it wrote).
        self.reads: dict[str, Read] = {}
        self.budget = layertar.WRITTEN_BUDGET

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
            self.entries[rel] = _entry_with_read(rel, "C", self.root, self.reads.pop(rel, None))
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
        """Same content and kept xattrs (read through the open fds: no more lookups). A small
        dense file is read whole; when it differs, what was read of it is kept for its entry
        (:class:`Read`), so the layer writer copies it without reading it again."""
        size = st.st_size
        fa = os.open(name, _O_READ, dir_fd=dir_fd)
        try:
            fb = self.image._open(layer, rel, _O_READ)
            try:
                keep: list[bytes] | None = [] if 0 < size <= self.budget else None
                same = _same_content(fa, fb, size, st, img_st, keep=keep)
                xattrs = _xattrs(fa)
                if same and xattrs == _xattrs(fb):
                    return True
                if keep:
                    self.reads[rel] = Read(st, keep[0], xattrs)
                    self.budget -= size
                return False
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
