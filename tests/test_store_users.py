"""Stores and several users: each uid works in a store of its own by default, and a store
shared knowingly with a group works for its members (docs/concepts/security.md).

Needs root and two ordinary users: ``.ci/run`` creates ``layersci``; the second user and the
group are created here when missing (CI: ``.ci/run`` creates them too).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_USER, run_as_user
from tests.plugin_util import BASE_CONFTEST, BASE_TESTS

pytestmark = [pytest.mark.requires_root, pytest.mark.requires_user, pytest.mark.requires_overlay]

SECOND_USER = os.environ.get("PYTEST_LAYERS_TEST_USER2", "layersci2")
GROUP = os.environ.get("PYTEST_LAYERS_TEST_GROUP", "layersshare")


def _as(user: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": pwd.getpwnam(user).pw_dir,
        "PYTHONDONTWRITEBYTECODE": "1",
        **env,
    }
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in full.items()), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _out(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@pytest.fixture(scope="module")
def second_user() -> str:
    """A second ordinary user, both users in one group ``GROUP``; created when missing."""
    try:
        pwd.getpwnam(SECOND_USER)
        members = grp.getgrnam(GROUP).gr_mem
    except KeyError:
        if shutil.which("useradd") is None or shutil.which("groupadd") is None:
            pytest.skip("useradd/groupadd unavailable: cannot make a second user and a group")
        subprocess.run(["groupadd", "-f", GROUP], check=True)
        if subprocess.run(["id", SECOND_USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--create-home", SECOND_USER], check=True)
        members = []
    for user in (TEST_USER, SECOND_USER):
        if user not in members:
            subprocess.run(["usermod", "-aG", GROUP, user], check=True)
    return SECOND_USER


@pytest.fixture
def world_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp_path is root's alone)."""
    path = Path("/tmp") / f"pytest-layers-users-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=True)


def _project(path: Path, ini: str = "") -> Path:
    path.mkdir(mode=0o755, exist_ok=True)
    (path / "pytest.ini").write_text(
        f"[pytest]\naddopts = -p no:cacheprovider -p no:randomly\n{ini}"
    )
    (path / "conftest.py").write_text(BASE_CONFTEST)
    (path / "test_it.py").write_text(BASE_TESTS)
    return path


def test_sudo_pytest_in_a_users_checkout_leaves_the_user_alone(world_dir: Path) -> None:
    user = pwd.getpwnam(TEST_USER)
    checkout = _project(world_dir / "checkout")
    shutil.chown(world_dir, user.pw_uid, user.pw_gid)
    for p in [checkout, *checkout.iterdir()]:
        shutil.chown(p, user.pw_uid, user.pw_gid)
    env = {"PYTHONDONTWRITEBYTECODE": "1"}

    proc = run_as_user([sys.executable, "-m", "pytest"], cwd=checkout, env=env)
    assert proc.returncode == 0, _out(proc)
    assert f"store={checkout}/.pytest_cache/layers (yours, " in proc.stdout, _out(proc)

    # `sudo pytest` in the same checkout: root works in a store of its own, outside it.
    root_cache = world_dir / "root-cache"
    root_cache.mkdir(mode=0o700)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest"],
        cwd=checkout,
        env={**os.environ, **env, "XDG_CACHE_HOME": str(root_cache)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, _out(proc)
    assert f"store={root_cache}/pytest-layers/stores/checkout-" in proc.stdout, _out(proc)
    found = subprocess.run(
        ["find", str(checkout), "-uid", "0"], capture_output=True, text=True, check=True
    )
    assert found.stdout == "", f"root left entries in the user's checkout:\n{found.stdout}"

    proc = run_as_user([sys.executable, "-m", "pytest"], cwd=checkout, env=env)
    assert proc.returncode == 0, _out(proc)
    assert "layers: cached base" in proc.stdout, _out(proc)
    proc = run_as_user(["rm", "-rf", str(checkout / ".pytest_cache")], cwd="/")
    assert proc.returncode == 0, _out(proc)

    # A root-owned store left there by an older version: the user moves to a store of their own.
    from pytest_layers.store import Store

    proc = run_as_user(["mkdir", str(checkout / ".pytest_cache")], cwd="/")
    assert proc.returncode == 0, _out(proc)
    Store(checkout / ".pytest_cache" / "layers").close()
    proc = run_as_user([sys.executable, "-m", "pytest"], cwd=checkout, env=env)
    assert proc.returncode == 0, _out(proc)
    assert f"store={checkout}/.pytest_cache/layers-uid{user.pw_uid} (yours, " in proc.stdout


def test_store_shared_with_a_group(world_dir: Path, second_user: str) -> None:
    store = world_dir / "shared"
    project = _project(
        world_dir / "project", f"layers_store = {store}\nlayers_store_shared = {GROUP}\n"
    )
    gid = grp.getgrnam(GROUP).gr_gid
    # Root sets it up (as an admin would), then each member uses it.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, _out(proc)
    assert f"store={store} (shared with group {GROUP}, " in proc.stdout, _out(proc)
    for user in (TEST_USER, second_user):
        proc = _as(user, [sys.executable, "-m", "pytest"], project)
        assert proc.returncode == 0, _out(proc)
        assert "layers: cached base" in proc.stdout, _out(proc)
        assert f"(shared with group {GROUP}, " in proc.stdout, _out(proc)
    # A member rebuilds (taking the locks the others made) and prunes.
    proc = _as(TEST_USER, [sys.executable, "-m", "pytest", "--layers-rebuild"], project)
    assert proc.returncode == 0, _out(proc)
    proc = _as(
        second_user,
        [sys.executable, "-m", "pytest_layers.cli", "--store", str(store), "prune"],
        project,
    )
    assert proc.returncode == 0, _out(proc)
    for d in (store, store / "layers", store / "locks", store / "refs" / "names"):
        st = os.stat(d)
        assert st.st_gid == gid, d
        assert st.st_mode & stat.S_ISGID, d
        assert stat.S_IMODE(st.st_mode) & 0o070 == 0o070, d
        assert not st.st_mode & 0o007, d
    for lock in (store / "locks").iterdir():
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o660, lock
    # Without the explicit opt-in, a member refuses the group-writable store in one line.
    proc = _as(TEST_USER, [sys.executable, "-m", "pytest", "-o", "layers_store_shared="], project)
    assert proc.returncode != 0, _out(proc)
    assert f"layers: unavailable: {store} belongs to uid 0 (root), not to you" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_root_owned_leftovers_in_a_users_store_are_one_line(world_dir: Path) -> None:
    # What a `sudo pytest` of an older version left in the user's own store: a layer and a lock.
    user = pwd.getpwnam(TEST_USER)
    shutil.chown(world_dir, user.pw_uid, user.pw_gid)
    store = world_dir / "store"
    proc = run_as_user(
        [
            sys.executable,
            "-c",
            "import sys; from pytest_layers.store import Store; Store(sys.argv[1])",
            str(store),
        ],
        cwd="/",
    )
    assert proc.returncode == 0, _out(proc)
    (store / "layers" / ("ab" * 32)).mkdir(mode=0o755)
    (store / "locks" / "build-x.lock").write_text("")
    before = sorted(p.name for p in (store / "layers").iterdir())
    for verb in ("prune", "ls"):
        proc = run_as_user(
            [sys.executable, "-m", "pytest_layers.cli", "--store", str(store), verb], cwd="/"
        )
        assert proc.returncode == 1, _out(proc)
        assert "Traceback" not in proc.stderr, _out(proc)
        (line,) = proc.stderr.strip().splitlines()
        assert "belongs to uid 0 (root), not to you" in line, line
        assert "sudo rm -rf" in line, line
    assert sorted(p.name for p in (store / "layers").iterdir()) == before
