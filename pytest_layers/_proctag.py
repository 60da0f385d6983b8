"""Names that say which process made them: ``<pid>-<start>``, where ``<start>`` is when the
process started.

Session scratch directories, the store's staging entries and its leases all carry such a tag,
so that a later process can tell whether the owner still runs, even after its pid was reused (a
recycled pid belongs to a process that started later). The rule lives here, once.

Two units, each kept where earlier releases wrote it, since a store and its scratch may be
shared by sessions of different releases, and a release that misreads a live owner's tag as
dead would sweep what that owner is still writing: session scratch directories count
hundredths of a second (:func:`tag`), the store's staging entries and leases whole seconds
(:func:`store_tag`). :func:`alive` reads both (they differ by two orders of magnitude).

The start time is what ``psutil`` derives from ``/proc/PID/stat``: start ticks / CLK_TCK plus
the boot time, which each process reads for itself in whole seconds; after the clock was
stepped two processes may disagree by up to a second, so the comparison allows that. No pytest
here.
"""

from __future__ import annotations

import os
import re

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv

__all__ = ["TAG_RE", "alive", "parse", "store_tag", "tag"]

#: A tag at the start of a name: ``<pid>-<start>``, then anything.
TAG_RE = re.compile(r"(\d+)-(\d+)")

#: Starts below this are whole seconds since the epoch (until the year 2286); above, hundredths.
_HUNDREDTHS_FROM = 10**10

_MINE: tuple[int, float] | None = None


def _created(pid: int | None) -> float:
    global _MINE
    if pid is None:
        pid = os.getpid()
        if _MINE is None or _MINE[0] != pid:  # recomputed after a fork
            _MINE = (pid, psutil.Process(pid).create_time())
        return _MINE[1]
    created: float = psutil.Process(pid).create_time()
    return created


def tag(pid: int | None = None) -> str:
    """``<pid>-<start in hundredths>`` of ``pid`` (default: this process): the unit of session
    scratch directories. Raises ``psutil.NoSuchProcess`` for a pid that does not exist."""
    pid_ = os.getpid() if pid is None else pid
    return f"{pid_}-{round(_created(pid) * 100)}"


def store_tag(pid: int | None = None) -> str:
    """``<pid>-<start in whole seconds>``: the unit of the store's staging entries and
    leases."""
    pid_ = os.getpid() if pid is None else pid
    return f"{pid_}-{int(_created(pid))}"


def parse(name: str) -> tuple[int, int] | None:
    """``(pid, start)`` of the tag that begins ``name`` (followed by its end or by ``-``), or
    None when it has none."""
    m = TAG_RE.match(name)
    if m is None or name[m.end() : m.end() + 1] not in ("", "-"):
        return None
    return int(m.group(1)), int(m.group(2))


def alive(pid: int, start: int | None) -> bool:
    """Whether the process that made a tag (of either unit) still runs. ``start`` None (a bare
    pid) counts as alive while any process has that pid. When the start cannot be read (access
    refused, a zombie), the answer is yes: what may be someone's is never taken."""
    try:
        created: float = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    if start is None:
        return True
    if start >= _HUNDREDTHS_FROM:
        return abs(round(created * 100) - start) <= 101
    return abs(int(created) - start) <= 1


def owner_alive(name: str) -> bool:
    """Whether the process whose tag begins the entry ``name`` (a store's tmp entry or lease,
    ``<pid>-<start>-...``) still runs."""
    parsed = parse(name)
    return parsed is not None and alive(*parsed)
