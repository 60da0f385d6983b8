"""Faults, group 5: the store inside a container's filesystem (overlayfs).

Inside a Docker container the store's directory sits on overlayfs, which cannot hold 0/0
character devices as plain files (it would take them for its own whiteouts) nor keep
``*.overlay.*`` xattrs. The test mounts an overlay and puts a store inside it, next to a store
on the machine's ordinary filesystem, then:

* the store records the ``marker`` flavor (OCI ``.wh.`` files), the ordinary one ``overlay``;
* every layer edge-case scenario of the cross-backend suite (``test_backend_behaviour``) runs
  through the copy backend on an image stored in each store, built and committed as a session
  would; both must give the expected change list, the same merged tree and the same diff_id;
* a whole pytest session with its store there works (auto backend and copy), whiteouts of the
  image included, and ``pytest-layers verify`` agrees.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_util import (
    assert_store_consistent,
    no_mounts_left,
    our_mounts_under,
    out,
    run_session,
    unmount_all_under,
    write_project,
)
from test_backend_behaviour import BASE, SCENARIOS, TOP
from treeutil import make_tree, snapshot_tree

from pytest_layers import _linux, changeset
from pytest_layers.backends.detect import get_backend
from pytest_layers.store import Store, filesystem_type

pytestmark = [
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.requires_root,
    pytest.mark.requires_overlay,
]


@pytest.fixture(scope="module")
def container_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on an overlay mount, as a container's root filesystem is."""
    base = tmp_path_factory.mktemp("container")
    for sub in ("lower", "upper", "work", "merged"):
        (base / sub).mkdir()
    (base / "lower" / "usr").mkdir()
    merged = base / "merged"
    _linux.mount(
        "overlay",
        merged,
        "overlay",
        0,
        f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'}",
    )
    try:
        assert filesystem_type(merged) == "overlay"
        yield merged
    finally:
        unmount_all_under(merged)
        assert our_mounts_under(merged) == []


def _stored_image(store: Store, where: Path) -> list[Path]:
    """The behaviour suite's two-layer image, built into ``store`` as builders are: the base
    tree staged directly, the top one through a copy-backend view of the base."""
    copy = get_backend("copy")
    tree = make_tree(where / "base-tree", BASE)
    os.setxattr(tree / "etc/app.conf", "user.orig", b"1")
    os.setxattr(tree / "etc/os-release", "user.keep", b"k")
    with store.staging() as staged:
        entries = changeset.changes_from_tree(tree, changeset.ImageView([], store.flavor))
        changeset.write_layer(entries, staged, flavor=store.flavor)
        bottom = store.add_layer(staged, parent=None, name="base", source="build")
    lowers = [store.layer_dir(bottom.chain_id)]
    scratch = where / "top-scratch"
    scratch.mkdir()
    view = copy.open(lowers, scratch, flavor=store.flavor)
    try:
        for rel, content in TOP.items():
            (view.path / rel).write_text(str(content))
        (view.path / "gone.txt").unlink()
        entries = copy.changes(view, changeset.ImageView(lowers, store.flavor))
        with store.staging() as staged:
            changeset.write_layer(entries, staged, flavor=store.flavor)
            top = store.add_layer(staged, parent=bottom.chain_id, name="top", source="build")
    finally:
        view.close()
    return [store.layer_dir(top.chain_id), store.layer_dir(bottom.chain_id)]


@dataclasses.dataclass
class _Result:
    changes: list[str]
    diff_id: str
    merged: dict[str, object]


def _run_scenarios(store_root: Path, work: Path) -> tuple[Store, dict[str, _Result]]:
    store = Store(store_root)
    lowers = _stored_image(store, work)
    parent = store.get_name("top")
    copy = get_backend("copy")
    results = {}
    for name, scenario in SCENARIOS.items():
        scratch = work / f"view-{name}"
        scratch.mkdir()
        view = copy.open(lowers, scratch, flavor=store.flavor)
        try:
            assert not (view.path / "gone.txt").exists(), "the image's whiteout was lost"
            scenario.ops(view.path)
            merged = {
                rel: dataclasses.replace(node, mtime=0)
                for rel, node in snapshot_tree(view.path, dir_mtimes=False).items()
            }
            entries = copy.changes(view, changeset.ImageView(lowers, store.flavor))
            with store.staging() as staged:
                changeset.write_layer(entries, staged, flavor=store.flavor)
                info = store.add_layer(staged, parent=parent, name=None, source="commit")
        finally:
            view.close()
        results[name] = _Result(
            [str(c) for c in changeset.to_changes(entries)], info.diff_id, merged
        )
    return store, results


@pytest.mark.slow
def test_design_scenarios_on_overlayfs_store_match_ext4(container_fs: Path, tmp_path: Path) -> None:
    on_overlay, there = _run_scenarios(container_fs / "store", tmp_path / "w-ovl")
    on_disk, here = _run_scenarios(tmp_path / "store", tmp_path / "w-ext4")
    assert on_overlay.flavor == "marker"
    assert on_disk.flavor == "overlay"
    # The whiteout of the image's top layer is a marker file there, a 0/0 device here.
    top_ovl = on_overlay.layer_dir(on_overlay.get_name("top") or "")
    top_disk = on_disk.layer_dir(on_disk.get_name("top") or "")
    assert (top_ovl / ".wh.gone.txt").is_file()
    assert not (top_ovl / "gone.txt").exists()
    assert os.lstat(top_disk / "gone.txt").st_rdev == 0
    assert on_overlay.get_name("top") == on_disk.get_name("top"), "the image differs"
    for name, scenario in SCENARIOS.items():
        assert there[name].changes == scenario.expected, name
        assert here[name].changes == there[name].changes, name
        assert here[name].merged == there[name].merged, name
        assert here[name].diff_id == there[name].diff_id, f"{name}: layer tars differ"
    assert on_overlay.verify() == []
    assert on_disk.verify() == []


CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "etc/old.conf").write_text("old\\n")
    (root / "data/tree/a").mkdir(parents=True)
    (root / "data/tree/a/1").write_text("1\\n")

@layer(parent=base)
def app(root):
    (root / "etc/old.conf").unlink()
    import shutil
    shutil.rmtree(root / "data/tree")
    (root / "data/tree").mkdir()
    (root / "data/tree/new").write_text("new\\n")
"""

TESTS = """
import pytest

@pytest.mark.layer("app")
def test_whiteouts_hold(rootfs):
    assert not (rootfs / "etc/old.conf").exists()
    assert sorted(p.name for p in (rootfs / "data/tree").iterdir()) == ["new"]
    (rootfs / "etc/os-release").unlink()
    (rootfs / "etc/new.conf").write_text("x\\n")
    assert [str(c) for c in rootfs.diff()] == ["C /etc", "A /etc/new.conf", "D /etc/os-release"]
    lay = rootfs.commit("snap")
    assert [str(c) for c in lay.changes()] == [
        "C /etc", "A /etc/new.conf", "D /etc/os-release"
    ]

def test_app_layer(app):
    assert [str(c) for c in app.changes()] == [
        "C /data", "C /data/tree", "D /data/tree/a", "A /data/tree/new", "C /etc",
        "D /etc/old.conf",
    ]
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "copy"])
def test_session_with_store_on_overlayfs(
    pytester: pytest.Pytester, container_fs: Path, backend: str
) -> None:
    store_path = container_fs / f"session-store-{backend}"
    path = pytester.path
    try:
        with no_mounts_left(path):
            write_project(path, CONFTEST, TESTS, store=store_path)
            proc = run_session(path, f"--layers-backend={backend}")
            assert proc.returncode == 0, out(proc)
            assert "2 passed" in proc.stdout, out(proc)
            again = run_session(path, f"--layers-backend={backend}", "-p", "no:randomly")
            assert again.returncode == 0, out(again)
            assert "marker" in (store_path / "VERSION").read_text()
            assert_store_consistent(store_path)
            assert our_mounts_under(path) == []
    finally:
        shutil.rmtree(store_path, ignore_errors=True)
