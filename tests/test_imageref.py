"""Image references in skopeo's transports: one parser for oci_image(), import, pull, push and
the remote cache options; a malformed reference is one error naming it and the syntax."""

from __future__ import annotations

import pytest

from pytest_layers.errors import LayerDefinitionError
from pytest_layers.imageref import ImageRef, is_loopback, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "docker://127.0.0.1:5000/team/app:v1",
            ImageRef("docker", host="127.0.0.1:5000", repo="team/app", tag="v1"),
        ),
        (
            "docker://registry.example/library/debian",
            ImageRef("docker", host="registry.example", repo="library/debian", tag="latest"),
        ),
        (
            f"docker://localhost:5000/app@{DIGEST}",
            ImageRef("docker", host="localhost:5000", repo="app", digest=DIGEST),
        ),
        (
            "docker://debian:bookworm",
            ImageRef("docker", host="docker.io", repo="library/debian", tag="bookworm"),
        ),
        ("oci:/srv/images/app:v2", ImageRef("oci", path="/srv/images/app", tag="v2")),
        ("oci:images/app", ImageRef("oci", path="images/app")),
        ("oci:/a:b/dir", ImageRef("oci", path="/a:b/dir")),
        ("docker-archive:/tmp/app.tar", ImageRef("docker-archive", path="/tmp/app.tar")),
        ("images/app.tar", ImageRef("path", path="images/app.tar")),
    ],
)
def test_parse(text: str, want: ImageRef) -> None:
    got = parse(text)
    assert got == want
    assert parse(str(got)) == got  # printing gives back a reference that means the same


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("docker://host.example/", "name the registry host and a repository"),
        ("docker://host.example/App:v1", "is not a repository name"),
        ("docker://host.example/app:bad tag", "is not a valid tag"),
        ("docker://host.example/app@sha256:123", "64 hex digits"),
        ("docker:host.example/app", "docker:// (two slashes)"),
        ("oci:", "needs a directory"),
        ("docker-archive:", "needs the path of a tar"),
    ],
)
def test_malformed_reference_is_one_error(text: str, needle: str) -> None:
    with pytest.raises(LayerDefinitionError) as info:
        parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert needle in message
    assert "\n" not in message


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1:5000")
    assert is_loopback("localhost")
    assert is_loopback("[::1]:1")
    assert not is_loopback("registry.example:5000")
    assert not is_loopback("10.0.0.1")
