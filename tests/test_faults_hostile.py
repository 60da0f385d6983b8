"""Faults, group 6: hostile trees written by tests.

A test plants absolute symlinks into its rootfs that point at host files (a canary file, a
canary FIFO, a canary directory, and the real ``/etc/passwd``), then diffs, commits, fails (so
its rw layer is kept as a snapshot) and the snapshot is diffed and exported with the CLI. The
host side must never be read or written through them:

* the canary file keeps its content and mtime;
* the canary is also a FIFO: any ``open`` of it blocks (no writer, no reader), so a read or
  write through the link hangs the session, which the subprocess timeout turns into a failure;
* a canary directory's content would show up in the change list if a walk followed the link.

``Rootfs.resolve`` is checked for absolute, ``..``, chained and looping links; a symlink loop
and a 10,000-deep directory in the rw layer must not hang or crash ``diff()``.
Every backend available here runs the same project.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from faults_util import (
    child_env,
    cli,
    no_mounts_left,
    our_mounts_under,
    out,
    pytest_command,
    write_project,
)

from pytest_layers import namespaces

pytestmark = [pytest.mark.faults, pytest.mark.slow]

CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:image:/root:/bin/sh\\n")
    (root / "etc/shadow").write_text("root:*:1::::::\\n")
    (root / "srv").mkdir()
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/real").write_text("inside\\n")
"""

TESTS = """
import errno, os, time
from pathlib import Path
import pytest

CANARY = os.environ["CANARY_DIR"]

@pytest.mark.layer("base")
def test_plants_host_links_and_fails(rootfs):
    (rootfs / "etc/passwd").unlink()
    os.symlink(CANARY + "/file", rootfs / "etc/passwd")
    (rootfs / "etc/shadow").unlink()
    os.symlink(CANARY + "/fifo", rootfs / "etc/shadow")
    os.symlink("/etc/passwd", rootfs / "etc/group")
    os.rmdir(rootfs / "srv")
    os.symlink(CANARY + "/dir", rootfs / "srv")
    os.symlink("../../../../../../" + CANARY.lstrip("/") + "/file", rootfs / "usr/lib/up")
    changes = [str(c) for c in rootfs.diff()]
    assert changes == [
        "C /etc", "A /etc/group", "C /etc/passwd", "C /etc/shadow", "C /srv",
        "C /usr", "C /usr/lib", "A /usr/lib/up",
    ], changes
    committed = rootfs.commit()
    assert [str(c) for c in committed.changes()] == changes
    # Resolve stays inside: the absolute and the climbing links land in the rootfs.
    root = rootfs.path
    assert rootfs.resolve("/etc/passwd") == root / CANARY.lstrip("/") / "file"
    assert rootfs.resolve("usr/lib/up") == root / CANARY.lstrip("/") / "file"
    assert rootfs.resolve("srv/x") == root / CANARY.lstrip("/") / "dir/x"
    # Now fail: the default keep policy commits this rw layer as a snapshot.
    assert False, "fails on purpose so that its hostile rw layer is kept"

@pytest.mark.layer("base")
def test_resolve_never_leaves_the_root(rootfs):
    root = rootfs.path
    os.symlink("/usr/lib", rootfs / "abs")
    os.symlink("../../../../..", rootfs / "usr/lib/climb")
    os.symlink("abs/climb/usr/lib/real", rootfs / "chain1")
    os.symlink("/chain1", rootfs / "chain2")
    os.symlink("loop2", rootfs / "loop1")
    os.symlink("/loop1", rootfs / "loop2")
    os.symlink("self/x", rootfs / "self")
    assert rootfs.resolve("/abs/real") == root / "usr/lib/real"
    assert rootfs.resolve("../../../etc/passwd") == root / "etc/passwd"
    assert rootfs.resolve("usr/lib/climb") == root
    assert rootfs.resolve("usr/lib/climb/../../etc") == root / "etc"
    assert rootfs.resolve("chain2") == root / "usr/lib/real"
    assert rootfs.resolve("/chain2/../passwd") == root / "usr/lib/passwd"
    for looping in ("loop1", "/loop2/x", "self"):
        with pytest.raises(OSError) as info:
            rootfs.resolve(looping)
        assert info.value.errno == errno.ELOOP
    # Whatever the input, the answer is inside the root.
    for path in ("/", "..", "abs/climb/..", "chain1/../../../..", "/proc/self/root"):
        assert rootfs.resolve(path).is_relative_to(root), path

def _deep(rootfs, depth):
    fd = os.open(rootfs.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):  # through dir fds: deeper than PATH_MAX is reachable only so
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("bottom\\n")
    finally:
        os.close(fd)

def _check_deep(rootfs, depth):
    os.symlink("b", rootfs / "a")
    os.symlink("a", rootfs / "b")
    os.symlink(".", rootfs / "here")
    _deep(rootfs, depth)
    start = time.monotonic()
    changes = rootfs.diff()
    elapsed = time.monotonic() - start
    print(f"diff of a {depth}-deep tree: {len(changes)} changes in {elapsed:.2f}s")
    assert len(changes) == depth + 4, len(changes)
    assert [str(c) for c in changes[:3]] == ["A /a", "A /b", "A /d"]
    assert str(changes[-1]) == "A /here"
    assert str(changes[-2]).endswith("/d/leaf")
    assert str(changes[-2]).count("/d") == depth
    return changes

@pytest.mark.layer("base")
def test_loop_and_deep_tree_within_path_max(rootfs):
    # ~1,900 levels of "d/" stay under PATH_MAX (4096 bytes) with the scratch prefix.
    depth = (4096 - len(os.fspath(rootfs)) - 64) // 2
    changes = _check_deep(rootfs, depth)
    committed = rootfs.commit()
    assert committed.changes() == changes

@pytest.mark.layer("base")
def test_loop_and_10000_deep_tree_do_not_hang_or_crash_diff(rootfs):
    if os.environ["LAYERS_TEST_BACKEND"] != "fuse":
        _check_deep(rootfs, 10_000)
        return
    # fuse-overlayfs itself refuses to create a path longer than PATH_MAX (ENAMETOOLONG from
    # mkdir, before any pytest-layers code runs): the deepest tree a test can make there is
    # the one it stopped at, and that one must still diff.
    with pytest.raises(OSError) as info:
        _deep(rootfs, 10_000)
    assert info.value.errno == errno.ENAMETOOLONG
    changes = rootfs.diff()
    assert len(changes) > 1_000
    assert all(str(c).startswith("A /d") for c in changes)
    assert str(changes[-1]).count("/d") == len(changes)
"""


def _backends() -> list[object]:
    params: list[object] = []
    for name, cap in (("overlay", "overlay"), ("copy", None), ("fuse", "fuse")):
        marks = [pytest.mark.requires_overlay] if cap == "overlay" else []
        if cap == "fuse":
            marks = [pytest.mark.requires_fuse]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _fingerprint(path: Path) -> tuple[str, int]:
    st = os.lstat(path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_hostile_links_never_reach_the_host(pytester: pytest.Pytester, backend: str) -> None:
    path = pytester.path
    canary = path / "canary"
    canary.mkdir()
    (canary / "file").write_text("CANARY\n")
    os.utime(canary / "file", (1_000_000_000, 1_000_000_000))
    os.mkfifo(canary / "fifo")
    (canary / "dir").mkdir()
    (canary / "dir" / "secret").write_text("host secret\n")
    before = {p: _fingerprint(p) for p in (canary / "file", Path("/etc/passwd"))}
    dir_before = sorted(os.listdir(canary / "dir"))

    with no_mounts_left(path):
        store = write_project(path, CONFTEST, TESTS)
        env = child_env(CANARY_DIR=str(canary))
        try:
            proc = subprocess.run(
                pytest_command("-k", "plants or resolve", f"--layers-backend={backend}"),
                cwd=path,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"the session hung: something opened the canary FIFO through a planted link\n"
                f"{exc.stdout!r}\n{exc.stderr!r}"
            )
        assert proc.returncode == 1, out(proc)
        assert "1 failed, 1 passed" in proc.stdout, out(proc)
        failed = {
            line.split("::")[1].split(" ")[0]
            for line in proc.stdout.splitlines()
            if line.startswith("FAILED ")
        }
        assert failed == {"test_plants_host_links_and_fails"}, out(proc)
        assert "fails on purpose" in proc.stdout, out(proc)
        assert "could not keep" not in proc.stdout, out(proc)
        ref = "snapshot:test_project.py::test_plants_host_links_and_fails"
        assert ref in proc.stdout, out(proc)

        # The kept snapshot, seen from the CLI: diff, verify, export and import back.
        diff = cli(store, "diff", ref, env=env)
        assert diff.returncode == 0, out(diff)
        assert "A /etc/group" in diff.stdout, out(diff)
        assert "A /srv/secret" not in diff.stdout, out(diff)
        assert cli(store, "verify", ref, env=env).returncode == 0
        exported = cli(store, "export", ref, "-o", str(path / "hostile.tar"), env=env)
        assert exported.returncode == 0, out(exported)
        imported = cli(store, "import", str(path / "hostile.tar"), "--name", "back", env=env)
        assert imported.returncode == 0, out(imported)
        back = cli(store, "diff", "back", env=env)
        assert "A /etc/group" in back.stdout, out(back)
        assert our_mounts_under(path) == []

    after = {p: _fingerprint(p) for p in before}
    assert after == before, "a host file was written through a planted symlink"
    assert sorted(os.listdir(canary / "dir")) == dir_before
    assert (canary / "fifo").is_fifo()
    # The stored snapshot holds the links themselves, never the host content.
    for stored in (store / "layers").rglob("*"):
        if stored.is_file() and not stored.is_symlink() and stored.name != "blob.tar":
            data = stored.read_bytes()
            assert b"CANARY" not in data, stored
            assert b"host secret" not in data, stored


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_symlink_loop_and_deep_trees_do_not_hang_or_crash(
    pytester: pytest.Pytester, backend: str
) -> None:
    """A loop, a ~1,900-deep tree (within PATH_MAX: diff and commit) and a 10,000-deep one
    (beyond PATH_MAX and Python's recursion limit: diff) in the rw layer; teardown removes
    them all (``shutil.rmtree`` would hit the recursion limit)."""
    path = pytester.path
    store = write_project(path, CONFTEST, TESTS)
    try:
        with no_mounts_left(path):
            try:
                proc = subprocess.run(
                    pytest_command("-s", "-k", "deep", f"--layers-backend={backend}"),
                    cwd=path,
                    env=child_env(CANARY_DIR=str(path), LAYERS_TEST_BACKEND=backend),
                    capture_output=True,
                    text=True,
                    timeout=180,
                )
            except subprocess.TimeoutExpired as exc:
                pytest.fail(f"diff() hung on a symlink loop or a deep tree\n{exc.stdout!r}")
            print("\n".join(line for line in proc.stdout.splitlines() if "deep tree" in line))
            assert "INTERNALERROR" not in proc.stdout, out(proc)
            assert proc.returncode == 0, out(proc)
            assert "2 passed" in proc.stdout, out(proc)
            assert our_mounts_under(path) == []
            views = store / "scratch" / "views"
            assert not views.exists() or list(views.iterdir()) == [], "a view was not removed"
    finally:
        # pytest's own cleanup of old tmp dirs recurses and would choke on the deep layer.
        namespaces.remove_tree(store)
