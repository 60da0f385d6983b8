"""Every test sees the pristine image; diff() follows docker diff; readonly; resolve()."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
import os
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "etc/passwd").write_text("root:x:0:0\\n")
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/libc.so").write_text("elf")
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/old.log").write_text("old")
    os.symlink("/usr/lib", root / "lib")          # absolute: resolved inside the rootfs
    os.symlink("../../../../..", root / "etc/up")  # climbs: clamped at the root
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
"""

TESTS = """
import errno, os
import pytest

@pytest.mark.layer("base")
@pytest.mark.parametrize("i", range(20))
def test_isolated(rootfs, i):
    # Every test starts from the pristine image, whatever the previous one did.
    assert (rootfs / "etc/os-release").read_text() == "ID=demo\\n"
    assert (rootfs / "usr/lib/libc.so").exists()
    assert rootfs.diff() == []
    (rootfs / "etc/os-release").write_text(f"ID={i}\\n")
    (rootfs / "usr/lib/libc.so").unlink()
    os.remove(rootfs / "etc/passwd")

@pytest.mark.layer("base", init={"etc/hostname": "web-1\\n", "run/app/pid": b"1"})
def test_diff(rootfs):
    assert (rootfs / "etc/hostname").read_text() == "web-1\\n"
    (rootfs / "etc/app.conf").write_text("debug=true\\n")       # add under existing dir
    (rootfs / "etc/os-release").write_text("ID=other\\n")      # change
    (rootfs / "var/log/old.log").unlink()                      # delete
    (rootfs / "srv/www").mkdir(parents=True)                   # new tree
    (rootfs / "srv/www/index.html").write_text("hi")
    import shutil; shutil.rmtree(rootfs / "usr")                # delete a tree: one D
    assert [str(c) for c in rootfs.diff()] == [
        "C /etc",
        "A /etc/app.conf",
        "C /etc/os-release",
        "A /srv",
        "A /srv/www",
        "A /srv/www/index.html",
        "D /usr",
        "C /var",
        "C /var/log",
        "D /var/log/old.log",
    ]

@pytest.mark.layer("base", readonly=True)
def test_readonly(rootfs):
    with pytest.raises(OSError) as exc:
        (rootfs / "etc/new").write_text("x")
    assert exc.value.errno == errno.EROFS
    assert rootfs.diff() == []

@pytest.mark.layer("base")
def test_resolve_and_paths(rootfs):
    root = rootfs.path
    assert os.fspath(rootfs) == str(root)
    assert rootfs / "/etc/passwd" == root / "etc/passwd"   # a leading / stays inside
    assert rootfs / "../../etc/passwd" == root / "etc/passwd"   # so does a climb with ..
    assert rootfs / "etc/../../../usr/./lib" == root / "usr/lib"
    assert rootfs / ".." == root
    assert rootfs.resolve("/lib/libc.so") == root / "usr/lib/libc.so"
    assert rootfs.resolve("etc/up/etc/passwd") == root / "etc/passwd"
    assert rootfs.resolve("../../../etc") == root / "etc"
    assert rootfs.resolve("/usr/lib/missing/x") == root / "usr/lib/missing/x"
    with pytest.raises(OSError, match="too many levels of symbolic links inside the rootfs") as exc:
        rootfs.resolve("loop1/x")
    assert exc.value.errno == errno.ELOOP
    assert [x.name for x in rootfs.layers] == ["base"]
"""


def test_isolation_diff_readonly_resolve(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_iso=TESTS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=23)
