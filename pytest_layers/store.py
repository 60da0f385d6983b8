"""The content-addressed layer store: layers, refs, build-cache keys, snapshots, locks, leases.

Layout (docs/dev/internals.md)::

    STORE/VERSION                       {"format": 1, "flavor": "overlay" | "marker"}
    STORE/layers/<chain_hex>/diff/      the layer tree, ready to be an overlay lowerdir
    STORE/layers/<chain_hex>/layer.json chain_id, diff_id, parent, name, created, size, files, ...
    STORE/layers/<chain_hex>/files.json per-path manifest, so that verify can name what changed
    STORE/layers/<chain_hex>/blob.tar   imports only: the original layer blob (its digest = diff_id)
    STORE/refs/names/<name>             latest chain id built for a layer name
    STORE/refs/cache/<key>              build-cache key -> chain id
    STORE/refs/snapshots/<test>/<n>     committed snapshots of a test, n increasing
    STORE/tmp/  STORE/locks/  STORE/leases/

Invariants: a layer directory appears only complete (it is assembled in ``tmp/`` and renamed
into place) and never changes afterwards; removal renames it back into ``tmp/`` before deleting,
so a process killed at any point leaves no partial layer where readers look. Leftovers in
``tmp/`` carry their owner's pid and start time and are swept once that process is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import quote

import filelock

from pytest_layers import (
    _access,
    _dirfd,
    _faultpoints,
    _ocirules,
    _proctag,
    changeset,
    errors,
    layertar,
)
from pytest_layers._fmt import short_digest
from pytest_layers._mounts import filesystem_type
from pytest_layers._removal import remove_tree
from pytest_layers.layertar import Flavor

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_LOCK_TIMEOUT",
    "MAX_CHAIN_LENGTH",
    "Store",
    "preflight",
    "LayerInfo",
    "SnapshotInfo",
    "Problem",
    "PruneReport",
    "probe_flavor",
    "filesystem_type",
    "build_manifest",
    "compare_manifests",
    "count_files",
]

#: Format of the store layout this module reads and writes (``VERSION``'s ``format``).
FORMAT_VERSION = 1
#: Seconds ``build_lock`` waits for another builder of the same key before giving up.
DEFAULT_LOCK_TIMEOUT = 1800.0
#: Layers in one chain at most: the kernel stacks 500, OCI images hold a few dozen. A longer
#: ``parent`` chain (or a loop) in ``layer.json`` is a damaged or hostile store.
MAX_CHAIN_LENGTH = 4096
#: Bytes a ref or ``layer.json`` may hold; refs are a few hundred.
_MAX_JSON = 1 << 20
#: Names a store's own directory may hold: a directory holding anything else and no ``VERSION``
#: is not a store, and is never adopted as one (its tmp/ and layers/ would be emptied).
_LAYOUT_NAMES = frozenset(
    {"VERSION", "layers", "tmp", "locks", "leases", "refs", "scratch", "mounts", "lost+found"}
)
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_FLAVORS = _ocirules.FLAVORS
_SOURCES = ("build", "commit", "import", "init")
_CHAIN_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]+")
# Filesystems where a 0/0 character device is a whiteout rather than a file of its own.
_UNION_FS = ("overlay", "aufs", "fuse.fuse-overlayfs", "fuse.unionfs", "fuse.mergerfs")


# --------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What ``layer.json`` says about a stored layer.

    ``size`` is the bytes of regular-file content in the layer's tree (plus the kept blob of an
    imported layer). ``files`` is the number of non-directory entries the layer adds or changes
    (regular files, symlinks, devices, fifos; each hardlink counted): directories and whiteouts
    are not counted, so a layer of 10,000 files in 100 directories says 10000.
    ``alias_of`` is set on an alias: a chain position whose tree is the stored layer
    ``alias_of`` (same diff_id, another parent), see :meth:`Store.add_alias`.
    ``disk_use`` is the layer directory's disk use (see :func:`disk_use`) measured when it was
    stored, so that a session header can sum it without walking trees (None in stores made
    before it was recorded).
    """

    chain_id: str
    diff_id: str
    parent: str | None
    name: str | None
    created: float
    size: int
    files: int
    source: str
    blob: Path | None = None
    tree_digest: str | None = None
    alias_of: str | None = None
    disk_use: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["blob"] = self.blob.name if self.blob is not None else None
        if self.disk_use is None:
            del data["disk_use"]
        if self.alias_of is None:
            del data["alias_of"]
        else:
            # An alias has no blob or tree of its own: both are read from its target.
            del data["blob"], data["tree_digest"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], layer_root: Path) -> LayerInfo:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` for a record that is not one."""
        blob = data.get("blob")
        if blob is not None and (not isinstance(blob, str) or "/" in blob or blob in ("", "..")):
            raise ValueError(f"blob {blob!r} is not a file name")
        for key in ("chain_id", "diff_id", "source"):
            if not isinstance(data[key], str):
                raise TypeError(f"{key} is not a string")
        for key in ("parent", "alias_of"):
            if data.get(key) is not None and not _CHAIN_RE.fullmatch(str(data[key])):
                raise ValueError(f"{key} {data[key]!r} is not a chain id")
        return cls(
            chain_id=data["chain_id"],
            diff_id=data["diff_id"],
            parent=data.get("parent"),
            name=data.get("name"),
            created=float(data["created"]),
            size=int(data["size"]),
            files=int(data["files"]),
            source=data["source"],
            blob=layer_root / blob if blob else None,
            tree_digest=data.get("tree_digest"),
            alias_of=data.get("alias_of"),
            disk_use=int(data["disk_use"]) if data.get("disk_use") is not None else None,
        )


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One committed snapshot of a test: ``snapshot:<test>`` resolves to the highest ``n``,
    ``snapshot:<test>@<n>`` to that one.

    ``chain_id`` is the rw layer on the image (what ``export`` writes). ``with_init`` is the
    chain the test saw: the image, the test's init layer, then the rw layer (None when the test
    had no init files); ``shell``, ``mount`` and ``diff --init`` show it.
    """

    test: str
    n: int
    chain_id: str
    created: float
    with_init: str | None = None

    @property
    def ref(self) -> str:
        """``snapshot:<test>``: the test's latest snapshot (this one only while it is)."""
        return f"snapshot:{self.test}"

    @property
    def numbered_ref(self) -> str:
        """``snapshot:<test>@<n>``: this snapshot, for as long as it is kept."""
        return f"snapshot:{self.test}@{self.n}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One inconsistency ``verify`` found; ``path`` is the path inside the layer, if any."""

    chain_id: str
    name: str | None
    path: str | None
    message: str

    def __str__(self) -> str:
        where = f"layer {short_digest(self.chain_id)}"
        if self.name:
            where += f" ({self.name})"
        if self.path is not None:
            where += f": /{self.path}"
        return f"{where}: {self.message}"


@dataclasses.dataclass
class PruneReport:
    """What ``prune`` removed and how many bytes it freed (``freed_bytes``: the disk use of
    the removed layers, as ``du`` counts it)."""

    removed_layers: list[str] = dataclasses.field(default_factory=list)
    removed_snapshots: list[str] = dataclasses.field(default_factory=list)
    removed_tmp: int = 0
    removed_leases: int = 0
    freed_bytes: int = 0
    kept_layers: int = 0


# --------------------------------------------------------------------------------------------
# Probing the store's filesystem


def probe_flavor(directory: Path) -> Flavor:
    """Which whiteout flavor a store in ``directory`` can hold.

    ``"overlay"`` needs a filesystem that keeps a 0/0 character device as an entry of its own
    and keeps ``user.*`` xattrs. A union filesystem (overlayfs, as inside a container) turns the
    device into a real whiteout that hides itself, so it gets ``"marker"``; so does any
    filesystem that refuses the device or the xattr.
    """
    if filesystem_type(directory) in _UNION_FS:
        return "marker"
    # Named like every tmp entry, so that a concurrent opener's sweep leaves it alone.
    probe = directory / f"{_proctag.store_tag()}-probe-{secrets.token_hex(4)}"
    os.mkdir(probe, 0o700)
    try:
        device = probe / "whiteout"
        try:
            os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            st = os.lstat(device)
        except OSError:
            return "marker"
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != 0 or os.listdir(probe) != ["whiteout"]:
            return "marker"
        try:
            os.setxattr(probe, "user.pytest-layers.probe", b"y")
            if os.getxattr(probe, "user.pytest-layers.probe") != b"y":
                return "marker"
        except OSError:
            return "marker"
        return "overlay"
    finally:
        _rmtree(probe)


# --------------------------------------------------------------------------------------------
# Small helpers


def _hex(chain_id: str) -> str:
    if not _CHAIN_RE.fullmatch(chain_id):
        raise errors.LayerNotFoundError(chain_id, hint="a chain id looks like sha256:<64 hex>")
    return chain_id[7:]


def _ref_filename(value: str) -> str:
    """A filename for a ref (name, key, test id) that round-trips through the ref's JSON."""
    name = quote(value, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if not name or len(name.encode()) > 200:
        name = (
            name[:150]
            + "~"
            + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        )
    return name


def _rmtree(path: Path) -> None:
    """Remove a tree we own, whatever the modes and the depth inside it; a missing path is
    fine. (A test's committed rw layer may be deeper than Python's recursion limit, which
    ``shutil.rmtree`` is not.)"""
    remove_tree(path)


class _BadJson(ValueError):
    """A store file that is not what it should be; the message says what it is instead."""


def _read_json(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> dict[str, Any]:
    """The JSON object in the store file ``path``: never through a symlink, only from a
    regular file of at most :data:`_MAX_JSON` bytes (a fifo planted there must not hang the
    reader). ``FileNotFoundError`` when absent; :class:`_BadJson` saying why otherwise."""
    try:
        fd = os.open(path, _O_READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _BadJson("a symlink, not a file of the store") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):
            raise _BadJson("not a regular file") from None
        raise
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _BadJson("not a regular file")
        raw = f.read(_MAX_JSON + 1)
    if len(raw) > _MAX_JSON:
        raise _BadJson(f"larger than {_MAX_JSON} bytes")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _BadJson("JSON nested too deeply") from None
    except ValueError as exc:
        raise _BadJson(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _BadJson(f"a JSON {type(data).__name__}, not an object")
    return data


def _write_new(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    """Write a new file (a tmp name of our own): ``O_EXCL | O_NOFOLLOW``, so a name planted in
    advance is never written through; ``mode`` whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with open(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, mode)
        f.write(text)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


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


def _owner_alive(name: str) -> bool:
    """Whether the process whose tag begins the tmp or lease entry ``name`` still runs."""
    parsed = _proctag.parse(name)
    return parsed is not None and _proctag.alive(*parsed)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _blob_digest(path: Path) -> str:
    """``sha256:`` of a layer blob's uncompressed bytes (a DiffID), gzip or plain."""
    h = hashlib.sha256()
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: BinaryIO = cast(BinaryIO, gzip.GzipFile(fileobj=raw)) if gz else raw
        while chunk := stream.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


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
    fmt = stat.S_IFMT(st.st_mode)
    rec: dict[str, Any] = {
        "type": _TYPE_NAMES.get(fmt, "unknown"),
        "mode": stat.S_IMODE(st.st_mode),
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

    def __init__(self) -> None:
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
        fmt = stat.S_IFMT(st.st_mode)
        rec = _record(st, sha256, os.fsdecode(target) if target is not None else "")
        key = (st.st_dev, st.st_ino)
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            self._groups.setdefault(key, []).append(rel)
        if xattrs:
            rec["xattrs"] = {os.fsdecode(k): hashlib.sha256(v).hexdigest() for k, v in xattrs}
        self.manifest[rel] = rec
        self.disk_use.add(st)

    def finish(self) -> dict[str, dict[str, Any]]:
        for members in self._groups.values():
            first = min(members, key=_manifest_order)
            for rel in members:
                self.manifest[rel]["link_group"] = first
        return self.manifest


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


# --------------------------------------------------------------------------------------------
# Locks and leases


def _planted(path: str | os.PathLike[str], exc: OSError) -> errors.StoreError:
    """The error for a lock or lease name that cannot be opened as our own file."""
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        owner = os.geteuid()
    if owner != os.geteuid() and exc.errno != errno.ELOOP:
        return errors.StoreError(
            exc.errno or errno.EACCES,
            f"{path} belongs to {_access.owner_name(owner)}, not to you "
            f"({_access.owner_name(os.geteuid())}): remove it as its owner (it is only a lock), "
            "or use a store of your own (--layers-store PATH)",
            os.fspath(path),
        )
    why = "a symlink" if exc.errno == errno.ELOOP else f"unusable ({exc.strerror or exc})"
    return errors.StoreError(
        exc.errno or errno.EPERM,
        f"{path} is {why}, where the store keeps a lock file: someone planted it; remove it "
        "(rm) and run again",
        os.fspath(path),
    )


class _StoreLock(filelock.FileLock):
    """A store lock: created with the store's lock mode, never opened through a symlink (the
    pinned filelock opens lock files with ``O_NOFOLLOW``; see pyproject.toml), and an entry
    planted in its place is a one-line :class:`errors.StoreError`."""

    def __init__(self, lock_file: str, *, timeout: float = -1, mode: int = 0o600) -> None:
        super().__init__(lock_file, timeout=timeout, mode=mode)

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().acquire(*args, **kwargs)
        except filelock.Timeout:
            raise
        except OSError as exc:
            if isinstance(exc, errors.LayersError):
                raise
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
                raise _planted(self.lock_file, exc) from None
            raise


class _BuildLock(_StoreLock):
    """A build-cache key's lock whose timeout error names the key and the lock file."""

    def __init__(self, lock_file: str, *, key: str, timeout: float, mode: int = 0o600) -> None:
        super().__init__(lock_file, timeout=timeout, mode=mode)
        self.key = key

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().acquire(*args, **kwargs)
        except filelock.Timeout as exc:
            waited = kwargs.get("timeout", args[0] if args else self.timeout)
            raise errors.LockTimeoutError(self.key, self.lock_file, waited) from exc


class _GcLock:
    """Store-wide shared/exclusive lock: prune holds it exclusively while it decides and renames
    layers away; adding a layer or a lease holds it shared, so a layer cannot vanish between
    "it exists" and "it is leased". (filelock has no shared mode, hence plain flock.)"""

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool) -> Iterator[None]:
        # O_NOFOLLOW: a symlink planted as gc.lock must not make us create or open its target.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, self.mode)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise _planted(self.path, exc) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _planted(self.path, OSError(errno.EINVAL, "not a regular file"))
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != self.mode:
                os.fchmod(fd, self.mode)  # the umask must not keep other members out
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing drops the flock


class _Lease:
    """A file under ``leases/`` naming chain ids in use, valid while its filelock is held.

    The file is a journal of ``+<chain id>`` / ``-<chain id>`` lines, only ever appended to:
    an append is one small ``write`` (atomic with ``O_APPEND``), where rewriting the file and
    renaming it over the old one costs a data flush on ext4 each time.
    """

    def __init__(self, store: Store, chain_ids: Iterable[str]) -> None:
        self.chain_ids: set[str] = set()
        base = store.root / "leases" / f"{_proctag.store_tag()}-{secrets.token_hex(6)}"
        self.path = base.with_suffix(".held")
        # The lock is taken before the file exists, so no sweeper ever sees a lease whose
        # lock is free although its owner is alive.
        mode = store.access.lock_mode
        self.lock = _StoreLock(str(base.with_suffix(".lock")), mode=mode)
        self.lock.acquire(timeout=10)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, mode)
        os.fchmod(self.fd, mode)
        self.add(chain_ids)

    def add(self, chain_ids: Iterable[str]) -> None:
        new = set(chain_ids) - self.chain_ids
        if new:
            os.write(self.fd, "".join(f"+{c}\n" for c in sorted(new)).encode())
            self.chain_ids |= new

    def drop(self, chain_id: str) -> None:
        if chain_id in self.chain_ids:
            os.write(self.fd, f"-{chain_id}\n".encode())
            self.chain_ids.discard(chain_id)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        lock_path = Path(self.lock.lock_file)
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        self.lock.release()


def _read_lease(path: Path) -> set[str]:
    held: set[str] = set()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        fd = os.open(path, _O_READ)
        with open(fd, encoding="utf-8") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return held
            text = f.read()
        for line in text.split("\n")[:-1]:  # a torn last line has no newline yet
            if line[:1] == "+":
                held.add(line[1:])
            elif line[:1] == "-":
                held.discard(line[1:])
    return held


def _release_lease(lease: _Lease | None) -> None:
    if lease is not None:
        lease.release()


# --------------------------------------------------------------------------------------------
# The store


def preflight(root: Path | str, *, shared_group: str | None = None) -> None:
    """The checks :class:`Store` makes of an existing store, without creating or writing
    anything: a session makes them before it enters a user namespace, where other users' uids
    all read as ``nobody``, and before it sweeps the store's scratch directories."""
    access = _access.Access.resolve(shared_group)
    path = Path(os.path.abspath(root))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise _access.not_a_directory(path, st.st_mode)
    access.check(path, st)
    for sub in ("layers", "tmp", "locks", "leases", "refs", "scratch", "scratch/views", "mounts"):
        with contextlib.suppress(FileNotFoundError):
            access.check(path / sub, os.lstat(path / sub))


class Store:
    """A layer store rooted at ``root``; creates the layout and probes the flavor when new.

    The store is its owner's alone unless ``shared_group`` names the group whose members share
    it (docs/concepts/security.md): a store, or any directory in it, owned by another user (or
    group) or writable by others is refused, and so is a non-empty directory that is not a
    store. On a read-only filesystem the store opens read-only (:attr:`read_only`): reading
    works, writing raises.

    Raises :class:`errors.StoreError` when the directory cannot be used or written and
    :class:`errors.StoreFormatError` when ``VERSION`` names a format this version cannot read.
    """

    root: Path
    flavor: Flavor
    #: The sharing policy: private (the owner only) or one group's.
    access: _access.Access
    #: True when the store's filesystem is mounted read-only.
    read_only: bool
    #: One line per stray entry skipped while reading (a directory in ``refs/names``, say).
    warnings: list[str]

    def __init__(self, root: Path | str, *, shared_group: str | None = None) -> None:
        self.root = Path(os.path.abspath(root))
        self._layers = self.root / "layers"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        self._info_cache: dict[str, LayerInfo] = {}
        self._auto_lease: _Lease | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.warnings = []
        self.access = _access.Access.resolve(shared_group)
        self.read_only = self._open_root()
        self._make_layout()
        self.flavor = self._read_or_create_version()
        self._gc = _GcLock(self._locks / "gc.lock", self.access.lock_mode)
        if not self.read_only:
            self._sweep_tmp()

    # -- opening -------------------------------------------------------------------------------

    def _not_writable(self, exc: OSError, path: Path) -> errors.StoreError:
        if exc.errno == errno.EROFS:
            return self._read_only_error()
        where = "its directory" if path == self.root else str(path.relative_to(self.root))
        return errors.StoreError(
            exc.errno or errno.EACCES,
            f"the layer store {self.root} is not writable by {_access.owner_name(os.geteuid())} "
            f"({exc.strerror or exc} on {where}): make it writable (chown/chmod) or choose "
            "another directory with --layers-store=PATH (ini: layers_store)",
            str(path),
        )

    def _read_only_error(self) -> errors.StoreError:
        return errors.StoreError(
            errno.EROFS,
            f"the layer store {self.root} is on a read-only filesystem: ls, inspect, diff, "
            "verify and export work there, building, committing, importing and pruning do not; "
            "point --layers-store (pytest-layers --store) at a writable directory",
            str(self.root),
        )

    def check_writable(self) -> None:
        """Raise :class:`errors.StoreError` (``EROFS``) when the store is read-only."""
        if self.read_only:
            raise self._read_only_error()

    _writable = check_writable

    def _open_root(self) -> bool:
        """Create the store's directory or check the existing one; returns whether its
        filesystem is read-only."""
        try:
            st = os.stat(self.root)  # the root itself may be a symlink its owner made
        except FileNotFoundError:
            try:
                self.root.parent.mkdir(parents=True, exist_ok=True)
                self.access.make_dir(self.root, exist_ok=True)
                st = os.stat(self.root)
            except OSError as exc:
                if isinstance(exc, errors.LayersError):
                    raise
                if exc.errno == errno.ENOTDIR:
                    raise errors.StoreError(
                        errno.ENOTDIR,
                        f"cannot create the layer store {self.root}: a parent of it is not a "
                        "directory; point --layers-store (pytest-layers --store) at a directory",
                        str(self.root),
                    ) from None
                raise self._not_writable(exc, self.root) from None
        except OSError as exc:
            raise self._not_writable(exc, self.root) from None
        if not stat.S_ISDIR(st.st_mode):
            raise _access.not_a_directory(self.root, st.st_mode)
        self.access.check(self.root, st)
        read_only = bool(os.statvfs(self.root).f_flag & os.ST_RDONLY)
        try:
            os.lstat(self.root / "VERSION")
        except FileNotFoundError:
            strangers = sorted(set(os.listdir(self.root)) - _LAYOUT_NAMES)
            if strangers:
                shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
                raise errors.StoreError(
                    errno.ENOTEMPTY,
                    f"{self.root} is not empty ({shown}) and has no VERSION file, so it is not "
                    "a pytest-layers store; it is never adopted as one (its tmp/ and layers/ "
                    "would be emptied): point --layers-store (pytest-layers --store) at a new "
                    "or empty directory",
                    str(self.root),
                ) from None
            if read_only:
                raise errors.StoreError(
                    errno.EROFS,
                    f"{self.root} is on a read-only filesystem and holds no store (no VERSION "
                    "file): point --layers-store (pytest-layers --store) at a store",
                    str(self.root),
                ) from None
        if not read_only and stat.S_IMODE(st.st_mode) & ~self.access.dir_mode & 0o777:
            # A store made before stores were private (0755): nobody else needs to reach it.
            try:
                os.chmod(self.root, self.access.dir_mode)
            except OSError as exc:
                raise self._not_writable(exc, self.root) from None
        return read_only

    def _layout(self) -> list[Path]:
        return [
            self._layers,
            self._tmp,
            self._locks,
            self.root / "leases",
            self.root / "refs",
            self.root / "refs" / "names",
            self.root / "refs" / "cache",
            self.root / "refs" / "snapshots",
            self.root / "refs" / "rebuild",
            self.root / "scratch",
            self.root / "scratch" / "views",
            self.root / "mounts",  # pytest-layers mount's records and views
        ]

    def _make_layout(self) -> None:
        dirs = self._layout()
        for d in dirs:
            if not self.read_only:
                try:
                    scratch = d in (self.root / "scratch", self.root / "scratch" / "views")
                    scratch = scratch or d == self.root / "mounts"
                    self.access.make_dir(d, exist_ok=True, inherit=not scratch)
                except OSError as exc:
                    raise self._not_writable(exc, d) from None
            # Every directory of the store is trusted input: ours (or the group's), real
            # (no symlink to elsewhere), writable by nobody else.
            try:
                self.access.check(d, os.lstat(d))
            except FileNotFoundError:
                if not self.read_only:
                    raise
        if not self.access.shared:
            self._check_entries(dirs[:4] + dirs[5:9])
        if self.read_only:
            return
        # mkdir succeeds on existing directories without write access: check each one now
        # rather than fail mid-session, and prove it with a real write where it is harmless.
        for d in [self.root, *dirs]:
            if not os.access(d, os.W_OK | os.X_OK):
                raise self._not_writable(OSError(errno.EACCES, os.strerror(errno.EACCES)), d)
        probe = self._new_tmp_path("probe")
        try:
            _write_new(probe, "")
            probe.unlink()
        except OSError as exc:
            raise self._not_writable(exc, self._tmp) from exc

    def _check_entries(self, dirs: list[Path]) -> None:
        """Refuse a private store holding another user's entries (a layer or a lock that a
        ``sudo pytest`` of an older version left): they would fail this run half-way, and a
        layer someone else can change is not this user's to mount."""
        me = os.geteuid()
        for d in dirs:
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for entry in entries:
                owner = entry.stat(follow_symlinks=False).st_uid
                if owner != me:
                    raise errors.StoreError(
                        errno.EPERM,
                        f"{entry.path} belongs to {_access.owner_name(owner)}, not to you "
                        f"({_access.owner_name(me)}): another user wrote into your store; "
                        f"remove it as that user (`sudo rm -rf {entry.path}`) or use another "
                        "store (--layers-store PATH)",
                        entry.path,
                    )

    def _read_or_create_version(self) -> Flavor:
        path = self.root / "VERSION"
        if not os.path.lexists(path):
            data = {"format": FORMAT_VERSION, "flavor": probe_flavor(self._tmp)}
            tmp = self._new_tmp_path("version")
            _write_new(tmp, json.dumps(data, indent=2) + "\n", self._file_mode)
            try:
                # link, not replace: two processes creating one store keep the first VERSION.
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return self._check_version(path)

    @property
    def _file_mode(self) -> int:
        return 0o664 if self.access.shared else 0o644

    def _check_version(self, path: Path) -> Flavor:
        fix = (
            f"upgrade pytest-layers, or use another store with --layers-store=PATH "
            f"(this pytest-layers reads store format {FORMAT_VERSION})"
        )
        try:
            data = _read_json(path)
        except (OSError, ValueError) as exc:
            raise errors.StoreFormatError(
                f"{path} is unreadable or not a JSON object ({exc}): the store is damaged or "
                f"was written by another tool; {fix}"
            ) from None
        found = data.get("format")
        if not isinstance(found, int) or isinstance(found, bool) or found < 1:
            raise errors.StoreFormatError(f"{path} names an unknown store format {found!r}; {fix}")
        if found > FORMAT_VERSION:
            raise errors.StoreFormatError(
                f"the layer store {self.root} has format version {found}, newer than the "
                f"version {FORMAT_VERSION} this pytest-layers supports; {fix}"
            )
        flavor = data.get("flavor")
        if flavor not in _FLAVORS:
            raise errors.StoreFormatError(
                f"{path} names an unknown whiteout flavor {flavor!r} (known: "
                f"{', '.join(_FLAVORS)}); {fix}"
            )
        return cast(Flavor, flavor)

    # -- tmp -----------------------------------------------------------------------------------

    def _new_tmp_path(self, purpose: str) -> Path:
        return self._tmp / f"{_proctag.store_tag()}-{purpose}-{secrets.token_hex(6)}"

    def _new_tmp_dir(self, purpose: str) -> Path:
        path = self._new_tmp_path(purpose)
        # Becomes layers/<hex>: its owner's (or the shared group's) alone, so that nobody else
        # reaches the layer's setuid files or device nodes through the store.
        self.access.make_dir(path)
        return path

    def _sweep_tmp(self) -> int:
        """Remove tmp entries whose owner process is gone; returns how many."""
        removed = 0
        try:
            names = os.listdir(self._tmp)
        except FileNotFoundError:
            return 0
        for name in names:
            if _owner_alive(name):
                continue
            victim = self._tmp / name
            # Claim it by renaming first, so two sweepers never delete under each other.
            claimed = self._new_tmp_path("sweep")
            try:
                os.rename(victim, claimed)
            except OSError:
                continue
            if claimed.is_dir() and not claimed.is_symlink():
                # In a shared store another member's leftovers may hold directories only
                # their owner can empty: left for that member's next sweep.
                with contextlib.suppress(PermissionError):
                    _rmtree(claimed)
            else:
                with contextlib.suppress(FileNotFoundError):
                    claimed.unlink()
            removed += 1
        return removed

    def _write_json_atomic(self, path: Path, data: Any) -> None:
        tmp = self._new_tmp_path("ref")
        _write_new(tmp, json.dumps(data, indent=1, sort_keys=True) + "\n", self._file_mode)
        os.replace(tmp, path)  # replaces a planted symlink itself, never its target

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty directory in ``STORE/tmp`` to build a layer tree in; removed on exit
        unless ``add_layer`` took it."""
        self._writable()
        container = self._new_tmp_dir("stage")
        staged = container / "diff"
        staged.mkdir()
        self.access.private_subtree(staged)
        try:
            yield staged
        finally:
            _rmtree(container)

    # -- layers --------------------------------------------------------------------------------

    def layer_dir(self, chain_id: str) -> Path:
        """The layer's tree, ``STORE/layers/<hex>/diff``; for an alias, its target's tree."""
        path = self._layers / _hex(chain_id) / "diff"
        info = self._info_cache.get(chain_id)
        if info is None:
            # An alias is the only stored layer without a tree of its own.
            if path.is_dir() or not self.has_layer(chain_id):
                return path
            info = self.layer_info(chain_id)
        if info.alias_of is not None:
            return self._layers / _hex(info.alias_of) / "diff"
        return path

    def has_layer(self, chain_id: str) -> bool:
        """Whether the store holds the (complete) layer ``chain_id``."""
        try:
            return (self._layers / _hex(chain_id) / "layer.json").is_file()
        except errors.LayerNotFoundError:
            return False

    def layer_info(self, chain_id: str) -> LayerInfo:
        """The layer's ``layer.json``; :class:`errors.LayerNotFoundError` when it is absent,
        :class:`errors.StoreError` when the layer directory or its record is not what the store
        wrote (a symlink, another user's directory, a record that is not a JSON object)."""
        return self._layer_info(chain_id, alias_ok=True)

    def _layer_info(self, chain_id: str, *, alias_ok: bool) -> LayerInfo:
        info = self._info_cache.get(chain_id)
        if info is not None:
            return info
        layer_root = self._layers / _hex(chain_id)
        record = layer_root / "layer.json"
        try:
            self.access.check(layer_root, os.lstat(layer_root))
            data = _read_json(record)
            info = LayerInfo.from_json(data, layer_root)
        except FileNotFoundError:
            raise errors.LayerNotFoundError(
                chain_id, hint=f"not in the store {self.root}"
            ) from None
        except (_BadJson, KeyError, TypeError, ValueError) as exc:
            what = f"lacks {exc}" if isinstance(exc, KeyError) else f"is {exc}"
            if not isinstance(exc, _BadJson):
                what = f"is not a layer record ({what.removeprefix('is ')})"
            raise errors.StoreError(
                errno.EIO,
                f"{record} {what}: the store is damaged; run `pytest-layers verify`, then "
                "`pytest-layers prune` or delete that layer directory",
                str(record),
            ) from None
        if info.alias_of is not None:
            if not alias_ok:
                raise errors.StoreError(
                    errno.EIO,
                    f"{record}: alias of {info.alias_of}, itself an alias: the store is "
                    "damaged; run `pytest-layers verify`",
                    str(record),
                )
            try:
                target = self._layer_info(info.alias_of, alias_ok=False)
            except errors.LayerNotFoundError:
                raise errors.LayerNotFoundError(
                    chain_id,
                    hint=f"it is an alias of {info.alias_of}, which is not in the store "
                    f"{self.root}",
                ) from None
            info = dataclasses.replace(info, blob=target.blob, tree_digest=target.tree_digest)
        self._info_cache[chain_id] = info
        return info

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def _layer_names(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        with os.scandir(self._layers) as it:
            for entry in it:
                if len(entry.name) == 64 and _HEX_RE.fullmatch(entry.name):
                    yield "sha256:" + entry.name, entry

    def layers(self) -> list[str]:
        """Chain ids of every stored layer (an entry of ``layers/`` that is a symlink or a
        file is skipped, with a line in :attr:`warnings`; ``verify`` reports it)."""
        out = []
        for chain_id, entry in self._layer_names():
            if not entry.is_dir(follow_symlinks=False):
                if os.path.lexists(os.path.join(entry.path, "layer.json")):
                    self._warn(f"{entry.path}: not a layer directory (skipped; see verify)")
                continue
            if os.path.lexists(os.path.join(entry.path, "layer.json")):
                out.append(chain_id)
        return sorted(out)

    def chain(self, chain_id: str) -> list[LayerInfo]:
        """The layer and its ancestors, bottom first.

        Raises :class:`errors.StoreError` for a ``parent`` loop or a chain longer than
        :data:`MAX_CHAIN_LENGTH` (a damaged or hostile store)."""
        out: list[LayerInfo] = []
        seen: set[str] = set()
        current: str | None = chain_id
        while current is not None:
            if current in seen or len(out) >= MAX_CHAIN_LENGTH:
                why = (
                    f"its parents loop back to {current}"
                    if current in seen
                    else f"it is longer than {MAX_CHAIN_LENGTH} layers"
                )
                raise errors.StoreError(
                    errno.ELOOP,
                    f"the chain of layer {chain_id} in the store {self.root} is broken: {why} "
                    f"(layers/{_hex(out[-1].chain_id)}/layer.json names parent {current}); "
                    "run `pytest-layers verify`, then delete the damaged layers",
                    str(self.root),
                )
            seen.add(current)
            info = self.layer_info(current)
            out.append(info)
            current = info.parent
        out.reverse()
        return out

    def add_layer(
        self,
        staged: Path,
        *,
        parent: str | None,
        name: str | None,
        source: str,
        diff_id: str | None = None,
        blob: Path | None = None,
        blob_verified: bool = False,
        what: str | None = None,
        written: layertar.WrittenFiles | None = None,
    ) -> LayerInfo:
        """Store the layer tree ``staged`` (best made with :meth:`staging`) on top of ``parent``.

        The tree is moved, not copied. If the store already holds the same chain id, ``staged``
        is discarded and the existing layer returned: a stored layer is never overwritten.
        Imports pass the image's ``diff_id`` and the original ``blob`` (kept as ``blob.tar``;
        moved, not copied, when it lies in the store's own staging area). ``blob_verified``
        says the caller hashed ``blob`` to ``diff_id`` as it wrote it (the importer does), so
        it is not read again. When ``name`` is given, ``refs/names/<name>`` points to the result.
        A full disk raises :class:`errors.NoSpaceError` naming ``what`` (default: the layer's
        name, or its chain id and source). ``written`` is what :func:`changeset.write_layer`
        kept of the small files it just wrote into ``staged`` (see :class:`layertar.Written`).
        """
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {', '.join(_SOURCES)}, not {source!r}")
        self._writable()
        staged = Path(os.path.abspath(staged))
        parent_diff_ids = [info.diff_id for info in self.chain(parent)] if parent else []
        # The one read of the new tree: its diff_id, its files.json and its disk use together.
        index = _LayerIndex()
        tree_digest = layertar.stream_layer(
            staged, flavor=self.flavor, visit=index, written=written
        )
        if blob is not None and not (blob_verified and diff_id is not None):
            blob_digest = _blob_digest(blob)
            if diff_id is None:
                diff_id = blob_digest
            elif blob_digest != diff_id:
                raise errors.InvalidLayerError(
                    f"layer blob {blob} has digest {blob_digest}, not the DiffID {diff_id} it "
                    "was imported with: the image is damaged"
                )
        imported = diff_id is not None
        if diff_id is None:
            diff_id = tree_digest
        chain_id = layertar.chain_id([*parent_diff_ids, diff_id])
        target = self._layers / _hex(chain_id)

        with self._gc.hold(exclusive=False):
            if (target / "layer.json").is_file():
                self._keep_alive(chain_id)
                existing = True
            else:
                existing = False
        if existing:
            self._discard(staged)
            return self._named(self.layer_info(chain_id), name)

        container = self._adopt(staged)
        if what is None:
            what = f"layer {name!r}" if name else f"layer {short_digest(chain_id)} ({source})"
        with self.full_disk(what):
            info, existing = self._assemble(
                container,
                target,
                chain_id,
                diff_id,
                tree_digest,
                parent=parent,
                name=name,
                source=source,
                blob=blob,
                imported=imported,
                index=index,
            )
        if existing:
            info = self.layer_info(chain_id)
        return self._named(info, name)

    def write_layer(
        self,
        entries: Sequence[changeset.Entry],
        *,
        parent: str | None,
        name: str | None,
        source: str,
        what: str | None = None,
        clamp_mtimes: bool = True,
        before_add: Callable[[Path], None] | None = None,
        in_place: bool = False,
        diff_id: str | None = None,
        blob: Path | None = None,
        blob_verified: bool = False,
    ) -> LayerInfo:
        """Store the layer that the change list ``entries`` describes, on top of ``parent``.

        The one way a change list becomes a stored layer (a build, a commit, an init layer, an
        import applied on a view): the entries are written into a staging directory
        (:func:`changeset.write_layer`; ``clamp_mtimes=False`` keeps the sources' mtimes),
        ``before_add`` may adjust the staged tree, and :meth:`add_layer` reads the tree once
        to name it (diff_id), index it (``files.json``) and measure it, then moves it into
        place. A full disk anywhere on the way removes the staging and raises
        :class:`errors.NoSpaceError` naming ``what`` (default: the layer's name or source) and
        the store (see :meth:`full_disk`).

        ``diff_id``, ``blob`` and ``blob_verified`` are an import's, as in :meth:`add_layer`.

        ``in_place=True`` says the entries are every entry of one tree made with
        :meth:`staging` that nothing else uses (a build with no parent): that tree is settled
        where it is (:func:`changeset.settle_tree`) and becomes the layer, with no copy.
        """
        label = what or (f"layer {name!r}" if name else f"a {source} layer")
        tree: Path | None = None  # the staged tree that becomes the layer where it is
        if in_place and entries:
            roots = {e.root for e in entries}
            one = roots.pop() if len(roots) == 1 else None
            tree = Path(one) if one is not None else None
            if (
                tree is None
                or any(e.kind != "A" for e in entries)
                or tree.name != "diff"
                or tree.parent.parent != self._tmp
            ):
                raise ValueError(
                    "write_layer(in_place=True) takes the added entries of one tree made with "
                    "Store.staging()"
                )
        # What the writer kept of the small files it wrote: the stream that names the layer
        # takes them from there (unless before_add gets to change the tree in between).
        written: layertar.WrittenFiles | None = None
        with self.full_disk(label), contextlib.ExitStack() as stack:
            if tree is not None:
                staged = tree
                changeset.settle_tree(staged, clamp_mtimes=clamp_mtimes)
            else:
                staged = stack.enter_context(self.staging())
                written = {} if before_add is None else None
                changeset.write_layer(
                    entries,
                    staged,
                    flavor=self.flavor,
                    clamp_mtimes=clamp_mtimes,
                    written=written,
                )
            if before_add is not None:
                before_add(staged)
            return self.add_layer(
                staged,
                parent=parent,
                name=name,
                source=source,
                what=label,
                diff_id=diff_id,
                blob=blob,
                blob_verified=blob_verified,
                written=written,
            )

    @contextlib.contextmanager
    def full_disk(self, what: str) -> Iterator[None]:
        """The store's one full-disk policy: an ``ENOSPC``/``EDQUOT`` inside the block becomes
        :class:`errors.NoSpaceError` naming ``what`` and the store, which says how to make room.

        Whatever the block staged is removed by then (staging directories clean up on the way
        out), so a rerun after freeing space starts clean; an error already converted (by an
        inner block naming something more precise) passes through unchanged.
        """
        try:
            yield
        except errors.NoSpaceError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise errors.NoSpaceError(what, str(self.root)) from exc

    def add_alias(self, chain_id: str, target_chain_id: str, parent: str | None) -> LayerInfo:
        """Record the stored layer ``target_chain_id`` at another chain position, on ``parent``,
        without copying its tree.

        A union image (several marker names) puts a stored layer on another parent: same
        diff_id, new chain id. A commit on a union needs that position stored, so the store
        records an alias: a ``layer.json`` of its own (chain id, parent) whose tree, blob and
        manifest are the target's. :meth:`layer_dir` follows it, :meth:`chain` walks through
        it, ``prune`` keeps the target while an alias is reachable, ``verify`` hashes the
        target once. Returns the layer already stored at ``chain_id``, if any.

        Raises :class:`errors.LayerNotFoundError` when the target or ``parent`` is not stored,
        and ``ValueError`` when ``chain_id`` is not the ChainID of the target's diff_id on
        ``parent``.
        """
        self._writable()
        if self.has_layer(chain_id):
            with self._gc.hold(exclusive=False):
                self._keep_alive(chain_id)
            return self.layer_info(chain_id)
        target = self.layer_info(target_chain_id)
        real = target.alias_of or target.chain_id
        parent_diff_ids = [info.diff_id for info in self.chain(parent)] if parent else []
        expected = layertar.chain_id([*parent_diff_ids, target.diff_id])
        if expected != chain_id:
            raise ValueError(
                f"alias {chain_id} of layer {short_digest(target_chain_id)} on parent "
                f"{short_digest(parent) if parent else '(none)'}: that position's chain id is "
                f"{expected}"
            )
        info = LayerInfo(
            chain_id=chain_id,
            diff_id=target.diff_id,
            parent=parent,
            name=target.name,
            created=time.time(),
            size=target.size,
            files=target.files,
            source=target.source,
            blob=target.blob,
            tree_digest=target.tree_digest,
            alias_of=real,
        )
        container = self._new_tmp_dir("alias")
        try:
            _write_new(
                container / "layer.json",
                json.dumps(info.to_json(), indent=1) + "\n",
                self._file_mode,
            )
            with self._gc.hold(exclusive=False):
                # Under the shared gc lock: prune cannot take the target between this check
                # and the lease that _keep_alive takes on the alias (which reaches the target).
                if not (self._layers / _hex(real) / "layer.json").is_file():
                    raise errors.LayerNotFoundError(
                        real, hint=f"the target of alias {chain_id} is no longer stored"
                    )
                try:
                    os.rename(container, self._layers / _hex(chain_id))
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                self._keep_alive(chain_id)
        finally:
            _rmtree(container)  # gone after a successful rename; a loser's copy otherwise
        return self.layer_info(chain_id)

    def _assemble(
        self,
        container: Path,
        target: Path,
        chain_id: str,
        diff_id: str,
        tree_digest: str,
        *,
        parent: str | None,
        name: str | None,
        source: str,
        blob: Path | None,
        imported: bool,
        index: _LayerIndex,
    ) -> tuple[LayerInfo, bool]:
        """Complete ``container`` (manifest, metadata, blob) and rename it to ``target``;
        returns the info and whether another process stored the layer first."""
        existing = False
        try:
            manifest = index.finish()
            size = sum(r.get("size", 0) for r in manifest.values())
            kept_blob = None
            if blob is not None:
                kept_blob = container / "blob.tar"
                if os.path.abspath(blob).startswith(str(self._tmp) + os.sep):
                    # Staged by us in the store's own tmp (same filesystem, private): move
                    # it; copying a 100,000-file layer's tar costs as much as writing it.
                    os.rename(blob, kept_blob)
                else:
                    shutil.copyfile(blob, kept_blob)
                os.chmod(kept_blob, self._file_mode)
                size += kept_blob.stat().st_size
            info = LayerInfo(
                chain_id=chain_id,
                diff_id=diff_id,
                parent=parent,
                name=name,
                created=time.time(),
                size=size,
                files=count_files(manifest, self.flavor),
                source=source,
                blob=target / "blob.tar" if kept_blob else None,
                tree_digest=tree_digest if imported else None,
                # Measured before the records are written: they are a few KiB at most. The
                # entries' blocks were counted as the tree was read; here the rest of what
                # disk_use([container]) would count: the container, the tree's root, the blob.
                disk_use=_container_use(index.disk_use, container, kept_blob),
            )
            _write_new(
                container / "files.json",
                json.dumps(manifest, separators=(",", ":"), sort_keys=True),
                self._file_mode,
            )
            # layer.json last: a directory is a layer only once it has one.
            _write_new(
                container / "layer.json",
                json.dumps(info.to_json(), indent=1) + "\n",
                self._file_mode,
            )
            # Fault-injection tests kill the process here, just before the rename.
            _faultpoints.reached("add_layer", str(container))
            with self._gc.hold(exclusive=False):
                try:
                    os.rename(container, target)
                except OSError as exc:
                    # Renaming onto a non-empty directory fails: someone else stored it first.
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    existing = True
                self._keep_alive(chain_id)
        except BaseException:
            _rmtree(container)
            raise
        if existing:
            _rmtree(container)
        return info, existing

    def _adopt(self, staged: Path) -> Path:
        """A tmp container holding ``staged`` as its ``diff``: the staging dir's own parent
        when ``staged`` came from :meth:`staging`, else a new one it is moved into."""
        if staged.name == "diff" and staged.parent.parent == self._tmp:
            return staged.parent
        container = self._new_tmp_dir("add")
        try:
            os.rename(staged, container / "diff")
        except OSError as exc:
            _rmtree(container)
            if exc.errno == errno.EXDEV:
                raise errors.StoreError(
                    errno.EXDEV,
                    f"cannot move {staged} into the store {self.root}: it is on another "
                    "filesystem; stage layers with Store.staging()",
                    str(staged),
                ) from exc
            raise
        return container

    def _discard(self, staged: Path) -> None:
        if staged.name == "diff" and staged.parent.parent == self._tmp:
            _rmtree(staged.parent)
        else:
            _rmtree(staged)

    def _named(self, info: LayerInfo, name: str | None) -> LayerInfo:
        if name is not None:
            self.set_name(name, info.chain_id)
        return info

    def _keep_alive(self, chain_id: str) -> None:
        # Until a ref points at a layer this process just stored, this process's own lease keeps
        # a concurrent prune from taking it (add_layer and cache_set are two calls).
        if self._auto_lease is None:
            self._auto_lease = _Lease(self, [chain_id])
            self._finalizer = weakref.finalize(self, _release_lease, self._auto_lease)
        else:
            self._auto_lease.add([chain_id])

    def _referenced(self, chain_id: str) -> None:
        lease = self._auto_lease
        if lease is not None:
            lease.drop(chain_id)

    def close(self) -> None:
        """Release this instance's own lease on layers it added but no ref points to yet."""
        if self._finalizer is not None:
            self._finalizer()
        self._auto_lease = None
        self._finalizer = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size(self) -> int:
        """Bytes held by stored layers (file contents and kept blobs), from their layer.json."""
        total = 0
        for chain_id in self.layers():
            with contextlib.suppress(errors.LayersError):
                info = self.layer_info(chain_id)
                if info.alias_of is None:  # an alias holds no bytes of its own
                    total += info.size
        return total

    def recorded_disk_use(self) -> int:
        """The stored layers' disk use as recorded in their ``layer.json`` when they were
        stored: what :meth:`disk_use` would measure for them, without walking any tree (a
        session header prints it; a store may hold 100,000s of files). A layer stored before
        disk use was recorded counts its ``size``."""
        total = 0
        for chain_id in self.layers():
            with contextlib.suppress(errors.LayersError):
                info = self.layer_info(chain_id)
                if info.alias_of is None:  # an alias holds no tree of its own
                    total += info.disk_use if info.disk_use is not None else info.size
        return total

    def disk_use(self, chain_ids: Iterable[str] | None = None) -> int:
        """Disk use (see :func:`disk_use`) of the whole store directory, or of the layers
        ``chain_ids`` (an alias adds its target's tree; a tree shared by several counts once)."""
        if chain_ids is None:
            return disk_use([self.root])
        paths: list[Path] = []
        for chain_id in chain_ids:
            paths.append(self._layers / _hex(chain_id))
            paths.append(self.layer_dir(chain_id))
        return disk_use(paths)

    # -- refs ----------------------------------------------------------------------------------

    def _ref_path(self, kind: str, value: str) -> Path:
        return self.root / "refs" / kind / _ref_filename(value)

    def _read_ref(self, path: Path, *, dir_fd: int | None = None) -> dict[str, Any] | None:
        """A ref's record, or None when it is absent or not a ref (a stray entry, noted in
        :attr:`warnings`: reading the store never stops at one)."""
        try:
            data = _read_json(path.name if dir_fd is not None else path, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            self._warn(f"{path}: {exc} (skipped)")
            return None
        if not isinstance(data.get("chain_id"), str):
            self._warn(f"{path}: not a ref, it names no chain id (skipped)")
            return None
        return data

    def set_name(self, name: str, chain_id: str) -> None:
        """Point ``refs/names/<name>`` at ``chain_id`` (the latest build of that name)."""
        self._writable()
        self._require(chain_id)
        self._write_json_atomic(self._ref_path("names", name), {"name": name, "chain_id": chain_id})
        self._referenced(chain_id)

    def get_name(self, name: str) -> str | None:
        """The chain id ``refs/names/<name>`` points at, or None."""
        data = self._read_ref(self._ref_path("names", name))
        return data["chain_id"] if data and data.get("name") == name else None

    def names(self) -> dict[str, str]:
        """Every layer name -> chain id."""
        out = {}
        for path in sorted((self.root / "refs" / "names").iterdir()):
            data = self._read_ref(path)
            if data and isinstance(data.get("name"), str):
                out[data["name"]] = data["chain_id"]
        return out

    def cache_get(self, key: str) -> str | None:
        """The chain id built for ``key``, or None (also when that layer is no longer stored)."""
        data = self._read_ref(self._ref_path("cache", key))
        if not data or data.get("key") != key or not self.has_layer(data["chain_id"]):
            return None
        return cast(str, data["chain_id"])

    def cache_set(self, key: str, chain_id: str) -> None:
        """Record that build-cache ``key`` produced ``chain_id``."""
        self._writable()
        self._require(chain_id)
        self._write_json_atomic(self._ref_path("cache", key), {"key": key, "chain_id": chain_id})
        self._referenced(chain_id)

    def rebuild_marked(self, key: str, token: str) -> bool:
        """Whether the ``--layers-rebuild`` run ``token`` already rebuilt build-cache ``key``
        (xdist workers share the run's token, so each key is rebuilt once per run)."""
        try:
            data = _read_json(self._ref_path("rebuild", key))
        except (OSError, ValueError):
            return False
        return data.get("key") == key and data.get("token") == token

    def mark_rebuilt(self, key: str, token: str) -> None:
        """Record that the ``--layers-rebuild`` run ``token`` rebuilt ``key``."""
        self._writable()
        self._write_json_atomic(self._ref_path("rebuild", key), {"key": key, "token": token})

    def build_lock(self, key: str, timeout: float = DEFAULT_LOCK_TIMEOUT) -> filelock.BaseFileLock:
        """A cross-process lock for building ``key``: hold it while checking the cache,
        building and recording, so concurrent builders of one key build it once."""
        self._writable()
        path = self._locks / f"build-{_ref_filename(key)}.lock"
        return _BuildLock(str(path), key=key, timeout=timeout, mode=self.access.lock_mode)

    def _require(self, chain_id: str) -> None:
        if not self.has_layer(chain_id):
            raise errors.LayerNotFoundError(chain_id, hint=f"not in the store {self.root}")

    # -- snapshots -----------------------------------------------------------------------------

    def add_snapshot(
        self, test: str, chain_id: str, keep: int, *, with_init: str | None = None
    ) -> str:
        """Record ``chain_id`` as the newest snapshot of ``test`` and drop all but the newest
        ``keep``; returns the ref ``snapshot:<test>``. ``with_init`` is the chain the test saw
        (image, init layer, rw layer), kept alongside (see :class:`SnapshotInfo`)."""
        if keep < 1:
            raise ValueError(
                f"keep must be at least 1 to keep the snapshot being added, not {keep}"
            )
        self._writable()
        self._require(chain_id)
        if with_init is not None:
            self._require(with_init)
        directory = self.root / "refs" / "snapshots" / _ref_filename(test)
        mode = self.access.lock_mode
        with _StoreLock(str(self._locks / "snapshots.lock"), timeout=60, mode=mode):
            self.access.make_dir(directory, exist_ok=True)
            with self._snapshot_dir(directory) as dfd:
                last = self._read_seq(dfd)
                numbers = self._snapshot_numbers(dfd)
                n = max([last, *numbers]) + 1
                data: dict[str, Any] = {
                    "test": test,
                    "n": n,
                    "chain_id": chain_id,
                    "created": time.time(),
                }
                if with_init is not None:
                    data["with_init"] = with_init
                tmp = self._new_tmp_path("ref")
                _write_new(tmp, json.dumps(data, indent=1, sort_keys=True) + "\n", self._file_mode)
                os.replace(tmp, str(n), dst_dir_fd=dfd)
                # The counter survives a prune that removes every snapshot, so ids never repeat.
                tmp = self._new_tmp_path("ref")
                _write_new(tmp, f"{n}\n", self._file_mode)
                os.replace(tmp, ".seq", dst_dir_fd=dfd)
                for old in sorted([*numbers, n])[:-keep]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(old), dir_fd=dfd)
        self._referenced(chain_id)
        if with_init is not None:
            self._referenced(with_init)
        return f"snapshot:{test}"

    @staticmethod
    def _read_seq(dfd: int) -> int:
        try:
            with open(os.open(".seq", _O_READ, dir_fd=dfd), "rb") as f:
                return int(f.read(32))
        except (OSError, ValueError):
            return 0  # absent or damaged: the listed numbers still keep ids increasing

    @contextlib.contextmanager
    def _snapshot_dir(self, directory: Path) -> Iterator[int]:
        """The fd of a test's snapshot directory: opened without following a symlink and
        checked like every directory of the store, so that a symlink planted there never
        makes a commit or a prune write or delete elsewhere."""
        try:
            fd = os.open(directory, _dirfd.O_DIR)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            self.access.check(directory, os.lstat(directory))
            raise
        try:
            self.access.check(directory, os.fstat(fd))
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _snapshot_numbers(dfd: int) -> list[int]:
        return sorted(int(n) for n in os.listdir(dfd) if n.isdigit())

    def snapshots(self, test: str | None = None) -> list[SnapshotInfo]:
        """Snapshots of ``test`` (or of every test), by test then oldest first. A stray entry
        in ``refs/snapshots`` is skipped, with a line in :attr:`warnings`."""
        base = self.root / "refs" / "snapshots"
        dirs = [base / _ref_filename(test)] if test is not None else sorted(base.iterdir())
        out = []
        for directory in dirs:
            try:
                with self._snapshot_dir(directory) as dfd:
                    for n in self._snapshot_numbers(dfd):
                        data = self._read_ref(directory / str(n), dir_fd=dfd)
                        if data is None or (test is not None and data.get("test") != test):
                            continue
                        with_init = data.get("with_init")
                        try:
                            snap = SnapshotInfo(
                                test=str(data["test"]),
                                n=n,
                                chain_id=data["chain_id"],
                                created=float(data["created"]),
                                with_init=with_init if isinstance(with_init, str) else None,
                            )
                        except (KeyError, TypeError, ValueError):
                            self._warn(f"{directory / str(n)}: not a snapshot record (skipped)")
                            continue
                        out.append(snap)
            except FileNotFoundError:
                continue
            except (OSError, errors.LayersError) as exc:
                self._warn(f"{directory}: not a snapshot directory ({exc}) (skipped)")
                continue
        out.sort(key=lambda s: (s.test, s.n))
        return out

    def snapshot(self, ref: str) -> SnapshotInfo | None:
        """The snapshot ``ref`` names: ``snapshot:NODEID`` (the latest) or
        ``snapshot:NODEID@N`` (number N); None when ``ref`` is not a snapshot ref.
        Raises :class:`errors.LayerNotFoundError` for a snapshot ref that names none."""
        if not ref.startswith("snapshot:"):
            return None
        test = ref[len("snapshot:") :]
        snaps = self.snapshots(test)
        number: int | None = None
        if not snaps:
            # A node id may itself contain "@" (a parameter); only fall back to "@N" when the
            # whole string names no test.
            m = re.fullmatch(r"(.+)@([0-9]+)", test)
            if m is not None:
                test, number = m.group(1), int(m.group(2))
                snaps = self.snapshots(test)
        if not snaps:
            tests = sorted({s.ref for s in self.snapshots()})
            raise errors.LayerNotFoundError(
                ref, known=tests, hint=f"no snapshot of test {test!r} in {self.root}"
            )
        if number is None:
            return snaps[-1]
        for snap in snaps:
            if snap.n == number:
                return snap
        kept = ", ".join(s.numbered_ref for s in snaps)
        raise errors.LayerNotFoundError(
            ref, hint=f"test {test!r} has no snapshot {number} any more; kept: {kept}"
        )

    # -- resolving -----------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """Chain id of ``ref``: a layer name, ``sha256:HEX`` or a unique hex prefix of a chain id
        or of a diff_id, ``snapshot:NODEID`` (that test's latest snapshot) or
        ``snapshot:NODEID@N`` (its snapshot number N)."""
        snap = self.snapshot(ref)
        if snap is not None:
            return self._existing(snap.chain_id, ref)
        if ref.startswith("sha256:"):
            return self._by_prefix(ref, ref[7:])
        chain_id = self.get_name(ref)
        if chain_id is not None:
            return self._existing(chain_id, ref)
        if _HEX_RE.fullmatch(ref):
            return self._by_prefix(ref, ref)
        raise errors.LayerNotFoundError(
            ref,
            known=list(self.names()),
            hint="a ref is a layer name, sha256:HEX, a unique hex prefix of a chain id or "
            "diff_id, snapshot:NODEID or snapshot:NODEID@N",
        )

    def _existing(self, chain_id: str, ref: str) -> str:
        if not self.has_layer(chain_id):
            raise errors.LayerNotFoundError(
                ref, hint=f"it points to {chain_id}, which is no longer in the store; rebuild it"
            )
        return chain_id

    def _by_prefix(self, ref: str, prefix: str) -> str:
        """The one stored layer whose chain id starts with ``prefix``, else the one whose
        diff_id does. (A base layer's chain id is its diff_id; the same diff_id on other
        parents is other images, so those are listed as candidates, not picked.)"""
        if not _HEX_RE.fullmatch(prefix) or len(prefix) > 64:
            raise errors.LayerNotFoundError(ref, hint="sha256: must be followed by hex digits")
        layers = self.layers()
        matches = [c for c in layers if c[7:].startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise errors.AmbiguousRefError(ref, matches)
        by_diff: dict[str, tuple[str, str]] = {}  # chain id -> (diff_id, label)
        for chain_id in layers:
            with contextlib.suppress(errors.LayersError):
                info = self.layer_info(chain_id)
                if info.diff_id[7:].startswith(prefix):
                    by_diff[chain_id] = (info.diff_id, f"{chain_id} ({info.name or info.source})")
        if len(by_diff) == 1:
            return next(iter(by_diff))
        if by_diff:
            one_diff = len({diff for diff, _ in by_diff.values()}) == 1
            raise errors.AmbiguousRefError(
                ref,
                [label for _, label in by_diff.values()],
                hint="that diff_id is the top layer of several images; give one of their chain ids"
                if one_diff
                else "",
            )
        raise errors.LayerNotFoundError(
            ref,
            known=list(self.names()),
            hint=f"no stored chain id or diff_id starts with {prefix}",
        )

    # -- leases --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, chain_ids: Iterable[str]) -> Iterator[None]:
        """Mark these layers (and so their ancestors) as in use by this process until exit;
        ``prune`` leaves them alone. Raises :class:`errors.LayerNotFoundError` for a layer that
        is not stored."""
        ids = list(chain_ids)
        if self.read_only:
            # Nothing prunes a read-only store from here; a lease could not be written anyway.
            for chain_id in ids:
                self._require(chain_id)
            yield
            return
        with self._gc.hold(exclusive=False):
            for chain_id in ids:
                self._require(chain_id)
            lease = _Lease(self, ids)
        try:
            yield
        finally:
            lease.release()

    def pin(self, owner: str, chain_ids: Iterable[str]) -> Path:
        """A lease that outlives this process (``pytest-layers mount``): ``prune`` leaves these
        layers alone until :meth:`unpin` with the same ``owner`` (a short name: letters, digits,
        ``-``). Raises :class:`errors.LayerNotFoundError` for a layer that is not stored."""
        if not owner or not all(c.isalnum() or c == "-" for c in owner):
            raise ValueError(f"pin owner {owner!r} must be letters, digits and '-'")
        ids = list(chain_ids)
        path = self.root / "leases" / f"pin-{owner}.pin"
        with self._gc.hold(exclusive=False):
            for chain_id in ids:
                self._require(chain_id)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, "".join(f"+{c}\n" for c in ids).encode())
            finally:
                os.close(fd)
        return path

    def unpin(self, owner: str) -> None:
        """Release the pin :meth:`pin` took for ``owner`` (nothing if there is none)."""
        with contextlib.suppress(FileNotFoundError):
            (self.root / "leases" / f"pin-{owner}.pin").unlink()

    def _live_leases(self) -> tuple[set[str], int]:
        """Chain ids held by live leases (other than this instance's own auto lease) and pins,
        and how many dead leases were swept."""
        held: set[str] = set()
        swept = 0
        leases = self.root / "leases"
        for pin in sorted(leases.glob("pin-*.pin")):
            held |= _read_lease(pin)
        own = self._auto_lease.path if self._auto_lease is not None else None
        for path in sorted(leases.glob("*.held")):
            if path == own:
                continue
            probe = _StoreLock(str(path.with_suffix(".lock")), mode=self.access.lock_mode)
            try:
                probe.acquire(timeout=0)
            except filelock.Timeout:
                held |= _read_lease(path)
                continue
            # Nobody holds it: its owner died without releasing.
            try:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    path.with_suffix(".lock").unlink()
                swept += 1
            finally:
                probe.release()
        return held, swept

    # -- prune ---------------------------------------------------------------------------------

    def prune(self, keep_snapshots: int = 3) -> PruneReport:
        """Drop snapshots beyond ``keep_snapshots`` per test, then every layer that no ref
        (name, cache key, snapshot) and no live lease reaches, and leftovers of dead processes."""
        if keep_snapshots < 0:
            raise ValueError(f"keep_snapshots must be >= 0, not {keep_snapshots}")
        self._writable()
        report = PruneReport()
        doomed: list[Path] = []
        mode = self.access.lock_mode
        with _StoreLock(str(self._locks / "prune.lock"), timeout=600, mode=mode):
            with _StoreLock(str(self._locks / "snapshots.lock"), timeout=60, mode=mode):
                by_test: dict[str, list[SnapshotInfo]] = {}
                for snap in self.snapshots():
                    by_test.setdefault(snap.test, []).append(snap)
                for test, snaps in by_test.items():
                    directory = self.root / "refs" / "snapshots" / _ref_filename(test)
                    with self._snapshot_dir(directory) as dfd:
                        for snap in snaps[: max(0, len(snaps) - keep_snapshots)]:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(str(snap.n), dir_fd=dfd)
                            report.removed_snapshots.append(snap.numbered_ref)
            with self._gc.hold(exclusive=True):
                roots = set(self.names().values())
                for path in (self.root / "refs" / "cache").iterdir():
                    data = self._read_ref(path)
                    if data:
                        roots.add(data["chain_id"])
                for snap in self.snapshots():
                    roots.add(snap.chain_id)
                    if snap.with_init is not None:
                        roots.add(snap.with_init)
                leased, report.removed_leases = self._live_leases()
                roots |= leased
                reachable = self._closure(roots)
                for chain_id in self.layers():
                    if chain_id in reachable:
                        report.kept_layers += 1
                        continue
                    victim = self._new_tmp_path("prune")
                    # Out of layers/ in one rename: a kill leaves it in tmp/ for the next sweep.
                    try:
                        os.rename(self._layers / _hex(chain_id), victim)
                    except PermissionError:
                        # Another member's layer in a shared store: theirs to prune.
                        self._warn(f"{self._layers / _hex(chain_id)}: not yours to remove (kept)")
                        continue
                    self._info_cache.pop(chain_id, None)
                    doomed.append(victim)
                    report.removed_layers.append(chain_id)
            # Directories that lost their layer.json (damaged by hand) are not layers either.
            for name in os.listdir(self._layers):
                entry = self._layers / name
                with contextlib.suppress(OSError):
                    if not stat.S_ISDIR(os.lstat(entry).st_mode):
                        entry.unlink()  # a stray file or symlink: the entry goes, no target
                    elif not os.path.lexists(entry / "layer.json"):
                        victim = self._new_tmp_path("prune")
                        os.rename(entry, victim)
                        doomed.append(victim)
        # Disk use, as du counts it (what removing these trees gives back, hard links to kept
        # layers aside); measured once they are out of layers/ and nobody can reach them.
        report.freed_bytes = disk_use(doomed)
        for victim in doomed:
            with contextlib.suppress(PermissionError):  # a shared store's: left for its owner
                _rmtree(victim)
        report.removed_tmp = self._sweep_tmp()
        return report

    def _closure(self, roots: Iterable[str]) -> set[str]:
        reachable: set[str] = set()
        stack = [r for r in roots if _CHAIN_RE.fullmatch(r)]
        while stack:
            chain_id = stack.pop()
            if chain_id in reachable:
                continue
            reachable.add(chain_id)
            try:
                info = self.layer_info(chain_id)
            except errors.LayersError:
                continue
            if info.parent:
                stack.append(info.parent)
            if info.alias_of:
                stack.append(info.alias_of)
        return reachable

    # -- verify --------------------------------------------------------------------------------

    def verify(self, chain_ids: Sequence[str] | None = None) -> list[Problem]:
        """Re-hash stored layers (all, or ``chain_ids``) and report every inconsistency, naming
        the path inside the layer when one changed. An empty list means all is well."""
        problems: list[Problem] = []
        hashed: set[str] = set()
        if chain_ids is None:
            # Entries that are not layer directories (a symlink put in place of one) as well.
            chain_ids = sorted(
                c
                for c, e in self._layer_names()
                if not e.is_dir(follow_symlinks=False) or os.path.lexists(e.path + "/layer.json")
            )
        for chain_id in chain_ids:
            problems.extend(self._verify_one(chain_id, hashed))
        return problems

    def _verify_one(self, chain_id: str, hashed: set[str]) -> list[Problem]:
        self._info_cache.pop(chain_id, None)  # verify reads what is on disk now
        try:
            info = self.layer_info(chain_id)
        except errors.LayersError as exc:
            return [Problem(chain_id, None, None, str(exc))]
        layer_root = self._layers / _hex(chain_id)
        problems = []

        def problem(path: str | None, message: str) -> None:
            problems.append(Problem(chain_id, info.name, path, message))

        if info.chain_id != chain_id:
            problem(None, f"layer.json names chain id {info.chain_id}")
        parent_ids: list[str] = []
        if info.parent is not None:
            try:
                parent_ids = [p.diff_id for p in self.chain(info.parent)]
            except errors.LayersError as exc:
                problem(None, f"parent {info.parent} is missing or damaged: {exc}")
                parent_ids = []
        if info.parent is None or parent_ids:
            expected_chain = layertar.chain_id([*parent_ids, info.diff_id])
            if expected_chain != chain_id:
                problem(
                    None, f"diff_id {info.diff_id} on its parent gives chain id {expected_chain}"
                )

        if info.alias_of is not None:
            # Its tree is the target's: check they agree, then hash the target (once).
            self._info_cache.pop(info.alias_of, None)
            try:
                target = self.layer_info(info.alias_of)
            except errors.LayersError as exc:
                problem(None, f"alias of {info.alias_of}, which is missing or damaged: {exc}")
                return problems
            if target.diff_id != info.diff_id:
                problem(
                    None,
                    f"alias of {target.chain_id} with diff_id {target.diff_id}, "
                    f"but the alias says {info.diff_id}",
                )
            if (layer_root / "diff").exists():
                problem(None, "an alias must not have a tree of its own")
            chain_id, info = target.chain_id, target
            layer_root = self._layers / _hex(chain_id)
        if chain_id in hashed:
            return problems
        hashed.add(chain_id)
        expected = info.tree_digest or info.diff_id
        try:
            actual = layertar.layer_diff_id(layer_root / "diff", flavor=self.flavor)
        except (OSError, errors.LayersError) as exc:
            actual = None
            problem(None, f"cannot read the layer tree: {exc}")
        if actual is not None and actual != expected:
            problems.extend(self._explain(info, layer_root, expected, actual))
        if info.blob is not None:
            try:
                blob_digest = _blob_digest(info.blob)
            except OSError as exc:
                problem(info.blob.name, f"original blob unreadable: {exc}")
            else:
                if blob_digest != info.diff_id:
                    problem(
                        info.blob.name,
                        f"original blob hashes to {blob_digest}, not its DiffID {info.diff_id}",
                    )
        return problems

    def _explain(
        self, info: LayerInfo, layer_root: Path, expected: str, actual: str
    ) -> list[Problem]:
        head = f"content digest is {actual}, expected {expected}"
        try:
            stored = json.loads((layer_root / "files.json").read_text())
        except (OSError, ValueError) as exc:
            return [Problem(info.chain_id, info.name, None, f"{head}; files.json unusable ({exc})")]
        try:
            current = build_manifest(layer_root / "diff")
        except OSError as exc:
            return [
                Problem(info.chain_id, info.name, None, f"{head}; cannot walk the tree ({exc})")
            ]
        changes = compare_manifests(stored, current)
        if not changes:
            return [
                Problem(
                    info.chain_id,
                    info.name,
                    None,
                    f"{head}, but files.json lists no difference (it may have been altered too)",
                )
            ]
        return [Problem(info.chain_id, info.name, path, what) for path, what in changes]
