"""The example suites, run the way the README says: ``pytest examples`` from the project root.

The project's own pytest settings (pyproject.toml) sit in that root; ``examples/pytest.ini`` must
win so that the examples' layer inputs resolve. Each image is built in the first session and
found in the cache in the next, as root and as an ordinary user. The opt-in failing test leaves a
snapshot whose report section names the commands that inspect it, and those commands work.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_USER, run_as_user

pytestmark = [pytest.mark.requires_overlay, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ("etc_base", "etc_app", "zoneinfo", "minimal", "with_python", "with_docs")
SUITES = ("configtool/tests/test_configtool.py", "pkginstall/tests/test_pkginstall.py")
DEMO_ENV = "PYTEST_LAYERS_DEMO_FAILURE"
DEMO = "pkginstall/tests/test_pkginstall.py::test_demo_failure_upgrade_overwrites_an_edited_config"
# What the demo test changed: an edited config kept, the new default beside it, the upgrade.
DEMO_CHANGES = """\
C /etc
C /etc/python3.11
C /etc/python3.11/sitecustomize.py
A /etc/python3.11/sitecustomize.py.pkgnew
C /usr
C /usr/bin
C /usr/bin/python3
C /usr/lib
C /usr/lib/python3.11
D /usr/lib/python3.11/asynchat.py
C /usr/lib/python3.11/os.py
C /usr/lib/python3.11/site.py
C /usr/share
C /usr/share/doc
C /usr/share/doc/python3
C /usr/share/doc/python3/README
C /usr/share/man
C /usr/share/man/man1
C /usr/share/man/man1/python3.1
C /var
C /var/lib
C /var/lib/pkgdb
C /var/lib/pkgdb/python3
C /var/lib/pkgdb/python3/files
C /var/lib/pkgdb/python3/info
"""


def checkout(dest: Path) -> None:
    """What the README's command sees of a checkout: the project's ini and examples/."""
    shutil.copytree(
        ROOT / "examples",
        dest / "examples",
        ignore=shutil.ignore_patterns(".pytest_cache", "__pycache__"),
    )
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def check_session(lines: pytest.LineMatcher, status: str) -> None:
    """Both suites ran under examples/pytest.ini, and every image was ``status``."""
    lines.fnmatch_lines(["rootdir: */examples", "configfile: pytest.ini"])
    lines.fnmatch_lines_random([f"examples/{suite} *" for suite in SUITES])
    lines.fnmatch_lines_random([f"layers: {status} {name} in *" for name in IMAGES])
    lines.fnmatch_lines(
        [f"SKIPPED [[]1[]] examples/pkginstall/*: fails on purpose * {DEMO_ENV}=1 *"]
    )
    other = "cached" if status == "built" else "built"
    lines.no_fnmatch_line(f"layers: {other} *")


def test_examples_pass_from_the_project_root(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEMO_ENV, raising=False)
    checkout(pytester.path)
    pytester.chdir()
    for status in ("built", "cached"):
        result = pytester.runpytest_subprocess("examples")
        result.assert_outcomes(passed=50, skipped=1)
        check_session(result.stdout, status)
    # The layers went to the examples' own store, not to one under the project root.
    assert (pytester.path / "examples/.pytest_cache/layers").is_dir()
    assert not (pytester.path / ".pytest_cache/layers").exists()


@pytest.mark.requires_user
def test_examples_pass_as_an_ordinary_user(user_tmp_path: Path) -> None:
    checkout(user_tmp_path)
    subprocess.run(["chown", "-R", f"{TEST_USER}:", str(user_tmp_path)], check=True)
    for status in ("built", "cached"):
        proc = run_as_user([sys.executable, "-m", "pytest", "examples"], cwd=user_tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = pytest.LineMatcher(proc.stdout.splitlines())
        lines.fnmatch_lines(["layers: backend=*, store=*/examples/.pytest_cache/layers *"])
        lines.fnmatch_lines(["*= 50 passed, 1 skipped in *"])
        check_session(lines, status)


def test_demo_failure_leaves_a_snapshot_the_cli_can_inspect(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout(pytester.path)
    pytester.chdir()
    monkeypatch.setenv(DEMO_ENV, "1")
    result = pytester.runpytest_subprocess("examples/pkginstall")
    result.assert_outcomes(passed=21, failed=1)
    store = pytester.path / "examples/.pytest_cache/layers"
    ref = f"snapshot:{DEMO}"
    result.stdout.fnmatch_lines([f"FAILED examples/{DEMO}*"])
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshot -*",
            f"{ref} (sha256:*, * files, *)",
            "inspect it with:",
            f"  pytest-layers --store {store} diff {ref}",
            f"  pytest-layers --store {store} shell {ref}",
            "*- layers snapshots -*",
            f"SNAPSHOT {DEMO} -> pytest-layers --store {store} diff {ref}",
        ]
    )
    printed = next(
        line.strip()
        for line in result.stdout.lines
        if line.strip().startswith("pytest-layers ") and " diff " in line
    )
    cli = [sys.executable, "-m", "pytest_layers.cli"]

    def run(*args: str, cwd: Path = pytester.path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
        )

    # The diff command exactly as the report printed it, from anywhere.
    diff = run(*shlex.split(printed)[1:])
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, DEMO_CHANGES, "")
    # So does the command at the end of the summary line.
    summary = next(line for line in result.stdout.lines if line.startswith("SNAPSHOT "))
    diff = run(*shlex.split(summary.split(" -> ", 1)[1])[1:])
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, DEMO_CHANGES, "")
    # From examples/ (as examples/README.md says) the CLI finds the store without --store.
    diff = run("diff", ref, cwd=pytester.path / "examples")
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, DEMO_CHANGES, "")
    # The snapshot holds no programs: `shell` says so in one line instead of running one of the
    # host's outside the sandbox.
    shell = run("--store", str(store), "shell", ref)
    assert shell.returncode == 1
    assert shell.stderr.startswith(f"pytest-layers: error: {ref} has no /bin/sh; ")
    assert shell.stderr.count("\n") == 1
    # The snapshot's image holds both the kept edit and the new default.
    from pytest_layers.changeset import ImageView
    from pytest_layers.store import Store

    st = Store(store)
    chain = st.chain(st.resolve(ref))
    with ImageView([st.layer_dir(i.chain_id) for i in reversed(chain)], st.flavor) as image:
        kept = image.lookup("etc/python3.11/sitecustomize.py")
        new = image.lookup("etc/python3.11/sitecustomize.py.pkgnew")
        assert kept is not None
        assert new is not None
        assert kept.read_text() == "import faulthandler\n\nfaulthandler.enable()\n"
        assert sum("ResourceWarning" in line for line in new.read_text().splitlines()) == 1
