"""The content-addressed layer store: layers, refs, build-cache keys, snapshots, locks, leases.

Layout (DESIGN section 4)::

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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import quote

import filelock
import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv

from pytest_layers import _dirfd, errors, layertar, namespaces
from pytest_layers.layertar import Flavor

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_LOCK_TIMEOUT",
    "Store",
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

_FLAVORS: tuple[Flavor, ...] = ("overlay", "marker")
_SOURCES = ("build", "commit", "import")
_CHAIN_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]+")
_TMP_RE = re.compile(r"(\d+)-(\d+)-")
# Filesystems where a 0/0 character device is a whiteout rather than a file of its own.
_UNION_FS = ("overlay", "aufs", "fuse.fuse-overlayfs", "fuse.unionfs", "fuse.mergerfs")
# xattrs that carry our own bookkeeping (or overlay's) rather than layer content; same rule as
# the canonical tar (internals.md, layertar.py).
_KEPT_XATTR_PREFIXES = ("user.",)
_SKIPPED_XATTR_PREFIXES = ("user.overlay.", "user.fuseoverlayfs.")


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

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["blob"] = self.blob.name if self.blob is not None else None
        if self.alias_of is None:
            del data["alias_of"]
        else:
            # An alias has no blob or tree of its own: both are read from its target.
            del data["blob"], data["tree_digest"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], layer_root: Path) -> LayerInfo:
        blob = data.get("blob")
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
        )


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One committed snapshot of a test: ``snapshot:<test>`` resolves to the highest ``n``."""

    test: str
    n: int
    chain_id: str
    created: float

    @property
    def ref(self) -> str:
        return f"snapshot:{self.test}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One inconsistency ``verify`` found; ``path`` is the path inside the layer, if any."""

    chain_id: str
    name: str | None
    path: str | None
    message: str

    def __str__(self) -> str:
        where = f"layer {_short(self.chain_id)}"
        if self.name:
            where += f" ({self.name})"
        if self.path is not None:
            where += f": /{self.path}"
        return f"{where}: {self.message}"


@dataclasses.dataclass
class PruneReport:
    """What ``prune`` removed and how many bytes it freed."""

    removed_layers: list[str] = dataclasses.field(default_factory=list)
    removed_snapshots: list[str] = dataclasses.field(default_factory=list)
    removed_tmp: int = 0
    removed_leases: int = 0
    freed_bytes: int = 0
    kept_layers: int = 0


# --------------------------------------------------------------------------------------------
# Probing the store's filesystem


def filesystem_type(path: Path) -> str | None:
    """Type of the filesystem holding ``path`` as ``/proc/self/mountinfo`` names it, or None."""
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    found = None
    for line in lines:
        fields = line.split()
        # Optional fields end with "-"; the filesystem type follows it.
        if len(fields) > 7 and fields[2] == wanted and "-" in fields[6:]:
            found = fields[fields.index("-", 6) + 1]
    return found


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
    probe = directory / f"{_process_tag()}-probe-{secrets.token_hex(4)}"
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


def _short(chain_id: str) -> str:
    return chain_id.removeprefix("sha256:")[:12]


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
    namespaces.remove_tree(path)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


_START: tuple[int, int] | None = None


def _process_tag() -> str:
    """``<pid>-<start time>``: names tmp entries so that a sweep can tell their owner is gone."""
    global _START
    pid = os.getpid()
    if _START is None or _START[0] != pid:  # recomputed after fork
        _START = (pid, int(psutil.Process(pid).create_time()))
    return f"{_START[0]}-{_START[1]}"


def _owner_alive(name: str) -> bool:
    m = _TMP_RE.match(name)
    if m is None:
        return False
    pid, started = int(m.group(1)), int(m.group(2))
    if not psutil.pid_exists(pid):
        return False
    try:
        # A recycled pid belongs to a process that started later.
        return abs(int(psutil.Process(pid).create_time()) - started) <= 1
    except psutil.Error:
        return False


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
        if name == "security.capability" or (
            name.startswith(_KEPT_XATTR_PREFIXES) and not name.startswith(_SKIPPED_XATTR_PREFIXES)
        ):
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


def build_manifest(tree: Path) -> dict[str, dict[str, Any]]:
    """Per-path record of a layer tree: what ``verify`` compares to name the path that changed."""
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
            rec: dict[str, Any] = {
                "type": _TYPE_NAMES.get(fmt, "unknown"),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime": int(st.st_mtime),
            }
            if fmt == stat.S_IFREG:
                rec["size"] = st.st_size
                rec["sha256"] = _sha256_at(fd, name)
            elif fmt == stat.S_IFLNK:
                rec["target"] = os.fsdecode(os.readlink(name, dir_fd=fd))
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                rec["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
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
        if flavor == "marker" and rel.rpartition("/")[2].startswith(".wh."):
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


class _BuildLock(filelock.FileLock):
    """A build-cache key's lock whose timeout error names the key and the lock file."""

    def __init__(self, lock_file: str, *, key: str, timeout: float) -> None:
        super().__init__(lock_file, timeout=timeout)
        self.key = key

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().acquire(*args, **kwargs)
        except filelock.Timeout as exc:
            waited = kwargs.get("timeout", args[0] if args else self.timeout)
            err = errors.LockTimeoutError(
                errno.ETIMEDOUT,
                f"waited {waited:g} s for another process building cache key {self.key!r} "
                f"(lock {self.lock_file}); if no pytest-layers process is running, the holder is "
                "stuck: stop it, or raise the timeout",
            )
            err.key = self.key
            err.lock_file = self.lock_file
            raise err from exc


class _GcLock:
    """Store-wide shared/exclusive lock: prune holds it exclusively while it decides and renames
    layers away; adding a layer or a lease holds it shared, so a layer cannot vanish between
    "it exists" and "it is leased". (filelock has no shared mode, hence plain flock.)"""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
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
        base = store.root / "leases" / f"{_process_tag()}-{secrets.token_hex(6)}"
        self.path = base.with_suffix(".held")
        # The lock is taken before the file exists, so no sweeper ever sees a lease whose
        # lock is free although its owner is alive.
        self.lock = filelock.FileLock(str(base.with_suffix(".lock")))
        self.lock.acquire(timeout=10)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
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
    with contextlib.suppress(OSError):
        for line in path.read_text().split("\n")[:-1]:  # a torn last line has no newline yet
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


class Store:
    """A layer store rooted at ``root``; creates the layout and probes the flavor when new.

    Raises :class:`errors.StoreError` when the directory cannot be written and
    :class:`errors.StoreFormatError` when ``VERSION`` names a format this version cannot read.
    """

    root: Path
    flavor: Flavor

    def __init__(self, root: Path | str) -> None:
        self.root = Path(os.path.abspath(root))
        self._layers = self.root / "layers"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        self._info_cache: dict[str, LayerInfo] = {}
        self._auto_lease: _Lease | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._make_layout()
        self.flavor = self._read_or_create_version()
        self._gc = _GcLock(self._locks / "gc.lock")
        self._sweep_tmp()

    # -- opening -------------------------------------------------------------------------------

    def _not_writable(self, exc: OSError, path: Path) -> errors.StoreError:
        return errors.StoreError(
            exc.errno or errno.EACCES,
            f"the layer store {self.root} is not writable by uid {os.geteuid()} "
            f"({exc.strerror or exc}): make it writable (chown/chmod) or choose another "
            "directory with --layers-store=PATH (ini: layers_store)",
            str(path),
        )

    def _make_layout(self) -> None:
        dirs = [
            self.root,
            self._layers,
            self._tmp,
            self._locks,
            self.root / "leases",
            self.root / "refs" / "names",
            self.root / "refs" / "cache",
            self.root / "refs" / "snapshots",
        ]
        for d in dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._not_writable(exc, d) from exc
        # mkdir succeeds on existing directories without write access: check each one now
        # rather than fail mid-session, and prove it with a real write where it is harmless.
        for d in dirs:
            if not os.access(d, os.W_OK | os.X_OK):
                raise self._not_writable(OSError(errno.EACCES, os.strerror(errno.EACCES)), d)
        probe = self._new_tmp_path("probe")
        try:
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise self._not_writable(exc, self._tmp) from exc

    def _read_or_create_version(self) -> Flavor:
        path = self.root / "VERSION"
        if not path.exists():
            data = {"format": FORMAT_VERSION, "flavor": probe_flavor(self._tmp)}
            tmp = self._new_tmp_path("version")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            try:
                # link, not replace: two processes creating one store keep the first VERSION.
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return self._check_version(path)

    def _check_version(self, path: Path) -> Flavor:
        fix = (
            f"upgrade pytest-layers, or use another store with --layers-store=PATH "
            f"(this pytest-layers reads store format {FORMAT_VERSION})"
        )
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise errors.StoreFormatError(
                f"{path} is unreadable or not JSON ({exc}): the store is damaged or was written "
                f"by another tool; {fix}"
            ) from exc
        found = data.get("format") if isinstance(data, dict) else None
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
        return self._tmp / f"{_process_tag()}-{purpose}-{secrets.token_hex(6)}"

    def _new_tmp_dir(self, purpose: str) -> Path:
        path = self._new_tmp_path(purpose)
        path.mkdir()
        os.chmod(path, 0o755)  # becomes layers/<hex>: readable by every user of the store
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
                _rmtree(claimed)
            else:
                with contextlib.suppress(FileNotFoundError):
                    claimed.unlink()
            removed += 1
        return removed

    def _write_json_atomic(self, path: Path, data: Any) -> None:
        tmp = self._new_tmp_path("ref")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty directory in ``STORE/tmp`` to build a layer tree in; removed on exit
        unless ``add_layer`` took it."""
        container = self._new_tmp_dir("stage")
        staged = container / "diff"
        staged.mkdir()
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
        """The layer's ``layer.json``; :class:`errors.LayerNotFoundError` when it is absent."""
        info = self._info_cache.get(chain_id)
        if info is not None:
            return info
        layer_root = self._layers / _hex(chain_id)
        try:
            data = json.loads((layer_root / "layer.json").read_text())
        except FileNotFoundError:
            raise errors.LayerNotFoundError(
                chain_id, hint=f"not in the store {self.root}"
            ) from None
        except ValueError as exc:
            raise errors.StoreError(
                errno.EIO,
                f"{layer_root / 'layer.json'} is damaged ({exc}); run `pytest-layers verify`",
                str(layer_root),
            ) from exc
        info = LayerInfo.from_json(data, layer_root)
        if info.alias_of is not None:
            try:
                target = self.layer_info(info.alias_of)
            except errors.LayerNotFoundError:
                raise errors.LayerNotFoundError(
                    chain_id,
                    hint=f"it is an alias of {info.alias_of}, which is not in the store "
                    f"{self.root}",
                ) from None
            info = dataclasses.replace(info, blob=target.blob, tree_digest=target.tree_digest)
        self._info_cache[chain_id] = info
        return info

    def layers(self) -> list[str]:
        """Chain ids of every stored layer."""
        return sorted(
            "sha256:" + n
            for n in os.listdir(self._layers)
            if (self._layers / n / "layer.json").is_file()
        )

    def chain(self, chain_id: str) -> list[LayerInfo]:
        """The layer and its ancestors, bottom first."""
        out = []
        current: str | None = chain_id
        while current is not None:
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
    ) -> LayerInfo:
        """Store the layer tree ``staged`` (best made with :meth:`staging`) on top of ``parent``.

        The tree is moved, not copied. If the store already holds the same chain id, ``staged``
        is discarded and the existing layer returned: a stored layer is never overwritten.
        Imports pass the image's ``diff_id`` and the original ``blob`` (kept as ``blob.tar``).
        When ``name`` is given, ``refs/names/<name>`` points to the result.
        """
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {', '.join(_SOURCES)}, not {source!r}")
        staged = Path(os.path.abspath(staged))
        parent_diff_ids = [info.diff_id for info in self.chain(parent)] if parent else []
        tree_digest = layertar.layer_diff_id(staged, flavor=self.flavor)
        if blob is not None:
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
        try:
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
            )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                what = f"layer {name!r}" if name else f"layer {_short(chain_id)} ({source})"
                raise errors.NoSpaceError(what, str(self.root)) from exc
            raise
        if existing:
            info = self.layer_info(chain_id)
        return self._named(info, name)

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
                f"alias {chain_id} of layer {_short(target_chain_id)} on parent "
                f"{_short(parent) if parent else '(none)'}: that position's chain id is "
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
            (container / "layer.json").write_text(json.dumps(info.to_json(), indent=1) + "\n")
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
    ) -> tuple[LayerInfo, bool]:
        """Complete ``container`` (manifest, metadata, blob) and rename it to ``target``;
        returns the info and whether another process stored the layer first."""
        existing = False
        try:
            manifest = build_manifest(container / "diff")
            size = sum(r.get("size", 0) for r in manifest.values())
            kept_blob = None
            if blob is not None:
                kept_blob = container / "blob.tar"
                shutil.copyfile(blob, kept_blob)
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
            )
            (container / "files.json").write_text(
                json.dumps(manifest, separators=(",", ":"), sort_keys=True)
            )
            # layer.json last: a directory is a layer only once it has one.
            (container / "layer.json").write_text(json.dumps(info.to_json(), indent=1) + "\n")
            if os.environ.get("PYTEST_LAYERS_TEST_PAUSE") == "add_layer":
                # Fault-injection tests kill the process here, just before the rename.
                print(f"PAUSED {container}", flush=True)
                time.sleep(3600)
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

    # -- refs ----------------------------------------------------------------------------------

    def _ref_path(self, kind: str, value: str) -> Path:
        return self.root / "refs" / kind / _ref_filename(value)

    def _read_ref(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("chain_id"), str) else None

    def set_name(self, name: str, chain_id: str) -> None:
        """Point ``refs/names/<name>`` at ``chain_id`` (the latest build of that name)."""
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
        for path in (self.root / "refs" / "names").iterdir():
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
        self._require(chain_id)
        self._write_json_atomic(self._ref_path("cache", key), {"key": key, "chain_id": chain_id})
        self._referenced(chain_id)

    def build_lock(self, key: str, timeout: float = DEFAULT_LOCK_TIMEOUT) -> filelock.BaseFileLock:
        """A cross-process lock for building ``key``: hold it while checking the cache,
        building and recording, so concurrent builders of one key build it once."""
        path = self._locks / f"build-{_ref_filename(key)}.lock"
        return _BuildLock(str(path), key=key, timeout=timeout)

    def _require(self, chain_id: str) -> None:
        if not self.has_layer(chain_id):
            raise errors.LayerNotFoundError(chain_id, hint=f"not in the store {self.root}")

    # -- snapshots -----------------------------------------------------------------------------

    def add_snapshot(self, test: str, chain_id: str, keep: int) -> str:
        """Record ``chain_id`` as the newest snapshot of ``test`` and drop all but the newest
        ``keep``; returns the ref ``snapshot:<test>``."""
        if keep < 1:
            raise ValueError(
                f"keep must be at least 1 to keep the snapshot being added, not {keep}"
            )
        self._require(chain_id)
        directory = self.root / "refs" / "snapshots" / _ref_filename(test)
        with filelock.FileLock(str(self._locks / "snapshots.lock"), timeout=60):
            directory.mkdir(exist_ok=True)
            seq_path = directory / ".seq"
            try:
                last = int(seq_path.read_text())
            except (FileNotFoundError, ValueError):
                last = 0
            numbers = self._snapshot_numbers(directory)
            n = max([last, *numbers]) + 1
            data = {"test": test, "n": n, "chain_id": chain_id, "created": time.time()}
            self._write_json_atomic(directory / str(n), data)
            # The counter survives a prune that removes every snapshot, so ids never repeat.
            tmp = self._new_tmp_path("ref")
            tmp.write_text(f"{n}\n")
            os.replace(tmp, seq_path)
            for old in sorted([*numbers, n])[:-keep]:
                with contextlib.suppress(FileNotFoundError):
                    (directory / str(old)).unlink()
        self._referenced(chain_id)
        return f"snapshot:{test}"

    @staticmethod
    def _snapshot_numbers(directory: Path) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
        except FileNotFoundError:
            return []

    def snapshots(self, test: str | None = None) -> list[SnapshotInfo]:
        """Snapshots of ``test`` (or of every test), by test then oldest first."""
        base = self.root / "refs" / "snapshots"
        dirs = [base / _ref_filename(test)] if test is not None else sorted(base.iterdir())
        out = []
        for directory in dirs:
            for n in self._snapshot_numbers(directory):
                data = self._read_ref(directory / str(n))
                if data is None or (test is not None and data.get("test") != test):
                    continue
                out.append(
                    SnapshotInfo(
                        test=data["test"], n=n, chain_id=data["chain_id"], created=data["created"]
                    )
                )
        out.sort(key=lambda s: (s.test, s.n))
        return out

    # -- resolving -----------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """Chain id of ``ref``: a layer name, ``sha256:HEX``, a unique hex prefix of a chain id,
        or ``snapshot:NODEID`` (that test's latest snapshot)."""
        if ref.startswith("snapshot:"):
            test = ref[len("snapshot:") :]
            snaps = self.snapshots(test)
            if not snaps:
                tests = sorted({s.ref for s in self.snapshots()})
                raise errors.LayerNotFoundError(
                    ref, known=tests, hint=f"no snapshot of test {test!r} in {self.root}"
                )
            return self._existing(snaps[-1].chain_id, ref)
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
            hint="a ref is a layer name, sha256:HEX, a unique hex prefix or snapshot:NODEID",
        )

    def _existing(self, chain_id: str, ref: str) -> str:
        if not self.has_layer(chain_id):
            raise errors.LayerNotFoundError(
                ref, hint=f"it points to {chain_id}, which is no longer in the store; rebuild it"
            )
        return chain_id

    def _by_prefix(self, ref: str, prefix: str) -> str:
        if not _HEX_RE.fullmatch(prefix) or len(prefix) > 64:
            raise errors.LayerNotFoundError(ref, hint="sha256: must be followed by hex digits")
        matches = [c for c in self.layers() if c[7:].startswith(prefix)]
        if len(matches) > 1:
            raise errors.AmbiguousRefError(ref, matches)
        if not matches:
            raise errors.LayerNotFoundError(
                ref, known=list(self.names()), hint=f"no stored chain id starts with {prefix}"
            )
        return matches[0]

    # -- leases --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, chain_ids: Iterable[str]) -> Iterator[None]:
        """Mark these layers (and so their ancestors) as in use by this process until exit;
        ``prune`` leaves them alone. Raises :class:`errors.LayerNotFoundError` for a layer that
        is not stored."""
        ids = list(chain_ids)
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
            probe = filelock.FileLock(str(path.with_suffix(".lock")))
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
        report = PruneReport()
        doomed: list[Path] = []
        with filelock.FileLock(str(self._locks / "prune.lock"), timeout=600):
            with filelock.FileLock(str(self._locks / "snapshots.lock"), timeout=60):
                by_test: dict[str, list[SnapshotInfo]] = {}
                for snap in self.snapshots():
                    by_test.setdefault(snap.test, []).append(snap)
                for test, snaps in by_test.items():
                    directory = self.root / "refs" / "snapshots" / _ref_filename(test)
                    for snap in snaps[: max(0, len(snaps) - keep_snapshots)]:
                        with contextlib.suppress(FileNotFoundError):
                            (directory / str(snap.n)).unlink()
                        report.removed_snapshots.append(f"{snap.ref}#{snap.n}")
            with self._gc.hold(exclusive=True):
                roots = set(self.names().values())
                for path in (self.root / "refs" / "cache").iterdir():
                    data = self._read_ref(path)
                    if data:
                        roots.add(data["chain_id"])
                roots.update(s.chain_id for s in self.snapshots())
                leased, report.removed_leases = self._live_leases()
                roots |= leased
                reachable = self._closure(roots)
                for chain_id in self.layers():
                    if chain_id in reachable:
                        report.kept_layers += 1
                        continue
                    with contextlib.suppress(errors.LayersError):
                        gone = self.layer_info(chain_id)
                        if gone.alias_of is None:
                            report.freed_bytes += gone.size
                    victim = self._new_tmp_path("prune")
                    # Out of layers/ in one rename: a kill leaves it in tmp/ for the next sweep.
                    os.rename(self._layers / _hex(chain_id), victim)
                    self._info_cache.pop(chain_id, None)
                    doomed.append(victim)
                    report.removed_layers.append(chain_id)
            # Directories that lost their layer.json (damaged by hand) are not layers either.
            for name in os.listdir(self._layers):
                if not (self._layers / name / "layer.json").is_file():
                    victim = self._new_tmp_path("prune")
                    with contextlib.suppress(OSError):
                        os.rename(self._layers / name, victim)
                        doomed.append(victim)
        for victim in doomed:
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
        for chain_id in self.layers() if chain_ids is None else list(chain_ids):
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
