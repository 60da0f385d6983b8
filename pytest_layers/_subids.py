"""Subordinate ids: the uids and gids beyond its own that an ordinary user may map into a user
namespace, so that ``chown`` to other ids works inside.

Alone, an ordinary user maps only its own uid and gid. Two ways to more:

* in the initial user namespace, a range in ``/etc/subuid`` and ``/etc/subgid`` plus the
  setuid helpers ``newuidmap`` and ``newgidmap`` (Debian's ``uidmap`` package), which check the
  range and write the map for us;
* inside a user namespace that already maps such a range (the session's own, made the first
  way), a process holding ``CAP_SETUID`` and ``CAP_SETGID`` there writes the child's map itself.

:func:`for_session` is what a session's user namespace can map (either way);
:func:`available` what a sandbox can pass on, only from inside such a namespace: outside one
(copy, fuse) the session could not remove files given to other ids. Both say why not in
:attr:`Ranges.missing`, fix included; :func:`write` writes a child namespace's maps. The one
home of this rule: ``namespaces`` and ``sandbox`` both use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_layers import _linux

__all__ = [
    "NONE",
    "SUBGID",
    "SUBUID",
    "Ranges",
    "available",
    "for_session",
    "chown_note",
    "describe",
    "lines",
    "write",
]

# Module-level so tests can point them at other files.
SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
_HELPER_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
_FULL = [(0, 0, 4294967295)]


@dataclass(frozen=True)
class Ranges:
    """The extra ids this process can map into a child user namespace, as ``(start, count)``
    in its own namespace's terms. ``helpers`` are the paths of newuidmap and newgidmap when
    they must write the maps (the initial namespace), else empty. ``missing`` says why there
    are none (then ``uids`` and ``gids`` are empty)."""

    uids: tuple[tuple[int, int], ...] = ()
    gids: tuple[tuple[int, int], ...] = ()
    helpers: tuple[str, ...] = ()
    missing: str = ""

    def __bool__(self) -> bool:
        return bool(self.uids and self.gids)

    @property
    def count(self) -> int:
        """How many extra uids (and at most as many gids) a child namespace can get."""
        return min(sum(c for _, c in self.uids), sum(c for _, c in self.gids))


NONE = Ranges(missing="not asked")


def _read_map(path: str) -> list[tuple[int, int, int]]:
    out = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) == 3:
                out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return out


def _file_ranges(path: Path, name: str, uid: int) -> tuple[tuple[int, int], ...]:
    """``NAME:START:COUNT`` (or ``UID:START:COUNT``) lines of ``/etc/subuid``-style files."""
    found = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            fields = line.strip().split(":")
            if len(fields) != 3 or fields[0] not in (name, str(uid)):
                continue
            if fields[1].isdigit() and fields[2].isdigit() and int(fields[2]) > 0:
                found.append((int(fields[1]), int(fields[2])))
    return tuple(found)


def _others(own: int, mapped: list[tuple[int, int, int]]) -> tuple[tuple[int, int], ...]:
    """The ids mapped in our namespace apart from ``own``, as ``(start, count)`` ranges."""
    out = []
    for inside, _outside, count in mapped:
        end = inside + count
        if inside <= own < end:
            if own > inside:
                out.append((inside, own - inside))
            if end > own + 1:
                out.append((own + 1, end - own - 1))
        else:
            out.append((inside, count))
    return tuple(out)


_cache: dict[tuple[object, ...], Ranges] = {}


def available() -> Ranges:
    """The extra ids an ordinary user's sandbox may map (root maps everything anyway and is not
    asked): those its session's user namespace maps. Outside one (the copy or fuse backend),
    none: files a program gave to those ids would be neither removable nor readable by the
    session afterwards (and fuse-overlayfs would not even store the owner). Remembered per
    process and namespace."""
    return _cached("child", _probe_child)


def for_session() -> Ranges:
    """The extra ids a session's own user namespace can map: the user's range in /etc/subuid
    through newuidmap from the initial namespace, or what a parent session's maps, nested."""
    return _cached("session", _probe_session)


def _cached(kind: str, probe: Callable[[], Ranges]) -> Ranges:
    try:
        key = (kind, os.getpid(), os.readlink("/proc/self/ns/user"), SUBUID, SUBGID)
    except OSError:
        return probe()
    if key not in _cache:
        _cache[key] = probe()
    return _cache[key]


def _probe_child() -> Ranges:
    try:
        initial = _read_map("/proc/self/uid_map") == _FULL
    except OSError as exc:
        return Ranges(missing=f"cannot read /proc/self/uid_map: {exc.strerror}")
    if initial:
        return Ranges(
            missing="the session runs outside a user namespace (the copy or fuse backend), "
            "where files owned by other ids could not be cleaned up; use the overlay backend, "
            "or run as root"
        )
    return _probe_session()


def _probe_session() -> Ranges:
    uid, gid = os.getuid(), os.getgid()
    try:
        uid_map, gid_map = _read_map("/proc/self/uid_map"), _read_map("/proc/self/gid_map")
    except OSError as exc:
        return Ranges(missing=f"cannot read /proc/self/uid_map: {exc.strerror}")
    if uid_map != _FULL:
        uids, gids = _others(uid, uid_map), _others(gid, gid_map)
        if not (uids and gids):
            why = _from_files(uid).missing or "its parent namespace had none to give"
            return Ranges(missing=f"the session's user namespace maps none: {why}")
        caps = _linux.capget().effective
        if not (caps >> _linux.CAP_SETUID & 1 and caps >> _linux.CAP_SETGID & 1):
            return Ranges(
                missing="this process lacks CAP_SETUID/CAP_SETGID in its user namespace "
                "(it was started with fewer capabilities than the session's)"
            )
        return Ranges(uids, gids)
    return _from_files(uid)


def _from_files(uid: int) -> Ranges:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    uids = _file_ranges(SUBUID, name, uid)
    gids = _file_ranges(SUBGID, name, uid)
    if not (uids and gids):
        return Ranges(
            missing=f"user {name} has no range in {SUBUID} and {SUBGID}; give it one: "
            f"`usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}`"
        )
    helpers = tuple(shutil.which(t, path=_HELPER_PATH) or "" for t in ("newuidmap", "newgidmap"))
    if not all(helpers):
        return Ranges(
            missing="newuidmap/newgidmap are not installed (Debian: apt-get install uidmap)"
        )
    return Ranges(uids, gids, helpers)


def lines(own: int, extra: Sequence[tuple[int, int]], *, identity: bool) -> list[tuple[int, ...]]:
    """A map's ``(inside, outside, count)`` lines: ``own`` as 0 inside and ``extra`` from 1 on
    (a container's layout), or every id as itself (``identity``)."""
    if identity:
        return [(own, own, 1), *((start, start, count) for start, count in extra)]
    out: list[tuple[int, ...]] = [(0, own, 1)]
    nxt = 1
    for start, count in extra:
        out.append((nxt, start, count))
        nxt += count
    return out


def write(
    pid: int,
    ranges: Ranges,
    uid_lines: Sequence[tuple[int, ...]],
    gid_lines: Sequence[tuple[int, ...]],
) -> None:
    """Write the uid and gid maps of ``pid``'s user namespace (a child of ours). Raises
    ``OSError`` naming what refused."""
    for kind, helper, rows in (("uid", 0, uid_lines), ("gid", 1, gid_lines)):
        if ranges.helpers:
            args = [ranges.helpers[helper], str(pid), *(str(n) for row in rows for n in row)]
            proc = subprocess.run(args, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                raise OSError(errno.EPERM, f"{os.path.basename(args[0])}: {why}")
        else:
            text = "\n".join(" ".join(str(n) for n in row) for row in rows)
            _linux.write_proc(f"/proc/{pid}/{kind}_map", text)


def describe() -> str:
    """One line for ``pytest-layers doctor``: which ids exist inside ``Rootfs.run()``."""
    if os.geteuid() == 0:
        return "ids inside run(): real (root): chown inside works"
    ranges = available()
    if ranges:
        return (
            f"ids inside run(): 0 (you) and 1-{ranges.count} (your subordinate ids, mapped by "
            "newuidmap into the session's user namespace): chown inside works"
        )
    return (
        f"ids inside run(): only 0 (you): chown to another id inside fails with EINVAL: "
        f"{ranges.missing}"
    )


def chown_note() -> str | None:
    """What to add to a failed program's error when chown may be why (an ordinary user
    without subordinate ids), else None."""
    if os.geteuid() == 0:
        return None
    ranges = available()
    if ranges:
        return None
    return (
        "note: only uid 0 exists inside this sandbox (it is you outside): a chown or setuid "
        f"to another id fails with EINVAL: {ranges.missing}"
    )
