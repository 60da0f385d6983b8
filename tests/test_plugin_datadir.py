"""ini ``layers_datadir = true``: pytest-datadir's fixtures served from layers.

The proof is pytest-datadir's own test suite (its sdist, fetched at test time) passing on our
fixtures with pytest-datadir's plugin blocked and its module shadowed.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.pypi_util import fetch

#: The release whose source the fixtures were checked against (and whose suite is run).
PYTEST_DATADIR = "pytest-datadir==1.9.0"
INI = "[pytest]\nlayers_datadir = true\n"
#: pytest-datadir's tests import ``LazyDataDir`` from its module for a type annotation; this
#: stand-in is all of ``pytest_datadir`` that its suite sees here.
SHIM = "from pytest_layers.datadir import LazyDataDir\n\n__all__ = ['LazyDataDir']\n"
NO_DATADIR = ("-p", "no:pytest-datadir", "-p", "no:regressions")


def _shadow_pytest_datadir(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    shim = pytester.path / "shim" / "pytest_datadir"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("")
    (shim / "plugin.py").write_text(SHIM)
    monkeypatch.setenv("PYTHONPATH", str(shim.parent))


def test_pytest_datadir_own_suite_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdist = fetch(PYTEST_DATADIR, sdist=True)
    shutil.copytree(sdist / "tests", pytester.path / "tests")
    # test_pathlib.py tests _win32_longpath, a private Windows path helper of pytest-datadir
    # (one of its two tests is Windows-only): nothing of the fixtures' contract.
    (pytester.path / "tests" / "test_pathlib.py").unlink()
    pytester.makefile(".ini", pytest=INI)
    _shadow_pytest_datadir(pytester, monkeypatch)

    result = pytester.runpytest_subprocess(*NO_DATADIR, "tests", "-v")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["layers: layers_datadir = true: datadir fixtures served*"])
    # Every fixture its suite uses is ours, and nothing of pytest-datadir's ran.
    fixtures = pytester.runpytest_subprocess(*NO_DATADIR, "tests", "--fixtures")
    out = fixtures.stdout.str()
    ours = out.split("fixtures defined from pytest_layers.datadir", 1)[1]
    ours = ours.split("fixtures defined from", 1)[0]
    for name in ("original_datadir", "datadir", "shared_datadir", "lazy_datadir"):
        assert f"\n{name} " in ours, out
    assert "defined from pytest_datadir" not in out


DATA_TESTS = """
import os
import pytest

MOUNTS = os.environ.get("EXPECT_MOUNTS") == "1"


@pytest.mark.parametrize("run", [1, 2])
def test_private_writable_view(run, datadir, shared_datadir, original_datadir, tmp_path):
    assert datadir == tmp_path / "test_d" and shared_datadir == tmp_path / "data"
    assert original_datadir == original_datadir.parent / "test_d"
    assert os.path.ismount(datadir) == MOUNTS == os.path.ismount(shared_datadir)
    # Each test starts from the originals, whatever the one before wrote.
    assert (datadir / "a.txt").read_text() == "one\\n"
    assert sorted(os.listdir(shared_datadir)) == ["s.txt"]
    (datadir / "a.txt").write_text("changed\\n")
    (datadir / "new.txt").write_text("new\\n")
    (shared_datadir / "s.txt").unlink()
    assert (original_datadir / "a.txt").read_text() == "one\\n"
"""


@pytest.mark.requires_overlay
def test_views_are_private_and_layers_cached(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makefile(".ini", pytest=INI)
    pytester.makepyfile(test_d=DATA_TESTS)
    (pytester.path / "test_d").mkdir()
    (pytester.path / "test_d" / "a.txt").write_text("one\n")
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "s.txt").write_text("shared\n")
    monkeypatch.setenv("EXPECT_MOUNTS", "1")
    result = pytester.runpytest_subprocess(*NO_DATADIR)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*built datadir:test_d *", "*built datadir:data *"])
    again = pytester.runpytest_subprocess(*NO_DATADIR)
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["*cached datadir:test_d *"])
    # A change of the directory rebuilds its layer; the tests see the new content.
    (pytester.path / "test_d" / "a.txt").write_text("two\n")
    changed = pytester.runpytest_subprocess(*NO_DATADIR)
    changed.assert_outcomes(failed=2)
    # The progress lines come in the terminal summary, after the failures.
    changed.stdout.fnmatch_lines(["*'two\\n' == 'one\\n'*", "*built datadir:test_d *"])
    assert (pytester.path / "test_d" / "a.txt").read_text() == "two\n"
    assert (pytester.path / "data" / "s.txt").read_text() == "shared\n"


def test_host_namespace_copies(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where nothing may be mounted in a private namespace, the views are plain copies of the
    layer (as pytest-datadir makes): same paths, same isolation."""
    pytester.makefile(".ini", pytest=INI + "layers_mount_namespace = host\n")
    pytester.makepyfile(test_d=DATA_TESTS)
    (pytester.path / "test_d").mkdir()
    (pytester.path / "test_d" / "a.txt").write_text("one\n")
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "s.txt").write_text("shared\n")
    monkeypatch.setenv("EXPECT_MOUNTS", "0")
    pytester.runpytest_subprocess(*NO_DATADIR, "--layers-backend=copy").assert_outcomes(passed=2)


def test_ini_off_serves_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_d="def test_it(datadir):\n    pass\n")
    result = pytester.runpytest_subprocess(*NO_DATADIR)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'datadir' not found*"])
    result.stdout.no_fnmatch_line("*layers_datadir*")


@pytest.mark.requires_overlay
def test_with_pytest_datadir_installed_the_ini_decides(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pytest_datadir", reason="pytest-regressions (test extra) brings it")
    pytester.makepyfile(
        test_d="""
        import os
        def test_it(datadir):
            assert os.path.ismount(datadir) == (os.environ["OURS"] == "1")
        """
    )
    (pytester.path / "test_d").mkdir()
    (pytester.path / "test_d" / "a.txt").write_text("one\n")
    monkeypatch.setenv("OURS", "0")
    theirs = pytester.runpytest_subprocess()
    theirs.assert_outcomes(passed=1)
    theirs.stdout.no_fnmatch_line("*layers_datadir*")
    monkeypatch.setenv("OURS", "1")
    pytester.makefile(".ini", pytest=INI)
    ours = pytester.runpytest_subprocess()
    ours.assert_outcomes(passed=1)
    ours.stdout.fnmatch_lines(
        ["layers: layers_datadir = true: *(pytest-datadir's own are overridden)"]
    )


@pytest.mark.requires_overlay
def test_pytest_datadir_from_the_rootconftest_is_overridden(pytester: pytest.Pytester) -> None:
    """``pytest_plugins`` in the root conftest loads pytest-datadir before the plugins are
    configured, so ours are registered after it and win, as with its entry point."""
    pytest.importorskip("pytest_datadir", reason="pytest-regressions (test extra) brings it")
    pytester.makefile(".ini", pytest=INI)
    pytester.makeconftest('pytest_plugins = ["pytest_datadir.plugin"]\n')
    pytester.makepyfile(
        test_d="import os\ndef test_it(datadir):\n    assert os.path.ismount(datadir)\n"
    )
    (pytester.path / "test_d").mkdir()
    result = pytester.runpytest_subprocess(*NO_DATADIR)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["layers: *(pytest-datadir's own are overridden)"])


LATE_CONFTEST = """
import pytest

@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    import pytest_datadir.plugin
    config.pluginmanager.register(pytest_datadir.plugin, "late-datadir")
"""


def test_pytest_datadir_registered_later_is_refused(pytester: pytest.Pytester) -> None:
    """Registered after ours, pytest-datadir's fixtures would win silently: refused."""
    pytest.importorskip("pytest_datadir", reason="pytest-regressions (test extra) brings it")
    pytester.makefile(".ini", pytest=INI)
    pytester.makeconftest(LATE_CONFTEST)
    pytester.makepyfile(test_d="def test_it(datadir):\n    pass\n")
    result = pytester.runpytest_subprocess(*NO_DATADIR)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*layers_datadir = true serves pytest-datadir's fixtures from pytest-layers, but *"]
    )


def test_missing_shared_data_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makefile(".ini", pytest=INI)
    pytester.makepyfile(test_d="def test_it(shared_datadir):\n    pass\n")
    result = pytester.runpytest_subprocess(*NO_DATADIR)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["E * shared_datadir: no shared data directory */data for *"])


@pytest.mark.requires_fuse
def test_fuse_views_are_bind_mounted(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fuse-overlayfs view cannot be moved: it is bind-mounted at the same path. An ordinary
    user's fuse session has no namespace of its own to mount in: copies there."""
    pytester.makefile(".ini", pytest=INI)
    pytester.makepyfile(test_d=DATA_TESTS)
    (pytester.path / "test_d").mkdir()
    (pytester.path / "test_d" / "a.txt").write_text("one\n")
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "s.txt").write_text("shared\n")
    monkeypatch.setenv("EXPECT_MOUNTS", "1" if os.geteuid() == 0 else "0")
    result = pytester.runpytest_subprocess(*NO_DATADIR, "--layers-backend=fuse")
    result.assert_outcomes(passed=2)
