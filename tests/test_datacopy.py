"""The one sparse copier (``_datacopy``): holes kept, a refused copy_file_range asked once per
filesystem pair, small dense files in one go with their bytes handed back."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pytest_layers import _datacopy


def _open_pair(tmp_path: Path, data: bytes, *, hole: int = 0) -> tuple[int, int, os.stat_result]:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        if hole:
            f.seek(hole)
        f.write(data)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return sfd, dfd, os.fstat(sfd)


def test_a_small_dense_file_is_copied_in_one_go_and_handed_back(tmp_path: Path) -> None:
    sfd, dfd, st = _open_pair(tmp_path, b"x" * 3000)
    try:
        assert _datacopy.copy_data(sfd, dfd, st.st_size, st) == b"x" * 3000
    finally:
        os.close(sfd)
        os.close(dfd)
    assert (tmp_path / "dst").read_bytes() == b"x" * 3000


def test_holes_are_kept(tmp_path: Path) -> None:
    sfd, dfd, st = _open_pair(tmp_path, b"tail", hole=64 << 20)
    if st.st_blocks * 512 >= st.st_size:
        pytest.skip(f"{tmp_path} does not keep holes")
    try:
        assert _datacopy.copy_data(sfd, dfd, st.st_size, st) is None
    finally:
        os.close(sfd)
        os.close(dfd)
    out = os.stat(tmp_path / "dst")
    assert out.st_size == st.st_size
    assert out.st_blocks * 512 < 1 << 20
    with open(tmp_path / "dst", "rb") as f:
        f.seek(64 << 20)
        assert f.read() == b"tail"


def test_a_refused_copy_file_range_is_asked_once_per_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def refuse(*args: object) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(_datacopy, "_cfr_refused", set())
    data = b"y" * ((2 << 20) + 5)  # more than a chunk: not the one-go path
    for n in range(3):
        sub = tmp_path / str(n)
        sub.mkdir()
        sfd, dfd, st = _open_pair(sub, data)
        try:
            _datacopy.copy_data(sfd, dfd, st.st_size, st, dst_dev=12345)
        finally:
            os.close(sfd)
            os.close(dfd)
        assert (sub / "dst").read_bytes() == data
    assert len(calls) == 1


def test_strict_raises_when_the_source_shrank(tmp_path: Path) -> None:
    sfd, dfd, st = _open_pair(tmp_path, b"z" * 100)
    os.truncate(tmp_path / "src", 10)
    try:
        with pytest.raises(OSError, match="shrank"):
            _datacopy.copy_data(sfd, dfd, 100, st, strict=True)
        # not strict: the rest reads as zeros
        assert _datacopy.copy_data(sfd, dfd, 100, st) is None
    finally:
        os.close(sfd)
        os.close(dfd)
    assert (tmp_path / "dst").read_bytes() == b"z" * 10 + bytes(90)
