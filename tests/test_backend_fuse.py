"""fuse-overlayfs with a store of the marker flavor (a store inside a container's overlayfs).

A store on overlayfs spells whiteouts as ``.wh.`` files, which kernel overlay cannot use as
lowers; fuse-overlayfs reads them, so it is the fastest backend left there. Its trial mount
must therefore work where 0/0 devices cannot be created, and a view must apply the image's
marker whiteouts and record the test's deletions so that a commit keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults_util import overlayfs_mount

from pytest_layers import changeset, namespaces
from pytest_layers.backends.base import Backend
from pytest_layers.backends.detect import choose_backend
from pytest_layers.store import Store, filesystem_type

pytestmark = [pytest.mark.requires_root, pytest.mark.requires_overlay, pytest.mark.requires_fuse]


@pytest.fixture
def overlayfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on an overlay mount, as a container's root filesystem is; always unmounted."""
    with overlayfs_mount(tmp_path) as merged:
        assert filesystem_type(merged) == "overlay"
        yield merged


def _commit(
    store: Store,
    backend: Backend,
    lowers: list[Path],
    ops: Callable[[Path], None],
    scratch: Path,
    parent: str | None,
    name: str,
) -> tuple[list[str], str]:
    """Open a view of ``lowers``, apply ``ops``, commit it; (changes, chain id)."""
    image = changeset.ImageView(lowers, store.flavor)
    scratch.mkdir()
    view = backend.open(lowers, scratch, flavor=store.flavor)
    try:
        ops(view.path)
        entries = backend.changes(view, image)
        with store.staging() as staged:
            changeset.write_layer(entries, staged, flavor=store.flavor)
            info = store.add_layer(staged, parent=parent, name=name, source="commit")
    finally:
        view.close()
    return [str(c) for c in changeset.to_changes(entries)], info.chain_id


def test_fuse_works_with_a_marker_flavor_store(overlayfs_dir: Path, tmp_path: Path) -> None:
    store = Store(overlayfs_dir / "store")
    assert store.flavor == "marker"
    # The trial mount runs on the store's filesystem, as the plugin's does.
    backend, skipped = choose_backend("fuse", overlayfs_dir / "store" / "scratch", flavor="marker")
    assert backend.name == "fuse"
    assert skipped == []

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    for name in ("os-release", "gone", "kept"):
        (tree / "etc" / name).write_text(f"{name}\n")
    with store.staging() as staged:
        entries = changeset.changes_from_tree(tree, changeset.ImageView([], store.flavor))
        changeset.write_layer(entries, staged, flavor=store.flavor)
        base = store.add_layer(staged, parent=None, name="base", source="build").chain_id

    def change_top(root: Path) -> None:
        (root / "etc/gone").unlink()
        (root / "etc/new").write_text("new\n")

    lowers = [store.layer_dir(base)]
    changes, top = _commit(store, backend, lowers, change_top, overlayfs_dir / "v1", base, "top")
    assert changes == ["C /etc", "D /etc/gone", "A /etc/new"]
    top_dir = store.layer_dir(top)
    # The deletion is stored in the store's own spelling, readable on overlayfs.
    assert (top_dir / "etc/.wh.gone").is_file()
    assert not (top_dir / "etc/gone").exists()

    def change_again(root: Path) -> None:
        # The image's marker whiteout is applied by the view.
        assert sorted(os.listdir(root / "etc")) == ["kept", "new", "os-release"]
        (root / "etc/os-release").unlink()
        (root / "etc/kept").write_text("changed\n")

    lowers = [top_dir, store.layer_dir(base)]
    changes, _ = _commit(store, backend, lowers, change_again, overlayfs_dir / "v2", top, "snap")
    assert changes == ["C /etc", "C /etc/kept", "D /etc/os-release"]
    assert store.verify() == []
    assert namespaces.mounts_under(overlayfs_dir) == [overlayfs_dir]


CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "etc/old.conf").write_text("old\\n")

@layer(parent=base)
def app(root):
    (root / "etc/old.conf").unlink()
    (root / "etc/app.conf").write_text("debug=false\\n")
"""

TESTS = """
import pytest

@pytest.mark.layer("app")
def test_marker_whiteouts_through_fuse(rootfs):
    assert sorted(p.name for p in (rootfs / "etc").iterdir()) == ["app.conf", "os-release"]
    (rootfs / "etc/os-release").unlink()
    assert [str(c) for c in rootfs.diff()] == ["C /etc", "D /etc/os-release"]
    assert [str(c) for c in rootfs.commit("snap").changes()] == ["C /etc", "D /etc/os-release"]
"""


@pytest.mark.slow
def test_auto_chooses_fuse_for_a_store_on_overlayfs(
    pytester: pytest.Pytester, overlayfs_dir: Path
) -> None:
    store = overlayfs_dir / "store"
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_fuse_marker=TESTS)
    result = pytester.runpytest_subprocess(f"--layers-store={store}", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    # Kernel overlay cannot read marker whiteouts; fuse-overlayfs can, and is faster than copy.
    result.stdout.fnmatch_lines([f"layers: backend=fuse (overlay: *marker*), store={store} *"])
    assert "marker" in (store / "VERSION").read_text()


def test_write_through_one_name_of_a_lower_hardlink_pair_is_committed_as_seen(
    tmp_path: Path,
) -> None:
    """fuse-overlayfs shows a write through ``etc/a`` through ``srv/b`` too (one inode) but its
    upper holds one copy: the change list and the layer must show both names changed, still
    linked, as the view does."""
    from treeutil import build_layer, make_tree

    from pytest_layers.backends.fuse import FuseBackend

    store = Store(tmp_path / "store")
    tree = make_tree(
        tmp_path / "tree", {"etc/a": "orig\n", "srv/b": ("hardlink", "etc/a"), "etc/c": "c\n"}
    )
    base = build_layer(store, None, tree, "base")
    lowers = [store.layer_dir(base)]
    backend = FuseBackend()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    view = backend.open(lowers, scratch, flavor=store.flavor)
    try:
        with open(view.path / "etc/a", "a") as f:
            f.write("new\n")
        assert (view.path / "srv/b").read_text() == "orig\nnew\n"  # what the test sees
        entries = backend.changes(view, changeset.ImageView(lowers, store.flavor))
        assert [str(c) for c in changeset.to_changes(entries)] == [
            "C /etc",
            "C /etc/a",
            "C /srv",
            "C /srv/b",
        ]
        with store.staging() as staged:
            changeset.write_layer(entries, staged, flavor=store.flavor)
            top = store.add_layer(staged, parent=base, name="top", source="commit").chain_id
    finally:
        view.close()
    layer = store.layer_dir(top)
    assert (layer / "etc/a").read_text() == (layer / "srv/b").read_text() == "orig\nnew\n"
    assert os.stat(layer / "etc/a").st_ino == os.stat(layer / "srv/b").st_ino
    assert not (layer / "etc/c").exists()


def test_a_scratch_path_with_dotdot_mounts(tmp_path: Path) -> None:
    """The mount table holds canonical paths: a store given as ``../store`` (a scratch path
    with ``..`` in it) used to wait out the 10 s mount timeout and fail the backend's check."""
    from pytest_layers.backends.fuse import FuseBackend

    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "a").write_text("a")
    (tmp_path / "elsewhere").mkdir()
    scratch = tmp_path / "elsewhere" / ".." / "scratch"
    scratch.mkdir()
    view = FuseBackend().open([lower], scratch)
    try:
        assert (view.path / "a").read_text() == "a"
    finally:
        view.close()
    assert namespaces.mounts_under(tmp_path) == []


SCRATCH_TESTS = """
from pytest_layers.store import filesystem_type

def test_upper_on_tmpfs(rootfs):
    (rootfs / "etc/new").write_text("x")
    # rootfs is scratch/view/m: the upper dir (scratch/view/u) sits on the scratch's filesystem.
    assert filesystem_type(rootfs.path.parent / "u") == "tmpfs"
"""


def test_fuse_views_have_their_upper_dirs_on_the_sessions_scratch_tmpfs(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """As root, in the session's private namespace, the fuse backend's scratch (upper, work
    and the view's own dirs) is a tmpfs, as kernel overlay's is: on a disk filesystem each
    view's half dozen mkdirs and rmdirs were most of a pooled fuse view's cost in the kernel
    (ext4's inode allocation scanning recently deleted inodes)."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_scratch=SCRATCH_TESTS)
    result = pytester.runpytest_subprocess(
        f"--layers-store={tmp_path / 'store'}",
        "--layers-backend=fuse",
        "-p",
        "no:randomly",
        "-o",
        "layers_default=app",
    )
    result.assert_outcomes(passed=1)
