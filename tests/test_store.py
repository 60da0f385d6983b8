"""The layer store: layout, VERSION and flavor, adding layers, refs, resolve, verify, prune."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import run_as_user
from treeutil import make_tree, whiteout

from pytest_layers import errors, layertar
from pytest_layers.store import FORMAT_VERSION, Store, probe_flavor


def add(
    store: Store,
    spec: dict[str, Any],
    *,
    parent: str | None = None,
    name: str | None = None,
    source: str = "build",
) -> str:
    with store.staging() as staged:
        make_tree(staged, spec)
        return store.add_layer(staged, parent=parent, name=name, source=source).chain_id


# -- layout and VERSION ------------------------------------------------------------------------


def test_layout_and_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    root = tmp_path / "store"
    for d in ("layers", "refs/names", "refs/cache", "refs/snapshots", "tmp", "locks", "leases"):
        assert (root / d).is_dir(), d
    version = json.loads((root / "VERSION").read_text())
    assert version == {"format": FORMAT_VERSION, "flavor": store.flavor}

    chain_id = add(store, {"etc/os-release": "ID=demo\n"}, name="base")
    layer = root / "layers" / chain_id.removeprefix("sha256:")
    assert sorted(os.listdir(layer)) == ["diff", "files.json", "layer.json"]
    assert (layer / "diff/etc/os-release").read_text() == "ID=demo\n"
    meta = json.loads((layer / "layer.json").read_text())
    assert meta["chain_id"] == chain_id
    assert meta["diff_id"] == layertar.layer_diff_id(layer / "diff", flavor=store.flavor)
    assert (meta["parent"], meta["name"], meta["source"], meta["files"]) == (
        None,
        "base",
        "build",
        1,
    )
    manifest = json.loads((layer / "files.json").read_text())
    assert manifest["etc/os-release"]["type"] == "file"
    assert manifest["etc/os-release"]["size"] == len("ID=demo\n")
    assert len(manifest["etc/os-release"]["sha256"]) == 64
    assert manifest["etc"]["type"] == "dir"
    assert json.loads((root / "refs/names/base").read_text())["chain_id"] == chain_id
    assert os.listdir(root / "tmp") == []


def test_files_counts_non_directories_without_whiteouts(tmp_path: Path) -> None:
    # 100 dirs x 10 files, a symlink, a hardlink pair and a whiteout of a parent's file: the
    # count is what a user would call the layer's files, not its tar entries.
    store = Store(tmp_path / "store")
    spec: dict[str, Any] = {f"d{d:02d}/f{f}": "x" for d in range(100) for f in range(10)}
    base = add(store, spec, name="base")
    assert store.layer_info(base).files == 1000
    with store.staging() as staged:
        make_tree(
            staged, {"d00/link": ("symlink", "f1"), "d01/a": "a", "d01/b": ("hardlink", "d01/a")}
        )
        if store.flavor == "overlay":
            whiteout(staged / "d02/f0")
        else:
            (staged / "d02").mkdir()
            (staged / "d02/.wh.f0").touch()
        child = store.add_layer(staged, parent=base, name="child", source="build").chain_id
    assert store.layer_info(child).files == 3  # link, a, b: not the dirs nor the whiteout
    meta = json.loads((tmp_path / "store/layers" / child[7:] / "layer.json").read_text())
    assert meta["files"] == 3


def test_flavor_on_ext4_is_overlay(tmp_path: Path) -> None:
    assert Store(tmp_path / "s").flavor == "overlay"
    assert probe_flavor(tmp_path) == "overlay"
    assert os.listdir(tmp_path) == ["s"]  # the probe cleans up after itself


def _run_script(script: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a child Python with ``tmp_path`` as its argument; capture its output."""
    return subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_ON_OVERLAYFS = textwrap.dedent(
    r"""
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        assert libc.unshare(0x10000000 | 0x00020000) == 0, "unshare(USER|NS)"
        with open("/proc/self/setgroups", "w") as f: f.write("deny")
        with open("/proc/self/uid_map", "w") as f: f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f: f.write(f"{gid} {gid} 1")
    else:
        assert libc.unshare(0x00020000) == 0, "unshare(NS)"
    libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None)   # MS_PRIVATE | MS_REC
    d = sys.argv[1]
    for x in "luwm":
        os.mkdir(os.path.join(d, x))
    opts = f"lowerdir={d}/l,upperdir={d}/u,workdir={d}/w,userxattr".encode()
    if libc.mount(b"overlay", f"{d}/m".encode(), b"overlay", 0, opts) != 0:
        sys.exit("overlay mount failed: " + os.strerror(ctypes.get_errno()))
    import pytest_layers.store as st
    store = st.Store(f"{d}/m/store")
    result = {"fstype": st.filesystem_type(store.root), "probe": st.probe_flavor(store.root),
              "flavor": store.flavor}
    import pytest_layers._storecore as core
    core.filesystem_type = lambda path: "ext4"  # blind the type check: the read-back must tell
    result["read_back"] = st.probe_flavor(store.root)
    print(json.dumps(result))
    """
)


@pytest.mark.requires_overlay
def test_flavor_on_overlayfs_is_marker(tmp_path: Path) -> None:
    # The mount lives in the child's private mount namespace and dies with it.
    proc = _run_script(_ON_OVERLAYFS, tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "fstype": "overlay",
        "probe": "marker",
        "flavor": "marker",
        "read_back": "marker",
    }
    # The store itself went to the upper dir; its VERSION says marker for every later opener.
    version = json.loads((tmp_path / "u/store/VERSION").read_text())
    assert version["flavor"] == "marker"
    assert Store(tmp_path / "u/store").flavor == "marker"


def test_recorded_flavor_is_honoured(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "VERSION").write_text(json.dumps({"format": 1, "flavor": "marker"}))
    store = Store(root)
    assert store.flavor == "marker"
    chain_id = add(store, {"d/f": "x"})
    diff = store.layer_dir(chain_id)
    assert store.layer_info(chain_id).diff_id == layertar.layer_diff_id(diff, flavor="marker")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "VERSION").write_text(json.dumps({"format": FORMAT_VERSION + 1, "flavor": "overlay"}))
    with pytest.raises(errors.StoreFormatError) as info:
        Store(root)
    msg = str(info.value)
    assert f"format version {FORMAT_VERSION + 1}" in msg
    assert f"version {FORMAT_VERSION} this pytest-layers supports" in msg
    assert "upgrade pytest-layers" in msg
    assert "--layers-store" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "content",
    ['{"format": "one", "flavor": "overlay"}', '{"format": 1, "flavor": "aufs"}', "not json", "[]"],
)
def test_unknown_version_content_is_refused(tmp_path: Path, content: str) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "VERSION").write_text(content)
    with pytest.raises(errors.StoreFormatError, match=r"VERSION.*upgrade pytest-layers"):
        Store(root)


_OPEN_STORE = textwrap.dedent(
    """
    import sys
    from pytest_layers import errors
    from pytest_layers.store import Store
    try:
        Store(sys.argv[1])
    except errors.StoreError as exc:
        print(f"StoreError|{exc.filename}|{exc}")
    else:
        print("opened")
    """
)


@pytest.mark.requires_user
def test_unwritable_store_is_a_clear_error_for_the_user(user_tmp_path: Path) -> None:
    existing = user_tmp_path / "root-owned"
    Store(existing)  # made by root: the test user may read it but not write it
    missing = user_tmp_path / "root-owned-dir" / "store"
    missing.parent.mkdir(mode=0o755)
    for path in (existing, missing):
        proc = run_as_user([sys.executable, "-c", _OPEN_STORE, str(path)], cwd="/")
        assert proc.returncode == 0, proc.stderr
        kind, where, msg = proc.stdout.strip().split("|", 2)
        assert kind == "StoreError"
        assert str(path.parent if path == missing else path) in where
        if path == missing:
            assert f"the layer store {path} is not writable" in msg
        else:  # another user's store is refused before any write is tried
            assert f"{path} belongs to uid 0 (root), not to you" in msg
        assert "--layers-store" in msg
        assert "\n" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode")
def test_unwritable_store_is_a_clear_error_by_mode(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Store(root)
    os.chmod(root / "tmp", 0o555)
    try:
        with pytest.raises(errors.StoreError, match=r"not writable.*--layers-store"):
            Store(root)
    finally:
        os.chmod(root / "tmp", 0o755)


# -- adding layers -----------------------------------------------------------------------------


def test_add_layer_returns_existing_and_never_overwrites(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    first = add(store, {"a": "1", "d/b": "2"})
    stored_file = store.layer_dir(first) / "a"
    inode = os.stat(stored_file).st_ino
    meta_before = (store.layer_dir(first).parent / "layer.json").read_bytes()

    with store.staging() as staged:
        make_tree(staged, {"a": "1", "d/b": "2"})
        info = store.add_layer(staged, parent=None, name="again", source="commit")
        assert not staged.exists()  # discarded, not merged
    assert info.chain_id == first
    assert info.source == "build"  # the existing layer.json, untouched
    assert os.stat(stored_file).st_ino == inode
    assert (store.layer_dir(first).parent / "layer.json").read_bytes() == meta_before
    assert store.get_name("again") == first
    assert len(store.layers()) == 1
    assert os.listdir(store.root / "tmp") == []


def test_add_layer_from_outside_staging(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    tree = make_tree(tmp_path / "tree", {"x/y": "z"})
    chain_id = store.add_layer(tree, parent=None, name=None, source="build").chain_id
    assert not tree.exists()  # moved in, not copied
    assert (store.layer_dir(chain_id) / "x/y").read_text() == "z"


def test_staging_is_removed_when_the_build_fails(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")

    def failing_build() -> None:
        with store.staging() as staged:
            make_tree(staged, {"ro/f": "x"})
            os.chmod(staged / "ro", 0o555)
            raise RuntimeError("builder failed")

    with pytest.raises(RuntimeError):
        failing_build()
    assert os.listdir(store.root / "tmp") == []
    assert store.layers() == []


def test_chain_ids_and_chain(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    base = add(store, {"etc/a": "1"}, name="base")
    app = add(store, {"etc/b": "2"}, parent=base, name="app")
    chain = store.chain(app)
    assert [i.chain_id for i in chain] == [base, app]
    assert chain[0].chain_id == chain[0].diff_id
    assert app == layertar.chain_id([chain[0].diff_id, chain[1].diff_id])
    assert store.layer_info(app).parent == base
    assert store.has_layer(app)
    assert not store.has_layer("sha256:" + "0" * 64)
    assert store.size() == 2
    with pytest.raises(errors.LayerNotFoundError):
        store.layer_info("sha256:" + "0" * 64)
    with pytest.raises(errors.LayerNotFoundError):
        add(store, {"x": "y"}, parent="sha256:" + "1" * 64)


def test_import_keeps_blob_and_its_diff_id(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with open(tmp_path / "blob.tar", "wb") as out:
        tree = make_tree(tmp_path / "src", {"f": "data"})
        diff_id = layertar.write_layer_tar(tree, out, flavor="overlay")
    with store.staging() as staged:
        make_tree(staged, {"f": "data"})
        info = store.add_layer(
            staged,
            parent=None,
            name=None,
            source="import",
            diff_id=diff_id,
            blob=tmp_path / "blob.tar",
        )
    assert info.diff_id == diff_id
    assert info.blob is not None
    assert info.blob.read_bytes() == (tmp_path / "blob.tar").read_bytes()
    assert info.tree_digest == layertar.layer_diff_id(
        store.layer_dir(info.chain_id), flavor=store.flavor
    )
    assert store.verify() == []

    with store.staging() as staged, pytest.raises(errors.InvalidLayerError, match="DiffID"):
        store.add_layer(
            staged,
            parent=None,
            name=None,
            source="import",
            diff_id="sha256:" + "2" * 64,
            blob=tmp_path / "blob.tar",
        )


# -- refs, snapshots, resolve ------------------------------------------------------------------


def test_cache_refs(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    chain_id = add(store, {"f": "x"})
    assert store.cache_get("k1") is None
    store.cache_set("k1", chain_id)
    assert store.cache_get("k1") == chain_id
    assert Store(tmp_path / "s").cache_get("k1") == chain_id  # survives the session
    with pytest.raises(errors.LayerNotFoundError):
        store.cache_set("k2", "sha256:" + "3" * 64)


def test_snapshot_ids_increase_and_keep_is_honoured(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    layers = [add(store, {"n": str(i)}) for i in range(5)]
    test = "tests/test_a.py::test_x[a/b-1]"
    for chain_id in layers:
        assert store.add_snapshot(test, chain_id, keep=3) == f"snapshot:{test}"
    snaps = store.snapshots(test)
    assert [s.n for s in snaps] == [3, 4, 5]
    assert [s.chain_id for s in snaps] == layers[2:]
    assert store.resolve(f"snapshot:{test}") == layers[4]
    store.add_snapshot("other::t", layers[0], keep=1)
    assert {s.test for s in store.snapshots()} == {test, "other::t"}
    store.prune(keep_snapshots=0)
    assert store.snapshots() == []
    again = add(store, {"n": "again"})  # the prune took every unreferenced layer
    store.add_snapshot(test, again, keep=3)
    assert [s.n for s in store.snapshots(test)] == [6]  # never reuses an id
    with pytest.raises(ValueError, match="keep"):
        store.add_snapshot(test, again, keep=0)


def test_resolve_forms(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    chain_ids = [add(store, {"n": str(i)}, name=f"l{i}") for i in range(17)]
    newest = add(store, {"n": "newest"}, name="l0")
    assert store.resolve("l0") == newest  # a name resolves to its latest build
    assert store.resolve("l5") == chain_ids[5]
    assert store.resolve(chain_ids[3]) == chain_ids[3]
    assert store.resolve(chain_ids[3][7:19]) == chain_ids[3]
    assert store.resolve("sha256:" + chain_ids[3][7:19]) == chain_ids[3]

    # 18 layers, 16 hex digits: some first digit is shared.
    by_first = {
        k: list(g) for k, g in itertools.groupby(sorted(store.layers()), key=lambda c: c[7])
    }
    prefix, shared = next((k, g) for k, g in by_first.items() if len(g) > 1)
    with pytest.raises(errors.AmbiguousRefError) as amb:
        store.resolve(prefix)
    assert amb.value.candidates == sorted(shared)
    for candidate in shared:
        assert candidate in str(amb.value)
    assert isinstance(amb.value, LookupError)
    assert pickle.loads(pickle.dumps(amb.value)).candidates == sorted(shared)

    with pytest.raises(errors.LayerNotFoundError) as unknown:
        store.resolve("nope")
    assert "l16" in str(unknown.value)
    assert "snapshot:NODEID" in str(unknown.value)
    with pytest.raises(errors.LayerNotFoundError, match="snapshot"):
        store.resolve("snapshot:tests/test_a.py::nothing")
    with pytest.raises(errors.LayerNotFoundError):
        store.resolve("sha256:" + "0" * 64)


# -- build lock --------------------------------------------------------------------------------


def test_build_lock_timeout_names_key_and_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    holder = store.build_lock("key-1")
    with holder:
        with pytest.raises(errors.LockTimeoutError) as info:
            store.build_lock("key-1", timeout=0.2).acquire()
        assert "'key-1'" in str(info.value)
        assert str(store.root / "locks") in str(info.value)
        assert isinstance(info.value, TimeoutError)
        assert info.value.key == "key-1"
        assert info.value.lock_file == str(store.root / "locks/build-key-1.lock")
        with store.build_lock("key-2", timeout=0.2):  # other keys do not wait
            pass


# -- verify ------------------------------------------------------------------------------------


@pytest.fixture
def verified(tmp_path: Path) -> tuple[Store, str, Path]:
    store = Store(tmp_path / "s")
    base = add(store, {"etc/os-release": "ID=demo\n", "etc/passwd": "root:x:0:0\n"}, name="base")
    assert store.verify() == []
    return store, base, store.layer_dir(base)


def _problems(store: Store) -> list[tuple[str | None, str]]:
    return [(p.path, p.message) for p in store.verify()]


def test_verify_catches_a_changed_byte(verified: tuple[Store, str, Path]) -> None:
    store, base, diff = verified
    data = bytearray((diff / "etc/os-release").read_bytes())
    data[3] ^= 0x01
    st = os.stat(diff / "etc/os-release")
    (diff / "etc/os-release").write_bytes(bytes(data))
    os.utime(diff / "etc/os-release", ns=(st.st_atime_ns, st.st_mtime_ns))
    problems = store.verify()
    assert [(p.path, p.message) for p in problems] == [
        ("etc/os-release", "content changed (same size)")
    ]
    assert str(problems[0]) == (
        f"layer {base[7:19]} (base): /etc/os-release: content changed (same size)"
    )


def test_verify_catches_a_changed_mode(verified: tuple[Store, str, Path]) -> None:
    store, _, diff = verified
    os.chmod(diff / "etc/passwd", 0o600)
    assert _problems(store) == [("etc/passwd", "mode changed from 0644 to 0600")]


def test_verify_catches_an_added_file(verified: tuple[Store, str, Path]) -> None:
    store, _, diff = verified
    (diff / "etc/shadow").write_text("x")
    assert _problems(store) == [("etc/shadow", "added (file, not in the stored manifest)")]


def test_verify_catches_a_removed_file(verified: tuple[Store, str, Path]) -> None:
    store, base, diff = verified
    (diff / "etc/passwd").unlink()
    assert _problems(store) == [("etc/passwd", "removed (file)")]
    assert store.verify([base])[0].name == "base"


def test_verify_catches_a_tampered_blob(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with open(tmp_path / "blob.tar", "wb") as out:
        diff_id = layertar.write_layer_tar(
            make_tree(tmp_path / "src", {"f": "1"}), out, flavor="overlay"
        )
    with store.staging() as staged:
        make_tree(staged, {"f": "1"})
        info = store.add_layer(
            staged,
            parent=None,
            name=None,
            source="import",
            diff_id=diff_id,
            blob=tmp_path / "blob.tar",
        )
    assert info.blob is not None
    with open(info.blob, "r+b") as f:
        f.seek(600)
        f.write(b"!")
    assert [(p.path, p.message.split(" hashes")[0]) for p in store.verify()] == [
        ("blob.tar", "original blob")
    ]


def test_verify_without_manifest_still_reports_the_layer(verified: tuple[Store, str, Path]) -> None:
    store, base, diff = verified
    (diff / "etc/passwd").write_text("evil\n")
    (diff.parent / "files.json").write_text("{}")
    problems = store.verify()
    assert problems
    assert all(p.chain_id == base for p in problems)
    assert ("etc/passwd", "added (file, not in the stored manifest)") in _problems(store)


def test_verify_catches_tampered_metadata(verified: tuple[Store, str, Path]) -> None:
    store, base, diff = verified
    meta_path = diff.parent / "layer.json"
    meta = json.loads(meta_path.read_text())
    meta["diff_id"] = "sha256:" + "4" * 64
    meta_path.write_text(json.dumps(meta))
    messages = [p.message for p in store.verify()]
    assert any(m.startswith("diff_id sha256:4444") and base not in m for m in messages), messages
    meta_path.write_text("{broken")
    (problem,) = store.verify()
    assert problem.chain_id == base
    assert "damaged" in problem.message


# -- leases and prune --------------------------------------------------------------------------


def test_prune_removes_unreferenced_and_keeps_reachable(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    base = add(store, {"a": "1"})
    named = add(store, {"b": "2"}, parent=base, name="app")
    cached = add(store, {"c": "3"})
    store.cache_set("key", cached)
    snap = add(store, {"d": "4"}, parent=named)
    store.add_snapshot("t::x", snap, keep=3)
    orphan = add(store, {"e": "5"}, parent=base)
    orphan_child = add(store, {"f": "6"}, parent=orphan)
    store.close()  # drops this process's hold on layers it added without a ref
    # "freed" is disk use as du counts it (blocks, directories and layer.json included),
    # not the 2 bytes of file content the two layers hold.
    freed = store.disk_use([orphan, orphan_child])
    assert freed > 2

    report = Store(tmp_path / "s").prune()
    assert sorted(report.removed_layers) == sorted([orphan, orphan_child])
    assert sorted(store.layers()) == sorted([base, named, cached, snap])
    assert report.kept_layers == 4
    assert report.freed_bytes == freed
    assert os.listdir(store.root / "tmp") == []
    assert store.verify() == []


def test_unreferenced_layer_is_kept_while_its_adder_lives(tmp_path: Path) -> None:
    # add_layer then cache_set are two calls: a prune in between must not win.
    adder = Store(tmp_path / "s")
    chain_id = add(adder, {"f": "x"})
    assert Store(tmp_path / "s").prune().removed_layers == []
    adder.cache_set("k", chain_id)  # now a ref holds it; the adder's own hold is gone
    adder.close()
    assert adder.has_layer(chain_id)


def test_prune_keeps_leased_layers(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    base = add(store, {"a": "1"})
    top = add(store, {"b": "2"}, parent=base)
    store.close()
    with store.lease([top]):
        assert store.prune().removed_layers == []  # the lease covers the whole chain
    assert sorted(store.prune().removed_layers) == sorted([base, top])
    assert os.listdir(store.root / "leases") == []
    with pytest.raises(errors.LayerNotFoundError), store.lease([top]):
        pass


_HOLD_LEASE = textwrap.dedent(
    """
    import sys, time
    from pytest_layers.store import Store
    store = Store(sys.argv[1])
    with store.lease([sys.argv[2]]):
        print("leased", flush=True)
        time.sleep(600)
    """
)


def test_prune_keeps_layers_leased_by_another_process_until_it_dies(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    chain_id = add(store, {"a": "1"})
    store.close()
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LEASE, str(store.root), chain_id],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "leased\n"
            assert store.prune().removed_layers == []
            assert store.has_layer(chain_id)
        finally:
            child.kill()
    # Killed without releasing: its lease is stale and no longer protects anything.
    report = store.prune()
    assert report.removed_layers == [chain_id]
    assert report.removed_leases == 1
    assert os.listdir(store.root / "leases") == []


def test_stale_tmp_is_swept_live_tmp_is_not(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = store.root / "tmp" / f"{dead.stdout.strip()}-1-stage-abc"
    make_tree(stale, {"diff/ro/f": "x"})
    os.chmod(stale / "diff/ro", 0o555)
    recycled = store.root / "tmp" / f"{os.getpid()}-12345-stage-abc"  # our pid, another start
    recycled.mkdir()
    with store.staging() as live:
        Store(store.root)  # opening sweeps
        assert live.is_dir()
        assert not stale.exists()
        assert not recycled.exists()


_FULL_DISK = textwrap.dedent(
    """
    import ctypes, errno, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.unshare(0x00020000) == 0, "unshare(NS)"
    libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None)   # MS_PRIVATE | MS_REC
    d = sys.argv[1]
    assert libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=512k") == 0, "mount tmpfs"
    from pytest_layers import errors
    from pytest_layers.store import Store
    store = Store(d + "/s")
    with store.staging() as staged:
        files = []
        try:
            for i in range(10_000):  # fill the disk, then free one page: no room for files.json
                files.append(staged / f"file-with-a-longish-name-{i:05}")
                files[-1].write_bytes(b"x")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        files.pop().unlink(missing_ok=True)
        files.pop().unlink()
        try:
            store.add_layer(staged, parent=None, name="big", source="build")
        except errors.NoSpaceError as exc:
            print("NoSpaceError:", exc)
    assert store.layers() == [] and os.listdir(store.root / "tmp") == [], "inconsistent"
    with store.staging() as staged:  # space is back once the failed layer is gone
        (staged / "small").write_text("ok")
        chain_id = store.add_layer(staged, parent=None, name="small", source="build").chain_id
    assert store.verify() == [] and store.layers() == [chain_id]
    print("recovered")
    """
)


@pytest.mark.requires_root
def test_full_disk_is_a_clear_error_and_the_store_stays_consistent(tmp_path: Path) -> None:
    # The tmpfs lives in the child's private mount namespace and dies with it.
    proc = _run_script(_FULL_DISK, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(
        "NoSpaceError: [Errno 28] no space left on device while writing layer 'big'"
    ), lines
    assert lines[1] == "recovered"


def test_add_layer_reads_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest takes the file hashes the diff_id walk computed: no second open per file."""
    from pytest_layers import _layerindex

    store = Store(tmp_path / "store")
    reads: list[str] = []
    real = _layerindex._sha256_at
    monkeypatch.setattr(
        _layerindex, "_sha256_at", lambda fd, name: reads.append(name) or real(fd, name)
    )
    with store.staging() as staged:
        make_tree(staged, {"a/one": "1", "a/two": "22", "empty": ""})
        info = store.add_layer(staged, parent=None, name=None, source="build")
    assert reads == []
    files = json.loads((store.layer_dir(info.chain_id).parent / "files.json").read_text())
    assert files["a/two"]["sha256"] == hashlib.sha256(b"22").hexdigest()
    assert store.verify() == []


def test_manifest_rehashes_a_file_changed_since_its_hash(tmp_path: Path) -> None:
    from pytest_layers.store import build_manifest

    make_tree(tmp_path / "t", {"f": "new"})
    st = os.stat(tmp_path / "t/f")
    stale = {"f": (st.st_ino, st.st_size, st.st_mtime_ns - 1, "0" * 64)}
    assert (
        build_manifest(tmp_path / "t", stale)["f"]["sha256"] == hashlib.sha256(b"new").hexdigest()
    )


def test_verified_import_blob_is_moved_not_rehashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_layers import _storewrite

    store = Store(tmp_path / "store")
    with store.staging() as staging:
        (staging / "layer").mkdir()
        (staging / "layer/f").write_text("x")
        blob = staging / "blob.tar"
        with open(blob, "wb") as out:
            diff_id = layertar.write_layer_tar(staging / "layer", out, flavor=store.flavor)

        def no_rehash(path: Path) -> str:
            raise AssertionError(f"{path} hashed again")

        monkeypatch.setattr(_storewrite, "_blob_digest", no_rehash)
        info = store.add_layer(
            staging / "layer",
            parent=None,
            name=None,
            source="import",
            diff_id=diff_id,
            blob=blob,
            blob_verified=True,
        )
        assert not blob.exists()  # moved into the layer, not copied
    assert info.blob is not None
    assert info.diff_id == diff_id
    monkeypatch.undo()
    assert store.verify() == []
