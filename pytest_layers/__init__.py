"""pytest-layers: Docker-style layered filesystems for pytest."""

from __future__ import annotations

from pytest_layers.changeset import Change
from pytest_layers.definitions import Layer, layer, oci_image
from pytest_layers.errors import LayersError
from pytest_layers.rootfs import Rootfs

__all__ = ["layer", "oci_image", "Layer", "Rootfs", "Change", "LayersError"]
