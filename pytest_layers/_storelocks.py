"""The store's locks and leases: per-file locks that never open through a symlink
(:class:`_StoreLock`, a build key's :class:`_BuildLock`), the store-wide shared/exclusive
``gc.lock`` (:class:`_GcLock`), and leases (:class:`_Lease`: chain ids a live process uses,
which ``prune`` keeps)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import filelock

from pytest_layers import _access, _proctag, errors
from pytest_layers._storerecords import (
    _MAX_LEASE,
    _BadJson,
    _read_store_bytes,
    _TooLarge,
)


def _planted(path: str | os.PathLike[str], exc: OSError) -> errors.StoreError:
    """The error for a lock or lease name that cannot be opened as our own file."""
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        owner = os.geteuid()
    if owner != os.geteuid() and exc.errno != errno.ELOOP:
        return errors.StoreError(
            exc.errno or errno.EACCES,
            f"{path} belongs to {_access.owner_name(owner)}, not to you "
            f"({_access.owner_name(os.geteuid())}): remove it as its owner (it is only a lock), "
            "or use a store of your own (--layers-store PATH)",
            os.fspath(path),
        )
    why = "a symlink" if exc.errno == errno.ELOOP else f"unusable ({exc.strerror or exc})"
    return errors.StoreError(
        exc.errno or errno.EPERM,
        f"{path} is {why}, where the store keeps a lock file: someone planted it; remove it "
        "(rm) and run again",
        os.fspath(path),
    )


class _StoreLock(filelock.FileLock):
    """A store lock: created with the store's lock mode, never opened through a symlink (the
    pinned filelock opens lock files with ``O_NOFOLLOW``; see pyproject.toml), and an entry
    planted in its place is a one-line :class:`errors.StoreError`."""

    def __init__(self, lock_file: str, *, timeout: float = -1, mode: int = 0o600) -> None:
        super().__init__(lock_file, timeout=timeout, mode=mode)

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().acquire(*args, **kwargs)
        except filelock.Timeout:
            raise
        except OSError as exc:
            if isinstance(exc, errors.LayersError):
                raise
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
                raise _planted(self.lock_file, exc) from None
            raise


class _BuildLock(_StoreLock):
    """A build-cache key's lock whose timeout error names the key and the lock file."""

    def __init__(self, lock_file: str, *, key: str, timeout: float, mode: int = 0o600) -> None:
        super().__init__(lock_file, timeout=timeout, mode=mode)
        self.key = key

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().acquire(*args, **kwargs)
        except filelock.Timeout as exc:
            waited = kwargs.get("timeout", args[0] if args else self.timeout)
            raise errors.LockTimeoutError(self.key, self.lock_file, waited) from exc


class _GcLock:
    """Store-wide shared/exclusive lock: prune holds it exclusively while it decides and renames
    layers away; adding a layer or a lease holds it shared, so a layer cannot vanish between
    "it exists" and "it is leased". (filelock has no shared mode, hence plain flock.)"""

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool) -> Iterator[None]:
        # O_NOFOLLOW: a symlink planted as gc.lock must not make us create or open its target.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, self.mode)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise _planted(self.path, exc) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _planted(self.path, OSError(errno.EINVAL, "not a regular file"))
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != self.mode:
                os.fchmod(fd, self.mode)  # the umask must not keep other members out
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing drops the flock


class _Lease:
    """A file under ``leases/`` naming chain ids in use, valid while its filelock is held.

    The file is a journal of ``+<chain id>`` / ``-<chain id>`` lines, only ever appended to:
    an append is one small ``write`` (atomic with ``O_APPEND``), where rewriting the file and
    renaming it over the old one costs a data flush on ext4 each time.
    """

    def __init__(self, store_root: Path, mode: int, chain_ids: Iterable[str]) -> None:
        self.chain_ids: set[str] = set()
        base = store_root / "leases" / f"{_proctag.store_tag()}-{secrets.token_hex(6)}"
        self.path = base.with_suffix(".held")
        # The lock is taken before the file exists, so no sweeper ever sees a lease whose
        # lock is free although its owner is alive.
        self.lock = _StoreLock(str(base.with_suffix(".lock")), mode=mode)
        self.lock.acquire(timeout=10)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, mode)
        os.fchmod(self.fd, mode)
        self.add(chain_ids)

    def add(self, chain_ids: Iterable[str]) -> None:
        new = set(chain_ids) - self.chain_ids
        if new:
            os.write(self.fd, "".join(f"+{c}\n" for c in sorted(new)).encode())
            self.chain_ids |= new

    def drop(self, chain_id: str) -> None:
        if chain_id in self.chain_ids:
            os.write(self.fd, f"-{chain_id}\n".encode())
            self.chain_ids.discard(chain_id)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        lock_path = Path(self.lock.lock_file)
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        self.lock.release()


def _read_lease(path: Path) -> set[str]:
    """The chain ids the lease or pin ``path`` holds; none when it is gone or not a regular
    file. One larger than any lease could grow is an error, not an empty lease: its owner
    may be alive, and what it names must not be pruned."""
    held: set[str] = set()
    try:
        text = _read_store_bytes(path, _MAX_LEASE).decode("utf-8")
    except _TooLarge as exc:
        raise errors.StoreError(
            errno.EFBIG,
            f"{path} is {exc}, more than any lease or pin holds: someone planted it; "
            "remove it (rm) and run again",
            os.fspath(path),
        ) from None
    except (OSError, _BadJson, UnicodeDecodeError):
        return held
    for line in text.split("\n")[:-1]:  # a torn last line has no newline yet
        if line[:1] == "+":
            held.add(line[1:])
        elif line[:1] == "-":
            held.discard(line[1:])
    return held


def _release_lease(lease: _Lease | None) -> None:
    if lease is not None:
        lease.release()
