"""Report header and summary, --layers-store, --layers-verify, the options reference."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_as_user
from tests.plugin_util import BASE_CONFTEST, BASE_TESTS

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference"


@pytest.mark.requires_overlay
@pytest.mark.slow
def test_header_store_and_verify(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(test_r=BASE_TESTS)
    # Run as an ordinary user (CI's second pass), the kernel overlay is mounted in a user
    # namespace, and the header says so.
    label = "overlay" if os.geteuid() == 0 else "overlay (user namespace)"
    result = pytester.runpytest_subprocess("--layers-store=my-store")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [f"layers: backend={label}, store={pytester.path}/my-store (yours, * disk use)"]
    )
    result = pytester.runpytest_subprocess("--layers-store=my-store", "--layers-verify")
    result.assert_outcomes(passed=1)
    # Disk use, as du counts it (blocks), not the 8 bytes of the layer's one file.
    result.stdout.fnmatch_lines(
        [f"layers: backend={label}, store=*/my-store (yours, *KiB disk use)"]
    )

    # Tamper with the stored layer: --layers-verify refuses to use it.
    stored = next((pytester.path / "my-store" / "layers").glob("*/diff/etc/os-release"))
    stored.write_text("ID=evil\n")
    result = pytester.runpytest_subprocess("--layers-store=my-store", "--layers-verify")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--layers-verify: 1 problem(s) in the store*"])
    # Without it, the (damaged) cache is used as is: verification is opt-in.
    pytester.runpytest_subprocess("--layers-store=my-store").assert_outcomes(failed=1)


REPORT_CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")

@layer(parent=base)
def app(root):
    (root / "etc/app.conf").write_text("a\\n")
    (root / "etc/b.conf").write_text("b\\n")
"""

REPORT_TESTS = """
import pytest

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(3))
def test_base(rootfs, i):
    pass

@pytest.mark.layer("app")
@pytest.mark.parametrize("i", range(3))
def test_app(rootfs, i):
    (rootfs / "etc/new").write_text("x")
    assert i != 1
"""


@pytest.mark.requires_overlay
def test_report_follows_pytest_conventions(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(REPORT_CONFTEST)
    pytester.makepyfile(test_rep=REPORT_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=5, failed=1)
    # Progress lines do not break pytest's row of result letters; they come in the summary,
    # with the plural right and the chain id that the CLI takes.
    result.stdout.fnmatch_lines(["test_rep.py ....F. *[[]100%[]]"])
    result.stdout.fnmatch_lines(
        [
            "*- layers -*",
            "layers: built base in *s (1 file, 8 B) sha256:*",
            "layers: built app in *s (2 files, 4 B) sha256:*",
        ]
    )
    # One -rA style line per snapshot, ending in a command to paste.
    store = pytester.path / ".pytest_cache" / "layers"
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshots -*",
            f"SNAPSHOT test_rep.py::test_app[[]1[]] -> pytest-layers --store {store} diff "
            "'snapshot:test_rep.py::test_app[[]1[]]'",
        ]
    )
    line = next(x for x in result.stdout.lines if x.startswith("SNAPSHOT "))
    command = shlex.split(line.split(" -> ", 1)[1])
    pasted = subprocess.run(
        [sys.executable, "-m", "pytest_layers.cli", *command[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (pasted.returncode, pasted.stdout) == (0, "C /etc\nA /etc/new\n"), pasted.stderr
    result.stdout.no_fnmatch_line("*NODEID*")


@pytest.mark.requires_overlay
def test_quiet_session_still_names_the_backend(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(REPORT_CONFTEST)
    pytester.makepyfile(test_rep=REPORT_TESTS)
    label = "overlay" if os.geteuid() == 0 else "overlay (user namespace)"
    result = pytester.runpytest_subprocess("-q", "-p", "no:randomly")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines([f"layers: backend={label}; 2 built"])
    result.stdout.no_fnmatch_line("layers: built *")
    result = pytester.runpytest_subprocess("-q", "-p", "no:randomly")
    result.stdout.fnmatch_lines([f"layers: backend={label}; 2 cached"])


@pytest.mark.requires_overlay
@pytest.mark.requires_root
def test_fallback_reason_is_short_in_the_header_and_full_with_v(
    pytester: pytest.Pytester,
) -> None:
    """A store on overlayfs makes kernel overlay impossible: the header says so in a few words;
    the full reason, with its fix, is shown with -v."""
    pytester.makeconftest(REPORT_CONFTEST)
    pytester.makepyfile(test_rep=REPORT_TESTS.replace("assert i != 1", "pass"))
    lower, upper, work, merged = (pytester.path / n for n in ("lower", "upper", "work", "m"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    mount = [
        "mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged),
    ]  # fmt: skip
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount an overlayfs here to put the store on")
    try:
        args = ["-p", "no:randomly", f"--layers-store={merged}/store", "-o", "cache_dir=c"]
        result = pytester.runpytest_subprocess(*args)
        result.assert_outcomes(passed=6)
        header = next(x for x in result.stdout.lines if x.startswith("layers: backend="))
        assert header.startswith(
            "layers: backend=fuse (overlay: the store spells whiteouts as 'marker' files; "
            "fix: a volume for --layers-store), "
        ) or header.startswith("layers: backend=copy (overlay: the store spells"), header
        assert len(header) < 160 + len(str(merged)), header
        result.stdout.no_fnmatch_line("layers: why:*")
        result = pytester.runpytest_subprocess("-v", *args)
        result.stdout.fnmatch_lines(["layers: why: overlay: the store spells*to fix: *"])
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def test_options_reference_matches_help(pytester: pytest.Pytester) -> None:
    """Every option and ini option in the `layers` group of `pytest --help` is in options.md,
    and the reference lists no other; ini types are pytest's own (an int shows as `(int)`)."""
    result = pytester.runpytest_subprocess("--help")
    text = result.stdout.str()
    group = text.split("layered filesystems (pytest-layers):", 1)[1].split("\n\n", 1)[0]
    flags = set(re.findall(r"^  (--layers-[a-z-]+)", group, re.M))
    inis = dict(re.findall(r"^  (layers_[a-z_]+) \((\w+)\):", text, re.M))
    assert flags, text
    assert inis, text
    assert inis["layers_keep_count"] == "int"
    assert inis["layers_verify"] == "bool"
    # The first table of the page is the options table (later ones list environment variables).
    lines = (DOCS / "options.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [line.split("|")[1:3] for line in lines[start:end] if line.startswith("| ")]
    documented = {name.strip("` ") for row in rows for name in row if name.strip("` ")}
    documented -= {"command line", "ini"}
    assert documented == flags | set(inis)


def test_short_reason_is_the_first_clause_and_the_full_text_stays() -> None:
    from pytest_layers.backends import detect

    text = (
        "overlay (user namespace): not root and not in a user namespace of its own "
        "(namespaces.enter_user_namespace() was not called, or failed)"
    )
    reasons = [detect.Reason(text), detect.Reason("fuse: /dev/fuse does not exist (modprobe)")]
    joined = detect.join_reasons(reasons)
    assert joined.short == (
        "overlay (user namespace): not root and not in a user namespace of its own; "
        "fuse: /dev/fuse does not exist"
    )
    assert str(joined) == f"{text}; fuse: /dev/fuse does not exist (modprobe)"
    assert detect.shorten("x" * 100) == "x" * 59 + "\u2026"


NEST = """#!/bin/sh
# Run "$@" inside $1 more nested user namespaces.
n=$1; shift
if [ "$n" -le 0 ]; then exec "$@"; fi
exec unshare --user --map-current-user "$0" $((n-1)) "$@"
"""


@pytest.mark.requires_user
@pytest.mark.requires_userns  # it nests real user namespaces
@pytest.mark.requires_tool("unshare")
def test_user_namespace_limit_gives_a_short_true_header(user_tmp_path: Path) -> None:
    """Nested 33 user namespaces deep, the session cannot enter its own: the header says so
    in a few words (not "not in a user namespace"), and -v has the whole story with the fix."""
    (user_tmp_path / "conftest.py").write_text(REPORT_CONFTEST)
    (user_tmp_path / "test_rep.py").write_text(REPORT_TESTS.replace("assert i != 1", "pass"))
    nest = user_tmp_path / "nest.sh"
    nest.write_text(NEST)
    nest.chmod(0o755)
    args = [str(nest), "33", sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    args += ["-p", "no:randomly", "--layers-store=store", "--rootdir", str(user_tmp_path)]
    proc = run_as_user([*args, "-v"], cwd=user_tmp_path)
    lines = pytest.LineMatcher(proc.stdout.splitlines())
    lines.fnmatch_lines(["*6 passed*"])
    header = next(x for x in proc.stdout.splitlines() if x.startswith("layers: backend="))
    assert "(no user namespace: the user namespace limit is reached" in header, header
    assert "not in a user namespace" not in header, header
    lines.fnmatch_lines(["layers: why: no user namespace: *nesting depth of 32*; raise it with *"])
