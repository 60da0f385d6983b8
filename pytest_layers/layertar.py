"""The canonical tar stream of a layer, its digests, and safe application of OCI layer tars.

Writing (``write_layer_tar``, ``layer_diff_id``) walks a stored layer directory and produces the
canonical OCI changeset tar (docs/concepts) as a stream: headers are built here rather than
with ``tarfile.TarInfo.tobuf`` (several times faster, and independent of the running Python's
``tarfile`` version, so the same tree hashes the same everywhere); the bytes are what
``tarfile`` 3.11 would write for the same ``TarInfo`` objects in ``PAX_FORMAT``, except that
directory names carry no trailing slash, non-UTF-8 values go without a ``hdrcharset=BINARY``
record (see ``_entry_bytes``), and the archive ends after the two zero blocks, without padding
to a 10 KiB record (as Go's ``archive/tar``, which docker and umoci use, does).

Applying (``apply_layer_tar``) parses with ``tarfile`` but never extracts with it: every path
is resolved here, one component at a time from an ``O_PATH`` descriptor of the root, so that no
symlink is ever followed by the kernel. Absolute symlinks resolve relative to the root (as in a
chroot); a ``..`` that would climb above the root is refused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from pytest_layers import _chroot, _dirfd, _ocirules
from pytest_layers.errors import InvalidLayerError, UnsafeEntryError

__all__ = [
    "Flavor",
    "DEFAULT_EPOCH",
    "clamp_epoch",
    "write_layer_tar",
    "layer_diff_id",
    "chain_id",
    "chain_ids",
    "apply_layer_tar",
    "ApplyStats",
    "Limits",
    "NeedsLowerLayers",
    "FileHashes",
    "Visitor",
    "stream_layer",
]

Flavor = _ocirules.Flavor

#: 1980-01-01T00:00:00Z: the clamp used when SOURCE_DATE_EPOCH is unset (the ZIP epoch, which
#: reproducible-build tools use as their floor).
DEFAULT_EPOCH: int = 315532800

WHITEOUT_PREFIX = _ocirules.WHITEOUT_PREFIX
OPAQUE_MARKER = _ocirules.OPAQUE_MARKER

_BLOCK = 512
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


# ---------------------------------------------------------------------------------------------
# Header construction
# ---------------------------------------------------------------------------------------------

_MAGIC = b"ustar\x0000"
_EMPTY_DEV = b"\0" * 16
_EMPTY_NAME = b"\0" * 100
_PADS = [b"\0" * n for n in range(_BLOCK)]


def _ustar_text(raw: bytes, width: int) -> bytes:
    # tarfile writes the ustar field of a PAX entry as ASCII with "?" for anything else, and
    # truncates; the PAX record carries the real bytes.
    if len(raw) < width and raw.isascii():
        return raw.ljust(width, b"\0")
    if not raw.isascii():
        raw = os.fsdecode(raw).encode("ascii", "replace")
    return raw[:width].ljust(width, b"\0")


# One bytes-format for the whole ustar block: a single C-level operation per header is what keeps
# the digest close to GNU tar's speed.
_USTAR = (
    b"%s%07o\0%07o\0%07o\0%011o\0%011o\0        %s%s" + _MAGIC + b"\0" * 64 + b"%s" + b"\0" * 167
)


def _header(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    dev: tuple[int, int] | None = None,
) -> bytes:
    devfields = _EMPTY_DEV if dev is None else b"%07o\0%07o\0" % dev
    buf = _USTAR % (
        _ustar_text(name, 100),
        mode & 0o7777,
        uid,
        gid,
        size,
        mtime,
        typeflag,
        _ustar_text(linkname, 100) if linkname else _EMPTY_NAME,
        devfields,
    )
    # Every byte is ASCII, so the sum stays below 65521 and adler32's low half is 1 + sum: the
    # checksum without a Python loop over 512 bytes.
    chksum = (zlib.adler32(buf) & 0xFFFF) - 1
    return b"%s%06o\0 %s" % (buf[:148], chksum, buf[156:])


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    length = len(keyword) + len(value) + 3
    n = p = 0
    while True:
        n = length + len(str(p))
        if n == p:
            break
        p = n
    return b"%d %s=%s\n" % (p, keyword, value)


def _entry_bytes(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    dev: tuple[int, int] | None = None,
    xattrs: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """The header block(s) of one entry: a PAX ``x`` header when needed, then ustar."""
    records: list[tuple[bytes, bytes]] = [(b"SCHILY.xattr." + k, v) for k, v in xattrs]
    if not name.isascii() or len(name) > 100:
        records.append((b"path", name))
    if not linkname.isascii() or len(linkname) > 100:
        records.append((b"linkpath", linkname))
    if not 0 <= uid < 8**7:
        records.append((b"uid", b"%d" % uid))
        uid = 0
    if not 0 <= gid < 8**7:
        records.append((b"gid", b"%d" % gid))
        gid = 0
    if not 0 <= size < 8**11:
        records.append((b"size", b"%d" % size))
        size = 0
    if not 0 <= mtime < 8**11:
        records.append((b"mtime", b"%d" % mtime))
        mtime = 0
    main = _header(name, mode, uid, gid, size, mtime, typeflag, linkname, dev)
    if not records:
        return main
    # Values are the raw bytes (non-UTF-8 names and binary xattr values included). No
    # "hdrcharset=BINARY" record: GNU tar 1.34 warns about it on every entry, and the readers
    # that matter keep undecodable bytes as they are anyway (Python's tarfile falls back to
    # surrogateescape, GNU tar and Go's archive/tar keep raw bytes).
    payload = b"".join(_pax_record(k, v) for k, v in records)
    pad = -len(payload) % _BLOCK
    return _header(b"././@PaxHeader", 0, 0, 0, len(payload), 0, b"x") + payload + b"\0" * pad + main


# ---------------------------------------------------------------------------------------------
# Writing the canonical tar
# ---------------------------------------------------------------------------------------------


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


_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
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


def _walk(
    sink: _Sink,
    root: bytes,
    flavor: str,
    epoch: int | None,
    hashes: FileHashes | None = None,
    visit: Visitor | None = None,
    written: WrittenFiles | None = None,
) -> None:
    links: dict[tuple[int, int], bytes] = {}
    shas: dict[tuple[int, int], str] = {}  # first link of a group's content digest (for visit)
    # Every entry is opened relative to its directory's fd: one path component per lookup, and
    # the fd of a regular file gives its stat and xattrs without more path walks.
    # Depth-first over sorted children gives "sorted by path components, parents first".
    # Frames: (prefix, dir path, children); the directories' fds are in `dirs`, which keeps
    # only the deepest few open (a test's committed rw layer may nest deeper than PATH_MAX and
    # than RLIMIT_NOFILE allows).
    dirs = _dirfd.DirStack(os.open(root, _O_READDIR))
    stack: list[tuple[bytes, bytes, Iterator[_Child]]] = []
    try:
        stack.append((b"", root, iter(_children(dirs.top, root, flavor))))
        while stack:
            prefix, dpath, it = stack[-1]
            dfd = dirs.top
            child = next(it, None)
            if child is None:
                stack.pop()
                if stack:
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
                if known is not None:
                    st = os.stat(child.name, dir_fd=dfd, follow_symlinks=False)
                    if not known.matches(st):
                        known = None
                if known is not None:
                    xattrs, opaque = list(known.xattrs), False
                elif kind == stat.S_IFREG or kind == stat.S_IFDIR:
                    fd = os.open(
                        child.name, _O_READ if kind == stat.S_IFREG else _O_READDIR, dir_fd=dfd
                    )
                    st = os.fstat(fd)
                    xattrs, opaque = _xattrs_of(fd)
                else:
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
                    sub = _children(fd, sub_path, flavor)
                    if opaque:
                        sub.append(_Child(_ocirules.OPAQUE_MARKER_B, "", stat.S_IFREG, True))
                        sub.sort(key=lambda c: c.tarname)
                    dirs.push(fd, (st.st_dev, st.st_ino))
                    fd = -1  # now owned by `dirs`
                    stack.append((name + b"/", sub_path, iter(sub)))
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
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
                        file_hash = hashlib.sha256() if visit is not None else None
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
                        if hashes is not None or visit is not None:
                            digest = hashlib.sha256(data).hexdigest()
                        if hashes is not None:
                            hashes[os.fsdecode(name)] = (st.st_ino, size, st.st_mtime_ns, digest)
                    else:
                        sink.add(head)
                        if hashes is not None:
                            hashes[os.fsdecode(name)] = (st.st_ino, 0, st.st_mtime_ns, _EMPTY_SHA)
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
) -> str:
    _check_flavor(flavor)
    root = os.fsencode(layer_dir)
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "layer directory does not exist", str(layer_dir))
    hasher = hashlib.sha256()
    sink = _Sink([hasher.update, *consumers])
    _walk(sink, root, flavor, _source_date_epoch(), hashes, visit, written)
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
) -> str:
    """One pass over ``layer_dir``: its canonical tar into sha256 (and ``out``, when given),
    and every entry handed to ``visit`` with what the tar was made of (see :data:`Visitor`).

    Returns the diff_id. This is how the store reads a new layer once to name it and index it;
    :func:`layer_diff_id` is the same stream without the visitor. ``written``: what the writer
    of a staged ``layer_dir`` kept of the small files it wrote (see :class:`Written`); such a
    file, found unchanged, is not opened again."""
    return _stream(layer_dir, flavor, [] if out is None else [out], None, visit, written)


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


# ---------------------------------------------------------------------------------------------
# Applying a layer tar
# ---------------------------------------------------------------------------------------------


_GiB = 1 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count written as an integer with an optional binary suffix (``512M``, ``16G``)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    number = raw[: len(raw) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"{text!r} is not a size; write bytes, or a number with K, M, G or T")
    return int(number) * _UNITS[unit]


@dataclass(frozen=True)
class Limits:
    """How much one untrusted layer tar may make the importer read, write and hold in memory
    (docs/reference/options.md, "Image import limits"). Each is checked while the tar streams,
    before the bytes it bounds are read, buffered or written."""

    #: Uncompressed bytes of one layer tar, and apparent bytes of the files it holds (a sparse
    #: file counts at its full size: the store hashes it and an export writes it in full).
    max_layer_size: int = 8 * _GiB
    #: Uncompressed bytes per compressed byte of one layer blob, enforced once the layer is
    #: past :attr:`RATIO_FLOOR` (a small layer of zeros may compress 1000:1 and harm nobody).
    max_ratio: int = 100
    #: Bytes of one PAX extended header, GNU long name or link, or GNU sparse map, and of all
    #: PAX global headers of a tar together: ``tarfile`` reads each whole into memory.
    max_header: int = 1 << 20

    RATIO_FLOOR: ClassVar[int] = 256 << 20
    #: Environment variables that set each limit (the CLI flags override them).
    ENV: ClassVar[dict[str, str]] = {
        "max_layer_size": "PYTEST_LAYERS_MAX_LAYER_SIZE",
        "max_ratio": "PYTEST_LAYERS_MAX_RATIO",
        "max_header": "PYTEST_LAYERS_MAX_HEADER",
    }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: int | None) -> Limits:
        """The defaults, replaced by the ``PYTEST_LAYERS_MAX_*`` variables that are set, then by
        the ``overrides`` that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for attr, var in cls.ENV.items():
            text = env.get(var, "").strip()
            if text:
                try:
                    values[attr] = parse_size(text)
                except ValueError as exc:
                    raise ValueError(f"{var}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _limit_error(what: str, size: int, limit: int, attr: str, flag: str) -> InvalidLayerError:
    return InvalidLayerError(
        f"{what}: {size} bytes, more than the limit of {limit} for an image; if the image is "
        f"trusted, raise it with `pytest-layers import {flag}` or {Limits.ENV[attr]}"
    )


_HEADER_KINDS = {
    tarfile.XHDTYPE: "PAX extended header",
    tarfile.XGLTYPE: "PAX global header",
    tarfile.SOLARIS_XHDTYPE: "PAX extended header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
}


def _truncated(where: str) -> InvalidLayerError:
    return InvalidLayerError(f"{where}: the layer tar ends inside it (truncated or damaged)")


_MAX_HEADER_RUN = 16


class _BoundedTarInfo(tarfile.TarInfo):
    """``tarfile.TarInfo`` that refuses oversized headers before ``tarfile`` reads them whole.

    ``tarfile`` reads a PAX header, a GNU long name and a GNU sparse map into memory in one
    piece, however large the archive says it is; these hooks run on the 512-byte header block
    first and stop the read. (Private ``tarfile`` hooks, unchanged from Python 3.8 to 3.13.)
    """

    limits: ClassVar[Limits] = Limits()

    @classmethod
    def bounded(cls, limits: Limits) -> type[_BoundedTarInfo]:
        return type("_BoundedTarInfo", (cls,), {"limits": limits})

    def _where(self) -> str:
        return f"tar header {self.name[:100]!r} at byte {self.offset}"

    def _proc_member(self, tf: Any) -> Any:
        kind = _HEADER_KINDS.get(self.type)
        if kind is None:
            return super()._proc_member(tf)  # type: ignore[misc]
        # tarfile reads the header after an extended header by recursing: a long run of them
        # ends in RecursionError. Real tars have at most one of each kind before an entry.
        depth = getattr(tf, "_layers_depth", 0)
        if depth >= _MAX_HEADER_RUN:
            raise InvalidLayerError(
                f"{self._where()}: more than {_MAX_HEADER_RUN} extended headers in a row; "
                "the layer tar is damaged or hostile"
            )
        tf._layers_depth = depth + 1
        try:
            limit = self.limits.max_header
            if self.size > limit:
                raise _limit_error(
                    f"{self._where()}: its {kind}", self.size, limit, "max_header", "--max-header"
                )
            if self.type == tarfile.XGLTYPE:
                total = getattr(tf, "_layers_global_bytes", 0) + self.size
                tf._layers_global_bytes = total
                if total > limit:
                    raise _limit_error(
                        f"{self._where()}: the PAX global headers together",
                        total,
                        limit,
                        "max_header",
                        "--max-header",
                    )
            return super()._proc_member(tf)  # type: ignore[misc]
        finally:
            tf._layers_depth = depth

    def _proc_sparse(self, tf: Any) -> Any:
        # As tarfile's own, with a bound on the extension blocks and a check for a short read.
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        read = 0
        while isextended:
            read += _BLOCK
            if read > self.limits.max_header:
                raise _limit_error(
                    f"{self._where()}: its GNU sparse map",
                    read,
                    self.limits.max_header,
                    "max_header",
                    "--max-header",
                )
            buf = tf.fileobj.read(_BLOCK)
            if len(buf) < _BLOCK:
                raise _truncated(self._where())
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos : pos + 12])  # type: ignore[attr-defined]
                    numbytes = tarfile.nti(buf[pos + 12 : pos + 24])  # type: ignore[attr-defined]
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            isextended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tf.fileobj.tell()
        tf.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tf: Any) -> None:
        # GNU sparse 1.0 keeps its map at the start of the data: decimal numbers, one a line,
        # the count first. tarfile reads lines until it has them all, without a bound and
        # without noticing the end of the archive (an endless loop there).
        limit = self.limits.max_header
        buf = bytearray()
        pos = 0

        def number() -> int:
            nonlocal pos
            while (end := buf.find(b"\n", pos)) < 0:
                if len(buf) >= limit:
                    raise _limit_error(
                        f"{self._where()}: its GNU sparse map",
                        len(buf),
                        limit,
                        "max_header",
                        "--max-header",
                    )
                more = tf.fileobj.read(_BLOCK)
                if len(more) < _BLOCK:
                    raise _truncated(self._where())
                buf.extend(more)
            text = bytes(buf[pos:end])
            pos = end + 1
            if not text.isdigit() or len(text) > 20:
                raise InvalidLayerError(f"{self._where()}: a malformed GNU sparse map")
            return int(text)

        fields = number()
        if fields * 4 > limit:
            raise _limit_error(
                f"{self._where()}: its GNU sparse map",
                fields * 4,
                limit,
                "max_header",
                "--max-header",
            )
        values = [number() for _ in range(fields * 2)]
        next.offset_data = tf.fileobj.tell()
        next.sparse = list(zip(values[::2], values[1::2], strict=True))


@dataclass
class ApplyStats:
    """What ``apply_layer_tar`` did."""

    entries: int = 0  # tar entries applied (whiteouts included)
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)  # entries or attributes not restored


_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_MAX = 255  # bytes of one file name component (Linux NAME_MAX)
_SYMLINK_MAX = 4095  # bytes of a symlink target (PATH_MAX less the NUL)
_XATTR_SIZE_MAX = 65536  # bytes of one xattr value (Linux XATTR_SIZE_MAX)


def _normalize(name: str, *, what: str = "entry") -> str:
    """Lexically clean a member name; refuse absolute names and ``..`` above the root."""
    if name.startswith("/"):
        raise UnsafeEntryError(name, f"absolute {what} names are not allowed in a layer")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            raise UnsafeEntryError(
                name[:300] + ("..." if len(name) > 300 else ""),
                f"a name component of {len(part.encode('utf-8', 'surrogateescape'))} bytes; "
                f"Linux file names are at most {_NAME_MAX} bytes",
            )
        if part == "..":
            if not parts:
                raise UnsafeEntryError(name, f"the {what} name climbs out of the root with '..'")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


class NeedsLowerLayers(Exception):
    """Raised by :func:`apply_layer_tar` with ``standalone=True`` when the layer refers to
    what lies below it (a whiteout, an opaque marker, a parent directory it does not itself
    carry, a hardlink to a file it does not carry, a symlink followed on the way to an entry):
    applied to an empty directory it would not give its own diff. Nothing of it is kept
    meaningful; apply it again onto a view of its parents."""

    def __init__(self, entry: str, why: str) -> None:
        super().__init__(f"{entry!r}: {why}")


class _Applier:
    def __init__(
        self,
        root: Path,
        stats: ApplyStats,
        limits: Limits,
        *,
        strict_devices: bool = False,
        standalone: bool = False,
    ) -> None:
        self.root_fd = os.open(root, _O_DIR)
        self.standalone = standalone
        self.stats = stats
        self.limits = limits
        self.strict_devices = strict_devices
        self.apparent = 0  # bytes of regular files so far, sparse ones at full size
        self._cached: tuple[tuple[str, ...], int] | None = None  # see open_dir
        self.is_root = os.geteuid() == 0
        self.written: set[str] = set()
        self.ancestors: set[str] = set()  # every proper ancestor of a written path
        self.dir_meta: dict[str, tuple[int, int, int, int]] = {}  # rel -> (dev, ino, mode, ns)
        #: Set when the tar is a plain file: members' data is then read at their offsets.
        self.reader: _PlainTarReader | None = None

    def close(self) -> None:
        self.drop_cache()
        os.close(self.root_fd)

    # -- path resolution ---------------------------------------------------------------------

    def open_dir(self, parts: Sequence[str], entry: str, *, create: bool) -> int | None:
        """An O_PATH fd of the directory ``parts`` resolved inside the root, or None if absent.

        Symlinks met on the way are followed here, never by the kernel: absolute targets restart
        from the root, relative ones from the link's directory, and ``..`` above the root is an
        escape. One fd is open at a time, whatever the depth (``..`` is the real parent of a
        directory reached from the root without symlinks, so it is opened, not remembered):
        ``ulimit -n 64`` and a tree deeper than PATH_MAX both work. The last directory reached
        without a symlink is kept, so a tar's next entry in the same directory (or below it)
        starts there instead of at the root.
        """
        key = tuple(p for p in parts if p not in ("", "."))
        cur = -1
        if self._cached is not None:
            # From the kept directory: up to the common ancestor, then down, when that is
            # shorter than down from the root (the next entry of a tar, a parent's metadata).
            ckey, cfd = self._cached
            common = 0
            for a, b in zip(ckey, key, strict=False):
                if a != b:
                    break
                common += 1
            if len(ckey) - common + len(key) - common < len(key) + 1:
                cur = os.dup(cfd)
                try:
                    for _ in range(len(ckey) - common):
                        up = os.open("..", _O_DIR, dir_fd=cur)
                        os.close(cur)
                        cur = up
                except BaseException:
                    os.close(cur)
                    raise
                depth = common
                todo = list(reversed(key[common:]))
        if cur < 0:
            cur = os.dup(self.root_fd)
            depth = 0
            todo = list(reversed(key))
        direct = True  # no symlink followed: the fd is the directory named ``key``
        follows = 0
        try:
            while todo:
                comp = todo.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if depth == 0:
                        raise UnsafeEntryError(
                            entry, "resolving it follows a symlink whose '..' climbs above the root"
                        )
                    up = os.open("..", _O_DIR, dir_fd=cur)
                    os.close(cur)
                    cur = up
                    depth -= 1
                    continue
                try:
                    fd = os.open(comp, _O_DIR, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        return None
                    if self.standalone:
                        raise NeedsLowerLayers(
                            entry, "its parent directory is not in the layer"
                        ) from None
                    os.mkdir(comp, 0o755, dir_fd=cur)
                    fd = os.open(comp, _O_DIR, dir_fd=cur)
                except NotADirectoryError:
                    st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        if not create:
                            return None
                        raise InvalidLayerError(
                            f"{entry!r}: its parent {comp!r} exists and is not a directory; "
                            "the layer must replace it with a directory entry first"
                        ) from None
                    if self.standalone:
                        raise NeedsLowerLayers(entry, "a symlink lies on its path") from None
                    follows += 1
                    direct = False
                    if follows > _chroot.MAX_SYMLINKS:
                        raise UnsafeEntryError(entry, "too many levels of symbolic links") from None
                    target = os.readlink(comp, dir_fd=cur)
                    if target.startswith("/"):
                        os.close(cur)
                        cur = os.dup(self.root_fd)
                        depth = 0
                    todo.extend(reversed(target.split("/")))
                    continue
                os.close(cur)
                cur = fd
                depth += 1
            if direct:
                self.drop_cache()
                self._cached = (key, os.dup(cur))
            result, cur = cur, -1
            return result
        finally:
            if cur >= 0:
                os.close(cur)

    def drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def invalidate(self, rel: str) -> None:
        """Forget the kept directory if the entry ``rel`` may replace it or an ancestor."""
        if self._cached is not None:
            cached = "/".join(self._cached[0])
            if cached == rel or cached.startswith(rel + "/") or not rel:
                self.drop_cache()

    # -- bookkeeping ---------------------------------------------------------------------------

    def mark_written(self, rel: str) -> None:
        self.written.add(rel)
        parent = rel.rpartition("/")[0]
        while parent and parent not in self.ancestors:
            self.ancestors.add(parent)
            parent = parent.rpartition("/")[0]

    # -- removal -------------------------------------------------------------------------------

    def remove(self, parent_fd: int, name: str, rel: str, *, keep_own: bool) -> None:
        """Remove ``name`` under ``parent_fd``; with keep_own, spare this layer's own entries."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if keep_own and rel in self.written and not stat.S_ISDIR(st.st_mode):
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
        try:
            self.clear_dir(fd, rel, keep_own=keep_own)
        finally:
            os.close(fd)
        if keep_own and (rel in self.written or rel in self.ancestors):
            return
        os.rmdir(name, dir_fd=parent_fd)

    def clear_dir(self, dir_fd: int, rel: str, *, keep_own: bool) -> None:
        with os.scandir(dir_fd) as it:
            names = [e.name for e in it]
        for child in names:
            child_rel = f"{rel}/{child}" if rel else child
            self.remove(dir_fd, child, child_rel, keep_own=keep_own)

    # -- entries -------------------------------------------------------------------------------

    def apply(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if member.isreg():
            self.apparent += member.size
            if self.apparent > self.limits.max_layer_size:
                what = f"{member.name!r}: the layer's files up to this one" + (
                    " (a sparse file counts at its full size)" if member.sparse is not None else ""
                )
                raise _limit_error(
                    what,
                    self.apparent,
                    self.limits.max_layer_size,
                    "max_layer_size",
                    "--max-layer-size",
                )
        rel = _normalize(member.name)
        if rel == "":
            self.stats.warnings.append(f"{member.name!r}: root entry ignored")
            return
        parent_rel, _, base = rel.rpartition("/")
        parent_parts = parent_rel.split("/") if parent_rel else []
        if base.startswith(WHITEOUT_PREFIX):
            if self.standalone:
                raise NeedsLowerLayers(member.name, "a whiteout hides what lies below")
            self.drop_cache()  # a whiteout may remove any directory below its own
            self.whiteout(member.name, parent_rel, parent_parts, base)
            return
        self.invalidate(rel)
        parent_fd = self.open_dir(parent_parts, member.name, create=True)
        assert parent_fd is not None
        try:
            self.create(tf, member, rel, parent_fd, base)
        finally:
            os.close(parent_fd)
        self.mark_written(rel)
        self.stats.entries += 1

    def whiteout(self, entry: str, parent_rel: str, parent_parts: list[str], base: str) -> None:
        if base == OPAQUE_MARKER:
            fd = self.open_dir(parent_parts, entry, create=False)
            self.stats.opaque_dirs += 1
            self.stats.entries += 1
            if fd is None:
                return
            try:
                # The marker applies before this layer's own entries in the directory, wherever
                # it sits in the tar: entries already applied are spared, later ones come after.
                scan = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                try:
                    self.clear_dir(scan, parent_rel, keep_own=True)
                finally:
                    os.close(scan)
            finally:
                os.close(fd)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", "..") or target.startswith(WHITEOUT_PREFIX):
            raise UnsafeEntryError(entry, f"{base!r} is not a valid whiteout name")
        self.stats.whiteouts += 1
        self.stats.entries += 1
        rel = f"{parent_rel}/{target}" if parent_rel else target
        if rel in self.written:
            return  # a whiteout never hides an entry of its own layer
        fd = self.open_dir(parent_parts, entry, create=False)
        if fd is None:
            return
        try:
            self.remove(fd, target, rel, keep_own=True)
        finally:
            os.close(fd)

    def create(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, parent: int, base: str
    ) -> None:
        mtime_ns = round(m.mtime * 1_000_000_000)
        if m.isreg():
            # Most entries of a layer are new files: O_EXCL creates one in a single syscall
            # and fails, without following anything, on whatever is already there.
            try:
                fd = self._open_new(parent, base)
            except FileExistsError:
                pass
            else:
                self.regular(tf, m, parent, base, mtime_ns, fd)
                return
        try:
            existing: os.stat_result | None = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if m.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(base, dir_fd=parent)
                existing = None
            if existing is None:
                os.mkdir(base, 0o700, dir_fd=parent)
            self.chown(parent, base, m)
            self.set_xattrs(parent, base, m)
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
            # Directory modes and mtimes are set at the end: a read-only directory must still
            # take its children, and adding them would move its mtime.
            self.dir_meta[rel] = (st.st_dev, st.st_ino, m.mode & 0o7777, mtime_ns)
            self.stats.dirs += 1
            return
        if m.islnk():
            self.hardlink(m, parent, base, existing)
            return
        if existing is not None:
            self.remove(parent, base, rel, keep_own=False)
        if m.isreg():
            self.regular(tf, m, parent, base, mtime_ns, self._open_new(parent, base))
            return
        if m.issym():
            if len(m.linkname.encode("utf-8", "surrogateescape")) > _SYMLINK_MAX:
                raise UnsafeEntryError(
                    m.name, f"a symlink target longer than the {_SYMLINK_MAX} bytes Linux allows"
                )
            os.symlink(m.linkname, base, dir_fd=parent)
            self.stats.symlinks += 1
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            try:
                os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=parent)
            except PermissionError:
                if self.strict_devices:
                    raise UnsafeEntryError(
                        m.name,
                        f"device node {m.devmajor}/{m.devminor} cannot be created here "
                        "(creating device nodes needs CAP_MKNOD); import the image as root, "
                        "or use an image without device nodes",
                    ) from None
                self.stats.warnings.append(
                    f"{m.name!r}: device {m.devmajor}/{m.devminor} not created "
                    "(creating device nodes needs CAP_MKNOD)"
                )
                return
            self.stats.devices += 1
        elif m.isfifo():
            os.mkfifo(base, 0o600, dir_fd=parent)
            self.stats.fifos += 1
        else:
            self.stats.warnings.append(f"{m.name!r}: unsupported tar entry type {m.type!r} skipped")
            return
        self.finish(parent, base, m, mtime_ns, symlink=m.issym())

    @staticmethod
    def _open_new(parent: int, base: str) -> int:
        return os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )

    def regular(
        self,
        tf: tarfile.TarFile,
        m: tarfile.TarInfo,
        parent: int,
        base: str,
        mtime_ns: int,
        fd: int,
    ) -> None:
        try:
            written = 0
            skipped = False  # a zero run left as a hole: the size is set by ftruncate
            chunks: Iterator[bytes] | None = None
            if m.sparse is not None:
                # Only the data runs are in the tar, one after the other: read them and seek
                # over the holes, where tarfile's reader would hand us every hole as zeros
                # (linear in the apparent size: 16 GiB of zeros for a 10 KB tar).
                written = self.sparse_data(m, tf, fd)
                skipped = True
            elif self.reader is not None:
                chunks = self.reader.read_data(m)
            else:
                src = tf.extractfile(m)
                if src is not None:
                    chunks = iter(lambda: src.read(_CHUNK), b"")
            if chunks is not None:
                for chunk in chunks:
                    if chunk[0] == 0 and chunk[-1] == 0 and chunk.count(0) == len(chunk):
                        # Keep zero runs as holes: a sparse image file stays sparse.
                        os.lseek(fd, len(chunk), os.SEEK_CUR)
                        skipped = True
                    else:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                    written += len(chunk)
            if skipped:
                os.ftruncate(fd, written)
            self.stats.bytes_written += written
            self.chown(fd, None, m)
            os.chmod(fd, m.mode & 0o7777)
            self.set_xattrs(fd, None, m)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        self.stats.files += 1

    def sparse_data(self, m: tarfile.TarInfo, tf: tarfile.TarFile, fd: int) -> int:
        end = 0
        runs: list[tuple[int, int]] = list(m.sparse or ())  # type: ignore[arg-type]
        stream: Any = tf.fileobj
        stream.seek(m.offset_data)  # a stream only moves forward: this is where we are
        for offset, numbytes in runs:
            if numbytes == 0:
                continue  # GNU tar ends its maps with empty runs (at the end, or at 0)
            if offset < end or numbytes < 0 or offset + numbytes > m.size:
                raise InvalidLayerError(
                    f"{m.name!r}: its sparse map is not ascending data runs within the file's "
                    f"{m.size} bytes; the layer tar is damaged"
                )
            end = offset + numbytes
            os.lseek(fd, offset, os.SEEK_SET)
            left = numbytes
            while left:
                chunk = stream.read(min(left, _CHUNK))
                if not chunk:
                    raise _truncated(repr(m.name))
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
        return m.size

    def hardlink(
        self, m: tarfile.TarInfo, parent: int, base: str, existing: os.stat_result | None
    ) -> None:
        try:
            # A leading "/" means the root of the image, as in docker's extraction.
            target_rel = _normalize(m.linkname.lstrip("/"), what="hardlink target")
        except UnsafeEntryError as exc:
            why = f"hardlink target {m.linkname!r}: {exc.reason}"
            raise UnsafeEntryError(m.name, why) from None
        if target_rel == "":
            raise UnsafeEntryError(m.name, "a hardlink to the root directory")
        t_parent_rel, _, t_base = target_rel.rpartition("/")
        t_fd = self.open_dir(t_parent_rel.split("/") if t_parent_rel else [], m.name, create=False)
        if t_fd is None:
            if self.standalone:
                raise NeedsLowerLayers(m.name, "its hardlink target is not in the layer")
            raise UnsafeEntryError(m.name, f"hardlink target {m.linkname!r} does not exist")
        try:
            try:
                t_st = os.stat(t_base, dir_fd=t_fd, follow_symlinks=False)
            except FileNotFoundError:
                if self.standalone:
                    raise NeedsLowerLayers(
                        m.name, "its hardlink target is not in the layer"
                    ) from None
                raise UnsafeEntryError(
                    m.name, f"hardlink target {m.linkname!r} does not exist"
                ) from None
            if stat.S_ISDIR(t_st.st_mode):
                raise UnsafeEntryError(m.name, f"hardlink target {m.linkname!r} is a directory")
            if existing is not None:
                if (existing.st_dev, existing.st_ino) == (t_st.st_dev, t_st.st_ino):
                    self.stats.hardlinks += 1
                    return
                self.remove(parent, base, "", keep_own=False)
            try:
                os.link(t_base, base, src_dir_fd=t_fd, dst_dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                raise UnsafeEntryError(
                    m.name,
                    f"hardlink to {m.linkname!r}, which already has {t_st.st_nlink} links, the "
                    "most this filesystem allows for one file",
                ) from None
        finally:
            os.close(t_fd)
        self.stats.hardlinks += 1

    def finish(
        self, parent: int, base: str, m: tarfile.TarInfo, mtime_ns: int, *, symlink: bool
    ) -> None:
        self.chown(parent, base, m)
        if not symlink:
            # After chown, which clears setuid/setgid.
            os.chmod(base, m.mode & 0o7777, dir_fd=parent)
        self.set_xattrs(parent, base, m)
        os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)

    def chown(self, where: int, base: str | None, m: tarfile.TarInfo) -> None:
        try:
            if base is None:
                os.chown(where, m.uid, m.gid)
            else:
                os.chown(base, m.uid, m.gid, dir_fd=where, follow_symlinks=False)
        except OSError as exc:
            if self.is_root or exc.errno not in (errno.EPERM, errno.EINVAL):
                raise

    def set_xattrs(self, where: int, base: str | None, m: tarfile.TarInfo) -> None:
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            if _ocirules.layer_never_carries(name):
                continue
            if name == "security.capability" and not self.is_root:
                self.stats.warnings.append(f"{m.name!r}: {name} needs root, not restored")
                continue
            if not _ocirules.layer_keeps_xattr(name):
                self.stats.warnings.append(f"{m.name!r}: xattr {name} not restored")
                continue
            raw = value.encode("utf-8", "surrogateescape")
            if len(raw) > _XATTR_SIZE_MAX:
                raise UnsafeEntryError(
                    m.name,
                    f"xattr {name} holds {len(raw)} bytes; Linux allows at most "
                    f"{_XATTR_SIZE_MAX} in one xattr value",
                )
            try:
                if base is None:
                    os.setxattr(where, name, raw)
                else:
                    # No *at variant for xattrs: go through /proc with an O_PATH fd of the
                    # entry itself. The kernel resolves that magic link to the fd's own inode
                    # (a symlink stays the symlink), so nothing in the tree is followed.
                    fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=where)
                    try:
                        os.setxattr(f"/proc/self/fd/{fd}", name, raw)
                    finally:
                        os.close(fd)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    # E2BIG, ENOSPC (no room for more xattrs on the inode), EINVAL (a
                    # malformed security.capability): the image's fault, said in one line.
                    raise UnsafeEntryError(
                        m.name, f"xattr {name} cannot be set ({exc.strerror})"
                    ) from None
                self.stats.warnings.append(
                    f"{m.name!r}: xattr {name} not restored ({exc.strerror})"
                )

    def finish_dirs(self) -> None:
        # Deepest first, so setting a directory's mtime is not undone by touching its parent.
        for rel in sorted(self.dir_meta, key=lambda r: r.count("/"), reverse=True):
            dev, ino, mode, mtime_ns = self.dir_meta[rel]
            parent_rel, _, base = rel.rpartition("/")
            fd = self.open_dir(parent_rel.split("/") if parent_rel else [], rel, create=False)
            if fd is None:
                continue
            try:
                try:
                    st = os.stat(base, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) != (dev, ino):
                    continue  # replaced or removed later in the same tar
                os.chmod(base, mode, dir_fd=fd)
                os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)


# Types whose plain ustar header the fast reader parses itself: regular files (``0``, and ``\0``
# unless the name ends in "/"), hard links, symlinks, devices, directories and fifos.
_FAST_TYPES = frozenset((b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6"))


class _PlainTarReader:
    """The members of an uncompressed layer tar in a regular file, as ``tarfile`` would give
    them, parsed about five times faster.

    ``tarfile`` spends some 40 us of Python per member on a header (and more on the file
    object it wraps each member's data in): on a 100,000-file layer that is seconds of a pull.
    Most headers of a layer are plain ustar ones, and those this reader parses itself with the
    very rules of ``tarfile.TarInfo.frombuf`` and ``_proc_builtin`` (the fields cut at their
    first NUL, numbers as ``int(text.strip() or "0", 8)``, the ustar prefix joined, a
    directory's trailing slashes dropped); the data of a member is then read with ``pread`` at
    its offset. Anything else is handed to ``tarfile`` itself, at the same offset: PAX and GNU
    extended headers, sparse files, base-256 numbers, a checksum that is not the plain sum,
    the end of the archive, damage; and, once a PAX global header was seen, every member, since
    ``tarfile`` patches those into the members after it. Both paths give the same members, which
    a test checks header by header against ``tarfile`` alone.
    """

    def __init__(self, fileobj: BinaryIO, tarinfo: type[tarfile.TarInfo]) -> None:
        self.fd = fileobj.fileno()
        self.tf = tarfile.open(fileobj=fileobj, mode="r:", tarinfo=tarinfo)  # noqa: SIM115
        self.tarinfo = tarinfo
        self.offset = -1  # where the next header is; -1: tarfile has the first one

    def next(self) -> tarfile.TarInfo | None:
        tf = self.tf
        if self.offset >= 0 and not tf.pax_headers:
            member = self._plain(os.pread(self.fd, _BLOCK, self.offset), self.offset)
            if member is not None:
                return member
            tf.offset = self.offset
        member = tf.next()
        tf.members.clear()  # type: ignore[attr-defined]  # see apply_layer_tar
        self.offset = tf.offset
        return member

    def _plain(self, buf: bytes, offset: int) -> tarfile.TarInfo | None:
        """The member whose header is ``buf`` at ``offset``, or None for tarfile to parse."""
        kind = buf[156:157]
        if len(buf) != _BLOCK or kind not in _FAST_TYPES:
            return None
        try:
            chksum = _octal(buf[148:156])
            if chksum != 256 + sum(buf[:148]) + sum(buf[156:]):
                return None
            m = self.tarinfo()
            m.name = self._text(buf[0:100])
            m.mode = _octal(buf[100:108])
            m.uid = _octal(buf[108:116])
            m.gid = _octal(buf[116:124])
            m.size = _octal(buf[124:136])
            m.mtime = _octal(buf[136:148])
            m.devmajor = _octal(buf[329:337])
            m.devminor = _octal(buf[337:345])
        except ValueError:
            return None  # base-256 or malformed: tarfile decides
        m.chksum = chksum
        if kind == tarfile.AREGTYPE and m.name.endswith("/"):
            kind = tarfile.DIRTYPE
        m.type = kind
        m.linkname = self._text(buf[157:257])
        m.uname = self._text(buf[265:297])
        m.gname = self._text(buf[297:329])
        prefix = self._text(buf[345:500])
        if kind == tarfile.DIRTYPE:
            m.name = m.name.rstrip("/")
        if prefix:
            m.name = prefix + "/" + m.name
        m.offset = offset
        m.offset_data = offset + _BLOCK
        self.offset = m.offset_data
        if m.isreg():
            self.offset += -(-m.size // _BLOCK) * _BLOCK
        return m

    def _text(self, field: bytes) -> str:
        # tarfile's nts() with the archive's encoding and error handler.
        return field.split(b"\0", 1)[0].decode(self.tf.encoding, self.tf.errors)

    def read_data(self, m: tarfile.TarInfo) -> Iterator[bytes]:
        """The data of regular member ``m`` in chunks of at most ``_CHUNK`` bytes."""
        at, left = m.offset_data, max(m.size, 0)  # tarfile reads nothing for a negative size
        while left:
            chunk = os.pread(self.fd, min(left, _CHUNK), at)
            if not chunk:
                raise _truncated(repr(m.name))
            at += len(chunk)
            left -= len(chunk)
            yield chunk


def _octal(field: bytes) -> int:
    """A number field of plain octal digits, as tarfile's ``nti()`` reads it; ValueError for
    any other (base-256, a sign, ``0o``, underscores, junk), which tarfile then parses."""
    text = field.split(b"\0", 1)[0].strip()
    if field[0] & 0x80 or text.strip(b"01234567"):
        raise ValueError(f"not plain octal: {field!r}")
    return int(text or b"0", 8)


def apply_layer_tar(
    tar: BinaryIO | Path,
    root: Path,
    *,
    limits: Limits | None = None,
    strict_devices: bool = False,
    standalone: bool = False,
) -> ApplyStats:
    """Apply an OCI layer tar (plain or gzip) onto the writable merged tree ``root``.

    With ``standalone``, ``root`` is an empty directory that is to become the layer's own diff
    (the importer's fast path for a layer that only adds entries): an entry whose result
    depends on the layers below raises :class:`NeedsLowerLayers` instead.

    The tar is read once, as a stream (a pipe works; nothing is spooled). Whiteouts delete from
    what is already in ``root``; ``DIR/.wh..wh..opq`` clears DIR of everything this layer did not
    itself write, which is the same as clearing it before the layer's entries, wherever the
    marker sits; a whiteout never hides an entry of its own layer. Every path is resolved inside
    ``root`` (absolute symlinks relative to it); an entry that would escape raises
    ``errors.UnsafeEntryError`` naming it, before anything is written for that entry.
    Modes (setuid included), owners (as root; elsewhere best effort), mtimes, ``user.*`` xattrs
    (and ``security.capability`` as root), devices, fifos and hardlinks are restored; a device
    node that cannot be created is a warning, or with ``strict_devices`` an error. Sparse
    files are written with holes. The tar is untrusted: ``limits`` bound its headers and sizes
    (checked before the bytes are read), and damage raises ``errors.InvalidLayerError`` naming
    the entry.
    """
    stats = ApplyStats()
    limits = limits or Limits()
    applier = _Applier(root, stats, limits, strict_devices=strict_devices, standalone=standalone)
    own = None
    try:
        if isinstance(tar, (str, os.PathLike)):
            own = open(tar, "rb")  # noqa: SIM115 (closed in finally)
            fileobj: BinaryIO = own
        else:
            fileobj = tar
        current = "the first entry"
        tarinfo = _BoundedTarInfo.bounded(limits)
        try:
            if own is not None:
                try:
                    applier.reader = _PlainTarReader(own, tarinfo)
                except tarfile.ReadError:
                    own.seek(0)  # compressed (or damaged): the stream reader says which
            if applier.reader is not None:
                tf = applier.reader.tf
                with tf:
                    while (member := applier.reader.next()) is not None:
                        current = f"entry {member.name[:300]!r}"
                        applier.apply(tf, member)
                        current = f"the entry after {member.name[:300]!r}"
            else:
                with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=tarinfo) as tf:
                    while (member := tf.next()) is not None:
                        # A TarFile keeps every header it read: 1,000,000 entries held a
                        # GiB. Links are resolved here, never through tf.members.
                        tf.members.clear()  # type: ignore[attr-defined]
                        current = f"entry {member.name[:300]!r}"
                        applier.apply(tf, member)
                        current = f"the entry after {member.name[:300]!r}"
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise InvalidLayerError(
                f"the layer tar is damaged at {current}: {exc}; nothing of the layer was kept"
            ) from None
        applier.finish_dirs()
    finally:
        applier.close()
        if own is not None:
            own.close()
    return stats
