"""What the OCI image spec (and Docker's v2 formats) name, for export, import and the
registry client: media types, digests, the platform of this machine in Go's spelling, the
canonical JSON of configs and manifests, and file objects that hash what passes through."""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Callable
from typing import IO, Any, Literal

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


def _json_bytes(obj: Any) -> bytes:
    # Sorted keys and no whitespace: the same image always gets the same config and manifest
    # digests.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
