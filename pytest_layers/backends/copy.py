"""The portable backend: every view is a real copy of the merged image.

No mount is needed for a writable view, so this works wherever the scratch directory is
writable: in an unprivileged container, on a filesystem overlay cannot stack, with a store in
the ``"marker"`` flavor.

How a view is made:

1. **Plan** (once per image and process). The layers are merged in memory, top first, as
   overlayfs would merge them: 0/0 character devices (``"overlay"`` flavor) and ``.wh.NAME``
   files (``"marker"`` flavor) delete lower entries, ``.wh..wh..opq`` or an ``overlay.opaque``
   xattr hides a directory's lower children, a directory over a lower non-directory hides it.
   The result is a list of entries with the layer file each one is copied from. Store layers
   never change once written (docs/dev/internals.md), so the layer files themselves serve as the
   flattened image: no flattened copy is written to disk, which would cost a full copy of
   inodes (the expensive part on ext4) for nothing. Whiteouts are applied here and never copied.
2. **Copy** (per view): directories first, then files, links and nodes, then directory
   metadata deepest first (so directory mtimes stick). File data is cloned with ``FICLONE``
   where the filesystem shares extents (btrfs, xfs), else copied with ``copy_file_range`` (holes
   of sparse files kept). Kept: symlinks, hardlinks (entries sharing an inode in one layer stay
   linked), permission bits with setuid/setgid/sticky, ownership (as root), xattrs (``user.*``,
   ``security.capability``, minus overlay and fuse-overlayfs bookkeeping), fifos and device
   nodes (devices need root), mtimes. Sockets are skipped, as layers skip them.
3. **Mark**: :func:`~pytest_layers.changeset.ctime_mark` after the copy gives ``since_ns``, the
   first ctime the filesystem stamps after the copy. ``changes()`` compares with the image only
   the entries whose ctime is at least that (user space cannot set ctime, so nothing the test
   touched can hide), never reading unchanged files.

Privileged content: a copy made as root keeps setuid bits, file capabilities and device
nodes, so a view is the copy bind-mounted over itself ``nosuid,nodev`` (unless the
:class:`~pytest_layers.backends.base.MountPolicy` opts out) wherever this process may mount. An
ordinary user who cannot mount needs no bind: its copies are its own files (a setuid bit on
them grants nothing) and it cannot create device nodes. Root that may not mount (a default
Docker container) gets *defanged* copies instead: no setuid/setgid bits, no file capabilities,
and an image with a device node is refused (the bind is tried on the empty copy first, once).

Read-only views: a copy cannot make writes fail with ``EROFS`` by itself, so a ``readonly``
view is the copy bind-mounted read-only over itself, which needs root or the session's user
namespace. Where mounting is not possible, ``open(readonly=True)`` raises
:class:`~pytest_layers.errors.BackendUnavailableError` saying so; writable views still work.

Measured on the project machine (ext4): see ``benchmarks/`` and the module docstring of
``benchmarks/bench_mount.py``; file creation dominates, so the copy is a lean walker in Python
(one create, data, chown, chmod, futimens, close per file) rather than ``cp -a`` (which also
probes ACLs and reflinks per file and was slower here) or ``shutil.copytree``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_layers import _datacopy, _ocirules
from pytest_layers.backends._copyplan import (
    _NO_CLONE,
    _O_SOURCE,
    _Copier,
    _Plan,
    _plan,
)
from pytest_layers.backends.base import MountPolicy, View, trial, trial_whiteout
from pytest_layers.errors import BackendUnavailableError, MountError

if TYPE_CHECKING:
    from pytest_layers.backends.copyreuse import Index, ReusableCopy, Watcher
    from pytest_layers.changeset import Entry, ImageView
    from pytest_layers.layertar import Flavor

__all__ = ["CopyBackend", "CopyView", "FICLONE"]

#: Reset copies kept ready per image (one for the next test is all a serial session needs;
#: the second covers a test that opens the same image twice).
_SPARES = 2

#: ``_IOW(0x94, 9, int)`` from <linux/fs.h>: share the source's extents with the destination.
FICLONE = 0x40049409


@dataclass
class CopyView(View):
    """A copy view; ``since_ns`` is the ctime mark taken right after the copy."""

    since_ns: int | None = None


class CopyBackend:
    """Views as real copies of the merged image (see the module docstring).

    ``clone`` can switch ``FICLONE`` off (``False``) for measurements; by default it is tried
    once per filesystem pair and dropped after the first refusal. ``policy`` says whether views
    honour setuid bits and device nodes (default: neither). With ``reuse`` (the default) and a
    home given by :meth:`keep_copies_in`, a closed writable copy is reset to its image and
    handed to the next :meth:`open` of that image (:mod:`~pytest_layers.backends.copyreuse`).
    """

    name = "copy"

    def __init__(
        self, *, clone: bool = True, policy: MountPolicy | None = None, reuse: bool = True
    ) -> None:
        self.policy = policy or MountPolicy()
        self._plans: dict[tuple[tuple[str, ...], str, tuple[tuple[int, int, int], ...]], _Plan]
        self._plans = {}
        self._indexes: dict[int, tuple[_Plan, Index]] = {}
        self._clone = clone
        # (src dev, dst dev) -> whether FICLONE works between them
        self._clone_ok: dict[tuple[int, int], bool] = {}
        # Whether a nosuid,nodev bind of a copy works here (None: not tried yet). Root in a
        # default Docker container may not mount: its copies are then defanged instead.
        self._bind_ok: bool | None = None
        #: Whether used copies are reset and handed out again (see :meth:`keep_copies_in`).
        self.reuse = reuse
        self._home: Path | None = None
        self._spares: dict[object, list[ReusableCopy]] = {}
        self._live: dict[int, ReusableCopy] = {}
        self._watcher: Watcher | None = None
        self._pid = os.getpid()
        self._serial = 0
        #: Copies reset and handed out again, and copies thrown away instead.
        self.reused = 0
        self.discarded = 0

    # ---- Backend protocol -------------------------------------------------------------------

    def check(self, scratch: Path) -> None:
        """Copy a small two-layer image (with a whiteout), write to it, then clean up."""
        lower0 = scratch / "check-l0"
        lower1 = scratch / "check-l1"
        view_scratch = scratch / "check-view"
        with trial(self.name, "trial copy failed", lower0, lower1, view_scratch):
            (lower0 / "dir").mkdir(parents=True)
            (lower0 / "keep").write_text("lower\n")
            (lower0 / "gone").write_text("lower\n")
            (lower0 / "dir" / "file").write_text("lower\n")
            lower1.mkdir()
            flavor = trial_whiteout(lower1, "gone")
            (lower1 / "new").write_text("upper\n")
            view_scratch.mkdir()
            view = self.open([lower1, lower0], view_scratch, flavor=flavor)
            try:
                seen = sorted(os.listdir(view.path))
                (view.path / "dir" / "written").write_text("view\n")
                content = (view.path / "dir" / "file").read_text()
            finally:
                view.close()
            if seen != ["dir", "keep", "new"] or content != "lower\n":
                raise BackendUnavailableError(
                    self.name,
                    f"trial copy shows {seen} (dir/file {content!r}), expected "
                    "['dir', 'keep', 'new'] ('lower\\n')",
                )
            if (lower0 / "dir" / "written").exists():
                raise BackendUnavailableError(self.name, "a write to the copy reached the layer")

    def open(
        self,
        lowers_top_first: Sequence[Path],
        scratch: Path,
        *,
        readonly: bool = False,
        flavor: Flavor = "overlay",
    ) -> CopyView:
        """Copy the merged image to ``scratch/root``; read-only views are bind-mounted
        read-only over themselves (root or a user namespace only)."""
        from pytest_layers.changeset import ctime_mark

        _ocirules.check_flavor(flavor)
        dest = scratch / "root"
        if not lowers_top_first:
            os.mkdir(dest, 0o755)
            plan = None
        else:
            plan = self.plan(lowers_top_first, flavor)
            if not readonly and self._reusable():
                return self._open_reused(plan, lowers_top_first, flavor, scratch, dest)
            os.mkdir(dest, 0o700)
        mounted = False
        try:
            if (
                not readonly
                and (not self.policy.suid or not self.policy.dev)
                and _may_mount()
                and self._bind_ok is not False
            ):
                # Bound before the copy fills it: the same tree, and it tells whether the copy
                # must be defanged instead.
                try:
                    _bind(dest, self.policy, readonly=False)
                    mounted = self._bind_ok = True
                except MountError as exc:
                    if exc.errno not in (errno.EPERM, errno.EACCES):
                        raise
                    self._bind_ok = False
            defang = (
                not mounted
                and os.geteuid() == 0
                and (not self.policy.suid or not self.policy.dev)
                and not readonly
            )
            if plan is not None:
                _Copier(self, defang=defang).run(plan, os.fspath(dest))
            if readonly:
                _bind(dest, self.policy, readonly=True)
                return CopyView(
                    path=dest,
                    upper=None,
                    upper_flavor="tree",
                    _closer=lambda: _close(scratch, dest, mounted=True),
                )
            since = ctime_mark(scratch)
        except BaseException:
            _close(scratch, dest, mounted=mounted, keep_scratch=True)
            raise
        return CopyView(
            path=dest,
            upper=dest,
            upper_flavor="tree",
            since_ns=since,
            _closer=lambda: _close(scratch, dest, mounted=mounted),
        )

    def changes(
        self, view: View, image: ImageView, *, exclude: Collection[str] = ()
    ) -> list[Entry]:
        """Compare the copy with ``image``, reading only entries touched since the copy."""
        from pytest_layers.changeset import changes_from_tree

        if view.upper is None:
            return []
        since = view.since_ns if isinstance(view, CopyView) else None
        # Mounts a test made inside its copy (a bind of a host directory, as chroot-style
        # installers do) are not the test's writes: never read through them into a snapshot.
        skip = set(exclude) | _mount_points_in(view.upper)
        only = None
        copy = self._live.get(id(view)) if os.getpid() == self._pid else None
        if copy is not None and self._watcher is not None and since is not None:
            # The events of a reused copy say which directories can hold a change.
            self._watcher.drain()
            only = copy.dirty_dirs()
        return changes_from_tree(view.upper, image, since_ns=since, exclude=skip, only=only)

    # ---- reusable copies ----------------------------------------------------------------------

    def keep_copies_in(self, home: Path) -> None:
        """Keep reset copies in ``home`` (an empty directory on the scratch's filesystem that
        the caller removes at the end) and hand them out again; without it every view is a new
        copy."""
        self._home = home

    def close(self) -> None:
        """Forget the kept copies (their files go with the caller's ``home``)."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._spares.clear()
        self._live.clear()

    def _reusable(self) -> bool:
        if not self.reuse or self._home is None:
            return False
        if os.getpid() != self._pid:
            # A fork (the view pool's helper): the kept copies and the inotify queue are the
            # parent's. This process keeps its own, in a home of its own.
            self._pid = os.getpid()
            self._home = self._home.parent / f"{self._home.name}.{self._pid}"
            self._spares, self._live, self._watcher = {}, {}, None
        # A copy that is bind-mounted nosuid,nodev cannot be renamed between scratches.
        if (self.policy.suid and self.policy.dev) or not _may_mount():
            return True
        if self._bind_ok is None:
            self._probe_bind(self._home)
        return self._bind_ok is False

    def _probe_bind(self, home: Path) -> None:
        """Whether copies will be bound nosuid,nodev here (root in a container that refuses
        mounts: no, they are defanged instead), tried once on an empty directory."""
        from pytest_layers import _linux

        home.mkdir(exist_ok=True)
        probe = home / f"bind-probe-{os.getpid()}"
        probe.mkdir()
        try:
            _bind(probe, self.policy, readonly=False)
        except MountError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES):
                raise
            self._bind_ok = False
        else:
            self._bind_ok = True
            _linux.umount2(probe, _linux.MNT_DETACH)
        finally:
            probe.rmdir()

    def _open_reused(
        self,
        plan: _Plan,
        lowers_top_first: Sequence[Path],
        flavor: Flavor,
        scratch: Path,
        dest: Path,
    ) -> CopyView:
        from pytest_layers.backends import copyreuse
        from pytest_layers.changeset import ctime_mark

        assert self._home is not None
        if self._watcher is None:
            self._watcher = copyreuse.Watcher()
        watcher = self._watcher
        defang = os.geteuid() == 0 and (not self.policy.suid or not self.policy.dev)
        key = (self._plan_key(lowers_top_first, flavor), defang)
        spares = self._spares.get(key, [])
        copy = None
        while spares:
            copy = spares.pop(0)
            watcher.drain()
            if copy.trusted and not copy.touched and copy.opens == 0:
                break  # events lost while it waited (overflow, no watch): reset() walks
            # Written to while it waited (a process of an earlier test): reset it again.
            copier = _Copier(self, defang=copy.defang)
            may_mount = _may_mount() and self._bind_ok is not False
            home = os.fspath(self._home)
            try:
                if copyreuse.reset(copy, watcher, copier, home, may_mount=may_mount):
                    break
            except Exception:  # any failure: the copy is not known to be pristine
                pass
            self._discard_copy(copy)
            copy = None
        if copy is not None:
            os.rename(copy.path, dest)
            copy.path = os.fspath(dest)
            watcher.drain()
            copy.forget()
            self.reused += 1
        else:
            os.mkdir(dest, 0o700)
            try:
                _Copier(self, defang=defang).run(plan, os.fspath(dest))
                copy = copyreuse.ReusableCopy(
                    os.fspath(dest), key, self._index(plan), defang=defang
                )
                copyreuse.record(copy, watcher)
                copy.since_ns = ctime_mark(scratch)
                watcher.drain()
                copy.forget()
            except BaseException:
                if copy is not None:
                    watcher.unwatch(copy, "")
                _close(scratch, dest, mounted=False, keep_scratch=True)
                raise
        view = CopyView(path=dest, upper=dest, upper_flavor="tree", since_ns=copy.since_ns)
        self._live[id(view)] = copy
        view._closer = functools.partial(self._give_back, id(view), copy, scratch, dest)
        return view

    def reset_view(self, view: View) -> bool:
        """Reset a used view's copy to its image where it is (the view pool's helper calls it
        after the test, then hands the same view out again); False when the copy cannot be
        reset with certainty, or is not a reusable one (the pool then discards the view)."""
        from pytest_layers.backends import copyreuse

        copy = self._live.get(id(view)) if os.getpid() == self._pid else None
        if copy is None or self._watcher is None or self._home is None:
            return False
        self._home.mkdir(exist_ok=True)
        may_mount = _may_mount() and self._bind_ok is not False
        copier = _Copier(self, defang=copy.defang)
        try:
            ok = copyreuse.reset(
                copy, self._watcher, copier, os.fspath(self._home), may_mount=may_mount
            )
        except Exception:  # any failure: the copy is not known to be pristine
            ok = False
        if ok and isinstance(view, CopyView):
            view.since_ns = copy.since_ns
        return ok

    def add_reset_counts(self, reused: int, discarded: int) -> None:
        """Add what a view pool's helper counted: copies it reset and handed out again, copies
        whose reset it refused (the helper is a process of its own)."""
        self.reused += reused
        self.discarded += discarded

    def _give_back(self, view_id: int, copy: ReusableCopy, scratch: Path, dest: Path) -> None:
        """A closed view's copy: reset and kept for the next test, or thrown away."""
        from pytest_layers.backends import copyreuse

        self._live.pop(view_id, None)
        kept = False
        if os.getpid() == self._pid and self._watcher is not None and self._home is not None:
            spares = self._spares.setdefault(copy.key, [])
            try:
                copier = _Copier(self, defang=copy.defang)
                may_mount = _may_mount() and self._bind_ok is not False
                self._home.mkdir(exist_ok=True)
                home = os.fspath(self._home)
                # No reset when no spare is wanted: the work would be thrown away.
                if len(spares) < _SPARES and copyreuse.reset(
                    copy, self._watcher, copier, home, may_mount=may_mount
                ):
                    self._serial += 1
                    kept_at = self._home / str(self._serial)
                    os.rename(dest, kept_at)
                    copy.path = os.fspath(kept_at)
                    self._watcher.drain()
                    copy.forget()
                    spares.append(copy)
                    kept = True
            except Exception:  # any failure: the copy is not known to be pristine
                kept = False
        if kept:
            with contextlib.suppress(OSError):
                os.rmdir(scratch)  # it held only the copy
                return
        else:
            self.discarded += 1
            if self._watcher is not None:
                self._watcher.unwatch(copy, "")
        _close(scratch, dest, mounted=False)

    def _discard_copy(self, copy: ReusableCopy) -> None:
        from pytest_layers._removal import remove_tree

        self.discarded += 1
        if self._watcher is not None:
            self._watcher.unwatch(copy, "")
        remove_tree(Path(copy.path))

    def _index(self, plan: _Plan) -> Index:
        from pytest_layers.backends.copyreuse import index_of

        found = self._indexes.get(id(plan))
        if found is None or found[0] is not plan:
            found = self._indexes[id(plan)] = (plan, index_of(plan))
        return found[1]

    # ---- the copy -----------------------------------------------------------------------------

    def plan(self, lowers_top_first: Sequence[Path], flavor: Flavor = "overlay") -> _Plan:
        """The merged image's entries (memoised per image: layers never change once stored)."""
        key = self._plan_key(lowers_top_first, flavor)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _plan(key[0], flavor)
        return plan

    @staticmethod
    def _plan_key(
        lowers_top_first: Sequence[Path], flavor: str
    ) -> tuple[tuple[str, ...], str, tuple[tuple[int, int, int], ...]]:
        lowers = tuple(os.path.abspath(os.fspath(p)) for p in lowers_top_first)
        # Identity of each layer dir, so that a path reused for other content (tests, a pruned
        # and rebuilt store) is not served from a stale plan (nor a stale copy).
        ident = []
        for p in lowers:
            st = os.stat(p)
            ident.append((st.st_dev, st.st_ino, st.st_ctime_ns))
        return (lowers, flavor, tuple(ident))

    def _copy_data(self, src: str, dst_fd: int, st: os.stat_result, dst_dev: int) -> None:
        sfd = os.open(src, _O_SOURCE)
        try:
            pair = (st.st_dev, dst_dev)
            if self._clone and self._clone_ok.get(pair, True):
                try:
                    fcntl.ioctl(dst_fd, FICLONE, sfd)
                except OSError as exc:
                    if exc.errno not in _NO_CLONE:
                        raise
                    self._clone_ok[pair] = False
                else:
                    self._clone_ok[pair] = True
                    return
            _datacopy.copy_data(sfd, dst_fd, st.st_size, st, dst_dev=dst_dev, strict=True)
        finally:
            os.close(sfd)


def _may_mount() -> bool:
    from pytest_layers import _linux

    return os.geteuid() == 0 or _linux.has_effective_cap(_linux.CAP_SYS_ADMIN)


def _mount_points_in(tree: Path) -> set[str]:
    """Paths relative to ``tree`` of the mounts below it (not ``tree`` itself)."""
    from pytest_layers._mounts import mounts_under

    root = os.path.realpath(tree)
    found = set()
    for point in mounts_under(Path(root)):
        rel = os.path.relpath(point, root)
        if rel != ".":
            found.add(rel)
    return found


def _bind(dest: Path, policy: MountPolicy, *, readonly: bool) -> None:
    """Bind ``dest`` over itself with ``policy``'s flags (and read-only)."""
    from pytest_layers import _linux

    try:
        _linux.mount(dest, dest, None, _linux.MS_BIND)
    except MountError as exc:
        if not readonly:
            raise
        raise BackendUnavailableError(
            "copy",
            f"a read-only view is the copy bind-mounted read-only, and mounting failed here "
            f"({exc.reason}); run as root or in the session's user namespace, or use a "
            "writable view",
        ) from exc
    flags = _linux.MS_BIND | _linux.MS_REMOUNT | policy.ms_flags
    try:
        _linux.mount(None, dest, None, flags | (_linux.MS_RDONLY if readonly else 0), None)
    except BaseException:
        _linux.umount2(dest, _linux.MNT_DETACH)
        raise


def _close(scratch: Path, dest: Path, *, mounted: bool, keep_scratch: bool = False) -> None:
    from pytest_layers import _linux
    from pytest_layers._removal import remove_tree

    if mounted:
        try:
            _linux.umount2(dest, _linux.MNT_DETACH)
        except MountError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
    if keep_scratch:
        for child in os.listdir(scratch):
            remove_tree(scratch / child)
    else:
        remove_tree(scratch)
