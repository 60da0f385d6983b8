"""The sandbox that runs image code (``pytest-layers shell``, later ``rootfs.run``), tried as an
attacker would: a hostile static binary in the image must not reach the host."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv
import pytest
from conftest import require
from treeutil import build_layer, busybox_tree, snapshot_tree

from pytest_layers import sandbox
from pytest_layers.errors import SandboxError
from pytest_layers.store import Store

pytestmark = pytest.mark.requires_tool("busybox")


@pytest.fixture(autouse=True)
def _namespaces() -> None:
    # The sandbox runs in a user namespace: an ordinary user needs them allowed.
    if os.geteuid() != 0:
        require("userns")


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
    from conftest import TEST_USER, run_as_user

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
        env={"PYTHONPATH": os.fspath(Path(sandbox.__file__).parent.parent)},
    )
    assert made.returncode == 0, made.stderr
    outside = user_tmp_path / "outside"
    outside.mkdir()
    os.chown(outside, *_ids(TEST_USER))
    canary = outside / "canary"
    proc = run_as_user(
        cli("shell", "hostile", "--", "/escape", os.fspath(canary), store=store),
        env={"PYTHONPATH": os.fspath(Path(sandbox.__file__).parent.parent)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    _check_refused(proc.stdout)
    assert not canary.exists()


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return busybox_tree(tmp_path / "image", {"etc/os-release": "ID=busybox\n"})


def run_captured(box: sandbox.Sandbox, script: str, tmp_path: Path) -> tuple[int, str]:
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        rc = box.run(["/bin/sh", "-c", script], stdout=f.fileno(), stderr=f.fileno())
    return rc, out.read_text()


def test_program_sees_the_image_and_only_itself(image: Path, tmp_path: Path) -> None:
    box = sandbox.Sandbox(image, hostname="inside")
    script = (
        "cat /etc/os-release; id -u; hostname; ls /proc | grep -c '^[0-9]'; "
        "tail -n +3 /proc/net/dev | cut -d: -f1; grep -E '^(CapBnd|CapEff|NoNewPrivs)' "
        "/proc/self/status; ls /dev; ls /sys 2>&1; cat /proc/self/mountinfo"
    )
    rc, out = run_captured(box, script, tmp_path)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[:3] == ["ID=busybox", "0", "inside"]
    # PID 1 (the sandbox's init), the shell, grep and ls: nothing of the host's.
    assert int(lines[3]) <= 4
    assert [name.strip() for name in lines[4:5]] == ["lo"]
    kept = sum(1 << cap for cap in sandbox.KEPT_CAPS)
    assert lines[5:8] == [f"CapEff:\t{kept:016x}", f"CapBnd:\t{kept:016x}", "NoNewPrivs:\t1"]
    dev = "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    assert lines[8:21] == dev.split()
    assert "No such file or directory" in lines[21]  # no /sys
    mounts = lines[22:]
    assert mounts[0].split()[3:5] == [os.fspath(image), "/"]
    assert {"nosuid", "nodev"} <= set(mounts[0].split()[5].split(","))
    assert not any(os.fspath(tmp_path) in line.split()[4] for line in mounts)


def test_exit_status_passes_through(image: Path, tmp_path: Path) -> None:
    box = sandbox.Sandbox(image)
    assert box.run(["/bin/sh", "-c", "exit 3"]) == 3
    assert box.run(["/bin/sh", "-c", "kill -9 $$"]) == -9
    # writes land in the root directory (the caller's view), nowhere else
    assert box.run(["/bin/sh", "-c", "echo hi > /etc/x"]) == 0
    assert (image / "etc/x").read_text() == "hi\n"


def test_program_missing_from_the_image_is_one_line(image: Path) -> None:
    with pytest.raises(SandboxError) as info:
        sandbox.Sandbox(image).run(["nope", "arg"])
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == f"nope: not found in the image (PATH={sandbox.DEFAULT_PATH})"
    assert psutil.Process().children() == []


def _processes_in(pid_ns: str) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/pid") == pid_ns:
                found.append(proc.pid)
        except OSError:
            continue
    return found


def _mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" ", 1)[1] for line in f)


def test_nothing_outlives_the_program(image: Path, tmp_path: Path) -> None:
    mounts = _mountinfo()
    # A daemon the program leaves behind dies with the sandbox's PID namespace.
    rc, out = run_captured(
        sandbox.Sandbox(image),
        "sleep 1000 </dev/null >/dev/null 2>&1 & readlink /proc/self/ns/pid",
        tmp_path,
    )
    assert rc == 0, out
    pid_ns = out.strip()
    assert pid_ns.startswith("pid:[")
    assert pid_ns != os.readlink("/proc/self/ns/pid")
    assert _processes_in(pid_ns) == []
    assert psutil.Process().children() == []
    assert _mountinfo() == mounts


def test_kill_ends_every_process_inside(image: Path) -> None:
    read, write = os.pipe()
    proc = sandbox.Sandbox(image).spawn(
        ["/bin/sh", "-c", "sleep 1000 & readlink /proc/self/ns/pid; wait"], stdout=write
    )
    os.close(write)
    with os.fdopen(read) as f:
        pid_ns = f.readline().strip()
        proc.kill()
        assert proc.wait() == -9
    assert pid_ns.startswith("pid:[")
    assert _processes_in(pid_ns) == []
    assert psutil.Process().children() == []


def test_binds_are_read_only_and_land_inside(image: Path, tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "f").write_text("from host\n")
    # The image points /opt outside with an absolute symlink: it resolves inside the image.
    os.symlink("/../../../../../..", image / "opt")
    box = sandbox.Sandbox(image, binds=[sandbox.Bind(host, "/opt/data")])
    rc, out = run_captured(box, "cat /data/f; touch /data/g", tmp_path)
    assert rc != 0
    assert out.splitlines()[0] == "from host"
    assert "Read-only file system" in out
    assert sorted(os.listdir(host)) == ["f"]
    assert (image / "data").is_dir()
