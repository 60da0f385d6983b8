"""The mount table of this process: ``/proc/self/mountinfo`` read in one place.

Every question the package asks about mounts (is this path a mount point, which mounts lie
below a tree, what filesystem holds a directory) is answered from :func:`mountinfo`, which
parses the table once per call: fields split on spaces, the ``\\ooo`` escapes the kernel puts in
paths undone, the optional fields skipped up to the ``-`` separator. No pytest here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pytest_layers import _linux
from pytest_layers.errors import MountError

__all__ = [
    "MountEntry",
    "detach_mounts_under",
    "filesystem_type",
    "mount_at",
    "mountinfo",
    "mounts_under",
]


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``: the mount id, where it is mounted, the filesystem
    type, the source, the per-mount options (``nosuid``, ``nodev``, ``ro``...) and the
    device (``major:minor``) of the filesystem it shows."""

    mnt_id: int
    point: Path
    fstype: str
    source: str
    options: frozenset[str]
    device: str = ""


def mountinfo() -> list[MountEntry]:
    """This process's mounts, in ``/proc/self/mountinfo`` order (parents before children)."""
    found: list[MountEntry] = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = os.fsdecode(line.rstrip(b"\n")).split(" ")
            try:
                sep = fields.index("-", 6)
                found.append(
                    MountEntry(
                        int(fields[0]),
                        Path(_unescape_mountinfo(fields[4])),
                        fields[sep + 1],
                        _unescape_mountinfo(fields[sep + 2]),
                        frozenset(fields[5].split(",")),
                        fields[2],
                    )
                )
            except (ValueError, IndexError):
                continue
    return found


def mount_at(point: Path) -> MountEntry | None:
    """The topmost mount at ``point`` (an absolute path without symlinks), or None."""
    found = None
    for entry in mountinfo():
        if entry.point == point:
            found = entry
    return found


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` in this process's namespace, deepest first."""
    prefix = os.path.realpath(root)
    found: list[Path] = []
    for entry in mountinfo():
        point = os.fspath(entry.point)
        if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
            found.append(entry.point)
    found.sort(key=lambda p: len(p.parts), reverse=True)
    return found


def detach_mounts_under(root: Path) -> list[Path]:
    """Lazily unmount every mount at or below ``root``, deepest first; returns those detached.

    A mount that cannot be detached (another user's, as an ordinary user) is left: the tree
    walkers never cross into it anyway (they compare mount ids).
    """
    detached: list[Path] = []
    try:
        points = mounts_under(root)
    except OSError:
        return detached
    for point in points:
        try:
            _linux.umount2(point, _linux.MNT_DETACH | _linux.UMOUNT_NOFOLLOW)
        except MountError:
            continue
        detached.append(point)
    return detached


def filesystem_type(path: Path) -> str | None:
    """Type of the filesystem holding ``path`` (``ext4``, ``overlay``, ``tmpfs``...), as the
    mount table names it, or None when it cannot be told."""
    try:
        dev = os.stat(path).st_dev
        entries = mountinfo()
    except OSError:
        return None
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    found = None
    for entry in entries:
        if entry.device == wanted:
            found = entry.fstype  # the last one: the mount on top
    return found
