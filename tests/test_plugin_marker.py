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


FUNCTION_ARGS = """
import pytest
from pytest_layers import layer

@layer
def lower(root):
    (root / "who").write_text("lower")

@layer(parent=lower)
def upper(root):
    (root / "who").write_text("upper")

@layer
def other(root):
    (root / "other").write_text("o")

@pytest.mark.layer.with_args(upper)
def test_one_function_with_args(rootfs):
    assert (rootfs / "who").read_text() == "upper"

@pytest.mark.layer(other, upper)
def test_several_functions(rootfs):
    assert [x.name for x in rootfs.layers] == ["lower", "upper", "other"]

@pytest.mark.layer(upper, readonly=True)
def test_function_and_keyword(rootfs):
    assert rootfs.readonly
"""


def test_marker_takes_layer_functions_as_the_docs_say(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fn=FUNCTION_ARGS)
    pytester.runpytest_subprocess().assert_outcomes(passed=3)
    # One bare function is what pytest itself takes as "decorate this": markers.md says to
    # write a name, or use .with_args().
    pytester.makepyfile(
        test_fn=FUNCTION_ARGS + "\n@pytest.mark.layer(upper)\ndef test_bare(rootfs): pass\n"
    )
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["*Marks cannot be applied to fixtures*"])


COUNTING = """
import pytest_layers.plugin as plugin

PARSED = []
_parse = plugin._marker_spec


def _counting(item):
    PARSED.append(item.nodeid)
    return _parse(item)


plugin._marker_spec = _counting


def pytest_sessionfinish(session):
    print(f"\\nPARSED {len(PARSED)} {len(set(PARSED))}")
"""


def test_the_marker_is_parsed_once_per_item(pytester: pytest.Pytester) -> None:
    """At collection, and not again at setup (nor by the view pool's plan)."""
    pytester.makeconftest(CONFTEST.replace("def pytest_layers_init", "def _unused") + COUNTING)
    pytester.makepyfile(
        test_x="""
import pytest

@pytest.mark.layer("left", init={"etc/x": "1"})
@pytest.mark.parametrize("n", range(3))
def test_it(rootfs, n):
    assert (rootfs / "etc/x").read_text() == "1"

@pytest.mark.layer("right")
def test_other(rootfs):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-s", "-o", "layers_view_pool=0")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["PARSED 4 4"])
