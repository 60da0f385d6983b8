"""Bad input gets a clear error at the right time: collection for markers, setup for builds."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()

@layer(parent=base)
def app(root):
    (root / "etc/app.conf").write_text("x")
"""


def test_bad_markers_fail_at_collection(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_unknown="""
        import pytest
        @pytest.mark.layer("nope")
        def test_a(rootfs): pass
        """,
        test_wrong_type="""
        import pytest
        @pytest.mark.layer(42)
        def test_b(rootfs): pass
        """,
        test_init_abs="""
        import pytest
        @pytest.mark.layer("app", init={"/etc/hostname": "x"})
        def test_c(rootfs): pass
        """,
        test_init_dotdot="""
        import pytest
        @pytest.mark.layer("app", init={"etc/../../x": "x"})
        def test_d(rootfs): pass
        """,
        test_init_type="""
        import pytest
        @pytest.mark.layer("app", init=["etc/hostname"])
        def test_e(rootfs): pass
        """,
        test_keep="""
        import pytest
        @pytest.mark.layer("app", keep="sometimes")
        def test_f(rootfs): pass
        """,
        test_kwarg="""
        import pytest
        @pytest.mark.layer("app", readonly="yes", colour="red")
        def test_g(rootfs): pass
        """,
        test_class="""
        import pytest
        @pytest.mark.layer("missing")
        class TestC:
            def test_h(self, rootfs): pass
        """,
    )
    result = pytester.runpytest_subprocess("--continue-on-collection-errors")
    result.assert_outcomes(errors=8)
    result.stdout.fnmatch_lines_random(
        [
            "*test_unknown.py::test_a: @pytest.mark.layer: unknown layer 'nope'; "
            "known layers: app, base*",
            "*test_wrong_type.py::test_b: @pytest.mark.layer: expected a layer name or a @layer "
            "function, got int 42*",
            "*test_init_abs.py::test_c: @pytest.mark.layer: init path '/etc/hostname' is absolute*",
            "*test_init_dotdot.py::test_d: @pytest.mark.layer: init path 'etc/../../x' "
            "contains '..'*",
            "*test_init_type.py::test_e: @pytest.mark.layer: init= must be a dict*not list*",
            "*test_keep.py::test_f: @pytest.mark.layer: keep='sometimes' is invalid; choose one "
            "of failed, always, never*",
            "*test_kwarg.py::test_g: @pytest.mark.layer: unknown argument(s) colour*",
            "*test_class.py::TestC::test_h: @pytest.mark.layer: unknown layer 'missing'*",
        ]
    )


def test_definition_errors(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        from pytest_layers import layer

        @layer(parent="b")
        def a(root): pass

        @layer(parent="a")
        def b(root): pass

        @layer(parent="ghost")
        def orphan(root): pass

        @layer
        def whiteout(root):
            (root / "etc").mkdir()
            (root / "etc/.wh.passwd").write_text("")
        """
    )
    pytester.makepyfile(
        test_cycle="""
        import pytest
        @pytest.mark.layer("a")
        def test_a(rootfs): pass
        """,
        test_orphan="""
        import pytest
        @pytest.mark.layer("orphan")
        def test_o(rootfs): pass
        """,
        test_wh="""
        import pytest
        @pytest.mark.layer("whiteout")
        def test_w1(rootfs): pass
        def test_w2(whiteout): pass
        """,
        test_noimage="""
        def test_n(rootfs): pass
        """,
    )
    result = pytester.runpytest_subprocess("--continue-on-collection-errors")
    result.assert_outcomes(errors=5)
    result.stdout.fnmatch_lines_random(
        [
            "*test_cycle.py::test_a: layer parent cycle: a -> b -> a*",
            "*test_orphan.py::test_o: layer 'orphan' (*conftest.py:*) has unknown parent "
            "'ghost'; known layers: a, b, orphan, whiteout",
            "*LayerBuildError: layer 'whiteout': builder conftest.whiteout (*) left "
            "/etc/.wh.passwd; names starting with '.wh.' are OCI whiteout markers*",
            "*test_noimage.py::test_n uses the rootfs fixture but names no image: add "
            '@pytest.mark.layer("<layer name>")*layers_default*',
        ]
    )


def test_bad_options(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest_subprocess("--layers-backend=zfs")
    result.stderr.fnmatch_lines(
        ["*--layers-backend: invalid value 'zfs'; choose one of auto, overlay, fuse, copy*"]
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result = pytester.runpytest_subprocess("--layers-keep=maybe")
    result.stderr.fnmatch_lines(["*--layers-keep: invalid value 'maybe'; choose one of failed*"])
    pytester.makeini("[pytest]\nlayers_keep_count = 0\nlayers_mount_namespace = shared\n")
    result = pytester.runpytest_subprocess()
    result.stderr.fnmatch_lines(
        ["*ini option layers_keep_count: invalid value '0'; give a whole number*"]
    )
    pytester.makeini("[pytest]\nlayers_mount_namespace = shared\n")
    result = pytester.runpytest_subprocess()
    result.stderr.fnmatch_lines(
        ["*ini option layers_mount_namespace: invalid value 'shared'; choose one of private, host"]
    )


NO_SPACE_CONFTEST = """
import errno
from pytest_layers import layer

@layer
def full(root):
    (root / "etc").mkdir()
    # As write(2) reports a full disk: no file name.
    raise OSError(errno.ENOSPC, "No space left on device")

@layer
def quota(root):
    raise OSError(errno.EDQUOT, "Disk quota exceeded")

@layer
def elsewhere(root):
    # The builder's own business, outside the layer and the store: left as it is.
    raise OSError(errno.ENOSPC, "No space left on device", "/var/cache/other/file")
"""


def test_out_of_space_while_building_names_the_layer_and_the_fix(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(NO_SPACE_CONFTEST)
    pytester.makepyfile(
        test_full="""
        import pytest

        @pytest.mark.layer("full")
        def test_full(rootfs): pass

        @pytest.mark.layer("quota")
        def test_quota(rootfs): pass

        @pytest.mark.layer("elsewhere")
        def test_elsewhere(rootfs): pass
        """
    )
    result = pytester.runpytest_subprocess("--layers-store=store")
    result.assert_outcomes(errors=3)
    store = pytester.path / "store"
    for name in ("full", "quota"):
        result.stdout.fnmatch_lines(
            [
                f"[[]Errno 28[]] no space left on device while writing layer {name!r} to the "
                f"store {store}: free space on its filesystem, or point the store at a bigger "
                "one (pytest --layers-store PATH*"
            ]
        )
    result.stdout.fnmatch_lines(
        ["E   *OSError: [[]Errno 28[]] No space left on device: '/var/cache/other/file'"]
    )
    assert "NoSpaceError" not in result.stdout.str()
    assert list((store / "tmp").iterdir()) == [], "a failed build left its staging behind"
