"""``rootfs.diff(details=True)``: the data and text forms, the assertion message between two
diffs, and the failing test's report section with the rw layer's text changes."""

from __future__ import annotations

import json

import pytest

from pytest_layers import Diff, DiffEntry

CONFTEST = """
import os
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "etc/motd").write_text("".join(f"line {i}\\n" for i in range(100)))
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"\\x7fELF\\0\\0")
    (root / "old").mkdir()
    (root / "old/gone.txt").write_text("bye\\n")
"""

DETAILS_TESTS = """
import json
import os
import pytest
from pytest_layers import Diff

@pytest.mark.layer("base")
def test_details(rootfs):
    (rootfs / "etc/os-release").write_text("ID=other\\n")
    os.chmod(rootfs / "etc/os-release", 0o600)
    os.symlink("os-release", rootfs / "etc/link")
    os.mkfifo(rootfs / "etc/pipe")
    (rootfs / "old/gone.txt").unlink()
    diff = rootfs.diff(details=True)
    assert [str(c) for c in rootfs.diff()] == [f"{e.kind} {e.path}" for e in diff]
    data = diff.to_data()
    assert json.loads(json.dumps(data)) == data
    assert Diff.from_data(data) == diff
    print("DATA " + json.dumps(data))
    print("TEXT " + diff.to_text().replace("\\n", "|"))

@pytest.mark.layer("base")
def test_compare(rootfs):
    (rootfs / "etc/os-release").write_text("ID=other\\n")
    (rootfs / "etc/new.conf").write_text("x\\n")
    expected = [
        {"kind": "C", "path": "/etc", "type": "dir", "mode": "0755"},
        {"kind": "A", "path": "/etc/app.conf", "type": "file", "mode": "0644", "size": 2},
        {"kind": "C", "path": "/etc/os-release", "type": "file", "mode": "0600",
         "size": 9, "digest": rootfs.diff(details=True)[2].digest},
    ]
    assert rootfs.diff(details=True) == expected
"""

SHA_OTHER = "sha256:" + __import__("hashlib").sha256(b"ID=other\n").hexdigest()


@pytest.mark.requires_overlay
def test_data_text_and_assertion_message(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_d=DETAILS_TESTS)
    result = pytester.runpytest_subprocess("-s", "--layers-keep=never")
    result.assert_outcomes(passed=1, failed=1)
    line = next(x for x in result.outlines if x.startswith("DATA ") or "DATA [" in x)
    data = json.loads(line.split("DATA ", 1)[1])
    assert data == [
        {"kind": "C", "path": "/etc", "type": "dir", "mode": "0755"},
        {"kind": "A", "path": "/etc/link", "type": "symlink", "mode": "0777",
         "target": "os-release"},
        {"kind": "C", "path": "/etc/os-release", "type": "file", "mode": "0600", "size": 9,
         "digest": SHA_OTHER},
        {"kind": "A", "path": "/etc/pipe", "type": "fifo", "mode": "0644"},
        {"kind": "C", "path": "/old", "type": "dir", "mode": "0755"},
        {"kind": "D", "path": "/old/gone.txt"},
    ]  # fmt: skip
    result.stdout.fnmatch_lines(
        [
            "TEXT C /etc dir 0755|A /etc/link symlink 0777 -> os-release|"
            f"C /etc/os-release file 0600 9 {SHA_OTHER[:19]}|A /etc/pipe fifo 0644|"
            "C /old dir 0755|D /old/gone.txt|*"
        ]
    )
    # Two diffs that differ: only the differing entries, field by field.
    result.stdout.fnmatch_lines(
        [
            "E       AssertionError: assert diffs differ (3 entries left, 3 right):",
            "E           only right: A /etc/app.conf file 0644 2",
            "E           only left:  A /etc/new.conf file 0644 2 sha256:*",
            "E           /etc/os-release: mode: '0644' != '0600'",
        ]
    )
    result.stdout.no_fnmatch_line("E *C /etc dir*")


def test_diff_values_without_a_mount() -> None:
    a = Diff([DiffEntry("C", "/etc", "dir", "0755"), DiffEntry("D", "/etc/x")])
    assert a == [{"kind": "D", "path": "/etc/x"}, {"kind": "C", "path": "/etc", "type": "dir",
                                                  "mode": "0755"}]  # fmt: skip
    assert a != [{"kind": "D", "path": "/etc/y"}]
    assert a.to_text() == "C /etc dir 0755\nD /etc/x\n"
    assert list(Diff.from_data(a.to_data())) == list(a)
    with pytest.raises(ValueError, match=r"unknown diff entry field\(s\) \['mtime'\]"):
        DiffEntry.from_dict({"kind": "A", "path": "/x", "mtime": 1})


REPORT_TESTS = """
import pytest

@pytest.mark.layer("base")
def test_writes(rootfs):
    (rootfs / "etc/os-release").write_text("ID=other\\n")
    (rootfs / "etc/motd").write_text("".join(f"LINE {i}\\n" for i in range(100)))
    (rootfs / "bin/tool").write_bytes(b"\\x7fELF\\0\\1")
    (rootfs / "old/gone.txt").unlink()
    for i in range(3):
        (rootfs / f"etc/a{i}.conf").write_text(f"extra {i}\\n")
    for i in range(2):
        (rootfs / f"etc/z{i}.conf").write_text(f"extra {i}\\n")
    assert False, "the test failed"
"""


@pytest.mark.requires_overlay
def test_failure_report_shows_what_the_test_wrote(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_r=REPORT_TESTS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- layers snapshot -*",
            "snapshot:test_r.py::test_writes *",
            "changed text files (against the image):",
            "--- /dev/null",
            "+++ b/etc/a0.conf",
            "@@ -0,0 +1 @@",
            "+extra 0",
            "--- /dev/null",
            "+++ b/etc/a1.conf",
            "+++ b/etc/a2.conf",
            "--- a/etc/motd",
            "+++ b/etc/motd",
            "@@ -1,100 +1,100 @@",
            "-line 0",
            # Each file is cut at 40 lines...
            "... (163 more lines)",
            "--- a/etc/os-release",
            "+++ b/etc/os-release",
            "-ID=demo",
            "+ID=other",
            # ... at most five files are shown; binary files and the rest are named.
            "binary or large file /bin/tool differs",
            "changed /etc/z0.conf",
            "changed /etc/z1.conf",
            "deleted /old/gone.txt",
            "*- layers snapshots -*",
        ]
    )
    result.stdout.no_fnmatch_line("+LINE 99")
