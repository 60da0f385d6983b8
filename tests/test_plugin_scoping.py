"""Layer names resolve the way pytest resolves fixtures: by the directory (or module) that
defines them, not in one global registry."""

from __future__ import annotations

import sys

import pytest

pytestmark = [pytest.mark.requires_overlay]


def _base(who: str) -> str:
    return f"""
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/who").write_text("{who}")

@layer(parent="base")
def app(root):
    (root / "etc/app").write_text("on {who}")

@layer
def dep(root, base):
    # Depends on base by parameter name, not as its parent: the same scoping.
    (root / "from").write_text((base.directory / "etc/who").read_text())
"""


def _tests(who: str) -> str:
    return f"""
import pytest

@pytest.mark.layer("base")
def test_base(rootfs):
    assert (rootfs / "etc/who").read_text() == "{who}"
    assert rootfs.layers[-1].name == "base"

@pytest.mark.layer("app")
def test_app(rootfs):
    assert (rootfs / "etc/who").read_text() == "{who}"
    assert (rootfs / "etc/app").read_text() == "on {who}"

def test_base_by_argument(base):
    assert (base.directory / "etc/who").read_text() == "{who}"

@pytest.mark.layer("dep")
def test_dependency_by_parameter_name(rootfs):
    assert (rootfs / "from").read_text() == "{who}"
"""


def _cli(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.run(sys.executable, "-m", "pytest_layers.cli", *args)


def _siblings(pytester: pytest.Pytester) -> None:
    for who in ("a", "b"):
        d = pytester.mkdir(who)
        (d / "conftest.py").write_text(_base(who))
        (d / f"test_{who}.py").write_text(_tests(who))


def test_sibling_directories_each_see_their_own_base(pytester: pytest.Pytester) -> None:
    """Two sibling directories each define ``@layer def base`` (and a child ``app`` on it)
    with different content; each directory's tests get their own, in one session."""
    _siblings(pytester)
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=8)
    # Each base was built (different bodies, different build-cache keys): none served the
    # other from the cache.
    result.stdout.fnmatch_lines(["*layers: built base *", "*layers: built base *"])


def test_sibling_bases_under_xdist(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is a test dependency")
    _siblings(pytester)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=8)


def test_store_names_qualify_each_definition(pytester: pytest.Pytester) -> None:
    """The store records each definition under ``PATH::NAME``; the bare name is ambiguous
    and the CLI says so, listing the qualified forms it takes instead."""
    _siblings(pytester)
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=8)
    store = pytester.path / ".pytest_cache" / "layers"
    if not store.is_dir():
        store = next(pytester.path.joinpath(".pytest_cache").glob("layers*"))
    ls = _cli(pytester, "--store", str(store), "ls", "-q")
    assert ls.ret == 0, ls.stderr.str()
    refs = ls.stdout.lines
    for ref in ("a/conftest.py::base", "b/conftest.py::base", "a/conftest.py::app"):
        assert ref in refs
    assert "base" not in refs  # two definitions: the bare name names neither
    bad = _cli(pytester, "--store", str(store), "inspect", "base")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(
        ["*ambiguous layer reference 'base'*a/conftest.py::base*b/conftest.py::base*PATH::NAME*"]
    )
    good = _cli(pytester, "--store", str(store), "inspect", "b/conftest.py::base")
    assert good.ret == 0, good.stderr.str()


def test_one_definition_keeps_its_bare_name(pytester: pytest.Pytester) -> None:
    """A name defined once answers to its bare name, as before, and to its qualified form."""
    pytester.makeconftest(_base("root"))
    pytester.makepyfile(test_root=_tests("root"))
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=4)
    store = next(pytester.path.joinpath(".pytest_cache").glob("layers*"))
    ls = _cli(pytester, "--store", str(store), "ls", "-q")
    assert {"base", "app"} <= set(ls.stdout.lines)
    assert not any("::" in ref for ref in ls.stdout.lines)  # ls shows what it showed before
    for ref in ("base", "conftest.py::base"):
        assert _cli(pytester, "--store", str(store), "inspect", ref).ret == 0


def test_subdirectory_overrides_and_inherits(pytester: pytest.Pytester) -> None:
    """A conftest below overrides a name for its own tests; names it does not define come from
    above; a child's parent= resolves where the child is defined."""
    pytester.makeconftest(_base("root"))
    sub = pytester.mkdir("sub")
    (sub / "conftest.py").write_text(
        """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/who").write_text("sub")

@layer(parent="base")
def tool(root):
    (root / "etc/tool").write_text("t")
"""
    )
    (sub / "test_sub.py").write_text(
        """
import pytest

@pytest.mark.layer("tool")
def test_tool_on_sub_base(rootfs):
    assert (rootfs / "etc/who").read_text() == "sub"

@pytest.mark.layer("base")
def test_own_base(rootfs):
    assert (rootfs / "etc/who").read_text() == "sub"
"""
    )
    pytester.makepyfile(
        test_top="""
import pytest

@pytest.mark.layer("base")
def test_root_base(rootfs):
    assert (rootfs / "etc/who").read_text() == "root"

@pytest.mark.layer("tool")
def test_tool_not_visible(rootfs):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_tool_not_visible*",
            "*unknown layer 'tool'*defined in sub/conftest.py*not visible from test_top.py*",
        ]
    )


def test_inherited_child_on_overridden_parent_is_an_error(pytester: pytest.Pytester) -> None:
    """``app`` is defined above on the root ``base``; below, ``base`` means another layer. A
    session layer has one value, so it cannot follow the override: the test errors at
    collection and says how to fix it, rather than getting whichever ``base`` came first."""
    pytester.makeconftest(_base("root"))
    sub = pytester.mkdir("sub")
    (sub / "conftest.py").write_text(
        """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
"""
    )
    (sub / "test_sub.py").write_text(
        """
import pytest

@pytest.mark.layer("app")
def test_app(rootfs):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*layer 'app' (*conftest.py:*) is built on conftest.py::base*sub/conftest.py::base*"]
    )


def test_duplicate_name_in_one_scope_names_both_places(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
from pytest_layers import layer, oci_image

@layer
def base(root):
    pass

@layer(name="base")
def other(root):
    pass
"""
    )
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    assert result.ret != 0
    result.stderr.fnmatch_lines(
        [
            "*layer 'base' is defined twice in one scope: *conftest.py:3 and *conftest.py:7;"
            " rename one*"
        ]
    )


def test_same_name_in_two_test_modules_is_fine(pytester: pytest.Pytester) -> None:
    """Each test module is its own scope, as for pytest fixtures."""
    for who in ("m1", "m2"):
        pytester.makepyfile(
            **{
                f"test_{who}": _base(who)
                + f"""
import pytest

@pytest.mark.layer("app")
def test_it(rootfs):
    assert (rootfs / "etc/app").read_text() == "on {who}"
"""
            }
        )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=2)


def test_parent_object_must_be_what_its_name_means_there(pytester: pytest.Pytester) -> None:
    """``parent=`` given as an object is checked against what its name means where the child
    is defined: it never silently builds on another layer of that name."""
    pytester.makepyfile(
        layers_lib="""
from pytest_layers import layer

@layer(name="base")
def lib_base(root):
    (root / "etc").mkdir()
"""
    )
    pytester.makeconftest(
        """
import layers_lib
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()

@layer(parent=layers_lib.lib_base)
def app(root):
    pass
"""
    )
    pytester.makepyfile(
        test_app="""
import pytest

@pytest.mark.layer("app")
def test_app(rootfs):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*layer 'app' (*) names its parent by the object layers_lib.py::base, but where it is "
            "defined 'base' is conftest.py::base*"
        ]
    )


def test_same_name_twice_inside_a_function_is_no_clash() -> None:
    """A builder defined inside a function is in no fixture scope (a test of the decorator,
    a factory): defining a name twice there is allowed."""
    from pytest_layers import layer

    def one(root: object) -> None:
        pass

    def two(root: object) -> None:
        pass

    first = layer(name="scratch_clash")(one)
    second = layer(name="scratch_clash")(two)
    assert first is not second


def test_imported_layer_clashing_in_one_conftest_names_both(pytester: pytest.Pytester) -> None:
    """A conftest that defines ``base`` and also imports another layer named ``base`` (under
    any alias) holds two fixtures of one name: the test that uses it errors, naming both."""
    pytester.makepyfile(
        layers_lib="""
from pytest_layers import layer

@layer(name="base")
def lib_base(root):
    pass
"""
    )
    pytester.makeconftest(
        """
from layers_lib import lib_base
from pytest_layers import layer

@layer
def base(root):
    pass
"""
    )
    pytester.makepyfile(
        test_x="""
import pytest

@pytest.mark.layer("base")
def test_x(rootfs):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*layer 'base' is defined twice in one scope: *conftest.py:4 and *layers_lib.py:3;*"]
    )


def test_same_builder_text_in_two_directories_builds_twice(pytester: pytest.Pytester) -> None:
    """Identical conftest text in two directories, whose builder copies a file from next to
    its conftest: the build-cache key holds the defining file, so each directory gets its own
    content (the same source alone would have served b the layer built for a)."""
    text = """
from pathlib import Path
from pytest_layers import layer

HERE = Path(__file__).parent

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/who").write_text((HERE / "who.txt").read_text())
"""
    for who in ("a", "b"):
        d = pytester.mkdir(who)
        (d / "conftest.py").write_text(text)
        (d / "who.txt").write_text(who)
        (d / f"test_{who}.py").write_text(
            f"""
import pytest

@pytest.mark.layer("base")
def test_it(rootfs):
    assert (rootfs / "etc/who").read_text() == "{who}"
"""
        )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*layers: built base *", "*layers: built base *"])


def test_dependency_by_parameter_name_on_overridden_layer_is_an_error(
    pytester: pytest.Pytester,
) -> None:
    """``dep`` (defined above) takes ``base`` as an argument; below, ``base`` is another
    layer: the test errors rather than getting whichever ``base`` came first."""
    pytester.makeconftest(_base("root"))
    sub = pytester.mkdir("sub")
    (sub / "conftest.py").write_text(
        """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
"""
    )
    (sub / "test_sub.py").write_text(
        """
import pytest

@pytest.mark.layer("dep")
def test_dep(rootfs):
    pass

def test_dep_as_fixture(dep):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*layer 'dep' (*conftest.py:*) uses conftest.py::base, but from "
            "sub/test_sub.py::test_dep 'base' names sub/conftest.py::base*",
            "*layer 'dep': layer 'dep' (*conftest.py:*) uses conftest.py::base, but from "
            "sub/test_sub.py::test_dep_as_fixture 'base' names sub/conftest.py::base*",
        ]
    )
