"""Exporting a stored chain as an OCI image layout or a docker-archive: each layer's blob
(its canonical tar, or the original blob an imported layer kept), the config, the
manifest and index, then the layout renamed or tarred into place, never half written."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import gzip
import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from pytest_layers import _faultpoints, _proctag, layertar
from pytest_layers._fmt import human_size, short_digest
from pytest_layers._ocispec import (
    _CHUNK,
    _REF_NAME,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    Format,
    Progress,
    _HashWriter,
    _json_bytes,
    _platform,
)
from pytest_layers._storerecords import _BadJson, _open_store_file
from pytest_layers.errors import StoreError

if TYPE_CHECKING:
    from pytest_layers._storerecords import LayerInfo
    from pytest_layers.store import Store


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


def _iso(ts: float) -> str:
    when = _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _created_ts(info: LayerInfo) -> float:
    return info.created


_REPO_BAD = re.compile(r"[^a-z0-9._/-]+")


def default_tag(ref_name: str) -> str:
    """A Docker-valid ``repo:tag`` for a layer name or snapshot ref (``snapshot:t.py::x`` ->
    ``pytest-layers/t.py-x:latest``)."""
    repo = _REPO_BAD.sub("-", ref_name.lower().replace("snapshot:", "snapshot/").replace("::", "/"))
    repo = re.sub(r"[-._/]{2,}", "-", repo).strip("-._/") or "image"
    return f"pytest-layers/{repo}:latest"


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
        try:
            fd = _open_store_file(blob)
        except _BadJson as exc:
            raise StoreError(
                errno.EIO,
                f"layer {info.chain_id}: its kept blob {blob} is {exc}; the store is damaged "
                "or was tampered with (run `pytest-layers verify`, then delete and re-import "
                "the layer)",
                os.fspath(blob),
            ) from None
        with open(fd, "rb") as f:
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
        layers = _write_layer_blobs(
            store, chain, blobs, staging=staging, gzip_layers=gzip_layers, progress=progress
        )
        config_digest, manifest_digest = _write_image(layout, chain, layers, tag, format)
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
            diff_ids=layers.diff_ids,
            chain_ids=layertar.chain_ids(layers.diff_ids),
            size=layers.size,
            gzipped=gzipped,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class _Layers:
    """The layer blobs an export wrote, bottom first: their descriptors, DiffIDs and history
    entries, and the bytes written."""

    descriptors: list[dict[str, Any]] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0


def _write_layer_blobs(
    store: Store,
    chain: list[LayerInfo],
    blobs: Path,
    *,
    staging: Path,
    gzip_layers: bool,
    progress: Progress | None,
) -> _Layers:
    """Write each layer's blob into ``blobs`` (named by its digest), bottom first."""
    out = _Layers()
    for n, info in enumerate(chain, 1):
        started = time.monotonic()
        part = blobs / f".layer-{n}.part"
        with open(part, "wb") as f:
            digest, diff_id, size = _stream_layer(store, info, f, compress=gzip_layers)
        final = blobs / digest.split(":", 1)[1]
        if final.exists():  # the same blob twice in one image (an empty layer, say)
            part.unlink()
        else:
            part.rename(final)
        if n == 1:
            # Fault-injection tests kill the process here, with the export half written.
            _faultpoints.reached("export", str(staging))
        out.descriptors.append(
            {
                "mediaType": MEDIA_TYPE_LAYER_GZIP if gzip_layers else MEDIA_TYPE_LAYER,
                "digest": digest,
                "size": size,
            }
        )
        out.diff_ids.append(diff_id)
        what = info.name or short_digest(info.chain_id)
        out.history.append(
            {
                "created": _iso(_created_ts(info)),
                "created_by": f"pytest-layers {info.source}: {what}",
                "comment": f"chain_id {info.chain_id}",
            }
        )
        out.size += size
        if progress is not None:
            progress(
                f"layer {n}/{len(chain)} {short_digest(diff_id)} {human_size(size)} "
                f"{time.monotonic() - started:.2f}s"
            )
    return out


def _repo_and_version(tag: str) -> tuple[str, str]:
    repo, _, version = tag.rpartition(":")
    if not repo or "/" in version:
        return tag, "latest"
    return repo, version


def _write_image(
    layout: Path, chain: list[LayerInfo], layers: _Layers, tag: str, format: Format
) -> tuple[str, str]:
    """Write the config, the manifest, ``index.json`` and ``oci-layout`` (and, for a
    docker-archive, ``manifest.json`` and ``repositories``); returns the config and manifest
    digests."""
    blobs = layout / "blobs" / "sha256"
    arch, variant = _platform()
    config: dict[str, Any] = {
        "created": _iso(_created_ts(chain[-1])),
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.diff_ids},
        "history": layers.history,
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
        "layers": layers.descriptors,
    }
    manifest_digest, manifest_size = _write_blob_bytes(blobs, _json_bytes(manifest))
    repo, version = _repo_and_version(tag)
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
                "Layers": [
                    f"blobs/sha256/{d['digest'].split(':', 1)[1]}" for d in layers.descriptors
                ],
            }
        ]
        (layout / "manifest.json").write_bytes(_json_bytes(docker_manifest))
        top_id = layertar.chain_ids(layers.diff_ids)[-1].split(":", 1)[1]
        (layout / "repositories").write_bytes(_json_bytes({repo: {version: top_id}}))
    return config_digest, manifest_digest


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
