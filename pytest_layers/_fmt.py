"""How sizes and digests are written for people: one rule for the report, the CLI and the
progress lines, so ``1.2 MiB`` and ``3f2a9c01b7de`` read the same wherever they appear.
No pytest here."""

from __future__ import annotations

__all__ = ["human_size", "plural", "short_digest"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_size(n: float) -> str:
    """``512 B``, ``1.2 MiB``: binary units, one decimal above bytes, TiB at most."""
    size = float(n)
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def short_digest(digest: str) -> str:
    """The first 12 hex digits of ``sha256:<hex>`` (or of a bare hex digest), as Docker shows
    image ids."""
    return digest.split(":", 1)[-1][:12]


def plural(n: int, word: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
