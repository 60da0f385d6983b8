"""The sandbox's fork helper (``_zygote``): sandboxes started by a small helper process instead
of a fork of the caller behave as the caller's own (status, kill, timeouts, nothing left), the
helper is left out of leak checks by exactly its pid and command line (what it started is
not), it dies with its caller, and a caller whose helper died runs sandboxes itself."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv
import pytest
from conftest import require
from faults_util import processes_in
from treeutil import busybox_tree

from pytest_layers import _zygote, sandbox

pytestmark = pytest.mark.requires_tool("busybox")

MARK = "pytest-layers-helper-canary"


@pytest.fixture(autouse=True)
def _namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        require("userns")
    # The fork helper serves the Python init; the compiled init needs no helper.
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "python")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return busybox_tree(tmp_path / "image")


@pytest.fixture
def helper() -> Iterator[_zygote.Helper]:
    """A fresh, ready helper of this process (stopped afterwards)."""
    _zygote.stop()
    got = _zygote.get(sandbox._identity, wait=60)
    assert got is not None, _zygote._helper and _zygote._helper.why
    yield got
    _zygote.stop()


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _descendants_before() -> None:
    # A session fixture may own a child for the whole run (the registry tests' server): none
    # of the helper's business. Taken before the ``helper`` fixture starts a fresh helper.
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))


def _descendants() -> list[int]:
    """This process's descendants started since the test began."""
    return [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in _BEFORE]


def _pid_ns_of(proc: sandbox.SandboxProcess, read: int) -> str:
    with os.fdopen(read) as f:
        return f.readline().strip()


def test_runs_go_through_the_helper_and_behave_the_same(
    image: Path, helper: _zygote.Helper
) -> None:
    box = sandbox.Sandbox(image)
    served = helper.served
    assert box.run(["/bin/sh", "-c", "exit 3"]) == 3
    assert box.run(["/bin/sh", "-c", "kill -9 $$"]) == -9
    assert helper.served == served + 2
    read, write = os.pipe()
    proc = box.spawn(
        ["/bin/sh", "-c", "sleep 1000 & readlink /proc/self/ns/pid; wait"], stdout=write
    )
    os.close(write)
    pid_ns = _pid_ns_of(proc, read)
    # Init is PID 1 of its namespace and the helper's child, not ours.
    assert psutil.Process(proc.pid).ppid() == helper.pid
    assert _zygote.is_helper(helper.pid)
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.kill()
    assert proc.wait() == -9
    assert processes_in(pid_ns) == []
    assert [p for p in _descendants() if p != helper.pid] == []


def test_a_program_missing_from_the_image_is_the_same_error(
    image: Path, helper: _zygote.Helper
) -> None:
    with pytest.raises(sandbox.SandboxError) as info:
        sandbox.Sandbox(image).run(["nope"])
    assert str(info.value) == f"nope: not found in the image (PATH={sandbox.DEFAULT_PATH})"
    assert [p for p in _descendants() if p != helper.pid] == []


def test_leak_checks_leave_out_exactly_the_helper(image: Path, helper: _zygote.Helper) -> None:
    # What the helper runs is still a descendant of ours: a leak under it is seen.
    proc = sandbox.Sandbox(image).spawn(["/bin/sleep", "1000"])
    assert proc.pid in _descendants()
    assert not _zygote.is_helper(proc.pid)
    assert not _zygote.is_helper(os.getpid())
    # Another process's helper is not ours (its tag names its own parent).
    assert not _zygote.is_helper(helper.pid, parent=proc.pid)
    proc.kill()
    assert proc.wait() == -9
    assert _descendants() == [helper.pid]


def test_a_threaded_caller_uses_the_helper(image: Path, helper: _zygote.Helper) -> None:
    results: list[int] = []
    served = helper.served
    thread = threading.Thread(
        target=lambda: results.append(sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 4"]))
    )
    thread.start()
    thread.join()
    assert results == [4]
    assert helper.served == served + 1


def test_without_the_helper_the_caller_forks_init(image: Path, helper: _zygote.Helper) -> None:
    served = helper.served
    proc = sandbox.Sandbox(image, helper=False).spawn(["/bin/sleep", "1000"])
    assert psutil.Process(proc.pid).ppid() == os.getpid()
    proc.kill()
    assert proc.wait() == -9
    assert helper.served == served


def test_a_dead_helper_leaves_runs_to_the_caller(image: Path, helper: _zygote.Helper) -> None:
    box = sandbox.Sandbox(image)
    running = box.spawn(["/bin/sleep", "1000"])
    os.kill(helper.pid, signal.SIGKILL)
    # Its sandboxes die with it (PR_SET_PDEATHSIG), and say so as a kill.
    assert running.wait(timeout=30) == -9
    assert box.run(["/bin/sh", "-c", "exit 5"]) == 5  # run by the caller itself now
    assert _zygote.running() is None
    assert helper.state == "broken"
    assert _descendants() == []


def test_the_helper_dies_with_its_caller(image: Path, tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from pytest_layers import _zygote, sandbox\n"
        "assert _zygote.get(sandbox._identity, wait=60) is not None\n"
        "box = sandbox.Sandbox(sys.argv[1])\n"
        f"p = box.spawn(['/bin/sh', '-c', 'sleep 1000; : {MARK}'])\n"
        "print(_zygote.running(), p.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    caller = subprocess.Popen(
        [sys.executable, "-c", code, os.fspath(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert caller.stdout is not None
        helper_pid, init = (int(n) for n in caller.stdout.readline().split())
        helper = psutil.Process(helper_pid)
        assert _zygote.is_helper(helper_pid, parent=caller.pid)
        inside = [helper, psutil.Process(init), *psutil.Process(init).children(recursive=True)]
        assert any(MARK in " ".join(p.cmdline()) for p in inside)
    finally:
        caller.kill()
        caller.wait()
        for f in (caller.stdin, caller.stdout):
            if f is not None:
                f.close()
    _, alive = psutil.wait_procs(inside, timeout=30)
    assert alive == []


def test_an_interrupted_request_ends_the_helper(
    image: Path, helper: _zygote.Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ^C after the request went out: its answer would be read as the next request's, so the
    # helper is ended (with what it started for it) and the caller goes on without it.
    def interrupted(*args: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(_zygote.socket, "recv_fds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sandbox.Sandbox(image).spawn(["/bin/sleep", "1000"])
    monkeypatch.undo()
    assert helper.state == "broken"
    assert not psutil.pid_exists(helper.pid)
    assert sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 6"]) == 6
    assert _descendants() == []


def test_requests_the_helper_cannot_carry_run_in_the_caller(
    image: Path, helper: _zygote.Helper
) -> None:
    # Not plain data (a str subclass, which marshal refuses) or larger than a message: the
    # caller's own fork runs it, and the helper stays for the next run.
    class Text(str):
        pass

    served = helper.served
    assert sandbox.Sandbox(image).run(["/bin/echo"], env={"PATH": Text("/bin")}) == 0
    huge = {f"X{i}": "x" * 100_000 for i in range(8)}  # 800 kB: more than a socket buffer
    assert sandbox.Sandbox(image).run(["/bin/echo"], env=huge) == 0
    assert helper.served == served
    assert sandbox.Sandbox(image).run(["/bin/echo"]) == 0
    assert helper.served == served + 1
    assert helper.state == "ready"


# What a program inside may reach of the processes that started it: its init holds only the
# program's stdio and its status pipe (no socket of the helper's, no fd of the caller's, no
# other sandbox's pipes), and nothing inside can take init's fds or ptrace it. The same on the
# three ways init starts: from the helper, forked by the caller itself, under a keeper.
_PATHS = ("helper", "direct", "keeper")


@pytest.fixture(params=_PATHS)
def started_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How init starts (the helper's is ready; the keeper's has clone3 refused)."""
    path = request.param
    if path == "helper":
        request.getfixturevalue("helper")
    elif path == "keeper":

        def refused(flags: int) -> int:
            raise OSError(errno.ENOSYS, "clone3 filtered")

        monkeypatch.setattr(sandbox._linux, "fork_into_namespaces", refused)
    return path


def _box(path: str, root: Path, **kwargs: object) -> sandbox.Sandbox:
    return sandbox.Sandbox(root, helper=path == "helper", **kwargs)  # type: ignore[arg-type]


def _init_of(proc: sandbox.SandboxProcess, path: str) -> int:
    if path == "keeper":
        (init,) = psutil.Process(proc.pid).children()
        return int(init.pid)
    return proc.pid


def _fd_links(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def _pipe_name(fd: int) -> str:
    return f"pipe:[{os.fstat(fd).st_ino}]"


def test_init_holds_only_the_programs_fds(image: Path, tmp_path: Path, started_by: str) -> None:
    # A file of the caller's (as pytest's own), not inheritable: a fork copies it all the same.
    secret = os.open(tmp_path / "secret", os.O_CREAT | os.O_RDWR, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = _box(started_by, image).spawn(
            ["/bin/sh", "-c", "readlink /proc/1/fd/* || echo refused; echo ready; sleep 1000"],
            stdin=null,
            stdout=out_w,
            stderr=err_w,
        )
        os.close(out_w)
        os.close(err_w)
        try:
            # The program cannot see what init's fds are (init is not dumpable).
            with os.fdopen(os.dup(out_r)) as lines:
                assert [lines.readline(), lines.readline()] == ["refused\n", "ready\n"]
            init = _init_of(proc, started_by)
            expected = {os.readlink(f"/proc/self/fd/{null}"), _pipe_name(out_r)}
            expected |= {_pipe_name(err_r), _pipe_name(proc._status_fd)}
            if os.geteuid() == 0:  # CAP_SYS_PTRACE reads an undumpable process's fds
                assert set(_fd_links(init)) <= expected
                assert _pipe_name(proc._status_fd) in _fd_links(init)
            else:
                with pytest.raises(PermissionError):
                    os.listdir(f"/proc/{init}/fd")
            if started_by == "keeper":  # outside the PID namespace, but a fork of ours
                assert set(_fd_links(proc.pid)) <= expected
        finally:
            proc.kill()
            proc.wait()
    finally:
        for fd in (secret, null, out_r, err_r):
            os.close(fd)


_GRAB = r"""
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
number = {"x86_64": 438, "aarch64": 438}[platform.machine()]
pidfd = os.pidfd_open(1)
got = []
for fd in range(256):
    if libc.syscall(number, pidfd, fd, 0) >= 0:
        got.append(fd)
    elif ctypes.get_errno() not in (1, 9):  # EPERM (not dumpable), EBADF
        got.append(-ctypes.get_errno())
print(got)
"""


def test_the_program_cannot_take_inits_fds(tmp_path: Path, started_by: str) -> None:
    # The host's Python, its /usr bound in (merged /usr: /lib and /lib64 are links into it).
    root = busybox_tree(
        tmp_path / "image",
        {"lib": ("symlink", "usr/lib"), "lib64": ("symlink", "usr/lib64"), "usr": None},
    )
    if not Path("/usr/bin/python3").exists() or not Path("/lib").is_symlink():
        pytest.skip("needs the host's /usr/bin/python3 and a merged /usr to run it inside")
    box = _box(started_by, root, binds=[sandbox.Bind(Path("/usr"), "/usr")])
    out = tmp_path / "out"
    with open(out, "wb") as f:
        code = box.run(["/usr/bin/python3", "-c", _GRAB], stdout=f.fileno(), stderr=f.fileno())
    assert (code, out.read_text()) == (0, "[]\n")


def test_a_sandbox_ends_while_a_later_one_runs(image: Path, helper: _zygote.Helper) -> None:
    # The later sandbox's init must not hold the earlier one's done pipe: the earlier one's
    # end would not be seen until the later one ends too. (A hang check, not a speed target.)
    box = sandbox.Sandbox(image)
    first = box.spawn(["/bin/sleep", "1"])
    later = box.spawn(["/bin/sleep", "1000"])
    try:
        started = time.monotonic()
        assert first.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert later.poll() is None
    finally:
        later.kill()
        later.wait()


def test_relative_bind_sources_are_the_callers(
    image: Path, tmp_path: Path, started_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The helper started in another cwd (and stays in "/"): a relative source is the caller's.
    for name in ("a", "b"):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "data" / "which").write_text(name)
    monkeypatch.chdir(tmp_path / "b")
    box = _box(started_by, image, binds=[sandbox.Bind(Path("data"), "/data")])
    read, write = os.pipe()
    try:
        assert box.run(["/bin/cat", "/data/which"], stdout=write) == 0
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as f:
        assert f.read() == b"b"


def test_the_program_gets_the_callers_umask_and_limits(image: Path, started_by: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    mask = os.umask(0o027)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
    read, write = os.pipe()
    try:
        script = "umask; ulimit -n; ulimit -c"
        assert _box(started_by, image).run(["/bin/sh", "-c", script], stdout=write) == 0
    finally:
        os.close(write)
        os.umask(mask)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_CORE, core)
    with os.fdopen(read) as f:
        assert f.read().split() == ["0027", "200", "0"]


def test_the_helper_holds_no_cwd_and_no_stdin_of_the_callers(helper: _zygote.Helper) -> None:
    # Its cwd would keep the caller's directory busy (a mount point the caller wants to
    # unmount); its socket is not its fd 0, which every fork of it would start with.
    assert os.readlink(f"/proc/{helper.pid}/cwd") == "/"
    assert os.readlink(f"/proc/{helper.pid}/fd/0") == os.devnull


def test_a_request_without_its_fds_is_refused_and_the_helper_goes_on(
    image: Path, helper: _zygote.Helper
) -> None:
    answer, got = helper.request(("not", "a", "request"), [])
    assert got == []
    assert answer == (errno.EIO, "0 fds with the request, not 6")
    served = helper.served
    assert sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 7"]) == 7
    assert helper.served == served + 1


def _open_fds() -> set[int]:
    found = set()
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


def test_an_answer_cut_short_ends_the_helper_and_leaks_nothing(
    image: Path, helper: _zygote.Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer's pidfd did not arrive (MSG_CTRUNC: the caller ran out of fds): the sandbox it
    # started cannot be signalled from here, so ending the helper ends it, and the caller runs
    # the program itself.
    real = _zygote.socket.recv_fds

    def truncated(*args: object) -> object:
        raw, fds, flags, addr = real(*args)  # type: ignore[arg-type]
        for fd in fds:
            os.close(fd)
        return raw, [], flags | _zygote.socket.MSG_CTRUNC, addr

    monkeypatch.setattr(_zygote.socket, "recv_fds", truncated)
    before = _open_fds() - {helper._sock.fileno()}
    assert sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 8"]) == 8
    assert _open_fds() == before
    assert helper.state == "broken"
    assert "MSG_CTRUNC" in helper.why
    assert not psutil.pid_exists(helper.pid)
    assert _descendants() == []
