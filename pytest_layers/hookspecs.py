"""Extension hooks of pytest-layers.

Implement them in a ``conftest.py`` or a plugin. They are registered with ``pytest_addhooks``
by the plugin, which also ships the default implementation of every "choose one" hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pytest_layers.build import Layer

hookspec = pluggy.HookspecMarker("pytest")


@hookspec(firstresult=True)
def pytest_layers_choose_backend(config: Any, candidates: Sequence[str]) -> Any:
    """Choose the mount backend for the session.

    ``candidates`` lists the backend names to consider, fastest first, as allowed by
    ``--layers-backend`` (``"overlay"``, ``"overlay-userns"``, ``"fuse"``, ``"copy"``).
    Return a ``(backend, reason)`` tuple, where ``backend`` satisfies
    ``pytest_layers.backends.base.Backend`` and ``reason`` says in one line why faster
    candidates were not used (empty when the first one works), or ``None`` to let the next
    implementation decide. The report header shows the reason's first clause (up to `` (``,
    ``;`` or ``. ``), or its ``short`` attribute when it is a
    ``pytest_layers.backends.detect.Reason``; ``-v`` shows it in full. Called once, in the
    controller process, before any test runs.
    """


@hookspec
def pytest_layers_init(item: Any) -> Mapping[str, str | bytes] | None:
    """Return extra files for ``item``'s init layer, as ``{relative path: content}``.

    The init layer sits between the image and the test's writable layer; its files never show
    in ``rootfs.diff()`` nor in a commit. Results of every implementation are merged, the
    marker's ``init=`` winning over hooks. Paths must be relative and must not contain ``..``.
    """


@hookspec
def pytest_layers_snapshot_committed(item: Any, ref: str, layer: Layer) -> None:
    """Called after the writable layer of ``item`` was kept as a snapshot.

    ``ref`` is the snapshot's ref (``"snapshot:<nodeid>"``), ``layer`` the committed ``Layer``.
    """
