"""Named points where the fault-injection tests stop a process (to SIGKILL it there).

Production code calls :func:`reached` at a few moments that matter for crash safety (a layer
complete but not yet renamed into place, an export half written). Nothing happens unless a
test installed :data:`hook` in that very process, from Python (tests/faults_util.py does it in
the child processes it starts): no environment variable or file can turn it on, so a user's
environment cannot make a session stop.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["hook", "reached"]

#: Called with (point name, detail) at every point reached; None outside the fault tests.
hook: Callable[[str, str], None] | None = None


def reached(point: str, detail: str) -> None:
    """Hand ``point`` to the installed hook, if any (``detail``: the path being written)."""
    if hook is not None:
        hook(point, detail)
