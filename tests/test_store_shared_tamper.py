"""A shared store's members can rename and plant entries in its group-writable directories:
what the store itself creates, sets up and reads there is never reached through a symlink, a
fifo or an oversized file a member put in its place.

The store here is shared with the running user's own group, so each test runs as root and
as an ordinary user alike; the planting is done by the same user, which is all the store's
code can see of a member.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from pytest_layers import _access, errors


def _group() -> str:
    return _access.group_name(os.getegid())


def _secret(tmp_path: Path) -> tuple[Path, str]:
    """A file outside the store, and the digest verify must never print."""
    path = tmp_path / "secret"
    path.write_text("not the store's\n")
    path.chmod(0o600)
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# -- directories the store creates: group and mode set through the directory itself ------------


def test_make_dir_never_chmods_a_symlink_planted_after_the_mkdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = _access.Access.resolve(_group())
    victim, _ = _secret(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    fresh = scratch / "1-1-stage-x"
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: str | os.PathLike[str], mode: int = 0o777, **kw: object) -> None:
        real_mkdir(path, mode)
        # A member, between our mkdir and our chmod: the new directory out, a symlink in.
        os.rename(path, f"{os.fspath(path)}.moved")
        os.symlink(victim, path)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with pytest.raises(errors.StoreError) as caught:
        access.make_dir(fresh)
    monkeypatch.undo()
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    message = str(caught.value)
    assert f"{fresh}, a directory just created in the layer store, is now a symlink" in message
    assert "tampered" in message


def test_private_subtree_never_follows_a_symlink(tmp_path: Path) -> None:
    access = _access.Access.resolve(_group())
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o2750)
    staged = tmp_path / "diff"
    staged.symlink_to(victim)
    with pytest.raises(errors.StoreError, match="is now a symlink"):
        access.private_subtree(staged)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o2750


def test_make_dir_still_sets_the_shared_group_and_mode(tmp_path: Path) -> None:
    access = _access.Access.resolve(_group())
    old = os.umask(0o077)
    try:
        assert access.make_dir(tmp_path / "d")
        assert not access.make_dir(tmp_path / "d", exist_ok=True)
    finally:
        os.umask(old)
    st = os.stat(tmp_path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o2770
    assert st.st_gid == os.getegid()
