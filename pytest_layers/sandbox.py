"""Run a program with a directory as its root, confined as a container runtime would.

:class:`Sandbox` is the one home of "run code from an image": ``pytest-layers shell`` uses it,
and so can ``Rootfs.run()``. The program gets, in this order (docs/reference/cli.md says the
same for users, under ``shell``):

* a new **user namespace** (as root too): uid 0 inside is the caller outside (an ordinary user)
  or real root with every id mapped to itself (root). Capabilities then only reach what the
  namespace owns: no device nodes, no module loading, no raw I/O, even for "root";
* new **mount, PID, UTS, IPC, cgroup and network** namespaces (network ``"none"``: only ``lo``,
  up; ``"host"`` keeps the host's);
* the view as ``/`` by ``pivot_root`` (never ``chroot``), the old root detached, so no chain of
  ``chroot``/``chdir("..")`` reaches the host; every mount of the view ``nosuid,nodev``;
* a fresh ``/proc`` of its own PID namespace with the host-wide knobs read-only or masked as
  Docker does (``/proc/sys``, ``/proc/sysrq-trigger``, ``/proc/kcore``...), no ``/sys``;
* a ``/dev`` tmpfs holding only null, zero, full, random, urandom and tty (bound from the
  host), a private ``pts`` and ``shm``;
* ``PR_SET_NO_NEW_PRIVS`` and only :data:`KEPT_CAPS` in its bounding set;
* an init (and keeper) holding no fd but the program's stdio and its own pipes, and not
  dumpable: the program cannot ptrace it or take its fds (``pidfd_getfd``).

Process tree, compiled init (``_init/init.c``, chosen by :mod:`pytest_layers._cinit` where a C
compiler is found): the caller ``posix_spawn``s a starter (vfork semantics: nothing of the
caller is copied), which ``clone3``s init into the new namespaces with ``CLONE_PARENT`` (so init
is the caller's child), reports its pid and exits; the caller writes the id maps, and init
does what the Python init below does. The rest of this text is about the Python init.

Process tree, Python init: a single-threaded caller starts the *init* (PID 1 of the new PID
namespace) straight into its new namespaces with ``clone3`` (a fork with the ``CLONE_NEW*``
flags) and writes its id maps. Init sets up the mounts, pivots, drops its own privileges, starts the
program (``posix_spawn``) and reaps; when the program exits, init reports its status and exits,
and the kernel kills whatever the program left behind (a PID namespace dies with its init; the
caller's ``waitpid`` returns only once it is empty). Init gets ``SIGKILL`` when the caller
dies, so nothing outlives it.

Forking a large Python process is most of what a run costs (page tables, then copy-on-write
faults on both sides), so there is one fork, not two; and once this process's fork helper
(:mod:`pytest_layers._zygote`, a small ``python -I -S`` of its own) is ready, that fork is the
helper's, whatever this process's size: the helper runs the same :meth:`Sandbox._start` and
passes init's pidfd back, and init reports to our pipes directly. Without the helper, a caller
with other threads, a kernel without ``clone3`` or a filter that refuses it (Docker's default
seccomp profile answers ``ENOSYS``) takes the older way: ``os.fork()`` of a *keeper* that
unshares the namespaces and forks init (glibc's fork handlers, which only ``fork()`` runs, keep
malloc's locks usable in a child of a threaded process; ``unshare(CLONE_NEWUSER)`` wants the
single-threaded keeper). A caller with threads must not hold locks the child needs (the child
only makes syscalls and small Python objects).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum conversions per call
import contextlib
import errno
import fcntl
import functools
import gc
import os
import resource
import select
import signal
import socket
import stat
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pytest_layers import _chroot, _cinit, _faultpoints, _linux, _subids, _zygote
from pytest_layers.errors import SandboxError

__all__ = ["KEPT_CAPS", "DEFAULT_PATH", "Bind", "Sandbox", "SandboxProcess"]

#: Docker's default capability set minus CAP_NET_RAW (raw sockets give nothing on a loopback-only
#: network and were the way in for CVE-2020-14386). CAP_SYS_CHROOT stays: after ``pivot_root``
#: with the old root detached there is nothing above ``/`` to climb to, and installers chroot.
KEPT_CAPS = (
    0,  # CAP_CHOWN
    1,  # CAP_DAC_OVERRIDE
    3,  # CAP_FOWNER
    4,  # CAP_FSETID
    5,  # CAP_KILL
    6,  # CAP_SETGID
    7,  # CAP_SETUID
    8,  # CAP_SETPCAP
    10,  # CAP_NET_BIND_SERVICE
    18,  # CAP_SYS_CHROOT
    27,  # CAP_MKNOD (device nodes stay refused: they need the initial user namespace)
    29,  # CAP_AUDIT_WRITE
    31,  # CAP_SETFCAP
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Docker's lists (moby oci/defaults.go): host-wide knobs stay readable but not writable, and
# files that leak host state are covered.
_PROC_READONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
_PROC_MASKED_FILES = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug")
_PROC_MASKED_DIRS = ("acpi", "asound", "scsi")
_NAMESPACES = (
    _linux.CLONE_NEWUSER
    | _linux.CLONE_NEWNS
    | _linux.CLONE_NEWPID
    | _linux.CLONE_NEWUTS
    | _linux.CLONE_NEWIPC
    | _linux.CLONE_NEWCGROUP
)
# As plain ints for ``_signal.signal``: ``signal.signal`` converts to and from its enums on every
# call, a good part of init's own work (and of the pages it copies from its parent).
_IGNORED_BY_INIT = (int(signal.SIGINT), int(signal.SIGQUIT))
_FORWARDED_BY_INIT = tuple(
    int(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
)
_SIG_IGN = int(signal.SIG_IGN)
#: The resource limits the fork helper gives init as the caller has them (by number: name).
_RLIMITS = {
    getattr(resource, name): name
    for name in (
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    )
    if hasattr(resource, name)
}
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


@dataclass(frozen=True)
class Bind:
    """A host path shown inside at ``target`` (read-only unless ``readonly=False``)."""

    source: Path
    target: str
    readonly: bool = True


@dataclass(frozen=True)
class Sandbox:
    """Where and how programs run: ``root`` (a directory, usually a mounted view) becomes ``/``.

    ``network`` is ``"none"`` (own namespace, loopback only) or ``"host"``. ``binds`` are mounted
    after everything else, targets resolved inside ``root``. Missing ``/proc``, ``/dev`` and bind
    targets are created in ``root``.
    """

    root: Path
    network: str = "none"
    hostname: str = "pytest-layers"
    binds: Sequence[Bind] = ()
    #: Start init from this process's fork helper (``_zygote``) once it is ready, instead of a
    #: fork of this process; False for a process that runs one sandbox (the CLI).
    helper: bool = True

    def __post_init__(self) -> None:
        if self.network not in ("none", "host"):
            raise ValueError(f"network={self.network!r}: use 'none' or 'host'")

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        user: tuple[int, int] | None = None,
        close: Sequence[int] = (),
    ) -> SandboxProcess:
        """Start ``argv`` inside; returns once it is exec'd. ``env`` replaces the environment
        (default: ``PATH`` and ``HOME=/root`` only); ``stdin``... are fds (default: ours);
        ``user`` is the ``(uid, gid)`` inside to run as (default: 0, root inside); ``close``
        are fds of ours the program must not get even as its stdio (init and the keeper keep
        only the program's stdio and their own pipes: every other fd is closed there).

        Raises :class:`SandboxError` (one line) when the sandbox cannot be set up or the
        program cannot be started (``errno.ENOENT``: not in the image).
        """
        if not argv:
            raise ValueError("argv is empty: name the program to run")
        if user is not None:
            _check_user(user)
        environ = dict(env) if env is not None else {"PATH": DEFAULT_PATH, "HOME": "/root"}
        compiled = _compiled_init()
        for attempt in (1, 2):
            if compiled is None:
                break
            try:
                started = _spawn_compiled(
                    compiled, self, list(argv), environ, cwd, (stdin, stdout, stderr), user, close
                )
            except _StarterFailed as exc:
                if attempt == 2 or _cinit.mode() != "auto":
                    raise SandboxError(
                        exc.errno or errno.ENOEXEC,
                        f"cannot start the compiled init {compiled}: {exc.strerror}; it was "
                        "removed or damaged since this process built it (a cache cleaner?): "
                        "run again to rebuild it, or set PYTEST_LAYERS_INIT=auto or python",
                    ) from None
                # auto: build it again (or fall back to the Python init, with the reason).
                _cinit.forget()
                compiled = _compiled_init()
                continue
            if started is not None:
                return started
            break
        if self.helper:
            helper = _zygote.get(_identity)
            if helper is not None:
                with contextlib.suppress(_zygote.HelperGone):
                    return _spawn_by(
                        helper, self, list(argv), environ, cwd, (stdin, stdout, stderr), user
                    )
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            pid, kill = self._start(
                list(argv),
                environ,
                cwd,
                (stdin, stdout, stderr),
                user,
                [*close, err_r, status_r],
                err_w,
                status_w,
            )
        except BaseException:
            os.close(err_r)
            os.close(status_r)
            raise
        return _confirm(SandboxProcess(pid, status_r, list(argv), kill_signal=kill), err_r)

    def _start(
        self,
        argv: list[str],
        environ: dict[str, str],
        cwd: str,
        stdio: tuple[int | None, int | None, int | None],
        user: tuple[int, int] | None,
        close: Sequence[int],
        err_w: int,
        status_w: int,
        inherit: tuple[int, Sequence[tuple[int, int, int]]] | None = None,
    ) -> tuple[int, int]:
        """Fork init (or a keeper) and map its ids; ``(pid, signal that ends it)``. Init
        reports a failure to start on ``err_w`` (closed once the program runs) and the
        program's status on ``status_w``; both are closed here, whatever happens. ``inherit``:
        the umask and resource limits init sets (the fork helper's, for its caller)."""
        _dropped_caps()  # read here, once: the child then finds it cached
        flags = _NAMESPACES | (_linux.CLONE_NEWNET if self.network == "none" else 0)
        direct = _single_threaded()
        uid, gid, caller = os.geteuid(), os.getegid(), os.getpid()
        fds = [err_w, status_w]
        maps: tuple[int, int] | None = None
        extra = _subids.available() if uid != 0 else _subids.NONE
        try:
            if uid == 0 or direct or extra:
                ready_r, ready_w = os.pipe()
                fds += [ready_r, ready_w]
                go_r, go_w = os.pipe()
                fds += [go_r, go_w]
                maps = (ready_w, go_r)
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        plan = _Plan(self, argv, environ, cwd, stdio, uid, gid, caller, user, maps)
        plan.subids = extra
        if inherit is not None:
            plan.umask, plan.rlimits = inherit
        alive = -1
        try:
            pid = -1
            if direct:
                # No pidfd_open or no clone3 (an older seccomp profile refuses them): the
                # keeper's way, which needs neither.
                with contextlib.suppress(OSError):
                    alive = os.pidfd_open(caller)
                    fds.append(alive)
                    pid = _linux.fork_into_namespaces(flags)
            if pid < 0:
                direct = False
                if alive >= 0:
                    fds.remove(alive)
                    os.close(alive)
                    alive = -1
                if uid != 0 and maps is not None and not extra:
                    # The keeper maps an ordinary user itself: no one would say "ready".
                    for fd in (ready_r, ready_w, go_r, go_w):
                        fds.remove(fd)
                        os.close(fd)
                    maps = plan.maps = None
                pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        if pid == 0:  # pragma: no cover - runs in the child (measured by its effects)
            # Every fd but the few it needs goes: the program could take any fd of init's
            # (pidfd_getfd), and a copy of another sandbox's pipe here would keep that one's
            # end from being seen. What stays: the program's stdio, the err and status pipes,
            # the maps' pipes (a keeper's ready and go, init's go) and the caller's pidfd.
            keep = {fd if fd is not None else target for target, fd in enumerate(stdio)}
            keep -= set(close)
            keep |= {err_w, status_w}
            if maps is not None:
                keep |= {go_r} if direct else {ready_w, go_r}
            if direct:
                keep.add(alive)
            _linux.close_fds_except(keep)
            if direct:
                _direct_init(plan, err_w, status_w, go_r, alive)
            _child(plan, err_w, status_w)
        if alive >= 0:
            os.close(alive)
        os.close(err_w)
        os.close(status_w)
        # Init, started straight into its namespaces, ends on SIGKILL; a keeper on SIGTERM
        # (it kills init, then waits until the namespace is empty).
        kill = signal.SIGKILL if direct else signal.SIGTERM
        if maps is not None:
            os.close(ready_w)
            os.close(go_r)
        try:
            if direct:
                # The child is already in its user namespace: the maps go in now, with no
                # round trip, and "go" (its parent is alive and mapped it) follows.
                assert maps is not None
                os.close(ready_r)
                _write_go(plan, pid, go_w)
            elif maps is not None:
                _write_maps(plan, pid, ready_r, go_w)
        except BaseException:  # ^C while it starts: nothing may keep running unsupervised
            os.kill(pid, kill)
            os.waitpid(pid, 0)
            raise
        return pid, kill

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> int:
        """:meth:`spawn`, then wait: the program's exit status, ``-N`` when signal N ended it."""
        proc = self.spawn(argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr)
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


class SandboxProcess:
    """A running sandbox: ``pid`` is its init's, or its keeper's (killing either ends every
    process inside)."""

    def __init__(
        self,
        pid: int,
        status_fd: int,
        args: Sequence[str] = (),
        *,
        kill_signal: int = signal.SIGTERM,
    ) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self._status_fd = status_fd
        self._kill_signal = kill_signal

    def poll(self) -> int | None:
        """The exit status when everything inside has ended, else None (no waiting)."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return None
            self._finish(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the program; its exit status, or ``-N`` when signal N ended it. With
        ``timeout`` (seconds), ``subprocess.TimeoutExpired`` when it is still running then
        (it keeps running: :meth:`kill` ends it)."""
        if self.returncode is not None:
            return self.returncode
        if timeout is not None:
            # A pidfd becomes readable when init (or the keeper) exits: a wait with a deadline
            # and no polling loop.
            fd = os.pidfd_open(self.pid)
            try:
                ready, _, _ = select.select([fd], [], [], max(timeout, 0))
            finally:
                os.close(fd)
            if not ready:
                import subprocess

                raise subprocess.TimeoutExpired(self.args, timeout)
        _, status = os.waitpid(self.pid, 0)
        self._finish(status)
        return self.returncode  # type: ignore[return-value]  # set by _finish

    def _finish(self, status: int) -> None:
        reported = _read_all(self._status_fd).decode()
        os.close(self._status_fd)
        ended = os.waitstatus_to_exitcode(status)
        # Without a report from init (init or the keeper was killed), how our child ended.
        self.returncode = int(reported) if reported else ended

    def kill(self) -> None:
        """End the program and everything it started with ``SIGKILL``; :meth:`wait` then
        returns once no process of the sandbox is left."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self._kill_signal)


class _HelperProcess(SandboxProcess):
    """A sandbox the fork helper started: init is the helper's child, not ours. The helper
    closes the done pipe once it reaped init (so its PID namespace is empty), after writing
    how init ended; init's own report (the program's status) comes straight from init, as
    usual. Signals go to init's pidfd, which the helper passed on."""

    def __init__(
        self,
        pid: int,
        status_fd: int,
        done_fd: int,
        pidfd: int,
        args: Sequence[str],
        *,
        kill_signal: int,
    ) -> None:
        super().__init__(pid, status_fd, args, kill_signal=kill_signal)
        self._done_fd = done_fd
        self._pidfd = pidfd

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._done_fd], [], [], 0)[0]:
            self._finish(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            wait = None if timeout is None else max(timeout, 0)
            if not select.select([self._done_fd], [], [], wait)[0]:
                import subprocess

                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
            self._finish(0)
        return self.returncode  # type: ignore[return-value]  # set by _finish

    def _finish(self, status: int) -> None:
        ended = _read_all(self._done_fd)  # empty if the helper died: it killed init as it went
        reported = _read_all(self._status_fd)
        for fd in (self._status_fd, self._done_fd, self._pidfd):
            os.close(fd)
        self.returncode = int(reported or ended or -signal.SIGKILL)

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, self._kill_signal)


#: The largest uid or gid a program may run as: 2**32-1 is (uid_t)-1, which setresuid reads
#: as "leave unchanged" (the program would stay uid 0).
_MAX_ID = 2**32 - 2


def _check_user(user: tuple[int, int]) -> None:
    """Refuse a ``user`` that is not two ids setresuid/setresgid would really switch to."""
    try:
        uid, gid = user
    except (TypeError, ValueError):
        raise SandboxError(errno.EINVAL, f"user={user!r}: give (uid, gid)") from None
    for name, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_ID:
            raise SandboxError(
                errno.EINVAL,
                f"user={user!r}: {name} {value!r} is not an id from 0 to {_MAX_ID} "
                "(4294967295 means 'unchanged' to the kernel)",
            )


def _identity() -> tuple[object, ...]:
    """What decides how this process runs a sandbox: ids, namespaces, the subordinate ids it
    can map. The fork helper runs sandboxes for a caller whose identity equals its own."""
    links = tuple(os.readlink(f"/proc/self/ns/{ns}") for ns in ("user", "mnt", "pid", "net"))
    extra = _subids.available() if os.geteuid() != 0 else _subids.NONE
    return (os.geteuid(), os.getegid(), links, extra.uids, extra.gids, extra.helpers)


def _spawn_by(
    helper: _zygote.Helper,
    box: Sandbox,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    stdio: tuple[int | None, int | None, int | None],
    user: tuple[int, int] | None,
) -> SandboxProcess:
    """Have the fork helper start the sandbox (plain data and fds over its socket); raises
    :class:`_zygote.HelperGone` when it cannot (nothing started: run it ourselves)."""
    if _identity() != helper.identity:
        raise _zygote.HelperGone("the caller changed namespaces or ids")
    opened = []
    fds = []
    for target, fd in enumerate(stdio):
        if fd is None:
            fd = target  # ours, as a program we start inherits them
            try:
                os.fstat(fd)
            except OSError:  # closed here: the helper's own would be its socket or /dev/null
                fd = os.open(os.devnull, os.O_RDWR)
                opened.append(fd)
        fds.append(fd)
    request = (
        os.fsencode(os.path.abspath(box.root)),
        box.network,
        box.hostname,
        # Relative sources are the caller's: the helper's cwd is "/".
        [(os.fsencode(os.path.abspath(b.source)), b.target, b.readonly) for b in box.binds],
        argv,
        env,
        cwd,
        user,
        _umask(),
        [(limit, *resource.getrlimit(limit)) for limit in _RLIMITS],
    )
    pipes = [os.pipe() for _ in range(3)]  # err, status, done
    try:
        answer, got = helper.request(request, [*fds, *(w for _, w in pipes)])
    except BaseException:
        for r, _ in pipes:
            os.close(r)
        raise
    finally:
        for _, w in pipes:
            os.close(w)
        for fd in opened:
            os.close(fd)
    (err_r, _), (status_r, _), (done_r, _) = pipes
    if answer[0] != 0:
        for fd in (err_r, status_r, done_r, *got):
            os.close(fd)
        raise SandboxError(answer[0], answer[1])
    proc = _HelperProcess(answer[1], status_r, done_r, got[0], argv, kill_signal=answer[2])
    return _confirm(proc, err_r)


def _compiled_init() -> str | None:
    """The compiled init's path when this call may use it: ``PYTEST_LAYERS_INIT`` is not
    ``python``, it built, and the caller is Python's main thread (init's death signal follows
    the thread that started it, and the main thread lives as long as the process). Raises
    :class:`SandboxError` when ``PYTEST_LAYERS_INIT=compiled`` and it cannot be built."""
    try:
        wanted = _cinit.mode()
    except ValueError as exc:
        raise SandboxError(errno.EINVAL, str(exc)) from None
    if wanted == "python" or threading.current_thread() is not threading.main_thread():
        return None
    choice = _cinit.choose()
    if choice.binary is None and wanted == "compiled":
        raise SandboxError(errno.ENOEXEC, f"PYTEST_LAYERS_INIT=compiled: {choice.reason}")
    return choice.binary


#: The fds the compiled init's starter gets, in this order from 3 (see ``_init/init.c``).
_STARTER_FDS = 6


def _spawn_compiled(
    binary: str,
    box: Sandbox,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    stdio: tuple[int | None, int | None, int | None],
    user: tuple[int, int] | None,
    close: Sequence[int],
) -> SandboxProcess | None:
    """Start the sandbox with the compiled init: ``posix_spawn`` (nothing of this process is
    copied) of a starter that ``clone3``s init into the namespaces as our child and exits.
    None when clone3 is refused here and the Python init may take over (``auto``)."""
    uid, gid = os.geteuid(), os.getegid()
    plan = _Plan(box, argv, env, cwd, stdio, uid, gid, os.getpid(), user)
    plan.subids = _subids.available() if uid != 0 else _subids.NONE
    binds: list[str | bytes] = []
    for b in box.binds:
        mode = ("ro" if b.readonly else "rw") + ("d" if os.path.isdir(b.source) else "f")
        binds += [os.fsencode(os.path.abspath(b.source)), b.target, mode]
    args: list[str | bytes] = [
        binary,
        _cinit.VERSION,
        os.fsencode(os.path.abspath(box.root)),
        box.hostname,
        box.network,
        cwd,
        "1" if uid == 0 else "0",
        f"{user[0]}:{user[1]}" if user is not None else "",
        _user_hint(plan) if user is not None else "",
        str(len(box.binds)),
        *binds,
        env.get("PATH", DEFAULT_PATH),
        "--",
        *argv,
    ]
    # Every fd opened here, closed before returning but err_r and status_r once init runs.
    ours: list[int] = []
    starter = init = 0
    started = False
    try:
        err_r, err_w = os.pipe()
        ours += [err_r, err_w]
        status_r, status_w = os.pipe()
        ours += [status_r, status_w]
        go_r, go_w = os.pipe()
        ours += [go_r, go_w]
        pid_r, pid_w = os.pipe()
        ours += [pid_r, pid_w]
        alive = os.pidfd_open(os.getpid())
        ours.append(alive)
        # The environment on a memfd: not in argv (every user may read /proc/PID/cmdline), not
        # the starter's own (the host's dynamic loader would act on LD_PRELOAD... as us).
        environ = os.memfd_create("pytest-layers-env", os.MFD_CLOEXEC)
        ours.append(environ)
        _write_all(environ, _env_block(env))
        os.lseek(environ, 0, os.SEEK_SET)
        # Each fd goes to its fixed number by a dup2 from a copy above them all: a dup2 onto
        # itself would keep close-on-exec set (and the C libraries differ on that).
        actions: list[tuple[Any, ...]] = []
        sources = [
            None if (t if fd is None else fd) in close else (t if fd is None else fd)
            for t, fd in enumerate(stdio)
        ]
        for target, fd in enumerate([*sources, err_w, status_w, go_r, pid_w, alive, environ]):
            copy = -1
            if fd is not None:
                try:
                    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + _STARTER_FDS)
                except OSError as exc:
                    if exc.errno != errno.EBADF or target > 2:
                        raise
            if copy < 0:
                actions.append((os.POSIX_SPAWN_CLOSE, target))  # closed here: closed there
            else:
                ours.append(copy)
                actions.append((os.POSIX_SPAWN_DUP2, copy, target))
        blocked = {signal.SIGINT, signal.SIGQUIT}  # init ignores them; the program gets both
        # An empty environment: the starter is a dynamically linked host binary.
        try:
            starter = os.posix_spawn(binary, args, {}, file_actions=actions, setsigmask=blocked)
        except OSError as exc:
            raise _StarterFailed(exc.errno, exc.strerror) from None
        # From here on, an exception (^C) kills and reaps init and the starter, below.
        _faultpoints.reached("sandbox-spawned", binary)
        for fd in [fd for fd in ours if fd not in (err_r, status_r, go_w, pid_r)]:
            ours.remove(fd)  # first: should ^C come between the two, a leak, never a reuse
            os.close(fd)
        _faultpoints.reached("sandbox-starter", binary)
        init = _read_pid(pid_r)
        ours.remove(pid_r)
        os.close(pid_r)
        _, status = os.waitpid(starter, 0)
        starter = 0
        if not init:
            message = _read_all(err_r).decode(errors="replace")
            code, _, text = message.partition(":")
            number = int(code) if code.isdigit() else errno.EIO
            if (
                os.waitstatus_to_exitcode(status) == _cinit.CLONE_REFUSED
                and _cinit.mode() == "auto"
            ):
                _cinit.refused(f"clone3: {os.strerror(number)}")
                return None
            raise SandboxError(number, text or message or "the sandbox's starter failed")
        ours.remove(go_w)
        _write_go(plan, init, go_w)  # closes it
        started = True
    except BaseException:
        if starter or init:
            # Our copies of the child's ends first: the pid pipe must end when the starter does.
            for fd in [fd for fd in ours if fd != pid_r]:
                ours.remove(fd)
                os.close(fd)
            _abandon(starter, init, pid_r if pid_r in ours else -1)
        raise
    finally:
        for fd in ours:
            if not (started and fd in (err_r, status_r)):
                os.close(fd)
    return _confirm(SandboxProcess(init, status_r, argv, kill_signal=signal.SIGKILL), err_r)


class _StarterFailed(OSError):
    """The compiled init's binary could not be executed (removed or damaged since built)."""


def _env_block(env: Mapping[str, str]) -> bytes:
    """``NAME=VALUE\\0`` entries for the compiled init; what os.posix_spawn would refuse is
    refused the same way here."""
    entries = []
    for name, value in env.items():
        key, data = os.fsencode(name), os.fsencode(value)
        if not key or b"=" in key:
            raise ValueError(f"illegal environment variable name {name!r}")
        if b"\0" in key or b"\0" in data:
            raise ValueError("embedded null byte")
        entries.append(key + b"=" + data + b"\0")
    return b"".join(entries)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_pid(pid_r: int) -> int:
    """Init's pid from the starter's line; 0 when it wrote none (it failed before clone3)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(pid_r, 32)
        if not chunk:
            break
        data += chunk
    return int(data) if data.strip().isdigit() else 0


def _abandon(starter: int, init: int, pid_r: int) -> None:
    """Interrupted while init starts: kill and reap the starter's init (our child) and the
    starter, so that nothing runs unsupervised and no zombie is left."""
    if not init and pid_r >= 0:
        with contextlib.suppress(OSError):
            init = _read_pid(pid_r)  # the starter ends by itself: this returns soon
    if init:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
    if starter:
        os.waitpid(starter, 0)


def _from_request(request: tuple[Any, ...], fds: list[int]) -> tuple[int, int]:
    """The fork helper's side of :func:`_spawn_by`: start the sandbox it asks for, with the
    caller's stdio and its err and status pipes (all closed here); ``(pid, kill signal)``."""
    stdin, stdout, stderr, err_w, status_w = fds
    try:
        try:
            root, network, hostname, binds, argv, env, cwd, user, umask, rlimits = request
            box = Sandbox(
                Path(os.fsdecode(root)),
                network,
                hostname,
                [Bind(Path(os.fsdecode(src)), target, ro) for src, target, ro in binds],
                helper=False,
            )
            ids = (int(user[0]), int(user[1])) if user is not None else None
            inherit = (int(umask), [(int(n), int(s), int(h)) for n, s, h in rlimits])
        except BaseException:
            os.close(err_w)
            os.close(status_w)
            raise
        return box._start(
            argv, env, cwd, (stdin, stdout, stderr), ids, (), err_w, status_w, inherit
        )
    finally:
        for fd in (stdin, stdout, stderr):
            os.close(fd)  # init has its copies


def _umask() -> int:
    """This process's umask (``/proc/self/status`` says it without changing it, which
    ``os.umask`` would, racing other threads)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _confirm(proc: SandboxProcess, err_r: int) -> SandboxProcess:
    """Wait until init started the program (``err_r`` ends) or said why it could not."""
    try:
        message = _read_all(err_r)
    except BaseException:  # ^C while it starts: nothing may keep running unsupervised
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(err_r)
    if message:
        proc.wait()
        code, _, text = message.decode(errors="replace").partition(":")
        raise SandboxError(int(code) if code.isdigit() else errno.EIO, text)
    return proc


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class _Plan:
    box: Sandbox
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdio: tuple[int | None, int | None, int | None]
    uid: int
    gid: int
    caller: int
    user: tuple[int, int] | None = None
    #: (ready_w, go_r), the child's ends, when the caller maps: root, direct, subordinate ids.
    maps: tuple[int, int] | None = None
    #: The caller's umask and resource limits, for init started by the fork helper (a fork of
    #: the caller has them already).
    umask: int | None = None
    rlimits: Sequence[tuple[int, int, int]] = ()
    subids: _subids.Ranges = _subids.NONE  # an ordinary user's subordinate ids
    #: Init's: a pidfd of its parent (the caller, or the keeper), or -1; open until init
    #: switched to ``user`` and set its parent-death signal again.
    alive: int = -1


class _Stage(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def _stage(what: str, exc: OSError) -> _Stage:
    return _Stage(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}")


def _child(plan: _Plan, err_w: int, status_w: int) -> NoReturn:  # pragma: no cover - child
    """The keeper: never returns (a forked copy of the caller must not run the caller's code)."""
    gc.disable()  # a collection would touch (and copy) every page of the caller's heap
    code = 125
    try:
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        _linux.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != plan.caller:
            os._exit(125)  # the caller died before the line above: nobody wants us any more
        _enter_namespaces(plan)
        with contextlib.suppress(OSError):  # no pidfd_open: init then cannot check on us
            plan.alive = os.pidfd_open(os.getpid())
        init = os.fork()
        if init == 0:
            _init(plan, err_w, status_w)
        if plan.alive >= 0:
            os.close(plan.alive)
        os.close(err_w)
        os.close(status_w)
        # SIGTERM from the caller (SandboxProcess.kill) ends init; the kernel then kills the
        # rest, and init is reaped only once its PID namespace is empty, so our exit means "all
        # gone". (Should the caller die instead, each of us gets SIGKILL from PR_SET_PDEATHSIG.)
        signal.signal(signal.SIGTERM, lambda _sig, _frame: os.kill(init, signal.SIGKILL))
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            # Die of the same signal, so that the caller's wait() says -N as subprocess does.
            with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
                signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            code = 128 - code
    except _Stage as exc:
        _report(err_w, exc.code, str(exc))
    except BaseException as exc:  # anything must end in _exit, never unwind
        _report(err_w, errno.EIO, f"sandbox: {exc}")
    os._exit(code)


def _report(fd: int, code: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{code}:{text}".encode(errors="replace"))


def _enter_namespaces(plan: _Plan) -> None:  # pragma: no cover - child
    flags = _NAMESPACES | (_linux.CLONE_NEWNET if plan.box.network == "none" else 0)
    try:
        _linux.unshare(flags)
    except OSError as exc:
        raise _stage(
            "cannot create the sandbox's namespaces (user, mount, pid, uts, ipc, net): a "
            "seccomp filter, an LSM policy or a sysctl forbids them",
            exc,
        ) from None
    if plan.maps is not None:
        # A map beyond one's own id must be written from the parent namespace, with CAP_SETUID
        # there (root, or an ordinary user's session namespace holding subordinate ids) or by
        # newuidmap: the caller, still outside, writes it once we are inside (no extra fork of
        # a large interpreter). Without subordinate ids an ordinary user maps only its own id,
        # which it may write itself.
        ready_w, go_r = plan.maps
        os.write(ready_w, b"1")
        os.close(ready_w)
        failed = _answer(go_r)
    else:
        failed = _maps(plan, "self")
    if failed is not None:
        raise _Stage(errno.EPERM, f"cannot write the sandbox's uid and gid maps: {failed}")
    _setup_namespaces(plan)


def _answer(go_r: int) -> str | None:  # pragma: no cover - child
    """Read the caller's answer after it wrote our maps: None, or why they failed."""
    answer = os.read(go_r, 4096)
    os.close(go_r)
    if answer == b"1":
        return None
    return answer[1:].decode(errors="replace") or "the caller gave no answer (it died?)"


def _setup_namespaces(plan: _Plan) -> None:  # pragma: no cover - child
    """Once mapped: mounts private, the hostname, ``lo`` up."""
    try:
        _linux.mount("none", "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
        _linux.sethostname(plan.box.hostname)
        if plan.box.network == "none":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", _IFF_UP))
    except OSError as exc:
        raise _stage("cannot set up the sandbox's namespaces", exc) from None


def _maps(plan: _Plan, pid: str) -> str | None:  # pragma: no cover - child
    """Write the maps of ``pid``'s user namespace; None, or why that failed."""
    try:
        if plan.uid == 0:
            # Root stays root with real ids: every id maps to itself.
            _linux.write_proc(f"/proc/{pid}/uid_map", "0 0 4294967295")
            _linux.write_proc(f"/proc/{pid}/gid_map", "0 0 4294967295")
        elif plan.subids:
            # uid 0 inside is the user, 1..N its subordinate ids: chown to them works.
            _subids.write(
                int(pid),
                plan.subids,
                _subids.lines(plan.uid, plan.subids.uids, identity=False),
                _subids.lines(plan.gid, plan.subids.gids, identity=False),
            )
        else:
            _linux.write_proc(f"/proc/{pid}/setgroups", "deny")
            _linux.write_proc(f"/proc/{pid}/uid_map", f"0 {plan.uid} 1")
            _linux.write_proc(f"/proc/{pid}/gid_map", f"0 {plan.gid} 1")
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _go(plan: _Plan, pid: int) -> bytes:
    """The caller's answer once it wrote ``pid``'s maps: ``1``, or ``0`` and why not."""
    failed = _maps(plan, str(pid))
    return b"1" if failed is None else b"0" + failed.encode(errors="replace")


def _write_maps(plan: _Plan, pid: int, ready_r: int, go_w: int) -> None:
    """The caller's part when it maps for a keeper (root, subordinate ids): once the keeper
    says it is in its user namespace, write the maps and tell it whether that worked (EOF: it
    failed earlier)."""
    try:
        if os.read(ready_r, 1):
            os.write(go_w, _go(plan, pid))
    except OSError:
        pass  # the keeper reports the failure (or died)
    finally:
        os.close(ready_r)
        os.close(go_w)


def _write_go(plan: _Plan, pid: int, go_w: int) -> None:
    """The caller's part of a sandbox whose init it started straight into the namespaces:
    write the maps, then tell init whether that worked."""
    try:
        os.write(go_w, _go(plan, pid))
    except OSError:
        pass  # init died: its report (or its status) says why
    finally:
        os.close(go_w)


def _direct_init(
    plan: _Plan, err_w: int, status_w: int, go_r: int, alive: int
) -> NoReturn:  # pragma: no cover - child
    """Init started by the caller straight into new namespaces (no keeper): what the keeper
    does between its ``unshare`` and its ``fork``, then init's own work."""
    gc.disable()  # a collection would touch (and copy) every page of the caller's heap
    try:
        for sig in _IGNORED_BY_INIT:
            _signal.signal(sig, _SIG_IGN)
        _linux.set_pdeathsig(signal.SIGKILL)
        # getppid() is 0 in a new PID namespace: the caller's pidfd says whether it died
        # before the line above (nobody wants us any more, and no signal would come).
        if select.select([alive], [], [], 0)[0]:
            os._exit(125)
        plan.alive = alive  # kept until the switch to the program's user (_start)
        failed = _answer(go_r)  # "0" and why: the caller could not map us; EOF: it died
        if failed is not None:
            raise _Stage(errno.EPERM, f"cannot write the sandbox's uid and gid maps: {failed}")
        _setup_namespaces(plan)
    except _Stage as exc:
        _report(err_w, exc.code, str(exc))
        os._exit(125)
    except BaseException as exc:  # anything must end in _exit, never unwind
        _report(err_w, errno.EIO, f"sandbox: {exc}")
        os._exit(125)
    _init(plan, err_w, status_w)


def _init(plan: _Plan, err_w: int, status_w: int) -> NoReturn:  # pragma: no cover - child
    """PID 1 inside: mounts, pivot_root, drop privileges, then start the program and reap
    until it exits; exits itself right after, which ends whatever the program left."""
    try:
        # Before the program exists: nothing inside may ptrace init or take its fds.
        _linux.set_undumpable()
        _linux.set_pdeathsig(signal.SIGKILL)
        if plan.umask is not None:
            os.umask(plan.umask)
        for limit, soft, hard in plan.rlimits:
            _set_rlimit(limit, soft, hard)
        _build_root(plan.box)
        program = _start(plan)
        os.close(err_w)
        forward = lambda sig, _frame: os.kill(program, sig)  # noqa: E731
        for sig in _FORWARDED_BY_INIT:
            _signal.signal(sig, forward)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == program:
                break
        code = os.waitstatus_to_exitcode(status)
        os.write(status_w, str(code).encode())
        os._exit(0)
    except _Stage as exc:
        _report(err_w, exc.code, str(exc))
    except BaseException as exc:  # anything must end in _exit
        _report(err_w, errno.EIO, f"sandbox: {exc}")
    os._exit(125)


def _set_rlimit(limit: int, soft: int, hard: int) -> None:  # pragma: no cover - child
    if resource.getrlimit(limit) == (soft, hard):
        return
    try:
        resource.setrlimit(limit, (soft, hard))
    except (OSError, ValueError) as exc:
        name = _RLIMITS.get(limit, str(limit))
        raise _Stage(
            errno.EPERM,
            f"cannot give the program the caller's {name} ({soft}, {hard}): {exc}; the fork "
            "helper started before the caller raised it: lower it, or use Sandbox(helper=False)",
        ) from None


def _inside(root_fd: int, rel: str, *, directory: bool = True) -> int:
    """An ``O_PATH`` fd of ``rel`` resolved inside the root (the image's symlinks stay inside),
    made when missing."""
    flags = os.O_PATH | (os.O_DIRECTORY if directory else 0)
    try:
        return _linux.open_in_root(root_fd, rel, flags)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    _make_inside(root_fd, rel, directory=directory)
    return _linux.open_in_root(root_fd, rel, flags)


def _make_inside(root_fd: int, rel: str, *, directory: bool, hops: int = 0) -> None:
    """``mkdir -p`` (or touch) ``rel`` inside the root. A dangling symlink on the way (an
    image's ``/dev -> /somewhere``) gets its target made, resolved inside the root as well."""
    if hops > _chroot.MAX_SYMLINKS:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        try:
            os.close(_linux.open_in_root(root_fd, "/".join(parts[: i + 1]), os.O_PATH))
            continue
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        parent = _linux.open_in_root(root_fd, "/".join(parts[:i]) or ".", os.O_PATH)
        try:
            if directory or not last:
                os.mkdir(name, 0o755, dir_fd=parent)
            else:
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                os.close(os.open(name, flags, 0o644, dir_fd=parent))
        except FileExistsError:
            target = os.readlink(name, dir_fd=parent)
            base = "" if target.startswith("/") else "/".join(parts[:i])
            _make_inside(
                root_fd, f"{base}/{target}", directory=directory or not last, hops=hops + 1
            )
        finally:
            os.close(parent)


def _at(fd: int) -> str:
    # mount(2) follows this magic link to the very inode the fd holds: a mount target the image
    # cannot redirect between our check and the mount.
    return f"/proc/self/fd/{fd}"


def _build_root(box: Sandbox) -> None:  # pragma: no cover - child
    root = os.fsdecode(os.path.abspath(box.root))
    step = "bind the view"
    try:
        _linux.mount(root, root, None, _linux.MS_BIND | _linux.MS_REC)
        _linux.mount_setattr(root, _linux.MOUNT_ATTR_NOSUID | _linux.MOUNT_ATTR_NODEV)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        step = "mount /proc"
        fd = _inside(root_fd, "proc")
        _linux.mount("proc", _at(fd), "proc", _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC)
        os.close(fd)
        step = "make /dev"
        _build_dev(root_fd)
        for bind in box.binds:
            step = f"bind {bind.source} at {bind.target}"
            fd = _inside(root_fd, bind.target.strip("/"), directory=os.path.isdir(bind.source))
            # The flags go on before the bind is attached, at the fd resolved once: a program
            # of another sandbox on this view may swap the target's path meanwhile.
            attrs = _linux.MOUNT_ATTR_NOSUID | _linux.MOUNT_ATTR_NODEV
            try:
                _linux.bind_onto(
                    bind.source, fd, attrs | (_linux.MOUNT_ATTR_RDONLY if bind.readonly else 0)
                )
            finally:
                os.close(fd)
        step = "pivot_root into the view"
        os.fchdir(root_fd)
        os.close(root_fd)
        # The old root ends up stacked on the new one; detaching it leaves nothing above "/".
        _linux.pivot_root(".", ".")
        _linux.umount2(".", _linux.MNT_DETACH)
        os.chdir("/")
        step = "protect /proc"
        _protect_proc()
    except OSError as exc:
        raise _stage(f"cannot {step} in {root}", exc) from None


def _build_dev(root_fd: int) -> None:  # pragma: no cover - child
    fd = _inside(root_fd, "dev")
    _linux.mount(
        "tmpfs", _at(fd), "tmpfs", _linux.MS_NOSUID | _linux.MS_NOEXEC, "mode=0755,size=1m"
    )
    os.close(fd)
    dev = _linux.open_in_root(root_fd, "dev", os.O_DIRECTORY)
    try:
        # The tmpfs is ours and fresh (nothing of the image's is in it yet), so names in it are
        # used as they are.
        for name in _DEVICES:
            os.mknod(name, stat.S_IFREG | 0o666, dir_fd=dev)
            _linux.mount(f"/dev/{name}", f"{_at(dev)}/{name}", None, _linux.MS_BIND)
        # A bind starts with no flags of its own: one recursive call gives all six (and the
        # tmpfs) nosuid,noexec, before pts and shm, which get their own flags below.
        _linux.mount_setattr(_at(dev), _linux.MOUNT_ATTR_NOSUID | _linux.MOUNT_ATTR_NOEXEC)
        for name in ("pts", "shm"):
            os.mkdir(name, 0o755, dir_fd=dev)
        pts = os.open("pts", os.O_PATH, dir_fd=dev)
        _linux.mount(
            "devpts",
            _at(pts),
            "devpts",
            _linux.MS_NOSUID | _linux.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        )
        os.close(pts)
        shm = os.open("shm", os.O_PATH, dir_fd=dev)
        _linux.mount(
            "shm", _at(shm), "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "mode=1777,size=64m"
        )
        os.close(shm)
        links = {
            "ptmx": "pts/ptmx",
            "fd": "/proc/self/fd",
            "stdin": "/proc/self/fd/0",
            "stdout": "/proc/self/fd/1",
            "stderr": "/proc/self/fd/2",
        }
        for name, target in links.items():
            os.symlink(target, name, dir_fd=dev)
    finally:
        os.close(dev)


def _protect_proc() -> None:  # pragma: no cover - child
    # One listing of the fresh /proc instead of a stat (and an exception) per name.
    present = set(os.listdir("/proc"))
    for name in _PROC_READONLY:
        if name in present:
            path = "/proc/" + name
            _linux.mount(path, path, None, _linux.MS_BIND | _linux.MS_REC)
            _linux.mount_setattr(path, _linux.MOUNT_ATTR_RDONLY)
    for name in _PROC_MASKED_FILES:
        if name in present:
            _linux.mount("/dev/null", "/proc/" + name, None, _linux.MS_BIND)
    for name in _PROC_MASKED_DIRS:
        if name in present and os.path.isdir("/proc/" + name):
            _linux.mount("tmpfs", "/proc/" + name, "tmpfs", _linux.MS_RDONLY, "size=0")


@functools.cache
def _cap_last() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return _linux.CAP_LAST_CAP


@functools.cache
def _dropped_caps() -> tuple[int, ...]:
    """The capabilities init takes out of its bounding set: every one this kernel knows but
    :data:`KEPT_CAPS` (read by the caller, so that init finds it cached)."""
    return tuple(cap for cap in range(_cap_last() + 1) if cap not in KEPT_CAPS)


def _single_threaded() -> bool:
    """Whether this process has one thread, Python's main one: only then may it fork without
    glibc's and Python's fork hooks (:func:`_linux.fork_into_namespaces`)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _drop_privileges(root: bool) -> None:  # pragma: no cover - child
    if root:
        # Real root's supplementary groups are real host groups: give none of them inside.
        os.setgroups([])
    _linux.bounding_drop(*_dropped_caps())
    kept = sum(1 << cap for cap in KEPT_CAPS)
    caps = _linux.capget()
    # uid 0 gets its bounding set at execve; no inheritable or ambient bit may add to it.
    _linux.capset(_linux.Capabilities(caps.effective & kept, caps.permitted & kept, 0))
    _linux.ambient_clear_all()
    _linux.set_no_new_privs()


def _switch_user(plan: _Plan) -> None:  # pragma: no cover - child
    """Become ``plan.user`` (init too: it needs nothing more than to wait and forward
    signals, and a program of the same uid can be signalled). Changing from uid 0 clears every
    capability, as for any setuid to an ordinary user."""
    assert plan.user is not None
    uid, gid = plan.user
    try:
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        hint = _user_hint(plan)
        if exc.errno == errno.EINVAL and hint:
            raise _Stage(errno.EINVAL, hint) from None
        raise _stage(f"cannot run as uid {uid} gid {gid} inside", exc) from None


def _user_hint(plan: _Plan) -> str:
    """What a switch to ``plan.user`` failing with EINVAL means (the id does not exist inside),
    or "" (root: every id exists). Both inits report it."""
    assert plan.user is not None
    uid, gid = plan.user
    if plan.uid == 0:
        return ""
    if plan.subids:
        return (
            f"cannot run as uid {uid} gid {gid} inside: only ids 0-{plan.subids.count} "
            "exist inside (0 is you outside, the rest your subordinate ids); use an id in "
            "that range, a larger range in /etc/subuid and /etc/subgid, or run as root"
        )
    return (
        f"cannot run as uid {uid} gid {gid} inside: as an ordinary user only uid 0 "
        f"inside exists (it is you outside); run as user=0, or map more ids: "
        f"{plan.subids.missing}"
    )


def _start(plan: _Plan) -> int:  # pragma: no cover - child
    """Start the program from init, already inside: init gives up its own privileges first
    (it needs none any more), so the program inherits only what is left. ``posix_spawn``
    (vfork and exec) returns once the program is exec'd, or raises why it could not be."""
    _linux.cloexec_from(3)
    try:
        os.chdir(plan.cwd)
    except OSError as exc:
        raise _stage(f"cwd {plan.cwd!r} inside the image", exc) from None
    try:
        _drop_privileges(plan.uid == 0)
    except OSError as exc:
        raise _stage("cannot drop privileges", exc) from None
    if plan.user is not None:
        _switch_user(plan)
        _faultpoints.reached("sandbox-user-switched", str(plan.alive))
        # A change of credentials clears the parent-death signal: set it again, then make sure
        # our parent did not die in between (no signal would come for that).
        _linux.set_pdeathsig(signal.SIGKILL)
        if plan.alive >= 0 and select.select([plan.alive], [], [], 0)[0]:
            os._exit(125)
    if plan.alive >= 0:
        os.close(plan.alive)
    # posix_spawnp searches the PATH of the caller's environment, not of the one it passes on.
    path = plan.env.get("PATH", DEFAULT_PATH)
    os.environ["PATH"] = path
    stdio = [
        (os.POSIX_SPAWN_DUP2, fd, target)
        for target, fd in enumerate(plan.stdio)
        if fd is not None and fd != target
    ]
    # Python ignores SIGPIPE and SIGXFSZ, init ignores ^C and ^\: the program must not inherit
    # that (the handlers init installs are reset by exec anyway).
    defaults = (signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ)
    try:
        return os.posix_spawnp(
            plan.argv[0], plan.argv, plan.env, file_actions=stdio, setsigdef=defaults
        )
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise _Stage(
                errno.ENOENT, f"{plan.argv[0]}: not found in the image (PATH={path})"
            ) from None
        raise _stage(f"cannot run {plan.argv[0]}", exc) from None
