"""The canonical tar stream of a layer, its digests, and safe application of OCI layer tars.

Writing (``write_layer_tar``, ``layer_diff_id``) walks a stored layer directory and produces the
canonical OCI changeset tar (docs/concepts) as a stream: headers are built here rather than
with ``tarfile.TarInfo.tobuf`` (several times faster, and independent of the running Python's
``tarfile`` version, so the same tree hashes the same everywhere); the bytes are what
``tarfile`` 3.11 would write for the same ``TarInfo`` objects in ``PAX_FORMAT``, except that
directory names carry no trailing slash, non-UTF-8 values go without a ``hdrcharset=BINARY``
record (see ``_entry_bytes``), and the archive ends after the two zero blocks, without padding
to a 10 KiB record (as Go's ``archive/tar``, which docker and umoci use, does).

Applying (``apply_layer_tar``) parses with ``tarfile`` but never extracts with it: every path
is resolved here, one component at a time from an ``O_PATH`` descriptor of the root, so that no
symlink is ever followed by the kernel. Absolute symlinks resolve relative to the root (as in a
chroot); a ``..`` that would climb above the root is refused.
"""

from __future__ import annotations

from pytest_layers._ocirules import OPAQUE_MARKER, WHITEOUT_PREFIX, Flavor
from pytest_layers._tarapply import ApplyStats, NeedsLowerLayers, apply_layer_tar
from pytest_layers._tarlimits import Limits, parse_size
from pytest_layers._tarwrite import (
    DEFAULT_EPOCH,
    WRITTEN_BUDGET,
    FileHashes,
    Visitor,
    Written,
    WrittenFiles,
    chain_id,
    chain_ids,
    clamp_epoch,
    kept_xattr_items,
    layer_diff_id,
    stream_layer,
    write_layer_tar,
)
from pytest_layers.errors import InvalidLayerError as InvalidLayerError
from pytest_layers.errors import UnsafeEntryError as UnsafeEntryError

__all__ = [
    "Flavor",
    "DEFAULT_EPOCH",
    "clamp_epoch",
    "write_layer_tar",
    "layer_diff_id",
    "chain_id",
    "chain_ids",
    "apply_layer_tar",
    "ApplyStats",
    "Limits",
    "NeedsLowerLayers",
    "FileHashes",
    "Visitor",
    "stream_layer",
    "Written",
    "WrittenFiles",
    "WRITTEN_BUDGET",
    "kept_xattr_items",
    "parse_size",
    "WHITEOUT_PREFIX",
    "OPAQUE_MARKER",
]

# The public classes keep their public module in reprs, pickles and the reference.
for _cls in (ApplyStats, Limits, NeedsLowerLayers, Written):
    _cls.__module__ = __name__
del _cls
