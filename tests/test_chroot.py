"""The one chroot-style resolver (``_chroot.resolve``), used by ``Rootfs.resolve`` and the CLI."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pytest_layers import _chroot, _tarapply, cli, rootfs


def test_links_and_dotdot_stay_inside(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/sh").write_text("")
    os.symlink("/usr/bin", tmp_path / "bin")
    os.symlink("../../../../etc", tmp_path / "usr/up")
    assert _chroot.resolve(tmp_path, "/bin/sh") == tmp_path / "usr/bin/sh"
    assert _chroot.resolve(tmp_path, "usr/up/passwd") == tmp_path / "etc/passwd"
    assert _chroot.resolve(tmp_path, "/missing/x") == tmp_path / "missing/x"
    assert cli._exists_inside(tmp_path, "/bin/sh")
    assert not cli._exists_inside(tmp_path, "/bin/bash")


def test_a_loop_is_eloop_after_max_symlinks(tmp_path: Path) -> None:
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(OSError, match="too many levels") as info:
        _chroot.resolve(tmp_path, "/a")
    assert info.value.errno == errno.ELOOP
    assert not cli._exists_inside(tmp_path, "/a")


def test_one_limit_for_every_walker() -> None:
    import pytest_layers.sandbox as sandbox

    assert rootfs.MAX_SYMLINKS == _chroot.MAX_SYMLINKS == 40
    assert sandbox._chroot is _chroot
    assert _tarapply._chroot is _chroot


def test_a_missing_component_before_dotdot_does_not_exist(tmp_path: Path) -> None:
    # The kernel's lookup fails at "nosuchdir" before ".." could take it away: the CLI's check
    # for the image's /bin/sh says what the sandbox would find.
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/sh").write_text("")
    os.symlink("nosuchdir/../usr/bin", tmp_path / "bin")
    assert not os.path.exists(tmp_path / "bin/sh")
    assert _chroot.resolve(tmp_path, "/bin/sh") == tmp_path / "usr/bin/sh"
    with pytest.raises(FileNotFoundError):
        _chroot.resolve(tmp_path, "/bin/sh", strict=True)
    assert not cli._exists_inside(tmp_path, "/bin/sh")
