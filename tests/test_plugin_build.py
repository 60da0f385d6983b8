"""@layer builds: once per build-cache key, across sessions; what invalidates the cache."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
import os
from pathlib import Path
import pytest
from pytest_layers import layer

def _count(name):
    with open(os.path.join(os.path.dirname(__file__), "runs.log"), "a") as f:
        f.write(name + "\\n")

@pytest.fixture(scope="session")
def greeting():
    return "hello"

@layer(inputs=["data"], version=VERSION)
def base(root, greeting):
    \"\"\"The base tree: /etc/os-release and the data dir.\"\"\"
    _count("base")
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "etc/greeting").write_text(greeting)
    (root / "data").mkdir()
    for p in sorted(Path(os.path.dirname(__file__), "data").iterdir()):
        (root / "data" / p.name).write_bytes(p.read_bytes())

@layer(parent=base)
def app(root):
    _count("app")
    (root / "etc/app.conf").write_text("debug=false\\n")
    (root / "etc/os-release").unlink()
"""

TESTS = """
import pytest

@pytest.mark.layer("app")
@pytest.mark.parametrize("i", range(50))
def test_app(rootfs, i):
    assert (rootfs / "etc/app.conf").read_text() == "debug=false\\n"
    assert (rootfs / "etc/greeting").read_text() == "hello"
    assert not (rootfs / "etc/os-release").exists()
    (rootfs / "etc/app.conf").write_text(str(i))

def test_layer_value(app, base):
    assert app.parent == base
    assert app.chain == [base, app]
    assert app.name == "app" and app.diff_id.startswith("sha256:")
    assert [str(c) for c in app.changes()] == ["C /etc", "A /etc/app.conf", "D /etc/os-release"]
    # files: os-release, greeting, data/a.txt (directories are not files); size: their bytes
    assert (base.files, base.size) == (3, 14)
"""


def _runs(pytester: pytest.Pytester) -> list[str]:
    log = pytester.path / "runs.log"
    runs = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return runs


@pytest.mark.slow
def test_build_once_and_cache_invalidation(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.replace("VERSION", '"1"'))
    pytester.makepyfile(test_build=TESTS)
    pytester.mkdir("data")
    (pytester.path / "data" / "a.txt").write_text("a")

    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=51)
    result.stdout.re_match_lines(
        [
            r"layers: built base in \d+\.\d\ds \(\d+ files, \d+ B\) sha256:[0-9a-f]{12}",
            r"layers: built app in .*",
        ]
    )
    assert _runs(pytester) == ["base", "app"]

    # A second session builds nothing and says so.
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=51)
    result.stdout.fnmatch_lines(["layers: cached base in *", "layers: cached app in *"])
    assert _runs(pytester) == []

    # -q hides the progress lines.
    result = pytester.runpytest_subprocess("-q", "-k", "test_layer_value")
    result.assert_outcomes(passed=1, deselected=50)
    result.stdout.no_fnmatch_line("layers: cached*")

    # An inputs file changes: the base and so its child rebuild.
    (pytester.path / "data" / "a.txt").write_text("b")
    pytester.runpytest_subprocess("-k", "test_layer_value").assert_outcomes(passed=1, deselected=50)
    assert _runs(pytester) == ["base", "app"]

    # version changes: the base rebuilds; it comes out identical, so its chain_id (the child's
    # key) is unchanged and the child is reused, as Docker reuses a layer on an equal parent.
    pytester.makeconftest(CONFTEST.replace("VERSION", '"2"'))
    result = pytester.runpytest_subprocess("-k", "test_layer_value")
    result.assert_outcomes(passed=1, deselected=50)
    result.stdout.fnmatch_lines(["layers: built base in *", "layers: cached app in *"])
    assert _runs(pytester) == ["base"]

    # The child's source changes: only the child rebuilds.
    src = CONFTEST.replace("VERSION", '"2"').replace('_count("app")', '_count("app")  # edited')
    pytester.makeconftest(src)
    pytester.runpytest_subprocess("-k", "test_layer_value").assert_outcomes(passed=1, deselected=50)
    assert _runs(pytester) == ["app"]

    # --layers-rebuild ignores the cache for one run, building each layer once.
    result = pytester.runpytest_subprocess("--layers-rebuild")
    result.assert_outcomes(passed=51)
    assert _runs(pytester) == ["base", "app"]
    pytester.runpytest_subprocess("-k", "test_layer_value").assert_outcomes(passed=1, deselected=50)
    assert _runs(pytester) == []


def test_a_layer_with_no_parent_is_stored_without_a_change_list(
    pytester: pytest.Pytester,
) -> None:
    # Its builder filled a staging dir of the store, which becomes the layer as it is: listing
    # the tree first would be one more walk of every file.
    pytester.makeconftest(
        """
        from pytest_layers import changeset, layer

        def no_listing(*args, **kwargs):
            raise AssertionError("changes_from_tree called")

        changeset.changes_from_tree = no_listing

        @layer
        def root_layer(root):
            (root / "etc").mkdir()
            (root / "etc/hostname").write_text("demo")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.layer("root_layer")
        def test_it(rootfs):
            assert (rootfs / "etc/hostname").read_text() == "demo"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_builder_error_is_not_cached(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import os
        from pytest_layers import layer

        @layer
        def flaky(root):
            with open(os.path.join(os.path.dirname(__file__), "runs.log"), "a") as f:
                f.write("flaky\\n")
            if os.path.exists(os.path.join(os.path.dirname(__file__), "broken")):
                raise RuntimeError("mirror unreachable")
            (root / "ok").write_text("ok")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.layer("flaky")
        @pytest.mark.parametrize("i", range(3))
        def test_it(rootfs, i):
            assert (rootfs / "ok").exists()
        """
    )
    (pytester.path / "broken").touch()
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "layer 'flaky' (*conftest.py:*) failed to build: RuntimeError: mirror unreachable",
            "Traceback (the builder's frames):",
            '    raise RuntimeError("mirror unreachable")',
            "RuntimeError: mirror unreachable",
        ]
    )
    assert _runs(pytester) == ["flaky"]  # pytest caches the session fixture's error
    (pytester.path / "broken").unlink()
    pytester.runpytest_subprocess().assert_outcomes(passed=3)
    assert _runs(pytester) == ["flaky"]  # the failure was not cached: retried, then built


CHAIN_CONFTEST = """
import os
from pytest_layers import layer

@layer(inputs=["release"])
def base(root):
    (root / "etc").mkdir()
    src = os.path.join(os.path.dirname(__file__), "release")
    (root / "etc/release").write_text(open(src).read())

@layer(parent=base)
def app(root):
    (root / "etc/app.conf").write_text("same content on any base\\n")
"""


def _tokens(out: str) -> dict[str, str]:
    found = re.findall(r"^layers: (?:built|cached) (\w+) in .* (\S+)$", out, re.M)
    return dict(found)


def _inspect(store: Path, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_layers.cli", "--store", str(store), "inspect", ref],
        capture_output=True,
        text=True,
        check=False,
    )


def test_progress_line_names_the_image_as_the_cli_takes_it(pytester: pytest.Pytester) -> None:
    """The token at the end of a progress line is a chain id prefix: the CLI accepts it as a
    REF, and a child rebuilt on a changed parent gets a new one even when its own diff is
    the same."""
    pytester.makeconftest(CHAIN_CONFTEST)
    pytester.makepyfile(
        test_c="""
        import pytest
        @pytest.mark.layer("app")
        def test_app(rootfs):
            assert (rootfs / "etc/app.conf").exists()
        """
    )
    (pytester.path / "release").write_text("1\n")
    store = pytester.path / ".pytest_cache" / "layers"
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["layers: built base in *s (1 file, 2 B) sha256:*"])
    first = _tokens(result.stdout.str())
    assert set(first) == {"base", "app"}, result.stdout.str()
    for name, token in first.items():
        assert re.fullmatch(r"sha256:[0-9a-f]{12}", token), token
        shown = _inspect(store, token)
        assert shown.returncode == 0, shown.stderr
        assert f'"{name}"' in shown.stdout, shown.stdout

    (pytester.path / "release").write_text("2\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    second = _tokens(result.stdout.str())
    # The app layer's diff is the same on either base; its image is not.
    assert second["base"] != first["base"]
    assert second["app"] != first["app"]
    assert _inspect(store, second["app"]).returncode == 0
