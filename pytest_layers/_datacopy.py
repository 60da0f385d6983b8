"""Copying a regular file's bytes between open fds, in one place: the layer writer, the
settling of a built tree and the copy backend all go through :func:`copy_data`.

Holes are kept (a sparse 8 GiB file stays sparse: only its data extents, found with
``SEEK_DATA``/``SEEK_HOLE``, are copied, then the file is cut to its size). Data moves with
``copy_file_range`` while the filesystem pair takes it (a pair that refuses it once is
remembered, so a commit from a tmpfs upper dir into the store's disk does not try it on every
file), else with ``pread``/``pwrite``. A small dense file (:func:`dense`) is read and written
in one go and its bytes are handed back, for a caller that hashes what it wrote.
"""

from __future__ import annotations

import errno
import os

CHUNK = 1 << 20
# copy_file_range cannot serve this pair of filesystems (or this kernel): use pread/pwrite.
_NO_CFR = frozenset({errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP})
_cfr_refused: set[tuple[int, int]] = set()


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """(start, end) of every data extent in the first ``size`` bytes of the open file ``fd``
    (holes left out), or None when the filesystem cannot say."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size)))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP):
            return None
        raise
    return out


def dense(st: os.stat_result | None, size: int) -> bool:
    """Whether a file of at most a chunk has as many blocks as bytes: no hole worth keeping or
    skipping, so it is read or copied in one go (no ``lseek`` for its extents: a commit
    compares and copies thousands of small files)."""
    return st is not None and size <= CHUNK and st.st_blocks * 512 >= size


def _shrank(strict: bool) -> None:
    if strict:
        raise OSError(errno.EIO, "source file shrank while copying")


def copy_range(
    src: int,
    dst: int,
    start: int,
    end: int,
    *,
    pair: tuple[int, int] | None = None,
    strict: bool = False,
) -> int:
    """Copy bytes ``start..end``; returns where it stopped (``end``, or earlier when the source
    shrank: ``strict`` raises ``EIO`` then). ``pair``: the (source, destination) ``st_dev``,
    under which a refused ``copy_file_range`` is remembered."""
    pos = start
    while pos < end:
        n = min(end - pos, 1 << 30)
        use_cfr = pair is None or pair not in _cfr_refused
        if use_cfr:
            try:
                done = os.copy_file_range(src, dst, n, pos, pos)
            except OSError as exc:
                if exc.errno not in _NO_CFR:
                    raise
                if pair is not None:
                    _cfr_refused.add(pair)
                use_cfr = False
        if not use_cfr:
            buf = os.pread(src, min(n, CHUNK), pos)
            done = 0
            while done < len(buf):
                done += os.pwrite(dst, memoryview(buf)[done:], pos + done)
        if done == 0:  # source shrank while we copied
            _shrank(strict)
            return pos
        pos += done
    return pos


def write_all(dst: int, data: bytes) -> None:
    """Write ``data`` at the start of the open file ``dst``."""
    pos = 0
    while pos < len(data):
        pos += os.pwrite(dst, memoryview(data)[pos:], pos)


def copy_data(
    src: int,
    dst: int,
    size: int,
    st: os.stat_result | None = None,
    *,
    dst_dev: int | None = None,
    strict: bool = False,
) -> bytes | None:
    """Copy the first ``size`` bytes of the open regular file ``src`` to ``dst``, holes kept,
    and cut ``dst`` to ``size``.

    With the source's ``st``, a small dense file (:func:`dense`) is read and written in one
    go and its bytes returned (``copy_file_range`` saves nothing on a chunk); None otherwise.
    A source that shrinks meanwhile leaves zeros in the rest, or raises ``EIO`` when
    ``strict``. ``dst_dev`` (with ``st``): the destination's ``st_dev``, so that a filesystem
    pair refusing ``copy_file_range`` is asked once.
    """
    if dense(st, size):
        data = os.pread(src, size, 0)
        write_all(dst, data)
        if len(data) < size:
            _shrank(strict)
            os.ftruncate(dst, size)  # the rest reads as zeros
            return None
        return data
    pair = (st.st_dev, dst_dev) if st is not None and dst_dev is not None else None
    if st is not None and st.st_blocks * 512 >= size:
        extents: list[tuple[int, int]] | None = [(0, size)]  # no hole to look for
    else:
        extents = data_extents(src, size)
    for start, end in extents if extents is not None else [(0, size)]:
        copy_range(src, dst, start, end, pair=pair, strict=strict)
    os.ftruncate(dst, size)
    return None
