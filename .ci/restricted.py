#!/usr/bin/python3
"""Run a command where mounting is forbidden, as in a default Docker container or on an Ubuntu
24.04 runner, to test that pytest-layers falls back to the copy backend and says why.

    /usr/bin/python3 .ci/restricted.py [--profile docker|apparmor] [--user NAME]
        [--overlay DIR] -- COMMAND...

Run with Debian's /usr/bin/python3: libseccomp's Python bindings come from the python3-seccomp
package and live in its dist-packages, which a virtualenv does not see. The filter is inherited
by the exec'd COMMAND (the venv's pytest), so nothing needs installing into the venv, and no
PyPI wheel of libseccomp bindings (pyseccomp needs a C library at run time anyway) is involved.

``docker`` (default): mount, umount2, unshare, fsopen, fsmount, move_mount, pivot_root and setns
fail with EPERM, as Docker's default seccomp profile makes them. As root, the command also gets
a private mount namespace (set up before the filter) where /dev has no ``fuse`` entry and, with
``--overlay DIR``, DIR is an overlayfs (a container's root filesystem), so a store or
``--basetemp`` there sits on overlayfs. ``--user NAME`` then drops to that user.

``apparmor``: unshare and setns work but mounting fails with EPERM, which is what an
unprivileged user namespace gives under ``kernel.apparmor_restrict_unprivileged_userns=1``:
created, but with no capability to mount inside it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import pwd
import stat
import sys
import tempfile

_MOUNT_CALLS = ("mount", "umount2", "fsopen", "fsmount", "move_mount", "pivot_root", "open_tree")
_NS_CALLS = ("unshare", "setns")
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE, _MNT_DETACH = 0x1000, 0x4000, 0x40000, 2


def _mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if x is None else x.encode() for x in (src, dst, fstype, data)]
    if _libc.mount(enc[0], enc[1], enc[2], flags, enc[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {dst}: {os.strerror(err)}")


def _hide_dev_fuse(mode: int | None) -> None:
    """A tmpfs over /dev holding every entry of the real /dev but ``fuse`` (bind-mounted);
    with ``mode``, a ``fuse`` node of that mode instead (a CI image whose /dev/fuse is
    root-only)."""
    old = tempfile.mkdtemp(prefix="restricted-dev-")
    _mount("/dev", old, None, _MS_BIND | _MS_REC)
    _mount("tmpfs", "/dev", "tmpfs", 0, "mode=0755")
    for name in os.listdir(old):
        if name == "fuse":
            continue
        src, dst = os.path.join(old, name), os.path.join("/dev", name)
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
            continue
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(dst)
        else:
            open(dst, "w").close()
        _mount(src, dst, None, _MS_BIND | _MS_REC)
    _libc.umount2(old.encode(), _MNT_DETACH)
    os.rmdir(old)
    if mode is not None:
        os.mknod("/dev/fuse", stat.S_IFCHR | mode, os.makedev(10, 229))
        os.chmod("/dev/fuse", mode)


def _overlay_at(target: str) -> None:
    """Mount an empty overlayfs on ``target``, with its upper and work dirs beside it."""
    os.makedirs(target, exist_ok=True)
    base = tempfile.mkdtemp(prefix="restricted-ovl-", dir=os.path.dirname(target.rstrip("/")))
    for sub in ("lower", "upper", "work"):
        os.mkdir(os.path.join(base, sub))
    os.chmod(os.path.join(base, "upper"), 0o1777)
    _mount(
        "overlay",
        target,
        "overlay",
        0,
        f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
    )


def _install_filter(profile: str) -> None:
    import seccomp  # Debian's python3-seccomp

    flt = seccomp.SyscallFilter(seccomp.ALLOW)
    calls = _MOUNT_CALLS + (_NS_CALLS if profile == "docker" else ())
    for name in calls:
        flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
    flt.load()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("docker", "apparmor"), default="docker")
    parser.add_argument("--user", help="run COMMAND as this user (needs root)")
    parser.add_argument("--overlay", help="mount an overlayfs here (needs root)")
    parser.add_argument(
        "--fuse-mode", help="keep a /dev/fuse of this octal mode (e.g. 0600) instead of none"
    )
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()
    root = os.geteuid() == 0
    if (args.user or args.overlay) and not root:
        parser.error("--user and --overlay need root")
    if root and args.profile == "docker":
        if _libc.unshare(_CLONE_NEWNS) != 0:
            sys.exit(f"restricted: unshare: {os.strerror(ctypes.get_errno())}")
        _mount("none", "/", None, _MS_REC | _MS_PRIVATE)
        if os.path.exists("/dev/fuse"):
            _hide_dev_fuse(int(args.fuse_mode, 8) if args.fuse_mode else None)
        if args.overlay:
            _overlay_at(os.path.abspath(args.overlay))
    elif args.overlay:
        parser.error("--overlay needs --profile docker")
    if args.user:
        pw = pwd.getpwnam(args.user)
        os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    _install_filter(args.profile)
    os.execvp(args.command[0], args.command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
