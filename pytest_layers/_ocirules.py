"""The OCI rules a layer directory follows, in one place: whiteout names, whiteout flavors and
which xattrs travel.

A **flavor** says how a layer directory on disk spells a deletion: ``"overlay"`` (a 0/0
character device, what kernel overlayfs reads from a lowerdir) or ``"marker"`` (the OCI
spelling, an empty regular file ``.wh.NAME``; opaque is ``.wh..wh..opq``). The canonical tar
always speaks OCI, whatever the flavor it was read from.

**Xattrs.** A *layer* carries ``user.*`` and ``security.capability``, never the overlay and
fuse-overlayfs bookkeeping (``user.overlay.*``, ``user.fuseoverlayfs.*``) and never
``trusted.*`` (root-only metadata an image must not carry): :func:`layer_keeps_xattr`, used by
the change list, the layer writer, the canonical tar, the applier and the store's index. A
*view* (the copy backend's merged copy) shows what a kernel overlay mount would show: every
xattr but the mount's own bookkeeping, ``trusted.overlay.*`` included in that bookkeeping:
:func:`view_shows_xattr`.
"""

from __future__ import annotations

import os
import stat
from typing import Literal

Flavor = Literal["overlay", "marker"]
FLAVORS: tuple[Flavor, ...] = ("overlay", "marker")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_PREFIX_B = WHITEOUT_PREFIX.encode()
OPAQUE_MARKER_B = OPAQUE_MARKER.encode()

#: The xattrs (value ``y``) that make a directory opaque, by the kind of directory read:
#: a kernel overlay upper or lower dir (``userxattr`` mounts write ``user.``, others
#: ``trusted.``), a fuse-overlayfs upper dir (which also understands the others).
OPAQUE_XATTRS: dict[str, tuple[str, ...]] = {
    "overlay": ("user.overlay.opaque", "trusted.overlay.opaque"),
    "fuse": ("user.fuseoverlayfs.opaque", "trusted.overlay.opaque", "user.overlay.opaque"),
}
#: Every opaque xattr any of them writes.
ALL_OPAQUE_XATTRS: tuple[str, ...] = (
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
)

# What a mount writes for itself: never content.
_BOOKKEEPING = ("user.overlay.", "user.fuseoverlayfs.", "trusted.overlay.")


def check_flavor(flavor: str) -> Flavor:
    """``flavor`` when it is one; ``ValueError`` naming the known ones otherwise."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown whiteout flavor {flavor!r}; expected 'overlay' or 'marker'")
    return flavor


def whiteout_name(name: str) -> str:
    """The OCI whiteout file that deletes ``name``."""
    return WHITEOUT_PREFIX + name


def whiteout_target(name: str) -> str | None:
    """The name an OCI whiteout file ``name`` deletes; None when ``name`` is no whiteout (or
    is the opaque marker, which deletes nothing by name)."""
    if name.startswith(WHITEOUT_PREFIX) and name != OPAQUE_MARKER:
        return name[len(WHITEOUT_PREFIX) :]
    return None


def is_whiteout_name(name: str) -> bool:
    """Whether ``name`` is spelled as an OCI whiteout (the opaque marker included): such a
    name means a deletion in an OCI layer, so a file cannot be stored under it."""
    return name.startswith(WHITEOUT_PREFIX)


def is_whiteout_device(st: os.stat_result) -> bool:
    """Whether ``st`` is overlayfs's whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def layer_never_carries(name: str) -> bool:
    """Whether the xattr ``name`` is one a layer drops without a word: a mount's bookkeeping
    or ``trusted.*`` (the applier warns about any other xattr it does not restore)."""
    return name.startswith(("user.overlay.", "user.fuseoverlayfs.", "trusted."))


def layer_keeps_xattr(name: str) -> bool:
    """Whether a layer carries the xattr ``name`` (see the module's docstring)."""
    if layer_never_carries(name):
        return False
    return name.startswith("user.") or name == "security.capability"


def view_shows_xattr(name: str) -> bool:
    """Whether a view (a merged copy of layers) shows the xattr ``name``: all but a mount's
    own bookkeeping."""
    return not name.startswith(_BOOKKEEPING)
