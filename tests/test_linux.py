"""ctypes syscall bindings: errors carry errno, operation and target; the new mount API works."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_layers import _linux, namespaces
from pytest_layers.errors import MountError


def test_umount_error_names_operation_target_and_reason(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        _linux.umount2(tmp_path / "not-a-mount")
    exc = info.value
    assert exc.errno in (errno.EINVAL, errno.ENOENT, errno.EPERM)
    assert exc.operation == "umount2"
    assert exc.target == str(tmp_path / "not-a-mount")
    assert exc.reason == os.strerror(exc.errno)
    assert str(tmp_path / "not-a-mount") in str(exc)
    assert isinstance(exc, OSError)
    copy = pickle.loads(pickle.dumps(exc))  # travels between xdist processes intact
    assert (copy.errno, copy.target, copy.operation) == (exc.errno, exc.target, "umount2")


def test_unknown_architecture_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_linux, "_MACHINE", "mips")
    monkeypatch.setattr(_linux, "_TABLE", None)
    with pytest.raises(MountError, match=r"architecture 'mips'.*x86_64 and aarch64") as info:
        _linux.fsopen("tmpfs")
    assert info.value.errno == errno.ENOSYS


def test_capget_sees_this_process() -> None:
    caps = _linux.capget()
    has_admin = bool(caps.effective & (1 << _linux.CAP_SYS_ADMIN))
    assert has_admin == _linux.has_effective_cap(_linux.CAP_SYS_ADMIN)
    assert caps.effective & ~caps.permitted == 0  # effective is always within permitted


@pytest.mark.requires_root
def test_fsconfig_error_names_the_key() -> None:
    fd = _linux.fsopen("overlay")
    try:
        with pytest.raises(MountError) as info:
            _linux.fsconfig_string(fd, "no_such_option", "1")
    finally:
        os.close(fd)
    assert info.value.errno == errno.EINVAL
    assert info.value.target == "no_such_option"
    assert "fsconfig(no_such_option) failed" in str(info.value)


@pytest.mark.requires_root
def test_new_mount_api_and_legacy_mount_in_a_private_namespace(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, os, sys
        from pathlib import Path
        from pytest_layers import _linux, namespaces
        namespaces.enter_private_mount_namespace()
        base = Path(sys.argv[1])
        (base / "a").mkdir(); (base / "b").mkdir()
        fd = _linux.fsopen("tmpfs")
        _linux.fsconfig_string(fd, "size", "1m")
        _linux.fsconfig_create(fd)
        mnt = _linux.fsmount(fd, attr_flags=_linux.MOUNT_ATTR_RDONLY)
        _linux.move_mount(mnt, base / "a")
        os.close(mnt); os.close(fd)
        try:
            (base / "a" / "x").write_text("x")
            ro = "writable"
        except OSError as exc:
            ro = os.strerror(exc.errno)
        _linux.mount("tmpfs", base / "b", "tmpfs", 0, "size=1m")
        (base / "b" / "x").write_text("x")
        seen = [l.split()[4] for l in open("/proc/self/mountinfo") if str(base) in l]
        _linux.umount2(base / "a")
        _linux.umount2(base / "b", _linux.MNT_DETACH)
        left = [l.split()[4] for l in open("/proc/self/mountinfo") if str(base) in l]
        print(json.dumps({"ro": ro, "seen": seen, "left": left}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != namespaces.ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {
        "ro": os.strerror(errno.EROFS),
        "seen": [str(tmp_path / "a"), str(tmp_path / "b")],
        "left": [],
    }


def test_open_in_root_keeps_absolute_symlinks_and_dotdot_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("inside\n")
    os.symlink("/etc", root / "abs")
    os.symlink("../../../../../../../etc", root / "up")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in ("abs/hostname", "up/hostname", "/../etc/hostname"):
            file_fd = _linux.open_in_root(fd, path, os.O_RDONLY)
            with os.fdopen(file_fd) as f:
                assert f.read() == "inside\n"
        # The host's /etc/passwd exists; the root's does not.
        with pytest.raises(MountError) as info:
            _linux.open_in_root(fd, "abs/passwd", os.O_RDONLY)
        assert info.value.errno == errno.ENOENT
    finally:
        os.close(fd)
