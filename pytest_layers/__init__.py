"""pytest-layers: Docker-style layered filesystems for pytest."""

from __future__ import annotations

from pytest_layers.changeset import Change
from pytest_layers.definitions import Layer, layer, layer_from_path, oci_image
from pytest_layers.diffdata import Diff, DiffEntry
from pytest_layers.errors import LayersError
from pytest_layers.rootfs import Rootfs

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
