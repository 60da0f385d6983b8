"""pytest-layers: Docker-style layered filesystems for pytest."""

from __future__ import annotations

from pytest_layers.changeset import Change
from pytest_layers.definitions import Layer, layer
from pytest_layers.errors import LayersError
from pytest_layers.rootfs import Rootfs

__all__ = ["layer", "Layer", "Rootfs", "Change", "LayersError"]
