"""What the store's own files say, and how they are read and written: the records
(``layer.json`` as :class:`LayerInfo`, snapshots, ``verify`` problems, ``prune`` reports),
chain-id and ref-name spelling, and the trusted reading (:func:`_open_store_file`: no
symlink, no fifo, a regular file; :func:`_read_store_bytes` and :func:`_read_json`: bounded
too) and exclusive writing (:func:`_write_new`) of every store file."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pytest_layers import errors
from pytest_layers._fmt import short_digest

#: Bytes a ref or ``layer.json`` may hold; refs are a few hundred.
_MAX_JSON = 1 << 20
#: Bytes a layer's ``files.json`` may hold: some 200 a path, so room for millions of paths.
_MAX_FILES_JSON = 1 << 30
#: Bytes a lease or pin may hold: 73 a chain id it names, so room for ~900,000 of them.
_MAX_LEASE = 64 << 20
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CHAIN_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]+")


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


class _BadJson(ValueError):
    """A store file that is not what it should be; the message says what it is instead."""


class _TooLarge(_BadJson):
    """A store file larger than any the store writes of its kind."""


def _open_store_file(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """An fd for reading the store file ``path`` (a record, a kept blob): never through a
    symlink, never blocking on a fifo, only a regular file: in a shared store any member may
    have planted something else there. ``FileNotFoundError`` when absent; :class:`_BadJson`
    saying what it is otherwise."""
    try:
        fd = os.open(path, _O_READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _BadJson("a symlink, not a file of the store") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):
            raise _BadJson("not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _BadJson("not a regular file")
    return fd


def _read_store_bytes(
    path: str | os.PathLike[str], limit: int, *, dir_fd: int | None = None
) -> bytes:
    """The bytes of the store file ``path``, opened by :func:`_open_store_file`, as long as
    it was when opened (a lease grows while its owner appends); :class:`_TooLarge` beyond
    ``limit`` bytes, checked before reading: a sparse file of gigabytes costs nothing to
    plant."""
    with open(_open_store_file(path, dir_fd=dir_fd), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise _TooLarge(f"larger than {limit} bytes")
        return f.read(size)


def _read_json(
    path: str | os.PathLike[str], *, dir_fd: int | None = None, limit: int = _MAX_JSON
) -> dict[str, Any]:
    """The JSON object in the store file ``path``, read by :func:`_read_store_bytes` (at most
    ``limit`` bytes). ``FileNotFoundError`` when absent; :class:`_BadJson` saying why
    otherwise."""
    raw = _read_store_bytes(path, limit, dir_fd=dir_fd)
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
