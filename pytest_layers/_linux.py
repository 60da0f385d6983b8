"""ctypes bindings for the Linux syscalls the mount backends and the sandbox need.

Everything here is a thin, typed wrapper around one syscall that raises
:class:`~pytest_layers.errors.MountError` (an ``OSError`` carrying ``errno``, the operation and
its target) instead of returning -1. No subprocess is ever spawned: the per-test mount cycle
costs about a millisecond only because it stays in-process (the ``mount`` binary is ~15x slower).

libc wrappers are used where glibc has them (``mount``, ``umount2``, ``unshare``, ``prctl``);
the new mount API (``fsopen`` & co.) and ``capget``/``capset`` go through ``syscall(2)`` with the
numbers below, since only glibc >= 2.36 wraps the former and musl wraps neither.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import sys
from collections.abc import Iterable
from typing import Any

from pytest_layers.errors import MountError

__all__ = [
    "MS_RDONLY",
    "MS_NOSUID",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_REMOUNT",
    "MS_BIND",
    "MS_MOVE",
    "MS_REC",
    "MS_PRIVATE",
    "MS_SLAVE",
    "MS_SHARED",
    "MNT_FORCE",
    "MNT_DETACH",
    "MNT_EXPIRE",
    "UMOUNT_NOFOLLOW",
    "CLONE_NEWNS",
    "CLONE_NEWUSER",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWCGROUP",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOEXEC",
    "AT_RECURSIVE",
    "AT_EMPTY_PATH",
    "CAP_LAST_CAP",
    "FSOPEN_CLOEXEC",
    "FSCONFIG_SET_FLAG",
    "FSCONFIG_SET_STRING",
    "FSCONFIG_SET_FD",
    "FSCONFIG_CMD_CREATE",
    "FSMOUNT_CLOEXEC",
    "MOUNT_ATTR_RDONLY",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MOVE_MOUNT_T_EMPTY_PATH",
    "OPEN_TREE_CLONE",
    "OPEN_TREE_CLOEXEC",
    "AT_FDCWD",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_SETFCAP",
    "CAP_MKNOD",
    "CAP_SYS_ADMIN",
    "mount",
    "umount2",
    "unshare",
    "fork_into_namespaces",
    "cloexec_from",
    "fsopen",
    "fsconfig_flag",
    "fsconfig_string",
    "fsconfig_fd",
    "fsconfig_create",
    "fs_context_log",
    "fsmount",
    "move_mount",
    "open_tree",
    "bind_onto",
    "Capabilities",
    "capget",
    "capset",
    "ambient_raise",
    "ambient_is_set",
    "has_effective_cap",
    "pivot_root",
    "mount_setattr",
    "sethostname",
    "set_no_new_privs",
    "set_pdeathsig",
    "bounding_drop",
    "ambient_clear_all",
    "open_in_root",
    "write_proc",
    "mount_id",
    "FUSE_SUPER_MAGIC",
    "fs_magic",
]

# mount(2) flags (<linux/mount.h>)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

# umount2(2) flags
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

# unshare(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000

# new mount API (<linux/mount.h>)
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100

# capabilities (<linux/capability.h>)
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_SETGID = 6
CAP_SETUID = 7
CAP_MKNOD = 27
CAP_SETFCAP = 31
CAP_SYS_ADMIN = 21
#: The highest capability number the kernel knows (``/proc/sys/kernel/cap_last_cap``).
CAP_LAST_CAP = 40
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# prctl(2)
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_IS_SET = 1
_PR_CAP_AMBIENT_RAISE = 2

# The new mount syscalls were numbered after the tables were unified, so they are the same on
# every architecture; capget/capset are not.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "capget": 125,
        "capset": 126,
        "pivot_root": 155,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "mount_setattr": 442,
        "openat2": 437,
        "clone3": 435,
        "close_range": 436,
    },
    "aarch64": {
        "capget": 90,
        "capset": 91,
        "pivot_root": 41,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "mount_setattr": 442,
        "openat2": 437,
        "clone3": 435,
        "close_range": 436,
    },
}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# statx(2) (<linux/stat.h>): only the mount id is read, at its fixed offset in struct statx.
_STATX_MNT_ID = 0x1000
_STATX_MNT_ID_OFFSET = 0x90
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_NO_AUTOMOUNT = 0x800
_AT_EMPTY_PATH = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = ctypes.c_int


_MACHINE = os.uname().machine
_TABLE = _SYSCALLS.get(_ARCH_ALIASES.get(_MACHINE, _MACHINE))


def _syscall_number(name: str) -> int:
    table = _TABLE
    if table is None:
        machine = _MACHINE
        raise MountError(
            _errno.ENOSYS,
            f"{name}: syscall numbers for architecture {machine!r} are not known "
            "(pytest-layers supports x86_64 and aarch64)",
        )
    return table[name]


def _typed_syscall(*argtypes: Any) -> Any:
    """A ``syscall(2)`` function object of its own whose arguments after the number have these
    types: ctypes converts them itself, with no wrapper object made per call (init makes a
    few dozen such calls per sandbox)."""
    func = _libc["syscall"]
    func.restype = ctypes.c_long
    func.argtypes = (ctypes.c_long, *argtypes)
    return func


_sys_path_attr = _typed_syscall(  # mount_setattr(dirfd, path, flags, attr, size)
    ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_size_t
)
_sys_openat2 = _typed_syscall(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_sys_two_paths = _typed_syscall(ctypes.c_char_p, ctypes.c_char_p)  # pivot_root
_sys_two_pointers = _typed_syscall(ctypes.c_void_p, ctypes.c_void_p)  # capget, capset


def _fail(op: str, target: str | None, err: int | None = None, detail: str = "") -> MountError:
    return MountError.of(ctypes.get_errno() if err is None else err, op, target, detail)


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """``mount(2)``. Note that the kernel silently truncates ``data`` at 4095 bytes: callers
    that build long option strings must check the length themselves."""
    raw = data.encode() if isinstance(data, str) else data
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, raw) != 0:
        raise _fail("mount", os.fsdecode(target))


def umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    """``umount2(2)``; ``flags`` such as :data:`MNT_DETACH` for a lazy unmount."""
    if _libc.umount2(_b(target), flags) != 0:
        raise _fail("umount2", os.fsdecode(target))


def unshare(flags: int) -> None:
    """``unshare(2)``: move the calling thread into new namespaces."""
    if _libc.unshare(flags) != 0:
        raise _fail("unshare", hex(flags))


def _check_fd(ret: int, op: str, target: str | None) -> int:
    if ret < 0:
        raise _fail(op, target)
    return ret


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    """``fsopen(2)``: a filesystem context fd for ``fstype``."""
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number("fsopen")),
        ctypes.c_char_p(fstype.encode()),
        ctypes.c_uint(flags),
    )
    return _check_fd(ret, "fsopen", fstype)


def _fsconfig(fd: int, cmd: int, key: str | None, value: bytes | None, aux: int) -> None:
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number("fsconfig")),
        ctypes.c_int(fd),
        ctypes.c_uint(cmd),
        ctypes.c_char_p(None if key is None else key.encode()),
        ctypes.c_char_p(value),
        ctypes.c_int(aux),
    )
    if ret < 0:
        err = ctypes.get_errno()
        target = key if key is not None else "FSCONFIG_CMD_CREATE"
        # The kernel's own words ("overlayfs: conflicting options: ...") beat a bare EINVAL.
        raise _fail("fsconfig", target, err, "; ".join(fs_context_log(fd)))


def fs_context_log(fd: int) -> list[str]:
    """Drain the messages the kernel queued on a filesystem context fd (read(2) gives them)."""
    messages: list[str] = []
    for _ in range(16):
        try:
            raw = os.read(fd, 1024)
        except OSError:
            break  # ENODATA: nothing more
        if not raw:
            break
        text = raw.decode(errors="replace").strip()
        # each message starts with "e ", "w " or "i " (error, warning, info)
        messages.append(text[2:] if text[1:2] == " " else text)
    return messages


def fsconfig_flag(fd: int, key: str) -> None:
    """``fsconfig(FSCONFIG_SET_FLAG)``: a boolean mount option such as ``userxattr``."""
    _fsconfig(fd, FSCONFIG_SET_FLAG, key, None, 0)


def fsconfig_string(fd: int, key: str, value: str) -> None:
    """``fsconfig(FSCONFIG_SET_STRING)``. The kernel caps the value at 255 bytes."""
    _fsconfig(fd, FSCONFIG_SET_STRING, key, os.fsencode(value), 0)


def fsconfig_fd(fd: int, key: str, value_fd: int) -> None:
    """``fsconfig(FSCONFIG_SET_FD)``: pass a directory as an (``O_PATH``) file descriptor."""
    _fsconfig(fd, FSCONFIG_SET_FD, key, None, value_fd)


def fsconfig_create(fd: int) -> None:
    """``fsconfig(FSCONFIG_CMD_CREATE)``: build the superblock from the options set so far."""
    _fsconfig(fd, FSCONFIG_CMD_CREATE, None, None, 0)


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    """``fsmount(2)``: a detached mount fd for a created filesystem context."""
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number("fsmount")),
        ctypes.c_int(fd),
        ctypes.c_uint(flags),
        ctypes.c_uint(attr_flags),
    )
    return _check_fd(ret, "fsmount", None)


def move_mount(
    from_fd: int,
    to_path: str | os.PathLike[str],
    *,
    from_path: str = "",
    to_dirfd: int = AT_FDCWD,
    flags: int = MOVE_MOUNT_F_EMPTY_PATH,
) -> None:
    """``move_mount(2)``: attach the mount ``from_fd`` at ``to_path``."""
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number("move_mount")),
        ctypes.c_int(from_fd),
        ctypes.c_char_p(from_path.encode()),
        ctypes.c_int(to_dirfd),
        ctypes.c_char_p(os.fsencode(to_path)),
        ctypes.c_uint(flags),
    )
    if ret < 0:
        raise _fail("move_mount", os.fsdecode(to_path))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class Capabilities:
    """The three capability sets of this process, as 64-bit masks (bit N = capability N)."""

    __slots__ = ("effective", "inheritable", "permitted")

    def __init__(self, effective: int, permitted: int, inheritable: int) -> None:
        self.effective = effective
        self.permitted = permitted
        self.inheritable = inheritable

    def __repr__(self) -> str:
        return (
            f"Capabilities(effective={self.effective:#x}, permitted={self.permitted:#x}, "
            f"inheritable={self.inheritable:#x})"
        )


def capget() -> Capabilities:
    """``capget(2)`` for the calling thread."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    ret = _sys_two_pointers(_syscall_number("capget"), ctypes.byref(header), data)
    if ret < 0:
        raise _fail("capget", None)
    return Capabilities(
        data[0].effective | (data[1].effective << 32),
        data[0].permitted | (data[1].permitted << 32),
        data[0].inheritable | (data[1].inheritable << 32),
    )


def capset(caps: Capabilities) -> None:
    """``capset(2)`` for the calling thread."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i, shift in enumerate((0, 32)):
        data[i].effective = (caps.effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (caps.permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (caps.inheritable >> shift) & 0xFFFFFFFF
    ret = _sys_two_pointers(_syscall_number("capset"), ctypes.byref(header), data)
    if ret < 0:
        raise _fail("capset", repr(caps))


def ambient_raise(caps: Iterable[int]) -> None:
    """Make ``caps`` survive ``execve``: add them to the inheritable set, then to the ambient set.

    The kernel only accepts an ambient capability that is both permitted and inheritable, so the
    inheritable set is raised first.
    """
    wanted = list(caps)
    current = capget()
    mask = 0
    for cap in wanted:
        mask |= 1 << cap
    if current.inheritable & mask != mask:
        current.inheritable |= mask
        capset(current)
    for cap in wanted:
        if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
            raise _fail("prctl", f"PR_CAP_AMBIENT_RAISE, {cap}")


def ambient_is_set(cap: int) -> bool:
    """Whether ``cap`` is in this thread's ambient set."""
    ret: int = _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_IS_SET, cap, 0, 0)
    if ret < 0:
        raise _fail("prctl", f"PR_CAP_AMBIENT_IS_SET, {cap}")
    return ret == 1


def has_effective_cap(cap: int) -> bool:
    """Whether ``cap`` is in this thread's effective set (in its own user namespace)."""
    return bool(capget().effective & (1 << cap))


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    """``pivot_root(2)``: make ``new_root`` the root mount of this mount namespace.

    Unlike ``chroot``, the old root stops being reachable once it is unmounted, whatever the
    process does with ``chdir("..")`` afterwards (the double-chroot escape needs a root above).
    """
    ret = _sys_two_paths(_syscall_number("pivot_root"), os.fsencode(new_root), os.fsencode(put_old))
    if ret < 0:
        raise _fail("pivot_root", os.fsdecode(new_root))


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(
    path: str | os.PathLike[str],
    attr_set: int,
    *,
    attr_clr: int = 0,
    recursive: bool = True,
    dirfd: int = AT_FDCWD,
    empty_path: bool = False,
) -> None:
    """``mount_setattr(2)`` (Linux >= 5.12): change only the given attributes of the mount at
    ``path`` (and of every mount below it when ``recursive``). A remount would have to repeat
    every flag the kernel locked on a mount inherited from a more privileged namespace."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    ret = _sys_path_attr(
        _syscall_number("mount_setattr"),
        dirfd,
        os.fsencode(path),
        (AT_RECURSIVE if recursive else 0) | (AT_EMPTY_PATH if empty_path else 0),
        ctypes.byref(attr),
        ctypes.sizeof(attr),
    )
    if ret < 0:
        raise _fail("mount_setattr", os.fsdecode(path))


def open_tree(path: str | os.PathLike[str], flags: int) -> int:
    """``open_tree(2)``: with ``OPEN_TREE_CLONE``, a detached copy of the mount tree at
    ``path`` (``AT_RECURSIVE``: with every mount below it), as an fd."""
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number("open_tree")),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(flags),
    )
    return _check_fd(ret, "open_tree", os.fsdecode(path))


def bind_onto(source: str | os.PathLike[str], target_fd: int, attr_set: int) -> None:
    """Bind ``source`` (recursively) onto the inode ``target_fd`` holds, its mounts given
    ``attr_set`` before they are attached: nothing is resolved twice, so nothing can be
    swapped between the bind and its flags."""
    tree = open_tree(source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    try:
        mount_setattr("", attr_set, dirfd=tree, empty_path=True)
        move_mount(
            tree,
            "",
            to_dirfd=target_fd,
            flags=MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    finally:
        os.close(tree)


def sethostname(name: str) -> None:
    """``sethostname(2)`` in the calling process's UTS namespace."""
    raw = name.encode()
    if _libc.sethostname(raw, len(raw)) != 0:
        raise _fail("sethostname", name)


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        raise _fail("prctl", what)


def set_no_new_privs() -> None:
    """``PR_SET_NO_NEW_PRIVS``: execve never grants privileges again (setuid bits and file
    capabilities are ignored) for this process and all its descendants."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def set_undumpable() -> None:
    """``PR_SET_DUMPABLE`` 0: no process without ``CAP_SYS_PTRACE`` where this process's memory
    was created may ptrace it, ``pidfd_getfd(2)`` its fds or read its ``/proc/PID/fd`` (until it
    execs; its own access stays)."""
    _prctl(_PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")


def set_pdeathsig(sig: int) -> None:
    """``PR_SET_PDEATHSIG``: the kernel sends ``sig`` to this process when its parent dies."""
    _prctl(_PR_SET_PDEATHSIG, sig, "PR_SET_PDEATHSIG")


def bounding_drop(*caps: int) -> None:
    """``PR_CAPBSET_DROP`` of each of ``caps``: no later execve can give this process any of
    them back."""
    prctl = _libc.prctl
    for cap in caps:
        if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise _fail("prctl", f"PR_CAPBSET_DROP, {cap}")


def ambient_clear_all() -> None:
    """Empty this thread's ambient capability set."""
    if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise _fail("prctl", "PR_CAP_AMBIENT_CLEAR_ALL")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_HOW_SIZE = ctypes.sizeof(_OpenHow)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """``openat2(2)`` with ``RESOLVE_IN_ROOT``: open ``path`` as if ``root_fd`` were ``/``.

    Absolute symlinks and ``..`` met on the way stay inside ``root_fd`` (Linux >= 5.6), which is
    how a path an image controls is resolved without trusting its symlinks.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    ret = _sys_openat2(
        _syscall_number("openat2"), root_fd, os.fsencode(path), ctypes.byref(how), _HOW_SIZE
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise _fail("openat2", path, err)
    return int(ret)


_statx = getattr(_libc, "statx", None)  # glibc >= 2.28


def mount_id(name: str | os.PathLike[str], dir_fd: int | None = None) -> int:
    """The id of the mount ``name`` (relative to ``dir_fd``, never followed if a symlink) sits
    on, as ``/proc/self/mountinfo`` numbers mounts; ``name=""`` asks about ``dir_fd`` itself.

    This, not ``st_dev``, tells a bind mount from the directory it sits in: a bind of the same
    filesystem has the same device. ``statx(STX_MNT_ID)`` where the C library and kernel
    (>= 5.8) have it, else the ``mnt_id`` of an ``O_PATH`` fd in ``/proc/self/fdinfo``.
    Raises ``OSError`` as ``lstat`` would.
    """
    raw = os.fsencode(name)
    fd = AT_FDCWD if dir_fd is None else dir_fd
    if _statx is not None:
        buf = ctypes.create_string_buffer(256)
        flags = _AT_SYMLINK_NOFOLLOW | _AT_NO_AUTOMOUNT | (_AT_EMPTY_PATH if not raw else 0)
        if _statx(ctypes.c_int(fd), raw, ctypes.c_int(flags), ctypes.c_uint(_STATX_MNT_ID), buf):
            err = ctypes.get_errno()
            if err != _errno.ENOSYS:
                raise OSError(err, os.strerror(err), os.fsdecode(name))
        else:
            mask = int.from_bytes(buf.raw[:4], "little" if _LITTLE else "big")
            if mask & _STATX_MNT_ID:
                off = _STATX_MNT_ID_OFFSET
                return int.from_bytes(buf.raw[off : off + 8], "little" if _LITTLE else "big")
    if not raw:
        if dir_fd is None:
            raise OSError(_errno.ENOENT, "mount_id: an empty name needs dir_fd")
        path_fd = os.dup(dir_fd)
    else:
        path_fd = os.open(raw, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with open(f"/proc/self/fdinfo/{path_fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(path_fd)
    raise OSError(_errno.ENOSYS, "this kernel reports no mount ids (statx, fdinfo)")


_LITTLE = sys.byteorder == "little"


def write_proc(path: str, text: str) -> None:
    """Write ``text`` to a ``/proc`` file in one ``write(2)``, as the kernel wants for
    ``uid_map``, ``gid_map`` and ``setgroups`` (a buffered writer may split it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class _CloneArgs(ctypes.Structure):
    # struct clone_args, CLONE_ARGS_SIZE_VER0 (<linux/sched.h>)
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("pidfd", ctypes.c_uint64),
        ("child_tid", ctypes.c_uint64),
        ("parent_tid", ctypes.c_uint64),
        ("exit_signal", ctypes.c_uint64),
        ("stack", ctypes.c_uint64),
        ("stack_size", ctypes.c_uint64),
        ("tls", ctypes.c_uint64),
    ]


# A PyDLL call keeps the GIL, as os.fork() does across fork(2): the child must not start with
# the GIL released by a thread it does not have.
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.syscall.restype = ctypes.c_long
_SIGCHLD = 17


def fork_into_namespaces(flags: int) -> int:
    """A fork whose child starts in new namespaces (``clone3(2)`` with ``flags``, the
    ``CLONE_NEW*`` bits): 0 in the child, its pid in the caller. A child in a new PID
    namespace is its PID 1 without an intermediate process, which ``unshare(2)`` needs.

    Only for a child that runs nothing but the caller's own next lines and then execs or
    ``os._exit()``s, from a single-threaded caller running on Python's main thread. Neither
    glibc's fork handlers nor Python's at-fork hooks run: with one thread no lock can be held by
    another, and the hooks (``random``'s reseed, ``logging``'s and ``threading``'s lock
    resets...) are for children that go on running the caller's code; skipping them is a
    third of such a child's page faults. Raises :class:`MountError` (``ENOSYS`` where clone3
    is missing or filtered, ``EPERM``... where the namespaces are refused)."""
    args = _CloneArgs(flags=flags, exit_signal=_SIGCHLD)
    pid = _pylibc.syscall(
        ctypes.c_long(_syscall_number("clone3")),
        ctypes.byref(args),
        ctypes.c_size_t(ctypes.sizeof(args)),
    )
    if pid == 0:
        return 0
    if pid < 0:
        raise _fail("clone3", None, ctypes.get_errno())
    return int(pid)


_CLOSE_RANGE_CLOEXEC = 4


def cloexec_from(first: int) -> None:
    """Mark every fd from ``first`` up close-on-exec: one ``close_range(2)`` (Linux >= 5.11),
    else one call per open fd."""
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number("close_range")),
        ctypes.c_uint(first),
        ctypes.c_uint(0xFFFFFFFF),
        ctypes.c_uint(_CLOSE_RANGE_CLOEXEC),
    )
    if ret == 0:
        return
    for name in os.listdir("/proc/self/fd"):
        if int(name) >= first:
            with contextlib.suppress(OSError):  # the listing's own fd, closed by now
                os.set_inheritable(int(name), False)


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every fd of this process but ``keep``: ``close_range(2)`` over the gaps (Linux >=
    5.9), else one call per open fd."""
    kept = sorted({fd for fd in keep if fd >= 0})
    close_range = _libc.syscall
    number = ctypes.c_long(_syscall_number("close_range"))
    start = 0
    for fd in [*kept, 0x100000000]:
        if fd > start:
            last = min(fd - 1, 0xFFFFFFFF)
            if close_range(number, ctypes.c_uint(start), ctypes.c_uint(last), ctypes.c_uint(0)):
                break
        start = fd + 1
    else:
        return
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in kept:
            with contextlib.suppress(OSError):  # the listing's own fd, closed by now
                os.close(int(name))


#: ``statfs(2)``'s ``f_type`` of a fuse filesystem (<linux/magic.h>).
FUSE_SUPER_MAGIC = 0x65735546
_FSWORD = 4 if os.uname().machine == "s390x" else ctypes.sizeof(ctypes.c_long)


def fs_magic(path: str | os.PathLike[str]) -> int:
    """``statfs(2)``'s ``f_type`` of the filesystem holding ``path``: which kind of filesystem
    is mounted there, in one system call (``os.statvfs`` does not say). Raises ``OSError``."""
    # struct statfs starts with f_type, a __fsword_t: a long (an unsigned int on s390x, whose
    # big-endian 4 bytes come first in either case).
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))
    return int.from_bytes(buf.raw[:_FSWORD], "little" if _LITTLE else "big")
