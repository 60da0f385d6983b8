"""Changes between an image and a new tree, and writing them as a layer directory.

An image is a chain of stored layer directories; :class:`ImageView` reads their union the way
overlayfs would, without mounting anything. A test's writes reach us in one of two shapes: the
upper directory of an overlay or fuse-overlayfs mount (:func:`changes_from_upper`), or a full
copy of the image that the test modified (:func:`changes_from_tree`, the copy backend). Both give
the same minimal list of :class:`Entry` for the same operations, and :func:`write_layer` turns
that list into a self-contained layer directory (no opaque markers, docs/concepts), so the layer's
canonical tar depends only on the parent tree and the new tree, never on the backend.

Paths are relative POSIX strings without a leading slash (``"etc/app.conf"``); non-UTF-8 names
travel as ``surrogateescape`` strings, which every ``os`` call here accepts as they are.
"""

from __future__ import annotations

from pytest_layers._changebase import (
    Change,
    Entry,
    LayerStats,
    ctime_mark,
    kept_xattrs,
    open_source,
)
from pytest_layers._changelist import (
    changes_from_tree,
    changes_from_upper,
    layer_changes,
    to_changes,
)
from pytest_layers._datacopy import data_extents
from pytest_layers._imageview import ImageView
from pytest_layers._layerwriter import TreeSettler, settle_tree, write_layer

__all__ = [
    "Change",
    "Entry",
    "ImageView",
    "LayerStats",
    "changes_from_upper",
    "changes_from_tree",
    "write_layer",
    "settle_tree",
    "TreeSettler",
    "to_changes",
    "layer_changes",
    "kept_xattrs",
    "ctime_mark",
    "open_source",
    "data_extents",
]

# The public classes keep their public module in reprs, pickles and the reference.
for _cls in (Change, Entry, ImageView, LayerStats, TreeSettler):
    _cls.__module__ = __name__
del _cls
