"""How the copy backend copies an image: the plan of a merged image, and the copier that
replays it into a directory.

:mod:`~pytest_layers.backends.copy` makes whole copies with these; its reusable copies
(:mod:`~pytest_layers.backends.copyreuse`) restore single entries with the same rules (which
xattrs a copy carries, how hardlinks stay linked, the metadata order). One home for both, so
neither imports the other's module. No pytest here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pytest_layers import _ocirules
from pytest_layers.errors import BackendUnavailableError


class _DataCopier(Protocol):
    """What the copier needs of the backend: how file data is moved (clone, copy_file_range,
    sparse-aware copy), which the backend measures and switches per filesystem pair."""

    def _copy_data(self, src: str, dst_fd: int, st: os.stat_result, dst_dev: int) -> None: ...


_WH = _ocirules.WHITEOUT_PREFIX
_OPQ = _ocirules.OPAQUE_MARKER
_OPAQUE_XATTRS = _ocirules.ALL_OPAQUE_XATTRS
# errnos that mean "this filesystem (pair) cannot clone": fall back to copying, for good.
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF}
_PRIVILEGED = {errno.EPERM, errno.ENOTSUP, errno.EACCES}
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


# A copy shows what an overlay mount of the layers would show (trusted.* included): the view's
# rule, not the layer's.
_keep_xattr = _ocirules.view_shows_xattr


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in names:
        if _keep_xattr(name):
            with contextlib.suppress(OSError):
                out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(out)


@dataclass(frozen=True)
class _Item:
    rel: str  # relative POSIX path in the image ("" for the root)
    src: str  # the layer file it is copied from
    st: os.stat_result
    xattrs: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class _Plan:
    dirs: tuple[_Item, ...]  # parents before children; the root first
    others: tuple[_Item, ...]  # files, symlinks, fifos, devices
    files: int


class _Layer:
    """One layer directory's view of one merged directory."""

    __slots__ = ("entries", "opaque", "whiteouts")

    def __init__(self, abs_dir: str, flavor: str) -> None:
        self.entries: dict[str, os.DirEntry[str]] = {}
        self.whiteouts: set[str] = set()
        self.opaque = False
        with os.scandir(abs_dir) as it:
            for e in it:
                name = e.name
                if flavor == "marker" and name.startswith(_WH):
                    if name == _OPQ:
                        self.opaque = True
                    else:
                        self.whiteouts.add(name[len(_WH) :])
                    continue
                if flavor == "overlay":
                    st = e.stat(follow_symlinks=False)  # cached by DirEntry for the plan
                    if _ocirules.is_whiteout_device(st):
                        self.whiteouts.add(name)
                        continue
                self.entries[name] = e
        # A layer never hides its own entries (OCI); a whiteout only speaks about lower layers.
        self.whiteouts.difference_update(self.entries)
        if not self.opaque:
            for xname in _OPAQUE_XATTRS:
                with contextlib.suppress(OSError):
                    if os.getxattr(abs_dir, xname) == b"y":
                        self.opaque = True
                        break


def _plan(lowers_top_first: Sequence[str], flavor: str) -> _Plan:
    """Merge the layers as overlayfs would and list what a copy must create."""
    root_src = lowers_top_first[0]
    dirs: list[_Item] = [_Item("", root_src, os.lstat(root_src), _xattrs(root_src))]
    others: list[_Item] = []
    files = 0
    # (rel, abs dirs of the layers that merge into it, top first)
    todo: list[tuple[str, list[str]]] = [("", list(lowers_top_first))]
    while todo:
        rel_dir, stack = todo.pop()
        decided: set[str] = set()
        layers = []
        for abs_dir in stack:
            layer = _Layer(abs_dir, flavor)
            layers.append(layer)
            if layer.opaque:
                break
        for depth, layer in enumerate(layers):
            for name in sorted(layer.entries):
                if name in decided:
                    continue
                decided.add(name)
                e = layer.entries[name]
                rel = f"{rel_dir}/{name}" if rel_dir else name
                st = e.stat(follow_symlinks=False)
                if stat.S_ISSOCK(st.st_mode):
                    continue
                xattrs = _xattrs(e.path) if not stat.S_ISLNK(st.st_mode) else ()
                if stat.S_ISDIR(st.st_mode):
                    dirs.append(_Item(rel, e.path, st, xattrs))
                    # The directories of lower layers merge into it, down to a whiteout or a
                    # non-directory of that name; an opaque one cuts the stack when scanned.
                    child_stack = [e.path]
                    for lower in layers[depth + 1 :]:
                        if name in lower.whiteouts:
                            break
                        below = lower.entries.get(name)
                        if below is None:
                            continue
                        if not below.is_dir(follow_symlinks=False):
                            break
                        child_stack.append(below.path)
                    todo.append((rel, child_stack))
                else:
                    others.append(_Item(rel, e.path, st, xattrs))
                    files += 1
            decided.update(layer.whiteouts)
    dirs.sort(key=lambda item: item.rel.split("/"))
    return _Plan(tuple(dirs), tuple(others), files)


class _Copier:
    """Replays a plan into a destination directory."""

    def __init__(self, backend: _DataCopier, *, defang: bool = False) -> None:
        self.backend = backend
        # A root copy that could not be bind-mounted nosuid,nodev: setuid/setgid bits and file
        # capabilities are not copied and device nodes are refused, so the copy grants nothing.
        self.defang = defang
        self.root = os.geteuid() == 0
        self.uid = os.geteuid()
        self.gid = os.getegid()
        self.linked: dict[tuple[int, int], str] = {}
        self.dest_dev = 0

    def run(self, plan: _Plan, dest: str) -> None:
        self.dest_dev = os.stat(dest).st_dev
        for item in plan.dirs[1:]:
            # Owner-writable while filling it; the real mode is set at the end.
            os.mkdir(f"{dest}/{item.rel}", 0o700)
        for item in plan.others:
            self.other(item, f"{dest}/{item.rel}")
        for item in reversed(plan.dirs):
            path = f"{dest}/{item.rel}" if item.rel else dest
            self.meta(path, item, fd=None)

    def other(self, item: _Item, path: str) -> None:
        st = item.st
        mode = st.st_mode
        if st.st_nlink > 1 and not stat.S_ISDIR(mode):
            key = (st.st_dev, st.st_ino)
            first = self.linked.get(key)
            if first is not None:
                os.link(first, path)
                return
            self.linked[key] = path
        if stat.S_ISREG(mode):
            fd = os.open(path, _O_CREATE, 0o600)
            try:
                if st.st_size:
                    self.backend._copy_data(item.src, fd, st, self.dest_dev)
                self.meta(path, item, fd=fd)
            finally:
                os.close(fd)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(item.src), path)
            self.meta(path, item, fd=None)
        else:
            if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and self.defang:
                raise BackendUnavailableError(
                    "copy",
                    f"the image holds the device node {item.rel!r}, and mounting is refused "
                    "here, so its copy cannot be made nodev; allow mounting (Docker: --cap-add "
                    "SYS_ADMIN --security-opt seccomp=unconfined) or set layers_mount_options "
                    "= dev",
                )
            if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and not self.root:
                try:
                    os.mknod(path, stat.S_IFMT(mode) | 0o600, st.st_rdev)
                except PermissionError as exc:
                    raise BackendUnavailableError(
                        "copy",
                        f"the image holds the device node {item.rel!r}, which an ordinary "
                        "user cannot create (mknod needs CAP_MKNOD); run as root or use the "
                        "overlay backend in a user namespace",
                    ) from exc
            else:
                os.mknod(path, stat.S_IFMT(mode) | 0o600, st.st_rdev)
            self.meta(path, item, fd=None)

    def meta(self, path: str, item: _Item, fd: int | None) -> None:
        st = item.st
        # Calls on an fd cannot take follow_symlinks; paths here may be symlinks.
        target: int | str = fd if fd is not None else path
        nofollow = {} if fd is not None else {"follow_symlinks": False}
        if self.root or st.st_uid != self.uid or st.st_gid != self.gid:
            try:
                os.chown(target, st.st_uid, st.st_gid, **nofollow)
            except PermissionError:
                if self.root:
                    raise
                # An ordinary user cannot give files away; kernel overlay in a user namespace
                # would show them as nobody, a copy shows them as the user's.
        if not stat.S_ISLNK(st.st_mode):
            # After chown, which clears setuid/setgid.
            mode = stat.S_IMODE(st.st_mode)
            if self.defang and not stat.S_ISDIR(st.st_mode):
                mode &= ~(stat.S_ISUID | stat.S_ISGID)
            os.chmod(target, mode)
            for name, value in item.xattrs:
                if self.defang and name == "security.capability":
                    continue
                try:
                    os.setxattr(target, name, value, **nofollow)
                except OSError as exc:
                    # trusted.* and security.* need privileges the image cannot demand.
                    if name.startswith("user.") or exc.errno not in _PRIVILEGED:
                        raise
        times = (st.st_atime_ns, st.st_mtime_ns)
        if fd is not None:
            os.utime(fd, ns=times)
        else:
            os.utime(path, ns=times, follow_symlinks=False)
