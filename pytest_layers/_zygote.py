"""The sandbox's fork helper (a "zygote"): a small Python process, one per calling process, that
starts each sandbox's init by forking *itself* instead of the caller.

Forking the caller is most of what a sandbox costs when the caller is large (a pytest session:
page tables, then copy-on-write faults on both sides for every page either touches while init
sets up). The helper is a fresh ``python -I -S`` that imports only the sandbox's own modules
(``pytest_layers.__init__`` is skipped), so it stays a fraction of that size; it is what
bubblewrap effectively is for other tools.

Life: started (``posix_spawn``, safe from a threaded caller) on the first :func:`get` from the
main thread, without waiting for it; used from the first call that finds its greeting, whose
facts (ids, namespaces, subordinate ids) must equal the caller's, so it runs sandboxes exactly as
the caller would. It is in the caller's user and mount namespaces (inherited: it is the
caller's child). It dies with the caller: ``PR_SET_PDEATHSIG`` (the main thread started it, and
that thread is the last to end) and the end of its socket, on which it kills the sandboxes it
still runs. ``atexit`` closes the socket and reaps it.

Protocol over a ``SOCK_SEQPACKET`` pair (one message each way per sandbox): the request is plain
data (``marshal``) plus, by ``SCM_RIGHTS``, the program's stdin/stdout/stderr and the write ends
of three pipes of the caller's: init's *err* and *status* pipes (init writes to them as it does
for the caller's own fork: why it could not start, the program's status) and a *done* pipe,
which the helper closes once it reaped init (so the PID namespace is empty), after writing how
init ended. The answer, as soon as init is forked and mapped, is ``(0, pid, kill signal)`` with
a pidfd of init (or of the keeper, where the helper itself falls back to one) for the caller's
signals, or ``(errno, message)``. The request carries the caller's umask and resource limits,
which init sets (the helper's are its own), and absolute bind sources (the helper's cwd is
``/``; its socket is not its fd 0, which is ``/dev/null``). Init keeps none of the helper's fds
(see ``Sandbox._start``). A request that is not plain data or too large for one message is the
caller's to run; an answer cut short (^C, or its fds cut off: ``MSG_CTRUNC``) ends the helper,
and with it what it started for that request.

Identifiable: its command line is ``python -I -S <this dir>/_zygote_server.py <MARK> <caller
tag>`` (the caller's ``_proctag`` tag) and its parent is the caller (a sandbox's init, a fork
of the helper, has the same command line and the helper as its parent), so checks for leftover
processes can leave out exactly it (:func:`is_helper`, :func:`running`). A helper that ended
stays ended for its caller (which then runs sandboxes itself) until :func:`stop`. No pytest
here; the sandbox uses this module, never the reverse (the helper's own side is
``_zygote_server``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import marshal
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MARK", "SERVER", "Helper", "HelperGone", "get", "is_helper", "running", "stop"]

#: The word on the helper's command line that says what it is.
MARK = "pytest-layers-run-helper"
#: The helper's script (run by path: ``-I`` puts neither it nor the caller's path on sys.path).
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote_server.py")
_MAX_MESSAGE = 1 << 20
_START_TIMEOUT = 30.0  # seconds until a helper that never greets is given up


class HelperGone(OSError):
    """The helper ended (or was never usable): the caller runs the sandbox itself."""


class Helper:
    """The caller's side of one helper process."""

    def __init__(self, pid: int, sock: socket.socket, identity: Callable[[], object]) -> None:
        self.pid = pid
        self.owner = os.getpid()
        self._sock = sock
        self._identity = identity
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.state = "starting"  # then "ready" or "broken"
        self.why = ""  # why it is broken
        #: The facts it greeted with (equal to the caller's then).
        self.identity: object = None
        #: How many sandboxes it started (tests check that runs went through it).
        self.served = 0

    def ready(self, wait: float = 0.0) -> bool:
        """Whether it greeted with the caller's identity (reads the greeting when it came;
        ``wait``: seconds to wait for it)."""
        if self.state == "starting":
            with self._lock:
                if self.state == "starting":
                    self._greeting(wait)
        return self.state == "ready"

    def _greeting(self, wait: float) -> None:
        if not select.select([self._sock], [], [], wait)[0]:
            if time.monotonic() - self._started > _START_TIMEOUT:
                self._broken("it did not answer in time")
            return
        try:
            raw = self._sock.recv(_MAX_MESSAGE)
            hello = marshal.loads(raw) if raw else None
        except (OSError, ValueError, EOFError) as exc:
            self._broken(f"its greeting was unreadable: {exc}")
            return
        if not (isinstance(hello, tuple) and len(hello) == 2 and hello[0] == "hello"):
            self._broken("it ended before it greeted")
        elif hello[1] != self._identity():
            self._broken(f"it sees {hello[1]!r}, not the caller's {self._identity()!r}")
        else:
            self.identity = hello[1]
            self.state = "ready"

    def request(self, data: Any, fds: list[int]) -> tuple[Any, list[int]]:
        """Send one request (plain data and fds), return the answer and its fds. Raises
        :class:`HelperGone` when the helper cannot take it (then nothing was started)."""
        try:
            payload = marshal.dumps(data)
        except ValueError as exc:  # not plain data (a Path in argv...): the caller's own way
            raise HelperGone(f"the request is not plain data: {exc}") from None
        with self._lock:
            if self.state != "ready":
                raise HelperGone(self.why or "not ready")
            try:
                socket.send_fds(self._sock, [payload], fds)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:  # nothing sent: the helper stays usable
                    raise HelperGone(f"the request is too large for it: {exc}") from None
                self._broken(f"cannot talk to it: {exc}")
                raise HelperGone(self.why) from None
            try:
                raw, got, flags, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, 4)
            except OSError as exc:
                self._broken(f"cannot talk to it: {exc}")
                raise HelperGone(self.why) from None
            except BaseException:
                # ^C between the request and its answer: the next request would read this
                # one's answer. Ending the helper ends what it may have started for it.
                self._broken("interrupted while it answered")
                raise
            if not raw:
                self._broken("it ended")
                raise HelperGone(self.why)
            if flags & socket.MSG_CTRUNC:
                # The answer's fds were cut off (this process is out of fds, or a security
                # module refused them): what it started cannot be signalled from here, so
                # ending the helper ends it.
                for fd in got:
                    os.close(fd)
                self._broken("its answer came without its fds (MSG_CTRUNC: too many open fds?)")
                raise HelperGone(self.why)
            self.served += 1
            return marshal.loads(raw), got

    def _broken(self, why: str) -> None:
        self.state, self.why = "broken", why
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """End the helper: its socket closes (it kills what it still runs and exits), then it
        is reaped (``SIGKILL`` after ``timeout`` seconds)."""
        if self.state != "broken":
            self.state, self.why = "broken", self.why or "closed"
        with contextlib.suppress(OSError):
            self._sock.close()
        if self.owner != os.getpid():
            return  # a forked copy: the helper is its parent's
        with contextlib.suppress(ChildProcessError, OSError):
            fd = os.pidfd_open(self.pid)
            try:
                if not select.select([fd], [], [], timeout)[0]:
                    os.kill(self.pid, 9)
            finally:
                os.close(fd)
            os.waitpid(self.pid, 0)


_helper: Helper | None = None
_start_lock = threading.Lock()


def get(identity: Callable[[], object], *, wait: float = 0.0) -> Helper | None:
    """This process's helper when it is ready, else None (the caller runs the sandbox
    itself). Starts one when there is none and this is the main thread; ``identity`` gives
    the facts the helper's own (``_zygote_server`` calls the same function) must equal.
    ``wait``: seconds to wait for a helper that is starting."""
    global _helper
    helper = _helper
    if helper is not None and helper.owner != os.getpid():
        helper = _helper = None  # inherited through a fork: the parent's
    if helper is None:
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG follows the thread that started it: a thread that ends would
            # take the helper (and every sandbox it runs) with it.
            return None
        with _start_lock:
            if _helper is None:
                _helper = _start(identity)
            helper = _helper
    if helper is None or not helper.ready(wait):
        return None
    return helper


def _start(identity: Callable[[], object]) -> Helper | None:
    from pytest_layers import _proctag  # psutil: not in the helper, which imports this module

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    args = [sys.executable, "-I", "-S", SERVER, MARK, _proctag.tag()]
    actions = [
        (os.POSIX_SPAWN_DUP2, theirs.fileno(), 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        if not sys.executable:
            raise OSError("no Python executable to start it with (sys.executable is empty)")
        pid = os.posix_spawn(sys.executable, args, {}, file_actions=actions)
    except OSError:
        ours.close()
        return None
    finally:
        theirs.close()
    return Helper(pid, ours, identity)


def running() -> int | None:
    """The pid of this process's helper while it runs, else None."""
    helper = _helper
    if helper is None or helper.owner != os.getpid() or helper.state == "broken":
        return None
    return helper.pid


def is_helper(pid: int, parent: int | None = None) -> bool:
    """Whether ``pid`` is a helper started by ``parent`` (default: this process), judged by
    its parent and its command line: the server script, :data:`MARK` and the parent's tag. (A
    sandbox's init, a fork of the helper, has the same command line but the helper as its
    parent.)"""
    from pytest_layers import _proctag

    parent = os.getpid() if parent is None else parent
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        tag = _proctag.tag(parent)
    except Exception:
        return False
    return ppid == parent and argv[3:6] == [os.fsencode(SERVER), MARK.encode(), tag.encode()]


def stop() -> None:
    """End this process's helper (the next :func:`get` starts a new one)."""
    global _helper
    helper, _helper = _helper, None
    if helper is not None:
        helper.close()


def _after_fork() -> None:
    # A forked child must not hold the helper's socket: the helper would outlive the caller's
    # own end of it.
    helper = _helper
    if helper is not None:
        with contextlib.suppress(OSError):
            helper._sock.close()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(stop)
