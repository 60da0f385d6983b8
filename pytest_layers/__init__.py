"""pytest-layers: Docker-style layered filesystems for pytest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_layers.build import Layer
from pytest_layers.changeset import Change
from pytest_layers.diffdata import Diff, DiffEntry
from pytest_layers.errors import LayersError
from pytest_layers.rootfs import Rootfs

if TYPE_CHECKING:
    from pytest_layers.definitions import layer, layer_from_path, oci_image

__all__ = [
    "layer",
    "oci_image",
    "layer_from_path",
    "Layer",
    "Rootfs",
    "Change",
    "LayersError",
    "Diff",
    "DiffEntry",
]

# The decorators make pytest fixtures, so they live in the glue; importing them on first use
# keeps `import pytest_layers` (the engine, the CLI) free of pytest.
_GLUE = frozenset({"layer", "oci_image", "layer_from_path"})


def __getattr__(name: str) -> Any:
    if name in _GLUE:
        from pytest_layers import definitions

        return getattr(definitions, name)
    raise AttributeError(f"module 'pytest_layers' has no attribute {name!r}")
