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


def run_inner(project: Path, conftest: str, tests: str) -> subprocess.CompletedProcess[str]:
    (project / "conftest.py").write_text(conftest)
    (project / "test_ids.py").write_text(tests)
    if os.geteuid() == 0:
        for f in project.iterdir():
            os.chown(f, pwd.getpwnam(TEST_USER).pw_uid, -1)
    args = ["-p", "no:cacheprovider", "-rf", "-q", "-o", "faulthandler_timeout=20"]
    return run_pytest_as_ordinary_user(project, [*args, f"--basetemp={project / 'bt'}"])


def test_chown_to_other_ids_works_with_subordinate_ids(ordinary_tmp_path: Path) -> None:
    require("subids")
    uid0 = _first_range("/etc/subuid", _who())
    gid0 = _first_range("/etc/subgid", _who())
    proc = run_inner(
        ordinary_tmp_path,
        CONFTEST,
        f"""
import os, pytest

@pytest.mark.layer("bb")
def test_chown(rootfs):
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
""",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


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
    with pytest.raises(SandboxError, match="only uid 0 inside exists.*usermod --add-subuids"):
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
        assert "apt-get install uidmap" in out


def test_doctor_says_which_ids_exist_inside() -> None:
    require("subids")
    code = "from pytest_layers import _subids; print(_subids.describe())"
    cmd = [sys.executable, "-c", code]
    proc = (
        run_as_user(cmd, cwd="/")
        if os.geteuid() == 0
        else subprocess.run(cmd, capture_output=True, text=True, check=False)
    )
    assert proc.returncode == 0, proc.stderr
    initial = Path("/proc/self/uid_map").read_text().split()[:3] == ["0", "0", "4294967295"]
    if os.geteuid() == 0 or initial:
        assert "1-65536 (your subordinate ids, through newuidmap)" in proc.stdout
    else:  # inside our session's namespace: the range it maps
        assert "(your subordinate ids, through the session's user namespace)" in proc.stdout


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
