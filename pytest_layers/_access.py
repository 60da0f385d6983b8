"""Who may use a layer store: its owner alone (the default) or the members of one group.

A store is trusted input: layers in it are mounted under tests, refs in it name what is
deleted, its locks and scratch dirs are opened and removed. Whoever can write into it can make
its user (root, in CI) write, delete or run what they choose (docs/concepts/security.md), so a
store is used only when every directory of it is owned by the user running, or, for a store
shared knowingly with a group (``--layers-store-shared GROUP``), belongs to that group, and
nobody else can write to it: the rule ssh applies to ``~/.ssh``.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import pwd
import stat

from pytest_layers import errors

__all__ = ["Access", "owner_name", "group_name", "not_a_directory"]

#: Where the error messages point for the two ways out.
_OWN_STORE = "use a store of your own (pytest --layers-store PATH, pytest-layers --store PATH)"
_SHARE = "share it with a group knowingly (--layers-store-shared GROUP, ini layers_store_shared)"


def owner_name(uid: int) -> str:
    """``uid N (name)``, or ``uid N`` for a uid without a passwd entry."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _gid_mapped(gid: int) -> bool:
    """Whether ``gid`` means itself in this process's user namespace. A session may run in a
    user namespace that maps only the user's own ids: there every other group reads as the
    overflow gid (``nobody``), so the group checks were made before entering it."""
    try:
        with open("/proc/self/gid_map", encoding="ascii") as f:
            ranges = [tuple(map(int, line.split())) for line in f if line.strip()]
    except (OSError, ValueError):
        return True
    return any(inside <= gid < inside + count for inside, _, count in ranges)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    return "special file"


def _open_new_dir(path: str | os.PathLike[str]) -> int:
    """An fd of the directory ``path`` this process has just created, never through a
    symlink: its group and mode are set through the fd, not by path. In a shared store every
    member may rename entries of a directory such as ``tmp/``, so between our ``mkdir`` and a
    ``chmod`` by path a member could put a symlink there and have us chmod its target."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # A symlink fails O_DIRECTORY | O_NOFOLLOW with ENOTDIR (or ELOOP): say what is there.
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            raise
        try:
            now = f"is now a {_kind(os.lstat(path).st_mode)}"
        except OSError:
            now = "was moved away"
        raise errors.StoreError(
            exc.errno,
            f"{path}, a directory just created in the layer store, {now}: someone who can "
            "write to the store tampered with its directory; its group and mode were not "
            "set and nothing was changed through it. Check who can write to the store, "
            "remove the entry (rm) and run again",
            os.fspath(path),
        ) from None


@dataclasses.dataclass(frozen=True)
class Access:
    """The store's sharing policy: ``group`` None for a private store (the owner only), else
    the name of the group whose members share it (``gid`` its id)."""

    group: str | None = None
    gid: int = -1

    @classmethod
    def resolve(cls, group: str | None) -> Access:
        """The policy for ``--layers-store-shared GROUP`` (None or "": private). Raises
        :class:`errors.StoreError` for an unknown group or one the user is not a member of."""
        if not group:
            return cls()
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise errors.StoreError(
                errno.EINVAL,
                f"shared store group {group!r} does not exist: create it (groupadd {group}) or "
                "fix --layers-store-shared / ini layers_store_shared",
            ) from None
        member = gid == os.getegid() or gid in os.getgroups() or not _gid_mapped(gid)
        if os.geteuid() != 0 and not member:
            raise errors.StoreError(
                errno.EPERM,
                f"you ({owner_name(os.geteuid())}) are not a member of the shared store group "
                f"{group_name(gid)!r}: ask for membership (usermod -aG {group_name(gid)} USER, "
                "then log in again) or use a store of your own",
            )
        return cls(group_name(gid), gid)

    @property
    def shared(self) -> bool:
        return self.group is not None

    @property
    def dir_mode(self) -> int:
        """Mode of every directory the store creates: the owner's alone, or the group's too
        with the setgid bit, so that new entries inherit the group."""
        return 0o2770 if self.shared else 0o700

    @property
    def lock_mode(self) -> int:
        """Mode of lock and lease files: any member of a shared store must take them."""
        return 0o660 if self.shared else 0o600

    def describe(self) -> str:
        """What the report header says of the store: ``yours`` or ``shared with group G``."""
        return f"shared with group {self.group}" if self.shared else "yours"

    def make_dir(
        self, path: str | os.PathLike[str], *, exist_ok: bool = False, inherit: bool = True
    ) -> bool:
        """``mkdir`` with :attr:`dir_mode` whatever the umask; returns whether it was created.

        ``inherit=False`` (a shared store's scratch): group-shared but not setgid, so that
        what a session creates below keeps its creator's group, which its user namespace maps
        (a setgid group there reads as nobody, and overlayfs refuses such upper dirs)."""
        mode = self.dir_mode if inherit or not self.shared else 0o1770
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not exist_ok:
                raise
            return False
        fd = _open_new_dir(path)
        try:
            if self.shared and _gid_mapped(self.gid):
                os.fchown(fd, -1, self.gid)  # else the setgid parent gave it the group already
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return True

    def private_subtree(self, path: str | os.PathLike[str]) -> None:
        """Make the new directory ``path`` (a layer tree being staged) its creator's: no
        setgid group inherited, so a layer's content, and so its digest, is the same in a
        shared store as in a private one."""
        if self.shared:
            fd = _open_new_dir(path)
            try:
                self.private_fd(fd)
            finally:
                os.close(fd)

    def private_fd(self, fd: int) -> None:
        """:meth:`private_subtree` for the directory open as ``fd``."""
        if self.shared:
            os.fchown(fd, -1, os.getegid())
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & ~stat.S_ISGID)

    def check(self, path: str | os.PathLike[str], st: os.stat_result) -> None:
        """Raise :class:`errors.StoreError` unless ``st`` (an ``lstat`` of ``path``) is a
        directory this user may trust as part of the store."""
        mode = st.st_mode
        if not stat.S_ISDIR(mode):
            if stat.S_ISLNK(mode):
                raise errors.StoreError(
                    errno.ELOOP,
                    f"{path} is a symlink inside the layer store, where only real directories "
                    "belong: someone planted it; remove it (rm) and run again",
                    os.fspath(path),
                )
            raise not_a_directory(path, mode)
        perms = stat.S_IMODE(mode)
        if not self.shared:
            if st.st_uid != os.geteuid():
                raise errors.StoreError(
                    errno.EPERM,
                    f"{path} belongs to {owner_name(st.st_uid)}, not to you "
                    f"({owner_name(os.geteuid())}): a store is used by its owner only; "
                    f"{_OWN_STORE}, or {_SHARE}",
                    os.fspath(path),
                )
            if perms & 0o022:
                raise errors.StoreError(
                    errno.EPERM,
                    f"{path} is writable by {'group' if perms & 0o020 else 'others'} "
                    f"(mode {perms:04o}), so others could plant content in the store: run "
                    f"`chmod -R go-w {path}`, or {_SHARE}",
                    os.fspath(path),
                )
            return
        if st.st_gid != self.gid and _gid_mapped(self.gid):
            raise errors.StoreError(
                errno.EPERM,
                f"{path} belongs to group {group_name(st.st_gid)!r}, not to the shared store "
                f"group {self.group!r}: run `chgrp -R {self.group} {path}` (as its owner) or "
                "point at another store",
                os.fspath(path),
            )
        if perms & 0o002:
            raise errors.StoreError(
                errno.EPERM,
                f"{path} is writable by others (mode {perms:04o}), beyond the shared group "
                f"{self.group!r}: run `chmod -R o-w {path}`",
                os.fspath(path),
            )


def not_a_directory(path: str | os.PathLike[str], mode: int) -> errors.StoreError:
    """The error for a store path that exists but is not a directory (a file, say)."""
    return errors.StoreError(
        errno.ENOTDIR,
        f"{path} is a {_kind(mode)}, not a store directory; point --layers-store "
        "(pytest-layers --store) at a directory",
        os.fspath(path),
    )
