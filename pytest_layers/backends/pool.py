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
* a forked child shares the session's mount namespace (its mounts are the test's) and has
  every layer and backend object of the session already in memory, and whatever threads it
  starts (it cleans retired views in one) are its own: nothing ever runs in a second thread of
  the session, so ``unshare`` at configure time is never at risk (the first fork happens at the
  first test's setup);
* it dies with the session: ``PR_SET_PDEATHSIG`` (a SIGKILLed session), SIGINT ignored (a
  Ctrl-C reaches the whole process group; the session, not the helper, decides what to undo).

Rules it keeps:

* **Fresh views only.** A view is handed out once. A backend that can reset a used view to
  pristine (the copy backend's reusable copies) plugs in through :attr:`Maker.reset`: the
  helper resets the returned view, after the test's snapshot was taken, and hands it out again
  only when the reset says it succeeded.
* **Bounded by demand.** :meth:`expect` (or :meth:`follow` and :meth:`at`) says how many of
  the next tests use each key; when fewer than ``depth`` views are on the way, up to ``depth +
  BATCH`` are requested (never more than the next tests need) in one write with the views to
  clean, ready views no pending test needs are sent back for cleanup, and a helper with
  nothing out and nothing wanted exits. At most
  ``max_helpers`` helpers live at once; other keys are served in the test (``take`` is None).
* **Started together.** A maker with ``begin`` (fuse: the daemon started, its mount not yet
  waited for) has up to :data:`AHEAD` views of a request begun before the first is finished;
  replies keep the order of the requests.
* **Errors reach the taker.** A failed preparation is the reply to that request: :meth:`take`
  raises it in the test that needed the view.
* **Drained.** :meth:`close` asks every helper to clean what it holds and waits for it.

No pytest here: the plugin feeds it (docs/dev/internals.md).
"""

from __future__ import annotations

import collections
import contextlib
import marshal
import os
import pickle
import queue
import select
import signal
import struct
import threading
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["AHEAD", "BATCH", "DEFAULT_DEPTH", "MAX_HELPERS", "Maker", "PoolError", "ViewPool"]

#: Views requested ahead per key: one for the next test, one for the one after.
DEFAULT_DEPTH = 2
#: Requests and retirements sent to a helper in one write. Every write wakes the helper, and
#: a woken process may take the CPU from the test at once (on 2 busy cores, 0.2 to 0.7 ms per
#: write): one write per ``BATCH`` tests, not one per test. The tests that write are also the
#: slow tail: with 4, a quarter of the tests wrote and the p90 was 4x the median; with 16,
#: 2.2-2.6x (2,000 trivial tests, same minutes). The helper holds up to ``depth + BATCH``
#: ready views (at most as many as the next tests need) and ``BATCH`` used ones.
BATCH = 16
#: Views a helper begins before it finishes the first (a maker with ``begin``): a fuse daemon
#: takes milliseconds to mount, and the helper waited for each before starting the next.
AHEAD = 3
#: Helper processes alive at once (each holds a forked copy of the session's memory map).
MAX_HELPERS = 8
#: Retired views waiting for the helper's cleaner before the helper cleans the next ones
#: itself: the cleaner runs at the lowest CPU priority, so on a machine kept busy it may fall
#: behind, and the views it has not cleaned yet hold mounts and disk.
CLEAN_BACKLOG = 2 * BATCH
#: The cleaner's niceness: a view asked for, or the test itself, goes first on a busy machine
#: (slow tests clustered right after each batch of unmounts when it ran at the helper's).
CLEANER_NICE = 19

T = TypeVar("T")

_HEADER = struct.Struct("!I")
_READ_SIZE = 1 << 16


class PoolError(RuntimeError):
    """A helper failed in a way its own error cannot say (it died, or its error could not be
    sent back)."""


@dataclass(frozen=True)
class Maker(Generic[T]):
    """How the views of one key are made, sent to the session, thrown away, reset.

    ``make`` and ``discard`` run in the helper. ``export`` turns a view into plain values
    (``str``, ``int``, ``bytes``, ``None``, tuples of them: what :mod:`marshal` carries, read
    back in a third of the time of unpickling a dataclass of paths; anything else is pickled)
    and ``load``, in the session, turns those back into a view. ``reset`` (optional: the copy
    backend's reusable copies) brings a used view back to the image exactly and returns True,
    or False when it cannot (the view is then discarded). ``reset_counts(reused, refused)``,
    in the session, is told of each reset view a test takes (its reply says it was reset) and,
    when the helper ends, of the resets it refused: the report then says what it says where
    the session resets views itself.
    """

    make: Callable[[], T]
    discard: Callable[[T], None]
    export: Callable[[T], Any] = lambda view: view
    reset: Callable[[T], bool] | None = None
    load: Callable[[Any], T] = lambda data: data
    #: Run in the helper before its first view and after its last cleanup (the fuse backend
    #: starts and ends the watcher of its daemons there).
    started: Callable[[], None] | None = None
    ending: Callable[[], None] | None = None
    #: ``make`` in two steps, ``begin()()``: the helper begins up to :data:`AHEAD` views of a
    #: batch before it finishes the first (fuse: daemons start together, on both cores).
    begin: Callable[[], Callable[[], T]] | None = None
    reset_counts: Callable[[int, int], None] | None = None


class _Helper:
    """The session's side of one helper process."""

    def __init__(self, pid: int, tx: int, rx: int, maker: Maker[Any]) -> None:
        self.pid = pid
        self.maker = maker
        self.tx = tx
        #: Non-blocking: a take reads whatever views are ready in one call, without a select.
        self.rx = rx
        os.set_blocking(rx, False)
        self.load = maker.load
        #: Views requested and not yet taken (being made, or ready in the pipe or the buffer).
        self.in_flight = 0
        #: Views handed to tests and not yet retired.
        self.out = 0
        #: Retirements sent per write (1 where views are reset and handed out again).
        self.batch = 1
        self._outbox: list[tuple[Any, ...]] = []
        self._retiring = 0
        self._buffer = bytearray()
        #: Whole replies read from the pipe and not yet received: one read takes every reply
        #: the helper has written (a batch), each test then takes its own without a syscall.
        self._frames: collections.deque[tuple[Any, ...]] = collections.deque()
        self._eof = False

    def queue(self, message: tuple[Any, ...]) -> None:
        self._outbox.append(message)
        if message[0] == "retire":
            self._retiring += 1

    @property
    def retiring(self) -> int:
        """Retirements queued and not yet sent."""
        return self._retiring

    def flush(self) -> None:
        if self._outbox:
            messages, self._outbox, self._retiring = self._outbox, [], 0
            _send(self.tx, tuple(messages))

    def ready(self) -> bool:
        """A reply can be read without waiting."""
        return bool(self._frames) or self._fill(block=False)

    def receive(self) -> tuple[Any, ...]:
        frames = self._frames
        while not frames:
            if not self._fill(block=True):
                raise PoolError(f"the view pool's helper process {self.pid} exited unexpectedly")
        return frames.popleft()

    def drain(self) -> None:
        """Read until the helper closes its end (it does when it has cleaned up); its last
        message has its reset counts."""
        while not self._eof:
            self._fill(block=True)
        add = self.maker.reset_counts
        for frame in self._frames:
            if frame[0] == "refused" and add is not None:
                add(0, frame[1])
        self._frames.clear()

    def _fill(self, *, block: bool) -> bool:
        """Read what the pipe holds and split off the whole replies in it; whether one came
        (False at end of file or, without ``block``, when no whole reply is there)."""
        while not self._eof:
            try:
                chunk = os.read(self.rx, _READ_SIZE)
            except BlockingIOError:
                if not block:
                    return False
                select.select([self.rx], [], [])
                continue
            if not chunk:
                self._eof = True
                return False
            buf = self._buffer
            buf += chunk
            start, end, size = 0, len(buf), _HEADER.size
            while end - start >= size:
                stop = start + size + _HEADER.unpack_from(buf, start)[0]
                if stop > end:
                    break
                self._frames.append(marshal.loads(buf[start + size : stop]))
                start = stop
            if start:
                del buf[:start]
            if self._frames:
                return True
        return False


class ViewPool(Generic[T]):
    """Ready views per key, made and retired by one helper process per key."""

    def __init__(
        self, *, depth: int = DEFAULT_DEPTH, max_helpers: int = MAX_HELPERS, batch: int = BATCH
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self.depth = depth
        self.batch = batch
        self.max_helpers = max_helpers
        self._makers: dict[Hashable, Maker[T]] = {}
        self._helpers: dict[Hashable, _Helper] = {}
        #: id() of a view handed out -> (key, token): what retire() sends back.
        self._handed: dict[int, tuple[Hashable, int]] = {}
        self._closed = False
        #: The keys of the tests in run order (None: no pooled view) and how far to look.
        self._plan: Sequence[Hashable | None] = ()
        self._window = 0
        self._demand_at: tuple[int, dict[Hashable, int]] | None = None
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

    def follow(self, plan: Sequence[Hashable | None], window: int) -> None:
        """The key of every test in run order (None where a test takes no pooled view); the
        pool prepares for the ``window`` tests after the one at :meth:`at`."""
        self._plan = plan
        self._window = window
        self._demand_at = None

    def at(self, index: int) -> None:
        """The test at ``index`` of the plan has taken its view: prepare for the next ones.
        Moving one test on updates the demand in O(1) (the window slides)."""
        plan, window = self._plan, self._window
        last = self._demand_at
        if last is not None and last[0] + 1 == index:
            demand = last[1]
            gone = plan[index] if index < len(plan) else None
            if gone is not None:
                demand[gone] -= 1
                if not demand[gone]:
                    del demand[gone]
            new = index + window
            came = plan[new] if new < len(plan) else None
            if came is not None:
                demand[came] = demand.get(came, 0) + 1
        else:
            demand = {}
            for key in plan[index + 1 : index + 1 + window]:
                if key is not None:
                    demand[key] = demand.get(key, 0) + 1
        self._demand_at = (index, demand)
        self.expect(demand)

    def expect(self, demand: Mapping[Hashable, int]) -> None:
        """The pending tests' needs: ``{key: how many of the next tests use it}``."""
        if self._closed:
            return
        for key in self._makers:
            need = demand.get(key, 0)
            helper = self._helpers.get(key)
            if helper is None:
                if need and len(self._helpers) < self.max_helpers:
                    helper = self._spawn(key)
                else:
                    continue
            low = min(self.depth, need)
            if helper.in_flight < low or helper.retiring >= helper.batch:
                # Top up to a batch beyond the depth, in the same write as the retirements.
                ahead = self.depth + (helper.batch if helper.batch > 1 else 0)
                for _ in range(min(ahead, need) - helper.in_flight):
                    helper.queue(("make",))
                    helper.in_flight += 1
                helper.flush()
            # Ready views no pending test needs go back for cleanup; a helper with nothing
            # out, nothing wanted and nothing on the way exits.
            while helper.in_flight > need and helper.ready():
                reply = helper.receive()
                helper.in_flight -= 1
                if reply[0] == "ok":
                    helper.queue(("retire", reply[1]))
            if not need and not helper.in_flight and not helper.out:
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
            helper.queue(("make",))
            helper.in_flight += 1
            helper.flush()
        if helper.ready():
            self.hits += 1
        else:
            self.misses += 1
        reply = helper.receive()
        helper.in_flight -= 1
        if reply[0] == "err":
            raise _error(reply[1])
        token = reply[1]
        view: T = helper.load(pickle.loads(reply[2]) if reply[3] else reply[2])
        if reply[4] and helper.maker.reset_counts is not None:
            helper.maker.reset_counts(1, 0)  # a reset view, handed out again
        helper.out += 1
        self._handed[id(view)] = (key, token)
        return view

    def retire(self, view: T) -> bool:
        """Hand ``view`` (from :meth:`take`, its test over and its snapshot taken) back for
        cleanup or reset. False when the pool did not hand it out (the caller cleans it).

        The message waits for the next write (:meth:`expect` sends a batch, or :meth:`close`):
        a retired view is never handed out again, so its cleanup can wait; a view that is reset
        goes back at once."""
        entry = self._handed.pop(id(view), None)
        if entry is None:
            return False
        key, token = entry
        helper = self._helpers[key]
        helper.out -= 1
        helper.queue(("retire", token))
        last = self._demand_at
        if last is not None and not helper.out and not last[1].get(key, 0):
            # The last test of this image (as far as the plan sees) is over: the helper
            # cleans up and exits now, not at the end of the session (its process and its
            # views would be counted by the tests that come next).
            self._stop(key)
            return True
        if helper.batch == 1:
            # A view that is reset is the next one handed out: no batching, or the helper
            # would make new ones (a whole copy of the image, for the copy backend) meanwhile.
            helper.flush()
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
        helper = _Helper(pid, to_child, to_parent, maker)
        helper.batch = 1 if maker.reset is not None else self.batch
        self._helpers[key] = helper
        return helper

    def _stop(self, key: Hashable) -> None:
        helper = self._helpers.pop(key)
        with contextlib.suppress(OSError):
            # The retirements still queued go with the quit: the helper cleans those views
            # like the others it holds.
            helper.queue(("quit",))
            helper.flush()
        os.close(helper.tx)
        try:
            # The helper answers the last requests, then cleans everything and exits.
            helper.drain()
        finally:
            os.close(helper.rx)
            _reap(helper.pid)


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
    if isinstance(payload, bytes):
        with contextlib.suppress(Exception):
            exc = pickle.loads(payload)
            if isinstance(exc, BaseException):
                return exc
        return PoolError("the view pool's helper sent an error that could not be read")
    return PoolError(str(payload))


def _send(fd: int, message: tuple[Any, ...]) -> None:
    data = marshal.dumps(message)
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
    """One message from a blocking pipe (the helper's side), None at end of file."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    data = _read_exactly(fd, _HEADER.unpack(header)[0])
    if data is None:
        return None
    message: tuple[Any, ...] = marshal.loads(data)
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
    if maker.started is not None:
        maker.started()
    state = _HelperState(maker, tx)
    try:
        while True:
            batch = _receive(rx)
            if batch is None:
                # The session died without asking (SIGKILL: its fds close before the death
                # signal comes). Leave everything as a killed session leaves its own views: its
                # mounts go with its namespace, and the next session sweeps its scratch.
                return
            if maker.begin is not None:
                # Retirements first (they only queue the view for the cleaner), then the
                # requests, several begun at once.
                for message in batch:
                    if message[0] == "retire":
                        state.handle(message)
                state.make_many(sum(1 for message in batch if message[0] == "make"))
                batch = tuple(message for message in batch if message[0] == "quit")
            for message in batch:
                if message[0] == "quit":
                    state.quit()
                    if maker.ending is not None:
                        with contextlib.suppress(Exception):
                            maker.ending()
                    if maker.reset is not None:
                        _send(tx, ("refused", state.refused))
                    return
                state.handle(message)
    finally:
        os.close(tx)


class _HelperState:  # pragma: no cover - runs in the helper
    """What one helper holds. Retired views are cleaned by a thread of the helper (the helper
    is a process of its own: no thread ever runs in the session): an unmount waits for an RCU
    grace period in the kernel (4 ms per ``umount2`` on a busy 2-core machine, measured), and
    a view asked for must not wait behind it. The cleaner runs at :data:`CLEANER_NICE`; past
    :data:`CLEAN_BACKLOG` waiting views the helper cleans in its loop instead. A maker that
    resets (the copy backend) resets in order, in the loop: the reset view is the next one
    handed out."""

    def __init__(self, maker: Maker[Any], tx: int) -> None:
        self.maker = maker
        self.tx = tx
        self.held: dict[int, Any] = {}
        self.spare: list[Any] = []
        self.count = 0
        #: Resets that failed (those views were discarded).
        self.refused = 0
        self._retired: queue.SimpleQueue[Any] | None = None
        self._cleaner: threading.Thread | None = None
        if maker.reset is None:
            self._retired = queue.SimpleQueue()
            self._cleaner = threading.Thread(target=self._clean, name="view-pool-cleaner")
            self._cleaner.start()

    def make_many(self, n: int) -> None:
        """Answer ``n`` requests in order, with up to :data:`AHEAD` views begun at once."""
        begin = self.maker.begin
        assert begin is not None
        while n and self.spare:  # reset views first, as handle() does (a maker may do both)
            self._send_view(self.spare.pop(), reused=True)
            n -= 1
        begun: collections.deque[Callable[[], Any] | Exception] = collections.deque()
        started = 0
        try:
            while started < n or begun:
                while started < n and len(begun) < AHEAD:
                    try:
                        begun.append(begin())
                    except Exception as exc:
                        begun.append(exc)
                    started += 1
                finish = begun.popleft()
                if isinstance(finish, Exception):
                    _reply_error(self.tx, finish)
                    continue
                try:
                    view = finish()
                except Exception as exc:
                    _reply_error(self.tx, exc)
                    continue
                self._send_view(view)
        finally:
            # A reply that could not be sent (the session is gone): the views begun after it
            # are finished and cleaned here, not left to the next session's sweep.
            for rest in begun:
                if not isinstance(rest, Exception):
                    with contextlib.suppress(Exception):
                        self.maker.discard(rest())

    def handle(self, message: tuple[Any, ...]) -> None:
        maker = self.maker
        if message[0] == "make":
            if self.spare:
                self._send_view(self.spare.pop(), reused=True)
                return
            try:
                view = maker.make()
            except Exception as exc:
                _reply_error(self.tx, exc)
                return
            self._send_view(view)
        elif message[0] == "retire":
            view = self.held.pop(message[1], None)
            if view is None:
                return
            if self._retired is not None and self._retired.qsize() < CLEAN_BACKLOG:
                self._retired.put(view)
                return
            if maker.reset is not None:
                try:
                    reset = maker.reset(view)
                except Exception:
                    reset = False
                if reset:
                    self.spare.append(view)
                    return
                self.refused += 1
            with contextlib.suppress(Exception):
                maker.discard(view)

    def _send_view(self, view: Any, *, reused: bool = False) -> None:
        maker = self.maker
        self.count += 1
        self.held[self.count] = view
        try:
            data = maker.export(view)
            try:
                marshal.dumps(data)
                reply = ("ok", self.count, data, False, reused)
            except ValueError:
                # Not plain values (an export left as the default, a dataclass): pickled,
                # slower to read back, still correct.
                reply = ("ok", self.count, pickle.dumps(data), True, reused)
        except Exception as exc:
            # The view cannot be sent: it is cleaned here and the test that asked gets why.
            self.held.pop(self.count)
            with contextlib.suppress(Exception):
                maker.discard(view)
            _reply_error(self.tx, exc)
            return
        _send(self.tx, reply)

    def quit(self) -> None:
        """Clean every view: those retired (the cleaner finishes them), those still held."""
        if self._retired is not None and self._cleaner is not None:
            self._retired.put(None)
            self._cleaner.join()
        for view in [*self.held.values(), *self.spare]:
            with contextlib.suppress(Exception):
                self.maker.discard(view)

    def _clean(self) -> None:
        assert self._retired is not None
        with contextlib.suppress(OSError):  # a thread's own priority: it is a task of its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CLEANER_NICE)
        while True:
            view = self._retired.get()
            if view is None:
                return
            with contextlib.suppress(Exception):
                self.maker.discard(view)


def _reply_error(tx: int, exc: Exception) -> None:  # pragma: no cover - runs in the helper
    try:
        # Unpickling it must work too (an exception with a custom constructor may not).
        data = pickle.dumps(exc)
        pickle.loads(data)
    except Exception:
        _send(tx, ("err", f"{type(exc).__name__}: {exc}"))
    else:
        _send(tx, ("err", data))
