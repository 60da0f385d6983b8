"""Writing a change list as a self-contained layer directory (:func:`write_layer`: no
opaque markers, hardlink groups kept, mtimes clamped, whiteouts in the store's flavor),
and its in-place twin for a tree that is all of a new layer (:func:`settle_tree`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pytest_layers import _datacopy, _dirfd, _ocirules, layertar
from pytest_layers._changebase import (
    _O_CREATE,
    _O_PATH_DIR,
    _O_READ,
    _O_ROOT,
    Entry,
    LayerStats,
    Read,
    _has_xattrs,
    _join,
    _sort_key,
    _split,
    _xattrs,
    _xattrs_at,
)
from pytest_layers.errors import InvalidLayerError


def _check_name(rel: str, st: os.stat_result) -> None:
    name = _split(rel)[1]
    if name.startswith(_ocirules.WHITEOUT_PREFIX):
        raise InvalidLayerError(
            f"{rel!r}: a file whose name starts with '.wh.' cannot be committed, because OCI "
            "layers use that prefix for deletions; rename or remove it before the layer is made",
            path=rel,
        )
    if _ocirules.is_whiteout_device(st):
        raise InvalidLayerError(
            f"{rel!r}: a character device 0/0 cannot be committed, because overlayfs uses it "
            "to mark a deletion; remove it before the layer is made",
            path=rel,
        )


def _chown(where: int, name: str | None, st: os.stat_result, rel: str) -> None:
    """Give the written entry (the fd ``where``, or ``name`` in the directory ``where``) the
    owner of ``st``. With ``name=""``, ``where`` is an ``O_PATH`` fd of the entry itself."""
    if name is None or name == "":
        cur = os.fstat(where)
    else:
        cur = os.stat(name, dir_fd=where, follow_symlinks=False)
    uid, gid = st.st_uid, st.st_gid
    if (cur.st_uid, cur.st_gid) == (uid, gid):
        return
    try:
        if name is None:
            os.chown(where, uid, gid)
        elif name == "":
            os.chown(_proc_fd(where), uid, gid)  # the inode the fd holds, found by no name
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


def _proc_fd(fd: int) -> str:
    """The path that reaches the very inode an ``O_PATH`` fd holds (no name is looked up)."""
    return f"/proc/self/fd/{fd}"


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
                self.copy(rel, out, name, self.src.goto(parent), name, entry._read)
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

    def copy(
        self,
        rel: str,
        out: int,
        name: str,
        src_dir: int,
        src_name: str,
        read: Read | None = None,
    ) -> None:
        """Write the entry ``src_name`` of the directory ``src_dir`` as ``name`` in ``out``
        (a small file from ``read``, what the change list already read of it)."""
        st = (
            read.st
            if read is not None
            else os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        )
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
            if read is not None:
                self.write_file(rel, out, name, st, read.data, read.xattrs)
            else:
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
        # No xattrs: only regular files and directories carry the kept ones.
        _finish_special(out, name, st, rel)
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
                self.keep(rel, fd, data, xattrs)
            finally:
                os.close(fd)
        finally:
            os.close(src)

    def write_file(
        self,
        rel: str,
        out: int,
        name: str,
        st: os.stat_result,
        data: bytes,
        xattrs: dict[str, bytes],
    ) -> None:
        """Write a regular file whose content and xattrs were read already."""
        fd = os.open(name, _O_CREATE, 0o600, dir_fd=out)
        try:
            _datacopy.write_all(fd, data)
            self.set_meta(fd, st, xattrs, rel)
            self.keep(rel, fd, data, xattrs, charged=True)
        finally:
            os.close(fd)

    def keep(
        self,
        rel: str,
        fd: int,
        data: bytes | None,
        xattrs: dict[str, bytes],
        *,
        charged: bool = False,
    ) -> None:
        """Remember a small file just written, for the stream that names the layer.

        ``charged``: ``data`` is what the change list carried, already counted against the
        budget by :func:`write_layer`, so keeping it costs no more memory."""
        if data is None or self.written_files is None:
            return
        if not charged:
            if self.budget < len(data):
                return
            self.budget -= len(data)
        done = os.fstat(fd)
        self.written_files[os.fsencode(rel)] = layertar.Written(
            done.st_ino,
            done.st_mtime_ns,
            done.st_ctime_ns,
            data,
            layertar.kept_xattr_items(xattrs),
        )

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
        # What the change list carried lives as long as the entries: one budget for both.
        writer.budget -= sum(len(e._read.data) for e in entries if e._read is not None)
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
    :func:`write_layer`, once the whole tree is walked: for the first such path in layer order
    (a ``.wh.`` name before a 0/0 device, a socket's name too), whatever order the filesystem
    lists entries in. Works at any depth (directory fds).
    """
    epoch_ns = layertar.clamp_epoch() * 1_000_000_000 if clamp_mtimes else 2**63 - 1
    shared: dict[tuple[int, int], tuple[int, list[tuple[str, str]]]] = {}
    dir_mtimes: dict[str, int] = {}  # what each directory's mtime was made, for _settle_group
    dir_ids: dict[str, _dirfd.Ident] = {}  # each directory the walk read, for _settle_group
    files = size = 0
    bad: list[tuple[bool, str, os.stat_result]] = []  # (is a device, path, stat)

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
                if e.name.startswith(_ocirules.WHITEOUT_PREFIX):
                    bad.append((False, _join(rel_dir, e.name), st))
                elif _ocirules.is_whiteout_device(st):
                    bad.append((True, _join(rel_dir, e.name), st))
                if stat.S_ISSOCK(st.st_mode):
                    os.unlink(e.name, dir_fd=fd)  # cannot travel in a layer, as in write_layer
                    continue
                kept.append((e.name, st))
        for name, st in kept:
            special = not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode)
            if special and st.st_nlink > 1 and not _ocirules.is_whiteout_device(st):
                # A symlink, fifo or device with other links, maybe from outside the tree (a
                # builder may link one in): each gets a private twin, as write_layer gives
                # each its own inode, so that settling touches nothing outside.
                tmp = f".settle-{os.getpid()}-{st.st_ino}"
                _recreate_special(fd, name, tmp, st, _join(rel_dir, name))
                os.utime(tmp, ns=(st.st_mtime_ns, st.st_mtime_ns), dir_fd=fd, follow_symlinks=False)
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
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
            if special and st.st_nlink > 1 and _ocirules.is_whiteout_device(st):
                continue  # refused below, and its inode may be outside: left as it is
            clamp(fd, name, st)
        if st_dir is not None:
            # After the sockets went (an unlink restamps the directory); files' utimes do not.
            mtime = dir_mtimes[rel_dir] = min(st_dir.st_mtime_ns, epoch_ns)
            os.utime(fd, ns=(mtime, mtime))
        # The directory opened and read (the root too), not the entry its parent listed: one
        # swapped in between (and back before the groups are settled) is then refused there.
        opened = os.fstat(fd)
        dir_ids[rel_dir] = (opened.st_dev, opened.st_ino)
        return subdirs

    no_stat: os.stat_result | None = None  # the root's own metadata is not the layer's
    _dirfd.walk(tree, no_stat, visit)
    if bad:
        _is_device, rel, st = min(bad, key=lambda b: (b[0], _sort_key(b[1])))
        _check_name(rel, st)
    root_fd = os.open(tree, _O_ROOT)
    try:
        for group, (nlink, members) in shared.items():
            _settle_group(root_fd, nlink, members, epoch_ns, dir_mtimes, dir_ids, group)
    finally:
        os.close(root_fd)
    return LayerStats(files=files, size=size)


class TreeSettler:
    """:func:`settle_tree` done by the walk that streams the new layer, so a build with no
    parent reads its tree once (see ``layertar.stream_layer(settle=...)``).

    The stream calls it for what needs settling as it meets it: sockets removed, xattrs a layer
    does not keep dropped, mtimes clamped (the stream itself emits the clamped times), a
    symlink, fifo or device with other links given its own inode; a ``.wh.`` name or a 0/0
    device stops the stream. :meth:`refuse`, when the stream failed, raises the refusal of the
    first such entry in layer order, before any other error. :meth:`finish`, once the stream
    is done, settles the hardlink groups (one reaching outside the tree becomes a private copy
    first, which must still be what the stream emitted). The tree ends as :func:`settle_tree`
    leaves it, and the stream emits what a stream of that settled tree would."""

    def __init__(self, *, clamp_mtimes: bool = True) -> None:
        self.epoch_ns = layertar.clamp_epoch() * 1_000_000_000 if clamp_mtimes else 2**63 - 1
        self._groups: dict[tuple[int, int], tuple[int, list[tuple[str, str]]]] = {}
        self._dir_mtimes: dict[str, int] = {}  # what each directory's mtime was made
        #: A group's inode as the stream emitted it: what its private copy must still be.
        self._streamed: dict[tuple[int, int], _Emitted] = {}
        #: Members of a group reaching outside the tree that were its only link inside: the
        #: private copy has one link, so the layer has no group there.
        self.made_single: list[str] = []
        #: Bytes of disk use the settling changed after the stream counted them: a hardlink
        #: group made private is a new inode, allocated as the copy needs, and a directory
        #: that settling's temporary names grew keeps its larger size.
        self.disk_use_change = 0
        self._dir_blocks: dict[str, int] = {}  # each directory's st_blocks when the walk left it
        self._dir_ids: dict[str, _dirfd.Ident] = {}  # each directory the stream read

    def listed(self, dir_fd: int, rel: bytes, name: str, kind: int) -> bool:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if name.startswith(_ocirules.WHITEOUT_PREFIX) or _ocirules.is_whiteout_device(st):
            # Refused: the stream need not read on. Which entry the refusal names is for
            # refuse() to find, over the whole tree.
            _check_name(os.fsdecode(rel), st)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)  # cannot travel in a layer, as in write_layer
            return False
        return True

    def root(self, fd: int) -> None:
        st = os.fstat(fd)
        self._dir_ids[""] = (st.st_dev, st.st_ino)

    @property
    def root_ident(self) -> _dirfd.Ident | None:
        """The device and inode of the root the stream opened (None before it did)."""
        return self._dir_ids.get("")

    def xattrs(self, fd: int, names: list[str]) -> None:
        _drop_unkept(fd, names)

    def special(self, dir_fd: int, rel: bytes, name: str, st: os.stat_result) -> None:
        if _ocirules.is_whiteout_device(st):
            return  # refused when listed
        path = os.fsdecode(rel)
        tmp = f".settle-{os.getpid()}-{st.st_ino}"
        _recreate_special(dir_fd, name, tmp, st, path)
        os.utime(tmp, ns=(st.st_mtime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def linked(self, rel: bytes, st: os.stat_result) -> None:
        seen = self._groups.setdefault((st.st_dev, st.st_ino), (st.st_nlink, []))
        seen[1].append(_split(os.fsdecode(rel)))

    def streamed(
        self, st: os.stat_result, sha256: str, xattrs: Sequence[tuple[bytes, bytes]]
    ) -> None:
        self._streamed[(st.st_dev, st.st_ino)] = _emitted(st, self.epoch_ns, sha256, xattrs)

    def left(self, fd: int, rel: bytes, st: os.stat_result) -> None:
        path = os.fsdecode(rel)
        mtime = self._dir_mtimes[path] = min(st.st_mtime_ns, self.epoch_ns)
        os.utime(fd, ns=(mtime, mtime))
        self._dir_ids[path] = (st.st_dev, st.st_ino)
        # The stream counted the directory as it opened it, before a twin's temporary name.
        blocks = self._dir_blocks[path] = os.fstat(fd).st_blocks
        self.disk_use_change += (blocks - st.st_blocks) * 512

    def refuse(self, tree: Path) -> None:
        """After the stream failed: raise the refusal of the first ``.wh.`` name or 0/0 device
        of ``tree`` in layer order, if it holds one, as :func:`settle_tree` would have before
        the stream read anything (whatever else failed, an unreadable file say)."""
        bad: list[tuple[bool, str, os.stat_result]] = []  # (is a device, path, stat)

        def visit(rel_dir: str, fd: int, _state: None) -> list[tuple[str, _dirfd.Ident, None]]:
            subdirs: list[tuple[str, _dirfd.Ident, None]] = []
            with os.scandir(fd) as it:
                for e in it:
                    if e.name.startswith(_ocirules.WHITEOUT_PREFIX):
                        bad.append((False, _join(rel_dir, e.name), e.stat(follow_symlinks=False)))
                    elif e.is_dir(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        subdirs.append((e.name, (st.st_dev, st.st_ino), None))
                    elif not e.is_file(follow_symlinks=False) and not e.is_symlink():
                        st = e.stat(follow_symlinks=False)
                        if _ocirules.is_whiteout_device(st):
                            bad.append((True, _join(rel_dir, e.name), st))
            return subdirs

        # What cannot be read cannot be named: the stream's own error stands for it.
        with contextlib.suppress(OSError):
            _dirfd.walk(tree, None, visit)
        if bad:
            _is_device, rel, st = min(bad, key=lambda b: (b[0], _sort_key(b[1])))
            _check_name(rel, st)

    def finish(self, tree: Path) -> None:
        """Settle the hardlink groups (the stream has read the whole tree)."""
        if not self._groups:
            return
        root_fd = os.open(tree, _O_ROOT)
        try:
            for key, (nlink, members) in self._groups.items():
                ids = self._dir_ids
                if len(members) >= nlink:
                    _settle_group(
                        root_fd, nlink, members, self.epoch_ns, self._dir_mtimes, ids, key
                    )
                    continue
                # Made private: the stream counted the blocks of the inode outside.
                old = _blocks(root_fd, *members[0], ids)
                _settle_group(
                    root_fd,
                    nlink,
                    members,
                    self.epoch_ns,
                    self._dir_mtimes,
                    ids,
                    key,
                    self._streamed[key],
                )
                if len(members) == 1:
                    self.made_single.append(_join(*members[0]))
                # The copy and its links were made under temporary names in these directories.
                for rel_dir in {d for d, _ in members if d}:
                    blocks = _blocks(root_fd, *_split(rel_dir), ids)
                    self.disk_use_change += (blocks - self._dir_blocks[rel_dir]) * 512
                    self._dir_blocks[rel_dir] = blocks
                self.disk_use_change += (_blocks(root_fd, *members[0], ids) - old) * 512
        finally:
            os.close(root_fd)


#: An inode as a layer holds it: mode, owner, size, clamped mtime (ns), content, kept xattrs.
_Emitted = tuple[int, int, int, int, int, str, tuple[tuple[bytes, bytes], ...]]


def _emitted(
    st: os.stat_result, epoch_ns: int, sha256: str, xattrs: Sequence[tuple[bytes, bytes]]
) -> _Emitted:
    return (
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_size,
        min(st.st_mtime_ns, epoch_ns),
        sha256,
        tuple(xattrs),
    )


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


_O_PATH_DIR_NOFOLLOW = _O_PATH_DIR | os.O_NOFOLLOW


def _tree_dir(root_fd: int, rel_dir: str, ids: Mapping[str, _dirfd.Ident]) -> int:
    """An ``O_PATH`` fd of the directory ``rel_dir`` ("" for the root) of the tree ``root_fd``,
    opened one component at a time, each relative to its parent, with no symlink followed, and
    each the very directory the walk read (``ids``: its device and inode by path). A directory
    swapped since the walk met it (a process the builder left running), for a symlink or for
    another directory moved in, is refused, so nothing but the tree read is settled."""
    fd = os.open(".", _O_PATH_DIR, dir_fd=root_fd)
    path = ""
    try:
        st = os.fstat(fd)
        if ids.get(path) != (st.st_dev, st.st_ino):  # the root, opened again by its path
            os.close(fd)
            fd = -1
            raise _changed(path)
        for part in rel_dir.split("/") if rel_dir else ():
            nxt = os.open(part, _O_PATH_DIR_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            path = _join(path, part)
            st = os.fstat(fd)
            if ids.get(path) != (st.st_dev, st.st_ino):
                os.close(fd)
                fd = -1
                raise _changed(path)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            raise _changed(rel_dir) from exc
        raise
    return fd


def _changed(rel: str) -> InvalidLayerError:
    """The entry ``rel`` ("" for the root) is no longer the one the walk read: something else
    was moved, linked or swapped in under its name since (a process the builder left running)."""
    what = repr(rel) if rel else "the tree's root"
    return InvalidLayerError(
        f"{what} changed while the layer was read (it is no longer the entry that was read); "
        "a stored layer must not change: stop every process the builder started before it "
        "returns",
        path=rel or ".",
    )


def _blocks(root_fd: int, rel_dir: str, name: str, ids: Mapping[str, _dirfd.Ident]) -> int:
    where = _tree_dir(root_fd, rel_dir, ids)
    try:
        return os.stat(name, dir_fd=where, follow_symlinks=False).st_blocks
    finally:
        os.close(where)


def _check_copy(
    where: int, tmp: str, st: os.stat_result, emitted: _Emitted, epoch_ns: int, rel: str
) -> None:
    """Refuse the private copy ``tmp`` (in the directory ``where``) of the inode ``st`` unless
    it is what the stream emitted."""
    fd = os.open(tmp, _O_READ, dir_fd=where)
    try:
        copied = _emitted(st, epoch_ns, _sha256_fd(fd), layertar.kept_xattr_items(_xattrs(fd)))
    finally:
        os.close(fd)
    if copied != emitted:
        raise InvalidLayerError(
            f"{rel!r} changed while the layer was read: it is hardlinked to a file outside the "
            "tree that was written meanwhile, so the layer would not match its digest; nothing "
            "was stored (stop what writes that file, or copy it into the tree instead of "
            "linking it)",
            path=rel,
        )


def _drop_unkept(target: int | str, names: list[str]) -> None:
    for name in names:
        if not _ocirules.layer_keeps_xattr(name) and name.startswith(("user.", "trusted.")):
            # security.* labels are the filesystem's own (a copy gets them too); user.overlay.*
            # and trusted.* would mean something to an overlay mount of the layer.
            if isinstance(target, int):
                os.removexattr(target, name)
            else:
                os.removexattr(target, name, follow_symlinks=False)


def _xattr_names_fd(fd: int) -> list[str]:
    try:
        return os.listxattr(fd)
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:
            return []
        raise


def _drop_unkept_xattrs(path: str) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT):
            return
        raise
    _drop_unkept(path, names)


def _recreate_special(where: int, name: str, tmp: str, st: os.stat_result, rel: str) -> None:
    """Make ``tmp`` in the directory ``where`` a private twin of the symlink, fifo or device
    ``name`` (same target or device number, owner, mode and kept xattrs), as write_layer would
    write it; nothing is left at ``tmp`` if that fails."""
    xattrs = _xattrs(_dirfd.at(where, name))
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=where), tmp, dir_fd=where)
    else:
        # A fifo or a device (which only a user allowed to make one can copy).
        os.mknod(tmp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=where)
    try:
        _finish_special(where, tmp, st, rel, xattrs)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=where)
        raise


def _finish_special(
    where: int, name: str, st: os.stat_result, rel: str, xattrs: Mapping[str, bytes] | None = None
) -> None:
    """Give the symlink, fifo or device just made as ``name`` in the directory ``where`` the
    owner, kept ``xattrs`` and mode of ``st``. It is changed through an ``O_PATH`` fd of what
    is at ``name`` now, checked to be a new entry of its type (one link): a process left
    running may have put a symlink, or a link to a file elsewhere, under that name meanwhile,
    and those are not to be changed."""
    made = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=where)
    try:
        got = os.fstat(made)
        if stat.S_IFMT(got.st_mode) != stat.S_IFMT(st.st_mode) or got.st_nlink != 1:
            raise InvalidLayerError(
                f"{rel!r} changed while the layer was read (the entry written for it was "
                "replaced as it was made); a stored layer must not change",
                path=rel,
            )
        if stat.S_ISLNK(st.st_mode):
            # No mode, and a symlink's owner and xattrs are set by its name alone.
            _chown(where, name, st, rel)
            path = _dirfd.at(where, name)
            for key, value in sorted((xattrs or {}).items()):
                os.setxattr(path, key, value, follow_symlinks=False)
        else:
            _chown(made, "", st, rel)
            for key, value in sorted((xattrs or {}).items()):
                os.setxattr(_proc_fd(made), key, value)
            # After chown, which clears setuid/setgid.
            os.chmod(_proc_fd(made), stat.S_IMODE(st.st_mode))
    finally:
        os.close(made)


def _settle_group(
    root_fd: int,
    nlink: int,
    members: list[tuple[str, str]],
    epoch_ns: int,
    dir_mtimes: dict[str, int],
    dir_ids: Mapping[str, _dirfd.Ident],
    group: _dirfd.Ident,
    emitted: _Emitted | None = None,
) -> None:
    """Settle the hardlink group of the tree's inode ``group`` (device, inode): the xattrs a
    layer does not keep removed, the mtime clamped. One that reaches outside the tree first
    becomes a private copy, linked at every member's place, so the file outside keeps its own.
    ``emitted``: how the layer's stream holds the inode; a private copy that differs (the file
    outside was written meanwhile) is refused, since the layer would not match its digest."""
    first_dir, first_name = members[0]
    first = _join(first_dir, first_name)
    where = _tree_dir(root_fd, first_dir, dir_ids)
    src = -1
    try:
        # The member is opened and known by its inode, the group's: a name a process the
        # builder left running pointed elsewhere since (a link to a file outside) is refused,
        # and everything below acts on that fd or on the private copy, never on a name again.
        try:
            src = os.open(first_name, _O_READ, dir_fd=where)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
                raise _changed(first) from exc
            raise
        st = os.fstat(src)
        if (st.st_dev, st.st_ino) != group or not stat.S_ISREG(st.st_mode):
            raise _changed(first)
        mtime = min(st.st_mtime_ns, epoch_ns)
        if len(members) < nlink:
            tmp = f".settle-{os.getpid()}-{st.st_ino}"
            fd = os.open(tmp, _O_CREATE, 0o600, dir_fd=where)
            try:
                _datacopy.copy_data(src, fd, st.st_size)
                _chown(fd, None, st, first)
                _set_xattrs(fd, _xattrs(src))
                os.chmod(fd, stat.S_IMODE(st.st_mode))
                if emitted is not None:
                    _check_copy(where, tmp, st, emitted, epoch_ns, first)
                # Only kept xattrs were copied: the copy is settled but for its time.
                os.utime(fd, ns=(mtime, mtime))
            except BaseException:
                os.close(fd)
                fd = -1
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=where)
                raise
            finally:
                if fd >= 0:
                    os.close(fd)
            os.rename(tmp, first_name, src_dir_fd=where, dst_dir_fd=where)
        else:
            # The inode is the tree's own (every link inside, each still this inode): its
            # xattrs may go.
            for rel_dir, name in members[1:]:
                other = _tree_dir(root_fd, rel_dir, dir_ids)
                try:
                    now = os.stat(name, dir_fd=other, follow_symlinks=False)
                finally:
                    os.close(other)
                if (now.st_dev, now.st_ino) != group:
                    raise _changed(_join(rel_dir, name))
            _drop_unkept(src, _xattr_names_fd(src))
            os.utime(src, ns=(mtime, mtime))
            return
        for rel_dir, name in members[1:]:
            other = _tree_dir(root_fd, rel_dir, dir_ids)
            try:
                tmp = f".settle-{os.getpid()}-link"
                os.link(first_name, tmp, src_dir_fd=where, dst_dir_fd=other, follow_symlinks=False)
                os.rename(tmp, name, src_dir_fd=other, dst_dir_fd=other)
            finally:
                os.close(other)
        # The renames restamped the members' directories: give them their settled times back.
        for rel_dir in {d for d, _ in members}:
            if rel_dir:
                parent, name = _split(rel_dir)
                pfd = _tree_dir(root_fd, parent, dir_ids)
                try:
                    mt = dir_mtimes[rel_dir]
                    os.utime(name, ns=(mt, mt), dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(pfd)
    finally:
        if src >= 0:
            os.close(src)
        os.close(where)
