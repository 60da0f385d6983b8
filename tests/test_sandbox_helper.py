"""The sandbox's fork helper (``_zygote``): sandboxes started by a small helper process instead
of a fork of the caller behave as the caller's own (status, kill, timeouts, nothing left), the
helper is left out of leak checks by exactly its pid and command line (what it started is
not), it dies with its caller, and a caller whose helper died runs sandboxes itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv
import pytest
from conftest import require
from treeutil import busybox_tree

from pytest_layers import _zygote, sandbox

pytestmark = pytest.mark.requires_tool("busybox")

MARK = "pytest-layers-helper-canary"


@pytest.fixture(autouse=True)
def _namespaces() -> None:
    if os.geteuid() != 0:
        require("userns")


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


def _descendants() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)]


def _pid_ns_of(proc: sandbox.SandboxProcess, read: int) -> str:
    with os.fdopen(read) as f:
        return f.readline().strip()


def _processes_in(pid_ns: str) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/pid") == pid_ns:
                found.append(proc.pid)
        except OSError:
            continue
    return found


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
    assert _processes_in(pid_ns) == []
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
