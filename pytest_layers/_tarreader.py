"""The fast reader of an untrusted layer tar: plain ustar headers of the common types are
parsed here, straight from the stream; every other header (PAX, GNU long names, sparse) is
handed to ``tarfile`` through the bounded member class."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from pytest_layers._tarheader import _BLOCK
from pytest_layers._tarlimits import _truncated
from pytest_layers._tarwrite import _CHUNK

# Types whose plain ustar header the fast reader parses itself: regular files (``0``, and ``\0``
# unless the name ends in "/"), hard links, symlinks, devices, directories and fifos.
_FAST_TYPES = frozenset((b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6"))


class _PlainTarReader:
    """The members of an uncompressed layer tar in a regular file, as ``tarfile`` would give
    them, parsed about five times faster.

    ``tarfile`` spends some 40 us of Python per member on a header (and more on the file
    object it wraps each member's data in): on a 100,000-file layer that is seconds of a pull.
    Most headers of a layer are plain ustar ones, and those this reader parses itself with the
    very rules of ``tarfile.TarInfo.frombuf`` and ``_proc_builtin`` (the fields cut at their
    first NUL, numbers as ``int(text.strip() or "0", 8)``, the ustar prefix joined, a
    directory's trailing slashes dropped); the data of a member is then read with ``pread`` at
    its offset. Anything else is handed to ``tarfile`` itself, at the same offset: PAX and GNU
    extended headers, sparse files, base-256 numbers, a checksum that is not the plain sum,
    the end of the archive, damage; and, once a PAX global header was seen, every member, since
    ``tarfile`` patches those into the members after it. Both paths give the same members, which
    a test checks header by header against ``tarfile`` alone.
    """

    def __init__(self, fileobj: BinaryIO, tarinfo: type[tarfile.TarInfo]) -> None:
        self.fd = fileobj.fileno()
        self.tf = tarfile.open(fileobj=fileobj, mode="r:", tarinfo=tarinfo)  # noqa: SIM115
        self.tarinfo = tarinfo
        self.offset = -1  # where the next header is; -1: tarfile has the first one

    def next(self) -> tarfile.TarInfo | None:
        tf = self.tf
        if self.offset >= 0 and not tf.pax_headers:
            member = self._plain(os.pread(self.fd, _BLOCK, self.offset), self.offset)
            if member is not None:
                return member
            tf.offset = self.offset
        member = tf.next()
        tf.members.clear()  # type: ignore[attr-defined]  # see apply_layer_tar
        self.offset = tf.offset
        return member

    def _plain(self, buf: bytes, offset: int) -> tarfile.TarInfo | None:
        """The member whose header is ``buf`` at ``offset``, or None for tarfile to parse."""
        kind = buf[156:157]
        if len(buf) != _BLOCK or kind not in _FAST_TYPES:
            return None
        try:
            chksum = _octal(buf[148:156])
            if chksum != 256 + sum(buf[:148]) + sum(buf[156:]):
                return None
            m = self.tarinfo()
            m.name = self._text(buf[0:100])
            m.mode = _octal(buf[100:108])
            m.uid = _octal(buf[108:116])
            m.gid = _octal(buf[116:124])
            m.size = _octal(buf[124:136])
            m.mtime = _octal(buf[136:148])
            m.devmajor = _octal(buf[329:337])
            m.devminor = _octal(buf[337:345])
        except ValueError:
            return None  # base-256 or malformed: tarfile decides
        m.chksum = chksum
        if kind == tarfile.AREGTYPE and m.name.endswith("/"):
            kind = tarfile.DIRTYPE
        m.type = kind
        m.linkname = self._text(buf[157:257])
        m.uname = self._text(buf[265:297])
        m.gname = self._text(buf[297:329])
        prefix = self._text(buf[345:500])
        if kind == tarfile.DIRTYPE:
            m.name = m.name.rstrip("/")
        if prefix:
            m.name = prefix + "/" + m.name
        m.offset = offset
        m.offset_data = offset + _BLOCK
        self.offset = m.offset_data
        if m.isreg():
            self.offset += -(-m.size // _BLOCK) * _BLOCK
        return m

    def _text(self, field: bytes) -> str:
        # tarfile's nts() with the archive's encoding and error handler.
        return field.split(b"\0", 1)[0].decode(self.tf.encoding, self.tf.errors)

    def read_data(self, m: tarfile.TarInfo) -> Iterator[bytes]:
        """The data of regular member ``m`` in chunks of at most ``_CHUNK`` bytes."""
        at, left = m.offset_data, max(m.size, 0)  # tarfile reads nothing for a negative size
        while left:
            chunk = os.pread(self.fd, min(left, _CHUNK), at)
            if not chunk:
                raise _truncated(repr(m.name))
            at += len(chunk)
            left -= len(chunk)
            yield chunk


def _octal(field: bytes) -> int:
    """A number field of plain octal digits, as tarfile's ``nti()`` reads it; ValueError for
    any other (base-256, a sign, ``0o``, underscores, junk), which tarfile then parses."""
    text = field.split(b"\0", 1)[0].strip()
    if field[0] & 0x80 or text.strip(b"01234567"):
        raise ValueError(f"not plain octal: {field!r}")
    return int(text or b"0", 8)
