"""The read-only merged view of a chain of stored layer directories, as overlayfs would
show it, without mounting anything: :class:`ImageView` (directory fds kept in a small
LRU, so any depth works)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from pytest_layers import _dirfd, _ocirules, layertar
from pytest_layers._changebase import (
    _has_xattrs,
    _join,
    _split,
    _xattr_is_y,
    _xattrs,
)

_SCAN_AFTER = 8  # lookups in one layer directory before it is listed and cached whole
_OPEN_IMAGE_DIRS = 64  # directory fds an ImageView keeps open at most


class ImageView:
    """Read-only merged view of a chain of layer directories (top first), without a mount.

    Deletions are honoured in the given ``flavor`` (``"overlay"``: character device 0/0;
    ``"marker"``: ``.wh.NAME``), as are opaque directories, although stored layers never hold
    those. Every answer is cached, and a layer directory that sees more than a few lookups is
    listed once, so repeated lookups cost dictionary hits while a handful of lookups never read
    a big directory; the layers must not change while a view is in use (they never do).

    Layer directories are read through directory fds, each opened relative to its parent's,
    so paths deeper than ``PATH_MAX`` work; the view keeps the most recently used few open.
    The change-list functions close them when done; whoever uses a view directly may call
    :meth:`close` (or use it as a context manager), else they are closed with the view.
    """

    def __init__(self, layers_top_first: Sequence[Path], flavor: layertar.Flavor) -> None:
        _ocirules.check_flavor(flavor)
        self.layers: tuple[Path, ...] = tuple(Path(p) for p in layers_top_first)
        self.flavor: layertar.Flavor = flavor
        # A directory of layer i at rel is keyed (i, rel): without redirects, the merged
        # directory rel is made of the rel of some of the layers, nothing else.
        self._fds: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._listings: dict[tuple[int, str], dict[str, bool]] = {}  # name -> 0/0 whiteout
        self._probes: dict[tuple[int, str], int] = {}
        self._stacks: dict[str, tuple[int, ...] | None] = {}
        self._found: dict[str, tuple[int, os.stat_result] | None] = {}
        self._merged: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"ImageView({[os.fspath(p) for p in self.layers]!r}, flavor={self.flavor!r})"

    def __enter__(self) -> ImageView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Close the directory fds the view holds; the view stays usable (it reopens them)."""
        fds = getattr(self, "_fds", None)
        while fds:
            os.close(fds.popitem()[1])

    # -- directories of the layers

    def _dir_fd(self, i: int, rel: str) -> int:
        """An fd of layer ``i``'s directory ``rel``, opened from the nearest open ancestor.

        Valid until the next call (it may be closed to make room)."""
        fds = self._fds
        key = (i, rel)
        fd = fds.get(key)
        if fd is not None:
            fds.move_to_end(key)
            return fd
        missing: list[str] = []
        cur = rel
        while cur and (i, cur) not in fds:
            cur, name = _split(cur)
            missing.append(name)
        base = fds.get((i, cur))
        if base is None:
            base = self._keep((i, ""), os.open(self.layers[i], _dirfd.O_DIR))
        else:
            fds.move_to_end((i, cur))
        for name in reversed(missing):
            cur = _join(cur, name)
            base = self._keep((i, cur), os.open(name, _dirfd.O_DIR, dir_fd=base))
        return base

    def _keep(self, key: tuple[int, str], fd: int) -> int:
        self._fds[key] = fd
        if len(self._fds) > _OPEN_IMAGE_DIRS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _entries(self, i: int, rel: str) -> dict[str, bool]:
        key = (i, rel)
        ents = self._listings.get(key)
        if ents is None:
            ents = {}
            try:
                with os.scandir(self._dir_fd(i, rel)) as it:
                    for e in it:
                        # d_type answers file/dir/symlink without a stat; only the rest can
                        # be a 0/0 whiteout.
                        ents[e.name] = (
                            self.flavor == "overlay"
                            and not e.is_file(follow_symlinks=False)
                            and not e.is_dir(follow_symlinks=False)
                            and not e.is_symlink()
                            and _ocirules.is_whiteout_device(e.stat(follow_symlinks=False))
                        )
            except (FileNotFoundError, NotADirectoryError):
                ents = {}
            self._listings[key] = ents
        return ents

    def _get(self, i: int, rel_dir: str, name: str) -> os.stat_result | None:
        """lstat of ``name`` in layer ``i``'s directory ``rel_dir``, None when absent.

        A few lookups in a directory are single stat calls (a diff of ten files must not read
        ten 1000-entry directories); past ``_SCAN_AFTER`` the directory is listed once and
        names it lacks are dictionary misses.
        """
        key = (i, rel_dir)
        ents = self._listings.get(key)
        if ents is None:
            probes = self._probes.get(key, 0) + 1
            self._probes[key] = probes
            if probes > _SCAN_AFTER:
                ents = self._entries(i, rel_dir)
        if ents is not None and name not in ents:
            return None
        try:
            return os.stat(name, dir_fd=self._dir_fd(i, rel_dir), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _is_whiteout(self, st: os.stat_result) -> bool:
        return self.flavor == "overlay" and _ocirules.is_whiteout_device(st)

    def _marked(self, i: int, rel_dir: str, name: str) -> bool:
        return (
            self.flavor == "marker"
            and self._get(i, rel_dir, _ocirules.WHITEOUT_PREFIX + name) is not None
        )

    def _opaque(self, i: int, rel: str) -> bool:
        if self.flavor == "marker":
            return self._get(i, rel, _ocirules.OPAQUE_MARKER) is not None
        return _xattr_is_y(self._dir_fd(i, rel), _ocirules.OPAQUE_XATTRS["overlay"])

    def _stack(self, rel: str) -> tuple[int, ...] | None:
        """The layers, top first, whose directory ``rel`` makes up the merged directory
        ``rel``; None when ``rel`` is not a directory of the image."""
        stacks = self._stacks
        if rel in stacks:
            return stacks[rel]
        pending: list[str] = []
        cur = rel
        while cur and cur not in stacks:
            pending.append(cur)
            cur = _split(cur)[0]
        if cur not in stacks:  # the root
            out: list[int] = []
            for i in range(len(self.layers)):
                out.append(i)
                if self._opaque(i, ""):
                    break
            stacks[""] = tuple(out)
        result = stacks[cur]
        for sub in reversed(pending):  # iterative: a path may be 10,000 levels deep
            if result is not None:
                parent, name = _split(sub)
                found: list[int] = []
                for i in result:
                    got = self._get(i, parent, name)
                    marked = self._marked(i, parent, name)
                    if got is not None and not self._is_whiteout(got):
                        if not stat.S_ISDIR(got.st_mode):
                            break  # a non-directory hides everything below it
                        found.append(i)
                        if marked or self._opaque(i, sub):
                            break
                    elif got is not None or marked:
                        break
                result = tuple(found) if found else None
            stacks[sub] = result
        return result

    def _find(self, rel: str, parent: str | None = None) -> tuple[int, os.stat_result] | None:
        """(layer, lstat) of ``rel`` in the image. ``parent``, when given, is ``rel``'s parent
        (the walkers have it: this saves a copy of a deep path per entry)."""
        if rel in self._found:
            return self._found[rel]
        found: tuple[int, os.stat_result] | None = None
        if rel == "":
            if self.layers:
                found = (0, os.lstat(self.layers[0]))
        else:
            if parent is None:
                parent, name = _split(rel)
            else:
                name = rel[len(parent) + 1 :] if parent else rel
            if not (self.flavor == "marker" and name.startswith(_ocirules.WHITEOUT_PREFIX)):
                for i in self._stack(parent) or ():
                    got = self._get(i, parent, name)
                    if got is not None:
                        if not self._is_whiteout(got):
                            found = (i, got)
                        break
                    if self._marked(i, parent, name):
                        break
        self._found[rel] = found
        return found

    # -- reading an entry of the image (for comparisons)

    def _open(self, i: int, rel: str, flags: int) -> int:
        parent, name = _split(rel)
        return os.open(name, flags, dir_fd=self._dir_fd(i, parent))

    def _readlink(self, i: int, rel: str) -> str:
        parent, name = _split(rel)
        return os.readlink(name, dir_fd=self._dir_fd(i, parent))

    def _xattrs(self, i: int, rel: str, st: os.stat_result) -> dict[str, bytes]:
        if not _has_xattrs(st):
            return {}
        parent, name = _split(rel)
        return _xattrs(_dirfd.at(self._dir_fd(i, parent), name))

    # -- the contract

    def lookup(self, rel: str) -> Path | None:
        """Real path of ``rel`` in the topmost layer that has it, None when the image lacks it.

        Beyond ``PATH_MAX`` such a path cannot be passed to ``os`` calls (see :class:`Entry`).
        """
        found = self._find(rel)
        if found is None:
            return None
        return self.layers[found[0]] / rel if rel else self.layers[found[0]]

    def lstat(self, rel: str) -> os.stat_result | None:
        """``os.lstat`` of ``rel`` in the image, None when the image lacks it."""
        found = self._find(rel)
        return found[1] if found is not None else None

    def listdir(self, rel: str) -> list[str]:
        """Sorted child names of the merged directory ``rel`` (whiteouts applied); ``[]`` when
        ``rel`` is not a directory of the image."""
        cached = self._merged.get(rel)
        if cached is not None:
            return list(cached)
        seen: set[str] = set()
        out: list[str] = []
        for i in self._stack(rel) or ():
            hidden_here: list[str] = []
            for name, whiteout in self._entries(i, rel).items():
                if name in seen:
                    continue
                if self.flavor == "marker" and name.startswith(_ocirules.WHITEOUT_PREFIX):
                    if name != _ocirules.OPAQUE_MARKER:
                        # Applies to lower layers only: the layer's own NAME stays visible.
                        hidden_here.append(name[len(_ocirules.WHITEOUT_PREFIX) :])
                    continue
                seen.add(name)
                if not whiteout:
                    out.append(name)
            seen.update(hidden_here)
        out.sort()
        self._merged[rel] = out
        return list(out)
