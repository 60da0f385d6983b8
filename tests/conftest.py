"""Shared test configuration: capability markers and helpers for running as the test user.

Capability markers skip a test, with the reason, on a machine that lacks the capability. CI sets
``PYTEST_LAYERS_REQUIRE=all`` (or a comma list such as ``root,overlay``) so that a missing
capability fails the test instead of hiding it behind a skip.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_layers import namespaces

#: The unprivileged account that `.ci/run` creates; override with PYTEST_LAYERS_TEST_USER.
TEST_USER = os.environ.get("PYTEST_LAYERS_TEST_USER", "layersci")

_PROBE_OVERLAY = r"""
import ctypes, os, sys, tempfile
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
if uid != 0:
    if libc.unshare(0x10000000 | 0x00020000) != 0:
        sys.exit("unshare(CLONE_NEWUSER|CLONE_NEWNS) failed: " + os.strerror(ctypes.get_errno()))
    with open("/proc/self/setgroups", "w") as f: f.write("deny")
    with open("/proc/self/uid_map", "w") as f: f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f: f.write(f"{gid} {gid} 1")
elif libc.unshare(0x00020000) != 0:
    sys.exit("unshare(CLONE_NEWNS) failed: " + os.strerror(ctypes.get_errno()))
libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None)   # MS_PRIVATE | MS_REC
d = tempfile.mkdtemp()
for x in "luwm":
    os.mkdir(os.path.join(d, x))
opts = f"lowerdir={d}/l,upperdir={d}/u,workdir={d}/w,userxattr".encode()
if libc.mount(b"overlay", f"{d}/m".encode(), b"overlay", 0, opts) != 0:
    sys.exit("overlay mount failed: " + os.strerror(ctypes.get_errno()))
"""


@functools.cache
def _probe(capability: str) -> str | None:
    """Return None when the capability is present, else the reason it is missing."""
    if capability == "root":
        return None if os.geteuid() == 0 else "needs root"
    if capability == "overlay":
        return _run_probe(_PROBE_OVERLAY, as_user=None)
    if capability == "userns":
        if os.geteuid() != 0:
            return _run_probe(_PROBE_OVERLAY, as_user=None)
        # As root, an unprivileged user namespace is what the test user would get.
        why = _probe("user")
        return why or _run_probe(_PROBE_OVERLAY, as_user=TEST_USER)
    if capability == "fuse":
        if shutil.which("fuse-overlayfs") is None:
            return "fuse-overlayfs is not installed (apt-get install fuse-overlayfs)"
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return "/dev/fuse is missing or not usable by this user"
        return None
    if capability == "user":
        if os.geteuid() != 0:
            return "needs root to switch to the test user"
        try:
            pwd.getpwnam(TEST_USER)
        except KeyError:
            return (
                f"test user {TEST_USER!r} does not exist "
                f"(.ci/run creates it: useradd -m {TEST_USER})"
            )
        if not os.access(sys.executable, os.X_OK) or _run_probe("", as_user=TEST_USER):
            return (
                f"{sys.executable} is not usable by {TEST_USER!r} "
                "(build the venv from /usr/bin/python3)"
            )
        return None
    if capability == "debian":
        return _debian_missing()
    if capability == "subids":
        return _subids_missing()
    if capability == "randomly":
        return (
            None
            if randomly_path() is not None
            else (
                "pytest-randomly is not installed (pip install pytest-randomly, or set "
                f"{RANDOMLY_PATH_VAR} to a directory it was installed into with pip --target, as "
                ".ci/run does)"
            )
        )
    if capability == "cc":
        # The sandbox's compiled init is built with it (pytest_layers/_cinit.py).
        if os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"):
            return None
        return "no C compiler for the sandbox's compiled init (apt-get install gcc libc6-dev)"
    if capability.startswith("tool:"):
        tool = capability[5:]
        return None if shutil.which(tool) else f"{tool} is not installed"
    raise ValueError(f"unknown capability {capability!r}")


#: A directory holding pytest-randomly (``pip install --target DIR pytest-randomly``) that only
#: the sessions of the tests asking for it put on their path: the suite itself and every other
#: session it starts keep their order (.ci/run sets it).
RANDOMLY_PATH_VAR = "PYTEST_LAYERS_RANDOMLY_PATH"


def randomly_path() -> str | None:
    """Where a child session finds pytest-randomly: ``""`` when this interpreter has it, the
    directory of ``PYTEST_LAYERS_RANDOMLY_PATH``, or None when neither has it."""
    import importlib.util

    if importlib.util.find_spec("pytest_randomly") is not None:
        return ""
    extra = os.environ.get(RANDOMLY_PATH_VAR, "")
    if extra and os.path.isfile(os.path.join(extra, "pytest_randomly", "__init__.py")):
        return extra
    return None


def _debian_missing() -> str | None:
    """Why the real Debian image of the end-to-end tests is not here, or None."""
    image = os.environ.get("PYTEST_LAYERS_DEBIAN_IMAGE", "")
    debs = os.environ.get("PYTEST_LAYERS_DEBIAN_DEBS", "")
    build = "build it with `.ci/debian_image.py CACHE_DIR` (as root) and export what it prints"
    if not image or not debs:
        return f"PYTEST_LAYERS_DEBIAN_IMAGE/PYTEST_LAYERS_DEBIAN_DEBS are not set: {build}"
    layout = image.removeprefix("oci:").rsplit(":", 1)[0]
    if not os.path.isfile(os.path.join(layout, "index.json")):
        return f"{image} is not an OCI layout: {build}"
    if not any(name.endswith(".deb") for name in os.listdir(debs)):
        return f"{debs} holds no .deb: {build}"
    return None


def _subids_missing() -> str | None:
    """Why the ordinary user the tests run as (ourselves, or the test user when we are root)
    has no subordinate ids to map, or None."""
    if os.geteuid() == 0:
        why = _probe("user")
        if why:
            return why
    who = TEST_USER if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    for tool in ("newuidmap", "newgidmap"):
        if shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin") is None:
            return f"{tool} is not installed (apt-get install uidmap)"
    for name in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            lines = []
        if not any(line.split(":")[0] == who for line in lines):
            return (
                f"{who} has no range in {name} (.ci/run gives one: usermod --add-subuids "
                f"100000-165535 --add-subgids 100000-165535 {who})"
            )
    return None


def _run_probe(code: str, as_user: str | None) -> str | None:
    cmd = [sys.executable, "-c", code]
    if as_user is not None:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]


def _required() -> set[str]:
    value = os.environ.get("PYTEST_LAYERS_REQUIRE", "")
    return {part.strip() for part in value.split(",") if part.strip()}


def require(capability: str) -> None:
    """Skip (or fail, when PYTEST_LAYERS_REQUIRE names it) unless the capability is present."""
    why = _probe(capability)
    if why is None:
        return
    required = _required()
    if "all" in required or capability in required or capability.split(":")[0] in required:
        pytest.fail(f"required capability {capability!r} is missing: {why}", pytrace=False)
    pytest.skip(f"{capability}: {why}")


@pytest.fixture(scope="session", autouse=True)
def _children_temproot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Give the pytest sessions our tests start (as root, with our environment) a temp root of
    their own. Several of them run at once (fleets, races): with the default root they prune
    each other's numbered dirs in /tmp/pytest-of-root while this session walks it, and pytest's
    walk then leaks a scandir iterator, which ``filterwarnings = error`` turns into a crash of
    this session at exit. This session's own basetemp is fixed first, so it stays where it was."""
    tmp_path_factory.getbasetemp()
    before = os.environ.get("PYTEST_DEBUG_TEMPROOT")
    root = tempfile.mkdtemp(prefix="pytest-layers-children-", dir=before)
    os.chmod(root, 0o1777)  # like /tmp: sessions of the test user make their own dir in it
    os.environ["PYTEST_DEBUG_TEMPROOT"] = root
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTEST_DEBUG_TEMPROOT"]
        else:
            os.environ["PYTEST_DEBUG_TEMPROOT"] = before
        # Child sessions may leave trees deeper than shutil.rmtree's recursion copes with.
        namespaces.remove_tree(Path(root))


_MARKER_CAPS = {
    "requires_root": "root",
    "requires_overlay": "overlay",
    "requires_userns": "userns",
    "requires_fuse": "fuse",
    "requires_user": "user",
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers():
        if marker.name in _MARKER_CAPS:
            require(_MARKER_CAPS[marker.name])
        elif marker.name == "requires_tool":
            for tool in marker.args:
                require(f"tool:{tool}")


def run_as_user(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run a command as the unprivileged test user (the caller must be root)."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": f"/home/{TEST_USER}"}
    full_env.update(env or {})
    return subprocess.run(
        [
            "runuser",
            "-u",
            TEST_USER,
            "--",
            "env",
            *(f"{k}={v}" for k, v in full_env.items()),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def user_tmp_path(tmp_path: Path) -> Path:
    """A tmp_path that the unprivileged test user owns (and can reach)."""
    require("user")
    entry = pwd.getpwnam(TEST_USER)
    path = Path("/tmp") / f"pytest-layers-user-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o755)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def registry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A plain-HTTP docker-registry on 127.0.0.1 for the session (tests/registry_util.py);
    always stopped at the end."""
    require("tool:docker-registry")
    require("tool:skopeo")
    from tests.registry_util import running

    with running(tmp_path_factory.mktemp("registry")) as server:
        yield server


def run_pytest_as_ordinary_user(
    project: Path, args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pytest ARGS`` in ``project`` as an ordinary user: ourselves, or the test
    user when we are root (then ``project`` must be the test user's, as ``user_tmp_path`` is)."""
    cmd = [sys.executable, "-m", "pytest", *args]
    if os.geteuid() == 0:
        full = {"PYTEST_DEBUG_TEMPROOT": str(project), **(env or {})}
        return run_as_user(cmd, cwd=project, env=full)
    return subprocess.run(
        cmd,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def ordinary_tmp_path(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A directory for :func:`run_pytest_as_ordinary_user`'s projects: ``tmp_path`` as an
    ordinary user (who needs user namespaces then), ``user_tmp_path`` as root."""
    if os.geteuid() != 0:
        require("userns")
        return tmp_path
    return Path(request.getfixturevalue("user_tmp_path"))
