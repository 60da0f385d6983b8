"""pytest-layers: Docker-style layered filesystems for pytest."""

from __future__ import annotations

from pytest_layers.errors import LayersError

__all__ = ["LayersError"]
