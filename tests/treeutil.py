"""Helpers for building and comparing directory trees in tests (no pytest import).

``snapshot_tree(root)`` records everything a layer can carry about every entry under ``root``
(type, permission bits, owner, mtime second, size, content digest, link target, device numbers,
xattrs, hardlink group), keyed by the relative POSIX path the rest of the project uses
(``"etc/app.conf"``; non-UTF-8 names as ``surrogateescape`` strings). Two trees that a layer
round trip should make identical compare equal with ``==``; ``diff_snapshots`` says how they
differ, one line per path, for readable assertion messages.

Hardlink groups are named by the smallest path of the group, so the same groups in two different
trees compare equal although the inode numbers differ.

Tree-building helpers (``make_file``, ``make_tree``, ``set_mtime``, ``whiteout``) keep test
bodies short; ``build_layer`` stores a built tree as a layer without mounting. ``make_tree``
takes a dict of relative path -> spec:

* ``bytes`` or ``str``: a regular file with that content
* ``None``: a directory
* ``("symlink", target)``, ``("hardlink", other_rel)``, ``("fifo",)``,
  ``("chardev", major, minor)``, ``("blockdev", major, minor)``, ``("dir",)``
* ``("file", content, mode)``: a regular file with explicit permission bits
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pytest_layers.changeset import ImageView, changes_from_tree, write_layer
from pytest_layers.store import Store

__all__ = [
    "Node",
    "snapshot_tree",
    "diff_snapshots",
    "make_file",
    "make_tree",
    "set_mtime",
    "set_tree_mtimes",
    "whiteout",
    "build_layer",
    "default_xattr_filter",
    "type_name",
    "BUSYBOX",
    "busybox_tree",
]

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


def type_name(st_mode: int) -> str:
    """Short name of an entry type: file, dir, symlink, fifo, chardev, blockdev, socket."""
    return _TYPES.get(stat.S_IFMT(st_mode), "unknown")


def default_xattr_filter(name: str) -> bool:
    """The xattrs a layer keeps (docs/dev/internals.md, canonical tar rules): ``user.*`` and
    ``security.capability``, minus the overlay and fuse-overlayfs bookkeeping."""
    if name.startswith(("user.overlay.", "user.fuseoverlayfs.")):
        return False
    return name.startswith("user.") or name == "security.capability"


@dataclass(frozen=True)
class Node:
    """What ``snapshot_tree`` records about one entry."""

    type: str
    mode: int  # permission bits incl. setuid/setgid/sticky (stat.S_IMODE)
    uid: int
    gid: int
    mtime: int  # whole seconds; symlink mtimes included, directory mtimes optional
    size: int  # regular files only, else 0
    sha256: str | None  # regular files only
    linkname: str | None  # symlink target
    rdev: tuple[int, int] | None  # (major, minor) of devices
    xattrs: tuple[tuple[str, bytes], ...] = ()
    hardlink_group: str | None = None  # smallest path sharing the inode, when nlink > 1 in tree


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str, keep: Callable[[str], bool]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        if keep(name):
            try:
                out.append((name, os.getxattr(path, name, follow_symlinks=False)))
            except OSError:
                continue
    return tuple(out)


def snapshot_tree(
    root: Path | str,
    *,
    dir_mtimes: bool = True,
    xattr_filter: Callable[[str], bool] | None = default_xattr_filter,
    hash_content: bool = True,
    exclude: Iterable[str] = (),
) -> dict[str, Node]:
    """Map every path under ``root`` (not ``root`` itself) to its ``Node``.

    ``dir_mtimes=False`` records 0 for directory mtimes (useful where a tool does not restore
    them). ``xattr_filter=None`` records no xattrs. ``exclude`` drops those relative paths and
    everything under them.
    """
    root_s = os.fspath(root)
    skip = set(exclude)
    nodes: dict[str, Node] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root_s, rel_dir) if rel_dir else root_s
        with os.scandir(abs_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if rel in skip:
                continue
            st = entry.stat(follow_symlinks=False)
            kind = type_name(st.st_mode)
            is_reg = kind == "file"
            is_dev = kind in ("chardev", "blockdev")
            node = Node(
                type=kind,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime=0 if (kind == "dir" and not dir_mtimes) else st.st_mtime_ns // 1_000_000_000,
                size=st.st_size if is_reg else 0,
                sha256=_sha256_file(entry.path) if (is_reg and hash_content) else None,
                linkname=os.readlink(entry.path) if kind == "symlink" else None,
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if is_dev else None,
                xattrs=_xattrs(entry.path, xattr_filter) if xattr_filter is not None else (),
            )
            nodes[rel] = node
            if kind != "dir" and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            if kind == "dir":
                stack.append(rel)
    for group in inodes.values():
        if len(group) < 2:
            continue
        leader = min(group)
        for rel in group:
            old = nodes[rel]
            nodes[rel] = replace(old, hardlink_group=leader)
    return dict(sorted(nodes.items()))


def diff_snapshots(a: Mapping[str, Node], b: Mapping[str, Node]) -> list[str]:
    """Human-readable differences between two snapshots ('' list when equal)."""
    out: list[str] = []
    for rel in sorted(set(a) | set(b)):
        if rel not in b:
            out.append(f"only in first: {rel} ({a[rel].type})")
        elif rel not in a:
            out.append(f"only in second: {rel} ({b[rel].type})")
        elif a[rel] != b[rel]:
            fields = [
                f"{k}: {getattr(a[rel], k)!r} != {getattr(b[rel], k)!r}"
                for k in a[rel].__dataclass_fields__
                if getattr(a[rel], k) != getattr(b[rel], k)
            ]
            out.append(f"{rel}: " + "; ".join(fields))
    return out


def make_file(path: Path, content: bytes | str = b"", mode: int | None = None) -> Path:
    """Create a regular file (and its parents) with ``content`` and optional permission bits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    if mode is not None:
        os.chmod(path, mode)
    return path


def make_tree(root: Path, spec: Mapping[str, Any]) -> Path:
    """Create the entries of ``spec`` under ``root`` in the order given (see module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, what in spec.items():
        path = Path(os.path.join(os.fspath(root), rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        if what is None or what == ("dir",):
            path.mkdir(exist_ok=True)
        elif isinstance(what, (bytes, str)):
            make_file(path, what)
        elif what[0] == "file":
            make_file(path, what[1], what[2] if len(what) > 2 else None)
        elif what[0] == "symlink":
            os.symlink(what[1], path)
        elif what[0] == "hardlink":
            os.link(os.path.join(os.fspath(root), what[1]), path)
        elif what[0] == "fifo":
            os.mkfifo(path)
        elif what[0] in ("chardev", "blockdev"):
            kind = stat.S_IFCHR if what[0] == "chardev" else stat.S_IFBLK
            os.mknod(path, kind | 0o644, os.makedev(what[1], what[2]))
        else:
            raise ValueError(f"make_tree: unknown spec {what!r} for {rel!r}")
    return root


def whiteout(path: Path) -> Path:
    """Create an overlay-native whiteout (character device 0/0) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    return path


def set_mtime(path: Path, seconds: int) -> None:
    """Set atime and mtime of ``path`` itself (symlinks are not followed)."""
    os.utime(path, (seconds, seconds), follow_symlinks=False)


def set_tree_mtimes(root: Path, seconds: int) -> None:
    """Set every mtime under ``root`` (children first, so directory mtimes stick)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            set_mtime(Path(dirpath, name), seconds)


def build_layer(store: Store, parent: str | None, tree: Path, name: str | None) -> str:
    """Store the difference between ``tree`` and the image ``parent`` as a new layer."""
    lowers = [store.layer_dir(i.chain_id) for i in reversed(store.chain(parent))] if parent else []
    entries = changes_from_tree(tree, ImageView(lowers, store.flavor))
    with store.staging() as staging:
        staged = staging / "layer"
        staged.mkdir()
        write_layer(entries, staged, flavor=store.flavor)
        return store.add_layer(staged, parent=parent, name=name, source="build").chain_id


#: Debian's busybox-static: one static binary, so an image made of it runs anywhere.
BUSYBOX = Path("/bin/busybox")
_APPLETS = (
    *("sh", "cat", "echo", "ls", "id", "hostname", "mount", "umount", "ps", "sleep", "touch"),
    *("grep", "head", "tail", "cut", "wc", "readlink", "kill"),
)


def busybox_tree(root: Path, files: Mapping[str, Any] | None = None) -> Path:
    """A minimal image tree: ``bin/busybox`` (copied from the host's busybox-static) with applet
    links (``bin/sh``, ``bin/cat``...), empty ``etc``, ``tmp``, ``proc``, ``dev``, plus ``files``
    as :func:`make_tree` takes them."""
    make_tree(root, {"etc": None, "tmp": None, "proc": None, "dev": None, **(files or {})})
    (root / "bin").mkdir(exist_ok=True)
    target = root / "bin/busybox"
    target.write_bytes(BUSYBOX.read_bytes())
    target.chmod(0o755)
    for applet in _APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    return root
