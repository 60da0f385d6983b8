"""The sandbox's compiled init (``_init/init.c``, built by ``_cinit``): used in ``auto`` where a
compiler exists, the reasons it falls back, its cache refused when not private and rebuilt when
damaged, and nothing left when its caller is killed or interrupted while it starts.

(Every other sandbox test runs with whichever init ``PYTEST_LAYERS_INIT`` picks: CI runs them
under both.)"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv
import pytest
from conftest import require
from plugin_util import BASE_CONFTEST, BASE_TESTS
from treeutil import busybox_tree

from pytest_layers import _cinit, _faultpoints, _zygote, sandbox
from pytest_layers.errors import SandboxError

pytestmark = pytest.mark.requires_tool("busybox")


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test decides the init afresh (the choice is made once per process), in auto."""
    if os.geteuid() != 0:
        require("userns")
    monkeypatch.delenv("PYTEST_LAYERS_INIT", raising=False)
    monkeypatch.setattr(_cinit, "_choice", None)
    yield
    _cinit._choice = None


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return busybox_tree(tmp_path / "image")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root of this test's own (XDG_CACHE_HOME)."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", os.fspath(root))
    return root


#: The children this process had when the test began (a session fixture's server, say).
_EXISTING: set[int] = set()


@pytest.fixture(autouse=True)
def _existing_children() -> None:
    _EXISTING.clear()
    _EXISTING.update(p.pid for p in psutil.Process().children(recursive=True))


def _leftovers() -> list[psutil.Process]:
    # The Python init's fork helper (started by a test that fell back to it) lives on.
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if not _zygote.is_helper(p.pid) and p.pid not in _EXISTING
    ]


def test_auto_uses_the_compiled_init_where_a_compiler_exists(image: Path, cache: Path) -> None:
    require("cc")
    choice = _cinit.choose()
    assert choice.binary is not None, choice.reason
    assert Path(choice.binary).parent == cache / "pytest-layers" / "init"
    assert _cinit.describe() == f"init: compiled ({choice.binary})"
    read, write = os.pipe()
    proc = sandbox.Sandbox(image).spawn(["/bin/sh", "-c", "echo up; exec sleep 1000"], stdout=write)
    os.close(write)
    try:
        with os.fdopen(read) as f:
            assert f.readline() == "up\n"
        # Init is the compiled binary (not a fork of this interpreter), and our own child.
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == os.fsencode(choice.binary)
        assert psutil.Process(proc.pid).ppid() == os.getpid()
    finally:
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
    assert _leftovers() == []


def test_the_compiled_init_reports_failures_as_the_python_one(image: Path, cache: Path) -> None:
    require("cc")
    assert _cinit.choose().binary is not None
    box = sandbox.Sandbox(image)
    with pytest.raises(SandboxError, match=r"^/nope: not found in the image \(PATH=") as exc:
        box.run(["/nope"])
    assert exc.value.errno == 2
    with pytest.raises(SandboxError, match=r"cwd '/missing' inside the image: No such file"):
        box.run(["/bin/sh"], cwd="/missing")
    assert box.run(["/bin/sh", "-c", "exit 7"]) == 7
    assert _leftovers() == []


def test_python_mode_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "python")
    assert _cinit.choose().binary is None
    assert _cinit.describe() == "init: python (PYTEST_LAYERS_INIT=python)"


def test_a_bad_mode_is_named(monkeypatch: pytest.MonkeyPatch, image: Path) -> None:
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "fast")
    with pytest.raises(SandboxError, match="PYTEST_LAYERS_INIT='fast': use one of auto"):
        sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 0"])


def test_without_a_compiler_auto_falls_back_and_compiled_refuses(
    monkeypatch: pytest.MonkeyPatch, image: Path, cache: Path
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert _cinit.describe() == "init: python (no compiler: CC='/nonexistent/cc' is not found)"
    assert sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 3"]) == 3  # by the Python init
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "compiled")
    with pytest.raises(SandboxError, match="PYTEST_LAYERS_INIT=compiled: no compiler"):
        sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 3"])


def test_a_cache_writable_by_others_is_refused(cache: Path) -> None:
    require("cc")
    (cache / "pytest-layers").mkdir(mode=0o700)
    os.chmod(cache / "pytest-layers", 0o777)
    choice = _cinit.choose()
    assert choice.binary is None
    assert choice.reason == (
        f"refusing the init's cache: {cache / 'pytest-layers'} is writable by others "
        "(mode 777); chmod go-w it"
    )
    assert list((cache / "pytest-layers").iterdir()) == []  # nothing built there


@pytest.mark.requires_root
def test_a_cache_of_another_user_is_refused(cache: Path) -> None:
    require("cc")
    os.chown(cache, 65534, 65534)
    choice = _cinit.choose()
    assert choice.binary is None
    assert f"refusing the init's cache: {cache} belongs to uid 65534, not to you" in choice.reason


def test_a_damaged_cached_binary_is_rebuilt(cache: Path) -> None:
    require("cc")
    first = _cinit.choose().binary
    assert first is not None
    Path(first).write_bytes(b"\x7fELF truncated")
    os.chmod(first, 0o700)
    _cinit._choice = None
    again = _cinit.choose()
    assert again.binary == first
    assert Path(first).stat().st_size > 1000
    assert [p.name for p in Path(first).parent.iterdir()] == [Path(first).name]  # no temp left


@pytest.mark.parametrize("filtered", ["before the choice", "after the choice"])
def test_a_refused_clone3_falls_back_and_says_why(image: Path, cache: Path, filtered: str) -> None:
    # Docker's default seccomp profile answers ENOSYS to clone3: the compiled init cannot start
    # anything there, the Python init (through its keeper) can. Found by the trial when the
    # init is chosen, or by the first start when a filter came later.
    require("cc")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-seccomp is not installed (apt-get install python3-seccomp)")
    code = (
        "import errno, os, sys\n"
        "sys.path.insert(0, '/usr/lib/python3/dist-packages')\n"
        "import seccomp\n"
        "from pytest_layers import _cinit\n"
        "if sys.argv[2] == 'after the choice':\n"
        "    assert _cinit.choose().binary is not None\n"
        "f = seccomp.SyscallFilter(seccomp.ALLOW)\n"
        "f.add_rule(seccomp.ERRNO(errno.ENOSYS), 'clone3')\n"
        "f.load()\n"
        "from pytest_layers import _cinit, sandbox\n"
        "rc = sandbox.Sandbox(sys.argv[1]).run(['/bin/sh', '-c', 'exit 5'])\n"
        "print(rc, _cinit.describe())\n"
        "os.environ['PYTEST_LAYERS_INIT'] = 'compiled'\n"
        "try:\n"
        "    sandbox.Sandbox(sys.argv[1]).run(['/bin/sh', '-c', 'exit 5'])\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, os.fspath(image), filtered],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    why = "the compiled init cannot start here: clone3: Function not implemented"
    assert lines == [f"5 init: python ({why})", f"PYTEST_LAYERS_INIT=compiled: {why}"]


CALLER = """
import os, sys, time
from pytest_layers import _cinit, sandbox
assert _cinit.choose().binary is not None, _cinit.choose().reason
read, write = os.pipe()
proc = sandbox.Sandbox(sys.argv[1]).spawn(
    ["/bin/sh", "-c", "sleep 1000 & sleep 1000 & echo up; wait"], stdout=write)
os.close(write)
with os.fdopen(read) as f:
    assert f.readline() == "up\\n"
print(proc.pid, flush=True)
time.sleep(1000)
"""


def test_a_killed_caller_leaves_no_process(image: Path, cache: Path) -> None:
    require("cc")
    with _caller(CALLER, os.fspath(image)) as init:
        inside = [init, *(p.pid for p in psutil.Process(init).children(recursive=True))]
        assert len(inside) >= 4  # init, sh and two sleeps
    # Init dies with its caller (and the kernel ends its PID namespace with it): wait until
    # the kernel got there, then none of them may be left.
    _assert_all_gone(inside)


# sandbox-spawned: right after posix_spawn, before the child's fd ends are closed here.
@pytest.mark.parametrize("where", ["sandbox-spawned", "sandbox-starter"])
def test_an_interrupt_while_init_starts_leaves_nothing(
    image: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    require("cc")
    assert _cinit.choose().binary is not None

    def interrupt(point: str, detail: str) -> None:
        if point == where:
            raise KeyboardInterrupt

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(_faultpoints, "hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sandbox.Sandbox(image).run(["/bin/sh", "-c", "sleep 1000"])
    # No child left, not even a zombie (psutil lists those too), and no fd.
    assert _leftovers() == []
    assert len(os.listdir("/proc/self/fd")) == fds
    monkeypatch.setattr(_faultpoints, "hook", None)
    assert sandbox.Sandbox(image).run(["/bin/sh", "-c", "exit 4"]) == 4


def test_the_header_and_doctor_name_the_init(
    pytester: pytest.Pytester, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("cc")
    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(test_r=BASE_TESTS)
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines([f"layers: init: compiled ({cache}/pytest-layers/init/init-*)"])
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "python")
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["layers: init: python (PYTEST_LAYERS_INIT=python)"])
    doctor = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_layers.cli",
            "--store",
            os.fspath(pytester.path / "s"),
            "doctor",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "sandbox init: python (PYTEST_LAYERS_INIT=python)" in doctor.stdout, doctor.stderr


def test_the_cached_binary_is_private(cache: Path) -> None:
    require("cc")
    binary = _cinit.choose().binary
    assert binary is not None
    st = os.stat(binary)
    assert st.st_uid == os.geteuid()
    assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    for directory in (cache / "pytest-layers", cache / "pytest-layers" / "init"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_stdio_from_the_numbers_the_starter_uses_arrives(image: Path, cache: Path) -> None:
    # The starter's own fds sit at 3-8: a caller's stdio fd at one of those numbers must still
    # reach the program (each fd goes through a copy above them, never dup2 onto itself).
    require("cc")
    assert _cinit.choose().binary is not None
    read, write = os.pipe()
    saved = [os.dup(fd) if _open(fd) else -1 for fd in (4, 5)]
    try:
        os.dup2(write, 4)
        os.dup2(write, 5)
        os.close(write)
        box = sandbox.Sandbox(image)
        rc = box.run(
            ["/bin/sh", "-c", "echo out; echo err >&2; ls /proc/self/fd"], stdout=4, stderr=5
        )
    finally:
        for fd, copy in zip((4, 5), saved, strict=True):
            if copy >= 0:
                os.dup2(copy, fd)
                os.close(copy)
            else:
                os.close(fd)
    with os.fdopen(read) as f:
        lines = f.read().split()
    assert rc == 0
    # The program has its stdio and nothing else (3: ls's own listing).
    assert sorted(lines) == sorted(["out", "err", "0", "1", "2", "3"])


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.requires_root
def test_init_holds_only_stdio_and_its_status_pipe(image: Path, cache: Path) -> None:
    require("cc")
    assert _cinit.choose().binary is not None
    read, write = os.pipe()
    proc = sandbox.Sandbox(image).spawn(["/bin/sh", "-c", "echo up; exec sleep 1000"], stdout=write)
    os.close(write)
    try:
        with os.fdopen(read) as f:
            assert f.readline() == "up\n"
        # 0-2: the program's stdio (init's too), 4: the status pipe; err, go, pid and the
        # caller's pidfd are closed by now.
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd")) == [0, 1, 2, 4]
    finally:
        proc.kill()
        proc.wait()


def test_the_programs_environment_does_not_reach_the_hosts_loader(
    image: Path, cache: Path, tmp_path: Path
) -> None:
    # The starter is a dynamically linked host binary run as the caller: LD_DEBUG (or
    # LD_PRELOAD...) meant for the image must not make the host's loader act on it. busybox
    # is static, so nothing inside reads it either: any loader output came from the host.
    require("cc")
    assert _cinit.choose().binary is not None
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        code = sandbox.Sandbox(image).run(
            ["/bin/sh", "-c", 'echo "inside: $LD_DEBUG $X"'],
            env={"PATH": "/bin", "LD_DEBUG": "all", "X": "a=b c"},
            stdout=o.fileno(),
            stderr=e.fileno(),
        )
    assert code == 0
    assert err.read_text() == ""
    assert out.read_text() == "inside: all a=b c\n"


def test_the_programs_environment_is_not_in_inits_command_line(image: Path, cache: Path) -> None:
    # Every local user may read /proc/PID/cmdline: a token in env must not show there.
    require("cc")
    assert _cinit.choose().binary is not None
    read, write = os.pipe()
    proc = sandbox.Sandbox(image).spawn(
        ["/bin/sh", "-c", 'echo "$TOKEN"; exec sleep 1000'],
        env={"PATH": "/bin", "TOKEN": "s3cr3t-value"},
        stdout=write,
    )
    os.close(write)
    try:
        with os.fdopen(read) as f:
            assert f.readline() == "s3cr3t-value\n"
        with open(f"/proc/{proc.pid}/cmdline", "rb") as c:
            assert b"s3cr3t-value" not in c.read()
    finally:
        proc.kill()
        proc.wait()
    assert _leftovers() == []


def test_an_environment_name_with_an_equals_sign_is_refused(image: Path, cache: Path) -> None:
    require("cc")
    assert _cinit.choose().binary is not None
    with pytest.raises(ValueError, match="illegal environment variable name 'A=B'"):
        sandbox.Sandbox(image).run(["/bin/true"], env={"A=B": "1"})
    assert _leftovers() == []


USER_CALLER = """
import os, sys, time
from pytest_layers import _cinit, sandbox
if os.environ["PYTEST_LAYERS_INIT"] == "compiled":
    assert _cinit.choose().binary is not None, _cinit.choose().reason
read, write = os.pipe()
proc = sandbox.Sandbox(sys.argv[1], helper=False).spawn(
    ["/bin/sh", "-c", "sleep 1000 & echo up; wait"], stdout=write, user=(1000, 1000))
os.close(write)
with os.fdopen(read) as f:
    assert f.readline() == "up\\n"
print(proc.pid, flush=True)
time.sleep(1000)
"""


@pytest.mark.parametrize("init", ["compiled", "python"])
def test_a_killed_caller_leaves_no_process_when_the_program_runs_as_another_user(
    image: Path, cache: Path, init: str
) -> None:
    # Switching to another user clears the parent-death signal: init must set it again.
    require("root")  # uid 1000 exists inside only when every id is mapped
    if init == "compiled":
        require("cc")
    env = {**os.environ, "PYTEST_LAYERS_INIT": init}
    with _caller(USER_CALLER, os.fspath(image), env=env) as pid:
        inside = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        assert len(inside) >= 3  # init, sh and sleep
        assert psutil.Process(inside[-1]).uids().real == 1000
    _assert_all_gone(inside)


KEEPER_CALLER = """
import errno, os, sys, time
from pytest_layers import sandbox
def refused(flags):
    raise OSError(errno.ENOSYS, "clone3 filtered")
sandbox._linux.fork_into_namespaces = refused  # as under Docker's seccomp: the keeper's way
uid = int(sys.argv[2])
read, write = os.pipe()
proc = sandbox.Sandbox(sys.argv[1], helper=False).spawn(
    ["/bin/sh", "-c", "sleep 1000 & echo up; wait"], stdout=write, user=(uid, uid))
os.close(write)
with os.fdopen(read) as f:
    assert f.readline() == "up\\n"
print(proc.pid, flush=True)
time.sleep(1000)
"""


def test_a_killed_caller_leaves_no_process_when_a_keeper_started_init_as_another_user(
    image: Path,
) -> None:
    # The keeper dies with the caller (its own parent-death signal), init with the keeper: init
    # is the keeper's child, and its signal, cleared by the switch to the program's user, must
    # be set again there too (the compiled init has no keeper).
    if os.geteuid() == 0:
        uid = 1000  # every id is mapped
    else:
        require("subids")
        uid = 1  # the first subordinate id
    env = {**os.environ, "PYTEST_LAYERS_INIT": "python"}
    with _caller(KEEPER_CALLER, os.fspath(image), str(uid), env=env) as keeper:
        (init,) = psutil.Process(keeper).children()
        program = init.children(recursive=True)
        inside = [keeper, init.pid, *(p.pid for p in program)]
        assert len(program) >= 2  # sh and sleep
        assert {p.uids().real for p in program} != {os.getuid()}
    _assert_all_gone(inside)


KEEPER_GONE_CALLER = """
import errno, os, select, sys
from pytest_layers import _faultpoints, sandbox
def refused(flags):
    raise OSError(errno.ENOSYS, "clone3 filtered")
sandbox._linux.fork_into_namespaces = refused  # the keeper's way
def hook(point, detail):
    if point == "sandbox-user-switched":
        select.select([int(detail)], [], [])  # the keeper's pidfd: until it died
_faultpoints.hook = hook
uid = int(sys.argv[2])
sandbox.Sandbox(sys.argv[1], helper=False).spawn(
    ["/bin/sh", "-c", "sleep 1000 & wait"], user=(uid, uid))
"""


def test_init_whose_keeper_died_while_it_switched_users_ends(image: Path) -> None:
    # Switching users cleared init's parent-death signal; the keeper (and the caller) die right
    # then, before init sets it again, so no signal will ever come: init must see from the
    # keeper's pidfd that it is gone, and end before it starts the program. Init waits at that
    # moment (a fault point) until the keeper died.
    if os.geteuid() == 0:
        uid = 1000
    else:
        require("subids")
        uid = 1
    env = {**os.environ, "PYTEST_LAYERS_INIT": "python"}
    with subprocess.Popen(
        [sys.executable, "-c", KEEPER_GONE_CALLER, os.fspath(image), str(uid)], env=env
    ) as caller:
        init = None
        try:
            deadline = time.monotonic() + 60
            while init is None or init.uids().real == os.getuid():
                assert time.monotonic() < deadline, "init never switched users"
                assert caller.poll() is None, "the caller ended"
                time.sleep(0.01)
                with contextlib.suppress(ValueError):
                    (keeper,) = psutil.Process(caller.pid).children()
                    (init,) = keeper.children()
        finally:
            caller.kill()
    assert init is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and init.is_running() and init.status() != "zombie":
        time.sleep(0.05)
    alive = init.is_running() and init.status() != "zombie"
    if alive:  # never leave it behind (its PID namespace goes with it), even when failing
        init.kill()
    assert not alive, "init outlived its keeper and started the program"


@pytest.mark.parametrize("user", ["4294967295:0", "0:4294967295"])
def test_the_compiled_init_refuses_the_id_that_means_unchanged(cache: Path, user: str) -> None:
    # Its own check, for a caller other than Sandbox.spawn (which refuses it first).
    require("cc")
    binary = _cinit.choose().binary
    assert binary is not None
    read, write = os.pipe()
    err = fcntl.fcntl(write, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(write)
    plan = ["/nonexistent", "h", "none", "/", "0", user, "", "0", "/bin", "--", "/bin/true"]
    try:
        pid = os.posix_spawn(
            binary,
            [binary, _cinit.VERSION, *plan],
            {},
            file_actions=[(os.POSIX_SPAWN_DUP2, err, 3)],
        )
    finally:
        os.close(err)
    with os.fdopen(read, "rb") as f:
        report = f.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 125
    assert report == f"22:sandbox init: user {user}: ids go up to 4294967294"


def test_auto_builds_the_init_again_when_its_binary_went_away(image: Path, cache: Path) -> None:
    require("cc")
    binary = _cinit.choose().binary
    assert binary is not None
    box = sandbox.Sandbox(image)
    assert box.run(["/bin/sh", "-c", "exit 3"]) == 3
    os.unlink(binary)  # a cache cleaner, mid-session
    assert box.run(["/bin/sh", "-c", "exit 4"]) == 4
    assert _cinit.choose().binary == binary
    assert os.path.exists(binary)
    assert _leftovers() == []


def test_compiled_says_which_binary_went_away_and_what_to_do(
    image: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("cc")
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "compiled")
    binary = _cinit.choose().binary
    assert binary is not None
    os.unlink(binary)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SandboxError) as info:
        sandbox.Sandbox(image).run(["/bin/true"])
    assert str(info.value) == (
        f"cannot start the compiled init {binary}: No such file or directory; it was removed "
        "or damaged since this process built it (a cache cleaner?): run again to rebuild it, "
        "or set PYTEST_LAYERS_INIT=auto or python"
    )
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _leftovers() == []


@contextlib.contextmanager
def _caller(script: str, *args: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run ``script`` in another Python as the sandbox's caller; yields the pid it prints
    first, and SIGKILLs the caller when the block ends (what the tests then look at)."""
    with subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env
    ) as caller:
        try:
            assert caller.stdout is not None
            yield int(caller.stdout.readline())
        finally:
            caller.kill()


def _assert_all_gone(pids: list[int]) -> None:
    """Every process of ``pids`` ends within 30 s (a zombie counts as gone); any left is
    killed, so none outlives the test even when it fails."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert left == []
