"""Layers whose content is a directory of the repository (``layer_from_path``, the datadir
fixtures): checking the directory, copying it into a build root, giving the stored tree back
the directory's mtimes.

No pytest here. The copy keeps what ``shutil.copy2``/``copytree(symlinks=True)`` keep (modes,
mtimes, symlinks as links) and refuses what a layer cannot hold, with the culprit named.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from pytest_layers.errors import LayerDefinitionError

__all__ = ["check_dir", "copy_tree", "restore_mtimes"]


def check_dir(name: str, where: str, path: Path, rootdir: Path) -> None:
    """Raise a one-line :class:`LayerDefinitionError` unless ``path`` is a directory."""
    if path.is_dir():
        return
    what = "does not exist" if not os.path.lexists(path) else "is not a directory"
    raise LayerDefinitionError(
        f"layer {name!r} ({where}): {path} {what}; layer_from_path takes a directory, "
        f"relative to the rootdir {rootdir}"
    )


def copy_tree(name: str, src: Path, dst: Path) -> None:
    """Copy the directory ``src`` (a symlink to one is followed, as ``copytree`` does) into the
    existing directory ``dst``, merging with what is there.

    Regular files are copied with their mode and mtime, symlinks are copied as links, fifos
    are recreated; sockets and device nodes raise :class:`LayerDefinitionError` naming the
    entry (a data directory holding one is a mistake, and reading a device could hang).
    """
    src = src.resolve()
    _copy_dir(name, src, dst, "")
    st = os.stat(src)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_dir(name: str, src: Path, dst: Path, rel: str) -> None:
    with os.scandir(src) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        crel = f"{rel}/{child.name}" if rel else child.name
        target = dst / child.name
        st = child.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if target.is_symlink() or (os.path.lexists(target) and not target.is_dir()):
                target.unlink()
            target.mkdir(exist_ok=True)
            _copy_dir(name, Path(child.path), target, crel)
            os.chmod(target, stat.S_IMODE(mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            continue
        if os.path.lexists(target):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        if stat.S_ISREG(mode):
            shutil.copy2(child.path, target, follow_symlinks=False)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(child.path), target)
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(target, stat.S_IMODE(mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        else:
            kind = "socket" if stat.S_ISSOCK(mode) else "device node"
            raise LayerDefinitionError(
                f"layer {name!r}: {Path(child.path)} is a {kind}; a data directory can hold "
                "files, directories, symlinks and fifos: move it out of the directory"
            )


def restore_mtimes(src: Path, staged: Path) -> None:
    """Give every entry of the stored tree ``staged`` the mtime of the same path under ``src``.

    ``changeset.write_layer`` clamps mtimes, as a built layer needs; a layer that is a copy of
    a directory keeps the directory's own (whiteouts, which have no counterpart, are left).
    Deepest first, so setting a file's time never disturbs its directory's again.
    """
    src = src.resolve()
    for dirpath, dirnames, filenames in os.walk(staged, topdown=False):
        rel = os.path.relpath(dirpath, staged)
        for entry in [*filenames, *dirnames]:
            here = Path(dirpath, entry)
            there = src / rel / entry if rel != "." else src / entry
            try:
                st = os.lstat(there)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_IFMT(st.st_mode) != stat.S_IFMT(os.lstat(here).st_mode):
                continue
            os.utime(here, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
    st = os.stat(src)
    os.utime(staged, ns=(st.st_mtime_ns, st.st_mtime_ns))
