"""Faults: a hostile image attacks the host through ``pytest-layers shell``.

The image carries a static binary (``gcc -static``) that tries, as root and as an ordinary user,
the classic double-``chroot`` escape, ``/proc/<pid>/root``, unmounting or remounting ``/``,
mounting, ``mknod`` of the host's disk and opening a host-wide kernel knob for writing; a canary
file outside must stay unwritten. Other images point ``/dev`` and ``/proc`` at host directories
with absolute symlinks, or leave a daemon running when the shell exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_USER, require, run_as_user
from faults_util import kill, processes_in
from treeutil import build_layer, busybox_tree, snapshot_tree

from pytest_layers import sandbox
from pytest_layers.store import Store

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.requires_tool("busybox")]
PYTHONPATH = {"PYTHONPATH": os.fspath(Path(sandbox.__file__).parent.parent)}


# A hostile program: harmless probes first (inside the sandbox), escapes last, so that a broken
# sandbox lets it write only the canary.
ESCAPE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static void report(const char *what, int rc) {
    if (rc == 0) printf("%s: DONE\n", what);
    else printf("%s: refused (%s)\n", what, strerror(errno));
}

static void try_write(const char *what, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { printf("%s: refused (%s)\n", what, strerror(errno)); return; }
    (void)!write(fd, "escaped\n", 8);
    close(fd);
    printf("%s: WROTE %s\n", what, path);
}

int main(int argc, char **argv) {
    const char *canary = argv[1];
    char path[4096];
    int fd = open("/proc/sys/kernel/core_pattern", O_WRONLY);  /* opened, never written */
    report("open core_pattern for writing", fd < 0 ? -1 : 0);
    if (fd >= 0) close(fd);
    report("mknod disk", mknod("/disk", S_IFBLK | 0600, makedev(254, 0)));
    report("mount tmpfs", mount("none", "/tmp", "tmpfs", 0, NULL));
    report("remount /", mount("none", "/", NULL, MS_REMOUNT | MS_BIND, NULL));
    report("umount /", umount2("/", MNT_DETACH));
    snprintf(path, sizeof path, "/proc/1/root%s", canary);
    try_write("via /proc/1/root", path);
    snprintf(path, sizeof path, "/proc/self/root%s", canary);
    try_write("via /proc/self/root", path);
    /* the classic double chroot: chroot below the cwd, then climb from the cwd left outside */
    mkdir("/esc", 0755);
    report("chroot /esc", chroot("/esc"));
    for (int i = 0; i < 256; i++) (void)!chdir("..");
    report("chroot .", chroot("."));
    try_write("double chroot", canary);
    return 0;
}
"""


def cli(*args: str, store: Path) -> list[str]:
    return [sys.executable, "-m", "pytest_layers.cli", "--store", os.fspath(store), *args]


@pytest.fixture
def hostile_store(tmp_path: Path) -> Path:
    """A store with ``hostile``: busybox plus ``/escape``, a static binary (gcc -static)."""
    require("tool:gcc")  # with libc6-dev's static libc.a
    src = tmp_path / "escape.c"
    src.write_text(ESCAPE_C)
    tree = busybox_tree(tmp_path / "tree")
    subprocess.run(["gcc", "-static", "-O1", "-o", tree / "escape", src], check=True)
    st = Store(tmp_path / "store")
    build_layer(st, None, tree, "hostile")
    return st.root


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file\n")
    return outside


def _check_refused(out: str) -> None:
    # chroot itself is allowed (installers use it): there is nothing above "/" to climb to.
    assert "WROTE" not in out, out
    for what in (
        "double chroot",
        "via /proc/1/root",
        "via /proc/self/root",
        "umount /",
        "remount /",
        "mknod disk",
        "mount tmpfs",
    ):
        assert f"{what}: refused" in out, out
    # host-wide kernel knobs are read-only inside
    assert "open core_pattern for writing: refused" in out


@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_double_chroot_escape_as_root_writes_nothing_outside(
    hostile_store: Path, tmp_path: Path
) -> None:
    outside = _outside(tmp_path)
    before = snapshot_tree(outside)
    canary = outside / "canary"
    proc = subprocess.run(
        cli("shell", "hostile", "--", "/escape", os.fspath(canary), store=hostile_store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _check_refused(proc.stdout)
    assert not canary.exists()
    assert snapshot_tree(outside) == before
    verify = subprocess.run(cli("verify", store=hostile_store), capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout


@pytest.mark.requires_user
def test_double_chroot_escape_as_ordinary_user_writes_nothing_outside(
    tmp_path: Path, user_tmp_path: Path
) -> None:
    require("tool:gcc")  # with libc6-dev's static libc.a
    src = tmp_path / "escape.c"
    src.write_text(ESCAPE_C)
    tree = busybox_tree(user_tmp_path / "tree")
    subprocess.run(["gcc", "-static", "-O1", "-o", tree / "escape", src], check=True)
    subprocess.run(["chown", "-R", f"{TEST_USER}:", os.fspath(user_tmp_path)], check=True)
    store = user_tmp_path / "store"
    made = run_as_user(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from treeutil import build_layer; "
            "from pytest_layers.store import Store; from pathlib import Path; "
            "build_layer(Store(Path(sys.argv[2])), None, Path(sys.argv[3]), 'hostile')",
            os.fspath(Path(__file__).parent),
            os.fspath(store),
            os.fspath(tree),
        ],
        env=PYTHONPATH,
    )
    assert made.returncode == 0, made.stderr
    outside = user_tmp_path / "outside"
    outside.mkdir()
    os.chown(outside, *_ids(TEST_USER))
    canary = outside / "canary"
    proc = run_as_user(
        cli("shell", "hostile", "--", "/escape", os.fspath(canary), store=store),
        env=PYTHONPATH,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _check_refused(proc.stdout)
    assert not canary.exists()


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _user_store(base: Path, files: dict[str, object] | None = None) -> Path:
    """A store owned by the test user holding ``bb`` (busybox plus ``files``)."""
    tree = busybox_tree(base / "tree", files)
    subprocess.run(["chown", "-R", f"{TEST_USER}:", os.fspath(base)], check=True)
    store = base / "store"
    made = run_as_user(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from treeutil import build_layer; "
            "from pytest_layers.store import Store; from pathlib import Path; "
            "build_layer(Store(Path(sys.argv[2])), None, Path(sys.argv[3]), 'bb')",
            os.fspath(Path(__file__).parent),
            os.fspath(store),
            os.fspath(tree),
        ],
        env=PYTHONPATH,
    )
    assert made.returncode == 0, made.stderr
    return store


def _shell(who: str, base: Path, files: dict[str, object], *args: str) -> str:
    """Run ``pytest-layers shell bb -- ARGS`` as ``who`` in a fresh store; its stdout."""
    if who == "user":
        proc = run_as_user(cli("shell", "bb", "--", *args, store=_user_store(base, files)))
    else:
        st = Store(base / "store")
        build_layer(st, None, busybox_tree(base / "tree", files), "bb")
        proc = subprocess.run(
            cli("shell", "bb", "--", *args, store=st.root),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(params=["self", "user"])
def who(request: pytest.FixtureRequest) -> str:
    """``self``: whoever runs the suite (root, or the test user in CI's second pass);
    ``user``: root switching to the test user."""
    require("overlay" if request.param == "self" else "user")
    return str(request.param)


def _base(who: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    if who == "user":
        return Path(request.getfixturevalue("user_tmp_path"))
    return tmp_path


def test_daemon_left_by_the_shell_dies_with_it(
    who: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    out = _shell(
        who,
        _base(who, tmp_path, request),
        {},
        "sh",
        "-c",
        "sleep 1000 </dev/null >/dev/null 2>&1 & readlink /proc/self/ns/pid",
    )
    pid_ns = out.strip()
    assert pid_ns.startswith("pid:[")
    assert pid_ns != os.readlink("/proc/self/ns/pid")
    assert processes_in(pid_ns) == []


def test_dev_and_proc_symlinked_to_host_dirs_stay_inside(
    who: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base = _base(who, tmp_path, request)
    outside = base / "outside"
    (outside / "dev").mkdir(parents=True)
    (outside / "proc").mkdir()
    (outside / "dev/keep").write_text("host\n")
    if who == "user":
        subprocess.run(["chown", "-R", f"{TEST_USER}:", os.fspath(outside)], check=True)
    before = snapshot_tree(outside)
    # Absolute links in an image resolve inside it: these name image paths, never host ones.
    out = _shell(
        who,
        base,
        {
            "dev": ("symlink", os.fspath(outside / "dev")),
            "proc": ("symlink", os.fspath(outside / "proc")),
        },
        "sh",
        "-c",
        "echo x > /dev/null && head -c 4 /dev/zero | wc -c && grep -c . /proc/self/status "
        ">/dev/null && ls /dev/null /proc/self/status",
    )
    assert out.splitlines() == ["4", "/dev/null", "/proc/self/status"]
    assert snapshot_tree(outside) == before


@pytest.mark.requires_root
@pytest.mark.requires_overlay
def test_sigkill_of_the_cli_ends_everything_inside(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    build_layer(st, None, busybox_tree(tmp_path / "tree"), "bb")
    script = "sleep 1000 </dev/null >/dev/null 2>&1 & readlink /proc/self/ns/pid; wait"
    proc = subprocess.Popen(
        cli("shell", "bb", "--", "sh", "-c", script, store=st.root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    pid_ns = proc.stdout.readline().strip()
    assert pid_ns.startswith("pid:["), proc.stderr.read() if proc.stderr else ""
    assert processes_in(pid_ns) != []
    kill(proc.pid, proc)
    # The kernel delivers the parent-death signals and empties the namespace asynchronously;
    # the deadline only guards against a hang.
    deadline = time.monotonic() + 60
    while processes_in(pid_ns) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert processes_in(pid_ns) == []
