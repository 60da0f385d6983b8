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


def test_bad_markers_error_on_their_own_test(pytester: pytest.Pytester) -> None:
    """Checked at collection, each bad marker is one line on its own test's error; the other
    tests of the session still run."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_unknown="""
        import pytest
        @pytest.mark.layer("nope")
        def test_a(rootfs): pass
        @pytest.mark.layer("app")
        def test_good(rootfs): pass
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
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=8, passed=1)
    for test, message in [
        ("test_a", "unknown layer 'nope'; known layers: app, base*"),
        ("test_b", "expected a layer name or a @layer function, got int 42*"),
        ("test_c", "init path '/etc/hostname' is absolute*"),
        ("test_d", "init path 'etc/../../x' contains '..'*"),
        ("test_e", "init= must be a dict*not list"),
        ("test_f", "keep='sometimes' is invalid; choose one of failed, always, never*"),
        ("test_g", "unknown argument(s) colour*"),
        ("TestC.test_h", "unknown layer 'missing'*"),
    ]:
        # The section names the test; its body is the one line, no traceback.
        result.stdout.fnmatch_lines(
            [f"*_ ERROR at setup of {test} _*", f"@pytest.mark.layer: {message}", "[_=]*"]
        )
    assert "Traceback" not in result.stdout.str()
    result.stdout.no_fnmatch_line("*Interrupted*")


def test_bad_marker_of_a_deselected_test_costs_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_sel="""
        import pytest
        @pytest.mark.layer("tyop")
        def test_bad(rootfs): pass
        @pytest.mark.layer("app")
        def test_good(rootfs): pass
        """
    )
    pytester.runpytest_subprocess("-k", "good").assert_outcomes(passed=1, deselected=1)
    pytester.runpytest_subprocess().assert_outcomes(passed=1, errors=1)


@pytest.mark.parametrize("where", ["pytest.ini", "pyproject.toml", "-o"])
def test_unknown_layers_default_names_its_source(pytester: pytest.Pytester, where: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_d="def test_default(rootfs): pass\ndef test_plain(): pass\n")
    args: list[str] = []
    if where == "pytest.ini":
        pytester.makefile(".ini", pytest="[pytest]\nlayers_default = ghost\n")
    elif where == "pyproject.toml":
        pytester.makepyprojecttoml('[tool.pytest.ini_options]\nlayers_default = "ghost"\n')
    else:
        args = ["-o", "layers_default=ghost"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1, errors=1)
    source = "-o layers_default" if where == "-o" else where
    result.stdout.fnmatch_lines(
        [f"layers_default = ghost in {source}: unknown layer 'ghost'; known layers: app, base*"]
    )


def test_marker_on_a_test_without_rootfs_is_checked_and_warned_about(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_w="""
        import pytest
        @pytest.mark.layer("app")
        def test_no_rootfs(app): pass
        @pytest.mark.layer("tyop")
        def test_typo_no_rootfs(): pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1, warnings=2)
    result.stdout.fnmatch_lines(
        ["*_ ERROR at setup of test_typo_no_rootfs _*", "@pytest.mark.layer: unknown layer 'tyop'*"]
    )
    result.stdout.fnmatch_lines(
        [
            "*LayerMarkerWarning: test_w.py::test_no_rootfs: @pytest.mark.layer has no effect: "
            "the test does not use the rootfs fixture*"
        ]
    )
    # A warning like pytest's own for unknown marks: -W error turns it into an error.
    result = pytester.runpytest_subprocess("-W", "error::pytest.PytestWarning")
    result.stdout.fnmatch_lines(["*LayerMarkerWarning*has no effect*"])
    assert result.ret != 0


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
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=5)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_a*", "layer parent cycle: a -> b -> a*"])
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_o*",
            "layer 'orphan' (*conftest.py:*) has unknown parent 'ghost'; known layers: a, b, "
            "orphan, whiteout",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_w1*",
            "layer 'whiteout': builder conftest.whiteout (*) left /etc/.wh.passwd; names "
            "starting with '.wh.' are OCI whiteout markers*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_n*",
            "the test uses the rootfs fixture but names no image: add "
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
        ["OSError: [[]Errno 28[]] No space left on device: '/var/cache/other/file'"]
    )
    assert "NoSpaceError" not in result.stdout.str()
    assert list((store / "tmp").iterdir()) == [], "a failed build left its staging behind"


BUILD_FAILURE_CONFTEST = """
from pytest_layers import layer

def fetch(url):
    raise ConnectionError(f"cannot reach {url}")

@layer
def base(root):
    (root / "etc").mkdir()

@layer(parent=base)
def mirror(root):
    fetch("https://mirror.invalid/pkgs")

@layer(parent=mirror)
def on_mirror(root):
    pass

@layer(inputs=["data/settings.conf"])
def needs_data(root):
    pass
"""


def test_build_failure_is_reported_once_with_the_builders_frames(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(BUILD_FAILURE_CONFTEST)
    pytester.makepyfile(
        test_bf="""
        import pytest

        @pytest.mark.layer("mirror")
        @pytest.mark.parametrize("i", range(3))
        def test_mirror(rootfs, i): pass

        @pytest.mark.layer("on_mirror")
        def test_child(rootfs): pass

        @pytest.mark.layer("needs_data")
        @pytest.mark.parametrize("i", range(2))
        def test_data(rootfs, i): pass

        @pytest.mark.layer("base")
        def test_fine(rootfs): pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=6)
    out = result.stdout.str()
    # The first test of the layer: its name, then the builder's frames and nothing of ours.
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_mirror[[]0[]] _*",
            "layer 'mirror' (*conftest.py:*) failed to build: ConnectionError: cannot reach "
            "https://mirror.invalid/pkgs",
            "Traceback (the builder's frames):",
            '  File "*conftest.py", line *, in mirror',
            '    fetch("https://mirror.invalid/pkgs")',
            '  File "*conftest.py", line *, in fetch',
            '    raise ConnectionError(f"cannot reach {url}")',
            "ConnectionError: cannot reach https://mirror.invalid/pkgs",
            "*_ ERROR at setup of test_mirror[[]1[]] _*",
            "layer 'mirror' failed to build (see the first error, at "
            "test_bf.py::test_mirror[[]0[]])",
        ]
    )
    # Once in the report (the short summary under CI=true shows whole messages, not counted).
    report = out.split("short test summary info")[0]
    assert report.count("Traceback (the builder's frames)") == 1, out
    # A child of the failed layer points at the same first error.
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_child _*",
            "layer 'mirror' failed to build (see the first error, at "
            "test_bf.py::test_mirror[[]0[]])",
        ]
    )
    # A missing inputs= path: one line naming the layer and the path, then a short one.
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_data[[]0[]] _*",
            "layer 'needs_data' (*conftest.py:*): input 'data/settings.conf' does not exist "
            "(inputs are relative to the rootdir *)",
            "*_ ERROR at setup of test_data[[]1[]] _*",
            "layer 'needs_data' failed to build (see the first error, at "
            "test_bf.py::test_data[[]0[]])",
        ]
    )
    for ours in ("plugin.py", "definitions.py", "fixtures.py", "build.py", "store.py", "_pytest"):
        assert ours not in out, (ours, out)
    result.stdout.fnmatch_lines(["ERROR test_bf.py::test_mirror[[]0[]] - Failed: layer 'mirror'*"])


def test_a_builder_leaving_whiteout_names_is_told_the_first_in_layer_order(
    pytester: pytest.Pytester,
) -> None:
    """A layer with no parent is settled where its builder wrote it; the walk meets entries in
    the filesystem's order, but the error names the first bad path in layer order, and a socket
    named like a whiteout counts although sockets are dropped from a layer."""
    pytester.makeconftest(
        """
        import os, socket
        from pytest_layers import layer

        @layer
        def many(root):
            (root / "z").mkdir()
            (root / "z/.wh.a").write_text("")
            for n in "zyxwvutsrqponmlkjihgfedcb":  # the first met is rarely /.wh.b
                (root / f".wh.{n}").write_text("")
            os.mknod(root / "a-device", 0o600 | 0o020000, os.makedev(0, 0))

        @layer
        def sock(root):
            here = os.getcwd()
            os.chdir(root)  # a short socket path, whatever the temporary directory's length
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.bind(".wh.sock")
            finally:
                os.chdir(here)
            (root / "f").write_text("x")
        """
    )
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.layer("many")
        def test_many(rootfs): pass
        @pytest.mark.layer("sock")
        def test_sock(rootfs): pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_many*", "layer 'many': builder conftest.many (*) left /.wh.b;*"]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_sock*",
            "layer 'sock': builder conftest.sock (*) left /.wh.sock;*",
        ]
    )
