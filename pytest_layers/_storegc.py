"""Keeping the store in order: ``prune`` (snapshots beyond the kept number, layers no ref
or lease reaches, dead processes' leftovers) and ``verify`` (every stored layer against
its index and digests)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from pytest_layers import (
    errors,
    layertar,
)
from pytest_layers._layerindex import (
    build_manifest,
    compare_manifests,
    disk_use,
)
from pytest_layers._storecore import _blob_digest, _rmtree
from pytest_layers._storelocks import _StoreLock
from pytest_layers._storerecords import (
    _CHAIN_RE,
    _MAX_FILES_JSON,
    LayerInfo,
    Problem,
    PruneReport,
    SnapshotInfo,
    _BadJson,
    _hex,
    _read_json,
    _ref_filename,
)
from pytest_layers._storerefs import _StoreRefs


class _StoreMaintenance(_StoreRefs):
    """``prune`` and ``verify`` (see :class:`pytest_layers.store.Store`)."""

    def prune(self, keep_snapshots: int = 3) -> PruneReport:
        """Drop snapshots beyond ``keep_snapshots`` per test, then every layer that no ref
        (name, cache key, snapshot) and no live lease reaches, and leftovers of dead processes."""
        if keep_snapshots < 0:
            raise ValueError(f"keep_snapshots must be >= 0, not {keep_snapshots}")
        self._writable()
        report = PruneReport()
        doomed: list[Path] = []
        mode = self.access.lock_mode
        with _StoreLock(str(self._locks / "prune.lock"), timeout=600, mode=mode):
            with _StoreLock(str(self._locks / "snapshots.lock"), timeout=60, mode=mode):
                by_test: dict[str, list[SnapshotInfo]] = {}
                for snap in self.snapshots():
                    by_test.setdefault(snap.test, []).append(snap)
                for test, snaps in by_test.items():
                    directory = self.root / "refs" / "snapshots" / _ref_filename(test)
                    with self._snapshot_dir(directory) as dfd:
                        for snap in snaps[: max(0, len(snaps) - keep_snapshots)]:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(str(snap.n), dir_fd=dfd)
                            report.removed_snapshots.append(snap.numbered_ref)
            with self._gc.hold(exclusive=True):
                roots = set(self.names().values())
                for path in (self.root / "refs" / "cache").iterdir():
                    data = self._read_ref(path)
                    if data:
                        roots.add(data["chain_id"])
                for snap in self.snapshots():
                    roots.add(snap.chain_id)
                    if snap.with_init is not None:
                        roots.add(snap.with_init)
                leased, report.removed_leases = self._live_leases()
                roots |= leased
                reachable = self._closure(roots)
                for chain_id in self.layers():
                    if chain_id in reachable:
                        report.kept_layers += 1
                        continue
                    victim = self._new_tmp_path("prune")
                    # Out of layers/ in one rename: a kill leaves it in tmp/ for the next sweep.
                    try:
                        os.rename(self._layers / _hex(chain_id), victim)
                    except PermissionError:
                        # Another member's layer in a shared store: theirs to prune.
                        self._warn(f"{self._layers / _hex(chain_id)}: not yours to remove (kept)")
                        continue
                    self._info_cache.pop(chain_id, None)
                    doomed.append(victim)
                    report.removed_layers.append(chain_id)
            # Directories that lost their layer.json (damaged by hand) are not layers either.
            for name in os.listdir(self._layers):
                entry = self._layers / name
                with contextlib.suppress(OSError):
                    if not stat.S_ISDIR(os.lstat(entry).st_mode):
                        entry.unlink()  # a stray file or symlink: the entry goes, no target
                    elif not os.path.lexists(entry / "layer.json"):
                        victim = self._new_tmp_path("prune")
                        os.rename(entry, victim)
                        doomed.append(victim)
        # Disk use, as du counts it (what removing these trees gives back, hard links to kept
        # layers aside); measured once they are out of layers/ and nobody can reach them.
        report.freed_bytes = disk_use(doomed)
        for victim in doomed:
            with contextlib.suppress(PermissionError):  # a shared store's: left for its owner
                _rmtree(victim)
        report.removed_tmp = self._sweep_tmp()
        return report

    def _closure(self, roots: Iterable[str]) -> set[str]:
        reachable: set[str] = set()
        stack = [r for r in roots if _CHAIN_RE.fullmatch(r)]
        while stack:
            chain_id = stack.pop()
            if chain_id in reachable:
                continue
            reachable.add(chain_id)
            try:
                info = self.layer_info(chain_id)
            except errors.LayersError:
                continue
            if info.parent:
                stack.append(info.parent)
            if info.alias_of:
                stack.append(info.alias_of)
        return reachable

    def verify(self, chain_ids: Sequence[str] | None = None) -> list[Problem]:
        """Re-hash stored layers (all, or ``chain_ids``) and report every inconsistency, naming
        the path inside the layer when one changed. An empty list means all is well."""
        problems: list[Problem] = []
        hashed: set[str] = set()
        if chain_ids is None:
            # Entries that are not layer directories (a symlink put in place of one) as well.
            chain_ids = sorted(
                c
                for c, e in self._layer_names()
                if not e.is_dir(follow_symlinks=False) or os.path.lexists(e.path + "/layer.json")
            )
        for chain_id in chain_ids:
            problems.extend(self._verify_one(chain_id, hashed))
        return problems

    def _verify_one(self, chain_id: str, hashed: set[str]) -> list[Problem]:
        self._info_cache.pop(chain_id, None)  # verify reads what is on disk now
        try:
            info = self.layer_info(chain_id)
        except errors.LayersError as exc:
            return [Problem(chain_id, None, None, str(exc))]
        layer_root = self._layers / _hex(chain_id)
        problems = []

        def problem(path: str | None, message: str) -> None:
            problems.append(Problem(chain_id, info.name, path, message))

        if info.chain_id != chain_id:
            problem(None, f"layer.json names chain id {info.chain_id}")
        parent_ids: list[str] = []
        if info.parent is not None:
            try:
                parent_ids = [p.diff_id for p in self.chain(info.parent)]
            except errors.LayersError as exc:
                problem(None, f"parent {info.parent} is missing or damaged: {exc}")
                parent_ids = []
        if info.parent is None or parent_ids:
            expected_chain = layertar.chain_id([*parent_ids, info.diff_id])
            if expected_chain != chain_id:
                problem(
                    None, f"diff_id {info.diff_id} on its parent gives chain id {expected_chain}"
                )

        if info.alias_of is not None:
            # Its tree is the target's: check they agree, then hash the target (once).
            self._info_cache.pop(info.alias_of, None)
            try:
                target = self.layer_info(info.alias_of)
            except errors.LayersError as exc:
                problem(None, f"alias of {info.alias_of}, which is missing or damaged: {exc}")
                return problems
            if target.diff_id != info.diff_id:
                problem(
                    None,
                    f"alias of {target.chain_id} with diff_id {target.diff_id}, "
                    f"but the alias says {info.diff_id}",
                )
            if (layer_root / "diff").exists():
                problem(None, "an alias must not have a tree of its own")
            chain_id, info = target.chain_id, target
            layer_root = self._layers / _hex(chain_id)
        if chain_id in hashed:
            return problems
        hashed.add(chain_id)
        expected = info.tree_digest or info.diff_id
        try:
            actual = layertar.layer_diff_id(layer_root / "diff", flavor=self.flavor)
        except (OSError, errors.LayersError) as exc:
            actual = None
            problem(None, f"cannot read the layer tree: {exc}")
        if actual is not None and actual != expected:
            problems.extend(self._explain(info, layer_root, expected, actual))
        if info.blob is not None:
            try:
                blob_digest = _blob_digest(info.blob, in_store=True)
            except (OSError, _BadJson) as exc:
                problem(info.blob.name, f"original blob unreadable: {exc}")
            else:
                if blob_digest != info.diff_id:
                    problem(
                        info.blob.name,
                        f"original blob hashes to {blob_digest}, not its DiffID {info.diff_id}",
                    )
        return problems

    def _explain(
        self, info: LayerInfo, layer_root: Path, expected: str, actual: str
    ) -> list[Problem]:
        head = f"content digest is {actual}, expected {expected}"
        try:
            stored = _read_json(layer_root / "files.json", limit=_MAX_FILES_JSON)
        except (OSError, _BadJson) as exc:
            return [Problem(info.chain_id, info.name, None, f"{head}; files.json unusable ({exc})")]
        try:
            current = build_manifest(layer_root / "diff")
        except OSError as exc:
            return [
                Problem(info.chain_id, info.name, None, f"{head}; cannot walk the tree ({exc})")
            ]
        changes = compare_manifests(stored, current)
        if not changes:
            return [
                Problem(
                    info.chain_id,
                    info.name,
                    None,
                    f"{head}, but files.json lists no difference (it may have been altered too)",
                )
            ]
        return [Problem(info.chain_id, info.name, path, what) for path, what in changes]
