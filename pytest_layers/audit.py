"""What privileged content an image's layers hold: ``pytest-layers inspect``'s ``Privileged``.

A layer imported as root keeps setuid/setgid programs, file capabilities and device nodes.
Views and CLI mounts are ``nosuid,nodev`` by default, so these grant nothing there; this says
what an opt-out (``--layers-mount-options=suid,dev``, ``mount --suid --dev``) would expose
(docs/reference/cli.md, "inspect"). Walks each layer's stored tree with directory fds (any depth,
never following a symlink); reads only metadata and one xattr per regular file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from pytest_layers import _dirfd, _ocirules

__all__ = ["CATEGORIES", "privileged_content"]

#: The keys of :func:`privileged_content`'s result, in report order.
CATEGORIES = ("Setuid", "Setgid", "Capabilities", "Devices", "WorldWritable")

_CAPS = "security.capability"


def _has_caps(dir_fd: int, name: str) -> bool:
    try:
        os.getxattr(_dirfd.at(dir_fd, name), _CAPS, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            return False
        raise
    return True


def privileged_content(layer_dirs: Sequence[Path], flavor: str = "overlay") -> dict[str, list[str]]:
    """Paths (``/``-rooted, sorted) of the layers' privileged entries, per category:
    ``Setuid``/``Setgid`` (files with the bit), ``Capabilities`` (``security.capability``),
    ``Devices`` (character and block nodes other than whiteouts, as ``"/dev/kmsg c 1:11"``),
    ``WorldWritable`` (files and non-sticky directories anyone may write). A path found in
    several layers is listed once."""
    found: dict[str, set[str]] = {key: set() for key in CATEGORIES}

    def visit(rel_dir: str, fd: int, _state: None) -> list[tuple[str, _dirfd.Ident, None]]:
        subdirs: list[tuple[str, _dirfd.Ident, None]] = []
        with os.scandir(fd) as it:
            for e in it:
                if flavor == "marker" and _ocirules.is_whiteout_name(e.name):
                    continue
                st = e.stat(follow_symlinks=False)
                mode = st.st_mode
                path = f"/{rel_dir}/{e.name}" if rel_dir else f"/{e.name}"
                if stat.S_ISLNK(mode):
                    continue
                if stat.S_ISDIR(mode):
                    subdirs.append((e.name, (st.st_dev, st.st_ino), None))
                    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                        found["WorldWritable"].add(path)
                    continue
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    if stat.S_ISCHR(mode) and st.st_rdev == 0 and flavor == "overlay":
                        continue  # a whiteout
                    kind = "c" if stat.S_ISCHR(mode) else "b"
                    found["Devices"].add(
                        f"{path} {kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                    )
                    continue
                if mode & stat.S_ISUID:
                    found["Setuid"].add(path)
                if mode & stat.S_ISGID and mode & stat.S_IXGRP:  # without g+x: mandatory locking
                    found["Setgid"].add(path)
                if mode & stat.S_IWOTH:
                    found["WorldWritable"].add(path)
                if stat.S_ISREG(mode) and _has_caps(fd, e.name):
                    found["Capabilities"].add(path)
        return subdirs

    for layer_dir in layer_dirs:
        _dirfd.walk(layer_dir, None, visit)
    return {key: sorted(found[key]) for key in CATEGORIES}
