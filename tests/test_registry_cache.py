"""The remote build cache (--layers-cache-from/--layers-cache-to) as a CI fleet uses it: six
"machines" (sessions with empty stores) share one registry, a seventh builds nothing; a tampered
blob is refused by name and the layer is built locally; an unreachable cache is one header line
and --layers-offline never touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_layers.registry import cache_tag
from pytest_layers.store import Store
from tests.registry_util import RegistryServer, free_port, http_get, running

pytestmark = [pytest.mark.requires_tool("docker-registry"), pytest.mark.requires_overlay]

CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=fleet\\n")
    for i in range(50):
        (root / f"etc/f{i}").write_text(str(i) * 100)

@layer(parent=base)
def mid(root):
    (root / "opt").mkdir()
    (root / "opt/tool").write_text("#!/bin/sh\\n")
    (root / "etc/f0").unlink()

@layer(parent=mid)
def top(root):
    (root / "srv").mkdir()
    (root / "srv/data").write_bytes(bytes(range(256)) * 64)
"""

TESTS = """
import pytest

@pytest.mark.layer("top")
@pytest.mark.parametrize("i", range(3))
def test_image(rootfs, i):
    assert (rootfs / "etc/os-release").read_text() == "ID=fleet\\n"
    assert not (rootfs / "etc/f0").exists()
    assert (rootfs / "srv/data").read_bytes() == bytes(range(256)) * 64
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "conftest.py").write_text(CONFTEST)
    (proj / "test_fleet.py").write_text(TESTS)
    return proj


def session(project: Path, store: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider"),
            *("--layers-store", str(store), *args),
        ],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "3 passed" in out, out
    return out


def statuses(out: str) -> dict[str, str]:
    """layer name -> built/cached/pulled, from the progress lines."""
    found = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "layers:" and words[1] in ("built", "cached", "pulled"):
            found[words[2]] = words[1]
    return found


def manifest(server: RegistryServer, repo: str, tag: str) -> Any:
    code, body = http_get(f"http://{server.host}/v2/{repo}/manifests/{tag}")
    assert code == 200, body
    return json.loads(body)


def test_fleet_builds_each_layer_once_and_a_new_machine_builds_nothing(
    project: Path, tmp_path: Path
) -> None:
    with running(tmp_path / "registry") as server:
        cache = f"docker://{server.host}/ci/cache"
        flags = [f"--layers-cache-from={cache}", f"--layers-cache-to={cache}"]
        machines = [session(project, tmp_path / f"store{i}", *flags) for i in range(6)]
        outs = [finished(p) for p in machines]
        for out in outs:
            assert set(statuses(out)) == {"base", "mid", "top"}, out
        tops = {Store(tmp_path / f"store{i}").get_name("top") for i in range(6)}
        assert len(tops) == 1
        # One tag per build key; every machine pushed the same layer blobs (deterministic gzip).
        _code, body = http_get(f"http://{server.host}/v2/ci/cache/tags/list")
        tags = json.loads(body)["tags"]
        assert len(tags) == 3
        assert all(t.startswith("layer-") for t in tags)
        layer_blobs = set()
        for tag in tags:
            layer_blobs |= {d["digest"] for d in manifest(server, "ci/cache", tag)["layers"]}
        assert len(layer_blobs) == 3
        stored = {f"sha256:{p.parent.name}" for p in server.blob_files()}
        assert layer_blobs <= stored

        # The seventh machine: empty store, builds nothing, same chain ids.
        seventh = tmp_path / "store7"
        out = finished(session(project, seventh, f"--layers-cache-from={cache}"))
        assert statuses(out) == {"base": "pulled", "mid": "pulled", "top": "pulled"}, out
        assert f"from {cache}" in out
        assert Store(seventh).get_name("top") == tops.pop()
        first = Store(tmp_path / "store0")
        chain = [i.chain_id for i in first.chain(first.get_name("top") or "")]
        assert [i.chain_id for i in Store(seventh).chain(chain[-1])] == chain
        assert Store(seventh).verify() == []

        # Tamper with top's blob in the registry's storage: refused by name, built locally.
        top_key_tag = next(t for t in tags if len(manifest(server, "ci/cache", t)["layers"]) == 3)
        digest = manifest(server, "ci/cache", top_key_tag)["layers"][2]["digest"]
        blob = next(p for p in server.blob_files() if p.parent.name == digest.split(":")[1])
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        eighth = tmp_path / "store8"
        out = finished(session(project, eighth, f"--layers-cache-from={cache}"))
        assert statuses(out) == {"base": "pulled", "mid": "pulled", "top": "built"}, out
        line = next(x for x in out.splitlines() if x.startswith("layers: built top"))
        assert f"layer 3 ({digest})" in line
        assert "refused" in line
        opened = Store(eighth)
        assert opened.get_name("top") == chain[-1]  # built locally, the same layer
        assert opened.verify() == []
        assert list((eighth / "tmp").iterdir()) == []


def test_unreachable_cache_is_one_header_line(project: Path, tmp_path: Path) -> None:
    dead = f"docker://127.0.0.1:{free_port()}/ci/cache"
    out = finished(
        session(project, tmp_path / "s", f"--layers-cache-from={dead}", f"--layers-cache-to={dead}")
    )
    lines = [x for x in out.splitlines() if "remote cache" in x]
    assert len(lines) == 1, out
    assert "cannot reach the registry" in lines[0]
    assert statuses(out) == {"base": "built", "mid": "built", "top": "built"}


def test_offline_never_touches_the_network(project: Path, tmp_path: Path) -> None:
    with running(tmp_path / "registry") as server:
        cache = f"docker://{server.host}/ci/cache"
        before = len(server.requests())
        out = finished(
            session(
                project,
                tmp_path / "s",
                f"--layers-cache-from={cache}",
                f"--layers-cache-to={cache}",
                "--layers-offline",
            )
        )
        assert statuses(out) == {"base": "built", "mid": "built", "top": "built"}
        assert len(server.requests()) == before


def test_bad_cache_option_is_a_usage_error(project: Path, tmp_path: Path) -> None:
    proc = session(project, tmp_path / "s", "--layers-cache-to=docker://host.example/c:tag")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 4, out
    assert "--layers-cache-to" in out
    assert "takes no tag" in out


def test_cache_tag_is_a_valid_tag() -> None:
    tag = cache_tag("ab" * 32)
    assert len(tag) <= 128
    assert os.path.basename(tag) == tag
