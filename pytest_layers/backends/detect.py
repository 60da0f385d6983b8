"""Choosing a backend: the fastest that really works here, proven by a trial mount.

``auto`` tries, in order: kernel overlay as root, kernel overlay in a user namespace (an
ordinary user whose session entered one), fuse-overlayfs, copy. Each candidate gets a real trial
mount (:meth:`Backend.check`); the first that passes wins, and every faster one that was skipped
leaves a one-line reason for the report header. The fuse and copy modules are imported only
when they are tried.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_layers import namespaces
from pytest_layers.backends.base import Backend, MountPolicy
from pytest_layers.errors import BackendUnavailableError

if TYPE_CHECKING:
    from pytest_layers.layertar import Flavor

__all__ = [
    "BACKEND_NAMES",
    "Reason",
    "backend_label",
    "choose_backend",
    "get_backend",
    "join_reasons",
    "shorten",
    "skipped_short",
]

#: Every backend, fastest first; ``auto`` tries them in this order.
BACKEND_NAMES = ("overlay", "fuse", "copy")

_CLASSES = {
    "overlay": ("pytest_layers.backends.overlay", "OverlayBackend"),
    "fuse": ("pytest_layers.backends.fuse", "FuseBackend"),
    "copy": ("pytest_layers.backends.copy", "CopyBackend"),
}

_FIX = {
    "overlay": "run as root, or as an ordinary user with user namespaces enabled "
    "(layers_mount_namespace=private), or choose --layers-backend=fuse or copy",
    "fuse": "install fuse-overlayfs and make /dev/fuse usable, or choose --layers-backend=copy",
    "copy": "make the scratch directory writable",
}


def shorten(text: str, limit: int = 60) -> str:
    """The first clause of ``text`` (up to `` (``, ``;`` or ``. ``), at most ``limit`` chars."""
    cut = len(text)
    for sep in (" (", "; ", ". "):
        at = text.find(sep)
        if 0 < at < cut:
            cut = at
    head = text[:cut]
    return head if len(head) <= limit else head[: limit - 1].rstrip() + "\u2026"


class Reason(str):
    """Why a backend was skipped: the full text (the str value, for ``-v`` and diagnostics)
    and ``short``, a few words for one-line reports such as the pytest report header."""

    short: str

    def __new__(cls, text: str, short: str | None = None) -> Reason:
        self = super().__new__(cls, text)
        if short is None:
            # "BACKEND: reason" keeps its label whole: "overlay (user namespace): ..."
            label, sep, rest = text.partition(": ")
            short = f"{label}: {shorten(rest)}" if sep and len(label) <= 30 else shorten(text)
        self.short = short
        return self


def join_reasons(reasons: list[Reason]) -> Reason:
    """Several reasons as one: full texts and short forms each joined with ``"; "``."""
    return Reason("; ".join(reasons), "; ".join(r.short for r in reasons))


# Trial mounts passed in this process, keyed by what could change their outcome.
_proven: set[tuple[str, int, str]] = set()


def get_backend(name: str, policy: MountPolicy | None = None) -> Backend:
    """A fresh, unchecked instance of the backend called ``name``, mounting views as ``policy``
    says (default: ``nosuid,nodev``)."""
    try:
        module_name, class_name = _CLASSES[name]
    except KeyError:
        raise BackendUnavailableError(
            name, f"unknown backend; choose auto, {', '.join(BACKEND_NAMES)}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = cls(policy=policy or MountPolicy())
    return backend


def backend_label(backend: Backend) -> str:
    """How the report header names ``backend``: ``"overlay (user namespace)"`` for an
    unprivileged kernel overlay, else its name."""
    if backend.name == "overlay" and os.geteuid() != 0:
        return "overlay (user namespace)"
    return backend.name


def _label(name: str) -> str:
    if name == "overlay" and os.geteuid() != 0:
        return "overlay (user namespace)"
    return name


def _precondition(name: str, flavor: str) -> str | None:
    """Why ``name`` cannot work here without even trying, or None."""
    if name != "overlay":
        return None
    if flavor != "overlay":
        return (
            f"the store spells whiteouts as {flavor!r} files (it sits on a filesystem without "
            "0/0 device files, such as overlayfs), which kernel overlay cannot use as lowers; "
            "to fix: put the store (--layers-store) on ext4, xfs, btrfs or tmpfs, or choose "
            "--layers-backend=fuse or copy"
        )
    if os.geteuid() != 0:
        inside = namespaces.inside_our_namespace()
        if inside is None or inside.kind != "userns":
            # Short first clause: the report header shows it. Being in *a* user namespace (a
            # parent's) is not enough: the session must have entered one of its own.
            return (
                "not root and not in a user namespace of its own (a pytest session enters one "
                "unless layers_mount_namespace = host; other callers must call "
                "namespaces.enter_user_namespace() first)"
            )
    return None


def skipped_short(exc: BackendUnavailableError) -> str:
    """``"backend: first clause of the reason"``, the header's form of a skipped backend."""
    return f"{exc.backend}: {shorten(exc.reason)}"


def _try(name: str, scratch: Path, flavor: str, policy: MountPolicy | None) -> Backend:
    why = _precondition(name, flavor)
    if why is not None:
        raise BackendUnavailableError(_label(name), why)
    try:
        backend = get_backend(name, policy)
    except ImportError as exc:
        raise BackendUnavailableError(name, f"cannot import its module: {exc}") from exc
    key = (name, os.geteuid(), namespaces.current_namespace())
    if key in _proven:
        return backend
    # A dir of our own: sessions sharing a store start at the same time, and one's cleanup
    # must not pull another's trial mount from under it.
    scratch.mkdir(parents=True, exist_ok=True)
    trial = Path(tempfile.mkdtemp(prefix=f"trial-{name}-{os.getpid()}-", dir=scratch))
    try:
        backend.check(trial)
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(_label(name), exc.reason) from exc
    except OSError as exc:
        raise BackendUnavailableError(_label(name), f"trial mount failed: {exc}") from exc
    finally:
        namespaces.remove_tree(trial)
    _proven.add(key)
    return backend


def choose_backend(
    name: str, scratch: Path, *, flavor: Flavor = "overlay", policy: MountPolicy | None = None
) -> tuple[Backend, list[Reason]]:
    """The backend to use and, for ``auto``, one :class:`Reason` per faster backend skipped.

    ``scratch`` is a directory for the trial mounts (created if missing, left empty).
    ``flavor`` is the store's whiteout flavor; ``policy`` how views are mounted. With an
    explicit ``name``, a backend that cannot work raises :class:`BackendUnavailableError`
    with the reason and the fix.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    if name != "auto":
        if name not in _CLASSES:
            raise BackendUnavailableError(
                name, f"unknown backend; choose auto, {', '.join(BACKEND_NAMES)}"
            )
        try:
            return _try(name, scratch, flavor, policy), []
        except BackendUnavailableError as exc:
            if "to fix:" in exc.reason:
                raise
            raise BackendUnavailableError(
                exc.backend, f"{exc.reason}; to fix: {_FIX[name]}"
            ) from exc
    skipped: list[Reason] = []
    for candidate in BACKEND_NAMES:
        try:
            return _try(candidate, scratch, flavor, policy), skipped
        except BackendUnavailableError as exc:
            skipped.append(Reason(f"{exc.backend}: {exc.reason}", skipped_short(exc)))
    raise BackendUnavailableError("auto", "no backend works here: " + " | ".join(skipped))
