"""Where a session's mounts live, and what a dead session leaves behind.

* Every session start removes the view scratch (``STORE/scratch/views/<pid>-<start>``) of
  sessions that died without cleaning up, whatever the mode (private or user namespace, host,
  copy backend), and never a live session's.
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

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
"""

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
    (path / "conftest.py").write_text(CONFTEST)
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
