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
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pytest_layers import _linux, _proctag, _subids
from pytest_layers._mounts import (
    MountEntry,
    detach_mounts_under,
    mount_at,
    mountinfo,
    mounts_under,
)
from pytest_layers._removal import remove_tree
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


def session_dir_name(pid: int | None = None) -> str:
    """``"<pid>-<start time>"`` (:func:`_proctag.tag`): names a session's scratch dir so a
    later session can tell whether its owner is still alive, even after the pid was reused."""
    return _proctag.tag(pid)


def parse_session_dir_name(name: str) -> tuple[int, int | None] | None:
    """``(pid, start)`` from a :func:`session_dir_name`, or None for any other name.

    A bare ``"<pid>"`` is accepted too, with ``start`` None: its owner counts as alive while
    any process has that pid (pid reuse then keeps its mounts until the pid is free).
    """
    if name.isdigit():
        return int(name), None
    parsed = _proctag.parse(name)
    if parsed is None or f"{parsed[0]}-{parsed[1]}" != name:
        return None
    return parsed


def _session_dirs(views: Path) -> Iterator[tuple[Path, int, int | None]]:
    try:
        entries = list(os.scandir(views))
    except FileNotFoundError:
        return
    for entry in entries:
        parsed = parse_session_dir_name(entry.name)
        if parsed is not None and entry.is_dir(follow_symlinks=False):
            yield Path(entry.path), parsed[0], parsed[1]


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
        if pid == os.getpid() or _proctag.alive(pid, start):
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
