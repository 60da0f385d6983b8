"""The ``rootfs`` fixture takes its test from the run protocol under way, not from ``request``:
the right item under xdist, pytest-randomly, classes, parametrization and fixtures that wrap it;
a clear error where no test is running."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
import pytest
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")

@pytest.fixture
def wrapped(rootfs):
    return rootfs
"""

TESTS = """
import pytest
from pytest_layers.plugin import _ROOTFS

def own(request, rootfs):
    # The lifecycle the fixture made is on this test's item, for this test, and is this view.
    life = request.node.stash[_ROOTFS]
    assert life.test == request.node.nodeid
    assert life.rootfs is rootfs
    assert not (rootfs / "mine").exists()
    (rootfs / "mine").write_text(request.node.nodeid)

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(12))
def test_param(request, rootfs, i):
    own(request, rootfs)

@pytest.mark.layer("base")
class TestNested:
    class TestInner:
        @pytest.mark.parametrize("j", range(6))
        def test_inner(self, request, rootfs, j):
            own(request, rootfs)

    def test_wrapped(self, request, wrapped):
        own(request, wrapped)

def test_no_rootfs():
    pass

@pytest.mark.layer("base")
def test_by_getfixturevalue(request):
    own(request, request.getfixturevalue("rootfs"))
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_each_test_gets_the_rootfs_made_for_its_own_item(
    pytester: pytest.Pytester, xdist: bool
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_items=TESTS)
    args = ["-n", "2"] if xdist else ["-p", "no:xdist"]
    result = pytester.runpytest_subprocess("-p", "no:randomly", *args)
    result.assert_outcomes(passed=21)


def test_the_right_item_under_pytest_randomly(pytester: pytest.Pytester) -> None:
    from conftest import randomly_path, require

    require("randomly")
    extra = randomly_path()
    if extra:
        pytester._monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(p for p in (extra, os.environ.get("PYTHONPATH")) if p)
        )
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_items=TESTS)
    result = pytester.runpytest_subprocess("-p", "randomly", "-p", "no:xdist")
    result.stdout.fnmatch_lines(["*Using --randomly-seed=*"])
    result.assert_outcomes(passed=21)


def test_rootfs_outside_a_test_run_is_a_clear_error(pytester: pytest.Pytester) -> None:
    """A plugin that runs tests without the pytest_runtest_protocol hook: the fixture says
    why it cannot tell which test it is for, instead of using some other test's item."""
    pytester.makeconftest(
        CONFTEST
        + """
from _pytest.runner import runtestprotocol

@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    for item in session.items:
        runtestprotocol(item, nextitem=None)
    return True
"""
    )
    pytester.makepyfile(
        """
import pytest

@pytest.mark.layer("base")
def test_it(rootfs):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:xdist")
    result.stdout.fnmatch_lines(["*the rootfs fixture was set up outside a test's run*"])
    result.assert_outcomes(errors=1)
