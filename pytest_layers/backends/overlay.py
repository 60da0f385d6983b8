"""Kernel overlayfs, as root or inside a user namespace (the same code serves both).

Mounting uses the new mount API: ``fsopen("overlay")``, then one
``fsconfig(FSCONFIG_SET_FD, "lowerdir+", fd)`` per layer with an ``O_PATH`` fd, ``upperdir``
and ``workdir`` the same way, then ``fsmount`` + ``move_mount``. Passing fds sidesteps both
limits of the string interfaces: legacy ``mount(2)`` silently truncates its option string at
4095 bytes (mounting the wrong layers), and ``FSCONFIG_SET_STRING`` caps each value at 255 bytes.

Older kernels get a fallback chosen once, at the first mount:

* 6.8 - 6.12 know ``lowerdir+`` but only as a string: it is set to ``/proc/self/fd/N`` (the
  kernel resolves it at once, so the layer's real path may be of any length).
* before 6.8 (or without ``fsopen``): legacy ``mount(2)`` with ``lowerdir=5:6:7`` **relative
  to** ``/proc/self/fd`` after ``chdir`` there. That keeps each layer to a few bytes, so 500
  layers fit in the 4095-byte limit; the length is checked and an over-long string fails with
  :class:`~pytest_layers.errors.TooManyLayersError` rather than being truncated. ``chdir`` is
  process-global, so the old working directory is restored (``fchdir``) right after the call;
  that is only safe because mounting happens before tests start threads of their own (the
  namespace module refuses to start in a multi-threaded process anyway).

Every view is mounted ``nosuid,nodev`` unless its :class:`MountPolicy` opts out: an image's
setuid-root program or device node then grants nothing to whoever runs or opens it there.

Options: ``volatile`` for writable views (no sync of the upper filesystem at unmount: the
upper dir is disposable, and when it sits on the root filesystem that sync flushed every
process's dirty data, making a 0.3 ms unmount cost tens of milliseconds under write load),
``index=off`` (no inode index, so upper/work dirs are disposable), ``userxattr``
(``user.overlay.*`` xattrs: root and unprivileged mounts read the same store; docs/dev),
``redirect_dir=nofollow`` and ``metacopy=off`` (the only values compatible with ``userxattr``;
every copy-up is a full copy, so an upper dir is a self-contained changeset).

Caveats a test author may meet (write them down where the user docs explain the rootfs):

* ``rename(2)`` of a directory that comes from a lower layer fails with ``EXDEV`` (no
  ``redirect_dir``). ``shutil.move`` and ``mv`` cope by copying then deleting; ``os.rename``
  does not. Renaming files, and directories created by the test itself, works.
* Inode numbers of lower files differ from those of copied-up files (``st_ino`` changes when a
  file is first written); ``st_dev`` of the merged tree is the overlay's.
* Lower layers must never change while mounted; the store guarantees that.
* The kernel stacks at most 500 lower layers: deeper images raise
  :class:`~pytest_layers.errors.TooManyLayersError` (use fewer layers, or squash the chain).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_layers import _linux
from pytest_layers._removal import remove_tree
from pytest_layers.backends.base import MountPolicy, View, trial
from pytest_layers.errors import BackendUnavailableError, MountError, TooManyLayersError

if TYPE_CHECKING:
    from pytest_layers.changeset import Entry, ImageView
    from pytest_layers.layertar import Flavor

__all__ = ["MAX_LOWERS", "LEGACY_DATA_LIMIT", "OverlayBackend"]

#: The kernel's OVL_MAX_STACK.
MAX_LOWERS = 500
#: mount(2) copies at most one page of option data, NUL included.
LEGACY_DATA_LIMIT = 4095

_OPTIONS_STRING = (("index", "off"), ("redirect_dir", "nofollow"), ("metacopy", "off"))
_OPTIONS_FLAG = ("userxattr",)
_LEGACY_OPTIONS = "index=off,userxattr,redirect_dir=nofollow,metacopy=off"
# Writable views only (the kernel refuses it without an upper).
_VOLATILE = "volatile"

_API_FD = "fd"
_API_STRING = "string"
_API_LEGACY = "legacy"
_APIS = (_API_FD, _API_STRING, _API_LEGACY)

_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _Unsupported(Exception):
    """This kernel does not know the interface tried; try the next one."""


def too_many_layers(count: int) -> TooManyLayersError:
    """The error for an image deeper than one overlay mount can stack."""
    return TooManyLayersError(
        f"the image has {count} layers but the kernel stacks at most {MAX_LOWERS} lower layers "
        "in one overlay mount; use fewer layers (merge some @layer builders) or squash the "
        "chain (commit a view of it as a single layer)"
    )


class OverlayBackend:
    """Kernel overlayfs. Works as root, and as an ordinary user inside the user namespace of
    :func:`pytest_layers.namespaces.enter_user_namespace`.

    ``api`` forces one mount interface (``"fd"``, ``"string"`` or ``"legacy"``, see the module
    docstring); the default picks the newest the kernel supports at the first mount.
    ``policy`` says whether views honour setuid bits and device nodes (default: neither).
    """

    name = "overlay"

    def __init__(self, *, api: str | None = None, policy: MountPolicy | None = None) -> None:
        if api is not None and api not in _APIS:
            raise ValueError(f"api must be one of {', '.join(_APIS)}, not {api!r}")
        self.policy = policy or MountPolicy()
        self._forced = api
        self._api: str | None = api

    @property
    def api(self) -> str | None:
        """The mount interface in use (None until the first mount decided it)."""
        return self._api

    # ---- Backend protocol -------------------------------------------------------------------

    def check(self, scratch: Path) -> None:
        """Mount a two-file lower, write, delete (a whiteout) and read back, then clean up."""
        if os.geteuid() != 0 and not _linux.has_effective_cap(_linux.CAP_SYS_ADMIN):
            raise BackendUnavailableError(
                self.name,
                "needs root, or a user namespace (not entered in this process: "
                "pytest_layers.namespaces.enter_user_namespace() must run before threads start)",
            )
        lower = scratch / "check-lower"
        view_scratch = scratch / "check-view"
        with trial(self.name, "trial mount failed", lower, view_scratch):
            lower.mkdir()
            (lower / "keep").write_text("lower\n")
            (lower / "gone").write_text("lower\n")
            (lower / "dir").mkdir()
            (lower / "dir" / "hidden").write_text("lower\n")
            view_scratch.mkdir()
            try:
                view = self.open([lower], view_scratch)
            except MountError as exc:
                raise BackendUnavailableError(self.name, _explain(exc, scratch)) from exc
            try:
                (view.path / "new").write_text("upper\n")
                (view.path / "gone").unlink()
                # An opaque dir needs user.* xattrs on the upper fs (tmpfs has them from 6.6).
                os.unlink(view.path / "dir" / "hidden")
                os.rmdir(view.path / "dir")
                os.mkdir(view.path / "dir")
                seen = sorted(os.listdir(view.path))
                seen_dir = os.listdir(view.path / "dir")
                assert view.upper is not None
                whiteout = os.lstat(view.upper / "gone")
            finally:
                view.close()
            if seen != ["dir", "keep", "new"] or seen_dir:
                raise BackendUnavailableError(
                    self.name,
                    f"trial mount shows {seen} and dir/ {seen_dir}, expected "
                    "['dir', 'keep', 'new'] and an empty dir/",
                )
            if not stat.S_ISCHR(whiteout.st_mode) or whiteout.st_rdev != 0:
                raise BackendUnavailableError(
                    self.name, "trial mount did not write a 0/0 whiteout for a deleted file"
                )

    def open(
        self,
        lowers_top_first: Sequence[Path],
        scratch: Path,
        *,
        readonly: bool = False,
        flavor: Flavor = "overlay",
    ) -> View:
        """Mount the union of ``lowers_top_first`` at ``scratch/m`` (upper ``u``, work ``w``)."""
        if flavor != "overlay":
            raise BackendUnavailableError(
                self.name,
                f"the store spells whiteouts as {flavor!r} files, which kernel overlay cannot "
                "read (the store sits on a filesystem without 0/0 device files, such as "
                "overlayfs); use --layers-backend=copy or put the store on a real filesystem",
            )
        lowers = [os.fspath(p) for p in lowers_top_first]
        if len(lowers) > MAX_LOWERS:
            raise too_many_layers(len(lowers))
        merged = scratch / "m"
        os.mkdir(merged)
        upper: Path | None = None
        work: Path | None = None
        # Overlay needs one lower with an upper, two without; pad with an empty dir.
        if len(lowers) < (2 if readonly else 1):
            empty = scratch / "e"
            os.mkdir(empty)
            lowers.append(os.fspath(empty))
        if not readonly:
            upper = scratch / "u"
            work = scratch / "w"
            os.mkdir(upper)
            os.mkdir(work)
        try:
            self._mount(lowers, upper, work, merged, readonly)
        except BaseException:
            _remove_scratch(scratch, keep=True)
            raise
        return View(
            path=merged,
            upper=upper,
            upper_flavor="overlay",
            _closer=lambda: _close(merged, scratch),
        )

    def changes(
        self, view: View, image: ImageView, *, exclude: Collection[str] = ()
    ) -> list[Entry]:
        """Read the view's upper dir (overlay whiteouts and ``user.overlay.opaque``)."""
        from pytest_layers.changeset import changes_from_upper

        if view.upper is None:
            return []
        return changes_from_upper(view.upper, image, upper_flavor="overlay", exclude=exclude)

    # ---- mounting -----------------------------------------------------------------------------

    def _mount(
        self, lowers: list[str], upper: Path | None, work: Path | None, merged: Path, ro: bool
    ) -> None:
        fds: list[int] = []
        try:
            for lower in lowers:
                fds.append(os.open(lower, _O_DIR))
            upper_fd = os.open(upper, _O_DIR) if upper is not None else None
            if upper_fd is not None:
                fds.append(upper_fd)
            work_fd = os.open(work, _O_DIR) if work is not None else None
            if work_fd is not None:
                fds.append(work_fd)
            lower_fds = fds[: len(lowers)]
            while True:
                api = self._api or _API_FD
                try:
                    if api == _API_LEGACY:
                        _mount_legacy(lower_fds, upper_fd, work_fd, merged, ro, self.policy)
                    else:
                        _mount_new(api, lower_fds, upper_fd, work_fd, merged, ro, self.policy)
                except _Unsupported:
                    if self._forced is not None or api == _API_LEGACY:
                        raise MountError(
                            errno.ENOTSUP,
                            f"overlay mount interface {api!r} is not supported by this kernel",
                        ) from None
                    self._api = _APIS[_APIS.index(api) + 1]
                    continue
                self._api = api
                return
        finally:
            for fd in fds:
                os.close(fd)


def _mount_new(
    api: str,
    lower_fds: list[int],
    upper_fd: int | None,
    work_fd: int | None,
    merged: Path,
    ro: bool,
    policy: MountPolicy = MountPolicy(),  # noqa: B008  # frozen, so one shared default is fine
) -> None:
    try:
        ctx = _linux.fsopen("overlay")
    except MountError as exc:
        if exc.errno == errno.ENOSYS:
            raise _Unsupported from exc
        raise
    try:
        for i, fd in enumerate(lower_fds):
            try:
                _set_dir(ctx, api, "lowerdir+", fd)
            except MountError as exc:
                # An unknown key or value type is EINVAL at the very first layer.
                if i == 0 and exc.errno == errno.EINVAL:
                    raise _Unsupported from exc
                raise
        if upper_fd is not None and work_fd is not None:
            _set_dir(ctx, api, "upperdir", upper_fd)
            _set_dir(ctx, api, "workdir", work_fd)
        for key, value in _OPTIONS_STRING:
            _linux.fsconfig_string(ctx, key, value)
        for key in _OPTIONS_FLAG:
            _linux.fsconfig_flag(ctx, key)
        if upper_fd is not None and _VOLATILE:
            try:
                _linux.fsconfig_flag(ctx, _VOLATILE)
            except MountError as exc:
                if exc.errno != errno.EINVAL:  # Linux < 5.10 lacks it: only slower unmounts
                    raise
        _linux.fsconfig_create(ctx)
        attrs = policy.attr_flags | (_linux.MOUNT_ATTR_RDONLY if ro else 0)
        mnt = _linux.fsmount(ctx, attr_flags=attrs)
        try:
            _linux.move_mount(mnt, merged)
        finally:
            os.close(mnt)
    finally:
        os.close(ctx)


def _set_dir(ctx: int, api: str, key: str, fd: int) -> None:
    if api == _API_FD:
        _linux.fsconfig_fd(ctx, key, fd)
    else:
        # Resolved by the kernel right away, so the fd's real path may be any length.
        _linux.fsconfig_string(ctx, key, f"/proc/self/fd/{fd}")


def _mount_legacy(
    lower_fds: list[int],
    upper_fd: int | None,
    work_fd: int | None,
    merged: Path,
    ro: bool,
    policy: MountPolicy = MountPolicy(),  # noqa: B008  # frozen, so one shared default is fine
) -> None:
    data = "lowerdir=" + ":".join(str(fd) for fd in lower_fds)
    if upper_fd is not None and work_fd is not None:
        data += f",upperdir={upper_fd},workdir={work_fd}"
        data += f",{_VOLATILE}" if _VOLATILE else ""
    data += "," + _LEGACY_OPTIONS
    if len(data.encode()) > LEGACY_DATA_LIMIT:
        raise TooManyLayersError(
            f"the overlay options for {len(lower_fds)} layers take {len(data.encode())} bytes, "
            f"more than the {LEGACY_DATA_LIMIT} that mount(2) accepts on this kernel (it has no "
            "'lowerdir+'; Linux >= 6.8 lifts the limit); use fewer layers or squash the chain"
        )
    target = os.path.abspath(merged)
    saved = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # The kernel resolves relative lowerdirs against the cwd during the call; from
        # /proc/self/fd each layer is just its fd number (see the module docstring).
        os.chdir("/proc/self/fd")
        flags = policy.ms_flags | (_linux.MS_RDONLY if ro else 0)
        _linux.mount("overlay", target, "overlay", flags, data)
    finally:
        os.fchdir(saved)
        os.close(saved)


def _close(merged: Path, scratch: Path) -> None:
    try:
        # Lazy: a test that left a file open must not make teardown fail; the kernel drops the
        # mount when the last reference goes.
        _linux.umount2(merged, _linux.MNT_DETACH)
    except MountError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    _remove_scratch(scratch, keep=False)


# Children first; "volatile" leaves work/incompat/volatile, which is what lets the kernel refuse
# to reuse a work dir whose upper may be inconsistent (we never reuse one).
_SCRATCH_DIRS: tuple[str, ...] = ("m", "w/work/incompat/volatile", "w/work/incompat", "w/work")
_SCRATCH_DIRS += ("w/index", "w", "u", "e")


def _remove_scratch(scratch: Path, *, keep: bool) -> None:
    # The common case costs a handful of rmdir: nothing was written, so every dir is empty
    # (overlay's mode-000 work/work too). Anything else takes the full walk.
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch / "w/work/incompat/volatile/dirty")
        for sub in _SCRATCH_DIRS:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(scratch / sub)
        if not keep:
            os.rmdir(scratch)
    except OSError:
        if keep:
            for sub in ("m", "w", "u", "e"):
                remove_tree(scratch / sub)
        else:
            remove_tree(scratch)


def _explain(exc: MountError, scratch: Path) -> str:
    if exc.errno == errno.ENODEV:
        return "the kernel has no overlay filesystem (modprobe overlay)"
    if exc.errno == errno.EPERM:
        return (
            "mounting is not permitted here (EPERM): run as root, or as an ordinary user in a "
            "user namespace on Linux >= 5.11"
        )
    if exc.errno == errno.EINVAL:
        return (
            f"overlay refused the mount ({exc.reason}); the scratch dir {scratch} may sit on a "
            "filesystem overlay cannot use as upper dir (overlayfs, NFS without xattrs)"
        )
    return str(exc)
