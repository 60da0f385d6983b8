"""Pull and push through a real registry (Debian's docker-registry on 127.0.0.1), judged by
skopeo and umoci: what skopeo pushes we pull into exactly umoci's tree; what we push skopeo
reads with our DiffIDs and umoci unpacks into our tree; blobs move once; every failure is one
line and leaves a store that verifies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from treeutil import build_layer, diff_snapshots, make_tree, set_tree_mtimes, snapshot_tree

from pytest_layers import registry
from pytest_layers.errors import RegistryError, RegistryUnreachableError
from pytest_layers.imageref import parse
from pytest_layers.store import Store
from tests.registry_util import CuttingProxy, RegistryServer, running, skopeo
from tests.test_oci import ROOTLESS, cli, comparable, expected_nodes, overlay_tree

pytestmark = [
    pytest.mark.requires_tool("docker-registry", "skopeo", "umoci"),
    pytest.mark.requires_overlay,
]


def _umoci(*args: str) -> None:
    proc = subprocess.run(["umoci", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"umoci {' '.join(args)}: {proc.stderr}"


def umoci_image(tmp: Path) -> tuple[Path, Path]:
    """A two-layer image made by umoci (the second deletes and adds); returns the layout and
    umoci's own unpacked rootfs of it."""
    img = tmp / "umoci-image"
    _umoci("init", "--layout", str(img))
    _umoci("new", "--image", f"{img}:v1")
    bundle = tmp / "b1"
    _umoci("unpack", *ROOTLESS, "--image", f"{img}:v1", str(bundle))
    make_tree(
        bundle / "rootfs",
        {
            "etc/os-release": "ID=umoci\n",
            "etc/gone": "bye\n",
            "bin/tool": ("file", "#!/bin/sh\n", 0o755),
            "data/a": "a\n",
            "data/link": ("symlink", "a"),
        },
    )
    set_tree_mtimes(bundle / "rootfs", 1_600_000_000)  # whole seconds: mtimes compare exactly
    _umoci("repack", "--image", f"{img}:v1", str(bundle))
    bundle = tmp / "b2"
    _umoci("unpack", *ROOTLESS, "--image", f"{img}:v1", str(bundle))
    (bundle / "rootfs/etc/gone").unlink()
    (bundle / "rootfs/data/new").write_text("new\n")
    set_tree_mtimes(bundle / "rootfs", 1_700_000_000)
    _umoci("repack", "--image", f"{img}:v1", str(bundle))
    check = tmp / "check"
    _umoci("unpack", *ROOTLESS, "--image", f"{img}:v1", str(check))
    return img, check / "rootfs"


@pytest.fixture(scope="module")
def pushed_umoci(registry_server: RegistryServer, tmp_path_factory: pytest.TempPathFactory):
    """umoci's image, put into the session registry by skopeo."""
    tmp = tmp_path_factory.mktemp("umoci")
    img, rootfs = umoci_image(tmp)
    url = registry_server.url("judge/umoci", "v1")
    skopeo("copy", "--dest-tls-verify=false", f"oci:{img}:v1", url)
    return url, img, rootfs


def blob_gets(server: RegistryServer) -> int:
    return sum(1 for m, p, _ in server.requests() if m == "GET" and "/blobs/" in p)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("pytest-layers: error: "), proc.stderr
    return lines[-1]


def store_is_clean(store: Path) -> None:
    opened = Store(store)
    assert opened.verify() == []
    assert list((store / "tmp").iterdir()) == []


# ---- pull -----------------------------------------------------------------------------------


def test_pull_gives_umoci_tree_and_moves_blobs_once(
    pushed_umoci: Any, registry_server: RegistryServer, tmp_path: Path
) -> None:
    url, _img, rootfs = pushed_umoci
    store = tmp_path / "store"
    proc = cli(store, "pull", url, "--name", "base", check=True)
    assert "pulled " in proc.stdout
    assert "2 layers (2 new)" in proc.stdout
    got = comparable(overlay_tree(store, "base", tmp_path))
    assert diff_snapshots(comparable(snapshot_tree(rootfs)), got) == []
    # The DiffIDs are skopeo's.
    inspect = json.loads(skopeo("inspect", "--tls-verify=false", "--config", url).stdout)
    chain = Store(store).chain(Store(store).resolve("base"))
    assert [i.diff_id for i in chain] == inspect["rootfs"]["diff_ids"]
    # Pulled again: the manifest is read, no blob is downloaded.
    before = blob_gets(registry_server)
    proc = cli(store, "pull", url, check=True)
    assert "(0 new)" in proc.stdout
    assert blob_gets(registry_server) - before == 1  # the config only: layers are in the store
    store_is_clean(store)


def test_pull_by_digest_and_import_alias(pushed_umoci: Any, tmp_path: Path) -> None:
    url, _img, _rootfs = pushed_umoci
    digest = json.loads(skopeo("inspect", "--tls-verify=false", url).stdout)["Digest"]
    by_digest = url.rsplit(":", 1)[0] + "@" + digest
    store = tmp_path / "store"
    # `import docker://...` is `pull docker://...`.
    proc = cli(store, "import", by_digest, "--name", "x", check=True)
    assert f"manifest {digest}" in proc.stdout
    wrong = url.rsplit(":", 1)[0] + "@sha256:" + "0" * 64
    line = one_line_error(cli(store, "pull", wrong))
    assert "no such image" in line
    assert "404" in line


def test_import_oci_dir_tag_is_import_dir_ref(pushed_umoci: Any, tmp_path: Path) -> None:
    _url, img, _rootfs = pushed_umoci
    a = cli(tmp_path / "a", "import", f"oci:{img}:v1", "--name", "x", check=True)
    b = cli(tmp_path / "b", "import", str(img), "--ref", "v1", "--name", "x", check=True)
    assert a.stdout.split("chain id ")[1] == b.stdout.split("chain id ")[1]
    line = one_line_error(cli(tmp_path / "c", "import", f"oci:{img}:nope"))
    assert "no image tagged 'nope'" in line


# ---- push -----------------------------------------------------------------------------------


@pytest.fixture
def two_layer_store(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    store = Store(tmp_path / "store")
    tree = make_tree(
        tmp_path / "tree",
        {
            "etc/os-release": "ID=ours\n",
            "etc/gone": "x\n",
            "bin/tool": ("file", "#!/bin/sh\n", 0o755),
            "data/sub/f": "f\n",
            "data/link": ("symlink", "sub/f"),
        },
    )
    base = build_layer(store, None, tree, "base")
    (tree / "etc/gone").unlink()
    (tree / "etc/app.conf").write_text("debug=false\n")
    shutil.rmtree(tree / "data/sub")
    (tree / "data/sub").mkdir()
    (tree / "data/sub/g").write_text("g\n")
    app = build_layer(store, base, tree, "app")
    return tmp_path / "store", tree, [base, app]


def test_push_is_an_ordinary_image_and_blobs_move_once(
    two_layer_store: Any, registry_server: RegistryServer, tmp_path: Path
) -> None:
    store, tree, chain = two_layer_store
    url = registry_server.url("ours/app", "v1")
    proc = cli(store, "push", "app", url, check=True)
    assert "3 blobs sent" in proc.stdout
    # skopeo lists our diff_ids; umoci unpacks our tree.
    config = json.loads(skopeo("inspect", "--tls-verify=false", "--config", url).stdout)
    opened = Store(store)
    assert config["rootfs"]["diff_ids"] == [opened.layer_info(c).diff_id for c in chain]
    skopeo("copy", "--src-tls-verify=false", url, f"oci:{tmp_path / 'copy'}:v1")
    _umoci("unpack", *ROOTLESS, "--image", f"{tmp_path / 'copy'}:v1", str(tmp_path / "bundle"))
    got = comparable(snapshot_tree(tmp_path / "bundle/rootfs"))
    assert diff_snapshots(comparable(expected_nodes(tree)), got) == []
    # Second push: HEAD finds every blob, nothing is uploaded.
    before = len(registry_server.requests())
    proc = cli(store, "push", "app", url, check=True)
    assert "0 blobs sent" in proc.stdout
    assert "3 already there" in proc.stdout
    new = registry_server.requests()[before:]
    assert [r for r in new if r[0] in ("POST", "PATCH")] == []
    assert [r for r in new if r[0] == "PUT" and "/blobs/" in r[1]] == []
    # Another repository of the same registry: blobs are mounted, not sent.
    before = len(registry_server.requests())
    proc = cli(store, "push", "app", registry_server.url("ours/other", "v1"), check=True)
    assert "3 mounted" in proc.stdout, proc.stdout
    new = registry_server.requests()[before:]
    assert [r for r in new if r[0] == "PATCH"] == []
    assert all("mount=" in r[1] for r in new if r[0] == "POST")
    store_is_clean(store)


def test_push_then_pull_round_trips_chain_ids(
    two_layer_store: Any, registry_server: RegistryServer, tmp_path: Path
) -> None:
    store, _tree, chain = two_layer_store
    url = registry_server.url("ours/roundtrip", "v1")
    cli(store, "push", "app", url, check=True)
    other = tmp_path / "other"
    proc = cli(other, "pull", url, "--name", "app", check=True)
    assert proc.stdout.strip().endswith(f"chain id {chain[-1]}")
    assert overlay_tree(other, "app", tmp_path) == overlay_tree(store, "app", tmp_path)


# ---- failures -------------------------------------------------------------------------------


@pytest.fixture
def own_registry(tmp_path: Path):
    with running(tmp_path / "registry") as server:
        yield server


def _blob_file(server: RegistryServer, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return server.storage / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"


def _layer_digest(url: str, n: int) -> str:
    manifest = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", url).stdout)
    return str(manifest["layers"][n]["digest"])


@pytest.mark.parametrize("damage", ["tampered", "missing", "longer"])
def test_bad_blob_is_one_line_and_nothing_enters_the_store(
    damage: str, two_layer_store: Any, own_registry: RegistryServer, tmp_path: Path
) -> None:
    store, _tree, _chain = two_layer_store
    url = own_registry.url("bad/img", "v1")
    cli(store, "push", "app", url, check=True)
    digest = _layer_digest(url, 1)
    blob = _blob_file(own_registry, digest)
    data = blob.read_bytes()
    if damage == "tampered":
        blob.write_bytes(data[:-8] + bytes(8))
    elif damage == "missing":
        shutil.rmtree(blob.parent)
    else:
        blob.write_bytes(data + b"x" * 4096)
    target = tmp_path / "target"
    line = one_line_error(cli(target, "pull", url, "--name", "img"))
    want = {
        "tampered": [f"layer 2 ({digest})"],
        "missing": ["blob " + digest, "404"],
        "longer": ["layer 2", "descriptor"],
    }[damage]
    for needle in want:
        assert needle in line, line
    opened = Store(target)
    assert opened.get_name("img") is None
    # Only the intact first layer may have been kept; everything stored verifies.
    assert len(opened.layers()) <= 1
    store_is_clean(target)


def test_registry_down_is_one_line(tmp_path: Path, two_layer_store: Any) -> None:
    store, _tree, _chain = two_layer_store
    with running(tmp_path / "registry") as server:
        url = server.url("gone/img", "v1")
    line = one_line_error(cli(tmp_path / "s", "pull", url))
    assert server.host in line
    assert "cannot reach the registry" in line
    line = one_line_error(cli(store, "push", "app", url))
    assert "cannot reach the registry" in line
    store_is_clean(store)


def test_offline_never_touches_the_network(two_layer_store: Any) -> None:
    store, _tree, chain = two_layer_store
    client = registry.Client("127.0.0.1:9", registry.Options(offline=True))
    with pytest.raises(RegistryUnreachableError, match="--layers-offline"):
        registry.push(Store(store), chain[-1], parse("docker://127.0.0.1:9/x/y:z"), client=client)
    assert client.requests == []


def test_engine_imports_without_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['urllib3'] = None\n"
        "from pytest_layers import registry\n"
        "from pytest_layers.imageref import parse\n"
        "try:\n"
        "    registry.image_digest(parse('docker://127.0.0.1:9/a/b:c'))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert "RegistryError" in proc.stdout, proc.stdout + proc.stderr
    assert "pip install 'pytest-layers[registry]'" in proc.stdout


def test_error_types() -> None:
    assert issubclass(RegistryUnreachableError, ConnectionError)
    assert issubclass(RegistryError, OSError)


# ---- oci_image("x", "docker://...") in a suite ----------------------------------------------

SUITE_CONFTEST = """
from pytest_layers import layer, oci_image

base = oci_image("base", "{url}")

@layer(parent=base)
def app(root):
    (root / "etc/app.conf").write_text("on\\n")
"""

SUITE_TESTS = """
import os
import pytest

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(3))
def test_image_is_umocis_tree(rootfs, i):
    assert (rootfs / "etc/os-release").read_text() == "ID=umoci\\n"
    assert not (rootfs / "etc/gone").exists()          # deleted by the image's 2nd layer
    assert (rootfs / "data/new").read_text() == "new\\n"
    assert os.readlink(rootfs / "data/link") == "a"
    assert os.stat(rootfs / "bin/tool").st_mode & 0o777 == 0o755
    (rootfs / "etc/os-release").write_text(str(i))     # the next test sees the image again

@pytest.mark.layer("app")
def test_layer_on_pulled_image(rootfs):
    assert (rootfs / "etc/app.conf").read_text() == "on\\n"
    assert (rootfs / "data/a").read_text() == "a\\n"
"""


def test_oci_image_from_registry_is_pulled_once(
    pytester: pytest.Pytester, pushed_umoci: Any, registry_server: RegistryServer
) -> None:
    url, _img, _rootfs = pushed_umoci
    pytester.makeconftest(SUITE_CONFTEST.format(url=url))
    pytester.makepyfile(test_suite=SUITE_TESTS)
    store = pytester.path / "store"
    before = blob_gets(registry_server)
    result = pytester.runpytest_subprocess("--layers-store", str(store), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*layers: pulled base *"])
    assert blob_gets(registry_server) - before == 3  # config + two layers, once
    # A second session finds the manifest digest in the store's cache: nothing downloaded.
    before = blob_gets(registry_server)
    result = pytester.runpytest_subprocess("--layers-store", str(store), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*layers: cached base *"])
    assert blob_gets(registry_server) == before
    # Offline: not one request; the image last pulled for this reference serves.
    before = len(registry_server.requests())
    result = pytester.runpytest_subprocess(
        "--layers-store", str(store), "-p", "no:cacheprovider", "--layers-offline"
    )
    result.assert_outcomes(passed=4)
    assert len(registry_server.requests()) == before
    # Offline with an empty store: one error naming the image and why.
    result = pytester.runpytest_subprocess(
        "--layers-store", str(pytester.path / "empty"), "-p", "no:cacheprovider", "--layers-offline"
    )
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(["*oci_image 'base'*--layers-offline*"])
    store_is_clean(store)


def test_registry_down_mid_pull_is_one_line(
    two_layer_store: Any, own_registry: RegistryServer, tmp_path: Path
) -> None:
    store, tree, _chain = two_layer_store
    (tree / "data/big").write_bytes(os.urandom(1 << 20))  # a blob big enough to cut in half
    big = build_layer(Store(store), Store(store).resolve("app"), tree, "big")
    url = own_registry.url("cut/img", "v1")
    cli(store, "push", "big", url, check=True)
    digest = _layer_digest(url, 2)
    proxy = CuttingProxy(own_registry.host, digest)
    try:
        target = tmp_path / "target"
        line = one_line_error(cli(target, "pull", f"docker://{proxy.host}/cut/img:v1"))
    finally:
        proxy.stop()
    assert "connection broke while reading layer 3" in line
    assert digest in line
    opened = Store(target)
    assert big not in opened.layers()
    store_is_clean(target)


def test_zstd_layers_are_read(
    pushed_umoci: Any, own_registry: RegistryServer, tmp_path: Path
) -> None:
    pytest.importorskip("zstandard", reason="zstandard (the [zstd] extra) is not installed")
    _url, img, rootfs = pushed_umoci
    # A registry of its own: skopeo would reuse the gzip blobs the session registry holds.
    url = own_registry.url("judge/zstd", "v1")
    # skopeo keeps a compressed layer as it is: decompress first, then compress with zstd.
    skopeo("copy", "--dest-decompress", f"oci:{img}:v1", f"dir:{tmp_path / 'plain'}")
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-compress-format",
        "zstd",
        f"dir:{tmp_path / 'plain'}",
        url,
    )
    manifest = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", url).stdout)
    assert {x["mediaType"] for x in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    store = tmp_path / "store"
    cli(store, "pull", url, "--name", "z", check=True)
    got = comparable(overlay_tree(store, "z", tmp_path))
    assert diff_snapshots(comparable(snapshot_tree(rootfs)), got) == []
    # Without the decompressor: a clear error naming the fix, nothing stored.
    code = (
        "import sys; sys.modules['zstandard'] = None\n"
        "from pytest_layers.cli import main\n"
        f"sys.exit(main(['--store', {str(tmp_path / 'nozstd')!r}, 'pull', {url!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = one_line_error(proc)
    assert "zstd-compressed" in line
    assert "pytest-layers[zstd]" in line
    store_is_clean(tmp_path / "nozstd")


SNAPSHOT_CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=snap\\n")
"""

SNAPSHOT_TESTS = """
import pytest

@pytest.mark.layer("base")
def test_fails(rootfs):
    (rootfs / "etc/written-by-test").write_text("evidence\\n")
    (rootfs / "etc/os-release").unlink()
    assert False
"""


def test_push_a_failing_tests_snapshot(
    pytester: pytest.Pytester, registry_server: RegistryServer, tmp_path: Path
) -> None:
    pytester.makeconftest(SNAPSHOT_CONFTEST)
    pytester.makepyfile(test_snap=SNAPSHOT_TESTS)
    store = pytester.path / "store"
    result = pytester.runpytest_subprocess("--layers-store", str(store), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    url = registry_server.url("snapshots/fails", "v1")
    cli(store, "push", "snapshot:test_snap.py::test_fails", url, check=True)
    opened = Store(store)
    chain = opened.chain(opened.resolve("snapshot:test_snap.py::test_fails"))
    config = json.loads(skopeo("inspect", "--tls-verify=false", "--config", url).stdout)
    assert config["rootfs"]["diff_ids"] == [i.diff_id for i in chain]
    skopeo("copy", "--src-tls-verify=false", url, f"oci:{tmp_path / 'copy'}:v1")
    _umoci("unpack", *ROOTLESS, "--image", f"{tmp_path / 'copy'}:v1", str(tmp_path / "bundle"))
    rootfs = tmp_path / "bundle/rootfs"
    assert (rootfs / "etc/written-by-test").read_text() == "evidence\n"
    assert not (rootfs / "etc/os-release").exists()
    got = comparable(snapshot_tree(rootfs))
    assert diff_snapshots(comparable(overlay_tree(store, chain[-1].chain_id, tmp_path)), got) == []


def test_docker_schema2_manifest_is_pulled(
    pushed_umoci: Any, registry_server: RegistryServer, tmp_path: Path
) -> None:
    _url, img, rootfs = pushed_umoci
    url = registry_server.url("judge/v2s2", "v1")
    skopeo("copy", "--dest-tls-verify=false", "--format", "v2s2", f"oci:{img}:v1", url)
    raw = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", url).stdout)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    store = tmp_path / "store"
    cli(store, "pull", url, "--name", "d", check=True)
    got = comparable(overlay_tree(store, "d", tmp_path))
    assert diff_snapshots(comparable(snapshot_tree(rootfs)), got) == []


# VmHWM: the peak RSS of this process's own address space (ru_maxrss would also count the
# parent's memory at fork time, which exec keeps).
_RSS_CODE = """
import sys
from pytest_layers.cli import main
code = main(sys.argv[1:])
print("VMHWM", [x for x in open("/proc/self/status") if x.startswith("VmHWM")][0].split()[1])
sys.exit(code)
"""


@pytest.mark.slow
def test_big_layer_moves_with_bounded_memory(own_registry: RegistryServer, tmp_path: Path) -> None:
    """A 256 MiB file (zeros, sparse on disk) pushes and pulls in far less memory than its
    size: blobs stream through files, never memory (benchmarks/bench_registry.py measures
    ~30 MiB peak for 1 GiB)."""
    size = 256 << 20
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big", "wb") as f:
        f.truncate(size)
    store = tmp_path / "store"
    build_layer(Store(store), None, src, "big")
    url = own_registry.url("big/img", "v1")
    peaks = []
    for args in (
        ["--store", str(store), "push", "big", url],
        ["--store", str(tmp_path / "t"), "pull", url, "--name", "big"],
    ):
        # A sparse file's zeros compress past the import's default ratio limit (a bomb's
        # shape): this image is trusted, so the limit is raised as the error says to.
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_CODE, *args],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTEST_LAYERS_MAX_RATIO": "100000"},
        )
        assert proc.returncode == 0, proc.stderr
        peaks.append(int(proc.stdout.split("VMHWM")[1].split()[0]) * 1024)
    assert max(peaks) < 96 << 20, peaks  # `pytest-layers ls` alone peaks at ~25 MiB
    opened = Store(tmp_path / "t")
    assert opened.layer_info(opened.resolve("big")).size >= size
    store_is_clean(tmp_path / "t")
