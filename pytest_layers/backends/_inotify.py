"""A minimal inotify(7) binding (ctypes over libc): what the copy backend's reusable copies use
to learn what a test changed without walking the tree.

inotify needs no privilege and works inside containers. Its limits are the callers' to handle:
a full event queue (``IN_Q_OVERFLOW``) loses events, ``inotify_add_watch`` fails with
``ENOSPC`` past ``fs.inotify.max_user_watches``, writes through ``mmap`` raise no
``IN_MODIFY`` (the mapping's ``IN_CLOSE_WRITE`` comes only when its last reference goes).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator

__all__ = [
    "IN_ATTRIB",
    "IN_CLOSE_NOWRITE",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_ISDIR",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_OPEN",
    "IN_Q_OVERFLOW",
    "IN_UNMOUNT",
    "Inotify",
]

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_CLOSE_NOWRITE = 0x10
IN_OPEN = 0x20
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_ISDIR = 0x40000000

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


class Inotify:
    """One non-blocking inotify instance. Raises ``OSError`` as the syscalls do."""

    def __init__(self) -> None:
        fd = _lib().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int | None = fd

    def add(self, path: str, mask: int) -> int:
        """Watch the directory ``path`` (never through a symlink); returns the watch id."""
        assert self.fd is not None
        wd = _lib().inotify_add_watch(
            self.fd, os.fsencode(path), mask | IN_ONLYDIR | IN_DONT_FOLLOW
        )
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path!r}: {os.strerror(err)}")
        return int(wd)

    def remove(self, wd: int) -> None:
        """Stop watching ``wd`` (gone already is fine)."""
        if self.fd is not None:
            _lib().inotify_rm_watch(self.fd, wd)

    def read(self) -> Iterator[tuple[int, int, int, str]]:
        """The queued events as ``(wd, mask, cookie, name)``; returns when the queue is empty."""
        while self.fd is not None:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            pos = 0
            while pos < len(data):
                wd, mask, cookie, size = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size
                raw = data[pos : pos + size].split(b"\0", 1)[0]
                pos += size
                yield wd, mask, cookie, os.fsdecode(raw)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
