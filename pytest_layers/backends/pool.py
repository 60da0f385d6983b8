"""Views prepared ahead of the tests that take them and retired behind them.

A test's rootfs costs a handful of syscalls (mkdir, ``fsmount``, ``umount2``, rmdir) that need
not run while the test waits: :class:`ViewPool` keeps a few *fresh* views per image ready and
takes the cleanup of a finished view (unmount, scratch removal) off the test's path. See
docs/concepts/performance.md.

The work runs in **helper processes**, one per key (an image with its ``readonly=`` and
``init=``), forked from the session when the key is first used, not in a thread:

* a thread would share the GIL with the test, and pytest's main thread is busy in Python almost
  all the time: a thread gets the GIL back only at the 5 ms switch interval, so its
  preparations fell behind (and each one it did got in the test's way);
* a forked child shares the session's mount namespace (its mounts are the test's), has every
  layer and backend object of the session already in memory, and is single-threaded, so
  nothing ever runs in a second thread of the session: ``unshare`` at configure time is never
  at risk (the first fork happens at the first test's setup);
* it dies with the session: ``PR_SET_PDEATHSIG`` (a SIGKILLed session), SIGINT ignored (a
  Ctrl-C reaches the whole process group; the session, not the helper, decides what to undo).

Rules it keeps:

* **Fresh views only.** A view is handed out once. A backend that can reset a used view to
  pristine (the copy backend's reusable copies) plugs in through :attr:`Maker.reset`: the
  helper resets the returned view, after the test's snapshot was taken, and hands it out again
  only when the reset says it succeeded.
* **Bounded by demand.** :meth:`expect` says how many of the next tests use each key; at most
  ``depth`` views per key are requested ahead, ready views no pending test needs are sent back
  for cleanup, and a helper with nothing out and nothing wanted exits. At most
  ``max_helpers`` helpers live at once; other keys are served in the test (``take`` is None).
* **Errors reach the taker.** A failed preparation is the reply to that request: :meth:`take`
  raises it in the test that needed the view.
* **Drained.** :meth:`close` asks every helper to clean what it holds and waits for it.

No pytest here: the plugin feeds it (docs/dev/internals.md).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["DEFAULT_DEPTH", "MAX_HELPERS", "Maker", "PoolError", "ViewPool"]

#: Views requested ahead per key: one for the next test, one for the one after.
DEFAULT_DEPTH = 2
#: Helper processes alive at once (each holds a forked copy of the session's memory map).
MAX_HELPERS = 8

T = TypeVar("T")

_HEADER = struct.Struct("!I")


class PoolError(RuntimeError):
    """A helper failed in a way its own error cannot say (it died, or its error could not be
    sent back)."""


@dataclass(frozen=True)
class Maker(Generic[T]):
    """How the views of one key are made, exported to the session, thrown away, reset.

    ``make`` and ``discard`` run in the helper. ``export`` turns a view into what crosses the
    pipe (pickled: no closures, no open files). ``reset`` (optional: the copy backend's
    reusable copies) brings a used view back to the image exactly and returns True, or False
    when it cannot (the view is then discarded).
    """

    make: Callable[[], T]
    discard: Callable[[T], None]
    export: Callable[[T], Any] = lambda view: view
    reset: Callable[[T], bool] | None = None


class _Helper:
    """The session's side of one helper process."""

    def __init__(self, pid: int, tx: int, rx: int) -> None:
        self.pid = pid
        self.tx = tx
        self.rx = rx
        #: Views requested and not yet read back.
        self.in_flight = 0
        #: Views handed to tests and not yet retired.
        self.out = 0
        self._outbox: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...], *, now: bool = True) -> None:
        """Send ``message``; with ``now=False`` it waits for the next sending one. Each write
        wakes the helper, and a woken process may take the CPU from the test at once: one
        write per test (at teardown) instead of two."""
        self._outbox.append(message)
        if now:
            messages, self._outbox = self._outbox, []
            _send(self.tx, messages)

    def receive(self) -> tuple[Any, ...]:
        message = _receive(self.rx)
        if message is None:
            raise PoolError(f"the view pool's helper process {self.pid} exited unexpectedly")
        return message


class ViewPool(Generic[T]):
    """Ready views per key, made and retired by one helper process per key."""

    def __init__(self, *, depth: int = DEFAULT_DEPTH, max_helpers: int = MAX_HELPERS) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self.depth = depth
        self.max_helpers = max_helpers
        self._makers: dict[Hashable, Maker[T]] = {}
        self._helpers: dict[Hashable, _Helper] = {}
        #: id() of a view handed out -> (key, token): what retire() sends back.
        self._handed: dict[int, tuple[Hashable, int]] = {}
        self._closed = False
        #: Views taken from a helper, and views a test had to wait for (none was ready).
        self.hits = 0
        self.misses = 0
        #: Takes the pool could not serve (unknown key, too many helpers, closed).
        self.declined = 0

    def register(self, key: Hashable, maker: Maker[T]) -> None:
        """Say how views of ``key`` are made; the first registration of a key wins."""
        self._makers.setdefault(key, maker)

    def known(self, key: Hashable) -> bool:
        return key in self._makers

    @property
    def helper_pids(self) -> list[int]:
        return [h.pid for h in self._helpers.values()]

    def expect(self, demand: Mapping[Hashable, int]) -> None:
        """The pending tests' needs: ``{key: how many of the next tests use it}``."""
        if self._closed:
            return
        for key in self._makers:
            want = min(self.depth, demand.get(key, 0))
            helper = self._helpers.get(key)
            if helper is None:
                if want and len(self._helpers) < self.max_helpers:
                    helper = self._spawn(key)
                else:
                    continue
            while helper.in_flight < want:
                # Sent with the next retire (this test's teardown), unless nothing is on the
                # way at all.
                helper.send(("make",), now=not helper.in_flight and not helper.out)
                helper.in_flight += 1
            # Ready views no pending test needs go back for cleanup; a helper with nothing
            # out, nothing wanted and nothing on the way exits.
            while helper.in_flight > want and _readable(helper.rx):
                reply = helper.receive()
                helper.in_flight -= 1
                if reply[0] == "ok":
                    helper.send(("retire", reply[1]))
            if not want and not helper.in_flight and not helper.out:
                self._stop(key)

    def take(self, key: Hashable) -> T | None:
        """A view of ``key`` never handed out before, or None when the pool cannot serve the
        key (the caller makes one itself). Raises what the preparation of that view raised."""
        helper = self._helpers.get(key)
        if helper is None:
            if self._closed or key not in self._makers or len(self._helpers) >= self.max_helpers:
                self.declined += 1
                return None
            helper = self._spawn(key)
        if helper.in_flight == 0:
            helper.send(("make",))
            helper.in_flight += 1
        if _readable(helper.rx):
            self.hits += 1
        else:
            self.misses += 1
        reply = helper.receive()
        helper.in_flight -= 1
        if reply[0] == "err":
            raise _error(reply[1])
        token, view = reply[1], reply[2]
        helper.out += 1
        self._handed[id(view)] = (key, token)
        return view  # type: ignore[no-any-return]

    def retire(self, view: T) -> bool:
        """Hand ``view`` (from :meth:`take`, its test over and its snapshot taken) back for
        cleanup or reset. False when the pool did not hand it out (the caller cleans it)."""
        entry = self._handed.pop(id(view), None)
        if entry is None:
            return False
        key, token = entry
        helper = self._helpers[key]
        helper.out -= 1
        helper.send(("retire", token))
        return True

    def close(self) -> None:
        """Ask every helper to clean what it holds (ready views, views still out) and wait."""
        self._closed = True
        for key in list(self._helpers):
            self._stop(key)

    # ---- the session's side ---------------------------------------------------------------

    def _spawn(self, key: Hashable) -> _Helper:
        maker = self._makers[key]
        from_parent, to_child = os.pipe2(os.O_CLOEXEC)
        to_parent, from_child = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        with warnings.catch_warnings():
            # Python 3.12 warns about fork() in a process with threads (xdist's execnet has
            # one); the child runs only the code below, which takes no lock another thread
            # could hold.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; its effects are what the tests check
            code = 0
            try:
                for fd in (
                    to_child,
                    to_parent,
                    *(x for h in self._helpers.values() for x in (h.tx, h.rx)),
                ):
                    os.close(fd)
                _serve(maker, from_parent, from_child, parent)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(from_parent)
        os.close(from_child)
        helper = _Helper(pid, to_child, to_parent)
        self._helpers[key] = helper
        return helper

    def _stop(self, key: Hashable) -> None:
        helper = self._helpers.pop(key)
        with contextlib.suppress(OSError):
            helper.send(("quit",))
        os.close(helper.tx)
        try:
            # The helper answers the last requests, then cleans everything and exits.
            while _receive(helper.rx) is not None:
                pass
        finally:
            os.close(helper.rx)
            _reap(helper.pid)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            return
        except KeyboardInterrupt:
            continue  # a second Ctrl-C: the helper is cleaning up, let it finish
        return


def _error(payload: Any) -> BaseException:
    if isinstance(payload, BaseException):
        return payload
    return PoolError(str(payload))


def _send(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = _HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> tuple[Any, ...] | None:
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    data = _read_exactly(fd, _HEADER.unpack(header)[0])
    if data is None:
        return None
    message: tuple[Any, ...] = pickle.loads(data)
    return message


# ---- the helper's side ------------------------------------------------------------------------


def _serve(maker: Maker[Any], rx: int, tx: int, parent: int) -> None:  # pragma: no cover
    """The helper's loop: make views on request, clean or reset retired ones; on ``quit``,
    clean up everything it still holds."""
    from pytest_layers import _linux

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        _linux.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        return  # the session died before the death signal was armed
    state = _HelperState(maker, tx)
    try:
        while True:
            batch = _receive(rx)
            if batch is None:
                # The session died without asking (SIGKILL: its fds close before the death
                # signal comes). Leave everything as a killed session leaves its own views: its
                # mounts go with its namespace, and the next session sweeps its scratch.
                return
            for message in batch:
                if message[0] == "quit":
                    for view in [*state.held.values(), *state.spare]:
                        with contextlib.suppress(Exception):
                            maker.discard(view)
                    return
                state.handle(message)
    finally:
        os.close(tx)


class _HelperState:  # pragma: no cover - runs in the helper
    def __init__(self, maker: Maker[Any], tx: int) -> None:
        self.maker = maker
        self.tx = tx
        self.held: dict[int, Any] = {}
        self.spare: list[Any] = []
        self.count = 0

    def handle(self, message: tuple[Any, ...]) -> None:
        maker = self.maker
        if message[0] == "make":
            try:
                view = self.spare.pop() if self.spare else maker.make()
            except Exception as exc:
                _reply_error(self.tx, exc)
                return
            self.count += 1
            self.held[self.count] = view
            _send(self.tx, ("ok", self.count, maker.export(view)))
        elif message[0] == "retire":
            view = self.held.pop(message[1], None)
            if view is None:
                return
            with contextlib.suppress(Exception):
                if maker.reset is not None and maker.reset(view):
                    self.spare.append(view)
                    return
                maker.discard(view)


def _reply_error(tx: int, exc: Exception) -> None:  # pragma: no cover - runs in the helper
    try:
        # Unpickling it must work too (an exception with a custom constructor may not).
        pickle.loads(pickle.dumps(exc))
    except Exception:
        _send(tx, ("err", f"{type(exc).__name__}: {exc}"))
    else:
        _send(tx, ("err", exc))
