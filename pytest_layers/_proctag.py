"""Names that say which process made them: ``<pid>-<start>``, where ``<start>`` is the process's
start time in hundredths of a second since the epoch.

Session scratch directories, the store's staging entries and its leases all carry such a tag,
so that a later process can tell whether the owner still runs, even after its pid was reused (a
recycled pid belongs to a process that started later). One scheme for all of them: the start
time that ``psutil`` reads from ``/proc/PID/stat`` (boot time + start ticks / CLK_TCK) is exact
to the hundredth and stable across calls. Tags written by releases that counted whole seconds
are still understood. No pytest here.
"""

from __future__ import annotations

import os
import re

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv

__all__ = ["TAG_RE", "alive", "parse", "tag"]

#: A tag at the start of a name: ``<pid>-<start>``, then anything.
TAG_RE = re.compile(r"(\d+)-(\d+)")

_MINE: tuple[int, int] | None = None


def _start(pid: int) -> int:
    created: float = psutil.Process(pid).create_time()
    return round(created * 100)


def tag(pid: int | None = None) -> str:
    """``<pid>-<start>`` of ``pid`` (default: this process; cached, and recomputed after a
    fork). Raises ``psutil.NoSuchProcess`` for a pid that does not exist."""
    global _MINE
    if pid is None:
        pid = os.getpid()
        if _MINE is None or _MINE[0] != pid:
            _MINE = (pid, _start(pid))
        return f"{pid}-{_MINE[1]}"
    return f"{pid}-{_start(pid)}"


def parse(name: str) -> tuple[int, int] | None:
    """``(pid, start)`` of the tag that begins ``name`` (followed by its end or by ``-``), or
    None when it has none."""
    m = TAG_RE.match(name)
    if m is None or name[m.end() : m.end() + 1] not in ("", "-"):
        return None
    return int(m.group(1)), int(m.group(2))


def alive(pid: int, start: int | None) -> bool:
    """Whether the process that made a tag still runs. ``start`` None (a bare pid) counts as
    alive while any process has that pid. When the start cannot be read (access refused, a
    zombie), the answer is yes: what may be someone's is never taken."""
    try:
        now = _start(pid)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    if start is None:
        return True
    # Hundredths; or whole seconds, as tags of earlier releases count.
    return abs(now - start) <= 1 or abs(now // 100 - start) <= 1
