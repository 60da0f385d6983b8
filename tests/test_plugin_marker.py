"""The layer marker: union stacking, closest marker wins, layers_default, init layer, hooks."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/who").write_text("base")
    (root / "etc/base-only").write_text("b")

@layer(parent=base)
def left(root):
    (root / "etc/who").write_text("left")
    (root / "etc/left").write_text("l")

@layer(parent=base)
def right(root):
    (root / "etc/who").write_text("right")
    (root / "etc/right").write_text("r")
    (root / "etc/base-only").unlink()

def pytest_layers_init(item):
    return {"etc/hostname": item.name + "\\n", "etc/motd": "from hook"}
"""

TESTS = """
import pytest
from pytest_layers import Rootfs

pytestmark = pytest.mark.layer("right")

def test_module_marker(rootfs):
    assert isinstance(rootfs, Rootfs)
    assert (rootfs / "etc/who").read_text() == "right"

@pytest.mark.layer("left", "right")
def test_union_leftmost_on_top(rootfs):
    assert (rootfs / "etc/who").read_text() == "left"
    assert (rootfs / "etc/left").exists() and (rootfs / "etc/right").exists()
    # right deleted base-only; the shared base sits once, at the bottom
    assert not (rootfs / "etc/base-only").exists()
    assert [x.name for x in rootfs.layers] == ["base", "right", "left"]
    assert rootfs.layers[2].parent is rootfs.layers[1]
    assert rootfs.diff() == []

@pytest.mark.layer("right", "left")
def test_union_other_order(rootfs):
    assert (rootfs / "etc/who").read_text() == "right"
    assert [x.name for x in rootfs.layers] == ["base", "left", "right"]

@pytest.mark.layer("left")
class TestClass:
    def test_class_marker(self, rootfs):
        assert (rootfs / "etc/who").read_text() == "left"

    @pytest.mark.layer("base", init={"etc/motd": "from marker", "srv/new/file": b"\\x00"})
    def test_closest_wins_and_init(self, rootfs):
        assert (rootfs / "etc/who").read_text() == "base"
        assert (rootfs / "etc/hostname").read_text() == "test_closest_wins_and_init\\n"
        assert (rootfs / "etc/motd").read_text() == "from marker"
        assert (rootfs / "srv/new/file").read_bytes() == b"\\x00"
        # init files and the directories they needed never show up as changes
        assert rootfs.diff() == []
        (rootfs / "etc/hostname").write_text("x")
        (rootfs / "srv/new/other").write_text("y")
        assert "/etc/hostname" not in [c.path for c in rootfs.diff()]
        lay = rootfs.commit()
        assert "/etc/hostname" not in [c.path for c in lay.changes()]
"""


def test_marker_union_init(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_marker=TESTS)
    pytester.makepyfile(
        test_default="""
        def test_default_image(rootfs):
            assert (rootfs / "etc/who").read_text() == "left"
        """
    )
    pytester.makeini("[pytest]\nlayers_default = left\n")
    result = pytester.runpytest_subprocess("--strict-markers", "-W", "error")
    result.assert_outcomes(passed=6)


def test_fixtures_listing(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest_subprocess("--fixtures")
    result.stdout.fnmatch_lines(
        [
            "rootfs -- *plugin.py:*",
            "    A private, writable view of the test's image*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["left [[]session scope[]] -- conftest.py:*", "    Layer 'left' on 'base', built by *"]
    )
