"""``rootfs.diff(details=True)`` with snapshot tools: syrupy, pytest-regressions, pytest-snapshot.

Each recipe of docs/how-to/snapshot-testing.md runs here with its tool: a snapshot is written
(``--snapshot-update``, or the tool's first run), the suite then passes, and a change in the
code under test fails it with a difference a reviewer can read.
"""

from __future__ import annotations

import os

import pytest

from tests.pypi_util import fetch

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "etc/motd").write_text("hello\\n")
"""

#: The code under test: installs an app into a root filesystem.
APP_V1 = """
def install(root):
    (root / "etc/app.conf").write_text("debug=false\\n")
    (root / "etc/motd").unlink()
"""
APP_V2 = """
def install(root):
    (root / "etc/app.conf").write_text("debug=true\\n")
    (root / "etc/motd").unlink()
    (root / "etc/app.d").mkdir()
"""

SYRUPY_TESTS = """
import pytest
import app
from pytest_layers.syrupy_ext import DiffExtension

@pytest.mark.layer("base")
def test_install(rootfs, snapshot):
    app.install(rootfs.path)
    assert rootfs.diff(details=True) == snapshot(extension_class=DiffExtension)

@pytest.mark.layer("base")
def test_install_amber(rootfs, snapshot):
    app.install(rootfs.path)
    assert rootfs.diff(details=True).to_data() == snapshot
"""


def _project(pytester: pytest.Pytester, tests: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(app=APP_V1, test_app=tests)
    pytester.syspathinsert()


def test_syrupy_snapshot_update_then_readable_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("syrupy", reason="in the test extra")
    _project(pytester, SYRUPY_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    missing = pytester.runpytest_subprocess()
    missing.assert_outcomes(failed=2)
    missing.stdout.fnmatch_lines(["*Snapshot 'test_install' does not exist!*"])

    pytester.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=2)
    stored = pytester.path / "__snapshots__" / "test_app" / "test_install.txt"
    lines = stored.read_text().splitlines()
    assert lines[0] == "C /etc dir 0755"
    assert lines[1].startswith("A /etc/app.conf file 0644 12 sha256:")
    assert lines[2] == "D /etc/motd"
    assert len(lines) == 3
    amber = (pytester.path / "__snapshots__" / "test_app.ambr").read_text()
    assert "'kind': 'A'" in amber
    assert "'path': '/etc/app.conf'" in amber
    pytester.runpytest_subprocess().assert_outcomes(passed=2)

    # The code under test changes: the snapshot test fails and says what differs.
    pytester.makepyfile(app=APP_V2)
    changed = pytester.runpytest_subprocess()
    changed.assert_outcomes(failed=2)
    changed.stdout.fnmatch_lines(
        [
            "*- A /etc/app.conf file 0644 12 sha256:*",
            "*+ A /etc/app.conf file 0644 11 sha256:*",
            "*+ A /etc/app.d dir 0755*",
        ]
    )
    # Accepted with --snapshot-update, as syrupy does for any snapshot.
    pytester.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=2)
    assert "A /etc/app.d dir 0755\n" in stored.read_text()


REGRESSIONS_TESTS = """
import pytest
import app

@pytest.mark.layer("base")
def test_install(rootfs, data_regression):
    app.install(rootfs.path)
    data_regression.check(rootfs.diff(details=True).to_data())
"""


@pytest.mark.parametrize("datadir_from", ["pytest-datadir", "layers_datadir"])
def test_pytest_regressions_data_regression(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, datadir_from: str
) -> None:
    """data_regression reads its expected files through the ``datadir`` fixtures: run on
    pytest-datadir's and on ours."""
    pytest.importorskip("pytest_regressions", reason="in the test extra")
    _project(pytester, REGRESSIONS_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    args: list[str] = []
    if datadir_from == "layers_datadir":
        pytester.makefile(".ini", pytest="[pytest]\nlayers_datadir = true\n")
        args = ["-p", "no:pytest-datadir"]
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*File not found in data directory, created*"])
    expected = (pytester.path / "test_app" / "test_install.yml").read_text()
    assert "path: /etc/app.conf" in expected
    assert "kind: D" in expected
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    pytester.makepyfile(app=APP_V2)
    changed = pytester.runpytest_subprocess(*args)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["*FILES DIFFER*", "*+  path: /etc/app.d*"])


SNAPSHOT_TESTS = """
import pytest
import app

@pytest.mark.layer("base")
def test_install(rootfs, snapshot):
    app.install(rootfs.path)
    snapshot.assert_match(rootfs.diff(details=True).to_text(), "diff.txt")
"""


def test_pytest_snapshot_assert_match(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = fetch("pytest-snapshot==0.9.0", sdist=False)
    _project(pytester, SNAPSHOT_TESTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(wheel)]))
    # pytest-snapshot and syrupy both define --snapshot-update: keep syrupy out of this run.
    args = ["-p", "no:syrupy"]
    pytester.runpytest_subprocess(*args).assert_outcomes(failed=1)
    # pytest-snapshot reports an update as an error at teardown, by design.
    updated = pytester.runpytest_subprocess(*args, "--snapshot-update")
    updated.assert_outcomes(passed=1, errors=1)
    updated.stdout.fnmatch_lines(["*Snapshot directory was modified*"])
    stored = pytester.path / "snapshots" / "test_app" / "test_install" / "diff.txt"
    assert stored.read_text().splitlines()[2] == "D /etc/motd"
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    pytester.makepyfile(app=APP_V2)
    changed = pytester.runpytest_subprocess(*args)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["*+ A /etc/app.d dir 0755*"])
