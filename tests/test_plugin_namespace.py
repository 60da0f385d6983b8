"""Where a session's mounts live, and what a dead session leaves behind.

* Every session start removes the view scratch (``STORE/scratch/views/<pid>-<start>``) of
  sessions that died without cleaning up, whatever the mode (private or user namespace, host,
  copy backend), and never a live session's.
* A pytest session started from inside another one (a test that runs pytest) enters a fresh
  namespace of its own, although it inherits the outer one's namespace and its environment
  variable: SIGKILLed, it leaves no mount in the outer session. Only xdist workers, told so
  through ``workerinput``, share their controller's.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_layers import namespaces
from tests.conftest import TEST_USER, run_as_user
from tests.plugin_util import BASE_CONFTEST

pytestmark = [pytest.mark.requires_overlay]

TESTS = """
import pytest

@pytest.mark.layer("base")
def test_it(rootfs):
    (rootfs / "etc/new").write_text("x")
    assert (rootfs / "etc/os-release").read_text() == "ID=demo\\n"
"""


def _dead_session_name() -> str:
    """The scratch dir name a session run by a process that has exited would have left."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    name = namespaces.session_dir_name(proc.pid)
    proc.communicate(b"")
    return name


def _plant_scratch(store: Path, owner: int | None = None) -> tuple[Path, Path]:
    """A dead session's scratch dir with an upper dir in it, and a live session's (pid 1)."""
    views = store / "scratch" / "views"
    dead = views / _dead_session_name() / "1" / "view" / "u" / "etc"
    dead.mkdir(parents=True)
    (dead / "written-by-the-dead-session").write_text("x")
    live = views / namespaces.session_dir_name(1)
    live.mkdir()
    if owner is not None:
        for path in (store, *store.rglob("*")):
            os.chown(path, owner, owner)
    return views / dead.relative_to(views).parts[0], live


def _write(path: Path, store: Path, *ini: str) -> None:
    lines = [
        "[pytest]",
        "addopts = -p no:cacheprovider -p no:randomly",
        f"layers_store = {store}",
        *ini,
    ]
    (path / "pytest.ini").write_text("\n".join(lines) + "\n")
    (path / "conftest.py").write_text(BASE_CONFTEST)
    (path / "test_ns.py").write_text(TESTS)


@pytest.mark.requires_root
@pytest.mark.parametrize("mode", ["private", "host", "copy"])
def test_session_start_removes_dead_sessions_scratch(pytester: pytest.Pytester, mode: str) -> None:
    store = pytester.path / "store"
    _write(pytester.path, store, "layers_mount_namespace = host" if mode == "host" else "")
    dead, live = _plant_scratch(store)
    args = ["--layers-backend=copy"] if mode == "copy" else []
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    assert not dead.exists(), "the dead session's scratch dir was left on disk"
    assert live.is_dir(), "a live session's scratch dir was removed"
    assert sorted(p.name for p in live.parent.iterdir()) == [live.name]


@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_user_session_start_removes_dead_sessions_scratch(user_tmp_path: Path) -> None:
    uid = pwd.getpwnam(TEST_USER).pw_uid
    store = user_tmp_path / "store"
    _write(user_tmp_path, store)
    dead, live = _plant_scratch(store, owner=uid)
    for name in ("pytest.ini", "conftest.py", "test_ns.py"):
        os.chown(user_tmp_path / name, uid, uid)
    proc = run_as_user(
        [sys.executable, "-m", "pytest", "-q"],
        cwd=user_tmp_path,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert not dead.exists(), "the dead session's scratch dir was left on disk"
    assert live.is_dir(), "a live session's scratch dir was removed"


OUTER_TEST = '''
import os, signal, subprocess, sys, time
from pathlib import Path
from pytest_layers import _linux, namespaces

INNER_TESTS = """
import os, time
import pytest

@pytest.mark.layer("base")
def test_paused(rootfs):
    (rootfs / "etc/new").write_text("x")
    ready = os.path.join(os.environ["INNER_DIR"], "ready")
    with open(ready + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(ready + ".tmp", ready)
    time.sleep(3600)
"""

def test_killed_inner_session_leaves_no_mount_here(tmp_path):
    # The outer session (this one) entered its namespace and says so in the environment, which
    # the inner session inherits, as a test running pytest passes it on.
    assert namespaces.inside_our_namespace() is not None
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pytest.ini").write_text("[pytest]\\naddopts = -p no:cacheprovider\\n")
    (inner / "conftest.py").write_text((Path(__file__).parent / "inner_conftest.txt").read_text())
    (inner / "test_inner.py").write_text(INNER_TESTS)
    env = dict(os.environ, INNER_DIR=str(inner))
    for name in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", f"--layers-store={inner}/s"],
        cwd=inner, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (inner / "ready").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the inner session never reached its test"
            time.sleep(0.02)
        while_alive = namespaces.mounts_under(inner)
        os.kill(int((inner / "ready").read_text()), signal.SIGKILL)
        proc.wait(timeout=60)
        after_kill = namespaces.mounts_under(inner)
        assert while_alive == [], f"the inner session mounts in ours: {while_alive}"
        assert after_kill == [], f"the killed inner session left mounts here: {after_kill}"
    finally:
        proc.kill()
        proc.wait()
        for point in namespaces.mounts_under(inner):
            _linux.umount2(point, _linux.MNT_DETACH)
'''


def _write_outer(path: Path, conftest_name: str, test: str) -> None:
    """Lay out an outer session: the base layer as ``conftest_name``, ``test`` as its module."""
    (path / conftest_name).write_text(BASE_CONFTEST)
    (path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider -p no:randomly\n")
    (path / "test_outer.py").write_text(test)


def _run_outer_as_user(path: Path, store: Path) -> subprocess.CompletedProcess[str]:
    """Give ``path``'s files to the test user and run the outer session as that user."""
    uid = pwd.getpwnam(TEST_USER).pw_uid
    for child in path.iterdir():
        os.chown(child, uid, uid)
    return run_as_user(
        [sys.executable, "-m", "pytest", "-q", f"--layers-store={store}"],
        cwd=path,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )


@pytest.mark.requires_root
def test_nested_session_killed_leaves_no_mount_in_the_outer_one(pytester: pytest.Pytester) -> None:
    _write_outer(pytester.path, "inner_conftest.txt", OUTER_TEST)
    result = pytester.runpytest_subprocess(f"--layers-store={pytester.path}/outer-store")
    result.assert_outcomes(passed=1)


@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_nested_user_session_killed_leaves_no_mount_in_the_outer_one(
    user_tmp_path: Path,
) -> None:
    _write_outer(user_tmp_path, "inner_conftest.txt", OUTER_TEST)
    proc = _run_outer_as_user(user_tmp_path, user_tmp_path / "outer-store")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


IN_PROCESS_TEST = '''
import pytest
from pytest_layers import namespaces

pytest_plugins = ["pytester"]

INNER = """
import pytest
from pytest_layers import layer

@layer
def inner_base(root):
    (root / "etc").mkdir()

@pytest.mark.layer("inner_base")
def test_inner(rootfs):
    (rootfs / "etc/x").write_text("x")
"""

@pytest.mark.layer("base")
def test_in_process_session_shares_our_namespace(rootfs, pytester):
    before = namespaces.current_namespace()
    pytester.makepyfile(test_inner=INNER)
    pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    # Same process, same fate: no new namespace (one would strand our own mounts, and an
    # ordinary user's nested user namespace would lock them), and our view still works.
    assert namespaces.current_namespace() == before
    assert namespaces.inside_our_namespace() is not None
    (rootfs / "etc/after").write_text("ok")
    assert [str(c) for c in rootfs.diff()] == ["C /etc", "A /etc/after"]
'''


@pytest.mark.requires_root
def test_in_process_nested_session_shares_the_namespace(pytester: pytest.Pytester) -> None:
    _write_outer(pytester.path, "conftest.py", IN_PROCESS_TEST)
    result = pytester.runpytest_subprocess(f"--layers-store={pytester.path}/store")
    result.assert_outcomes(passed=1)


@pytest.mark.requires_user
@pytest.mark.requires_userns
def test_in_process_nested_user_session_shares_the_namespace(user_tmp_path: Path) -> None:
    _write_outer(user_tmp_path, "conftest.py", IN_PROCESS_TEST)
    proc = _run_outer_as_user(user_tmp_path, user_tmp_path / "store")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
