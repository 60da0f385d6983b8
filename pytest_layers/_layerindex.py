"""A stored layer's index, ``files.json``: one record per path (type, mode, owner, mtime,
content digest, link target, hardlink group, kept xattrs), made in the one read of a new layer
(:class:`_LayerIndex`, the visitor of :func:`layertar.stream_layer`) or by an independent walk
(:func:`build_manifest`, what ``verify`` compares); and disk use as ``du`` counts it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pytest_layers import _dirfd, _ocirules, layertar
from pytest_layers.layertar import Flavor


def disk_use(paths: Iterable[Path]) -> int:
    """Disk use of the trees at ``paths``, as ``du -s`` counts it: allocated blocks
    (``st_blocks * 512``) of every entry, directories included, each inode once however many
    hard links (or trees) reach it; symlinks are not followed and a missing path counts 0.

    The one notion of size the CLI and the report header print as "disk use"; a layer's
    ``size`` is something else (the bytes of its files' content, see docs/reference/cli.md)."""
    used = _DiskUse()
    stack = [os.fspath(p) for p in paths]
    while stack:  # a stack, not recursion: a committed rw layer may be very deep
        path = stack.pop()
        try:
            st = os.lstat(path)
        except OSError:
            continue
        used.add(st)
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError), os.scandir(path) as it:
                stack.extend(e.path for e in it)
    return used.total


class _DiskUse:
    """The rule of :func:`disk_use`, fed one ``lstat`` at a time: allocated bytes, each inode
    once. (``add_layer`` feeds it the stats its one read of a new layer took anyway.)"""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[tuple[int, int]] = set()

    def add(self, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key not in self._seen:
            self._seen.add(key)
            self.total += st.st_blocks * 512


def _kept_xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        if _ocirules.layer_keeps_xattr(name):
            with contextlib.suppress(OSError):
                value = os.getxattr(path, name, follow_symlinks=False)
                out[name] = hashlib.sha256(value).hexdigest()
    return out


_TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


def build_manifest(
    tree: Path, known: layertar.FileHashes | None = None
) -> dict[str, dict[str, Any]]:
    """Per-path record of a layer tree: what ``verify`` compares to name the path that changed.

    ``known`` holds file hashes taken by :func:`layertar.layer_diff_id` a moment before; a
    file whose inode, size and mtime are those it was hashed with is not read again (hash
    once: a 100,000-file layer otherwise opens and reads every file twice)."""
    manifest: dict[str, dict[str, Any]] = {}
    first_of_inode: dict[tuple[int, int], str] = {}

    # Depth first, children in name order, every entry named relative to its directory's fd: a
    # layer may be deeper than Python's recursion limit and than PATH_MAX (a test's committed
    # rw layer with a 10,000-deep directory chain, say).
    def record(_rel: str, fd: int, prefix: str) -> list[tuple[str, tuple[int, int], str]]:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs: list[tuple[str, tuple[int, int], str]] = []
        for entry in entries:
            name = entry.name
            rel = prefix + os.fsdecode(name)
            st = entry.stat(follow_symlinks=False)
            fmt = stat.S_IFMT(st.st_mode)
            sha256 = target = None
            if fmt == stat.S_IFREG:
                seen = known.get(rel) if known is not None else None
                if seen is not None and seen[:3] == (st.st_ino, st.st_size, st.st_mtime_ns):
                    sha256 = seen[3]
                else:
                    sha256 = _sha256_at(fd, name)
            elif fmt == stat.S_IFLNK:
                target = os.fsdecode(os.readlink(name, dir_fd=fd))
            rec = _record(st, sha256, target)
            if fmt != stat.S_IFDIR and st.st_nlink > 1:
                rec["link_group"] = first_of_inode.setdefault((st.st_dev, st.st_ino), rel)
            xattrs = _kept_xattrs(_dirfd.at(fd, name))
            if xattrs:
                rec["xattrs"] = xattrs
            manifest[rel] = rec
            if fmt == stat.S_IFDIR:
                subdirs.append((name, (st.st_dev, st.st_ino), rel + "/"))
        return subdirs

    _dirfd.walk(tree, "", record)
    return manifest


def _record(st: os.stat_result, sha256: str | None, target: str | None) -> dict[str, Any]:
    """The ``files.json`` record of one entry, from its ``lstat``, its content's sha256 (a
    regular file) and its target (a symlink): the one rule for :func:`build_manifest` and
    :class:`_LayerIndex` (hardlink groups and xattrs are theirs to add)."""
    mode = st.st_mode
    fmt = mode & 0o170000  # stat.S_IFMT and S_IMODE, without the calls (once per entry)
    rec: dict[str, Any] = {
        "type": _TYPE_NAMES.get(fmt, "unknown"),
        "mode": mode & 0o7777,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": int(st.st_mtime),
    }
    if fmt == stat.S_IFREG:
        rec["size"] = st.st_size
        rec["sha256"] = sha256
    elif fmt == stat.S_IFLNK:
        rec["target"] = target
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        rec["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return rec


class _LayerIndex:
    """The visitor of :func:`layertar.stream_layer` that makes a new layer's ``files.json``
    record by record as the tar streams: the same records :func:`build_manifest` makes by a
    walk of its own (``verify`` still walks, independently), and the layer's disk use.

    Hardlink groups are named after the fact: ``build_manifest`` names a group by its member
    that comes first in its own order (a directory's entries before its subdirectories'),
    which is not the tar's order."""

    def __init__(self, *, clamp_ns: int | None = None) -> None:
        # A tree settled as it streams is seen before its mtimes are clamped: record them as
        # they are made (no later than clamp_ns).
        self._clamp_ns = clamp_ns
        self.manifest: dict[str, dict[str, Any]] = {}
        self.disk_use = _DiskUse()
        self._groups: dict[tuple[int, int], list[str]] = {}

    def __call__(
        self,
        name: bytes,
        st: os.stat_result,
        sha256: str | None,
        xattrs: Sequence[tuple[bytes, bytes]],
        target: bytes | None,
    ) -> None:
        rel = os.fsdecode(name)
        rec = _record(st, sha256, os.fsdecode(target) if target is not None else "")
        if self._clamp_ns is not None and st.st_mtime_ns > self._clamp_ns:
            rec["mtime"] = self._clamp_ns // 1_000_000_000
        if xattrs:
            rec["xattrs"] = {os.fsdecode(k): hashlib.sha256(v).hexdigest() for k, v in xattrs}
        self.manifest[rel] = rec
        if st.st_nlink == 1 or st.st_mode & 0o170000 == stat.S_IFDIR:
            # Met once in a walk: no need to remember the inode (a directory is met once too).
            self.disk_use.total += st.st_blocks * 512
        else:
            self._groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            self.disk_use.add(st)

    def ungroup(self, rels: Iterable[str]) -> None:
        """The entries ``rels``, each met as the one link in the tree of an inode with others
        outside it, were made files of their own: they are in no hardlink group."""
        single = set(rels)
        if single:
            for key in [k for k, m in self._groups.items() if len(m) == 1 and m[0] in single]:
                del self._groups[key]

    def finish(self) -> dict[str, dict[str, Any]]:
        for members in self._groups.values():
            first = min(members, key=_manifest_order)
            for rel in members:
                self.manifest[rel]["link_group"] = first
        return self.manifest


_quote = json.encoder.encode_basestring_ascii  # json.dumps' own spelling of a str (ASCII)
_COMPACT = {"separators": (",", ":"), "sort_keys": True}


def manifest_json(manifest: dict[str, dict[str, Any]]) -> str:
    """``files.json`` as written: ``json.dumps(manifest, separators=(",", ":"),
    sort_keys=True)``, byte for byte, without json's key sort in every record.

    A file's record (the keys :func:`_record` gives a file, nothing added) and a directory's
    are written with their keys in the sorted order by one format each; any other record
    goes through ``json.dumps``."""
    parts = []
    for rel in sorted(manifest):
        rec = manifest[rel]
        n = len(rec)
        kind = rec["type"]
        # Every value here is an int from a stat (or a hex digest): json writes an int as
        # int.__repr__, which is what an f-string writes too.
        if n == 7 and kind == "file":
            text = (
                f'{{"gid":{rec["gid"]},"mode":{rec["mode"]},"mtime":{rec["mtime"]},'
                f'"sha256":{_quote(rec["sha256"])},"size":{rec["size"]},"type":"file",'
                f'"uid":{rec["uid"]}}}'
            )
        elif n == 5 and kind == "dir":
            text = (
                f'{{"gid":{rec["gid"]},"mode":{rec["mode"]},"mtime":{rec["mtime"]},'
                f'"type":"dir","uid":{rec["uid"]}}}'
            )
        else:
            text = json.dumps(rec, **_COMPACT)  # type: ignore[arg-type]
        parts.append(_quote(rel) + ":" + text)
    return "{" + ",".join(parts) + "}"


def _container_use(used: _DiskUse, container: Path, blob: Path | None) -> int:
    for path in (container, container / "diff", *([blob] if blob is not None else [])):
        used.add(os.lstat(path))
    return used.total


def _manifest_order(rel: str) -> tuple[tuple[int, str], ...]:
    # build_manifest's walk: a directory's own entries (0, name) before any entry of its
    # subdirectories (1, name), subdirectories in name order.
    parts = rel.split("/")
    return (*((1, p) for p in parts[:-1]), (0, parts[-1]))


def _sha256_at(dir_fd: int, name: str) -> str:
    h = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with open(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def count_files(manifest: dict[str, dict[str, Any]], flavor: Flavor) -> int:
    """What ``LayerInfo.files`` counts in a layer's manifest: entries that are neither
    directories nor whiteouts (0/0 devices in the ``overlay`` flavor, ``.wh.*`` files in the
    ``marker`` flavor)."""
    count = 0
    for rel, rec in manifest.items():
        kind = rec.get("type")
        if kind == "dir":
            continue
        if flavor == "overlay" and kind == "chardev" and rec.get("rdev") == [0, 0]:
            continue
        if flavor == "marker" and _ocirules.is_whiteout_name(rel.rpartition("/")[2]):
            continue
        count += 1
    return count


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("type") != new.get("type"):
        return f"type changed from {old.get('type')} to {new.get('type')}"
    what = []
    if old.get("sha256") != new.get("sha256") or old.get("size") != new.get("size"):
        if old.get("size") != new.get("size"):
            what.append(f"content changed (size {old.get('size')} -> {new.get('size')})")
        else:
            what.append("content changed (same size)")
    if old.get("target") != new.get("target"):
        what.append(f"symlink target changed from {old.get('target')!r} to {new.get('target')!r}")
    if old.get("mode") != new.get("mode"):
        what.append(f"mode changed from {old.get('mode', 0):04o} to {new.get('mode', 0):04o}")
    if (old.get("uid"), old.get("gid")) != (new.get("uid"), new.get("gid")):
        what.append(
            f"owner changed from {old.get('uid')}:{old.get('gid')} "
            f"to {new.get('uid')}:{new.get('gid')}"
        )
    if old.get("mtime") != new.get("mtime"):
        what.append(f"mtime changed from {old.get('mtime')} to {new.get('mtime')}")
    if old.get("rdev") != new.get("rdev"):
        what.append(f"device numbers changed from {old.get('rdev')} to {new.get('rdev')}")
    if old.get("xattrs", {}) != new.get("xattrs", {}):
        names = sorted(set(old.get("xattrs", {})) ^ set(new.get("xattrs", {}))) or sorted(
            k for k in old.get("xattrs", {}) if old["xattrs"][k] != new.get("xattrs", {}).get(k)
        )
        what.append(f"xattrs changed ({', '.join(names)})")
    if old.get("link_group") != new.get("link_group"):
        what.append("hardlink group changed")
    return "; ".join(what)


def compare_manifests(
    old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]
) -> list[tuple[str, str]]:
    """(path, what changed) for every path that differs, sorted by path."""
    out = []
    for path in sorted(set(old) | set(new)):
        if path not in new:
            out.append((path, f"removed ({old[path].get('type')})"))
        elif path not in old:
            out.append((path, f"added ({new[path].get('type')}, not in the stored manifest)"))
        elif old[path] != new[path]:
            out.append((path, _describe_change(old[path], new[path]) or "changed"))
    return out
