"""Helpers the ``test_faults_*`` suites share: child sessions started as from a shell, the CLI,
mount cleanup, and the store checks a user would meet after a fault."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pytest_layers import namespaces
from pytest_layers.store import Store

#: Variables a child session must not inherit from the pytest running these tests: the mount
#: namespace marker (the child would think its parent's namespace is its own, and a SIGKILL
#: would leave its mounts in ours), and whatever pytest/xdist tell their own workers.
_SCRUB = (
    namespaces.ENV_VAR,
    "PYTEST_ADDOPTS",
    "PYTEST_CURRENT_TEST",
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_XDIST_TESTRUNUID",
    "PYTEST_LAYERS_REQUIRE",
)


def pause_source(point: str) -> str:
    """Python to run first in a child process (``python -c``): when the code reaches the fault
    point ``point`` (pytest_layers/_faultpoints.py), print ``PAUSED <detail>`` and sleep until
    killed. Production code has no switch for it: only code running in the process can."""
    return (
        "import time as _time\n"
        "from pytest_layers import _faultpoints as _fp\n"
        "def _pause(name, detail):\n"
        f"    if name == {point!r}:\n"
        "        print('PAUSED ' + detail, flush=True)\n"
        "        _time.sleep(3600)\n"
        "_fp.hook = _pause\n"
    )


def cli_command(*args: str, pause: str | None = None) -> list[str]:
    """``pytest-layers ARGS`` as a child process, paused at the fault point ``pause`` if given."""
    main = "import sys\nfrom pytest_layers.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", (pause_source(pause) if pause else "") + main, *args]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh session started from a shell."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def write_project(
    path: Path, conftest: str, tests: str, *, ini: Sequence[str] = (), store: Path | None = None
) -> Path:
    """A pytest project in ``path`` (its own rootdir); returns its store path."""
    store = store or path / "store"
    lines = ["[pytest]", "addopts = -p no:cacheprovider", f"layers_store = {store}", *ini]
    (path / "pytest.ini").write_text("\n".join(lines) + "\n")
    (path / "conftest.py").write_text(conftest)
    (path / "test_project.py").write_text(tests)
    return store


def pytest_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *args]


def run_session(
    path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a whole pytest session in ``path``; its output is in the result."""
    return subprocess.run(
        pytest_command(*args),
        cwd=path,
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli(
    store: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pytest-layers --store STORE ARGS`` in a subprocess, as the store's owner: a store is
    its owner's alone, so root looks into a user's store as that user."""
    return subprocess.run(
        [*as_owner(store), sys.executable, "-m", "pytest_layers.cli", "--store", str(store), *args],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def as_owner(store: Path) -> list[str]:
    """A command prefix that runs as the owner of ``store`` when that is another user."""
    import pwd

    owner = os.stat(store).st_uid
    if owner == os.geteuid():
        return []
    return ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--"]


_CHECK_STORE = """
import sys
from pytest_layers.store import Store
with Store(sys.argv[1]) as opened:
    problems = opened.verify()
    for chain_id in opened.layers():
        assert opened.chain(chain_id)[-1].chain_id == chain_id, chain_id
print("\\n".join(map(str, problems)))
"""


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def our_mounts_under(path: Path) -> list[Path]:
    """Mounts at or below ``path`` in the namespace the child sessions were started in."""
    return namespaces.mounts_under(path)


def unmount_all_under(path: Path) -> None:
    """Last-resort cleanup so that a failing test never leaves a mount behind."""
    from pytest_layers import _linux

    for point in our_mounts_under(path):
        with contextlib.suppress(OSError):
            _linux.umount2(point, _linux.MNT_DETACH)


@contextlib.contextmanager
def overlayfs_mount(where: Path) -> Iterator[Path]:
    """A directory on a fresh overlay mount made under ``where`` (as a container's root
    filesystem is, or a store on it); unmounted on the way out, and checked gone."""
    from pytest_layers import _linux

    for sub in ("lower", "upper", "work", "merged"):
        (where / sub).mkdir()
    merged = where / "merged"
    _linux.mount(
        "overlay",
        merged,
        "overlay",
        0,
        f"lowerdir={where / 'lower'},upperdir={where / 'upper'},workdir={where / 'work'}",
    )
    try:
        yield merged
    finally:
        unmount_all_under(merged)
        assert our_mounts_under(merged) == []


@contextlib.contextmanager
def no_mounts_left(path: Path) -> Iterator[None]:
    """Unmount whatever a failing test left below ``path``."""
    try:
        yield
    finally:
        unmount_all_under(path)


def wait_for(
    predicate: object, what: str, proc: subprocess.Popen[str], timeout: float = 60
) -> None:
    """Poll ``predicate()`` until true; fail (with the child's output) if the child exits."""
    deadline = time.monotonic() + timeout
    assert callable(predicate)
    while not predicate():
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            pytest.fail(f"the session exited before {what}:\n{stdout}\n{stderr}")
        if time.monotonic() > deadline:
            kill(proc.pid, proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill(pid: int, proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``pid`` (the pytest process itself) and reap ``proc``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc.pid != pid:
        # A wrapper (runuser) exits once its child is gone.
        pass
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def ref_targets(store: Path) -> dict[str, str]:
    """Every ref file in the store -> the chain id it points at."""
    found = {}
    for path in (store / "refs").rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            with contextlib.suppress(ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict) and "chain_id" in data:
                    found[str(path.relative_to(store))] = data["chain_id"]
    return found


def assert_store_consistent(store: Path) -> None:
    """No partial layer, no dangling ref, every layer re-hashes to its digest (CLI and API)."""
    for entry in (store / "layers").iterdir():
        assert (entry / "layer.json").is_file(), f"partial layer visible: {entry}"
    layers = {"sha256:" + e.name for e in (store / "layers").iterdir()}
    for ref, chain_id in ref_targets(store).items():
        assert chain_id in layers, f"ref {ref} points at a missing layer {chain_id}"
    if as_owner(store):
        check = subprocess.run(
            [*as_owner(store), sys.executable, "-c", _CHECK_STORE, str(store)],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert check.returncode == 0, out(check)
        assert not check.stdout.strip(), out(check)
    else:
        with Store(store) as opened:
            problems = opened.verify()
            for info_id in layers:
                chain = opened.chain(info_id)
                assert chain[-1].chain_id == info_id
        assert not problems, "\n".join(map(str, problems))
    proc = cli(store, "verify")
    assert proc.returncode == 0, out(proc)


def dead_leftovers(store: Path, *, views: bool = True) -> list[str]:
    """Entries of dead processes in the store's tmp/ and (``views``) scratch/views/: a next
    session must have swept them."""
    left: list[str] = []
    tmp = store / "tmp"
    for name in os.listdir(tmp) if tmp.is_dir() else ():
        m = re.match(r"(\d+)-", name)
        if m is None or not _alive(int(m.group(1))):
            left.append(f"tmp/{name}")
    scratch = store / "scratch" / "views"
    for name in os.listdir(scratch) if views and scratch.is_dir() else ():
        m = re.match(r"(\d+)", name)
        if m is None or not _alive(int(m.group(1))):
            left.append(f"scratch/views/{name}")
    return left


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def builder_runs(path: Path) -> list[str]:
    log = path / "runs.log"
    return log.read_text().split() if log.exists() else []


def processes_in(pid_ns: str) -> list[int]:
    """The pids of the processes in the PID namespace ``pid_ns`` (a ``/proc/PID/ns/pid`` link's
    text) that this user can see."""
    import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv

    found = []
    for proc in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/pid") == pid_ns:
                found.append(proc.pid)
        except OSError:
            continue
    return found
