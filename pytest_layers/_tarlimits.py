"""Reading an untrusted tar within bounds: :class:`Limits` (layer size, compression
ratio, header size), ``parse_size``, and the ``tarfile`` member class that sees every
header block before ``tarfile`` reads what it announces (:class:`_BoundedTarInfo`)."""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import Any, ClassVar

from pytest_layers._tarheader import _BLOCK
from pytest_layers.errors import InvalidLayerError

_GiB = 1 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count written as an integer with an optional binary suffix (``512M``, ``16G``)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    number = raw[: len(raw) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"{text!r} is not a size; write bytes, or a number with K, M, G or T")
    return int(number) * _UNITS[unit]


@dataclass(frozen=True)
class Limits:
    """How much one untrusted layer tar may make the importer read, write and hold in memory
    (docs/reference/options.md, "Image import limits"). Each is checked while the tar streams,
    before the bytes it bounds are read, buffered or written."""

    #: Uncompressed bytes of one layer tar, and apparent bytes of the files it holds (a sparse
    #: file counts at its full size: the store hashes it and an export writes it in full).
    max_layer_size: int = 8 * _GiB
    #: Uncompressed bytes per compressed byte of one layer blob, enforced once the layer is
    #: past :attr:`RATIO_FLOOR` (a small layer of zeros may compress 1000:1 and harm nobody).
    max_ratio: int = 100
    #: Bytes of one PAX extended header, GNU long name or link, or GNU sparse map, and of all
    #: PAX global headers of a tar together: ``tarfile`` reads each whole into memory.
    max_header: int = 1 << 20

    RATIO_FLOOR: ClassVar[int] = 256 << 20
    #: Environment variables that set each limit (the CLI flags override them).
    ENV: ClassVar[dict[str, str]] = {
        "max_layer_size": "PYTEST_LAYERS_MAX_LAYER_SIZE",
        "max_ratio": "PYTEST_LAYERS_MAX_RATIO",
        "max_header": "PYTEST_LAYERS_MAX_HEADER",
    }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: int | None) -> Limits:
        """The defaults, replaced by the ``PYTEST_LAYERS_MAX_*`` variables that are set, then by
        the ``overrides`` that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for attr, var in cls.ENV.items():
            text = env.get(var, "").strip()
            if text:
                try:
                    values[attr] = parse_size(text)
                except ValueError as exc:
                    raise ValueError(f"{var}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _limit_error(what: str, size: int, limit: int, attr: str, flag: str) -> InvalidLayerError:
    return InvalidLayerError(
        f"{what}: {size} bytes, more than the limit of {limit} for an image; if the image is "
        f"trusted, raise it with `pytest-layers import {flag}` or {Limits.ENV[attr]}"
    )


_HEADER_KINDS = {
    tarfile.XHDTYPE: "PAX extended header",
    tarfile.XGLTYPE: "PAX global header",
    tarfile.SOLARIS_XHDTYPE: "PAX extended header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
}


def _truncated(where: str) -> InvalidLayerError:
    return InvalidLayerError(f"{where}: the layer tar ends inside it (truncated or damaged)")


_MAX_HEADER_RUN = 16


class _BoundedTarInfo(tarfile.TarInfo):
    """``tarfile.TarInfo`` that refuses oversized headers before ``tarfile`` reads them whole.

    ``tarfile`` reads a PAX header, a GNU long name and a GNU sparse map into memory in one
    piece, however large the archive says it is; these hooks run on the 512-byte header block
    first and stop the read. (Private ``tarfile`` hooks, unchanged from Python 3.8 to 3.13.)
    """

    limits: ClassVar[Limits] = Limits()

    @classmethod
    def bounded(cls, limits: Limits) -> type[_BoundedTarInfo]:
        return type("_BoundedTarInfo", (cls,), {"limits": limits})

    def _where(self) -> str:
        return f"tar header {self.name[:100]!r} at byte {self.offset}"

    def _proc_member(self, tf: Any) -> Any:
        kind = _HEADER_KINDS.get(self.type)
        if kind is None:
            return super()._proc_member(tf)  # type: ignore[misc]
        # tarfile reads the header after an extended header by recursing: a long run of them
        # ends in RecursionError. Real tars have at most one of each kind before an entry.
        depth = getattr(tf, "_layers_depth", 0)
        if depth >= _MAX_HEADER_RUN:
            raise InvalidLayerError(
                f"{self._where()}: more than {_MAX_HEADER_RUN} extended headers in a row; "
                "the layer tar is damaged or hostile"
            )
        tf._layers_depth = depth + 1
        try:
            limit = self.limits.max_header
            if self.size > limit:
                raise _limit_error(
                    f"{self._where()}: its {kind}", self.size, limit, "max_header", "--max-header"
                )
            if self.type == tarfile.XGLTYPE:
                total = getattr(tf, "_layers_global_bytes", 0) + self.size
                tf._layers_global_bytes = total
                if total > limit:
                    raise _limit_error(
                        f"{self._where()}: the PAX global headers together",
                        total,
                        limit,
                        "max_header",
                        "--max-header",
                    )
            return super()._proc_member(tf)  # type: ignore[misc]
        finally:
            tf._layers_depth = depth

    def _proc_sparse(self, tf: Any) -> Any:
        # As tarfile's own, with a bound on the extension blocks and a check for a short read.
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        read = 0
        while isextended:
            read += _BLOCK
            if read > self.limits.max_header:
                raise _limit_error(
                    f"{self._where()}: its GNU sparse map",
                    read,
                    self.limits.max_header,
                    "max_header",
                    "--max-header",
                )
            buf = tf.fileobj.read(_BLOCK)
            if len(buf) < _BLOCK:
                raise _truncated(self._where())
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos : pos + 12])  # type: ignore[attr-defined]
                    numbytes = tarfile.nti(buf[pos + 12 : pos + 24])  # type: ignore[attr-defined]
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            isextended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tf.fileobj.tell()
        tf.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tf: Any) -> None:
        # GNU sparse 1.0 keeps its map at the start of the data: decimal numbers, one a line,
        # the count first. tarfile reads lines until it has them all, without a bound and
        # without noticing the end of the archive (an endless loop there).
        limit = self.limits.max_header
        buf = bytearray()
        pos = 0

        def number() -> int:
            nonlocal pos
            while (end := buf.find(b"\n", pos)) < 0:
                if len(buf) >= limit:
                    raise _limit_error(
                        f"{self._where()}: its GNU sparse map",
                        len(buf),
                        limit,
                        "max_header",
                        "--max-header",
                    )
                more = tf.fileobj.read(_BLOCK)
                if len(more) < _BLOCK:
                    raise _truncated(self._where())
                buf.extend(more)
            text = bytes(buf[pos:end])
            pos = end + 1
            if not text.isdigit() or len(text) > 20:
                raise InvalidLayerError(f"{self._where()}: a malformed GNU sparse map")
            return int(text)

        fields = number()
        if fields * 4 > limit:
            raise _limit_error(
                f"{self._where()}: its GNU sparse map",
                fields * 4,
                limit,
                "max_header",
                "--max-header",
            )
        values = [number() for _ in range(fields * 2)]
        next.offset_data = tf.fileobj.tell()
        next.sparse = list(zip(values[::2], values[1::2], strict=True))
