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
import gzip
import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pytest_layers import _tarlimits, layertar
from pytest_layers import store as store_mod
from pytest_layers._fmt import human_size, short_digest
from pytest_layers._ociexport import ExportResult, default_tag, export_image, output_form
from pytest_layers._ocispec import (
    _CHUNK,
    _CONFIG_TYPES,
    _DIGEST_LEN,
    _DIGEST_RE,
    _INDEX_TYPES,
    _LAYER_TYPES,
    _MANIFEST_TYPES,
    _REF_NAME,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    Progress,
    _HashReader,
    _HashWriter,
    _platform,
)
from pytest_layers.errors import (
    InvalidImageError,
    InvalidLayerError,
    StoreError,
    UnsafeEntryError,
)

if TYPE_CHECKING:
    from pytest_layers.backends.base import Backend
    from pytest_layers.store import Store

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
    "default_tag",
    "output_form",
]


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_image` stored: the top chain id and every layer, bottom first."""

    chain_id: str
    diff_ids: list[str]
    chain_ids: list[str]
    imported: list[str] = field(default_factory=list)  # chain ids newly added to the store


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
            bounded = _tarlimits._BoundedTarInfo.bounded(limits or layertar.Limits())
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


# The public classes keep their public module in reprs, pickles and the reference.
ExportResult.__module__ = __name__
