"""One behaviour suite for every backend: the layer edge-case scenarios through a mounted view.

Each scenario opens a view of the same two-layer image (stored layers in the ``"overlay"``
flavor, the upper one holding a whiteout), performs its operations through ``view.path``, and
turns the view's changes into a change list and a canonical layer tar
(``backend.changes`` -> ``changeset.to_changes`` / ``changeset.write_layer`` ->
``layertar.write_layer_tar``). ``test_scenario`` checks the list for each backend;
``test_backends_agree`` checks that every backend available here gives the same list **and the
same tar bytes**, so a snapshot never depends on the backend that produced it.

``copy-reuse`` is the copy backend handing out a copy reset after an earlier view: each
scenario runs in such a copy, and the copy it is reset to afterwards must equal a fresh one.

Mounting happens in this process; every view is closed in ``finally``.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from conftest import _probe, _required
from treeutil import Node, make_tree, set_tree_mtimes, snapshot_tree, whiteout

from pytest_layers import _linux
from pytest_layers.backends.base import Backend, MountPolicy
from pytest_layers.backends.copy import CopyBackend
from pytest_layers.backends.detect import get_backend
from pytest_layers.changeset import ImageView, to_changes, write_layer
from pytest_layers.errors import BackendUnavailableError
from pytest_layers.layertar import DEFAULT_EPOCH, write_layer_tar

LONG = "L" * 200 + "-é"  # 203 bytes: near NAME_MAX, not ASCII
UNICODE = "ünïcødé-名前.txt"
NON_UTF8 = os.fsdecode(b"bad-\xff\xfe.bin")

BASE = {
    "etc/os-release": "ID=demo\n",
    "etc/app.conf": "debug=false\n",
    "etc/sub/deep.txt": "deep\n",
    "data/tree/a/1": "1\n",
    "data/tree/a/2": "2\n",
    "data/tree/b/3": "3\n",
    "data/tmpdir": None,
    "kinds/dir2/child": "c\n",
    "kinds/file2": "f\n",
    "kinds/slink": ("symlink", "target"),
    "kinds/dir3/x": "x\n",
    "kinds/lnk": ("symlink", "../etc/os-release"),
    "kinds/hl1": "h\n",
    "kinds/hl2": ("hardlink", "kinds/hl1"),
    "usr/bin/tool": ("file", "tool\n", 0o755),
    "gone.txt": "hidden by the upper layer\n",
}
TOP = {"etc/extra.conf": "extra=1\n"}


def build_image(where: Path) -> list[Path]:
    """Two stored layers, top first, mtimes clamped like the store's."""
    bottom = make_tree(where / "l0", BASE)
    os.setxattr(bottom / "etc/app.conf", "user.orig", b"1")
    os.setxattr(bottom / "etc/os-release", "user.keep", b"k")
    top = make_tree(where / "l1", TOP)
    whiteout(top / "gone.txt")
    for layer in (bottom, top):
        set_tree_mtimes(layer, DEFAULT_EPOCH)
        os.utime(layer, (DEFAULT_EPOCH, DEFAULT_EPOCH))
    return [top, bottom]


# ---- scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    ops: Callable[[Path], None]
    expected: list[str]
    root: bool = False  # needs uid 0 (chown, mknod of a device)
    marks: list[pytest.MarkDecorator] = field(default_factory=list)


def _write(path: Path, data: str) -> None:
    path.write_text(data)


def same_second_change(root: Path) -> None:
    path = root / "etc/app.conf"
    before = os.lstat(path)
    path.write_text("debug=fals3\n")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def delete_then_recreate(root: Path) -> None:
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").write_text("ID=other\n")


def rm_rf_mkdir(root: Path) -> None:
    shutil.rmtree(root / "data/tree")
    (root / "data/tree").mkdir()
    (root / "data/tree/new").write_text("new\n")


def dir_to_file(root: Path) -> None:
    shutil.rmtree(root / "kinds/dir2")
    (root / "kinds/dir2").write_text("now a file\n")


def file_to_dir(root: Path) -> None:
    (root / "kinds/file2").unlink()
    (root / "kinds/file2").mkdir()
    (root / "kinds/file2/x").write_text("x\n")


def symlink_to_dir(root: Path) -> None:
    (root / "kinds/slink").unlink()
    (root / "kinds/slink").mkdir()


def dir_to_symlink(root: Path) -> None:
    shutil.rmtree(root / "kinds/dir3")
    os.symlink("dir2", root / "kinds/dir3")


def remove_symlink(root: Path) -> None:
    (root / "kinds/lnk").unlink()
    assert (root / "etc/os-release").read_text() == "ID=demo\n"  # the target stays


def rename_file(root: Path) -> None:
    os.rename(root / "etc/app.conf", root / "etc/app2.conf")


def rename_dir(root: Path) -> None:
    # Kernel overlay without redirect_dir refuses rename(2) of a lower dir with EXDEV (see
    # test_overlay.py); shutil.move then copies and deletes, which every backend must support.
    shutil.move(root / "data/tree", root / "data/tree2")


def hardlink_lower(root: Path) -> None:
    os.link(root / "etc/os-release", root / "etc/os-link")


def hardlink_new(root: Path) -> None:
    (root / "etc/new1").write_text("n\n")
    os.link(root / "etc/new1", root / "etc/new2")


def setuid_sticky(root: Path) -> None:
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.chmod(root / "data/tmpdir", 0o1777)


def xattrs(root: Path) -> None:
    os.setxattr(root / "etc/app.conf", "user.test", b"value")
    os.removexattr(root / "etc/os-release", "user.keep")


def odd_names(root: Path) -> None:
    (root / "etc" / UNICODE).write_text("u\n")
    (root / "etc" / LONG).write_text("l\n")
    (root / "etc" / NON_UTF8).write_text("b\n")


def whiteout_of_lower_upper(root: Path) -> None:
    # A file the upper layer added, deleted again, and a file the upper layer deleted, made.
    (root / "etc/extra.conf").unlink()
    (root / "gone.txt").write_text("back\n")


SCENARIOS: dict[str, Scenario] = {
    "add_under_existing_dir": Scenario(
        lambda r: _write(r / "etc/new.conf", "new\n"), ["C /etc", "A /etc/new.conf"]
    ),
    "same_size_same_second": Scenario(same_second_change, ["C /etc", "C /etc/app.conf"]),
    "chmod_only": Scenario(
        lambda r: os.chmod(r / "etc/app.conf", 0o600), ["C /etc", "C /etc/app.conf"]
    ),
    "chown_only": Scenario(
        lambda r: os.chown(r / "etc/app.conf", 1234, 4321), ["C /etc", "C /etc/app.conf"], True
    ),
    "delete_lower_file": Scenario(
        lambda r: (r / "etc/os-release").unlink(), ["C /etc", "D /etc/os-release"]
    ),
    "delete_lower_tree": Scenario(
        lambda r: shutil.rmtree(r / "data/tree"), ["C /data", "D /data/tree"]
    ),
    "delete_then_recreate": Scenario(delete_then_recreate, ["C /etc", "C /etc/os-release"]),
    "rm_rf_then_mkdir": Scenario(
        rm_rf_mkdir,
        ["C /data", "C /data/tree", "D /data/tree/a", "D /data/tree/b", "A /data/tree/new"],
    ),
    "dir_to_file": Scenario(dir_to_file, ["C /kinds", "C /kinds/dir2"]),
    "file_to_dir": Scenario(file_to_dir, ["C /kinds", "C /kinds/file2", "A /kinds/file2/x"]),
    "symlink_to_dir": Scenario(symlink_to_dir, ["C /kinds", "C /kinds/slink"]),
    "dir_to_symlink": Scenario(dir_to_symlink, ["C /kinds", "C /kinds/dir3"]),
    "remove_symlink": Scenario(remove_symlink, ["C /kinds", "D /kinds/lnk"]),
    "rename_lower_file": Scenario(rename_file, ["C /etc", "D /etc/app.conf", "A /etc/app2.conf"]),
    "rename_lower_dir": Scenario(
        rename_dir,
        [
            "C /data",
            "D /data/tree",
            "A /data/tree2",
            "A /data/tree2/a",
            "A /data/tree2/a/1",
            "A /data/tree2/a/2",
            "A /data/tree2/b",
            "A /data/tree2/b/3",
        ],
    ),
    "hardlink_to_lower_file": Scenario(
        hardlink_lower, ["C /etc", "A /etc/os-link", "C /etc/os-release"]
    ),
    "hardlinks_inside_layer": Scenario(hardlink_new, ["C /etc", "A /etc/new1", "A /etc/new2"]),
    "fifo": Scenario(lambda r: os.mkfifo(r / "etc/fifo"), ["C /etc", "A /etc/fifo"]),
    "device_node": Scenario(
        lambda r: os.mknod(r / "etc/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        ["C /etc", "A /etc/null"],
        True,
    ),
    "setuid_sticky": Scenario(
        setuid_sticky, ["C /data", "C /data/tmpdir", "C /usr", "C /usr/bin", "C /usr/bin/tool"]
    ),
    "user_xattrs": Scenario(xattrs, ["C /etc", "C /etc/app.conf", "C /etc/os-release"]),
    "empty": Scenario(lambda r: None, []),
    "unicode_and_long_names": Scenario(
        odd_names,
        sorted(
            ["C /etc", f"A /etc/{UNICODE}", f"A /etc/{LONG}", f"A /etc/{NON_UTF8}"],
            key=lambda line: line[2:],
        ),
    ),
    "lower_whiteouts_respected": Scenario(
        whiteout_of_lower_upper, ["C /etc", "D /etc/extra.conf", "A /gone.txt"]
    ),
}

# ---- backends ------------------------------------------------------------------------------

# backend -> capabilities it needs to run in this process (no namespace of its own)
BACKEND_CAPS = {"overlay": ("overlay",), "fuse": ("fuse",), "copy": (), "copy-reuse": ()}


def _make_backend(name: str, where: Path) -> Backend:
    if name != "copy-reuse":
        return get_backend(name)
    # Unbound copies (as where mounting is refused): a bind-mounted copy is never reused.
    backend = CopyBackend(policy=MountPolicy(suid=True, dev=True))
    backend.keep_copies_in(where / "copies")
    return backend


def _missing(backend: str) -> str | None:
    if backend == "overlay" and not _linux.has_effective_cap(_linux.CAP_SYS_ADMIN):
        return "overlay: this process cannot mount (not root, not in the session's user namespace)"
    for cap in BACKEND_CAPS[backend]:
        why = _probe(cap)
        if why is not None:
            return f"{cap}: {why}"
    return None


def _backend_param(name: str) -> object:
    marks = {
        "overlay": [pytest.mark.requires_overlay],
        "fuse": [pytest.mark.requires_fuse],
        "copy": [],
        "copy-reuse": [],
    }[name]
    return pytest.param(name, marks=marks, id=name)


@dataclass(frozen=True)
class Outcome:
    changes: list[str]
    tar: bytes
    merged: dict[str, Node]  # snapshot of the view after the operations


_results: dict[tuple[str, str], Outcome] = {}


def run_scenario(backend_name: str, name: str, where: Path) -> Outcome:
    """Open a view, run the scenario, return its change list and canonical tar (memoised)."""
    key = (backend_name, name)
    if key in _results:
        return _results[key]
    scenario = SCENARIOS[name]
    lowers = build_image(where / "image")
    backend = _make_backend(backend_name, where)
    scratch = where / "scratch"
    scratch.mkdir()
    layer = where / "layer"
    layer.mkdir()
    pristine = None
    if isinstance(backend, CopyBackend) and backend_name == "copy-reuse":
        view = backend.open(lowers, scratch, flavor="overlay")
        pristine = snapshot_tree(view.path)
        view.close()
        scratch.mkdir()
    view = backend.open(lowers, scratch, flavor="overlay")
    try:
        assert not (view.path / "gone.txt").exists()
        assert (view.path / "etc/extra.conf").read_text() == "extra=1\n"
        scenario.ops(view.path)
        # Entries written now carry this run's mtime; those of the image must be kept as is.
        # Directory mtimes are left out: kernel overlay bumps a directory's mtime when it copies
        # up a child for a metadata-only change, fuse-overlayfs and copy do not (the layer tar
        # clamps them all, so the tars still agree).
        # Hardlink groups too: in a user namespace, kernel overlay shows nlink 1 for a lower
        # file just hardlinked (the upper holds the link; the tars below still agree).
        merged = {
            rel: replace(node, mtime=min(node.mtime, DEFAULT_EPOCH + 1), hardlink_group=None)
            for rel, node in snapshot_tree(view.path, dir_mtimes=False).items()
        }
        entries = backend.changes(view, ImageView(lowers, "overlay"))
        changes = [str(c) for c in to_changes(entries)]
        write_layer(entries, layer, flavor="overlay")
    finally:
        view.close()
    assert not scratch.exists(), "close() must remove the view's scratch"
    if isinstance(backend, CopyBackend) and pristine is not None:
        scratch.mkdir()
        view = backend.open(lowers, scratch, flavor="overlay")
        try:
            assert backend.reused == 2, "the scenario's copy was not reset and reused"
            assert snapshot_tree(view.path) == pristine
        finally:
            view.close()
    buf = io.BytesIO()
    write_layer_tar(layer, buf, flavor="overlay")
    _results[key] = outcome = Outcome(changes, buf.getvalue(), merged)
    return outcome


def _needs_root(name: str) -> None:
    if SCENARIOS[name].root and os.geteuid() != 0:
        pytest.skip("root: the scenario chowns or creates a device node")


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("backend", [_backend_param(n) for n in BACKEND_CAPS])
def test_scenario(backend: str, name: str, tmp_path: Path) -> None:
    _needs_root(name)
    why = _missing(backend)
    if why is not None:
        pytest.skip(why)
    outcome = run_scenario(backend, name, tmp_path)
    assert outcome.changes == SCENARIOS[name].expected


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_backends_agree(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Same operations -> same change list, same merged tree and byte-identical layer tar."""
    _needs_root(name)
    available = [b for b in BACKEND_CAPS if _missing(b) is None]
    missing = {b: _missing(b) for b in BACKEND_CAPS if b not in available}
    required = _required()
    for backend, why in missing.items():
        if "all" in required or any(cap in required for cap in BACKEND_CAPS[backend]):
            pytest.fail(f"backend {backend} is required but unavailable: {why}", pytrace=False)
    if len(available) < 2:
        pytest.skip(f"only {available} available here: {missing}")
    outcomes = {
        b: run_scenario(b, name, tmp_path_factory.mktemp(f"{b}-{name[:30]}")) for b in available
    }
    first, *others = available
    for other in others:
        assert outcomes[other].changes == outcomes[first].changes, (first, other)
        assert outcomes[other].merged == outcomes[first].merged, (first, other)
        assert outcomes[other].tar == outcomes[first].tar, (
            f"{first} and {other} give different layer tars for {name}"
        )


@pytest.mark.parametrize("backend", [_backend_param(n) for n in BACKEND_CAPS])
def test_readonly_view_refuses_writes(backend: str, tmp_path: Path) -> None:
    why = _missing(backend)
    if why is not None:
        pytest.skip(why)
    lowers = build_image(tmp_path / "image")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if backend.startswith("copy") and (
        not _linux.has_effective_cap(_linux.CAP_SYS_ADMIN) or _missing("overlay") is not None
    ):
        # A copy needs a read-only bind mount for EROFS; it must say so, not pretend. Root
        # may be refused mounting too (a seccomp filter: .ci/restricted.py).
        with pytest.raises(BackendUnavailableError, match="read-only"):
            _make_backend(backend, tmp_path).open(lowers, scratch, readonly=True)
        return
    view = _make_backend(backend, tmp_path).open(lowers, scratch, readonly=True)
    try:
        assert view.upper is None
        assert (view.path / "etc/os-release").read_text() == "ID=demo\n"
        with pytest.raises(OSError, match="Read-only") as info:
            (view.path / "etc/new").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        view.close()
    assert not scratch.exists()
