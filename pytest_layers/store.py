"""The content-addressed layer store: layers, refs, build-cache keys, snapshots, locks, leases.

Layout (docs/dev/internals.md)::

    STORE/VERSION                       {"format": 1, "flavor": "overlay" | "marker"}
    STORE/layers/<chain_hex>/diff/      the layer tree, ready to be an overlay lowerdir
    STORE/layers/<chain_hex>/layer.json chain_id, diff_id, parent, name, created, size, files, ...
    STORE/layers/<chain_hex>/files.json per-path manifest, so that verify can name what changed
    STORE/layers/<chain_hex>/blob.tar   imports only: the original layer blob (its digest = diff_id)
    STORE/refs/names/<name>             latest chain id built for a layer name
    STORE/refs/cache/<key>              build-cache key -> chain id
    STORE/refs/snapshots/<test>/<n>     committed snapshots of a test, n increasing
    STORE/tmp/  STORE/locks/  STORE/leases/

Invariants: a layer directory appears only complete (it is assembled in ``tmp/`` and renamed
into place) and never changes afterwards; removal renames it back into ``tmp/`` before deleting,
so a process killed at any point leaves no partial layer where readers look. Leftovers in
``tmp/`` carry their owner's pid and start time and are swept once that process is gone.
"""

from __future__ import annotations

from pytest_layers._layerindex import (
    build_manifest,
    compare_manifests,
    count_files,
    disk_use,
)
from pytest_layers._mounts import filesystem_type
from pytest_layers._storecore import (
    DEFAULT_LOCK_TIMEOUT,
    FORMAT_VERSION,
    MAX_CHAIN_LENGTH,
    preflight,
    probe_flavor,
)
from pytest_layers._storegc import _StoreMaintenance
from pytest_layers._storerecords import (
    LayerInfo,
    Problem,
    PruneReport,
    SnapshotInfo,
)
from pytest_layers._storewrite import _StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_LOCK_TIMEOUT",
    "MAX_CHAIN_LENGTH",
    "Store",
    "preflight",
    "LayerInfo",
    "SnapshotInfo",
    "Problem",
    "PruneReport",
    "probe_flavor",
    "filesystem_type",
    "build_manifest",
    "compare_manifests",
    "count_files",
    "disk_use",
]


class Store(_StoreWriter, _StoreMaintenance):
    """A layer store rooted at ``root``; creates the layout and probes the flavor when new.

    The store is its owner's alone unless ``shared_group`` names the group whose members share
    it (docs/concepts/security.md): a store, or any directory in it, owned by another user (or
    group) or writable by others is refused, and so is a non-empty directory that is not a
    store. On a read-only filesystem the store opens read-only (:attr:`read_only`): reading
    works, writing raises.

    Raises :class:`errors.StoreError` when the directory cannot be used or written and
    :class:`errors.StoreFormatError` when ``VERSION`` names a format this version cannot read.
    """

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The public classes keep their public module in reprs, pickles and the reference.
for _cls in (LayerInfo, SnapshotInfo, Problem, PruneReport):
    _cls.__module__ = __name__
del _cls
