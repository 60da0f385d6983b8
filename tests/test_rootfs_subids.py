"""Identity inside ``rootfs.run()`` for an ordinary user (issue 14): with a subordinate id range
(/etc/subuid, newuidmap), uid 0 inside is the user and 1..N its range, so ``chown`` to other ids
works; without one, a ``chown`` fails with EINVAL and the errors say why and what to do.

As root these run the inner session as the test user (`.ci/run` gives it a range), so the root
suite covers the newuidmap path; as an ordinary user they run it as ourselves, nested in our own
session's namespace, which covers the path where the range is passed on."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_USER, require, run_as_user, run_pytest_as_ordinary_user

from pytest_layers import _subids

pytestmark = pytest.mark.requires_tool("busybox")

CONFTEST = """
import os, shutil
from pytest_layers import layer

@layer
def bb(root):
    for d in ("bin", "etc", "tmp"):
        (root / d).mkdir()
    (root / "tmp").chmod(0o1777)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for name in "sh id chown stat touch cat".split():
        os.symlink("busybox", root / "bin" / name)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\\n"
                                     "app:x:1000:1000:app:/home/app:/bin/sh\\n")
"""

# The user's sessions get no subordinate ids, whatever the machine has: what a user without a
# range (or without newuidmap) gets.
WITHOUT = """
from pytest_layers import _subids
_subids.available = lambda: _subids.Ranges(missing="no range for this test")
"""


def _who() -> str:
    return TEST_USER if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def _first_range(path: str, who: str) -> int:
    for line in Path(path).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == who:
            return int(fields[1])
    raise AssertionError(f"{who} has no range in {path}")


def run_inner(
    project: Path, conftest: str, tests: str, *args: str
) -> subprocess.CompletedProcess[str]:
    (project / "conftest.py").write_text(conftest)
    (project / "test_ids.py").write_text(tests)
    if os.geteuid() == 0:
        for f in project.iterdir():
            os.chown(f, pwd.getpwnam(TEST_USER).pw_uid, -1)
    common = ["-p", "no:cacheprovider", "-rf", "-q", "-o", "faulthandler_timeout=20"]
    common += [f"--basetemp={project / 'bt'}", f"--layers-store={project / 'store'}"]
    return run_pytest_as_ordinary_user(project, [*common, *args])


def as_user(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        return run_as_user(cmd, cwd="/")
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_chown_to_other_ids_works_with_subordinate_ids(ordinary_tmp_path: Path) -> None:
    require("subids")
    require("cc")
    uid0 = _first_range("/etc/subuid", _who())
    gid0 = _first_range("/etc/subgid", _who())
    proc = run_inner(
        ordinary_tmp_path,
        CONFTEST,
        f"""
import os, pytest

@pytest.mark.layer("bb")
@pytest.mark.parametrize("way", ["compiled", "helper", "fork"])
def test_chown(rootfs, way, monkeypatch):
    # Every way to start init: the compiled init (this process writes the maps with the
    # range), the Python init by the sandbox's fork helper (in this session's namespace, so it
    # writes them) and by this process's own fork.
    from pytest_layers import _zygote, sandbox
    helper = way == "helper"
    monkeypatch.setenv("PYTEST_LAYERS_INIT", "compiled" if way == "compiled" else "python")
    if helper:
        assert _zygote.get(sandbox._identity, wait=60) is not None, _zygote._helper.why
        served = _zygote._helper.served
    else:
        monkeypatch.setattr(_zygote, "get", lambda *a, **k: None)
    r = rootfs.run(["sh", "-c", "touch /tmp/f; chown 1234:55 /tmp/f; stat -c '%u %g' /tmp/f"],
                   text=True, check=True)
    assert r.stdout == "1234 55\\n", r
    # Outside, id N inside is the range's start + N - 1; uid 0 inside stays the user.
    st = (rootfs / "tmp/f").stat()
    assert (st.st_uid, st.st_gid) == ({uid0} + 1233, {gid0} + 54)
    rootfs.run(["touch", "/tmp/mine"], check=True)
    assert (rootfs / "tmp/mine").stat().st_uid == os.getuid()
    assert "A /tmp/f" in [str(c) for c in rootfs.diff()]
    r = rootfs.run(["sh", "-c", "id -u; id -g; touch /tmp/app"], user="app", text=True,
                   check=True)
    assert r.stdout.split() == ["1000", "1000"]
    assert (rootfs / "tmp/app").stat().st_uid == {uid0} + 999
    if helper:
        assert _zygote._helper.served == served + 3
""",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_chown_without_subordinate_ids_fails_and_says_why(ordinary_tmp_path: Path) -> None:
    if os.geteuid() == 0:
        require("user")
    proc = run_inner(
        ordinary_tmp_path,
        CONFTEST + WITHOUT,
        """
import subprocess, sys, pytest
from pytest_layers.errors import SandboxError

@pytest.mark.layer("bb")
def test_refused(rootfs):
    r = rootfs.run(["sh", "-c", "touch /tmp/f; chown 1234 /tmp/f"])
    assert r.returncode != 0 and b"Invalid argument" in r.stderr, r
    with pytest.raises(SandboxError, match="only uid 0 inside exists.*no range for this test"):
        rootfs.run(["id"], user="app")
    # uid 0 inside still works, and is the user outside.
    assert rootfs.run(["chown", "0", "/tmp/f"]).returncode == 0

@pytest.mark.layer("bb")
def test_fails_with_a_note(rootfs):
    rootfs.run(["touch", "/tmp/f"], check=True)
    rootfs.run(["chown", "1234", "/tmp/f"], check=True)
""",
    )
    out = proc.stdout
    assert "1 failed, 1 passed" in out, out + proc.stderr
    assert "CalledProcessError" in out
    if sys.version_info >= (3, 11):  # exception notes
        assert "note: only uid 0 exists inside this sandbox" in out
        assert "no range for this test" in out


def test_the_copy_backend_maps_no_subordinate_ids(ordinary_tmp_path: Path) -> None:
    # Outside a user namespace the session could neither read nor remove files a program gave
    # to other ids: chown fails with EINVAL there, and user= says why.
    if Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]:
        pytest.skip(
            "this session runs in a user namespace, which a copy session started from it "
            "inherits (with its range): only a root run (the test user from outside) shows it"
        )
    proc = run_inner(
        ordinary_tmp_path,
        CONFTEST,
        """
import pytest
from pytest_layers.errors import SandboxError

@pytest.mark.layer("bb")
def test_refused(rootfs):
    r = rootfs.run(["sh", "-c", "touch /tmp/f; chown 1234 /tmp/f"])
    assert r.returncode != 0 and b"Invalid argument" in r.stderr, r
    with pytest.raises(SandboxError, match="outside a user namespace.*overlay backend"):
        rootfs.run(["id"], user="app")
""",
        "--layers-backend=copy",
    )
    assert "1 passed" in proc.stdout, proc.stdout + proc.stderr


def test_prune_removes_snapshots_holding_other_ids(ordinary_tmp_path: Path) -> None:
    require("subids")
    proc = run_inner(
        ordinary_tmp_path,
        CONFTEST,
        """
import pytest

@pytest.mark.layer("bb")
def test_fails(rootfs):
    rootfs.run(["sh", "-c", "mkdir -p /tmp/d/e; touch /tmp/d/e/f; chmod 700 /tmp/d/e /tmp/d; "
                "chown -R 1234:55 /tmp/d"], check=True)
    assert False
""",
    )
    assert "1 failed" in proc.stdout, proc.stdout + proc.stderr
    store = ordinary_tmp_path / "store"
    me = pwd.getpwnam(_who()).pw_uid
    assert any(p.lstat().st_uid != me for p in store.rglob("*"))  # the snapshot holds them
    cli = [sys.executable, "-m", "pytest_layers.cli", "--store", str(store)]
    done = as_user([*cli, "prune", "--keep-snapshots", "0"])
    assert done.returncode == 0, done.stderr
    assert "1 snapshot(s)" in done.stdout
    assert [p for p in store.rglob("*") if p.lstat().st_uid != me] == []


def test_doctor_says_which_ids_exist_inside() -> None:
    require("subids")
    code = "from pytest_layers import _subids, namespaces; {}print(_subids.describe())"
    # In a session's user namespace (overlay): the range it maps; outside one: none.
    proc = as_user([sys.executable, "-c", code.format("namespaces.enter_user_namespace(); ")])
    assert proc.returncode == 0, proc.stderr
    assert "ids inside run(): 0 (you) and 1-65536 (your subordinate ids" in proc.stdout
    if Path("/proc/self/uid_map").read_text().split()[:3] == ["0", "0", "4294967295"]:
        proc = as_user([sys.executable, "-c", code.format("")])
        assert "only 0 (you)" in proc.stdout
        assert "outside a user namespace (the copy or fuse backend)" in proc.stdout


def test_reasons_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setattr(_subids, "SUBUID", empty)
    why = _subids._from_files(os.getuid()).missing
    assert "has no range in" in why
    assert "usermod --add-subuids 100000-165535" in why
    me = pwd.getpwuid(os.getuid()).pw_name
    ranged = tmp_path / "ranged"
    ranged.write_text(f"{me}:100000:65536\n")
    monkeypatch.setattr(_subids, "SUBUID", ranged)
    monkeypatch.setattr(_subids, "SUBGID", ranged)
    monkeypatch.setattr(_subids, "_HELPER_PATH", str(tmp_path))
    assert "apt-get install uidmap" in _subids._from_files(os.getuid()).missing


def test_ranges_are_read_from_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    sub = tmp_path / "subuid"
    sub.write_text(f"other:1:5\n{me}:200000:10\n{os.getuid()}:300000:5\nbad line\n{me}:x:1\n")
    assert _subids._file_ranges(sub, me, os.getuid()) == ((200000, 10), (300000, 5))
    assert _subids._file_ranges(tmp_path / "absent", me, os.getuid()) == ()
    assert _subids.lines(1001, [(200000, 10), (300000, 5)], identity=False) == [
        (0, 1001, 1),
        (1, 200000, 10),
        (11, 300000, 5),
    ]
    assert _subids.lines(1001, [(200000, 10)], identity=True) == [
        (1001, 1001, 1),
        (200000, 200000, 10),
    ]
    # A session namespace's map: the ids other than our own are what a child can get.
    assert _subids._others(1001, [(1001, 1001, 1), (100000, 100000, 65536)]) == ((100000, 65536),)
    assert _subids._others(5, [(0, 0, 10)]) == ((0, 5), (6, 4))
