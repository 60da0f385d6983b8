"""Resolving a path inside a directory as a chroot would, in one place.

:func:`resolve` is the lexical walk over a tree on the host (``Rootfs.resolve``, the CLI's
checks of a view): absolute symlinks and ``..`` stay below the root. The fd-based walkers that
must not trust the tree (the layer applier, which refuses a ``..`` above the root outright; the
sandbox, which lets the kernel resolve with ``openat2(RESOLVE_IN_ROOT)``) keep their own loops
but count links against the same :data:`MAX_SYMLINKS`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

#: As Linux's MAXSYMLINKS: more links than this while resolving one path is a loop.
MAX_SYMLINKS = 40


def resolve(root: Path, path: str | os.PathLike[str], *, strict: bool = False) -> Path:
    """``path`` resolved inside ``root`` as if ``root`` were ``/``.

    Absolute symlinks and ``..`` are taken relative to ``root``, so the result never leaves it.
    Missing components are kept as they are (like ``realpath``); with ``strict``, a missing
    component raises ``FileNotFoundError``, as the kernel's lookup would (``missing/..`` does
    not exist, although ``..`` would take it away lexically). Raises ``OSError(ELOOP)`` after
    :data:`MAX_SYMLINKS` links.
    """
    todo = [p for p in PurePosixPath(os.fspath(path)).parts if p != "/"]
    todo.reverse()
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            if strict:
                raise FileNotFoundError(
                    errno.ENOENT, "no such file or directory inside the rootfs", str(candidate)
                ) from None
            is_link = False
        if not is_link:
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(
                errno.ELOOP,
                f"too many levels of symbolic links inside the rootfs while resolving "
                f"{os.fspath(path)!r} (a symlink loop?)",
                str(candidate),
            )
        target = PurePosixPath(os.readlink(candidate))
        if target.is_absolute():
            done = []
        todo.extend(reversed([p for p in target.parts if p != "/"]))
    return root.joinpath(*done)
