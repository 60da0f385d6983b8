"""OCI image layout and docker-archive export and import.

Export walks a chain bottom first and writes each layer's blob: the canonical tar of a layer we
built or committed, or, for a layer we imported, the original uncompressed blob we kept, so that
an imported image exports with the DiffIDs it came with. Import reads an OCI image layout (a
directory or a tar) or a ``docker save`` archive, checks every digest it is given (blobs, config,
DiffIDs), and applies each layer with the secure applier onto a writable view of its parent
chain; the resulting changes become an ordinary stored layer that remembers its blob.

Nothing here holds a layer in memory: blobs stream through hashers into files, and files stream
into tars. Everything an import writes goes to the store's staging area first, so a failed import
leaves nothing behind outside the store (and nothing partial inside it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import hashlib
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

from pytest_layers import _faultpoints, _proctag, layertar
from pytest_layers import store as store_mod
from pytest_layers._fmt import human_size, short_digest
from pytest_layers.errors import (
    InvalidImageError,
    InvalidLayerError,
    StoreError,
    UnsafeEntryError,
)

if TYPE_CHECKING:
    from pytest_layers.backends.base import Backend
    from pytest_layers.store import LayerInfo, Store

__all__ = [
    "ExportResult",
    "ImportResult",
    "Progress",
    "export_image",
    "import_image",
    "image_id",
    "MEDIA_TYPE_INDEX",
    "MEDIA_TYPE_MANIFEST",
    "MEDIA_TYPE_CONFIG",
    "MEDIA_TYPE_LAYER",
    "MEDIA_TYPE_LAYER_GZIP",
]

MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
_REF_NAME = "org.opencontainers.image.ref.name"

_MANIFEST_TYPES = {MEDIA_TYPE_MANIFEST, _DOCKER_MANIFEST}
_INDEX_TYPES = {MEDIA_TYPE_INDEX, _DOCKER_MANIFEST_LIST}
_CONFIG_TYPES = {MEDIA_TYPE_CONFIG, _DOCKER_CONFIG}
# media type -> compression of the blob
_LAYER_TYPES: dict[str, str] = {
    MEDIA_TYPE_LAYER: "none",
    MEDIA_TYPE_LAYER_GZIP: "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")
_DIGEST_LEN = {"sha256": 64, "sha512": 128}
_CHUNK = 1 << 20
_GOARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}

#: Receives one human-readable progress line at a time (the CLI prints them on stderr).
Progress = Callable[[str], None]
Format = Literal["oci", "docker-archive"]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_image` wrote."""

    path: Path
    format: str
    tar: bool
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]
    chain_ids: list[str]
    size: int  # bytes of layer blobs written (not the output's disk use)
    gzipped: bool = False  # the tar itself is gzipped (*.tar.gz, *.tgz)


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_image` stored: the top chain id and every layer, bottom first."""

    chain_id: str
    diff_ids: list[str]
    chain_ids: list[str]
    imported: list[str] = field(default_factory=list)  # chain ids newly added to the store


# --------------------------------------------------------------------------------------------
# small helpers


class _HashWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, out: IO[bytes] | None, algo: str = "sha256") -> None:
        self._out = out
        self.hash = hashlib.new(algo)
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)
        return len(data)

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    @property
    def digest(self) -> str:
        return f"{self.hash.name}:{self.hash.hexdigest()}"


class _HashReader:
    """A read-only file object that hashes and counts what is read from it."""

    def __init__(self, raw: IO[bytes], algo: str) -> None:
        self._raw = raw
        self.hash = hashlib.new(algo)
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _platform() -> tuple[str, str | None]:
    machine = platform.machine().lower()
    return _GOARCH.get(machine, (machine, None))


def _iso(ts: float) -> str:
    when = _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _created_ts(info: LayerInfo) -> float:
    return info.created


def _json_bytes(obj: Any) -> bytes:
    # Sorted keys and no whitespace: the same image always gets the same config and manifest
    # digests.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


_REPO_BAD = re.compile(r"[^a-z0-9._/-]+")


def default_tag(ref_name: str) -> str:
    """A Docker-valid ``repo:tag`` for a layer name or snapshot ref (``snapshot:t.py::x`` ->
    ``pytest-layers/t.py-x:latest``)."""
    repo = _REPO_BAD.sub("-", ref_name.lower().replace("snapshot:", "snapshot/").replace("::", "/"))
    repo = re.sub(r"[-._/]{2,}", "-", repo).strip("-._/") or "image"
    return f"pytest-layers/{repo}:latest"


# --------------------------------------------------------------------------------------------
# export


def _stream_layer(
    store: Store, info: LayerInfo, out: IO[bytes], *, compress: bool
) -> tuple[str, str, int]:
    """Write one layer blob to ``out``; return (blob digest, diff_id, blob size)."""
    outer = _HashWriter(out)
    gz: gzip.GzipFile | None = None
    sink: Any = outer
    if compress:
        # mtime=0 and no file name: the same layer always compresses to the same blob.
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=6)
        sink = gz
    inner = _HashWriter(sink)
    blob = info.blob
    if blob is not None:
        with open(blob, "rb") as f:
            while chunk := f.read(_CHUNK):
                inner.write(chunk)
    else:
        layertar.write_layer_tar(store.layer_dir(info.chain_id), inner, flavor=store.flavor)  # type: ignore[arg-type]
    if gz is not None:
        gz.close()
    diff_id = inner.digest
    if diff_id != info.diff_id:
        raise StoreError(
            f"layer {info.chain_id}: its {'kept blob' if blob else 'stored tree'} hashes to "
            f"{diff_id}, but the store recorded diff_id {info.diff_id}; the store is damaged "
            f"(run `pytest-layers verify`, then rebuild or re-import the layer)"
        )
    return outer.digest, diff_id, outer.size


def _write_blob_bytes(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def export_image(
    store: Store,
    chain_id: str,
    dest: Path,
    *,
    format: Format = "oci",
    tar: bool | None = None,
    gzip_layers: bool = False,
    tag: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export the image whose top layer is ``chain_id`` to ``dest``.

    ``format="oci"`` writes an OCI image layout, as a directory or (``tar=True``, or ``dest``
    ending in ``.tar``) a tar of it; ``"docker-archive"`` always writes a tar that ``docker load``
    and ``skopeo copy docker-archive:`` read (an OCI layout plus ``manifest.json`` and
    ``repositories``, as ``docker save`` writes since Docker 25). A ``dest`` ending in ``.tar.gz``
    or ``.tgz`` gets a gzipped tar (``oci-archive:`` and ``docker load`` read it); one ending in
    another archive or compression suffix is refused rather than written as a directory of that
    name (:func:`output_form`). ``gzip_layers`` compresses the layer blobs; the DiffIDs stay
    the digests of the uncompressed tars. ``dest`` must not exist; it appears only complete.
    """
    if format not in ("oci", "docker-archive"):
        raise ValueError(f"unknown export format {format!r}; use 'oci' or 'docker-archive'")
    tar, gzipped = output_form(dest, format, tar)
    dest = Path(os.path.abspath(dest))
    if os.path.lexists(dest):
        raise FileExistsError(f"{dest} already exists; remove it or choose another -o path")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest.parent} does not exist; create it first")
    chain = store.chain(chain_id)
    tag = tag or default_tag(chain[-1].name or chain_id)
    _sweep_dead_staging(dest)
    # Named after its owner so that the next export can sweep it if this process is killed.
    staging = Path(
        tempfile.mkdtemp(
            prefix=f".{dest.name}.{_proctag.store_tag()}-", suffix=".tmp", dir=dest.parent
        )
    )
    try:
        layout = staging / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        descriptors: list[dict[str, Any]] = []
        diff_ids: list[str] = []
        history: list[dict[str, Any]] = []
        total = 0
        for n, info in enumerate(chain, 1):
            started = time.monotonic()
            part = blobs / f".layer-{n}.part"
            with open(part, "wb") as out:
                digest, diff_id, size = _stream_layer(store, info, out, compress=gzip_layers)
            final = blobs / digest.split(":", 1)[1]
            if final.exists():  # the same blob twice in one image (an empty layer, say)
                part.unlink()
            else:
                part.rename(final)
            if n == 1:
                # Fault-injection tests kill the process here, with the export half written.
                _faultpoints.reached("export", str(staging))
            descriptors.append(
                {
                    "mediaType": MEDIA_TYPE_LAYER_GZIP if gzip_layers else MEDIA_TYPE_LAYER,
                    "digest": digest,
                    "size": size,
                }
            )
            diff_ids.append(diff_id)
            source = info.source
            what = info.name or short_digest(info.chain_id)
            history.append(
                {
                    "created": _iso(_created_ts(info)),
                    "created_by": f"pytest-layers {source}: {what}",
                    "comment": f"chain_id {info.chain_id}",
                }
            )
            total += size
            if progress is not None:
                progress(
                    f"layer {n}/{len(chain)} {short_digest(diff_id)} {human_size(size)} "
                    f"{time.monotonic() - started:.2f}s"
                )
        arch, variant = _platform()
        config: dict[str, Any] = {
            "created": _iso(_created_ts(chain[-1])),
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        }
        if variant:
            config["variant"] = variant
        config_digest, config_size = _write_blob_bytes(blobs, _json_bytes(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG,
                "digest": config_digest,
                "size": config_size,
            },
            "layers": descriptors,
        }
        manifest_digest, manifest_size = _write_blob_bytes(blobs, _json_bytes(manifest))
        repo, _, version = tag.rpartition(":")
        if not repo or "/" in version:
            repo, version = tag, "latest"
        platform_desc: dict[str, str] = {"architecture": arch, "os": "linux"}
        if variant:
            platform_desc["variant"] = variant
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_TYPE_MANIFEST,
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "platform": platform_desc,
                    "annotations": {
                        _REF_NAME: version,
                        "io.containerd.image.name": f"{repo}:{version}",
                    },
                }
            ],
        }
        (layout / "index.json").write_bytes(_json_bytes(index))
        (layout / "oci-layout").write_bytes(_json_bytes({"imageLayoutVersion": "1.0.0"}))
        if format == "docker-archive":
            docker_manifest = [
                {
                    "Config": f"blobs/sha256/{config_digest.split(':', 1)[1]}",
                    "RepoTags": [f"{repo}:{version}"],
                    "Layers": [f"blobs/sha256/{d['digest'].split(':', 1)[1]}" for d in descriptors],
                }
            ]
            (layout / "manifest.json").write_bytes(_json_bytes(docker_manifest))
            top_id = layertar.chain_ids(diff_ids)[-1].split(":", 1)[1]
            (layout / "repositories").write_bytes(_json_bytes({repo: {version: top_id}}))
        if tar:
            staged_tar = staging / "out.tar"
            _tar_layout(layout, staged_tar, compress=gzipped)
            staged_tar.rename(dest)
        else:
            layout.rename(dest)
        return ExportResult(
            path=dest,
            format=format,
            tar=tar,
            manifest_digest=manifest_digest,
            config_digest=config_digest,
            diff_ids=diff_ids,
            chain_ids=layertar.chain_ids(diff_ids),
            size=total,
            gzipped=gzipped,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: Output names that say "a tar, compressed" in a way export does not write.
_OTHER_ARCHIVES = (".gz", ".xz", ".zst", ".bz2", ".lz4", ".zip", ".tbz", ".tbz2", ".txz", ".tzst")


def output_form(dest: Path, format: Format, tar: bool | None = None) -> tuple[bool, bool]:
    """``(tar, gzipped)`` for an export to ``dest``: ``*.tar`` a tar, ``*.tar.gz``/``*.tgz`` a
    gzipped tar, any other name a directory (``oci``) or a tar (``docker-archive``, always a
    tar); ``tar`` (True/False) overrides the name. A name with another archive suffix
    (``.zip``, ``.tar.xz``, ...) raises ``ValueError`` naming the choices: writing a directory
    called ``image.tar.xz`` would only surprise."""
    name = dest.name.lower()
    gzipped = name.endswith((".tar.gz", ".tgz"))
    if tar is None:
        if not gzipped and name.endswith(_OTHER_ARCHIVES):
            raise ValueError(
                f"{dest.name}: export writes a directory, a .tar or a gzipped .tar.gz/.tgz; "
                "rename the output to one of those (or pass --tar / --dir to choose yourself)"
            )
        tar = format == "docker-archive" or gzipped or name.endswith(".tar")
    elif not tar:
        gzipped = False
    if format == "docker-archive" and not tar:
        raise ValueError("a docker-archive is always a tar: drop the directory option")
    return tar, gzipped


def _sweep_dead_staging(dest: Path) -> None:
    """Remove staging dirs that killed exports to ``dest`` left next to it."""
    prefix = f".{dest.name}."
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            tag = name[len(prefix) :]
            if _proctag.parse(tag) is not None and not _proctag.owner_alive(tag):
                shutil.rmtree(entry.path, ignore_errors=True)


def _tar_layout(layout: Path, out_path: Path, *, compress: bool = False) -> None:
    """Tar ``layout`` deterministically (gzipped when ``compress``), removing each blob once it
    is in the tar so that the export never needs twice the image's size on disk."""

    def info_for(rel: str, path: Path) -> tarfile.TarInfo:
        st = path.lstat()
        ti = tarfile.TarInfo(rel)
        ti.mtime = 0
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        if stat.S_ISDIR(st.st_mode):
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
        else:
            ti.mode = 0o644
            ti.size = st.st_size
        return ti

    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(out_path, "wb"))
        # mtime=0 and no file name in the gzip header: the same image gives the same bytes.
        fileobj: IO[bytes] = raw
        if compress:
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
            fileobj = cast(IO[bytes], stack.enter_context(gz))
        tf = stack.enter_context(tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT))
        tf.addfile(info_for("blobs", layout / "blobs"))
        tf.addfile(info_for("blobs/sha256", layout / "blobs" / "sha256"))
        for blob in sorted((layout / "blobs" / "sha256").iterdir()):
            with open(blob, "rb") as f:
                tf.addfile(info_for(f"blobs/sha256/{blob.name}", blob), f)
            blob.unlink()
        for name in ("index.json", "manifest.json", "oci-layout", "repositories"):
            path = layout / name
            if path.exists():
                with open(path, "rb") as f:
                    tf.addfile(info_for(name, path), f)


# --------------------------------------------------------------------------------------------
# reading images


_MAX_LINK_HOPS = 40
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


def _open_regular(path: str, what: str, *, follow: bool) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file.

    The type is checked on an ``O_PATH`` fd, which opening never blocks on and which has no
    side effect whatever the file is (a FIFO would block ``open`` forever, a device node could
    act on the open); the file is then reopened through that fd, so it is the same inode.
    """
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        pfd = os.open(path, flags)
    except FileNotFoundError:
        raise InvalidImageError(what, "no such file or directory") from None
    except OSError as exc:
        raise InvalidImageError(what, f"cannot be opened ({exc.strerror})") from None
    try:
        mode = os.fstat(pfd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise InvalidImageError(what, f"is {kind}; an image is read from regular files only")
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(pfd)
    return open(fd, "rb")


def _clean_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


class _Source:
    """Files of an image, from a directory or a tar, by relative path.

    The image is untrusted: only regular files are read (a FIFO or device in their place is an
    error, never an ``open`` that blocks), links inside a tar are followed here with a bound
    on their number, and headers of the tar are bounded as in a layer (``layertar.Limits``).
    """

    def __init__(self, path: Path, limits: layertar.Limits | None = None) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        if not os.path.lexists(path):
            raise InvalidImageError(str(path), "no such file or directory")
        f = _open_regular(os.fspath(path), str(path), follow=True)
        try:
            bounded = layertar._BoundedTarInfo.bounded(limits or layertar.Limits())
            self._tar = tarfile.open(fileobj=f, mode="r:*", tarinfo=bounded)  # noqa: SIM115
            for member in self._tar:
                self._members[_clean_name(member.name)] = member
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            f.close()
            if isinstance(exc, InvalidLayerError):
                raise InvalidImageError(str(path), str(exc)) from None
            raise InvalidImageError(
                str(path), f"not an OCI layout directory or a readable tar ({exc})"
            ) from None
        self._file = f

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()

    @staticmethod
    def _check_name(name: str) -> str:
        if name.startswith("/") or ".." in name.split("/") or not name:
            raise InvalidImageError(name, "path in the image escapes the image")
        return name

    def _member(self, name: str) -> tarfile.TarInfo | None:
        """The member ``name`` names, its links followed (at most 40 of them)."""
        member = self._members.get(_clean_name(name))
        hops = 0
        while member is not None and (member.issym() or member.islnk()):
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise InvalidImageError(
                    name, f"its links in the image tar loop or chain more than {hops - 1} deep"
                )
            target = member.linkname
            if member.issym() and not target.startswith("/"):
                target = posixpath.join(posixpath.dirname(_clean_name(member.name)), target)
            target = posixpath.normpath("/" + target).lstrip("/")
            member = self._members.get(target)
        return member

    def exists(self, name: str) -> bool:
        name = self._check_name(name)
        if self._tar is None:
            return os.path.lexists(self._dir_path(name))
        return self._member(name) is not None

    def _dir_path(self, name: str) -> str:
        full = os.path.realpath(os.path.join(self.path, name))
        root = os.path.realpath(self.path)
        if os.path.commonpath([full, root]) != root:
            raise InvalidImageError(name, "symlink in the image layout points outside it")
        return full

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        name = self._check_name(name)
        if self._tar is None:
            # realpath resolved every link (inside the layout): nothing is left to follow.
            with _open_regular(self._dir_path(name), name, follow=False) as f:
                yield f
            return
        member = self._member(name)
        if member is None:
            raise InvalidImageError(name, f"missing from {self.path}")
        if not member.isreg():
            kind = "a directory" if member.isdir() else "a FIFO" if member.isfifo() else "special"
            raise InvalidImageError(
                name, f"is {kind} in the image tar; an image is read from regular files only"
            )
        extracted = self._tar.extractfile(member)
        assert extracted is not None  # a regular member always has data
        with extracted:
            yield extracted

    def read_json(self, name: str, limit: int = 16 << 20) -> Any:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidImageError(name, f"larger than {limit} bytes; not an image metadata file")
        return _loads(data, name)


def _parse_digest(digest: Any, where: str) -> tuple[str, str]:
    m = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if m is None or len(m.group(2)) != _DIGEST_LEN[m.group(1)]:
        raise InvalidImageError(where, f"invalid digest {digest!r}")
    return m.group(1), m.group(2)


def _blob_name(digest: Any, where: str) -> str:
    algo, hexd = _parse_digest(digest, where)
    return f"blobs/{algo}/{hexd}"


def _read_verified(src: _Source, desc: dict[str, Any], what: str) -> bytes:
    """Read a small blob (manifest, config) named by a descriptor, checking digest and size."""
    name = _blob_name(desc.get("digest"), what)
    digest = str(desc["digest"])
    if not src.exists(name):
        raise InvalidImageError(what, f"blob {digest} is missing ({name})")
    with src.open(name) as f:
        data = f.read((16 << 20) + 1)
    if len(data) > (16 << 20):
        raise InvalidImageError(what, f"blob {digest} is larger than 16 MiB")
    algo = digest.split(":", 1)[0]
    actual = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    if actual != digest:
        raise InvalidImageError(what, f"blob {name} has digest {actual}, expected {digest}")
    if "size" in desc and desc["size"] != len(data):
        raise InvalidImageError(
            what, f"blob {digest} is {len(data)} bytes, descriptor says {desc['size']}"
        )
    return data


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise InvalidImageError(what, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidImageError(what, "JSON nested too deeply for image metadata") from None


def _obj(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else a one-line error naming ``what``."""
    if not isinstance(value, dict):
        raise InvalidImageError(what, f"is not a JSON object but {type(value).__name__}")
    return value


def _sub(obj: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """``obj[key]`` as an object; an absent or null field is an empty one."""
    value = obj.get(key)
    return {} if value is None else _obj(value, f"{what}: {key!r}")


@dataclass
class _LayerRef:
    name: str  # file in the source
    compression: str  # "none", "gzip", "zstd" or "detect"
    digest: str | None  # expected blob digest (OCI), None for docker-archive paths
    size: int | None


@dataclass
class _Image:
    layers: list[_LayerRef]
    diff_ids: list[str]
    config: dict[str, Any]
    digest: str  # the manifest's digest (OCI layout) or the config's (docker-archive: image ID)


def _pick_manifest(
    src: _Source, index: Any, ref: str | None, where: str, depth: int = 0
) -> dict[str, Any]:
    if depth > 8:
        raise InvalidImageError(where, "indexes nest more than 8 deep")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidImageError(where, "has no 'manifests' list")
    manifests = [m for m in index["manifests"] if isinstance(m, dict)]
    notes = [_sub(m, "annotations", f"{where} manifests[{i}]") for i, m in enumerate(manifests)]
    plats = [_sub(m, "platform", f"{where} manifests[{i}]") for i, m in enumerate(manifests)]
    if ref is not None:
        keep = [
            i
            for i, m in enumerate(manifests)
            if notes[i].get(_REF_NAME) == ref
            or notes[i].get("io.containerd.image.name") == ref
            or m.get("digest") == ref
        ]
        hits = [manifests[i] for i in keep]
        all_notes = notes
        notes = [notes[i] for i in keep]
        plats = [plats[i] for i in keep]
        if not hits:
            known = sorted(str(n.get(_REF_NAME)) for n in all_notes)
            raise InvalidImageError(
                where, f"no image tagged {ref!r}; tags present: {', '.join(known) or '(none)'}"
            )
        manifests = hits
    if not manifests:
        raise InvalidImageError(where, "lists no images")
    if len(manifests) > 1:
        arch, _ = _platform()
        mine = [
            m
            for m, p in zip(manifests, plats, strict=True)
            if p.get("architecture") in (None, arch) and p.get("os") in (None, "linux")
        ]
        if len(mine) != 1:
            tags = sorted(str(n.get(_REF_NAME)) for n in notes)
            raise InvalidImageError(
                where, f"holds several images ({', '.join(tags)}); pass ref= / --ref to pick one"
            )
        manifests = mine
    desc = manifests[0]
    media = desc.get("mediaType")
    if media in _INDEX_TYPES:
        nested = _loads(_read_verified(src, desc, f"{where} -> {desc.get('digest')}"), where)
        return _pick_manifest(src, nested, None, f"index {desc.get('digest')}", depth + 1)
    if media not in _MANIFEST_TYPES:
        raise InvalidImageError(
            f"{where} -> {desc.get('digest')}",
            f"unknown manifest media type {media!r}; expected {MEDIA_TYPE_MANIFEST}",
        )
    return desc


def _read_image(src: _Source, ref: str | None) -> _Image:
    if src.exists("oci-layout") and src.exists("index.json"):
        layout = src.read_json("oci-layout")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise InvalidImageError(
                "oci-layout", f"unsupported imageLayoutVersion {version!r}; expected 1.x"
            )
        desc = _pick_manifest(src, src.read_json("index.json"), ref, "index.json")
        what = f"manifest {desc['digest']}"
        manifest = _loads(_read_verified(src, desc, what), what)
        if not isinstance(manifest, dict):
            raise InvalidImageError(what, "is not a JSON object")
        media = manifest.get("mediaType", desc.get("mediaType"))
        if media not in _MANIFEST_TYPES:
            raise InvalidImageError(what, f"unknown manifest media type {media!r}")
        cdesc = manifest.get("config")
        if not isinstance(cdesc, dict):
            raise InvalidImageError(what, "has no config descriptor")
        if cdesc.get("mediaType") not in _CONFIG_TYPES:
            raise InvalidImageError(
                f"config {cdesc.get('digest')}",
                f"unknown config media type {cdesc.get('mediaType')!r}; expected "
                f"{MEDIA_TYPE_CONFIG}",
            )
        config = _loads(_read_verified(src, cdesc, "image config"), "image config")
        digest = str(desc["digest"])
        layers: list[_LayerRef] = []
        for i, ldesc in enumerate(manifest.get("layers") or []):
            lwhat = f"layer {i + 1} ({ldesc.get('digest') if isinstance(ldesc, dict) else ldesc})"
            if not isinstance(ldesc, dict):
                raise InvalidImageError(lwhat, "descriptor is not a JSON object")
            media = ldesc.get("mediaType")
            if media not in _LAYER_TYPES:
                raise InvalidImageError(
                    lwhat,
                    f"unknown layer media type {media!r}; supported: "
                    f"{MEDIA_TYPE_LAYER}, {MEDIA_TYPE_LAYER_GZIP}",
                )
            layers.append(
                _LayerRef(
                    name=_blob_name(ldesc.get("digest"), lwhat),
                    compression=_LAYER_TYPES[media],
                    digest=ldesc["digest"],
                    size=ldesc.get("size"),
                )
            )
    elif src.exists("manifest.json"):
        entries = src.read_json("manifest.json")
        if not isinstance(entries, list) or not entries:
            raise InvalidImageError("manifest.json", "is not a non-empty list of images")
        for i, e in enumerate(entries):
            _obj(e, f"manifest.json [{i}]")
            tags = e.get("RepoTags")
            if tags is not None and not (
                isinstance(tags, list) and all(isinstance(t, str) for t in tags)
            ):
                raise InvalidImageError(f"manifest.json [{i}]", "RepoTags is not a list of tags")
            names = e.get("Layers")
            if names is not None and not (
                isinstance(names, list) and all(isinstance(n, str) for n in names)
            ):
                raise InvalidImageError(f"manifest.json [{i}]", "Layers is not a list of paths")
        if ref is not None:
            entries = [e for e in entries if ref in (e.get("RepoTags") or [])]
            if not entries:
                raise InvalidImageError("manifest.json", f"no image tagged {ref!r}")
        if len(entries) > 1:
            tags = [", ".join(e.get("RepoTags") or ["(untagged)"]) for e in entries]
            raise InvalidImageError(
                "manifest.json", f"holds several images ({'; '.join(tags)}); pass --ref"
            )
        entry = entries[0]
        config_name = entry.get("Config")
        if not isinstance(config_name, str):
            raise InvalidImageError("manifest.json", "has no Config")
        with src.open(config_name) as f:
            raw = f.read((16 << 20) + 1)
        # docker save names the config after its digest: check it when the name says so.
        m = re.search(r"([0-9a-f]{64})(\.json)?$", config_name)
        if m and hashlib.sha256(raw).hexdigest() != m.group(1):
            raise InvalidImageError(config_name, "content does not match the digest in its name")
        config = _loads(raw, config_name)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        layers = [
            _LayerRef(name=str(n), compression="detect", digest=None, size=None)
            for n in entry.get("Layers") or []
        ]
        for layer_ref in layers:
            m = re.match(r"^blobs/(sha256|sha512)/([0-9a-f]+)$", layer_ref.name)
            if m:
                layer_ref.digest = f"{m.group(1)}:{m.group(2)}"
    else:
        raise InvalidImageError(
            str(src.path),
            "neither an OCI image layout (oci-layout + index.json) nor a docker-archive "
            "(manifest.json)",
        )
    if not isinstance(config, dict):
        raise InvalidImageError("image config", "is not a JSON object")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidImageError("image config", "has no rootfs of type 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise InvalidImageError("image config", "rootfs.diff_ids is not a list")
    for i, d in enumerate(diff_ids):
        algo, _ = _parse_digest(d, f"image config rootfs.diff_ids[{i}]")
        if algo != "sha256":
            # Refused here, before anything is stored: layers are named by sha256 ChainIDs.
            raise InvalidImageError(
                f"image config rootfs.diff_ids[{i}]",
                f"{algo} DiffIDs are not supported (layers are identified by sha256, as in "
                "Docker and containerd); re-export the image with sha256 digests",
            )
    from pytest_layers.backends.overlay import MAX_LOWERS

    if len(layers) > MAX_LOWERS:
        raise InvalidImageError(
            str(src.path),
            f"has {len(layers)} layers, but the kernel stacks at most {MAX_LOWERS} in one "
            "overlay mount, so it could not be used; nothing was imported. Squash the image "
            "first (for example `docker build --squash`, or `skopeo`/`umoci` to repack it)",
        )
    if len(diff_ids) != len(layers):
        raise InvalidImageError(
            "image config",
            f"lists {len(diff_ids)} diff_ids but the manifest has {len(layers)} layers",
        )
    for n, layer_ref in enumerate(layers, 1):
        if not src.exists(layer_ref.name):
            raise InvalidImageError(
                f"layer {n} ({layer_ref.digest or layer_ref.name})",
                f"blob {layer_ref.name} is missing from {src.path}",
            )
    return _Image(layers=layers, diff_ids=[str(d) for d in diff_ids], config=config, digest=digest)


def _unpack_blob(
    src: _Source,
    layer: _LayerRef,
    n: int,
    expected_diff: str,
    out: Path,
    limits: layertar.Limits,
) -> tuple[int, int]:
    """Copy layer ``n``'s blob, decompressed, to ``out``, checking the blob digest and DiffID.
    Returns the compressed and the uncompressed size.

    ``limits`` bound the uncompressed size and the compression ratio, checked after every
    chunk, so a decompression bomb stops within a MiB of its limit."""
    what = f"layer {n} ({layer.digest or layer.name})"
    algo = (layer.digest or "sha256:").split(":", 1)[0]
    diff_algo = expected_diff.split(":", 1)[0]
    with src.open(layer.name) as raw_f, open(out, "wb") as dst:
        raw = _HashReader(raw_f, algo)
        compression = layer.compression
        if compression == "detect":
            # docker-archive says nothing about compression: look at the magic bytes.
            head = raw.read(4)
            compression = (
                "gzip"
                if head[:2] == b"\x1f\x8b"
                else "zstd"
                if head == b"\x28\xb5\x2f\xfd"
                else "none"
            )
            stream: Any = _Prefixed(head, raw)
        else:
            stream = raw
        if compression == "zstd":
            stream, compression = _ZstdReader(stream, what), "none"
        inner = _HashWriter(dst, diff_algo)

        def write(chunk: bytes) -> None:
            inner.write(chunk)
            if inner.size > limits.max_layer_size:
                raise InvalidImageError(
                    what,
                    f"uncompressed, it is more than {limits.max_layer_size} bytes, the limit "
                    "for one layer; if the image is trusted, raise it with `pytest-layers "
                    f"import --max-layer-size` or {layertar.Limits.ENV['max_layer_size']}",
                )
            if (
                inner.size > layertar.Limits.RATIO_FLOOR
                and inner.size > limits.max_ratio * raw.size
            ):
                raise InvalidImageError(
                    what,
                    f"{raw.size} compressed bytes expand to more than {inner.size}, a ratio "
                    f"above the limit of {limits.max_ratio}:1 (a decompression bomb?); if the "
                    "image is trusted, raise it with `pytest-layers import --max-ratio` or "
                    f"{layertar.Limits.ENV['max_ratio']}",
                )

        try:
            if compression == "gzip":
                with gzip.GzipFile(fileobj=stream, mode="rb") as gz:
                    while chunk := gz.read(_CHUNK):
                        write(chunk)
            else:
                while chunk := stream.read(_CHUNK):
                    write(chunk)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise InvalidImageError(what, f"cannot be decompressed ({exc})") from None
        raw.drain()
    if layer.digest is not None:
        actual = f"{algo}:{raw.hash.hexdigest()}"
        if actual != layer.digest:
            raise InvalidImageError(what, f"blob has digest {actual}, expected {layer.digest}")
        if layer.size is not None and layer.size != raw.size:
            raise InvalidImageError(
                what, f"blob is {raw.size} bytes, the manifest says {layer.size}"
            )
    if inner.digest != expected_diff:
        raise InvalidImageError(
            what,
            f"DiffID mismatch: the uncompressed layer hashes to {inner.digest} but the image "
            f"config says {expected_diff}",
        )
    return raw.size, inner.size


class _ZstdReader:
    """A zstd blob decompressed as it is read, with the optional ``zstandard`` module."""

    def __init__(self, raw: Any, what: str) -> None:
        self._what = what
        try:
            import zstandard
        except ImportError:
            raise InvalidImageError(
                what,
                "is zstd-compressed and the zstandard module is not installed: pip install "
                "'pytest-layers[zstd]', or convert the image with `skopeo copy "
                "--dest-compress-format gzip`",
            ) from None
        self._error: type[Exception] = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)

    def read(self, n: int = -1) -> bytes:
        try:
            return bytes(self._reader.read(n if n and n > 0 else _CHUNK))
        except self._error as exc:
            raise InvalidImageError(self._what, f"cannot be decompressed ({exc})") from None

    def readable(self) -> bool:
        return True


class _Prefixed:
    """Put bytes already read back in front of a stream."""

    def __init__(self, head: bytes, rest: _HashReader) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                data, self._head = self._head + self._rest.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._rest.read(n - len(data))
            return data
        return self._rest.read(n)

    def readable(self) -> bool:
        return True


# --------------------------------------------------------------------------------------------
# import


def _default_backend(store: Store, scratch: Path) -> Backend:
    """The fastest backend that works here (``auto``): the copy backend is the last resort."""
    from pytest_layers.backends import detect

    backend, _skipped = detect.choose_backend("auto", scratch, flavor=store.flavor)
    return backend


def _apply(
    blob: Path,
    root: Path,
    limits: layertar.Limits,
    n: int,
    layer: _LayerRef,
    *,
    standalone: bool = False,
) -> None:
    try:
        layertar.apply_layer_tar(
            blob, root, limits=limits, strict_devices=True, standalone=standalone
        )
    except (InvalidLayerError, UnsafeEntryError) as exc:
        raise InvalidImageError(f"layer {n} ({layer.digest or layer.name})", str(exc)) from None


def _apply_on_view(
    store: Store,
    backend: Backend | None,
    staging: Path,
    parents: list[str],
    blob: Path,
    limits: layertar.Limits,
    n: int,
    layer: _LayerRef,
    *,
    diff_id: str,
    what: str,
) -> store_mod.LayerInfo:
    """Apply layer ``n`` onto a writable view of its ``parents`` and store what changed."""
    from pytest_layers.changeset import ImageView

    lowers = [store.layer_dir(c) for c in reversed(parents)]
    scratch = staging / "view"
    scratch.mkdir()
    chosen = backend or _default_backend(store, staging / "probe")
    view = chosen.open(lowers, scratch, flavor=store.flavor)
    try:
        _apply(blob, view.path, limits, n, layer)
        entries = chosen.changes(view, ImageView(lowers, store.flavor))
        return store.write_layer(
            entries,
            parent=parents[-1],
            name=None,
            source="import",
            what=what,
            clamp_mtimes=False,  # an imported layer keeps its image's mtimes (docs/concepts)
            diff_id=diff_id,
            blob=blob,
            blob_verified=True,  # _unpack_blob hashed it to this DiffID
        )
    finally:
        view.close()


def image_id(path: Path, *, ref: str | None = None, limits: layertar.Limits | None = None) -> str:
    """The identity of the image at ``path`` without importing it: the digest of its manifest
    (OCI layout, directory or tar) or of its config (docker-archive, Docker's image ID).

    Reads only the layout's small metadata files; raises :class:`InvalidImageError` naming the
    culprit when ``path`` is not an image, has no image tagged ``ref``, or misses a blob.
    """
    src = _Source(Path(path), limits or layertar.Limits.from_env())
    try:
        return _read_image(src, ref).digest
    finally:
        src.close()


def import_image(
    store: Store,
    path: Path | _Source,
    *,
    name: str | None = None,
    ref: str | None = None,
    backend: Backend | None = None,
    progress: Progress | None = None,
    limits: layertar.Limits | None = None,
) -> ImportResult:
    """Import an OCI image layout (directory or tar) or a docker-archive into ``store``.

    Every blob digest, the config digest and each layer's DiffID (the digest of its
    uncompressed tar, checked against ``rootfs.diff_ids`` of the image config) are verified;
    each layer is applied with :func:`layertar.apply_layer_tar` onto a writable view of its
    parent chain, and stored with its original blob so a later export reproduces the DiffIDs.
    Layers already in the store are reused. ``name``, when given, names the top layer.
    ``ref`` picks an image by tag when the layout holds several.
    Raises :class:`InvalidImageError` or :class:`UnsafeEntryError` naming the culprit; nothing
    is written outside the store, and no partial layer becomes visible. The image is untrusted
    input: ``limits`` (default: :meth:`layertar.Limits.from_env`) bound what a layer may
    expand to; a device node an ordinary user cannot create is an error, not a silent gap; a
    full disk raises :class:`NoSpaceError` naming the image.
    """
    limits = limits or layertar.Limits.from_env()
    # A registry hands in its own _Source, whose layer blobs are HTTP streams (registry.py).
    src = path if isinstance(path, _Source) else _Source(Path(path), limits)
    try:
        image = _read_image(src, ref)
        chain_ids = layertar.chain_ids(image.diff_ids) if image.diff_ids else []
        if not chain_ids:
            raise InvalidImageError(str(path), "has no layers; nothing to import")
        imported: list[str] = []
        for i, layer in enumerate(image.layers):
            n = i + 1
            cid = chain_ids[i]
            parent = chain_ids[i - 1] if i else None
            if store.has_layer(cid):
                if progress is not None:
                    progress(
                        f"layer {n}/{len(image.layers)} {short_digest(image.diff_ids[i])} exists"
                    )
                continue
            started = time.monotonic()
            with (
                store.full_disk(what := f"image {path} (layer {n}/{len(image.layers)})"),
                store.staging() as staging,
            ):
                blob = staging / "blob.tar"
                size, usize = _unpack_blob(src, layer, n, image.diff_ids[i], blob, limits)
                staged = staging / "layer"
                staged.mkdir()
                info: store_mod.LayerInfo | None = None
                if i == 0:
                    # Nothing below the bottom layer: its tar applied as it is is the
                    # layer (whiteouts and opaque markers have nothing to hide), so no
                    # view, no change list, no second copy of every file.
                    _apply(blob, staged, limits, n, layer)
                else:
                    try:
                        # A layer that only adds entries (every parent directory, every
                        # hardlink target its own, no whiteout) is its own diff too: the
                        # usual case for images we push, and for most build steps.
                        _apply(blob, staged, limits, n, layer, standalone=True)
                    except layertar.NeedsLowerLayers:
                        # Start over on a view of the parents, written like any change list;
                        # the staging area's own cleanup takes the partial tree (read-only
                        # dirs and all).
                        info = _apply_on_view(
                            store,
                            backend,
                            staging,
                            chain_ids[:i],
                            blob,
                            limits,
                            n,
                            layer,
                            diff_id=image.diff_ids[i],
                            what=what,
                        )
                if info is None:
                    info = store.add_layer(
                        staged,
                        parent=parent,
                        name=None,
                        source="import",
                        diff_id=image.diff_ids[i],
                        blob=blob,
                        blob_verified=True,  # _unpack_blob hashed it to this DiffID
                        what=what,
                    )
            if info.chain_id != cid:
                raise StoreError(
                    f"layer {n}: the store gave chain id {info.chain_id}, expected {cid}; "
                    "the store and this importer disagree on ChainIDs (a bug: please report it)"
                )
            imported.append(cid)
            if progress is not None:
                progress(
                    f"layer {n}/{len(image.layers)} {short_digest(image.diff_ids[i])} "
                    f"{human_size(size)} -> {human_size(usize)} uncompressed "
                    f"{time.monotonic() - started:.2f}s"
                )
        if name is not None:
            store.set_name(name, chain_ids[-1])
        return ImportResult(
            chain_id=chain_ids[-1],
            diff_ids=list(image.diff_ids),
            chain_ids=chain_ids,
            imported=imported,
        )
    finally:
        src.close()
