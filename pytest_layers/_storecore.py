"""The layer store's core: opening a store (layout, access checks, format, flavor), its
scratch area (``tmp/``, :meth:`staging`), reading stored layers (:meth:`layer_info`,
:meth:`chain`), leases and pins, and what the store's own files hold in bytes. The
public :class:`pytest_layers.store.Store` is this plus refs, writing and maintenance."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import secrets
import stat
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import filelock

from pytest_layers import (
    _access,
    _ocirules,
    _proctag,
    errors,
)
from pytest_layers._layerindex import disk_use
from pytest_layers._mounts import filesystem_type
from pytest_layers._removal import remove_tree
from pytest_layers._storelocks import (
    _GcLock,
    _Lease,
    _read_lease,
    _release_lease,
    _StoreLock,
)
from pytest_layers._storerecords import (
    _HEX_RE,
    LayerInfo,
    _BadJson,
    _hex,
    _open_store_file,
    _read_json,
    _write_new,
)
from pytest_layers.layertar import Flavor

#: Format of the store layout this module reads and writes (``VERSION``'s ``format``).
FORMAT_VERSION = 1


#: Seconds ``build_lock`` waits for another builder of the same key before giving up.
DEFAULT_LOCK_TIMEOUT = 1800.0


#: Layers in one chain at most: the kernel stacks 500, OCI images hold a few dozen. A longer
#: ``parent`` chain (or a loop) in ``layer.json`` is a damaged or hostile store.
MAX_CHAIN_LENGTH = 4096


#: Names a store's own directory may hold: a directory holding anything else and no ``VERSION``
#: is not a store, and is never adopted as one (its tmp/ and layers/ would be emptied).
_LAYOUT_NAMES = frozenset(
    {"VERSION", "layers", "tmp", "locks", "leases", "refs", "scratch", "mounts", "lost+found"}
)


_FLAVORS = _ocirules.FLAVORS
_SOURCES = ("build", "commit", "import", "init")


# Filesystems where a 0/0 character device is a whiteout rather than a file of its own.
_UNION_FS = ("overlay", "aufs", "fuse.fuse-overlayfs", "fuse.unionfs", "fuse.mergerfs")


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


def _make_staged(container: Path, access: _access.Access) -> None:
    """Make ``container/diff``, private to its creator, through an fd of ``container``
    opened without following a symlink."""
    cfd = _access._open_new_dir(container)
    try:
        os.mkdir("diff", 0o777, dir_fd=cfd)
        fd = os.open(
            "diff", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cfd
        )
        try:
            access.private_fd(fd)
        finally:
            os.close(fd)
    finally:
        os.close(cfd)


def _no_symlink(tree: Path) -> Path:
    """``tree``, a layer's tree, unless it is a symlink: the store never makes one, and a view
    or export of it would show whatever it points to (in a shared store, another member could
    have put it there)."""
    if tree.is_symlink():
        raise errors.StoreError(
            errno.ELOOP,
            f"the layer tree {tree} is a symlink, which the store never makes: the store was "
            "changed by someone else; `pytest-layers verify` lists what else was, and "
            f"removing {tree.parent} lets the layer be built again",
            str(tree),
        )
    return tree


def _rmtree(path: Path) -> None:
    """Remove a tree we own, whatever the modes and the depth inside it; a missing path is
    fine. (A test's committed rw layer may be deeper than Python's recursion limit, which
    ``shutil.rmtree`` is not.)"""
    remove_tree(path)


def _blob_digest(path: Path, *, in_store: bool = False) -> str:
    """``sha256:`` of a layer blob's uncompressed bytes (a DiffID), gzip or plain.
    ``in_store``: a blob the store kept, opened as every store file is read (a symlink or a
    fifo planted there is :class:`_BadJson`, not followed or waited on)."""
    h = hashlib.sha256()
    with open(_open_store_file(path) if in_store else path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: BinaryIO = cast(BinaryIO, gzip.GzipFile(fileobj=raw)) if gz else raw
        while chunk := stream.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


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


class _StoreCore:
    """What every part of :class:`pytest_layers.store.Store` stands on (see there)."""

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
            # Written is proof enough: another session opening the store may sweep it first.
            with contextlib.suppress(FileNotFoundError):
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
            if _proctag.owner_alive(name):
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
        try:
            # Made and set up relative to the container's own fd: in a shared store another
            # member could swap the container for a symlink, and nothing may be made through it.
            _make_staged(container, self.access)
        except BaseException:
            _rmtree(container)
            raise
        try:
            yield staged
        finally:
            _rmtree(container)

    def layer_dir(self, chain_id: str) -> Path:
        """The layer's tree, ``STORE/layers/<hex>/diff``; for an alias, its target's tree."""
        path = self._layers / _hex(chain_id) / "diff"
        info = self._info_cache.get(chain_id)
        if info is None:
            # An alias is the only stored layer without a tree of its own.
            if path.is_dir() or not self.has_layer(chain_id):
                return _no_symlink(path)
            info = self.layer_info(chain_id)
        if info.alias_of is not None:
            return _no_symlink(self._layers / _hex(info.alias_of) / "diff")
        return _no_symlink(path)

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

    def _keep_alive(self, chain_id: str) -> None:
        # Until a ref points at a layer this process just stored, this process's own lease keeps
        # a concurrent prune from taking it (add_layer and cache_set are two calls).
        if self._auto_lease is None:
            self._auto_lease = _Lease(self.root, self.access.lock_mode, [chain_id])
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

    def _require(self, chain_id: str) -> None:
        if not self.has_layer(chain_id):
            raise errors.LayerNotFoundError(chain_id, hint=f"not in the store {self.root}")

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
            lease = _Lease(self.root, self.access.lock_mode, ids)
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
