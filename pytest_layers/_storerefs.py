"""The store's refs: layer names, build-cache keys, ``--layers-rebuild`` marks, build
locks, snapshots of tests, and resolving any of them (or a chain-id prefix) to a chain id."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import filelock

from pytest_layers import (
    _dirfd,
    errors,
)
from pytest_layers._storecore import DEFAULT_LOCK_TIMEOUT, _StoreCore
from pytest_layers._storelocks import (
    _BuildLock,
    _StoreLock,
)
from pytest_layers._storerecords import (
    _HEX_RE,
    _O_READ,
    SnapshotInfo,
    _read_json,
    _ref_filename,
    _write_new,
)


class _StoreRefs(_StoreCore):
    """Refs under ``STORE/refs/`` (see :class:`pytest_layers.store.Store`)."""

    def _ref_path(self, kind: str, value: str) -> Path:
        return self.root / "refs" / kind / _ref_filename(value)

    def _read_ref(self, path: Path, *, dir_fd: int | None = None) -> dict[str, Any] | None:
        """A ref's record, or None when it is absent or not a ref (a stray entry, noted in
        :attr:`warnings`: reading the store never stops at one)."""
        try:
            data = _read_json(path.name if dir_fd is not None else path, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            self._warn(f"{path}: {exc} (skipped)")
            return None
        if not isinstance(data.get("chain_id"), str):
            self._warn(f"{path}: not a ref, it names no chain id (skipped)")
            return None
        return data

    def set_name(self, name: str, chain_id: str) -> None:
        """Point ``refs/names/<name>`` at ``chain_id`` (the latest build of that name)."""
        self._writable()
        self._require(chain_id)
        self._write_json_atomic(self._ref_path("names", name), {"name": name, "chain_id": chain_id})
        self._referenced(chain_id)

    def get_name(self, name: str) -> str | None:
        """The chain id ``refs/names/<name>`` points at, or None."""
        data = self._read_ref(self._ref_path("names", name))
        return data["chain_id"] if data and data.get("name") == name else None

    def names(self) -> dict[str, str]:
        """Every layer name -> chain id."""
        out = {}
        for path in sorted((self.root / "refs" / "names").iterdir()):
            data = self._read_ref(path)
            if data and isinstance(data.get("name"), str):
                out[data["name"]] = data["chain_id"]
        return out

    def cache_get(self, key: str) -> str | None:
        """The chain id built for ``key``, or None (also when that layer is no longer stored)."""
        data = self._read_ref(self._ref_path("cache", key))
        if not data or data.get("key") != key or not self.has_layer(data["chain_id"]):
            return None
        return cast(str, data["chain_id"])

    def cache_set(self, key: str, chain_id: str) -> None:
        """Record that build-cache ``key`` produced ``chain_id``."""
        self._writable()
        self._require(chain_id)
        self._write_json_atomic(self._ref_path("cache", key), {"key": key, "chain_id": chain_id})
        self._referenced(chain_id)

    def rebuild_marked(self, key: str, token: str) -> bool:
        """Whether the ``--layers-rebuild`` run ``token`` already rebuilt build-cache ``key``
        (xdist workers share the run's token, so each key is rebuilt once per run)."""
        try:
            data = _read_json(self._ref_path("rebuild", key))
        except (OSError, ValueError):
            return False
        return data.get("key") == key and data.get("token") == token

    def mark_rebuilt(self, key: str, token: str) -> None:
        """Record that the ``--layers-rebuild`` run ``token`` rebuilt ``key``."""
        self._writable()
        self._write_json_atomic(self._ref_path("rebuild", key), {"key": key, "token": token})

    def build_lock(self, key: str, timeout: float = DEFAULT_LOCK_TIMEOUT) -> filelock.BaseFileLock:
        """A cross-process lock for building ``key``: hold it while checking the cache,
        building and recording, so concurrent builders of one key build it once."""
        self._writable()
        path = self._locks / f"build-{_ref_filename(key)}.lock"
        return _BuildLock(str(path), key=key, timeout=timeout, mode=self.access.lock_mode)

    def add_snapshot(
        self, test: str, chain_id: str, keep: int, *, with_init: str | None = None
    ) -> str:
        """Record ``chain_id`` as the newest snapshot of ``test`` and drop all but the newest
        ``keep``; returns the ref ``snapshot:<test>``. ``with_init`` is the chain the test saw
        (image, init layer, rw layer), kept alongside (see :class:`SnapshotInfo`)."""
        if keep < 1:
            raise ValueError(
                f"keep must be at least 1 to keep the snapshot being added, not {keep}"
            )
        self._writable()
        self._require(chain_id)
        if with_init is not None:
            self._require(with_init)
        directory = self.root / "refs" / "snapshots" / _ref_filename(test)
        mode = self.access.lock_mode
        with _StoreLock(str(self._locks / "snapshots.lock"), timeout=60, mode=mode):
            self.access.make_dir(directory, exist_ok=True)
            with self._snapshot_dir(directory) as dfd:
                last = self._read_seq(dfd)
                numbers = self._snapshot_numbers(dfd)
                n = max([last, *numbers]) + 1
                data: dict[str, Any] = {
                    "test": test,
                    "n": n,
                    "chain_id": chain_id,
                    "created": time.time(),
                }
                if with_init is not None:
                    data["with_init"] = with_init
                tmp = self._new_tmp_path("ref")
                _write_new(tmp, json.dumps(data, indent=1, sort_keys=True) + "\n", self._file_mode)
                os.replace(tmp, str(n), dst_dir_fd=dfd)
                # The counter survives a prune that removes every snapshot, so ids never repeat.
                tmp = self._new_tmp_path("ref")
                _write_new(tmp, f"{n}\n", self._file_mode)
                os.replace(tmp, ".seq", dst_dir_fd=dfd)
                for old in sorted([*numbers, n])[:-keep]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(old), dir_fd=dfd)
        self._referenced(chain_id)
        if with_init is not None:
            self._referenced(with_init)
        return f"snapshot:{test}"

    @staticmethod
    def _read_seq(dfd: int) -> int:
        try:
            with open(os.open(".seq", _O_READ, dir_fd=dfd), "rb") as f:
                return int(f.read(32))
        except (OSError, ValueError):
            return 0  # absent or damaged: the listed numbers still keep ids increasing

    @contextlib.contextmanager
    def _snapshot_dir(self, directory: Path) -> Iterator[int]:
        """The fd of a test's snapshot directory: opened without following a symlink and
        checked like every directory of the store, so that a symlink planted there never
        makes a commit or a prune write or delete elsewhere."""
        try:
            fd = os.open(directory, _dirfd.O_DIR)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            self.access.check(directory, os.lstat(directory))
            raise
        try:
            self.access.check(directory, os.fstat(fd))
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _snapshot_numbers(dfd: int) -> list[int]:
        return sorted(int(n) for n in os.listdir(dfd) if n.isdigit())

    def snapshots(self, test: str | None = None) -> list[SnapshotInfo]:
        """Snapshots of ``test`` (or of every test), by test then oldest first. A stray entry
        in ``refs/snapshots`` is skipped, with a line in :attr:`warnings`."""
        base = self.root / "refs" / "snapshots"
        dirs = [base / _ref_filename(test)] if test is not None else sorted(base.iterdir())
        out = []
        for directory in dirs:
            try:
                with self._snapshot_dir(directory) as dfd:
                    for n in self._snapshot_numbers(dfd):
                        data = self._read_ref(directory / str(n), dir_fd=dfd)
                        if data is None or (test is not None and data.get("test") != test):
                            continue
                        with_init = data.get("with_init")
                        try:
                            snap = SnapshotInfo(
                                test=str(data["test"]),
                                n=n,
                                chain_id=data["chain_id"],
                                created=float(data["created"]),
                                with_init=with_init if isinstance(with_init, str) else None,
                            )
                        except (KeyError, TypeError, ValueError):
                            self._warn(f"{directory / str(n)}: not a snapshot record (skipped)")
                            continue
                        out.append(snap)
            except FileNotFoundError:
                continue
            except (OSError, errors.LayersError) as exc:
                self._warn(f"{directory}: not a snapshot directory ({exc}) (skipped)")
                continue
        out.sort(key=lambda s: (s.test, s.n))
        return out

    def snapshot(self, ref: str) -> SnapshotInfo | None:
        """The snapshot ``ref`` names: ``snapshot:NODEID`` (the latest) or
        ``snapshot:NODEID@N`` (number N); None when ``ref`` is not a snapshot ref.
        Raises :class:`errors.LayerNotFoundError` for a snapshot ref that names none."""
        if not ref.startswith("snapshot:"):
            return None
        test = ref[len("snapshot:") :]
        snaps = self.snapshots(test)
        number: int | None = None
        if not snaps:
            # A node id may itself contain "@" (a parameter); only fall back to "@N" when the
            # whole string names no test.
            m = re.fullmatch(r"(.+)@([0-9]+)", test)
            if m is not None:
                test, number = m.group(1), int(m.group(2))
                snaps = self.snapshots(test)
        if not snaps:
            tests = sorted({s.ref for s in self.snapshots()})
            raise errors.LayerNotFoundError(
                ref, known=tests, hint=f"no snapshot of test {test!r} in {self.root}"
            )
        if number is None:
            return snaps[-1]
        for snap in snaps:
            if snap.n == number:
                return snap
        kept = ", ".join(s.numbered_ref for s in snaps)
        raise errors.LayerNotFoundError(
            ref, hint=f"test {test!r} has no snapshot {number} any more; kept: {kept}"
        )

    def resolve(self, ref: str) -> str:
        """Chain id of ``ref``: a layer name, ``sha256:HEX`` or a unique hex prefix of a chain id
        or of a diff_id, ``snapshot:NODEID`` (that test's latest snapshot) or
        ``snapshot:NODEID@N`` (its snapshot number N)."""
        snap = self.snapshot(ref)
        if snap is not None:
            return self._existing(snap.chain_id, ref)
        if ref.startswith("sha256:"):
            return self._by_prefix(ref, ref[7:])
        chain_id = self.get_name(ref)
        if chain_id is not None:
            return self._existing(chain_id, ref)
        if _HEX_RE.fullmatch(ref):
            return self._by_prefix(ref, ref)
        raise errors.LayerNotFoundError(
            ref,
            known=list(self.names()),
            hint="a ref is a layer name, sha256:HEX, a unique hex prefix of a chain id or "
            "diff_id, snapshot:NODEID or snapshot:NODEID@N",
        )

    def _existing(self, chain_id: str, ref: str) -> str:
        if not self.has_layer(chain_id):
            raise errors.LayerNotFoundError(
                ref, hint=f"it points to {chain_id}, which is no longer in the store; rebuild it"
            )
        return chain_id

    def _by_prefix(self, ref: str, prefix: str) -> str:
        """The one stored layer whose chain id starts with ``prefix``, else the one whose
        diff_id does. (A base layer's chain id is its diff_id; the same diff_id on other
        parents is other images, so those are listed as candidates, not picked.)"""
        if not _HEX_RE.fullmatch(prefix) or len(prefix) > 64:
            raise errors.LayerNotFoundError(ref, hint="sha256: must be followed by hex digits")
        layers = self.layers()
        matches = [c for c in layers if c[7:].startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise errors.AmbiguousRefError(ref, matches)
        by_diff: dict[str, tuple[str, str]] = {}  # chain id -> (diff_id, label)
        for chain_id in layers:
            with contextlib.suppress(errors.LayersError):
                info = self.layer_info(chain_id)
                if info.diff_id[7:].startswith(prefix):
                    by_diff[chain_id] = (info.diff_id, f"{chain_id} ({info.name or info.source})")
        if len(by_diff) == 1:
            return next(iter(by_diff))
        if by_diff:
            one_diff = len({diff for diff, _ in by_diff.values()}) == 1
            raise errors.AmbiguousRefError(
                ref,
                [label for _, label in by_diff.values()],
                hint="that diff_id is the top layer of several images; give one of their chain ids"
                if one_diff
                else "",
            )
        raise errors.LayerNotFoundError(
            ref,
            known=list(self.names()),
            hint=f"no stored chain id or diff_id starts with {prefix}",
        )
