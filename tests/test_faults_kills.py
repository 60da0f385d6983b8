"""Faults, group 1: pytest (or the CLI) killed with SIGKILL at the worst moments.

Each case runs a real pytest session in a subprocess (``runpytest_subprocess`` cannot be killed
midway), waits until it reaches the moment to kill (a builder or test writes its pid to a
``ready`` file and sleeps; a commit or an export stops at a fault point of the store or the OCI
module, whose hook the child's own code installs: pytest_layers/_faultpoints.py), sends SIGKILL
and then checks what a user would meet next: no mount left in the namespace the session was
started in, no partial layer or dangling ref, ``pytest-layers verify`` clean, and the next
session passing without any manual cleanup.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from faults_util import (
    assert_store_consistent,
    builder_runs,
    child_env,
    cli,
    cli_command,
    dead_leftovers,
    kill,
    no_mounts_left,
    our_mounts_under,
    out,
    pytest_command,
    ref_targets,
    run_session,
    wait_for,
    write_project,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.requires_overlay]

# ---- the project the kill tests run -----------------------------------------------------------

CONFTEST = """
import os, time
from pathlib import Path
from pytest_layers import _faultpoints, layer

HERE = Path(__file__).parent

def pause(what):
    if os.environ.get("FAULT_PAUSE") == what:
        (HERE / "ready.tmp").write_text(str(os.getpid()))
        os.rename(HERE / "ready.tmp", HERE / "ready")
        time.sleep(3600)

# The store's fault point sits after layer.json is written, before the rename that publishes
# the layer; only the test's own code installs the hook (pytest_layers/_faultpoints.py).
_faultpoints.hook = lambda point, detail: pause("commit") if point == "add_layer" else None

def log(name):
    with open(HERE / "runs.log", "a") as f:
        f.write(name + "\\n")

@layer
def base(root):
    log("base")
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    for i in range(50):
        (root / "etc" / f"f{i}").write_text(str(i) * 100)
    pause("build-base")

@layer(parent=base)
def app(root):
    log("app")
    (root / "etc/app.conf").write_text("debug=false\\n")
    (root / "etc/os-release").unlink()
    pause("build-app")
"""

TESTS = """
import os
import pytest
from conftest import pause

@pytest.mark.layer("app")
def test_writes(rootfs):
    (rootfs / "etc/app.conf").write_text("debug=true\\n")
    (rootfs / "new").mkdir()
    pause("test")
    assert [str(c) for c in rootfs.diff()] == ["C /etc", "C /etc/app.conf", "A /new"]

@pytest.mark.layer("app")
def test_kept_when_failing(rootfs):
    (rootfs / "etc/kept").write_text("evidence\\n")
    assert os.environ.get("FAULT_FAIL") != "1", "fails on purpose: its rw layer is committed"

def test_image_is_intact(app):
    assert [str(c) for c in app.changes()] == ["C /etc", "A /etc/app.conf", "D /etc/os-release"]
"""


def _start(path: Path, env: dict[str, str], as_user: bool) -> subprocess.Popen[str]:
    cmd = pytest_command()
    if as_user:
        from conftest import TEST_USER

        cmd = ["runuser", "-u", TEST_USER, "--", "env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    return subprocess.Popen(
        cmd, cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _kill_at(path: Path, store: Path, moment: str, *, as_user: bool = False) -> None:
    """Start a session, SIGKILL it at ``moment``."""
    ready = path / "ready"
    ready.unlink(missing_ok=True)
    env = child_env(FAULT_PAUSE=moment, **({"FAULT_FAIL": "1"} if moment == "commit" else {}))
    proc = _start(path, env, as_user)
    wait_for(ready.exists, f"the {moment} pause", proc)
    pid = int(ready.read_text())
    if moment == "commit":
        # Paused with the complete layer staged, just before the rename that would publish it.
        assert list((store / "tmp").glob("*/layer.json")), "the commit paused elsewhere"
    kill(pid, proc)
    ready.unlink(missing_ok=True)


MOMENTS = ["build-base", "build-app", "test", "commit"]


def _check_after_kill_and_next_session(
    path: Path, store: Path, moment: str, *, host_mode: bool, as_user: bool = False
) -> None:
    runs_before = builder_runs(path)
    if not host_mode:
        assert our_mounts_under(path) == [], "a killed private-namespace session left mounts"
    assert_store_consistent(store)
    if moment == "commit":
        assert not [r for r in ref_targets(store) if r.startswith("refs/snapshots/")], (
            "a snapshot ref of the killed commit is visible"
        )
    # The next session, as is: no cleanup by hand.
    env = child_env()
    if as_user:
        from conftest import run_as_user

        proc = run_as_user(pytest_command(), cwd=path, env={"PYTHONDONTWRITEBYTECODE": "1"})
    else:
        proc = run_session(path, env=env)
    assert proc.returncode == 0, out(proc)
    assert "3 passed" in proc.stdout, out(proc)
    new_runs = builder_runs(path)[len(runs_before) :]
    # A layer whose build was killed is built again; a complete one is never rebuilt.
    expected = {"build-base": ["base", "app"], "build-app": ["app"]}.get(moment, [])
    assert new_runs == expected, f"builders run by the next session: {new_runs}"
    assert our_mounts_under(path) == [], "mounts left after the next session"
    # Private mode's scratch dirs are checked on their own (test_next_private_session_sweeps...).
    assert dead_leftovers(store, views=host_mode) == [], "a dead session's files were not swept"
    assert_store_consistent(store)


def _prepare(path: Path, moment: str, ini: Sequence[str] = ()) -> Path:
    store = write_project(path, CONFTEST, TESTS, ini=ini)
    if moment in ("test", "commit"):
        # The layers exist already: the kill hits the test or its commit, not a build.
        proc = run_session(path)
        assert proc.returncode == 0, out(proc)
    return store


@pytest.mark.slow
@pytest.mark.requires_root
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_private_namespace(pytester: pytest.Pytester, moment: str) -> None:
    path = pytester.path
    with no_mounts_left(path):
        store = _prepare(path, moment)
        _kill_at(path, store, moment)
        _check_after_kill_and_next_session(path, store, moment, host_mode=False)


@pytest.mark.slow
@pytest.mark.requires_root
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_host_namespace(pytester: pytest.Pytester, moment: str) -> None:
    path = pytester.path
    with no_mounts_left(path):
        store = _prepare(path, moment, ini=["layers_mount_namespace = host"])
        _kill_at(path, store, moment)
        if moment in ("build-app", "test"):
            # The killed session's view is still mounted here (nothing can unmount it at
            # SIGKILL): the next session must sweep it, and nothing else.
            assert our_mounts_under(store / "scratch"), "expected the dead session's mount"
        _check_after_kill_and_next_session(path, store, moment, host_mode=True)


@pytest.mark.requires_root
def test_next_private_session_sweeps_dead_sessions_scratch(pytester: pytest.Pytester) -> None:
    """A killed private-namespace session's mounts die with it, but its scratch dir
    (``scratch/views/<pid>-<start>``, holding the upper dirs when no scratch tmpfs could be
    mounted) stays on disk: the next session must remove it, as host mode's sweep does."""
    path = pytester.path
    with no_mounts_left(path):
        store = _prepare(path, "test")
        _kill_at(path, store, "test")
        assert dead_leftovers(store), "expected the killed session's scratch dir"
        proc = run_session(path)
        assert proc.returncode == 0, out(proc)
        assert dead_leftovers(store) == [], "the next session left a dead session's scratch dir"


@pytest.mark.slow
@pytest.mark.requires_user
@pytest.mark.parametrize("moment", ["build-app", "test", "commit"])
def test_sigkill_as_ordinary_user(user_tmp_path: Path, moment: str) -> None:
    from conftest import run_as_user

    path = user_tmp_path
    with no_mounts_left(path):
        store = write_project(path, CONFTEST, TESTS)
        if moment in ("test", "commit"):
            proc = run_as_user(pytest_command(), cwd=path, env={"PYTHONDONTWRITEBYTECODE": "1"})
            assert proc.returncode == 0, out(proc)
        _kill_at(path, store, moment, as_user=True)
        _check_after_kill_and_next_session(path, store, moment, host_mode=False, as_user=True)


@pytest.mark.requires_root
def test_sigkill_during_export(pytester: pytest.Pytester) -> None:
    path = pytester.path
    with no_mounts_left(path):
        store = _prepare(path, "test")
        dest = path / "image.tar"
        proc = subprocess.Popen(
            cli_command("--store", str(store), "export", "app", "-o", str(dest), pause="export"),
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PAUSED "), line + (proc.stderr.read() if proc.stderr else "")
        assert any(Path(line.split(" ", 1)[1].strip()).iterdir()), "nothing staged yet"
        kill(proc.pid, proc)

        assert not dest.exists(), "a partial export is visible at the destination"
        assert_store_consistent(store)
        again = cli(store, "export", "app", "-o", str(dest))
        assert again.returncode == 0, out(again)
        assert [p.name for p in path.iterdir() if p.name.startswith(".image.tar.")] == [], (
            "the killed export's staging was not swept by the next export"
        )
        session = run_session(path)
        assert session.returncode == 0, out(session)
        assert builder_runs(path) == ["base", "app"]
