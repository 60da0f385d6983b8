"""Where the default store lives: ini layers_store, else <cache_dir>/layers, for the plugin and
the CLI alike (a read-only checkout run with -o cache_dir=/tmp/... keeps its store there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_layers import _settings, cli
from tests.conftest import run_as_user
from tests.plugin_util import BASE_CONFTEST, BASE_TESTS


def _cli_ls(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_layers.cli", "ls"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


# -- the shared helper, without pytest ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("pytest.ini", "[pytest]\ncache_dir = c\n"),
        ("tox.ini", "[pytest]\ncache_dir = c\n"),
        ("setup.cfg", "[tool:pytest]\ncache_dir = c\n"),
        ("pyproject.toml", '[tool.pytest.ini_options]\ncache_dir = "c"\n'),
        ("pytest.toml", '[pytest]\ncache_dir = "c"\n'),
    ],
)
def test_cache_dir_is_read_from_every_config_format(
    tmp_path: Path, name: str, content: str
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / name).write_text(content)
    assert cli.default_store_path(tmp_path / "sub") == tmp_path.resolve() / "c/layers"


def test_store_location_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path
    # layers_store wins over cache_dir; both are relative to the rootdir.
    assert _settings.store_path(root, layers_store="s", cache_dir="c") == root / "s"
    assert _settings.store_path(root, layers_store="/abs/s", cache_dir="c") == Path("/abs/s")
    assert (
        _settings.store_path(root, layers_store="", cache_dir=None) == root / ".pytest_cache/layers"
    )
    # cache_dir is resolved as pytest resolves it: ~ and $VARS expanded, absolute kept.
    monkeypatch.setenv("CI_CACHE", str(tmp_path / "ci"))
    assert _settings.store_path(root, layers_store=None, cache_dir="$CI_CACHE/x") == (
        tmp_path / "ci/x/layers"
    )
    assert _settings.store_path(root, layers_store=None, cache_dir="/tmp/c") == Path(
        "/tmp/c/layers"
    )
    # A tox.ini without a [pytest] section is not pytest's config: keep looking upward.
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj/tox.ini").write_text("[tox]\nenvlist = py\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nlayers_store = shared-store\n")
    ini = _settings.find_ini(tmp_path / "proj")
    assert (ini.rootdir, ini.values) == (tmp_path.resolve(), {"layers_store": "shared-store"})
    assert cli.default_store_path(tmp_path / "proj") == tmp_path.resolve() / "shared-store"


# -- the plugin and the CLI agree ----------------------------------------------------------------


@pytest.mark.requires_overlay
def test_cache_dir_moves_the_store_and_the_cli_follows(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(test_loc=BASE_TESTS)
    pytester.makeini("[pytest]\ncache_dir = build/cache\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    store = pytester.path / "build/cache/layers"
    result.stdout.fnmatch_lines([f"layers: backend=*, store={store} (*"])
    assert (store / "refs/names/base").is_file()
    assert not (pytester.path / ".pytest_cache").exists()
    proc = _cli_ls(pytester.path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[1].split()[0] == "base"

    # -o cache_dir (what CI passes) overrides the ini, absolute or not.
    elsewhere = pytester.path / "elsewhere"
    result = pytester.runpytest_subprocess("-o", f"cache_dir={elsewhere}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"layers: backend=*, store={elsewhere}/layers (*"])
    result.stdout.fnmatch_lines(["layers: built base in *"])

    # ini layers_store wins over cache_dir, for the session and for the CLI.
    pytester.makeini("[pytest]\ncache_dir = build/cache\nlayers_store = stores/main\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"layers: backend=*, store={pytester.path}/stores/main (*"])
    proc = _cli_ls(pytester.path / "stores")
    assert proc.returncode == 0, proc.stderr
    assert "base" in proc.stdout
    assert (pytester.path / "stores/main/refs/names/base").is_file()


@pytest.mark.requires_overlay
@pytest.mark.requires_user
def test_read_only_checkout_with_cache_dir_elsewhere(tmp_path: Path, user_tmp_path: Path) -> None:
    # The CI job: the checkout belongs to root and is read-only for the user who runs the suite
    # with -o cache_dir=/tmp/...; the store must follow the cache, not try the checkout.
    checkout = Path("/tmp") / f"pytest-layers-ro-{os.getpid()}-{tmp_path.name}"
    checkout.mkdir(mode=0o755)
    try:
        (checkout / "pytest.ini").write_text("[pytest]\n")
        (checkout / "conftest.py").write_text(BASE_CONFTEST)
        (checkout / "test_ro.py").write_text(BASE_TESTS)
        cache = user_tmp_path / "cache"
        proc = run_as_user(
            [sys.executable, "-m", "pytest", "-o", f"cache_dir={cache}"],
            cwd=checkout,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert f"store={cache}/layers" in out, out
        assert (cache / "layers/refs/names/base").is_file()
        assert sorted(os.listdir(checkout)) == ["conftest.py", "pytest.ini", "test_ro.py"]
    finally:
        subprocess.run(["rm", "-rf", str(checkout)], check=True)
