"""OCI export and import, judged by real tools (umoci, skopeo) and by round trips.

Layers are built here without mounting (``changes_from_tree`` against an ``ImageView``); every
import that mounts runs in a ``pytest-layers`` subprocess, which works in its own mount
namespace, so no mount can outlive a failing test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from treeutil import Node, build_layer, diff_snapshots, make_tree, snapshot_tree

from pytest_layers import layertar, oci
from pytest_layers.errors import InvalidImageError, StoreError
from pytest_layers.store import Store

ROOTLESS = [] if os.geteuid() == 0 else ["--rootless"]

BASE_TREE: dict[str, Any] = {
    "etc/os-release": "ID=demo\n",
    "etc/link": ("symlink", "os-release"),
    "etc/abs": ("symlink", "/etc/os-release"),
    "bin/tool": ("file", "#!/bin/sh\necho tool\n", 0o755),
    "data/a": "a\n",
    "data/hard": ("hardlink", "data/a"),
    "data/sub/x": "x\n",
    "data/sub/deep/y": "y\n",
    "run/fifo": ("fifo",),
    "var/empty": None,
    "unicodé/名前": "utf8 name\n",
}


@pytest.fixture
def two_layers(tmp_path: Path) -> tuple[Store, Path, list[str]]:
    """A store with ``base`` and ``app`` (deletes, chmods, replaces a dir); returns the store,
    the tree as ``app`` sees it, and both chain ids."""
    store = Store(tmp_path / "store")
    tree = make_tree(tmp_path / "tree", BASE_TREE)
    base = build_layer(store, None, tree, "base")
    (tree / "etc/os-release").unlink()
    (tree / "etc/app.conf").write_text("debug=false\n")
    os.chmod(tree / "bin/tool", 0o4755)
    shutil.rmtree(tree / "data/sub")
    (tree / "data/sub").mkdir()
    (tree / "data/sub/new").write_text("new\n")
    os.setxattr(tree / "data/a", "user.origin", b"test")
    app = build_layer(store, base, tree, "app")
    return store, tree, [base, app]


def cli(store: Path | None, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest_layers.cli"]
    if store is not None:
        cmd += ["--store", os.fspath(store)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def expected_nodes(tree: Path) -> dict[str, Node]:
    """``tree`` as a stored layer holds it: mtimes clamped to the build epoch."""
    epoch = layertar.clamp_epoch()
    nodes = snapshot_tree(tree)
    return {rel: replace(n, mtime=min(n.mtime, epoch)) for rel, n in nodes.items()}


def comparable(nodes: dict[str, Node]) -> dict[str, Node]:
    if os.geteuid() == 0:
        return nodes
    # umoci --rootless cannot give files away (it records owners in its own
    # user.rootlesscontainers xattr instead); owners are not what this compares then.
    return {
        rel: replace(
            n, uid=0, gid=0, xattrs=tuple(x for x in n.xattrs if x[0] != "user.rootlesscontainers")
        )
        for rel, n in nodes.items()
    }


def overlay_tree(store: Path, ref: str, tmp_path: Path) -> dict[str, Node]:
    """The merged tree of ``ref`` as a mount shows it, read in a subprocess (own namespace)."""
    code = f"""
import json, os, sys
from dataclasses import asdict
from pathlib import Path
sys.path.insert(0, {os.fspath(Path(__file__).parent)!r})
from treeutil import snapshot_tree
from pytest_layers import namespaces
from pytest_layers.backends.overlay import OverlayBackend
from pytest_layers.store import Store
if os.geteuid() == 0:
    namespaces.enter_private_mount_namespace()
else:
    namespaces.enter_user_namespace()
store = Store(Path({os.fspath(store)!r}))
chain = store.chain(store.resolve({ref!r}))
with store.staging() as scratch:
    view = OverlayBackend().open(
        [store.layer_dir(i.chain_id) for i in reversed(chain)], scratch, readonly=True
    )
    try:
        nodes = {{k: asdict(v) for k, v in snapshot_tree(view.path).items()}}
    finally:
        view.close()
json.dump(nodes, sys.stdout, default=lambda b: b.hex())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for rel, d in json.loads(proc.stdout).items():
        d["xattrs"] = tuple((k, bytes.fromhex(v)) for k, v in d["xattrs"])
        d["rdev"] = tuple(d["rdev"]) if d["rdev"] else None
        out[rel] = Node(**d)
    return out


# ---- export ---------------------------------------------------------------------------------


@pytest.mark.requires_tool("skopeo")
@pytest.mark.parametrize("as_tar", [False, True], ids=["dir", "tar"])
def test_skopeo_inspect_accepts_export(two_layers, tmp_path: Path, as_tar: bool) -> None:
    store, _, chain = two_layers
    out = tmp_path / ("image.tar" if as_tar else "image")
    result = oci.export_image(store, chain[-1], out, tag="demo/app:v1")
    transport = "oci-archive" if as_tar else "oci"
    proc = subprocess.run(
        ["skopeo", "inspect", f"{transport}:{out}:v1"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["Layers"] == [store.layer_info(c).diff_id for c in chain]
    assert info["Digest"] == result.manifest_digest
    assert info["Os"] == "linux"
    assert result.chain_ids == chain


@pytest.mark.requires_tool("umoci")
@pytest.mark.parametrize("gzip_layers", [False, True], ids=["plain", "gzip"])
def test_umoci_unpack_gives_the_exported_tree(
    two_layers, tmp_path: Path, gzip_layers: bool
) -> None:
    store, tree, chain = two_layers
    out = tmp_path / "image"
    result = oci.export_image(store, chain[-1], out, tag="app:latest", gzip_layers=gzip_layers)
    manifest = json.loads((out / "blobs/sha256" / result.manifest_digest[7:]).read_bytes())
    want_type = oci.MEDIA_TYPE_LAYER_GZIP if gzip_layers else oci.MEDIA_TYPE_LAYER
    assert {layer["mediaType"] for layer in manifest["layers"]} == {want_type}
    proc = subprocess.run(
        ["umoci", "unpack", *ROOTLESS, "--image", f"{out}:latest", str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    got = comparable(snapshot_tree(tmp_path / "bundle/rootfs"))
    want = comparable(expected_nodes(tree))
    assert diff_snapshots(want, got) == []
    # The DiffIDs stay those of the uncompressed tars, whatever the blobs are.
    assert result.diff_ids == [store.layer_info(c).diff_id for c in chain]


@pytest.mark.requires_tool("skopeo")
def test_skopeo_copy_reads_docker_archive(two_layers, tmp_path: Path) -> None:
    store, _, chain = two_layers
    archive = tmp_path / "app.tar"
    oci.export_image(store, chain[-1], archive, format="docker-archive", tag="demo/app:v1")
    with tarfile.open(archive) as tf:
        names = set(tf.getnames())
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        repositories = json.load(tf.extractfile("repositories"))  # type: ignore[arg-type]
    assert {"manifest.json", "repositories", "index.json", "oci-layout"} <= names
    assert manifest[0]["RepoTags"] == ["demo/app:v1"]
    assert all(layer in names for layer in manifest[0]["Layers"])
    assert list(repositories) == ["demo/app"]
    dest = tmp_path / "copied"
    proc = subprocess.run(
        ["skopeo", "copy", f"docker-archive:{archive}", f"oci:{dest}:copied"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    index = json.loads((dest / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"]
    copied = json.loads((dest / "blobs/sha256" / mdigest[7:]).read_text())
    config = json.loads((dest / "blobs/sha256" / copied["config"]["digest"][7:]).read_text())
    assert config["rootfs"]["diff_ids"] == [store.layer_info(c).diff_id for c in chain]


def test_export_is_atomic_and_refuses_to_overwrite(two_layers, tmp_path: Path) -> None:
    store, _, chain = two_layers
    out = tmp_path / "image"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        oci.export_image(store, chain[-1], out)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image", "store", "tree"]


def test_export_is_reproducible(two_layers, tmp_path: Path) -> None:
    store, _, chain = two_layers
    a = oci.export_image(store, chain[-1], tmp_path / "a.tar", gzip_layers=True)
    b = oci.export_image(store, chain[-1], tmp_path / "b.tar", gzip_layers=True)
    assert a.manifest_digest == b.manifest_digest
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_export_detects_a_damaged_layer(two_layers, tmp_path: Path) -> None:
    store, _, chain = two_layers
    victim = store.layer_dir(chain[0]) / "etc/os-release"
    os.chmod(victim, 0o644)
    victim.write_text("ID=tampered\n")
    with pytest.raises(StoreError, match="pytest-layers verify"):
        oci.export_image(store, chain[-1], tmp_path / "image")
    assert not (tmp_path / "image").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "suffix", "gz"),
    [("oci", "", False), ("oci", ".tar", True), ("docker-archive", ".tar", False)],
    ids=["oci-dir", "oci-tar-gzip", "docker-archive"],
)
def test_round_trip_keeps_diff_ids_and_chain_ids(
    two_layers, tmp_path: Path, fmt: str, suffix: str, gz: bool
) -> None:
    store, tree, chain = two_layers
    out = tmp_path / f"image{suffix}"
    first = oci.export_image(store, chain[-1], out, format=fmt, gzip_layers=gz)  # type: ignore[arg-type]
    other = tmp_path / "other-store"
    proc = cli(other, "import", str(out), "--name", "imported", check=True)
    assert f"chain id {chain[-1]}" in proc.stdout
    assert "layer 2/2" in proc.stderr  # progress lines
    imported = Store(other)
    assert [i.chain_id for i in imported.chain(imported.resolve("imported"))] == chain
    assert [i.source for i in imported.chain(chain[-1])] == ["import", "import"]
    # Exporting the imported image reproduces its DiffIDs from the kept blobs.
    again = oci.export_image(imported, chain[-1], tmp_path / "again")
    assert again.diff_ids == first.diff_ids
    assert again.chain_ids == chain
    if os.geteuid() == 0 or os.environ.get("PYTEST_LAYERS_REQUIRE"):
        assert comparable(overlay_tree(other, "imported", tmp_path)) == comparable(
            expected_nodes(tree)
        )
    # A second import finds every layer in place.
    proc = cli(other, "import", str(out), check=True)
    assert "(0 new)" in proc.stdout


# ---- images made by umoci -------------------------------------------------------------------


def _umoci(*args: str) -> None:
    proc = subprocess.run(["umoci", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"umoci {' '.join(args)}: {proc.stderr}"


def _layer_tar(entries: list[tuple[str, str, Any]]) -> bytes:
    """A hand-made layer tar: (name, "file"|"dir"|"symlink"|"hardlink", content/target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, arg in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if kind == "file":
                data = arg if isinstance(arg, bytes) else str(arg).encode()
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
            else:
                raise ValueError(kind)
            tf.addfile(ti)
    return buf.getvalue()


@pytest.mark.requires_tool("umoci")
@pytest.mark.requires_overlay
def test_umoci_built_image_imports_as_umoci_unpacks_it(tmp_path: Path) -> None:
    img = tmp_path / "umoci-image"
    _umoci("init", "--layout", str(img))
    _umoci("new", "--image", f"{img}:work")
    bundle = tmp_path / "bundle"
    _umoci("unpack", *ROOTLESS, "--image", f"{img}:work", str(bundle))
    make_tree(
        bundle / "rootfs",
        {
            "etc/x": "hello\n",
            "etc/gone": "bye\n",
            "etc/lnk": ("symlink", "x"),
            "opt/app/keep": "k\n",
            "opt/app/sub/f": "f\n",
            "srv/www/index.html": "<p>\n",
            "srv/www/old/a": "a\n",
            "bin/run": ("file", "#!/bin/sh\n", 0o755),
        },
    )
    os.utime(bundle / "rootfs/etc", (1_500_000_000, 1_500_000_000))
    _umoci("repack", "--image", f"{img}:work", str(bundle))
    # Second layer: delete files and replace a directory wholesale.
    bundle = tmp_path / "bundle2"
    _umoci("unpack", *ROOTLESS, "--image", f"{img}:work", str(bundle))
    (bundle / "rootfs/etc/gone").unlink()
    (bundle / "rootfs/etc/lnk").unlink()
    shutil.rmtree(bundle / "rootfs/opt/app")
    make_tree(bundle / "rootfs", {"opt/app/fresh": "fresh\n", "etc/lnk": ("symlink", "/etc/x")})
    # etc's mtime as it was unpacked: umoci then leaves etc out of the layer though it changes
    # inside (an edit in the second after an unpacked mtime rounded up did that by chance).
    os.utime(bundle / "rootfs/etc", (1_500_000_000, 1_500_000_000))
    _umoci("repack", "--image", f"{img}:work", str(bundle))
    # Third layer, by hand: an opaque dir (its lower children hidden), plus a new file there.
    layer = tmp_path / "opaque.tar"
    layer.write_bytes(
        _layer_tar(
            [
                ("srv/www", "dir", None),
                ("srv/www/.wh..wh..opq", "file", b""),
                ("srv/www/index.html", "file", "<p>new</p>\n"),
            ]
        )
    )
    _umoci("raw", "add-layer", "--image", f"{img}:work", str(layer))
    check = tmp_path / "check"
    _umoci("unpack", *ROOTLESS, "--image", f"{img}:work", str(check))
    want = snapshot_tree(check / "rootfs")
    assert "srv/www/old" not in want  # umoci's own reading of the opaque marker
    assert "opt/app/keep" not in want

    store = tmp_path / "store"
    proc = cli(store, "import", str(img), "--ref", "work", "--name", "umoci", check=True)
    assert "3 layers (3 new)" in proc.stdout
    got = overlay_tree(store, "umoci", tmp_path)
    assert diff_snapshots(comparable(want), comparable(got)) == []
    # The diff of the opaque layer lists each hidden lower child, as stored layers spell it.
    diff = cli(store, "diff", "umoci", check=True).stdout.splitlines()
    assert diff == [
        "C /srv",
        "C /srv/www",
        "C /srv/www/index.html",
        "D /srv/www/old",
    ]


# ---- rejected imports -----------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(
    dest: Path,
    layers: list[bytes],
    *,
    diff_ids: list[str] | None = None,
    media_type: str = oci.MEDIA_TYPE_LAYER,
    drop_blob: int | None = None,
) -> Path:
    """A minimal OCI layout holding ``layers`` (uncompressed tars), with optional damage."""
    blobs = dest / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (blobs / _sha(data)[7:]).write_bytes(data)
        return {"digest": _sha(data), "size": len(data)}

    descs = [{"mediaType": media_type, **put(layer)} for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [_sha(x) for x in layers]},
    }
    cdesc = {"mediaType": oci.MEDIA_TYPE_CONFIG, **put(json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "config": cdesc, "layers": descs}
    manifest["mediaType"] = oci.MEDIA_TYPE_MANIFEST
    mdesc = {"mediaType": oci.MEDIA_TYPE_MANIFEST, **put(json.dumps(manifest).encode())}
    mdesc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    if drop_blob is not None:
        (blobs / _sha(layers[drop_blob])[7:]).unlink()
    return dest


GOOD = _layer_tar([("etc", "dir", None), ("etc/ok", "file", "ok\n")])

REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "dotdot": ({"layers": [_layer_tar([("../x", "file", "x")])]}, "'../x'"),
    "absolute": ({"layers": [_layer_tar([("/abs", "file", "x")])]}, "'/abs'"),
    "symlink-escape-one-layer": (
        {
            "layers": [
                _layer_tar([("l", "symlink", "../../../../../.."), ("l/canary", "file", "x")])
            ]
        },
        "'l/canary'",
    ),
    "symlink-escape-two-layers": (
        {
            "layers": [
                _layer_tar([("l", "symlink", "../../../../../..")]),
                _layer_tar([("l/canary", "file", "x")]),
            ]
        },
        "'l/canary'",
    ),
    "hardlink-outside": (
        {"layers": [_layer_tar([("h", "hardlink", "../../../../etc/passwd")])]},
        "../../../../etc/passwd",
    ),
    "whiteout-empty": ({"layers": [_layer_tar([(".wh.", "file", "")])]}, "'.wh.'"),
    "whiteout-dotdot": ({"layers": [_layer_tar([("d/.wh..", "file", "")])]}, "'d/.wh..'"),
    "whiteout-dots": ({"layers": [_layer_tar([(".wh...", "file", "")])]}, "'.wh...'"),
    "diffid-mismatch": (
        {"layers": [GOOD], "diff_ids": ["sha256:" + "0" * 64]},
        "DiffID mismatch",
    ),
    "missing-blob": ({"layers": [GOOD, GOOD + b"\0" * 512], "drop_blob": 1}, "is missing"),
    "unknown-media-type": (
        {"layers": [GOOD], "media_type": "application/vnd.example.layer.v1.squashfs"},
        "unknown layer media type 'application/vnd.example.layer.v1.squashfs'",
    ),
}


@pytest.mark.parametrize("case", list(REJECTS))
def test_import_rejects_with_a_clear_error_and_writes_nothing_outside(
    case: str, tmp_path: Path
) -> None:
    spec, needle = REJECTS[case]
    work = tmp_path / "a/b/c/d/e"  # deep, so that '..' chains have room to climb
    work.mkdir(parents=True)
    canary = tmp_path / "canary"
    canary.write_text("untouched\n")
    image = write_layout(work / "image", **spec)
    store = work / "store"
    Store(store)  # created first: making it is the one change allowed outside it
    before = snapshot_tree(tmp_path, exclude=["a/b/c/d/e/store"])
    proc = cli(store, "import", str(image), "--name", "bad")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("pytest-layers: error: "), proc.stderr
    assert needle in lines[-1]
    assert "Traceback" not in proc.stderr
    assert canary.read_text() == "untouched\n"
    assert diff_snapshots(before, snapshot_tree(tmp_path, exclude=["a/b/c/d/e/store"])) == []
    opened = Store(store)
    assert opened.get_name("bad") is None
    assert list((store / "tmp").iterdir()) == []
    # Only complete, valid lower layers may have been kept (the two-layer case's first).
    for cid in opened.layers():
        assert opened.verify([cid]) == []


def test_import_api_error_types(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidImageError, match="neither an OCI image layout"):
        oci.import_image(store, tmp_path)
    with pytest.raises(InvalidImageError, match="no such file"):
        oci.import_image(store, tmp_path / "nope.tar")
    image = write_layout(tmp_path / "img", [GOOD])
    with pytest.raises(InvalidImageError, match="no image tagged 'v9'; tags present: latest"):
        oci.import_image(store, image, ref="v9")
    tampered = write_layout(tmp_path / "img2", [GOOD])
    blob = tampered / "blobs/sha256" / _sha(GOOD)[7:]
    blob.write_bytes(GOOD.replace(b"ok\n", b"no\n"))
    with pytest.raises(InvalidImageError, match="blob has digest"):
        oci.import_image(store, tampered)
    assert store.layers() == []


def test_docker_archive_with_legacy_layout_imports(tmp_path: Path) -> None:
    """Old ``docker save`` archives: ``<id>/layer.tar`` files and a ``<hex>.json`` config."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [_sha(GOOD)]},
    }
    raw = json.dumps(config).encode()
    members = {
        f"{_sha(raw)[7:]}.json": raw,
        "abc/layer.tar": GOOD,
        "manifest.json": json.dumps(
            [{"Config": f"{_sha(raw)[7:]}.json", "RepoTags": ["x:1"], "Layers": ["abc/layer.tar"]}]
        ).encode(),
    }
    archive = tmp_path / "old.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    store = tmp_path / "store"
    proc = cli(store, "import", str(archive), "--name", "old", check=True)
    assert _sha(GOOD) in proc.stdout  # a one-layer image's chain id is its DiffID
    assert cli(store, "diff", "old", check=True).stdout.splitlines() == ["A /etc", "A /etc/ok"]


def test_a_layer_that_only_adds_is_applied_without_a_view(tmp_path: Path, monkeypatch) -> None:
    """An add-only upper layer goes straight into its staged diff (no overlay view, no second
    copy of every file); one with a whiteout still goes through the view, and both store the
    layer the image means."""
    base = _layer_tar([("etc", "dir", None), ("etc/os", "file", "debian\n")])
    adds = _layer_tar(
        [("app", "dir", None), ("app/bin", "file", "x"), ("app/link", "hardlink", "app/bin")]
    )
    hides = _layer_tar([("new", "dir", None), ("new/f", "file", "n"), ("etc/.wh.os", "file", "")])
    views: list[int] = []
    real = oci._apply_on_view

    def counted(*args: Any, **kwargs: Any) -> None:
        views.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(oci, "_apply_on_view", counted)
    store = Store(tmp_path / "store")
    added = oci.import_image(store, write_layout(tmp_path / "adds", [base, adds]))
    assert views == []
    top = store.layer_dir(added.chain_id)
    assert sorted(p.relative_to(top).as_posix() for p in top.rglob("*")) == [
        "app",
        "app/bin",
        "app/link",
    ]
    assert os.stat(top / "app/bin").st_ino == os.stat(top / "app/link").st_ino
    hidden = oci.import_image(store, write_layout(tmp_path / "hides", [base, hides]))
    assert views == [1]
    top = store.layer_dir(hidden.chain_id)
    assert (top / "new/f").read_text() == "n"
    # The whiteout is stored (the abandoned standalone attempt had stopped before "etc").
    assert os.listdir(top / "etc") in (["os"], [".wh.os"])
    assert store.verify() == []
    # Exported again, both give back the image's own DiffIDs (from the kept blobs).
    again = oci.export_image(store, added.chain_id, tmp_path / "again")
    assert again.diff_ids == added.diff_ids
