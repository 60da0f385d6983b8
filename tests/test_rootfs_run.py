"""``rootfs.run()`` and ``rootfs.spawn()``: the program runs with the test's rootfs as ``/``
(issue 14). Each test runs a pytester project whose image is busybox-static, so the plugin's
own fixture, teardown and diff are what is shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv
import pytest
from conftest import require

from pytest_layers import _zygote

pytestmark = pytest.mark.requires_tool("busybox")

MARK = "pytest-layers-run-canary"

CONFTEST = """
import os, shutil
from pytest_layers import layer

APPLETS = ("sh cat echo ls id hostname mount umount sleep touch true grep wc chown stat "
           "mkdir tail cut readlink ps").split()

@layer
def bb(root):
    for d in ("bin", "etc", "tmp", "proc", "dev", "root"):
        (root / d).mkdir()
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for name in APPLETS:
        os.symlink("busybox", root / "bin" / name)
    (root / "etc/os-release").write_text("ID=busybox-image\\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\\n"
                                     "app:x:1000:1000:app:/home/app:/bin/sh\\n")
    os.symlink("/etc", root / "etclink")
"""


@pytest.fixture(autouse=True)
def _namespaces() -> None:
    if os.geteuid() != 0:
        require("userns")


def run_project(pytester: pytest.Pytester, tests: str, *args: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_run=tests)
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "faulthandler_timeout=20", *args
    )


def leftovers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if MARK in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_program_sees_the_image_not_the_host(pytester: pytest.Pytester) -> None:
    result = run_project(
        pytester,
        """
import os, subprocess, pytest

@pytest.mark.layer("bb", init={"etc/hostname": "web-1\\n"})
def test_it(rootfs):
    r = rootfs.run(["cat", "/etc/os-release"], text=True)
    assert (r.returncode, r.stdout) == (0, "ID=busybox-image\\n")
    r = rootfs.run(["sh", "-c", "echo hi > /etc/x"])
    assert r.returncode == 0, r.stderr
    # As docker diff: the file added, its directory changed (its mtime).
    assert [str(c) for c in rootfs.diff()] == ["C /etc", "A /etc/x"]
    assert not os.path.exists("/etc/x")
    # PID 1 is the sandbox's init; the program is its child (pid 2): nothing of the host.
    r = rootfs.run(["sh", "-c", "echo $$; ls /proc | grep '^[0-9]' | wc -l"], text=True)
    pid, count = r.stdout.split()
    assert pid == "2" and int(count) <= 5, r.stdout
    r = rootfs.run(["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"], text=True)
    assert [x.strip() for x in r.stdout.split()] == ["lo"]
    r = rootfs.run(["hostname"], text=True)
    assert r.stdout == "web-1\\n"
    r = rootfs.run(["sh", "-c", "env | sort"], env={"A": "1"}, text=True)
    assert r.stdout.split() == ["A=1", "HOME=/root", "PATH=/usr/local/sbin:/usr/local/bin:"
                                "/usr/sbin:/usr/bin:/sbin:/bin", "PWD=/", "SHLVL=1"] or \\
        sorted(x for x in r.stdout.split() if not x.startswith(("PWD", "SHLVL"))) == [
            "A=1", "HOME=/root",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], r.stdout
    r = rootfs.run(["cat"], input="piped", text=True)
    assert r.stdout == "piped"
    r = rootfs.run(["ls", "/sys"])
    assert r.returncode != 0   # no /sys at all
    r = rootfs.run(["sh", "-c", "exit 3"])
    assert r.returncode == 3
    with pytest.raises(subprocess.CalledProcessError) as info:
        rootfs.run(["sh", "-c", "echo bad >&2; exit 4"], check=True)
    assert info.value.returncode == 4 and info.value.stderr == b"bad\\n"
    r = rootfs.run(["cat", "/proc/net/dev"], network="host", text=True)
    assert len(r.stdout.splitlines()) > 3 or "lo" in r.stdout
    # /proc and /dev the sandbox mounted on are not changes of the test's.
    assert [str(c) for c in rootfs.diff()] == ["C /etc", "A /etc/x"]
""",
    )
    result.assert_outcomes(passed=1)


def test_writes_land_in_a_failing_tests_snapshot(pytester: pytest.Pytester) -> None:
    result = run_project(
        pytester,
        """
import pytest

@pytest.mark.layer("bb")
def test_fails(rootfs):
    rootfs.run(["sh", "-c", "echo data > /root/made"], check=True)
    assert False
""",
        "-rf",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["snapshot:test_run.py::test_fails (*1 file*", "+++ b/root/made"])


def test_binds_show_inside_and_never_in_the_diff(pytester: pytest.Pytester, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from host")
    link = tmp_path / "link"
    link.symlink_to(data)
    os.chmod(tmp_path, 0o755)
    result = run_project(
        pytester,
        f"""
import errno, pytest
from pytest_layers.errors import SandboxError
from pytest_layers.sandbox import Bind

@pytest.mark.layer("bb")
def test_it(rootfs):
    r = rootfs.run(["sh", "-c", "cat /mnt/data/in.txt; touch /mnt/data/w"],
                   binds=[({str(data)!r}, "/mnt/data")], text=True)
    assert r.stdout == "from host", r
    assert "Read-only" in r.stderr
    r = rootfs.run(["touch", "/srv/w"], binds=[Bind(__import__("pathlib").Path({str(data)!r}),
                                                     "/srv", readonly=False)])
    assert r.returncode == 0
    assert rootfs.diff() == []
    with pytest.raises(SandboxError, match="symlink") as info:
        rootfs.run(["true"], binds=[({str(link)!r}, "/mnt/x")])
    assert info.value.errno == errno.ELOOP
""",
    )
    result.assert_outcomes(passed=1)
    assert (data / "w").exists()  # the writable bind wrote the host's directory
    assert sorted(os.listdir(data)) == ["in.txt", "w"]


def test_escapes_are_refused(pytester: pytest.Pytester, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("untouched")
    os.chmod(tmp_path, 0o755)
    result = run_project(
        pytester,
        f"""
import pytest

CANARY = {str(canary)!r}

@pytest.mark.layer("bb")
def test_it(rootfs):
    # cwd through an absolute symlink and through .. : both resolve inside the image.
    r = rootfs.run(["sh", "-c", "pwd; cat os-release"], cwd="/etclink", text=True)
    assert r.stdout.split("\\n", 1)[1] == "ID=busybox-image\\n", r
    r = rootfs.run(["sh", "-c", "ls"], cwd="/../../../../..", text=True)
    assert "etclink" in r.stdout.split()
    script = ("cat " + CANARY + "; echo x > " + CANARY + "; "
              "ls /proc/self/root/ | grep -c etclink; "
              "cat /proc/self/root/" + CANARY + "; "
              "cat /proc/1/root/" + CANARY + "; "
              "mount -t tmpfs none /mnt && echo MOUNTED; "
              "umount / && echo UNMOUNTED; umount -l / && echo LAZY; "
              "cat /etc/os-release")
    r = rootfs.run(["sh", "-c", script], text=True)
    out = r.stdout.splitlines()
    assert out[0] == "1", r
    assert "ID=busybox-image" in out
    assert "untouched" not in r.stdout
    # mount of a tmpfs in its own mount namespace may succeed: it stays inside.
    assert "UNMOUNTED" not in out and "LAZY" not in out, r
""",
    )
    result.assert_outcomes(passed=1)
    assert canary.read_text() == "untouched"


def test_timeout_kills_a_fork_bomb(pytester: pytest.Pytester) -> None:
    # A bounded bomb (2^7 sleepers that never end): the host's pid table stays usable for
    # the other jobs on this machine, and every one of them must be gone after the timeout.
    result = run_project(
        pytester,
        f"""
import subprocess, pytest

BOMB = "b() {{ if [ $1 -lt 7 ]; then b $(($1+1)) & b $(($1+1)) & fi; sleep 1000; }}; b 0 # {MARK}"

@pytest.mark.layer("bb")
def test_it(rootfs):
    with pytest.raises(subprocess.TimeoutExpired) as info:
        rootfs.run(["sh", "-c", BOMB], timeout=2)
    assert info.value.timeout == 2
""",
    )
    result.assert_outcomes(passed=1)
    assert leftovers() == []


def test_spawn_is_ended_with_the_test(pytester: pytest.Pytester) -> None:
    result = run_project(
        pytester,
        f"""
import subprocess, pytest

@pytest.mark.layer("bb")
def test_server(rootfs):
    p = rootfs.spawn(["sh", "-c", "echo ready; sleep 1000; : {MARK}"], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\\n"
    assert p.poll() is None
    # left running: the rootfs's teardown kills it

def test_after_the_teardown():
    # Still in the same pytest process (its death would end the server anyway): the teardown
    # of test_server is what ended it.
    import psutil
    assert [p for p in psutil.process_iter(["cmdline"])
            if "{MARK}" in " ".join(p.info["cmdline"] or [])] == []

@pytest.mark.layer("bb")
def test_wait_and_kill(rootfs):
    p = rootfs.spawn(["sleep", "1000"])
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.2)
    p.kill()
    assert p.wait() == -9
""",
    )
    result.assert_outcomes(passed=3)
    assert leftovers() == []


def test_user_switches_inside(pytester: pytest.Pytester) -> None:
    result = run_project(
        pytester,
        """
import os, pytest
from pytest_layers import _subids
from pytest_layers.errors import SandboxError

@pytest.mark.layer("bb")
def test_it(rootfs):
    r = rootfs.run(["sh", "-c", "id -u; touch /tmp/mine"], text=True)
    assert r.stdout == "0\\n"
    # Files made by uid 0 inside belong to whoever runs the tests outside.
    assert (rootfs / "tmp/mine").stat().st_uid == os.geteuid()
    if os.geteuid() == 0:
        r = rootfs.run(["sh", "-c", "id -u; id -g; echo $HOME"], user="app", text=True)
        assert r.stdout.split() == ["1000", "1000", "/home/app"]
        r = rootfs.run(["sh", "-c", "touch /tmp/f; chown 1234 /tmp/f"], check=True)
        assert (rootfs / "tmp/f").stat().st_uid == 1234
    elif _subids.available():
        # With subordinate ids (tests/test_rootfs_subids.py forces each case).
        r = rootfs.run(["sh", "-c", "id -u; touch /tmp/f; chown 1234 /tmp/f"], user="app",
                       text=True)
        assert r.stdout == "1000\\n" and "chown" in r.stderr, r
    else:
        with pytest.raises(SandboxError, match="only uid 0 inside exists"):
            rootfs.run(["id"], user="app")
        r = rootfs.run(["sh", "-c", "touch /tmp/f; chown 1234 /tmp/f"])
        assert r.returncode != 0 and b"chown" in r.stderr
    with pytest.raises(SandboxError, match="no such user"):
        rootfs.run(["id"], user="nobody-here")
""",
    )
    result.assert_outcomes(passed=1)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["compiled", "python"])
def test_a_thousand_runs_leak_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, init: str
) -> None:
    monkeypatch.setenv("PYTEST_LAYERS_INIT", init)
    result = run_project(
        pytester,
        """
import os, pytest

def fds():
    return len(os.listdir("/proc/self/fd"))

def mounts():
    return open("/proc/self/mountinfo").read().count("\\n")

START = {}

@pytest.mark.layer("bb")
@pytest.mark.parametrize("i", range(1000))
def test_true(rootfs, i):
    if i == 0:
        START.update(fds=fds(), mounts=mounts())
    assert rootfs.run(["/bin/true"]).returncode == 0

def test_after():
    import psutil
    from pytest_layers import _cinit, _zygote
    helper = _zygote.running()
    if os.environ["PYTEST_LAYERS_INIT"] == "python":
        # The runs went through the sandbox's fork helper (the first few while it started),
        # which lives for the session: left out by exactly its pid, whatever it started counted.
        assert helper is not None and _zygote.is_helper(helper)
        assert _zygote._helper.served >= 900
    else:
        # The compiled init is started by posix_spawn: no fork helper is needed.
        assert _cinit.choose().binary is not None
        assert helper is None
    assert [p for p in psutil.Process().children(recursive=True) if p.pid != helper] == []
    # (A namespace lives only as long as a process or a mount holds it.)
    assert fds() <= START["fds"] + 2
    assert mounts() < START["mounts"]  # the first test's own view is gone too
""",
        "-q",
        # The view pool's helper is a child of the session by design, and its ready views are
        # mounts: this test counts what run() leaves, with every view made in its test.
        "-o",
        "layers_view_pool=0",
    )
    result.assert_outcomes(passed=1001)


@pytest.mark.parametrize(
    "backend",
    [pytest.param("fuse", marks=pytest.mark.requires_fuse), "copy"],
)
def test_every_backend_runs_inside_its_view(pytester: pytest.Pytester, backend: str) -> None:
    # The program's writes reach the view the backend gives (with copy: the copy), so diff()
    # shows them whichever backend mounted it.
    result = run_project(
        pytester,
        """
import pytest

@pytest.mark.layer("bb")
def test_it(rootfs):
    r = rootfs.run(["sh", "-c", "cat /etc/os-release; echo hi > /etc/x; id -u"], text=True)
    assert r.stdout == "ID=busybox-image\\n0\\n", r
    assert "A /etc/x" in [str(c) for c in rootfs.diff()]
    assert (rootfs / "etc/x").read_text() == "hi\\n"
""",
        f"--layers-backend={backend}",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"layers: backend={backend}*"])


def test_sigkill_of_pytest_leaves_no_process(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_run=f"""
import subprocess, sys, time, pytest

@pytest.mark.layer("bb")
def test_server(rootfs):
    from pytest_layers import _zygote, sandbox
    assert _zygote.get(sandbox._identity, wait=60) is not None  # the helper starts the server
    p = rootfs.spawn(["sh", "-c", "echo ready; sleep 1000; : {MARK}"], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\\n"
    sys.__stdout__.write("SPAWNED\\n")
    sys.__stdout__.flush()
    time.sleep(1000)
"""
    )
    proc = pytester.popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"SPAWNED" in line:
                break
        inside = leftovers()
        assert inside, "the server should be running before the kill"
        helpers = [
            p for p in psutil.Process(proc.pid).children() if _zygote.is_helper(p.pid, proc.pid)
        ]
        assert len(helpers) == 1, "the sandbox's fork helper should be running"
        inside += helpers
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # The helper, then init (and a keeper, if any) die of PR_SET_PDEATHSIG, the rest with the
    # PID namespace; the kernel delivers that asynchronously, so wait for exactly the processes
    # seen (bounded).
    _, alive = psutil.wait_procs(inside, timeout=30)
    assert alive == []
    assert leftovers() == []
