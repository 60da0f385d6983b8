"""The sandbox that runs image code (``pytest-layers shell``, later ``rootfs.run``): what the
program sees, its exit status, and that nothing outlives it. The attacks through the CLI are in
``test_faults_sandbox.py``."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv
import pytest
from conftest import require
from faults_util import processes_in
from treeutil import busybox_tree

from pytest_layers import _zygote, sandbox
from pytest_layers.errors import SandboxError

pytestmark = pytest.mark.requires_tool("busybox")


@pytest.fixture(autouse=True)
def _namespaces() -> None:
    # The sandbox runs in a user namespace: an ordinary user needs them allowed.
    if os.geteuid() != 0:
        require("userns")


_CHILDREN_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before() -> None:
    _CHILDREN_BEFORE.clear()
    _CHILDREN_BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))
    _CHILDREN_BEFORE.discard(_zygote.running() or 0)  # its children are counted, it is not


def new_children() -> list[int]:
    """This process's descendants started since the test began: a session fixture may own one
    (the registry server of the registry tests), which is none of the sandbox's business; nor
    is the sandbox's fork helper, left out by its pid and its command line. What the helper
    started is counted (a sandbox's init is its child)."""
    helper = _zygote.running()
    if helper is not None:
        assert _zygote.is_helper(helper)
    return [
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.pid not in _CHILDREN_BEFORE and p.pid != helper
    ]


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
    assert new_children() == []


@pytest.mark.parametrize(
    ("user", "bad"),
    [
        ((4294967295, 4294967295), "uid 4294967295"),
        ((0, 4294967295), "gid 4294967295"),
        ((-1, 0), "uid -1"),
    ],
)
def test_a_user_id_the_kernel_reads_as_unchanged_is_refused(
    image: Path, user: tuple[int, int], bad: str
) -> None:
    # setresuid(-1, ...) leaves the id as it is: the program would silently stay uid 0.
    with pytest.raises(SandboxError) as info:
        sandbox.Sandbox(image).spawn(["/bin/id"], user=user)
    assert info.value.errno == errno.EINVAL
    assert str(info.value) == (
        f"user={user!r}: {bad} is not an id from 0 to 4294967294 "
        "(4294967295 means 'unchanged' to the kernel)"
    )
    assert new_children() == []


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
    assert processes_in(pid_ns) == []
    assert new_children() == []
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
    assert processes_in(pid_ns) == []
    assert new_children() == []


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


def _bind_options(box: sandbox.Sandbox, target: str, tmp_path: Path) -> list[set[str]]:
    """The per-mount options of every mount at or below ``target`` inside, from mountinfo."""
    rc, out = run_captured(box, "cat /proc/self/mountinfo", tmp_path)
    assert rc == 0, out
    return [
        set(fields[5].split(","))
        for fields in (line.split() for line in out.splitlines())
        if fields[4] == target or fields[4].startswith(target + "/")
    ]


def test_a_bind_and_the_mounts_below_it_get_their_flags(image: Path, tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "sub").mkdir(parents=True)
    below = os.geteuid() == 0
    if below:  # a mount below the source: the bind is recursive, and so are its flags
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.fspath(host / "sub")], check=True)
    try:
        ro = sandbox.Sandbox(image, binds=[sandbox.Bind(host, "/data")])
        rw = sandbox.Sandbox(image, binds=[sandbox.Bind(host, "/data", readonly=False)])
        for box, mode in ((ro, "ro"), (rw, "rw")):
            options = _bind_options(box, "/data", tmp_path)
            assert len(options) == (2 if below else 1)
            for found in options:
                assert {mode, "nosuid", "nodev"} <= found
    finally:
        if below:
            subprocess.run(["umount", os.fspath(host / "sub")], check=True)


SWAPPER = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    for (;;)
        if (syscall(SYS_renameat2, AT_FDCWD, "/m", AT_FDCWD, "/evil", 2 /* EXCHANGE */) < 0)
            return 1;
}
"""


def test_a_read_only_bind_stays_read_only_while_another_sandbox_swaps_its_path(
    image: Path, tmp_path: Path
) -> None:
    # A program in another sandbox on the same view exchanges /m (holding the bind's target)
    # with /evil (whose "data" points at /proc) as fast as it can. Were the target resolved
    # twice (bind, then its read-only flag), the flag would at times land on /proc and the host
    # directory stay bound read-write.
    require("cc")
    cc = os.environ.get("CC", "").split() or ["cc"]
    source = tmp_path / "swapper.c"
    source.write_text(SWAPPER)
    built = subprocess.run(
        [*cc, "-static", "-O2", "-o", os.fspath(image / "bin/swapper"), os.fspath(source)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot link a static program (libc's static archive?): {built.stderr}")
    (image / "m/data").mkdir(parents=True)
    (image / "evil").mkdir()
    os.symlink("/proc", image / "evil/data")
    host = tmp_path / "host"
    host.mkdir()
    swapper = sandbox.Sandbox(image).spawn(["/bin/swapper"])
    box = sandbox.Sandbox(image, binds=[sandbox.Bind(host, "/m/data")])
    script = "for p in /m/data /evil/data; do echo x > $p/pwned; done 2>/dev/null; true"
    try:
        for _ in range(200):
            # The swap may break the setup (a path gone for a moment): no harm in that.
            with contextlib.suppress(SandboxError):
                box.run(["/bin/sh", "-c", script])
            assert os.listdir(host) == []
            assert swapper.poll() is None  # still swapping
    finally:
        swapper.kill()
        swapper.wait()
    assert new_children() == []


def _nspids(pid: int) -> list[str]:
    """``pid``'s pid in each PID namespace it is in, outermost first."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return line.split()[1:]
    raise AssertionError(f"no NSpid line for {pid}")


def test_a_single_threaded_caller_starts_init_itself(image: Path) -> None:
    # One fork of the (large) caller, not two: the handle's pid is the sandbox's PID 1,
    # started straight into its namespaces, and killing it ends everything inside.
    assert threading.active_count() == 1
    read, write = os.pipe()
    proc = sandbox.Sandbox(image, helper=False).spawn(
        ["/bin/sh", "-c", "sleep 1000 & readlink /proc/self/ns/pid; wait"], stdout=write
    )
    os.close(write)
    with os.fdopen(read) as f:
        pid_ns = f.readline().strip()
        assert _nspids(proc.pid)[1:] == ["1"]
        # Init is not dumpable (its ns links need CAP_SYS_PTRACE): its child's say where it is.
        (program,) = psutil.Process(proc.pid).children()
        assert os.readlink(f"/proc/{program.pid}/ns/pid") == pid_ns
        proc.kill()
        assert proc.wait() == -9
    assert processes_in(pid_ns) == []
    assert new_children() == []


def test_a_threaded_caller_gets_a_keeper_and_the_same_results(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "python")  # the compiled init needs no keeper
    # With other threads, only fork() (glibc's handlers) makes a safe child: a keeper outside
    # starts init, and everything behaves the same. (Without the fork helper, which is what
    # a threaded caller uses once it runs.)
    image_box = sandbox.Sandbox(image, helper=False)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        read, write = os.pipe()
        proc = image_box.spawn(
            ["/bin/sh", "-c", "sleep 1000 & readlink /proc/self/ns/pid; wait"], stdout=write
        )
        os.close(write)
        with os.fdopen(read) as f:
            pid_ns = f.readline().strip()
            assert len(_nspids(proc.pid)) == 1  # the keeper, in our PID namespace
            proc.kill()
            assert proc.wait() == -9
        assert processes_in(pid_ns) == []
        assert image_box.run(["/bin/sh", "-c", "exit 3"]) == 3
        rc, out = run_captured(image_box, "id -u; ls /proc | grep -c '^[0-9]'", tmp_path)
        assert rc == 0, out
        assert out.split()[0] == "0"
        assert int(out.split()[1]) <= 4
    finally:
        stop.set()
        thread.join()
    assert new_children() == []


def test_the_callers_fork_hooks_do_not_run_for_a_direct_start(image: Path) -> None:
    # Init runs only the sandbox's own code, then execs or exits: the hooks the caller's
    # libraries registered for children that go on running the caller's code (and the page
    # faults they cost) are skipped. In a fresh interpreter: a hook cannot be unregistered.
    code = (
        "import os, sys\n"
        "from pytest_layers.sandbox import Sandbox\n"
        "calls = []\n"
        "os.register_at_fork(before=lambda: calls.append('before'),\n"
        "    after_in_parent=lambda: calls.append('parent'),\n"
        "    after_in_child=lambda: os.write(2, b'child hook ran'))\n"
        "assert Sandbox(sys.argv[1], helper=False).run(['/bin/sh', '-c', 'exit 0']) == 0\n"
        "print(calls)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, os.fspath(image)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n"
    assert "child hook ran" not in proc.stderr


def test_without_clone3_the_keeper_starts_init(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "python")  # the Python init's own fallback

    # Docker's default seccomp profile answers ENOSYS to clone3 (older ones EPERM), so that
    # glibc falls back to clone: the sandbox falls back to its keeper the same way.
    def refused(flags: int) -> int:
        raise OSError(errno.ENOSYS, "clone3 filtered")

    monkeypatch.setattr(sandbox._linux, "fork_into_namespaces", refused)
    read, write = os.pipe()
    proc = sandbox.Sandbox(image, helper=False).spawn(
        ["/bin/sh", "-c", "readlink /proc/self/ns/pid; sleep 1000"], stdout=write
    )
    os.close(write)
    with os.fdopen(read) as f:
        pid_ns = f.readline().strip()
        assert len(_nspids(proc.pid)) == 1  # the keeper, in our PID namespace
        proc.kill()
        assert proc.wait() == -9
    assert pid_ns.startswith("pid:[")
    assert processes_in(pid_ns) == []
    assert new_children() == []
