"""Applying an OCI layer tar onto a tree, securely: every path resolved one component at a
time from an ``O_PATH`` descriptor of the root (no symlink ever followed by the kernel),
whiteouts and opaque markers, hardlinks, sparse members written run by run."""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pytest_layers import _chroot, _ocirules
from pytest_layers._ocirules import OPAQUE_MARKER, WHITEOUT_PREFIX
from pytest_layers._tarlimits import (
    Limits,
    _BoundedTarInfo,
    _limit_error,
    _truncated,
)
from pytest_layers._tarreader import _PlainTarReader
from pytest_layers._tarwrite import _CHUNK
from pytest_layers.errors import InvalidLayerError, UnsafeEntryError


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
        #: (dev, ino) -> (path parts, mtime ns before this tar first changed the directory)
        self.touched: dict[tuple[int, int], tuple[tuple[str, ...], int]] = {}
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

    def touch(self, parts: Sequence[str], fd: int) -> None:
        """Remember the mtime of the directory ``fd`` before this tar first changes it.

        A layer may delete, replace or add a child without a header for the directory (umoci
        leaves it out when the directory's mtime looks unchanged). The tar then says nothing of
        the directory, so it keeps its mtime from below instead of taking the apply's moment.
        """
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) not in self.touched:
            self.touched[st.st_dev, st.st_ino] = (tuple(parts), st.st_mtime_ns)

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
            self.touch(parent_parts, parent_fd)
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
                self.touch(parent_parts, fd)
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
            self.touch(parent_parts, fd)
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

    def _open_kept(self, parts: Sequence[str]) -> int | None:
        """:meth:`open_dir` for a directory whose metadata is put back at the end, or None
        when its path no longer leads to a directory inside the root: a later entry of the
        same tar may have made a component a symlink that loops or climbs out. Every entry
        applied safely, so there is nothing left to restore there, not a bad layer."""
        try:
            return self.open_dir(parts, "/".join(parts), create=False)
        except UnsafeEntryError:
            return None

    def finish_dirs(self) -> None:
        # Directories the tar changed without naming them first; a named one then takes its
        # header's metadata below, whatever happened to it.
        for (dev, ino), (parts, mtime_ns) in self.touched.items():
            fd = self._open_kept(parts)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == (dev, ino):  # not replaced or removed since
                    os.utime(".", ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
        # Deepest first, so setting a directory's mtime is not undone by touching its parent.
        for rel in sorted(self.dir_meta, key=lambda r: r.count("/"), reverse=True):
            dev, ino, mode, mtime_ns = self.dir_meta[rel]
            parent_rel, _, base = rel.rpartition("/")
            fd = self._open_kept(parent_rel.split("/") if parent_rel else [])
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
