"""The contract every mount backend keeps (see docs/dev/internals.md, section ``backends/``)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from pytest_layers import _ocirules
from pytest_layers.errors import BackendUnavailableError

if TYPE_CHECKING:
    from pytest_layers.changeset import Entry, ImageView
    from pytest_layers.layertar import Flavor

__all__ = ["Backend", "MountPolicy", "View"]


@dataclass(frozen=True)
class MountPolicy:
    """Whether views honour setuid/setgid bits and file capabilities (``suid``) and device
    nodes (``dev``). Both off by default: every view is mounted ``nosuid,nodev``, so an image's
    setuid-root program or ``dev/kmsg`` grants nothing to whoever runs it from the view (see
    docs/reference/options.md, ``layers_mount_options``)."""

    suid: bool = False
    dev: bool = False

    #: The words :meth:`parse` accepts.
    WORDS = ("suid", "nosuid", "dev", "nodev")

    @classmethod
    def parse(cls, text: str) -> MountPolicy:
        """``"nosuid,nodev"`` (the default), ``"suid,dev"``, ``"suid"``...; raises
        ``ValueError`` naming the word it does not know."""
        suid = dev = False
        for word in (w.strip() for w in text.replace(" ", ",").split(",")):
            if not word:
                continue
            if word not in cls.WORDS:
                raise ValueError(
                    f"unknown mount option {word!r}; use a comma-separated list of "
                    f"{', '.join(cls.WORDS)}"
                )
            if word in ("suid", "nosuid"):
                suid = word == "suid"
            else:
                dev = word == "dev"
        return cls(suid=suid, dev=dev)

    def __str__(self) -> str:
        return f"{'' if self.suid else 'no'}suid,{'' if self.dev else 'no'}dev"

    @property
    def ms_flags(self) -> int:
        """The ``mount(2)`` flags: ``MS_NOSUID | MS_NODEV`` by default."""
        from pytest_layers import _linux

        return (0 if self.suid else _linux.MS_NOSUID) | (0 if self.dev else _linux.MS_NODEV)

    @property
    def attr_flags(self) -> int:
        """The ``fsmount(2)`` attribute flags: ``MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV``."""
        from pytest_layers import _linux

        nosuid = 0 if self.suid else _linux.MOUNT_ATTR_NOSUID
        return nosuid | (0 if self.dev else _linux.MOUNT_ATTR_NODEV)

    @property
    def words(self) -> list[str]:
        """As mount(8) options: ``["nosuid", "nodev"]`` by default."""
        return str(self).split(",")


@dataclass
class View:
    """One materialised rootfs.

    ``path`` is the merged directory tests see; ``upper`` holds the view's writes (an overlay or
    fuse upper dir, or the copy tree) and is None for a read-only view; ``upper_flavor`` says how
    ``upper`` spells deletions: ``"overlay"``, ``"fuse"`` or ``"tree"``.
    """

    path: Path
    upper: Path | None
    upper_flavor: str
    _closer: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        """Unmount and remove the view's scratch. Idempotent."""
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def __enter__(self) -> View:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Backend(Protocol):
    """A way to give each test a private writable view of an image."""

    #: ``"overlay"`` (kernel overlay, as root or in a user namespace), ``"fuse"``, ``"copy"``
    name: str
    #: How views are mounted (``nosuid,nodev`` unless the user opted out).
    policy: MountPolicy

    def check(self, scratch: Path) -> None:
        """Prove the backend works here with a real trial mount inside ``scratch`` (an empty
        dir, left empty). Raises :class:`~pytest_layers.errors.BackendUnavailableError`."""
        ...

    def open(
        self,
        lowers_top_first: Sequence[Path],
        scratch: Path,
        *,
        readonly: bool = False,
        flavor: Flavor = "overlay",
    ) -> View:
        """Materialise the union of ``lowers_top_first`` (layer dirs spelled in ``flavor``).

        ``scratch`` is an empty dir the backend owns for this view; it never writes outside it.
        A ``readonly`` view has no upper: writes fail with ``EROFS``.
        """
        ...

    def changes(
        self, view: View, image: ImageView, *, exclude: Collection[str] = ()
    ) -> list[Entry]:
        """The view's changes against ``image`` (the lowers it was opened on)."""
        ...


@contextlib.contextmanager
def trial(backend: str, failed: str, *paths: Path) -> Iterator[None]:
    """The frame of a backend's ``check()``: an ``OSError`` in the block becomes a
    :class:`~pytest_layers.errors.BackendUnavailableError` of ``backend`` whose reason starts
    with ``failed`` (``"trial mount failed"``), and ``paths``, the trial's dirs in the check's
    scratch, are removed however the block ends, so the scratch is left empty."""
    try:
        yield
    except BackendUnavailableError:
        raise
    except OSError as exc:
        raise BackendUnavailableError(backend, f"{failed}: {exc}") from exc
    finally:
        # Imported here: namespaces pulls in psutil, which only a check needs from this module.
        from pytest_layers._removal import remove_tree

        for path in paths:
            remove_tree(path)


def trial_whiteout(layer: Path, name: str) -> Flavor:
    """Delete ``name`` in the trial ``layer`` with a 0/0 character device (the ``"overlay"``
    flavor) or, where the filesystem refuses one, with a ``.wh.`` file; return the flavor."""
    try:
        os.mknod(layer / name, stat.S_IFCHR | 0o600, 0)
    except OSError as exc:
        # overlayfs (a container's root) refuses 0/0 devices: a store there spells whiteouts as
        # marker files, and the copy and fuse backends are what it relies on.
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        (layer / _ocirules.whiteout_name(name)).touch()
        return "marker"
    return "overlay"
