"""fuse-overlayfs: an overlay in user space, for machines where kernel overlay cannot mount.

Each view runs one ``fuse-overlayfs -f`` daemon as a child process::

    fuse-overlayfs -f -o lowerdir=l0:l1,upperdir=u,workdir=w m      (cwd: the view's scratch)

The lowers are reached through short symlinks ``scratch/lN``, so the option string stays short
whatever the layer paths are, and paths holding ``:`` or ``,`` (which the option parser would
split on) need no escaping. A read-only view gets no upper and work dir: fuse-overlayfs then
answers every write with ``EROFS``.

The daemon stays in the foreground (``-f``) as our child with ``PR_SET_PDEATHSIG``: if the
process that opened the view dies, even by SIGKILL, the daemon gets SIGTERM and unmounts, so
no mount and no daemon outlive the session. The death signal is set by util-linux's
``setpriv --pdeathsig`` where it has it (so Python starts the daemon with ``vfork``, not a fork
of the whole session), else by a ``preexec_fn``. (The death signal follows the *thread* that started
the daemon: views must be opened from a thread that lives as long as they do, as pytest's main
thread does.) The view pool's helper, which starts a daemon per test, replaces the death signal
with one watcher process (:func:`guard_daemons`): its daemons start with ``vfork`` + exec of
fuse-overlayfs alone, in the watcher's process group, and the watcher sends that group SIGTERM
when the helper is gone.

``open`` returns only once the mount is up (the merged dir's ``st_dev`` changed, and ``statfs``
says fuse); ``close`` unmounts with ``umount2`` as root (lazily if a file is still open) or
``fusermount3 -u`` otherwise, and checks the mount is really gone before removing the scratch
(the daemon exits by itself and is reaped later).

Layers in either whiteout flavor are fine as lowers: fuse-overlayfs reads 0/0 character
devices, ``.wh.NAME`` files and ``.wh..wh..opq`` markers alike (verified with fuse-overlayfs
1.10). In its upper dir it writes 0/0 devices for deletions and, for an opaque directory, a
``.wh..wh..opq`` file (plus a 0/0 device named ``.wh..opq`` as root, or the
``user.fuseoverlayfs.opaque`` xattr unprivileged), which
:func:`~pytest_layers.changeset.changes_from_upper` with ``upper_flavor="fuse"`` translates.
A mount costs a few milliseconds (a process start), against ~0.1 ms for kernel overlay.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_layers import _linux, _ocirules
from pytest_layers.backends.base import MountPolicy, View, trial, trial_whiteout
from pytest_layers.errors import BackendUnavailableError, MountError

if TYPE_CHECKING:
    from pytest_layers.changeset import Entry, ImageView
    from pytest_layers.layertar import Flavor

__all__ = ["FuseBackend"]

_PR_SET_PDEATHSIG = 1
_FUSE = _linux.FUSE_SUPER_MAGIC
#: How long a mount may take to appear or a daemon to exit before we give up.
MOUNT_TIMEOUT = 10.0


def _die_with_parent() -> None:
    # Runs in the forked child before exec: only async-signal-safe work (a bare syscall).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@functools.cache
def _setpriv() -> str | None:
    """util-linux's ``setpriv``, when it can set the death signal (2.33 and later).

    Through it the daemon is started with ``vfork`` + exec: a ``preexec_fn`` makes Python
    fork the whole process instead, and copying (then tearing down) the page tables of a pytest
    session took a third of a fuse view's CPU time (``perf``: ``copy_page_range``,
    ``unmap_page_range``). The death signal survives the exec into fuse-overlayfs."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in done.stdout else None


class _Watcher:
    """A shell that leads the process group of the daemons started by this process, and sends
    the group SIGTERM when this process is gone (however it ended: the pipe it reads reaches
    end of file when the last holder of the write end, this process, exits)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        try:
            # TERM and INT ignored: the shell outlives its own kill, and a Ctrl-C (to the
            # terminal's group, not this one) never reaches the daemons.
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", "trap '' TERM INT HUP; read _; kill -TERM 0"],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                **_NEW_GROUP,
            )
        except BaseException:
            os.close(self.write_end)
            raise
        finally:
            os.close(read_end)

    def close(self) -> None:
        """Release the daemons still running to the watcher (it sends them SIGTERM) and wait
        for it."""
        os.close(self.write_end)
        self.proc.wait()


_watcher: _Watcher | None = None
#: Popen's process_group (Python 3.11): a new group, led by the watcher.
_CAN_GROUP: bool = sys.version_info >= (3, 11)
_NEW_GROUP: dict[str, Any] = {"process_group": 0}


def guard_daemons() -> None:
    """From now on, start this process's daemons without a death signal, in the process group
    of a watcher that ends them when this process ends (the view pool's helper calls it once).

    A death signal cannot be set without running code between fork and exec: in a Python
    process either a full fork (``preexec_fn``) or an exec of ``setpriv`` first, which together
    with its dynamic loading cost more CPU than the rest of a pooled view's preparation. One
    watcher per process replaces both."""
    global _watcher
    if not _CAN_GROUP:
        return  # no process_group for Popen before 3.11: the daemons keep their death signal
    if _watcher is None or _watcher.owner != os.getpid():
        _watcher = _Watcher()


def release_daemons() -> None:
    """Undo :func:`guard_daemons` (the helper, cleaned up, is about to exit)."""
    global _watcher
    watcher, _watcher = _watcher, None
    if watcher is not None and watcher.owner == os.getpid():
        watcher.close()


def _group() -> int | None:
    """The process group new daemons join, None when they get a death signal instead.

    A watcher that is gone (only SIGKILL ends it) leaves the daemons already in its group
    unguarded until this process ends them: they are not moved (a child cannot change groups
    after its exec) nor signalled later by group id (the number may be another group's by
    then). New daemons get a death signal from then on."""
    watcher = _watcher
    if watcher is None or watcher.owner != os.getpid() or watcher.proc.poll() is not None:
        return None
    return watcher.proc.pid


def _mounted_at(merged: Path) -> bool:
    """Something is mounted on ``merged``: it sits on another device than its parent (two
    stats, where reading the mount table costs a parse of every mount of the namespace; a
    view is closed from the pool's cleaner thread, 300 times a second)."""
    try:
        return os.stat(merged).st_dev != os.stat(merged.parent).st_dev
    except FileNotFoundError:
        return False
    except OSError:
        # ENOTCONN: a fuse mount whose daemon is gone is still a mount.
        return _in_mountinfo(os.fspath(merged))


def _in_mountinfo(path: str) -> bool:
    from pytest_layers._mounts import mounts_under

    # The mount table holds canonical paths: a store given as ../store must still match.
    real = Path(os.path.realpath(path))
    return real in mounts_under(real)


class FuseBackend:
    """Views mounted by ``fuse-overlayfs`` (see the module docstring).

    ``binary`` overrides the ``fuse-overlayfs`` found on ``PATH``; ``policy`` says whether views
    honour setuid bits and device nodes (default: neither, ``-o nosuid,nodev``).
    """

    name = "fuse"

    def __init__(self, *, binary: str | None = None, policy: MountPolicy | None = None) -> None:
        self._binary = binary
        self.policy = policy or MountPolicy()

    # ---- the view pool's helper -------------------------------------------------------------

    def helper_started(self) -> None:
        """In a view pool's helper, before its first view: :func:`guard_daemons`."""
        guard_daemons()

    def helper_ending(self) -> None:
        """In a view pool's helper, its views cleaned: :func:`release_daemons`."""
        release_daemons()

    # ---- Backend protocol -------------------------------------------------------------------

    def check(self, scratch: Path) -> None:
        """Check the binary and ``/dev/fuse``, then mount a two-layer image (with a whiteout in
        each flavor the scratch filesystem can hold), write, delete, read back, check the upper
        dir records the deletion, and unmount."""
        self._binary_path()
        if not os.path.exists("/dev/fuse"):
            raise BackendUnavailableError(
                self.name, "/dev/fuse does not exist (modprobe fuse, or pass --device /dev/fuse)"
            )
        if (
            os.geteuid() != 0
            and not os.access("/dev/fuse", os.R_OK | os.W_OK)
            and shutil.which("fusermount3") is None
            and shutil.which("fusermount") is None
        ):
            raise BackendUnavailableError(
                self.name,
                "/dev/fuse is not usable by this user and fusermount3 is not installed "
                "(apt-get install fuse3)",
            )
        lower0 = scratch / "check-l0"
        lower1 = scratch / "check-l1"
        view_scratch = scratch / "check-view"
        with trial(self.name, "trial mount failed", lower0, lower1, view_scratch):
            lower0.mkdir()
            for name in ("keep", "gone", "gone2"):
                (lower0 / name).write_text("lower\n")
            lower1.mkdir()
            # A store on overlayfs (a container's root) is of the marker flavor, and
            # fuse-overlayfs writes .wh. files in an upper dir there too.
            flavor = trial_whiteout(lower1, "gone")
            (lower1 / _ocirules.whiteout_name("gone2")).write_text("")
            view_scratch.mkdir()
            try:
                view = self.open([lower1, lower0], view_scratch, flavor=flavor)
            except MountError as exc:
                raise BackendUnavailableError(self.name, f"trial mount failed: {exc}") from exc
            try:
                seen = sorted(os.listdir(view.path))
                (view.path / "new").write_text("upper\n")
                (view.path / "keep").unlink()
                after = sorted(os.listdir(view.path))
                recorded = _deleted_in_upper(view)
            finally:
                view.close()
            if seen != ["keep"] or after != ["new"]:
                raise BackendUnavailableError(
                    self.name,
                    f"trial mount shows {seen} then {after}, expected ['keep'] then ['new'] "
                    "(whiteouts of the lower layer not applied?)",
                )
            if "keep" not in recorded:
                raise BackendUnavailableError(
                    self.name,
                    "the trial mount's upper dir does not record the deletion of a lower file "
                    "(neither a 0/0 device nor a .wh. file), so commits would lose deletions",
                )

    def open(
        self,
        lowers_top_first: Sequence[Path],
        scratch: Path,
        *,
        readonly: bool = False,
        flavor: Flavor = "overlay",
    ) -> View:
        """Mount the union at ``scratch/m`` (upper ``u``, work ``w``, lower links ``lN``)."""
        return self.begin_open(lowers_top_first, scratch, readonly=readonly, flavor=flavor)()

    def begin_open(
        self,
        lowers_top_first: Sequence[Path],
        scratch: Path,
        *,
        readonly: bool = False,
        flavor: Flavor = "overlay",
    ) -> Callable[[], View]:
        """Start the daemon of :meth:`open` and return what waits for its mount and returns
        the view (or raises, the scratch emptied). A daemon takes milliseconds to mount: the
        view pool's helper starts a few before it waits for the first."""
        _ocirules.check_flavor(flavor)
        binary = self._binary_path()
        merged = scratch / "m"
        os.mkdir(merged)
        lowers = list(lowers_top_first)
        if not lowers:
            empty = scratch / "e"
            os.mkdir(empty)
            lowers = [empty]
        for i, lower in enumerate(lowers):
            # In scratch itself: every extra directory costs an rmdir at close.
            os.symlink(os.path.abspath(lower), scratch / f"l{i}")
        opts = "lowerdir=" + ":".join(f"l{i}" for i in range(len(lowers)))
        upper: Path | None = None
        if not readonly:
            upper = scratch / "u"
            os.mkdir(upper)
            os.mkdir(scratch / "w")
            opts += ",upperdir=u,workdir=w"
        # fuse-overlayfs mounts as root with suid (and nodev) unless told; fusermount3 forces
        # nosuid,nodev for an ordinary user anyway.
        opts += "," + ",".join(self.policy.words)
        log_path = scratch / "log"
        _reap()
        try:
            argv = [binary, "-f", "-o", opts, "m"]
            group = _group()
            setpriv = None if group is not None else _setpriv()
            # In a watcher's group the watcher ends the daemon; else the death signal, without
            # setpriv a single prctl syscall, in a full fork.
            extra: dict[str, Any] = (
                {"process_group": group}
                if group is not None
                else {"preexec_fn": None if setpriv else _die_with_parent}
            )
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv,
                    cwd=scratch,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    **extra,
                )
        except BaseException:
            _empty(scratch)
            raise

        def finish() -> View:
            try:
                try:
                    _wait_mounted(proc, scratch, merged, log_path)
                except BaseException:
                    _stop(proc, merged)
                    raise
            except BaseException:
                _empty(scratch)
                raise
            return View(
                path=merged,
                upper=upper,
                upper_flavor="fuse",
                _closer=lambda: _close(proc, merged, scratch),
            )

        return finish

    def changes(
        self, view: View, image: ImageView, *, exclude: Collection[str] = ()
    ) -> list[Entry]:
        """Read the upper dir (0/0 whiteouts, ``.wh..wh..opq`` and the fuse opaque xattr),
        plus the hardlink partners a write changed too (:func:`_with_link_partners`)."""
        from pytest_layers.changeset import ImageView, changes_from_upper

        if view.upper is None:
            return []
        partners_image = ImageView(image.layers, image.flavor)
        entries = changes_from_upper(view.upper, image, upper_flavor="fuse", exclude=exclude)
        try:
            return _with_link_partners(entries, view.path, partners_image, set(exclude))
        finally:
            partners_image.close()

    def _binary_path(self) -> str:
        found = self._binary or shutil.which("fuse-overlayfs")
        if found is None or not os.access(found, os.X_OK):
            raise BackendUnavailableError(
                self.name,
                f"{self._binary or 'fuse-overlayfs'} is not installed or not executable "
                "(apt-get install fuse-overlayfs)",
            )
        return found


def _empty(scratch: Path) -> None:
    from pytest_layers._removal import remove_tree

    for child in os.listdir(scratch):
        remove_tree(scratch / child)


def _with_link_partners(
    entries: list[Entry], merged: Path, image: ImageView, exclude: set[str]
) -> list[Entry]:
    """Make the change list say what the view shows for hardlinks of the image.

    fuse-overlayfs keeps a lower hardlink group one inode in the view: a write through one
    name shows through every name (kernel overlay with ``index=off`` breaks the link at
    copy-up instead), but the upper dir holds a single copy, under one of the names. A snapshot
    taken from the upper alone would then show the other names unchanged. So every name of a
    changed lower inode that is still that inode in the view becomes a ``C`` entry, all read
    from the view, where they share an inode: the layer keeps them as one hardlink group with
    the content the test saw.
    """
    from pytest_layers._changebase import Entry, _sort_key

    have = {e.path: e for e in entries}
    by_layer: dict[int, dict[int, list[str]]] = {}
    extra: dict[str, Entry] = {}
    for entry in entries:
        if entry.kind != "C" or entry.root is None:
            continue
        found = image._find(entry.path)
        if found is None:
            continue
        layer, st = found
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            continue
        try:
            seen = os.lstat(merged / entry.path)
        except OSError:
            continue
        if layer not in by_layer:
            by_layer[layer] = _names_by_inode(image.layers[layer])
        names = [entry.path] + [
            rel for rel in by_layer[layer].get(st.st_ino, []) if rel != entry.path
        ]
        group = []
        for rel in names:
            if rel in exclude:
                continue
            try:
                other = os.lstat(merged / rel)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (seen.st_dev, seen.st_ino):
                group.append(rel)
        if len(group) < 2:
            continue
        for rel in group:
            extra[rel] = Entry(rel, "C", root=merged)
            parent = rel.rpartition("/")[0]
            while parent and parent not in have and parent not in extra:
                extra[parent] = Entry(parent, "C", root=merged)
                parent = parent.rpartition("/")[0]
    if not extra:
        return entries
    merged_entries = {**have, **extra}
    return sorted(merged_entries.values(), key=lambda e: _sort_key(e.path))


def _names_by_inode(layer_dir: Path) -> dict[int, list[str]]:
    """Every non-directory of a layer whose inode has several names, by inode number."""
    from pytest_layers import _dirfd

    names: dict[int, list[str]] = {}

    def visit(rel_dir: str, fd: int, _state: None) -> list[tuple[str, _dirfd.Ident, None]]:
        subdirs: list[tuple[str, _dirfd.Ident, None]] = []
        with os.scandir(fd) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append((e.name, (st.st_dev, st.st_ino), None))
                elif st.st_nlink > 1:
                    names.setdefault(st.st_ino, []).append(rel)
        return subdirs

    _dirfd.walk(layer_dir, None, visit)
    return names


def _deleted_in_upper(view: View) -> set[str]:
    """Names the upper dir's top level marks as deleted, in either spelling."""
    if view.upper is None:
        return set()
    deleted = set()
    for entry in os.scandir(view.upper):
        target = _ocirules.whiteout_target(entry.name)
        if target is not None and entry.is_file(follow_symlinks=False):
            deleted.add(target)
            continue
        st = entry.stat(follow_symlinks=False)
        if _ocirules.is_whiteout_device(st):
            deleted.add(entry.name)
    return deleted


def _wait_mounted(proc: subprocess.Popen[bytes], scratch: Path, merged: Path, log: Path) -> None:
    base_dev = os.stat(scratch).st_dev
    deadline = time.monotonic() + MOUNT_TIMEOUT
    delay = 0.0002
    while True:
        code = proc.poll()
        if code is not None:
            raise MountError(
                errno.EIO,
                f"fuse-overlayfs exited with status {code} before mounting {merged}: "
                f"{_log_tail(log)}",
            )
        # The merged dir changes device the moment the mount is up; statfs confirms it is a
        # fuse mount and not something else stacked there (a read of the mount table did, at
        # a quarter of the helper's CPU per view).
        if os.stat(merged).st_dev != base_dev and _linux.fs_magic(merged) == _FUSE:
            return
        if time.monotonic() > deadline:
            raise MountError(
                errno.ETIMEDOUT,
                f"fuse-overlayfs did not mount {merged} within {MOUNT_TIMEOUT:.0f} s: "
                f"{_log_tail(log)}",
            )
        time.sleep(delay)
        # Capped at 1 ms: with steps of 0.2, 0.4, ... 6.4 ms, a mount up after 6.3 ms was seen
        # at 12.6 ms, and the view pool's helper makes views one after another; a poll (a
        # waitpid and a stat) costs ~10 us.
        delay = min(delay * 2, 0.001)


def _log_tail(log: Path) -> str:
    try:
        lines = [
            line
            for line in log.read_text(errors="replace").splitlines()
            # fuse-overlayfs 1.10 warns about every mount option it does not know.
            if line.strip() and not line.startswith("unknown argument ignored")
        ]
    except OSError:
        lines = []
    return " | ".join(lines[-5:]) or "(no output)"


def _unmount(merged: Path) -> None:
    if os.geteuid() == 0:
        try:
            _linux.umount2(merged)
        except MountError as exc:
            if exc.errno == errno.EBUSY:
                # A test left a file open: detach now, the daemon goes when it is closed.
                _linux.umount2(merged, _linux.MNT_DETACH)
            elif exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    done = subprocess.run([tool, "-u", os.fspath(merged)], capture_output=True, text=True)
    if done.returncode != 0 and _in_mountinfo(os.fspath(merged)):
        lazy = subprocess.run([tool, "-u", "-z", os.fspath(merged)], capture_output=True, text=True)
        if lazy.returncode != 0:
            raise MountError(
                errno.EBUSY, f"{tool} -u {merged} failed: {(done.stderr or lazy.stderr).strip()}"
            )


# Daemons whose mount is gone but which may still be exiting; reaped without waiting.
_exiting: list[subprocess.Popen[bytes]] = []


def _reap() -> None:
    _exiting[:] = [proc for proc in _exiting if proc.poll() is None]


def _stop(proc: subprocess.Popen[bytes], merged: Path) -> None:
    """Unmount (if mounted); the daemon exits by itself once its mount is gone.

    Waiting for that exit costs milliseconds per view, so the daemon is reaped later (at the
    next open or close). One that still serves a lazily detached mount (a test left a file
    open) keeps running until that file is closed, or dies with us (PDEATHSIG)."""
    if proc.poll() is None and _mounted_at(merged):
        _unmount(merged)
    _exiting.append(proc)
    _reap()


def _close(proc: subprocess.Popen[bytes], merged: Path, scratch: Path) -> None:
    from pytest_layers._removal import remove_tree_seen_unmounted

    _stop(proc, merged)
    if _mounted_at(merged):
        raise MountError(errno.EBUSY, f"fuse-overlayfs mount {merged} is still there after unmount")
    remove_tree_seen_unmounted(scratch)
