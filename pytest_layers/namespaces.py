"""Mount namespaces: where the session's mounts live, and cleaning up after dead sessions.

Two ways in, both to be called **before any other thread exists** (``unshare`` moves only the
calling thread, and ``CLONE_NEWUSER`` refuses a multi-threaded process outright):

* :func:`enter_private_mount_namespace` (root): a new mount namespace with ``/`` made
  ``rprivate``. Every mount made afterwards is invisible to other processes and is torn down by
  the kernel when the last process in the namespace exits, even on SIGKILL.
* :func:`enter_user_namespace` (an ordinary user, kernel >= 5.11): a user namespace mapping the
  uid and gid to themselves (``os.getuid()`` is unchanged) plus a mount namespace, in which the
  process may mount overlayfs. The capabilities overlay needs are raised as *ambient*, so
  processes exec'd later (pytest-xdist workers) can mount too.

Both record the namespace in :data:`ENV_VAR` so that child processes, which inherit the
namespace, know not to enter another one (:func:`inside_our_namespace`).

In host mode (``layers_mount_namespace=host``) mounts are made in the host namespace and may
outlive a killed session; :func:`sweep_stale_mounts` removes those of dead sessions. Call it
*before* entering a private namespace, or it only detaches the namespace's private copies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev venv

from pytest_layers import _dirfd, _linux, _subids
from pytest_layers.errors import BackendUnavailableError, MountError

__all__ = [
    "ENV_VAR",
    "USERNS_CAPS",
    "NamespaceInfo",
    "enter_private_mount_namespace",
    "enter_user_namespace",
    "mount_scratch_tmpfs",
    "inside_our_namespace",
    "current_namespace",
    "other_threads",
    "userns_disabled_reason",
    "session_dir_name",
    "parse_session_dir_name",
    "mounts_under",
    "mountinfo",
    "mount_at",
    "MountEntry",
    "sweep_stale_mounts",
    "remove_tree",
    "detach_mounts_under",
]

#: Set by the process that entered the namespace: ``"<kind>:<mnt ns link>"``, kind is
#: ``"private"`` or ``"userns"``. Children exec'd inside inherit both the namespace and this.
ENV_VAR = "PYTEST_LAYERS_MOUNT_NS"

#: Raised as ambient in a user namespace. CAP_SYS_ADMIN lets exec'd children mount; the others
#: are what overlay's copy-up uses (it runs with the mounter's credentials) to copy files the
#: user owns but cannot read or write, such as a lower file with mode 000 that a test chmods.
#: They only apply to files whose owner is mapped, i.e. the user's own files: the same power root
#: has over every file in a root session.
USERNS_CAPS = (
    _linux.CAP_SYS_ADMIN,
    _linux.CAP_CHOWN,
    _linux.CAP_DAC_OVERRIDE,
    _linux.CAP_DAC_READ_SEARCH,
    _linux.CAP_FOWNER,
    _linux.CAP_MKNOD,
    _linux.CAP_SETFCAP,
)

# Module-level so tests can point them at fake files.
_SYSCTL_MAX_USERNS = Path("/proc/sys/user/max_user_namespaces")
_SYSCTL_DEBIAN_USERNS = Path("/proc/sys/kernel/unprivileged_userns_clone")
_SYSCTL_APPARMOR_USERNS = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")


@dataclass(frozen=True)
class NamespaceInfo:
    """Which namespace the process is in: ``kind`` is ``"private"`` or ``"userns"``."""

    kind: str
    mnt_ns: str


def current_namespace() -> str:
    """The mount namespace of this process, as the kernel names it (``mnt:[4026531841]``)."""
    return os.readlink("/proc/self/ns/mnt")


def inside_our_namespace() -> NamespaceInfo | None:
    """The namespace a parent process entered for us, if this process is still inside it.

    A pytest-xdist worker inherits both the namespace and :data:`ENV_VAR` and must not unshare
    again (a nested user namespace would lose the uid mapping's meaning; a nested mount
    namespace would hide its mounts from the controller for nothing). The check of
    ``/proc/self/ns/mnt`` guards against a stale variable inherited by an unrelated process.
    """
    value = os.environ.get(ENV_VAR, "")
    kind, sep, ns = value.partition(":")
    if not sep or kind not in ("private", "userns"):
        return None
    try:
        if current_namespace() != ns:
            return None
    except OSError:
        return None
    return NamespaceInfo(kind, ns)


def other_threads() -> list[str]:
    """Names of threads other than the calling one (Python's view, then the kernel's)."""
    names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    # Threads started from C (a library, a JIT) are invisible to the threading module.
    extra = tasks - 1 - len(names)
    if extra > 0:
        names.append(f"{extra} thread(s) not started from Python")
    return names


def _refuse_threads(backend: str, what: str) -> None:
    names = other_threads()
    if names:
        raise BackendUnavailableError(
            backend,
            f"cannot enter a {what} because {len(names)} other thread(s) already run "
            f"({', '.join(names[:5])}); unshare(2) only moves the calling thread. Enter it "
            "before starting threads (the plugin does so at pytest_configure; a plugin or "
            "conftest that starts threads earlier prevents it)",
        )


def _mark(kind: str) -> NamespaceInfo:
    ns = current_namespace()
    os.environ[ENV_VAR] = f"{kind}:{ns}"
    return NamespaceInfo(kind, ns)


def enter_private_mount_namespace() -> NamespaceInfo:
    """As root: move this process into a new mount namespace with ``/`` made rprivate.

    Does nothing (and returns the namespace) when the process is already inside one that a
    parent entered for it. Raises :class:`BackendUnavailableError` with the reason when it cannot.
    """
    inherited = inside_our_namespace()
    if inherited is not None:
        return inherited
    _refuse_threads("overlay", "private mount namespace")
    try:
        _linux.unshare(_linux.CLONE_NEWNS)
        # Without this, mounts would propagate back to the host through shared peer groups.
        _linux.mount("none", "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
    except MountError as exc:
        hint = "" if os.geteuid() == 0 else "; as an ordinary user use enter_user_namespace()"
        if exc.errno in (errno.EPERM, errno.EACCES) and os.geteuid() == 0:
            # Short first clause: the report header shows it.
            raise BackendUnavailableError(
                "overlay",
                f"{MOUNT_REFUSED} (a seccomp filter or no CAP_SYS_ADMIN, as in a default Docker "
                f"container: {exc})",
            ) from exc
        raise BackendUnavailableError(
            "overlay", f"cannot enter a private mount namespace: {exc}{hint}"
        ) from exc
    return _mark("private")


#: The one-line fix for AppArmor's restriction of unprivileged user namespaces.
APPARMOR_SYSCTL_FIX = "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
#: How a reason starts when root may not mount at all.
MOUNT_REFUSED = "mounting is refused here"
#: How a reason starts when a user namespace was created but gives no right to mount.
USERNS_NO_MOUNT = "created but mounting in it is refused"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def userns_disabled_reason() -> str | None:
    """Why unprivileged user namespaces are switched off on this machine, or None."""
    if _read_int(_SYSCTL_MAX_USERNS) == 0:
        return (
            "user namespaces are disabled (user.max_user_namespaces = 0); enable them with "
            "`sysctl -w user.max_user_namespaces=15000`, or run as root"
        )
    if _read_int(_SYSCTL_DEBIAN_USERNS) == 0:
        return (
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0); "
            "enable them with `sysctl -w kernel.unprivileged_userns_clone=1`, or run as root"
        )
    if _read_int(_SYSCTL_APPARMOR_USERNS) == 1:
        return (
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns = 1); allow them with "
            f"`{APPARMOR_SYSCTL_FIX}` or an AppArmor profile "
            "for the Python interpreter granting `userns`, or run as root"
        )
    return None


def enter_user_namespace(caps: tuple[int, ...] = USERNS_CAPS) -> NamespaceInfo:
    """As an ordinary user: enter a user + mount namespace where this process may mount overlay.

    The uid and gid are mapped to themselves, so ``os.getuid()`` and file ownership look the
    same inside; ``setgroups`` is denied (the kernel requires it for an unprivileged gid map).
    ``caps`` are raised as inheritable and ambient so that exec'd children keep them.
    Does nothing when a parent already entered it for us. Raises
    :class:`BackendUnavailableError` with the reason and the fix when it is impossible.
    """
    inherited = inside_our_namespace()
    # A root session's private namespace, inherited by a process that dropped to an ordinary
    # user (runuser, su), gives no right to mount: that process needs its own user namespace.
    if inherited is not None and inherited.kind == "userns":
        return inherited
    disabled = userns_disabled_reason()
    if disabled is not None:
        raise BackendUnavailableError("overlay", disabled)
    _refuse_threads("overlay", "user namespace")
    uid, gid = os.getuid(), os.getgid()
    extra = _subids.for_session()
    helper = _start_map_helper(extra, uid, gid) if extra else None
    try:
        _linux.unshare(_linux.CLONE_NEWUSER | _linux.CLONE_NEWNS)
    except MountError as exc:
        if helper is not None:
            _finish_map_helper(helper, go=False)
        if exc.errno == errno.EINVAL and other_threads():
            why = "another thread appeared while entering it"
        elif exc.errno in (errno.EPERM, errno.EACCES):
            why = (
                "the kernel refused an unprivileged user namespace (EPERM): a seccomp filter "
                "(as in a default Docker container), an LSM policy, or a chroot prevents it; "
                "run as root, or allow unshare(CLONE_NEWUSER)"
            )
        elif exc.errno == errno.ENOSPC:
            why = (
                "the user namespace limit is reached (user.max_user_namespaces, or the nesting "
                "depth of 32); raise it with `sysctl -w user.max_user_namespaces=15000`"
            )
        else:
            why = str(exc)
        raise BackendUnavailableError("overlay", f"cannot enter a user namespace: {why}") from exc
    if helper is not None and _finish_map_helper(helper, go=True):
        # The subordinate range is ours here too: sandboxes pass it on (they write their
        # children's maps, which takes CAP_SETUID/CAP_SETGID here, kept across exec).
        caps = (*caps, _linux.CAP_SETGID, _linux.CAP_SETUID)
    try:
        if not Path("/proc/self/uid_map").read_text().strip():
            _linux.write_proc("/proc/self/setgroups", "deny")
            _linux.write_proc("/proc/self/uid_map", f"{uid} {uid} 1")
        if not Path("/proc/self/gid_map").read_text().strip():
            with contextlib.suppress(OSError):  # already "deny", or newgidmap wrote uid_map
                _linux.write_proc("/proc/self/setgroups", "deny")
            _linux.write_proc("/proc/self/gid_map", f"{gid} {gid} 1")
        # The namespace starts with the host's propagation; make ours private so our mounts
        # stay ours (the new mount namespace is already a copy owned by the new user ns).
        _linux.mount("none", "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
        _linux.ambient_raise(caps)
    except OSError as exc:
        if isinstance(exc, MountError) and exc.errno in (errno.EPERM, errno.EACCES):
            # The namespace exists but its capabilities do not work: AppArmor's restriction
            # (Ubuntu 23.10+, GitHub's ubuntu-24.04 runners) looks exactly like this.
            raise BackendUnavailableError(
                "overlay",
                f"{USERNS_NO_MOUNT} ({exc.strerror}), as under AppArmor's restriction of "
                "unprivileged user namespaces; allow them with "
                f"`{APPARMOR_SYSCTL_FIX}`, or run as root",
            ) from exc
        raise BackendUnavailableError(
            "overlay", f"entered a user namespace but could not set it up: {exc}"
        ) from exc
    return _mark("userns")


def _start_map_helper(extra: _subids.Ranges, uid: int, gid: int) -> tuple[int, int]:
    """Fork, before ``unshare``, the process that maps the subordinate ids of our new user
    namespace: only a process still outside may (newuidmap is setuid, which counts only there;
    a parent namespace's CAP_SETUID likewise). It waits for a byte on a pipe; ``(pid, go_w)``."""
    target = os.getpid()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child (measured by its effects)
        code = 1
        try:
            os.close(go_w)
            if os.read(go_r, 1) == b"1":
                _subids.write(
                    target,
                    extra,
                    _subids.lines(uid, extra.uids, identity=True),
                    _subids.lines(gid, extra.gids, identity=True),
                )
                code = 0
        except BaseException:  # a forked copy must end in _exit; we then map alone
            pass
        os._exit(code)
    os.close(go_r)
    return pid, go_w


def _finish_map_helper(helper: tuple[int, int], *, go: bool) -> bool:
    """Let the helper map us (or tell it to give up); whether both maps are written."""
    pid, go_w = helper
    with contextlib.suppress(OSError):
        if go:
            os.write(go_w, b"1")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    return go and os.waitstatus_to_exitcode(status) == 0


def mount_scratch_tmpfs(path: Path, *, size: str = "50%") -> None:
    """Mount a tmpfs at ``path`` (an existing dir) for per-test scratch (overlay upper dirs).

    Measured on the project machine, an overlay mount whose upper and work dirs sit on ext4
    costs ~0.55 ms to create and ~0.27 ms to unmount (overlay probes the work dir with several
    metadata operations and syncs the upper fs at unmount), against ~0.04 ms and ~0.08 ms on
    tmpfs. Inside a private or user mount namespace the tmpfs is invisible to other processes
    and vanishes with the session. A test's writes then live in memory, bounded by ``size``.
    """
    _linux.mount("tmpfs", path, "tmpfs", 0, f"mode=0755,size={size}")


# ---- host mode: naming session scratch dirs and sweeping stale mounts -------------------------


def _start_ticks(pid: int) -> int:
    # create_time() is boot time + start ticks / CLK_TCK, so hundredths are exact and stable
    # across calls; an int keeps the directory name free of dots and exponents.
    created: float = psutil.Process(pid).create_time()
    return round(created * 100)


def session_dir_name(pid: int | None = None) -> str:
    """``"<pid>-<start time>"``: names a session's scratch dir so a later session can tell
    whether its owner is still alive, even after the pid was reused."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_ticks(pid)}"


def parse_session_dir_name(name: str) -> tuple[int, int | None] | None:
    """``(pid, start)`` from a :func:`session_dir_name`, or None for any other name.

    A bare ``"<pid>"`` is accepted too, with ``start`` None: its owner counts as alive while
    any process has that pid (pid reuse then keeps its mounts until the pid is free).
    """
    pid, sep, start = name.partition("-")
    if not pid.isdigit() or (sep and not start.isdigit()):
        return None
    return int(pid), (int(start) if sep else None)


def _session_alive(pid: int, start: int | None) -> bool:
    try:
        ticks = _start_ticks(pid)
        return start is None or abs(ticks - start) <= 1
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        # Cannot tell (zombie, access): assume alive, never touch what may be someone's.
        return True


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``: the mount id, where it is mounted, the filesystem
    type, the source and the per-mount options (``nosuid``, ``nodev``, ``ro``...)."""

    mnt_id: int
    point: Path
    fstype: str
    source: str
    options: frozenset[str]


def mountinfo() -> list[MountEntry]:
    """This process's mounts, in ``/proc/self/mountinfo`` order (parents before children)."""
    found: list[MountEntry] = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = os.fsdecode(line.rstrip(b"\n")).split(" ")
            try:
                sep = fields.index("-", 6)
                found.append(
                    MountEntry(
                        int(fields[0]),
                        Path(_unescape_mountinfo(fields[4])),
                        fields[sep + 1],
                        _unescape_mountinfo(fields[sep + 2]),
                        frozenset(fields[5].split(",")),
                    )
                )
            except (ValueError, IndexError):
                continue
    return found


def mount_at(point: Path) -> MountEntry | None:
    """The topmost mount at ``point`` (an absolute path without symlinks), or None."""
    found = None
    for entry in mountinfo():
        if entry.point == point:
            found = entry
    return found


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` in this process's namespace, deepest first."""
    prefix = os.path.realpath(root)
    found: list[Path] = []
    for entry in mountinfo():
        point = os.fspath(entry.point)
        if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
            found.append(entry.point)
    found.sort(key=lambda p: len(p.parts), reverse=True)
    return found


def _session_dirs(views: Path) -> Iterator[tuple[Path, int, int | None]]:
    try:
        entries = list(os.scandir(views))
    except FileNotFoundError:
        return
    for entry in entries:
        parsed = parse_session_dir_name(entry.name)
        if parsed is not None and entry.is_dir(follow_symlinks=False):
            yield Path(entry.path), parsed[0], parsed[1]


def detach_mounts_under(root: Path) -> list[Path]:
    """Lazily unmount every mount at or below ``root``, deepest first; returns those detached.

    A mount that cannot be detached (another user's, as an ordinary user) is left: the tree
    walkers never cross into it anyway (they compare mount ids).
    """
    detached: list[Path] = []
    try:
        points = mounts_under(root)
    except OSError:
        return detached
    for point in points:
        try:
            _linux.umount2(point, _linux.MNT_DETACH | _linux.UMOUNT_NOFOLLOW)
        except MountError:
            continue
        detached.append(point)
    return detached


#: Directory fds :func:`remove_tree` keeps open along its path; deeper ancestors are reopened
#: through ``..`` and checked to be the same directory (module-level so tests can lower it).
_KEEP_OPEN = 16

#: Called with each directory's relative path as :func:`remove_tree` enters it. Tests set it
#: to move directories under the walk at a known moment; nothing in the package sets it.
_walk_hook: Callable[[str], None] | None = None


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, best effort.

    Every mount at or below ``path`` is detached first (a bind mount a test left in its rootfs
    would otherwise be emptied through it), and the walk never enters a directory on another
    mount (mount id, not ``st_dev``: a bind of the same filesystem shares the device).

    Copes with the mode-000 ``work/work`` dirs overlay leaves behind (they are opened up first)
    and with trees deeper than ``PATH_MAX`` or Python's recursion limit, which a test's rw layer
    may hold (``shutil.rmtree`` fails on both): the walk is iterative, every name relative to a
    directory fd, never following a symlink. Climbing back to a parent uses the parent's fd
    kept from the way down, or (for deep trees) ``..`` checked to be the same directory
    (device and inode) as on the way down: a directory moved out of the tree during the walk
    stops it instead of leading it into the directory it was moved to.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    detach_mounts_under(path)
    try:
        fd = _open_dir(os.fspath(path), None, (st.st_dev, st.st_ino))
    except OSError:
        return
    try:
        _remove_contents(_dirfd.DirStack(fd, keep=_KEEP_OPEN), _linux.mount_id("", fd))
    except OSError:
        return  # best effort: a tree changed under the walk is left, never chased
    with contextlib.suppress(OSError):
        os.rmdir(path)


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None, ident: tuple[int, int]) -> int:
    """Open the directory ``name`` that was lstat'ed as ``ident``; never through a symlink,
    and refuse (``ESTALE``) a different directory swapped in since the lstat."""
    try:
        fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    except PermissionError:
        # A mode-000 dir (overlay's work/work; a test's chmod): open it up. chmod on an O_PATH
        # fd's /proc link changes the inode the fd holds, never a symlink's target.
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            pst = os.fstat(path_fd)
            if not stat.S_ISDIR(pst.st_mode) or (pst.st_dev, pst.st_ino) != ident:
                raise OSError(errno.ESTALE, f"{name} changed under the walk") from None
            os.chmod(f"/proc/self/fd/{path_fd}", stat.S_IRWXU)
        finally:
            os.close(path_fd)
        fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != ident:
        os.close(fd)
        raise OSError(errno.ESTALE, f"{name} changed under the walk")
    return fd


def _remove_contents(dirs: _dirfd.DirStack, mnt: int) -> None:
    """Empty the directory at the bottom of ``dirs`` (which it closes), staying on mount
    ``mnt``."""
    with dirs:
        # Per level below the top: the directory's name in its parent and the names still to
        # remove in the parent. Sorted so that the walk's order is reproducible.
        stack: list[tuple[str, list[str]]] = []
        rel = ""
        pending = sorted(os.listdir(dirs.top), reverse=True)
        while True:
            if pending:
                name = pending.pop()
                try:
                    st = os.stat(name, dir_fd=dirs.top, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    _unlink_at(name, dirs.top)
                    continue
                try:
                    if _linux.mount_id(name, dirs.top) != mnt:
                        continue  # a mount nobody could detach: never enter it
                    child = _open_dir(name, dirs.top, (st.st_dev, st.st_ino))
                except OSError as exc:
                    if exc.errno == errno.ESTALE:
                        raise
                    continue
                try:
                    names = sorted(os.listdir(child), reverse=True)
                except OSError:
                    os.close(child)
                    continue
                dirs.push(child, (st.st_dev, st.st_ino))
                stack.append((name, pending))
                pending = names
                rel = f"{rel}/{name}" if rel else name
                if _walk_hook is not None:
                    _walk_hook(rel)
                continue
            if not stack:
                return
            name, pending = stack.pop()
            rel = rel.rpartition("/")[0]
            # The parent is the fd kept from the way down or ".." checked against it (ESTALE).
            os.close(dirs.pop())
            _unlink_at(name, dirs.top, directory=True)


def _unlink_at(name: str, dir_fd: int, *, directory: bool = False) -> None:
    remove = os.rmdir if directory else os.unlink
    try:
        remove(name, dir_fd=dir_fd)
    except PermissionError:
        # The parent lacks write permission for an ordinary user: open it up and retry.
        with contextlib.suppress(OSError):
            os.chmod(dir_fd, stat.S_IRWXU)
            remove(name, dir_fd=dir_fd)
    except OSError:
        pass


def sweep_stale_mounts(store_tmp_root: Path) -> list[Path]:
    """Unmount and remove the scratch of dead sessions under ``store_tmp_root/views``.

    A session's scratch dir is ``views/<pid>-<start>`` (:func:`session_dir_name`; a bare
    ``<pid>`` is understood too). Only mounts
    below such a dir whose process is gone (no such pid, or a pid reused by a process started at
    another time) are lazily unmounted; mounts of live sessions and everything outside
    ``store_tmp_root`` are never touched. Returns the mount points removed.
    """
    views = Path(os.path.realpath(store_tmp_root)) / "views"
    swept: list[Path] = []
    for session, pid, start in _session_dirs(views):
        if pid == os.getpid() or _session_alive(pid, start):
            continue
        for point in mounts_under(session):
            try:
                _linux.umount2(point, _linux.MNT_DETACH)
            except MountError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):
                    raise
            swept.append(point)
        remove_tree(session)
    return swept
