"""``layer_from_path``: a directory of the repository as a layer."""

from __future__ import annotations

import os
import socket
import stat

import pytest

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
from pytest_layers import layer, layer_from_path

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")

data = layer_from_path("data", "tests_data")
data_on_base = layer_from_path("data_on_base", "tests_data", parent=base)

@layer(parent=data)
def app(root):
    (root / "app.conf").write_text("debug=false\\n")
"""

TESTS = """
import os
import pytest

@pytest.mark.layer("app")
def test_parent(rootfs):
    assert (rootfs / "app.conf").read_text() == "debug=false\\n"
    assert (rootfs / "greeting.txt").read_text() == os.environ["GREETING"]

@pytest.mark.layer("data_on_base")
def test_on_base(rootfs):
    assert (rootfs / "etc/os-release").read_text() == "ID=demo\\n"
    assert (rootfs / "greeting.txt").read_text() == os.environ["GREETING"]

@pytest.mark.layer("data")
def test_metadata(rootfs):
    src = os.path.join(os.environ["SRC"], "bin/run.sh")
    assert os.stat(rootfs / "bin/run.sh").st_mtime_ns == os.stat(src).st_mtime_ns
    assert os.stat(rootfs / "bin/run.sh").st_mode & 0o777 == 0o755
    assert os.readlink(rootfs / "link") == "greeting.txt"
"""


IMPORT = "from pytest_layers import layer_from_path\n"


def _project(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_p=TESTS)
    data = pytester.path / "tests_data"
    (data / "bin").mkdir(parents=True)
    (data / "greeting.txt").write_text("hello\n")
    (data / "bin" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(data / "bin" / "run.sh", 0o755)
    os.utime(data / "bin" / "run.sh", (1_600_000_000, 1_600_000_000))
    os.symlink("greeting.txt", data / "link")


def test_parent_marker_metadata_and_cache(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(pytester)
    monkeypatch.setenv("SRC", str(pytester.path / "tests_data"))
    monkeypatch.setenv("GREETING", "hello\n")
    first = pytester.runpytest_subprocess()
    first.assert_outcomes(passed=3)
    first.stdout.fnmatch_lines(["*built data *"])
    # Unchanged directory: every layer comes from the build cache.
    second = pytester.runpytest_subprocess()
    second.assert_outcomes(passed=3)
    second.stdout.fnmatch_lines(["*cached data *"])
    second.stdout.no_fnmatch_line("*built*")
    # Changed content: rebuilt, with the layers on top of it.
    (pytester.path / "tests_data" / "greeting.txt").write_text("hi\n")
    monkeypatch.setenv("GREETING", "hi\n")
    third = pytester.runpytest_subprocess()
    third.assert_outcomes(passed=3)
    third.stdout.fnmatch_lines(["*built data *"])
    third.stdout.fnmatch_lines(["*built app *"])


def test_missing_directory_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(IMPORT + "d = layer_from_path('d', 'nope')")
    pytester.makepyfile(
        test_p="import pytest\n@pytest.mark.layer('d')\ndef test_it(rootfs):\n    pass\n"
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["layer 'd' (*conftest.py:2): */nope does not exist; layer_from_path takes a dir*"]
    )


def test_path_outside_rootdir_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(IMPORT + "d = layer_from_path('d', '../x')")
    result = pytester.runpytest_subprocess()
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*layer_from_path('d', '../x'): the path must be relative*"])


def test_socket_is_refused_and_nothing_is_stored(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(IMPORT + "d = layer_from_path('d', 'd')")
    pytester.makepyfile(
        test_p="import pytest\n@pytest.mark.layer('d')\ndef test_it(rootfs):\n    pass\n"
    )
    (pytester.path / "d").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(pytester.path / "d" / "s.sock"))
        result = pytester.runpytest_subprocess()
    finally:
        sock.close()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["layer 'd': */d/s.sock is a socket; a data directory can*"])
    layers = pytester.path / ".pytest_cache" / "layers" / "layers"
    assert not layers.exists() or not any(layers.iterdir())
    assert stat.S_ISSOCK(os.lstat(pytester.path / "d" / "s.sock").st_mode)
