"""Mount backends: how a rootfs view of an image is materialised.

One module per backend behind the :class:`~pytest_layers.backends.base.Backend` protocol;
:mod:`~pytest_layers.backends.detect` picks one.
"""

from __future__ import annotations

from pytest_layers.backends.base import Backend, View

__all__ = ["Backend", "View"]
