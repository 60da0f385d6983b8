"""A syrupy extension that stores a ``rootfs.diff(details=True)`` as its text form.

One ``.txt`` file per snapshot, one line per changed path (``Diff.to_text()``), so a
snapshot update reads in a code review like the change it records. Imported only by the
tests that use it (``snapshot.use_extension(DiffExtension)``); syrupy must be installed.
See docs/how-to/snapshot-testing.md.
"""

from __future__ import annotations

from typing import Any

from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from pytest_layers.diffdata import Diff

__all__ = ["DiffExtension"]


class DiffExtension(SingleFileSnapshotExtension):
    """Snapshots a :class:`~pytest_layers.Diff` (or plain text) as a ``.txt`` file."""

    _write_mode = WriteMode.TEXT
    file_extension = "txt"

    def serialize(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, Diff):
            return data.to_text()
        if isinstance(data, str):
            return data
        raise TypeError(
            f"DiffExtension snapshots a rootfs.diff(details=True) result or text, not "
            f"{type(data).__name__}; for other data use syrupy's default extension"
        )
