"""The fork helper's own side (see ``_zygote``): run as a script,
``python -I -S _zygote_server.py MARK CALLER_TAG``, with its socket as stdin.

It loads ``pytest_layers.sandbox`` without the package's ``__init__`` (which would bring the
store, the backends and the rest: a larger process to fork is what the helper avoids), greets
with the facts the caller compares with its own, then serves: each request starts one sandbox
(``Sandbox.spawn``, from this small single-threaded process: init forked straight into its
namespaces), whose pidfd goes back to the caller; when a sandbox's init has ended (its PID
namespace is empty), its status goes to the request's done pipe. No pytest here.
"""

from __future__ import annotations

import contextlib
import gc
import marshal
import os
import select
import signal
import socket
import sys
import types
from typing import Any

_MAX_MESSAGE = 1 << 20


def _load_sandbox() -> types.ModuleType:
    package = types.ModuleType("pytest_layers")
    package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules.setdefault("pytest_layers", package)
    from pytest_layers import sandbox

    return sandbox


def main() -> None:
    caller_tag = sys.argv[2]
    caller = int(caller_tag.split("-")[0])
    sandbox = _load_sandbox()
    sandbox._linux.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != caller:
        os._exit(0)  # the caller died before the line above
    # ^C in a terminal reaches the whole process group: the caller decides what ends.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    # Off fd 0 (every init gets its stdio from the request, never ours: /dev/null there), and
    # out of the caller's cwd, which it may want to unmount or remove.
    sock = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    os.chdir("/")
    gc.freeze()  # what is loaded now stays: no collection of ours walks (and dirties) it
    sock.send(marshal.dumps(("hello", sandbox._identity())))
    running: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, done pipe)
    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), *running], [], [])
            for fd in ready:
                if fd == sock.fileno():
                    if not _serve(sandbox, sock, running):
                        return
                else:
                    _reap(fd, running)
    finally:
        # The caller is gone (or told us to end): nothing it started may go on running.
        for pidfd in running:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        for pidfd, (pid, done) in running.items():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            os.close(pidfd)
            os.close(done)


def _serve(sandbox: types.ModuleType, sock: socket.socket, running: dict[int, Any]) -> bool:
    """One request: start its sandbox and answer. False at the end of the socket."""
    raw, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 8)
    if not raw:
        for fd in fds:
            os.close(fd)
        return False
    try:
        if len(fds) != 6:
            raise ValueError(f"{len(fds)} fds with the request, not 6")
        request = marshal.loads(raw)
    except BaseException as exc:
        for fd in fds:
            os.close(fd)
        return _refuse(sock, exc)
    done = fds.pop()
    try:
        pid, kill = sandbox._from_request(request, fds)  # closes fds
    except BaseException as exc:  # every failure is the caller's to raise
        os.close(done)
        return _refuse(sock, exc)
    pidfd = os.pidfd_open(pid)
    running[pidfd] = (pid, done)
    socket.send_fds(sock, [marshal.dumps((0, pid, int(kill)))], [pidfd])
    return True


def _refuse(sock: socket.socket, exc: BaseException) -> bool:
    code = getattr(exc, "errno", None) or 5  # EIO
    sock.send(marshal.dumps((code, getattr(exc, "strerror", None) or str(exc))))
    return True


def _reap(pidfd: int, running: dict[int, Any]) -> None:
    """Init (or its keeper) ended: reap it; its status goes to the done pipe (read only when
    init reported none)."""
    pid, done = running[pidfd]
    got, status = os.waitpid(pid, os.WNOHANG)
    if got == 0:
        return
    del running[pidfd]
    os.close(pidfd)
    with contextlib.suppress(OSError):  # the caller closed its end: nobody asks any more
        os.write(done, str(os.waitstatus_to_exitcode(status)).encode())
    os.close(done)


if __name__ == "__main__":
    main()
