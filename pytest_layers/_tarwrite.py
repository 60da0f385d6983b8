"""Writing a layer's canonical tar: the walk of a stored layer directory in component
order through directory fds (any depth), the entries' bytes into sha256 and a sink,
the visitor the store indexes a new layer with, the small files a writer hands over
(:class:`Written`); ``diff_id``, ``chain_id``, the mtime clamp."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from pytest_layers import _dirfd, _ocirules
from pytest_layers._ocirules import Flavor
from pytest_layers._tarheader import (
    _BLOCK,
    _PADS,
    _entry_bytes,
)
from pytest_layers.errors import InvalidLayerError

#: 1980-01-01T00:00:00Z: the clamp used when SOURCE_DATE_EPOCH is unset (the ZIP epoch, which
#: reproducible-build tools use as their floor).
DEFAULT_EPOCH: int = 315532800
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_FLUSH_AT = 1 << 20
_EMPTY_SHA = hashlib.sha256(b"").hexdigest()


# What a stored (lower) layer dir may carry to say a directory is opaque.
_OPAQUE_XATTRS = _ocirules.OPAQUE_XATTRS["overlay"]
_keep_xattr = _ocirules.layer_keeps_xattr


def clamp_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` when set (a non-negative integer), else ``DEFAULT_EPOCH``."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value.strip() == "":
        return DEFAULT_EPOCH
    text = value.strip()
    if not text.isdigit():
        raise ValueError(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds since 1970-01-01 UTC; "
            "set it to an integer such as $(git log -1 --format=%ct) or unset it"
        )
    return int(text)


def _source_date_epoch() -> int | None:
    # The canonical tar clamps only when the user asked for it; stored trees are already
    # clamped to clamp_epoch() by changeset.write_layer, so clamping again would be a no-op.
    if os.environ.get("SOURCE_DATE_EPOCH", "").strip() == "":
        return None
    return clamp_epoch()


class _Sink:
    """Collects small pieces and hands them to the consumers in large chunks."""

    def __init__(self, consumers: Sequence[Callable[[bytes | memoryview], object]]) -> None:
        self._consumers = consumers
        self._buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= _FLUSH_AT:
            self.flush()

    def add_large(self, data: bytes | memoryview) -> None:
        self.flush()
        for consume in self._consumers:
            consume(data)
        self.total += len(data)

    def flush(self) -> None:
        if self._buf:
            with memoryview(self._buf) as view:
                for consume in self._consumers:
                    consume(view)
            self.total += len(self._buf)
            self._buf.clear()


_check_flavor = _ocirules.check_flavor


@dataclass
class _Child:
    tarname: bytes  # the component as it appears in the tar (".wh.NAME" for a whiteout)
    name: str  # the on-disk name in its directory (surrogateescape str, as os.scandir(fd) gives)
    kind: int  # stat.S_IFMT of the entry
    whiteout: bool


_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never waits on a fifo
_O_READDIR = _dirfd.O_DIR


def _kind(entry: os.DirEntry[str]) -> int:
    # d_type answers without a syscall on every filesystem we target; stat only the rest.
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_symlink():
        return stat.S_IFLNK
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


def _children(dir_fd: int, dir_path: bytes, flavor: str) -> list[_Child]:
    out = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = entry.name
            kind = _kind(entry)
            if kind == stat.S_IFSOCK:
                continue
            raw = os.fsencode(name)
            if flavor == "overlay":
                if raw.startswith(_ocirules.WHITEOUT_PREFIX_B):
                    raise InvalidLayerError(
                        f"{os.fsdecode(dir_path + b'/' + raw)!r}: a name starting with '.wh.' "
                        "means a whiteout in an OCI layer, so such names cannot be committed; "
                        "rename it"
                    )
                is_wh = kind == stat.S_IFCHR and entry.stat(follow_symlinks=False).st_rdev == 0
                tarname = _ocirules.WHITEOUT_PREFIX_B + raw if is_wh else raw
                out.append(_Child(tarname, name, kind, is_wh))
            else:
                is_wh = raw.startswith(_ocirules.WHITEOUT_PREFIX_B)
                if is_wh:
                    shown = os.fsdecode(dir_path + b"/" + raw)
                    target = raw[4:]
                    if target in (b"", b".", b"..") or (
                        target.startswith(_ocirules.WHITEOUT_PREFIX_B)
                        and raw != _ocirules.OPAQUE_MARKER_B
                    ):
                        raise InvalidLayerError(f"{shown!r}: not a valid whiteout name")
                    if kind != stat.S_IFREG:
                        raise InvalidLayerError(
                            f"{shown!r}: a whiteout marker must be a regular file"
                        )
                out.append(_Child(raw, name, kind, is_wh))
    out.sort(key=lambda c: c.tarname)
    return out


def _settle_children(dir_fd: int, prefix: bytes, settle: Settle) -> list[_Child]:
    # A tree being settled holds no whiteouts: every name is its own; what settling refuses
    # or removes (a ".wh." name, a 0/0 device, a socket) goes to the settler as it is met.
    out = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = entry.name
            kind = _kind(entry)
            raw = os.fsencode(name)
            if (
                kind == stat.S_IFSOCK
                or kind == stat.S_IFCHR
                or raw.startswith(_ocirules.WHITEOUT_PREFIX_B)
            ) and not settle.listed(dir_fd, prefix + raw, name, kind):
                continue
            out.append(_Child(raw, name, kind, False))
    out.sort(key=lambda c: c.tarname)
    return out


def _xattrs_of(target: int | bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The kept xattrs of an fd or a path (not followed), and whether it is overlay-opaque."""
    try:
        if isinstance(target, int):
            names = os.listxattr(target)
        else:
            names = os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return [], False
        raise
    if not names:
        return [], False
    kept = []
    opaque = False
    for name in sorted(names):
        if name in _OPAQUE_XATTRS:
            opaque = opaque or _getxattr(target, name) == b"y"
        elif _keep_xattr(name):
            kept.append((os.fsencode(name), _getxattr(target, name)))
    return kept, opaque


def _getxattr(target: int | bytes, name: str) -> bytes:
    if isinstance(target, int):
        return os.getxattr(target, name)
    return os.getxattr(target, name, follow_symlinks=False)


def _read_exact(fd: int, path: bytes, size: int) -> bytes:
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            _changed(path, size)
        data += more
    return data


def _emit_large(
    sink: _Sink, fd: int, path: bytes, size: int, st: os.stat_result, also: _Update | None
) -> None:
    sink.flush()
    if st.st_blocks * 512 < size:
        _emit_sparse(sink, fd, path, size, also)
    else:
        _emit_range(sink, fd, path, 0, size, also)
    sink.add(_PADS[-size % _BLOCK])


def _changed(path: bytes, size: int) -> None:
    raise InvalidLayerError(
        f"{os.fsdecode(path)!r} changed size while it was read (expected {size} bytes); a "
        "stored layer must not change: run `pytest-layers verify` and rebuild the layer"
    )


def _emit_range(
    sink: _Sink, fd: int, path: bytes, start: int, end: int, also: _Update | None = None
) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    pos = start
    os.lseek(fd, start, os.SEEK_SET)
    while pos < end:
        n = os.readv(fd, [view[: min(_CHUNK, end - pos)]])
        if n == 0:
            _changed(path, end)
        data = bytes(view[:n])
        sink.add_large(data)
        if also is not None:
            also(data)
        pos += n


def _emit_zeros(sink: _Sink, count: int, also: _Update | None = None) -> None:
    zeros = memoryview(_ZEROS)
    while count > 0:
        n = min(count, _CHUNK)
        sink.add_large(zeros[:n])
        if also is not None:
            also(zeros[:n])
        count -= n


def _emit_sparse(sink: _Sink, fd: int, path: bytes, size: int, also: _Update | None = None) -> None:
    # Holes read as zeros; feeding a shared zero buffer instead of read()ing them saves the
    # kernel's memset and copy, which dominates for a mostly-empty multi-GiB file.
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no data after pos, the rest is a hole
                raise
            data = size
        data = min(data, size)
        _emit_zeros(sink, data - pos, also)
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        _emit_range(sink, fd, path, data, hole, also)
        pos = hole


#: What a walk learnt of a regular file while it read it: ``rel path -> (inode, size,
#: mtime_ns, sha256 hex)``, so the store's per-file manifest need not open it again.
FileHashes = dict[str, tuple[int, int, int, str]]
_Update = Callable[[bytes | memoryview], object]


@dataclass(frozen=True)
class Written:
    """A small regular file a writer has just put into a staged layer, as it left it: inode,
    mtime and ctime after its last change, its bytes and its kept xattrs (sorted, as
    :func:`stream_layer` lists them). The stream takes the file from here instead of opening
    and reading it again when a ``stat`` finds it unchanged (same inode, size, mtime and ctime:
    any write, chmod, chown or xattr change moves the ctime)."""

    ino: int
    mtime_ns: int
    ctime_ns: int
    data: bytes
    xattrs: tuple[tuple[bytes, bytes], ...]

    def matches(self, st: os.stat_result) -> bool:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_ino == self.ino
            and st.st_size == len(self.data)
            and st.st_mtime_ns == self.mtime_ns
            and st.st_ctime_ns == self.ctime_ns
        )


#: Tar path (the on-disk spelling, bytes) -> what the writer of a staged layer wrote there.
WrittenFiles = dict[bytes, Written]


#: How many bytes of file content a writer may keep in a :data:`WrittenFiles` for the stream.
WRITTEN_BUDGET = 64 << 20


def kept_xattr_items(xattrs: dict[str, bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """``xattrs`` (name -> value) as :func:`stream_layer` writes them: kept names only, sorted
    by name, encoded."""
    return tuple((os.fsencode(k), xattrs[k]) for k in sorted(xattrs) if _keep_xattr(k))


#: Called by :func:`stream_layer` for every entry of the layer directory, in tar order, with
#: what the tar was made of: the entry's path relative to the layer (on-disk spelling, bytes),
#: its ``lstat``, the sha256 hex of a regular file's content (``None`` for anything else), the
#: kept xattrs (sorted, as written to the tar) and a symlink's target (``None`` otherwise).
#: Whiteouts are visited too, with their own ``lstat``.
Visitor = Callable[
    [bytes, os.stat_result, "str | None", Sequence[tuple[bytes, bytes]], "bytes | None"], None
]


class Settle(Protocol):
    """What :func:`stream_layer` asks of a settler while it streams a tree that becomes a layer
    where it lies (``changeset.TreeSettler``): the stream emits every entry as settling leaves
    it (mtimes no later than :attr:`epoch_ns`, only kept xattrs, no sockets, no shared special
    files), and the settler makes the tree so as the walk passes."""

    #: mtimes later than this (ns) become it, in the tree and in the stream.
    epoch_ns: int

    def listed(self, dir_fd: int, rel: bytes, name: str, kind: int) -> bool:
        """A socket, a character device or a ``.wh.`` name met in a directory listing: raises
        if settling refuses it; False when it leaves the tree (a socket)."""
        ...

    def root(self, fd: int) -> None:
        """The walk opened the tree's root as ``fd``: what settling after the walk must find
        there again."""
        ...

    def xattrs(self, fd: int, names: list[str]) -> None:
        """The open file or directory ``fd`` (not in a hardlink group) has the xattrs ``names``:
        drop those a layer does not keep."""
        ...

    def special(self, dir_fd: int, rel: bytes, name: str, st: os.stat_result) -> None:
        """A symlink, fifo or device with other links: give it an inode of its own."""
        ...

    def linked(self, rel: bytes, st: os.stat_result) -> None:
        """A member of a hardlink group of regular files (settled once all are known)."""
        ...

    def streamed(
        self, st: os.stat_result, sha256: str, xattrs: Sequence[tuple[bytes, bytes]]
    ) -> None:
        """The stream emitted a hardlink group's inode (at its first link met) as ``st`` with
        the content digest ``sha256`` and the kept ``xattrs``."""
        ...

    def left(self, fd: int, rel: bytes, st: os.stat_result) -> None:
        """The walk is done with the directory ``fd`` (``st`` as it was met): settle its time."""
        ...


def _walk(
    sink: _Sink,
    root: bytes,
    flavor: str,
    epoch: int | None,
    hashes: FileHashes | None = None,
    visit: Visitor | None = None,
    written: WrittenFiles | None = None,
    settle: Settle | None = None,
) -> None:
    links: dict[tuple[int, int], bytes] = {}
    shas: dict[tuple[int, int], str] = {}  # first link of a group's content digest (for visit)
    # A tree settled as it streams: its mtimes as settling leaves them (never later than this).
    settle_ns = settle.epoch_ns if settle is not None else None
    # Every entry is opened relative to its directory's fd: one path component per lookup, and
    # the fd of a regular file gives its stat and xattrs without more path walks.
    # Depth-first over sorted children gives "sorted by path components, parents first".
    # Frames: (prefix, dir path, children, the directory's stat); the directories' fds are in
    # `dirs`, which keeps only the deepest few open (a test's committed rw layer may nest deeper
    # than PATH_MAX and than RLIMIT_NOFILE allows).
    dirs = _dirfd.DirStack(os.open(root, _O_READDIR))
    stack: list[tuple[bytes, bytes, Iterator[_Child], os.stat_result | None]] = []
    try:
        if settle is None:
            top = _children(dirs.top, root, flavor)
        else:
            settle.root(dirs.top)
            top = _settle_children(dirs.top, b"", settle)
        stack.append((b"", root, iter(top), None))
        while stack:
            prefix, dpath, it, dst = stack[-1]
            dfd = dirs.top
            child = next(it, None)
            if child is None:
                stack.pop()
                if stack:
                    if settle is not None and dst is not None:
                        settle.left(dfd, prefix[:-1], dst)
                    os.close(dirs.pop())
                continue
            name = prefix + child.tarname
            if child.whiteout:
                sink.add(_entry_bytes(name, 0o600, 0, 0, 0, 0, b"0"))
                if visit is not None and child.name:  # not the marker made for an opaque dir
                    wst = os.stat(child.name, dir_fd=dfd, follow_symlinks=False)
                    marker = stat.S_ISREG(wst.st_mode)  # a .wh.NAME file, else a 0/0 device
                    visit(
                        prefix + os.fsencode(child.name),
                        wst,
                        _content_sha(dfd, child.name, wst.st_size) if marker else None,
                        (),
                        None,
                    )
                continue
            kind = child.kind
            fd = -1
            known = written.get(name) if written is not None and kind == stat.S_IFREG else None
            try:
                if kind == stat.S_IFREG and written is None:
                    fd = os.open(child.name, _O_READ, dir_fd=dfd)
                    st = os.fstat(fd)
                    if (
                        st.st_nlink == 1
                        and st.st_size <= _FLUSH_AT
                        and st.st_mode & 0o170000 == stat.S_IFREG
                        and not _xattr_names(fd)
                    ):
                        # Most files of a layer: small, one link, no xattrs. What the general
                        # path below does for them, with the fewest calls.
                        if settle_ns is not None and st.st_mtime_ns > settle_ns:
                            os.utime(fd, ns=(settle_ns, settle_ns))
                            mtime = settle_ns // 1_000_000_000
                        else:
                            mtime = st.st_mtime_ns // 1_000_000_000
                        if epoch is not None and mtime > epoch:
                            mtime = epoch
                        size = st.st_size
                        head = _entry_bytes(
                            name, st.st_mode & 0o7777, st.st_uid, st.st_gid, size, mtime, b"0"
                        )
                        if size:
                            data = _read_exact(fd, dpath + b"/" + child.tarname, size)
                            sink.add(head + data + _PADS[-size % _BLOCK])
                            if hashes is None and visit is None:
                                continue
                            digest = hashlib.sha256(data).hexdigest()
                        else:
                            sink.add(head)
                            digest = _EMPTY_SHA
                        if hashes is not None:
                            hashes[os.fsdecode(name)] = (st.st_ino, size, st.st_mtime_ns, digest)
                        if visit is not None:
                            visit(name, st, digest, (), None)
                        continue
                if known is not None:
                    st = os.stat(child.name, dir_fd=dfd, follow_symlinks=False)
                    # A cached file is emitted from memory in one piece: never one that the
                    # large-file path (which reads through ``fd``) would take.
                    if not known.matches(st) or st.st_size > _FLUSH_AT:
                        known = None
                if known is not None:
                    xattrs, opaque = list(known.xattrs), False
                elif kind == stat.S_IFREG or kind == stat.S_IFDIR:
                    if fd < 0:  # else opened above, and not a file for the short way
                        fd = os.open(
                            child.name, _O_READ if kind == stat.S_IFREG else _O_READDIR, dir_fd=dfd
                        )
                        st = os.fstat(fd)
                    if settle is not None and (kind == stat.S_IFDIR or st.st_nlink == 1):
                        # A hardlink group's inode may reach outside the tree: its xattrs are
                        # the settler's to drop once the whole group is known.
                        names = _xattr_names(fd)
                        if names:
                            settle.xattrs(fd, names)
                            xattrs, opaque = _xattrs_of(fd)
                        else:
                            xattrs, opaque = [], False
                    else:
                        xattrs, opaque = _xattrs_of(fd)
                else:
                    st = os.stat(child.name, dir_fd=dfd, follow_symlinks=False)
                    if settle is not None and st.st_nlink > 1 and stat.S_IFMT(st.st_mode) == kind:
                        settle.special(dfd, name, child.name, st)
                        st = os.stat(child.name, dir_fd=dfd, follow_symlinks=False)
                    full = dpath + b"/" + child.tarname
                    if not _dirfd.fits(full):
                        full = os.fsencode(_dirfd.at(dfd, child.name))
                    xattrs, opaque = _xattrs_of(full)
                if stat.S_IFMT(st.st_mode) != kind:
                    raise InvalidLayerError(
                        f"{os.fsdecode(dpath + b'/' + child.tarname)!r} changed type while it "
                        "was read; a stored layer must not change"
                    )
                if settle_ns is not None and st.st_mtime_ns > settle_ns:
                    mtime = settle_ns // 1_000_000_000
                    if kind == stat.S_IFREG and st.st_nlink > 1:
                        pass  # the group's time is set with the group
                    elif fd >= 0 and kind == stat.S_IFREG:
                        os.utime(fd, ns=(settle_ns, settle_ns))
                    elif kind != stat.S_IFDIR:  # a directory's, when the walk leaves it
                        os.utime(
                            child.name, ns=(settle_ns, settle_ns), dir_fd=dfd, follow_symlinks=False
                        )
                else:
                    mtime = st.st_mtime_ns // 1_000_000_000
                if epoch is not None and mtime > epoch:
                    mtime = epoch
                mode = stat.S_IMODE(st.st_mode)
                uid, gid = st.st_uid, st.st_gid
                if kind == stat.S_IFDIR:
                    sink.add(_entry_bytes(name, mode, uid, gid, 0, mtime, b"5", xattrs=xattrs))
                    if visit is not None:
                        visit(name, st, None, xattrs, None)
                    sub_path = dpath + b"/" + child.tarname
                    if settle is None:
                        sub = _children(fd, sub_path, flavor)
                    else:
                        sub = _settle_children(fd, name + b"/", settle)
                    if opaque:
                        sub.append(_Child(_ocirules.OPAQUE_MARKER_B, "", stat.S_IFREG, True))
                        sub.sort(key=lambda c: c.tarname)
                    dirs.push(fd, (st.st_dev, st.st_ino))
                    fd = -1  # now owned by `dirs`
                    stack.append((name + b"/", sub_path, iter(sub), st))
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if settle is not None and kind == stat.S_IFREG:
                        settle.linked(name, st)
                    first = links.get(key)
                    if first is not None:
                        sink.add(
                            _entry_bytes(name, mode, uid, gid, 0, mtime, b"1", first, xattrs=xattrs)
                        )
                        if visit is not None:
                            link_target = None
                            if kind == stat.S_IFLNK:
                                link_target = os.fsencode(os.readlink(child.name, dir_fd=dfd))
                            visit(name, st, shas.get(key), xattrs, link_target)
                        continue
                    links[key] = name
                if kind == stat.S_IFREG:
                    size = st.st_size
                    head = _entry_bytes(name, mode, uid, gid, size, mtime, b"0", xattrs=xattrs)
                    digest = _EMPTY_SHA
                    if size > _FLUSH_AT:
                        sink.add(head)
                        grouped = settle is not None and st.st_nlink > 1
                        file_hash = hashlib.sha256() if visit is not None or grouped else None
                        _emit_large(
                            sink,
                            fd,
                            dpath + b"/" + child.tarname,
                            size,
                            st,
                            None if file_hash is None else file_hash.update,
                        )
                        if file_hash is not None:
                            digest = file_hash.hexdigest()
                    elif size:
                        if known is not None:
                            data = known.data
                        else:
                            data = _read_exact(fd, dpath + b"/" + child.tarname, size)
                        sink.add(head + data + _PADS[-size % _BLOCK])
                        if hashes is not None or visit is not None or settle is not None:
                            digest = hashlib.sha256(data).hexdigest()
                        if hashes is not None:
                            hashes[os.fsdecode(name)] = (st.st_ino, size, st.st_mtime_ns, digest)
                    else:
                        sink.add(head)
                        if hashes is not None:
                            hashes[os.fsdecode(name)] = (st.st_ino, 0, st.st_mtime_ns, _EMPTY_SHA)
                    if settle is not None and st.st_nlink > 1:
                        settle.streamed(st, digest, xattrs)
                    if visit is not None:
                        if st.st_nlink > 1:
                            shas[(st.st_dev, st.st_ino)] = digest
                        visit(name, st, digest, xattrs, None)
                    continue
                if kind == stat.S_IFLNK:
                    target = os.fsencode(os.readlink(child.name, dir_fd=dfd))
                    sink.add(
                        _entry_bytes(name, mode, uid, gid, 0, mtime, b"2", target, xattrs=xattrs)
                    )
                    if visit is not None:
                        visit(name, st, None, xattrs, target)
                    continue
                elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                    dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                    flag = b"3" if kind == stat.S_IFCHR else b"4"
                    sink.add(
                        _entry_bytes(name, mode, uid, gid, 0, mtime, flag, dev=dev, xattrs=xattrs)
                    )
                elif kind == stat.S_IFIFO:
                    sink.add(_entry_bytes(name, mode, uid, gid, 0, mtime, b"6", xattrs=xattrs))
                else:
                    raise InvalidLayerError(
                        f"{os.fsdecode(dpath + b'/' + child.tarname)!r}: unsupported file type "
                        f"{oct(kind)} in a layer"
                    )
                if visit is not None:
                    visit(name, st, None, xattrs, None)
            finally:
                if fd >= 0:
                    os.close(fd)
    finally:
        dirs.close()
    sink.add(b"\0" * (2 * _BLOCK))
    sink.flush()


def _xattr_names(fd: int) -> list[str]:
    try:
        return os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def _content_sha(dir_fd: int, name: str, size: int) -> str:
    # A whiteout marker's content is not in the tar (a whiteout is an empty entry there); it is
    # still what the store's index records of the file, and it is empty but for a tampered one.
    if size == 0:
        return _EMPTY_SHA
    h = hashlib.sha256()
    fd = os.open(name, _O_READ, dir_fd=dir_fd)
    try:
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _stream(
    layer_dir: Path,
    flavor: Flavor,
    consumers: Sequence[Callable[[bytes | memoryview], object]],
    hashes: FileHashes | None = None,
    visit: Visitor | None = None,
    written: WrittenFiles | None = None,
    settle: Settle | None = None,
) -> str:
    _check_flavor(flavor)
    root = os.fsencode(layer_dir)
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "layer directory does not exist", str(layer_dir))
    hasher = hashlib.sha256()
    sink = _Sink([hasher.update, *consumers])
    _walk(sink, root, flavor, _source_date_epoch(), hashes, visit, written, settle)
    return "sha256:" + hasher.hexdigest()


def write_layer_tar(layer_dir: Path, out: BinaryIO, *, flavor: Flavor) -> str:
    """Write the canonical tar of the stored layer directory ``layer_dir`` to ``out``.

    Returns ``"sha256:<hex>"`` of the bytes written (the layer's diff_id). Whiteouts are read in
    ``flavor`` and always written in the OCI spelling (``.wh.NAME`` empty files).
    """
    return _stream(layer_dir, flavor, [out.write])


def layer_diff_id(layer_dir: Path, *, flavor: Flavor, hashes: FileHashes | None = None) -> str:
    """The diff_id of ``layer_dir``: the canonical tar streamed into sha256, nothing stored.

    With ``hashes``, the sha256 of every regular file of up to a MiB read on the way is put
    there (see :data:`FileHashes`): the store's manifest reuses them instead of reading every
    file a second time."""
    return _stream(layer_dir, flavor, [], hashes)


def stream_layer(
    layer_dir: Path,
    *,
    flavor: Flavor,
    visit: Visitor,
    out: Callable[[bytes | memoryview], object] | None = None,
    written: WrittenFiles | None = None,
    settle: Settle | None = None,
) -> str:
    """One pass over ``layer_dir``: its canonical tar into sha256 (and ``out``, when given),
    and every entry handed to ``visit`` with what the tar was made of (see :data:`Visitor`).

    Returns the diff_id. This is how the store reads a new layer once to name it and index it;
    :func:`layer_diff_id` is the same stream without the visitor. ``written``: what the writer
    of a staged ``layer_dir`` kept of the small files it wrote (see :class:`Written`); such a
    file, found unchanged, is not opened again. ``settle``: ``layer_dir`` is a tree that becomes
    the layer where it lies, settled by this same walk (see :class:`Settle`); the stream and
    ``visit`` see it as settled, and the settler's ``finish`` completes it afterwards."""
    return _stream(layer_dir, flavor, [] if out is None else [out], None, visit, written, settle)


def chain_id(diff_ids: Sequence[str]) -> str:
    """OCI ChainID of a list of diff_ids, bottom layer first."""
    if not diff_ids:
        raise ValueError("chain_id of an empty layer list is undefined; pass at least one diff_id")
    return chain_ids(diff_ids)[-1]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The ChainID of every prefix of ``diff_ids``, bottom first: ``[C(L0), C(L0, L1), ...]``."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not diff_id.startswith("sha256:") or len(diff_id) != 71:
            raise ValueError(f"{diff_id!r} is not a diff_id; expected 'sha256:' and 64 hex digits")
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out
