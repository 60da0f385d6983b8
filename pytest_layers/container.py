"""Run a program with a rootfs as its ``/``: the engine of ``Rootfs.run()`` and ``spawn()``.

:class:`Process` is the ``subprocess.Popen``-like handle over a :class:`~pytest_layers.sandbox.
SandboxProcess`; :func:`parse_user` finds a user in the image's ``/etc/passwd``. What the
program sees is documented in docs/reference/rootfs.md.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import selectors
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from pytest_layers.errors import SandboxError
from pytest_layers.sandbox import SandboxProcess

__all__ = ["Process", "parse_user", "stdio_fd"]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


def parse_user(passwd: Path, user: str | int) -> tuple[int, int, str | None]:
    """``(uid, gid, home)`` of ``user`` (a name or a uid) from the image's ``passwd`` file;
    a uid the file lacks runs with gid = uid and no home."""
    entries: list[list[str]] = []
    with contextlib.suppress(OSError):
        for line in passwd.read_text(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) >= 7 and fields[2].isdigit() and fields[3].isdigit():
                entries.append(fields)
    for fields in entries:
        if fields[0] == user or (isinstance(user, int) and int(fields[2]) == user):
            return int(fields[2]), int(fields[3]), fields[5] or None
    if isinstance(user, int) and not isinstance(user, bool) and user >= 0:
        return user, user, None
    raise SandboxError(
        errno.ENOENT,
        f"user={user!r}: no such user in the image's /etc/passwd; add it in a layer "
        "(useradd, or a passwd line) or pass a numeric uid",
    )


def stdio_fd(spec: int | IO[Any] | None, *, reading: bool) -> tuple[int | None, int | None]:
    """``(fd for the child, our end)`` for a ``subprocess``-style stdin/stdout/stderr spec.
    ``our end`` is a pipe end we keep (PIPE) or None; the child's fd is ours to close when it
    differs from the spec's own fd."""
    if spec is None:
        return None, None
    if spec == PIPE:
        r, w = os.pipe()
        return (r, w) if reading else (w, r)
    if spec == DEVNULL:
        return os.open(os.devnull, os.O_RDONLY if reading else os.O_WRONLY), None
    if isinstance(spec, int):
        return spec, None
    return spec.fileno(), None


class Process:
    """A program running inside a rootfs, shaped like :class:`subprocess.Popen`: ``args``,
    ``pid`` (the sandbox's init, or its keeper, seen from outside), ``stdin``/``stdout``/
    ``stderr`` (file objects for ``PIPE``), ``returncode``, :meth:`poll`, :meth:`wait`,
    :meth:`communicate`, :meth:`kill`, :meth:`terminate`. Killing ends every process inside
    (its PID namespace dies with its init).
    """

    def __init__(
        self,
        proc: SandboxProcess,
        pipes: tuple[int | None, int | None, int | None],
        *,
        text: bool,
        on_exit: Callable[[], None],
    ) -> None:
        self._proc = proc
        self.args = proc.args
        self.pid = proc.pid
        self.text = text
        self._on_exit: Callable[[], None] | None = on_exit
        self.stdin: IO[Any] | None = None
        self.stdout: IO[Any] | None = None
        self.stderr: IO[Any] | None = None
        mode = ("w", "r", "r")
        files: list[IO[Any] | None] = []
        for i, fd in enumerate(pipes):
            if fd is None:
                files.append(None)
                continue
            raw = open(fd, mode[i] + "b", buffering=0 if i == 0 else -1)  # noqa: SIM115
            files.append(io.TextIOWrapper(raw, encoding="utf-8") if text else raw)
        self.stdin, self.stdout, self.stderr = files
        self._out: dict[int, list[bytes]] = {1: [], 2: []}
        self._input_left: bytes | None = None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def _ended(self) -> None:
        if self._on_exit is not None:
            done, self._on_exit = self._on_exit, None
            done()

    def poll(self) -> int | None:
        code = self._proc.poll()
        if code is not None:
            self._ended()
        return code

    def wait(self, timeout: float | None = None) -> int:
        code = self._proc.wait(timeout)
        self._ended()
        return code

    def kill(self) -> None:
        """End the program and everything it started (``SIGKILL`` to its init)."""
        self._proc.kill()

    terminate = kill

    def communicate(
        self, input: bytes | str | None = None, timeout: float | None = None
    ) -> tuple[Any, Any]:
        """As ``Popen.communicate``: send ``input``, read stdout and stderr to EOF, wait.
        ``subprocess.TimeoutExpired`` (the program keeps running) when ``timeout`` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._input_left is None:
            data = input.encode() if isinstance(input, str) else (input or b"")
            self._input_left = data
        with selectors.DefaultSelector() as sel:
            if self.stdin is not None and not self.stdin.closed:
                if self._input_left:
                    os.set_blocking(self.stdin.fileno(), False)
                    sel.register(self.stdin.fileno(), selectors.EVENT_WRITE, 0)
                else:
                    self.stdin.close()
            for n, f in ((1, self.stdout), (2, self.stderr)):
                if f is not None and not f.closed:
                    sel.register(f.fileno(), selectors.EVENT_READ, n)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(
                        self.args, timeout or 0, self._joined(1), self._joined(2)
                    )
                for key, _ in sel.select(left):
                    if key.data == 0:
                        assert self.stdin is not None
                        try:
                            sent = os.write(key.fd, self._input_left[:65536])
                        except BrokenPipeError:
                            sent = len(self._input_left)
                        self._input_left = self._input_left[sent:]
                        if not self._input_left:
                            sel.unregister(key.fd)
                            self.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        self._out[key.data].append(chunk)
                    else:
                        sel.unregister(key.fd)
                        f = self.stdout if key.data == 1 else self.stderr
                        assert f is not None
                        f.close()
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        return self._joined(1), self._joined(2)

    def _joined(self, n: int) -> Any:
        f = self.stdout if n == 1 else self.stderr
        if f is None:
            return None
        data = b"".join(self._out[n])
        return data.decode("utf-8", errors="replace") if self.text else data

    def close(self) -> None:
        """Kill whatever is left, wait, close our pipe ends (the rootfs's teardown calls it)."""
        if self._proc.returncode is None:
            self.kill()
        self.wait()
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normalize_args(args: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(args, (str, os.PathLike)):
        return [os.fspath(args)]
    return [os.fspath(a) for a in args]
