"""Image references in the transports skopeo and podman use.

``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` names an image in a registry,
``oci:DIR[:TAG]`` an OCI image layout, ``docker-archive:PATH`` a ``docker save`` tar; anything
else is a bare path (an OCI layout directory or tar, or a docker-archive), as it always was.
One parser serves ``oci_image()``, ``pytest-layers import/pull/push`` and the remote cache
options, so a reference means the same thing everywhere (docs/reference/cli.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pytest_layers.errors import LayerDefinitionError

__all__ = ["ImageRef", "parse", "parse_registry", "is_loopback"]

Transport = Literal["docker", "oci", "docker-archive", "path"]

# The distribution spec's grammar for repository path components and tags.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::\d{1,5})?$"
)
DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference. ``path`` is set for the file transports; ``host``, ``repo``
    and ``tag`` or ``digest`` for ``docker://``; ``tag`` also for ``oci:DIR:TAG``."""

    transport: Transport
    path: str = ""
    host: str = ""
    repo: str = ""
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What follows ``/manifests/`` in a registry URL: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> ImageRef:
        return ImageRef("docker", host=self.host, repo=self.repo, tag=tag)

    def __str__(self) -> str:
        if self.transport == "docker":
            tail = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
            return f"docker://{self.host}/{self.repo}{tail}"
        if self.transport == "oci":
            return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")
        if self.transport == "docker-archive":
            return f"docker-archive:{self.path}"
        return self.path


def _bad(text: str, why: str) -> LayerDefinitionError:
    return LayerDefinitionError(
        f"image reference {text!r}: {why}; write docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX], "
        "oci:DIR[:TAG], docker-archive:PATH or a path"
    )


def parse_registry(text: str, *, tag_allowed: bool = True) -> ImageRef:
    """Parse ``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` (the ``docker://`` is required)."""
    if not text.startswith("docker://"):
        raise _bad(text, "a registry reference starts with docker://")
    rest = text[len("docker://") :]
    digest = tag = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST_RE.match(digest):
            raise _bad(text, f"{digest!r} is not sha256: followed by 64 hex digits")
    first, slash, path = rest.partition("/")
    if not slash or not ("." in first or ":" in first or first in ("localhost",) or "[" in first):
        # Docker's rule: a first component that is no host name is a Docker Hub repository.
        first, path = DOCKER_HUB, rest
    if not path or path.endswith("/"):
        raise _bad(text, "name the registry host and a repository (docker://HOST/REPO)")
    if not _HOST_RE.match(first):
        raise _bad(text, f"{first!r} is not a host name with an optional :PORT")
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise _bad(text, f"{tag!r} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]*, <=128)")
        if not tag_allowed:
            raise _bad(text, "a cache repository takes no tag (the tags are the cache keys)")
    if first == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _REPO_RE.match(path):
        raise _bad(
            text, f"{path!r} is not a repository name (lower-case letters, digits, . _ - and /)"
        )
    if tag is None and digest is None and tag_allowed:
        tag = "latest"
    return ImageRef("docker", host=first, repo=path, tag=tag, digest=digest)


def parse(text: str) -> ImageRef:
    """Parse any image reference; a string with no known transport prefix is a path."""
    if text.startswith("docker://"):
        return parse_registry(text)
    if text.startswith("oci:"):
        body = text[len("oci:") :]
        tag = None
        head, colon, tail = body.rpartition(":")
        if colon and head and "/" not in tail and _TAG_RE.match(tail):
            body, tag = head, tail
        if not body:
            raise _bad(text, "oci: needs a directory")
        return ImageRef("oci", path=body, tag=tag)
    if text.startswith("docker-archive:"):
        body = text[len("docker-archive:") :]
        if not body:
            raise _bad(text, "docker-archive: needs the path of a tar")
        return ImageRef("docker-archive", path=body)
    if text.startswith("docker:"):
        raise _bad(text, "a registry reference starts with docker:// (two slashes)")
    return ImageRef("path", path=text)


def is_loopback(host: str) -> bool:
    """Whether ``HOST[:PORT]`` is this machine (plain HTTP is allowed there, as Docker does)."""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    return name == "localhost" or name == "::1" or name.startswith("127.")
