"""A test's changes as data and text for reviews and snapshot tools; no pytest here.

:class:`Diff` is what ``Rootfs.diff(details=True)`` returns: one :class:`DiffEntry` per
``docker diff`` line, with what a reviewer needs to see that a file really changed (type, mode,
size, content digest, link target) and nothing that differs between machines or runs (no
mtimes, inode numbers or owners). ``to_data()`` is plain JSON-able data, ``to_text()`` one
line per entry. :func:`unified` renders the changed text files of a view as a short unified
diff against the image, for a failing test's report.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_layers import changeset

__all__ = ["DiffEntry", "Diff", "details", "explain", "unified"]

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFSOCK: "socket",
}
_FIELDS = ("kind", "path", "type", "mode", "size", "digest", "target")
#: The most bytes of one file the report's unified diff reads (each side).
_READ_LIMIT = 256 * 1024


@dataclass(frozen=True)
class DiffEntry:
    """One changed path. ``kind`` and ``path`` are those of :class:`~pytest_layers.Change`;
    for a deletion (``"D"``) every other field is None. ``mode`` is the permission bits as
    four octal digits (``"0644"``), ``size`` and ``digest`` (``sha256:HEX`` of the content)
    are set for regular files, ``target`` for symlinks."""

    kind: str
    path: str
    type: str | None = None
    mode: str | None = None
    size: int | None = None
    digest: str | None = None
    target: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, in a fixed order (plain str/int values: JSON and YAML)."""
        return {k: getattr(self, k) for k in _FIELDS if getattr(self, k) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffEntry:
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown diff entry field(s) {sorted(unknown)}; known: {_FIELDS}")
        return cls(**dict(data))

    def __str__(self) -> str:
        """``A /etc/app.conf file 0644 12 sha256:0123456789ab`` (digest shortened to 12)."""
        words = [self.kind, self.path]
        if self.type is not None:
            words.append(self.type)
        if self.mode is not None:
            words.append(self.mode)
        if self.size is not None:
            words.append(str(self.size))
        if self.digest is not None:
            algo, _, hexdigest = self.digest.partition(":")
            words.append(f"{algo}:{hexdigest[:12]}")
        if self.target is not None:
            words.append(f"-> {self.target}")
        return " ".join(words)


class Diff(Sequence[DiffEntry]):
    """The detailed changes of a view, sorted by path; compares equal to another ``Diff`` or to
    a list of entries or of their ``to_dict()`` data (what a snapshot tool stored)."""

    def __init__(self, entries: Sequence[DiffEntry]) -> None:
        self._entries = tuple(sorted(entries, key=lambda e: (e.path, e.kind)))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: Any) -> Any:
        return self._entries[i]

    def __iter__(self) -> Iterator[DiffEntry]:
        return iter(self._entries)

    def __eq__(self, other: object) -> bool:
        other_entries = _as_entries(other)
        if other_entries is None:
            return NotImplemented
        return self._entries == tuple(sorted(other_entries, key=lambda e: (e.path, e.kind)))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, so not hashable

    def __repr__(self) -> str:
        return f"Diff({list(self._entries)!r})"

    def to_data(self) -> list[dict[str, Any]]:
        """A list of plain dicts (``DiffEntry.to_dict``): stable, JSON- and YAML-able."""
        return [e.to_dict() for e in self._entries]

    def to_text(self) -> str:
        """One line per entry (``str(entry)``), newline-terminated; empty for no changes."""
        return "".join(f"{e}\n" for e in self._entries)

    @classmethod
    def from_data(cls, data: Sequence[Mapping[str, Any]]) -> Diff:
        """The inverse of :meth:`to_data`."""
        return cls([DiffEntry.from_dict(d) for d in data])


def _as_entries(value: object) -> list[DiffEntry] | None:
    if isinstance(value, Diff):
        return list(value)
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, DiffEntry):
                out.append(item)
            elif isinstance(item, Mapping):
                try:
                    out.append(DiffEntry.from_dict(item))
                except (TypeError, ValueError):
                    return None
            else:
                return None
        return out
    return None


def explain(left: object, right: object) -> list[str] | None:
    """The lines an assertion ``left == right`` between diffs shows: only the entries that
    differ, by path (None when neither side is a :class:`Diff`)."""
    if not isinstance(left, Diff) and not isinstance(right, Diff):
        return None
    a, b = _as_entries(left), _as_entries(right)
    if a is None or b is None:
        return None
    # A path appears once in a diff, so entries pair up by path.
    paths_a = {e.path: e for e in a}
    paths_b = {e.path: e for e in b}
    lines = [f"diffs differ ({len(a)} entries left, {len(b)} right):"]
    for path in sorted(set(paths_a) | set(paths_b)):
        ea, eb = paths_a.get(path), paths_b.get(path)
        if ea == eb:
            continue
        if ea is not None and eb is not None:
            fields = [
                f"{k}: {getattr(ea, k)!r} != {getattr(eb, k)!r}"
                for k in _FIELDS
                if getattr(ea, k) != getattr(eb, k)
            ]
            lines.append(f"  {path}: {'; '.join(fields)}")
        elif ea is not None:
            lines.append(f"  only left:  {ea}")
        elif eb is not None:
            lines.append(f"  only right: {eb}")
    return lines


def details(entries: Sequence[changeset.Entry]) -> Diff:
    """The :class:`Diff` of a change list (as ``Rootfs`` computes it)."""
    out = []
    for entry in entries:
        path = "/" + entry.path
        if entry.kind == "D":
            out.append(DiffEntry(entry.kind, path))
            continue
        fd = changeset.open_source(entry)
        try:
            st = os.fstat(fd)
            kind = _TYPES.get(stat.S_IFMT(st.st_mode), "unknown")
            size = digest = target = None
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
                digest = _digest(entry)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        out.append(DiffEntry(entry.kind, path, kind, mode, size, digest, target))
    return Diff(out)


def _digest(entry: changeset.Entry) -> str:
    h = hashlib.sha256()
    fd = changeset.open_source(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# ---- the report's unified diff ---------------------------------------------------------------


def _read(entry: changeset.Entry | None, path: str | None) -> bytes | None:
    """Up to ``_READ_LIMIT + 1`` bytes of a regular file (an entry's, or a path's)."""
    # O_NONBLOCK: opening a fifo the test left must not wait for a writer.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        if entry is not None:
            fd = changeset.open_source(entry, flags)
        elif path is not None:
            fd = os.open(path, flags)
        else:
            return None
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(_READ_LIMIT + 1)


def _is_file(entry: changeset.Entry) -> bool:
    try:
        fd = changeset.open_source(entry)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def _text(data: bytes) -> list[str] | None:
    if b"\0" in data or len(data) > _READ_LIMIT:
        return None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None


def unified(
    entries: Sequence[changeset.Entry],
    image: changeset.ImageView,
    *,
    max_files: int = 5,
    max_lines: int = 40,
) -> str:
    """The changed regular files of ``entries`` as unified diffs against ``image``.

    At most ``max_files`` files, each cut at ``max_lines`` lines; binary files, files over
    256 KiB and files beyond the limit are named only. Deleted files are named. Empty when no
    regular file changed.
    """
    out: list[str] = []
    named: list[str] = []
    unnamed = 0
    shown = 0

    def name(line: str) -> None:
        nonlocal unnamed
        if len(named) < 4 * max_files:
            named.append(line)
        else:
            unnamed += 1

    for entry in sorted(entries, key=lambda e: e.path):
        path = "/" + entry.path
        if entry.kind == "D":
            name(f"deleted {path}")
            continue
        if not _is_file(entry):
            continue  # directories, links, devices: the snapshot's diff lists them
        if shown >= max_files:
            name(f"changed {path}")
            continue
        old_path = image.lookup(entry.path) if entry.kind == "C" else None
        old = _read(None, os.fspath(old_path)) if old_path is not None else None
        if old is None:
            old_path = None  # new, or not a regular file in the image: diff against nothing
        new = _read(entry, None)
        new_lines = _text(new) if new is not None else None
        old_lines = _text(old or b"")
        if new_lines is None or old_lines is None:
            name(f"binary or large file {path} differs")
            continue
        diff = list(
            difflib.unified_diff(
                old_lines,
                new_lines,
                fromfile="/dev/null" if old_path is None else f"a{path}",
                tofile=f"b{path}",
                lineterm="",
            )
        )
        if not diff:
            continue  # metadata only
        shown += 1
        if len(diff) > max_lines:
            diff = [*diff[:max_lines], f"... ({len(diff) - max_lines} more lines)"]
        out.extend(diff)
    if unnamed:
        named.append(f"... and {unnamed} more changed or deleted paths")
    out.extend(named)
    return "".join(f"{line}\n" for line in out)
