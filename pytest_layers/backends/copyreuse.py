"""Reusable copies for the copy backend: a used copy is reset to its image by restoring only
what the test changed, so the next test of that image gets it in O(changes), not O(image).

What changed is learned from **inotify** watches on every directory of the copy (one inotify
instance per backend; :mod:`._inotify`), without walking the tree. Where that knowledge cannot
be trusted, the **walk** finds it instead: every entry is ``lstat``-ed and compared with the
inode number it had when the copy was made and with the copy's ctime mark (user space cannot
set a ctime, and an entry whose inode and ctime predate the mark is untouched). The walk is
used when the event queue overflowed (``IN_Q_OVERFLOW``), when a watch could not be added
(``fs.inotify.max_user_watches``), when a moved directory cannot be followed, or when the test
made a name that could have been a hard link to an image file and that name is gone (a write
through it is reported in no watched directory).

Restoring never rewrites a file in place: every changed entry is removed and made again from
the image's layers, so a process that still holds an old file open (or mapped) writes to an
orphan inode. Hard link groups are restored whole. A directory of the image that was renamed
is renamed back (a big directory is not copied again), one that was replaced or removed is
copied again from the layers. Directory metadata (mode, owner, xattrs, mtime) is set again on
every directory whose children changed.

**Thrown away, never reused dirty**: a copy is discarded (the caller removes it) when a file or
directory in it is still open when the test ends (inotify counts opens and closes; a mapping
holds its file open), when the walk was needed and a process still has a file, a mapping, a
working directory or a root in it, when anything under it is a mount point, when its root was
replaced, or when any step of the reset fails.

No pytest here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from pytest_layers.backends import _inotify as ino
from pytest_layers.backends._copyplan import _Copier, _Item, _keep_xattr, _Plan

__all__ = ["Index", "ReusableCopy", "Watcher", "index_of"]

_MASK = (
    ino.IN_MODIFY
    | ino.IN_ATTRIB
    | ino.IN_CLOSE_WRITE
    | ino.IN_CLOSE_NOWRITE
    | ino.IN_OPEN
    | ino.IN_MOVED_FROM
    | ino.IN_MOVED_TO
    | ino.IN_CREATE
    | ino.IN_DELETE
    | ino.IN_DELETE_SELF
    | ino.IN_MOVE_SELF
)
_TOUCH = (
    ino.IN_MODIFY
    | ino.IN_ATTRIB
    | ino.IN_CLOSE_WRITE
    | ino.IN_DELETE
    | ino.IN_DELETE_SELF
    | ino.IN_MOVE_SELF
    | ino.IN_MOVED_FROM
    | ino.IN_MOVED_TO
    | ino.IN_CREATE
)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def _depth(rel: str) -> int:
    return rel.count("/") + (1 if rel else 0)


def _under(rel: str, top: str) -> bool:
    return top == "" or rel == top or rel.startswith(top + "/")


@dataclass
class Index:
    """A plan by path: every entry, each directory's children, each hard link group."""

    items: dict[str, _Item]
    children: dict[str, set[str]]
    groups: dict[str, tuple[str, ...]]
    order: list[str]  # every rel, parents before children


def index_of(plan: _Plan) -> Index:
    items: dict[str, _Item] = {}
    children: dict[str, set[str]] = {}
    by_src: dict[tuple[int, int], list[str]] = {}
    for item in plan.dirs:
        items[item.rel] = item
        children[item.rel] = set()
    for item in plan.others:
        items[item.rel] = item
        if item.st.st_nlink > 1:
            by_src.setdefault((item.st.st_dev, item.st.st_ino), []).append(item.rel)
    for rel in items:
        if rel:
            children[_parent(rel)].add(rel.rpartition("/")[2])
    groups = {rel: tuple(g) for g in by_src.values() if len(g) > 1 for rel in g}
    order = sorted(items, key=lambda r: r.split("/") if r else [])
    return Index(items, children, groups, order)


@dataclass
class ReusableCopy:
    """One copy and what inotify says happened to it since it was last pristine."""

    path: str
    key: object
    index: Index
    defang: bool
    since_ns: int = 0
    #: rel -> inode number of every entry as made (the walk's reference)
    inodes: dict[str, int] = field(default_factory=dict)
    #: inode number -> rel of the copy's non-directories (a new hard link names one of these)
    by_inode: dict[int, str] = field(default_factory=dict)
    #: rel of each watched directory -> watch id
    wds: dict[str, int] = field(default_factory=dict)
    #: every directory has a watch and no event was lost
    trusted: bool = True
    opens: int = 0
    touched: set[str] = field(default_factory=set)
    created: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    #: (from, to) of directories renamed within watched directories, in order
    moves: list[tuple[str, str]] = field(default_factory=list)
    cookies: dict[int, str] = field(default_factory=dict)

    def event(self, dir_rel: str, mask: int, cookie: int, name: str) -> None:
        rel = _join(dir_rel, name) if name else dir_rel
        if mask & ino.IN_OPEN:
            self.opens += 1
        if mask & (ino.IN_CLOSE_WRITE | ino.IN_CLOSE_NOWRITE):
            self.opens -= 1
        if mask & _TOUCH:
            self.touched.add(rel)
        if mask & ino.IN_CREATE:
            self.created.add(rel)
        if mask & ino.IN_DELETE:
            self.deleted.add(rel)
        if mask & ino.IN_MOVED_FROM:
            self.cookies[cookie] = rel
        if mask & ino.IN_MOVED_TO:
            self.created.add(rel)
            src = self.cookies.pop(cookie, None)
            if src is None:
                # Moved in from outside the copy or from a directory nobody watches.
                self.trusted = False
            elif mask & ino.IN_ISDIR:
                self.moves.append((src, rel))
        if mask & ino.IN_UNMOUNT:
            self.trusted = False

    def forget(self) -> None:
        """Drop what the events said (after the copy was made pristine); opens stay counted."""
        self.touched.clear()
        self.created.clear()
        self.deleted.clear()
        self.moves.clear()
        self.cookies.clear()

    def dirty_dirs(self) -> set[str] | None:
        """Directories (and their ancestors) that may hold a change, by the events; None when
        the events cannot say (a lost event, a moved directory, a name made and gone)."""
        if not self.trusted or self.moves or self.cookies:
            return None
        linked = _linked_names(self)
        if linked is None:
            return None
        out: set[str] = set()
        for rel in self.touched | linked:
            # The entry itself when it is a directory (a new one is walked whole anyway).
            for p in (rel, _parent(rel)):
                while p not in out:
                    out.add(p)
                    if not p:
                        break
                    p = _parent(p)
        return out


class Watcher:
    """The backend's inotify instance and which copy each watch belongs to."""

    def __init__(self) -> None:
        self._ino: ino.Inotify | None = None
        self.owners: dict[int, tuple[ReusableCopy, str]] = {}
        self.broken = False

    def watch(self, copy: ReusableCopy, rel: str) -> None:
        """Watch ``rel`` of ``copy``; a copy whose watch cannot be added is walked instead."""
        if self.broken:
            copy.trusted = False
            return
        try:
            if self._ino is None:
                self._ino = ino.Inotify()
            wd = self._ino.add(os.path.join(copy.path, rel) if rel else copy.path, _MASK)
        except OSError:
            # ENOSPC (max_user_watches), EMFILE (max_user_instances), no inotify at all.
            copy.trusted = False
            return
        copy.wds[rel] = wd
        self.owners[wd] = (copy, rel)

    def unwatch(self, copy: ReusableCopy, top: str) -> None:
        """Stop watching ``top`` and the directories below it."""
        for rel in [r for r in copy.wds if _under(r, top)]:
            wd = copy.wds.pop(rel)
            if self.owners.get(wd, (None,))[0] is copy:
                del self.owners[wd]
                if self._ino is not None:
                    self._ino.remove(wd)

    def drain(self) -> None:
        if self._ino is None:
            return
        for wd, mask, cookie, name in self._ino.read():
            if mask & ino.IN_Q_OVERFLOW:
                for copy, _rel in self.owners.values():
                    copy.trusted = False
                continue
            owner = self.owners.get(wd)
            if owner is None:
                continue
            copy, rel = owner
            copy.event(rel, mask, cookie, name)
            if mask & ino.IN_IGNORED:
                # The directory is gone (or on a filesystem that went away).
                del self.owners[wd]
                if copy.wds.get(rel) == wd:
                    del copy.wds[rel]

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None
        self.owners.clear()


def record(copy: ReusableCopy, watcher: Watcher, top: str = "") -> None:
    """Note the inode numbers of ``top`` and everything below it, and watch its directories."""
    root = os.path.join(copy.path, top) if top else copy.path
    copy.inodes[top] = os.lstat(root).st_ino
    watcher.watch(copy, top)
    todo = [top]
    while todo:
        rel_dir = todo.pop()
        with os.scandir(os.path.join(copy.path, rel_dir) if rel_dir else copy.path) as it:
            for e in it:
                rel = _join(rel_dir, e.name)
                # stat, not the directory entry's d_ino: overlayfs may report another number
                # in readdir than in stat.
                st = e.stat(follow_symlinks=False)
                copy.inodes[rel] = st.st_ino
                if stat.S_ISDIR(st.st_mode):
                    watcher.watch(copy, rel)
                    todo.append(rel)
                else:
                    copy.by_inode.setdefault(st.st_ino, rel)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: str) -> None:
    from pathlib import Path

    from pytest_layers._removal import remove_tree

    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(Path(path))
    else:
        os.unlink(path)
    if _lstat(path) is not None:
        raise OSError(errno.ENOTEMPTY, f"could not remove {path!r} from a copy being reset")


def _undo_moves(copy: ReusableCopy) -> bool:
    """Rename moved image directories back, last move first; False when a move cannot be
    followed (then the walk restores instead)."""
    for src, dst in reversed(copy.moves):
        st = _lstat(os.path.join(copy.path, dst))
        if st is None or copy.inodes.get(src) != st.st_ino or not stat.S_ISDIR(st.st_mode):
            return False
        _remove(os.path.join(copy.path, src))
        os.rename(os.path.join(copy.path, dst), os.path.join(copy.path, src))
    return True


def _linked_names(copy: ReusableCopy) -> set[str] | None:
    """The image files the test's new names are hard links to (None: cannot be known)."""
    out: set[str] = set()
    for rel in copy.created:
        st = _lstat(os.path.join(copy.path, rel))
        if st is None:
            if rel in copy.deleted or rel in copy.cookies.values():
                return None  # a name made and gone: it may have been a link to anything
            continue
        if stat.S_ISDIR(st.st_mode):
            # Nothing watches a new directory: look at what is in it.
            for dirpath, dirnames, filenames in os.walk(os.path.join(copy.path, rel)):
                for name in filenames + dirnames:
                    sub = os.lstat(os.path.join(dirpath, name))
                    if not stat.S_ISDIR(sub.st_mode) and sub.st_nlink > 1:
                        known = copy.by_inode.get(sub.st_ino)
                        if known is not None:
                            out.add(known)
        elif st.st_nlink > 1:
            known = copy.by_inode.get(st.st_ino)
            if known is not None:
                out.add(known)
    return out


def walk_changes(copy: ReusableCopy) -> set[str] | None:
    """What differs from the copy as made, by inode number and ctime, O(entries) ``lstat``;
    None when the copy's root itself was replaced."""
    root = _lstat(copy.path)
    if root is None or root.st_ino != copy.inodes.get(""):
        return None
    out: set[str] = set()
    if root.st_ctime_ns >= copy.since_ns:
        out.add("")
    todo = [""]
    while todo:
        rel_dir = todo.pop()
        seen = set()
        with os.scandir(os.path.join(copy.path, rel_dir) if rel_dir else copy.path) as it:
            for e in it:
                seen.add(e.name)
                rel = _join(rel_dir, e.name)
                st = e.stat(follow_symlinks=False)
                same = copy.inodes.get(rel) == st.st_ino and rel in copy.index.items
                if not same or st.st_ctime_ns >= copy.since_ns:
                    out.add(rel)
                if same and stat.S_ISDIR(st.st_mode):
                    todo.append(rel)
        for name in copy.index.children.get(rel_dir, ()):
            if name not in seen:
                out.add(_join(rel_dir, name))
    return out


def works_inside(path: str) -> bool:
    """Whether a process has its working directory or its root in ``path``: two readlinks a
    process, cheap enough for every reset (open files are what the events count)."""
    prefix = os.path.realpath(path)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for link in (f"/proc/{pid}/cwd", f"/proc/{pid}/root"):
            with contextlib.suppress(OSError):
                target = os.readlink(link)
                if target == prefix or target.startswith(prefix + "/"):
                    return True
    return False


def still_used(path: str) -> bool:
    """Whether a process has a file, a mapping, a working directory or a root in ``path``
    (what the walk cannot see; the events count opens instead)."""
    prefix = os.path.realpath(path)
    inside = (prefix, prefix + "/")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        base = f"/proc/{pid}"
        links = [f"{base}/cwd", f"{base}/root"]
        with contextlib.suppress(OSError):
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        for link in links:
            with contextlib.suppress(OSError):
                target = os.readlink(link)
                if target == prefix or target.startswith(inside[1]):
                    return True
        with contextlib.suppress(OSError), open(f"{base}/maps", encoding="utf-8") as maps:
            for line in maps:
                if inside[1] in line:
                    return True
    return False


def reset(
    copy: ReusableCopy,
    watcher: Watcher,
    copier: _Copier,
    home: str,
    *,
    may_mount: bool = True,
) -> bool:
    """Bring ``copy`` back to its image; False when that cannot be done with certainty (the
    caller throws the copy away). ``home`` is a directory on the copy's filesystem for the
    ctime stamp; ``may_mount=False`` says that this process (and so the test) cannot mount, so
    no mount needs looking for."""
    watcher.drain()
    if copy.opens != 0:
        return False  # something in it is still open (a process still writing, a mapping)
    if works_inside(copy.path):
        # A process left running with its working directory (or root) here holds nothing
        # open now, but its next relative write would land in the next test's copy.
        return False
    if may_mount and _mounts_in(copy.path):
        return False
    changed: set[str] | None = None
    by_events = copy.trusted and not copy.cookies and _undo_moves(copy)
    if by_events:
        linked = _linked_names(copy)
        if linked is not None:
            changed = copy.touched | linked
    if changed is None:
        by_events = False
        if still_used(copy.path):
            return False
        changed = walk_changes(copy)
        if changed is None:
            return False
    _restore(copy, watcher, copier, changed, by_events=by_events)
    watcher.drain()
    if copy.opens != 0:
        return False
    copy.forget()
    if not copy.trusted and not watcher.broken and _all_watched(copy):
        copy.trusted = True  # the lost events are accounted for by the walk
    copy.since_ns = stamp(home)
    return True


def stamp(directory: str) -> int:
    """A ctime from the filesystem's clock, now: every later change is stamped at least this.

    Unlike :func:`~pytest_layers.changeset.ctime_mark` it does not wait for the clock to
    tick, so what the reset itself wrote in the same tick also counts as changed after it; the
    walk then restores it once more, and ``diff()`` finds it equal to the image. Never the
    reverse: a change can not hide behind it.
    """
    path = os.path.join(directory, ".stamp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.utime(fd)
        return os.fstat(fd).st_ctime_ns
    finally:
        os.close(fd)


def _all_watched(copy: ReusableCopy) -> bool:
    return all(rel in copy.wds for rel, item in copy.index.items.items() if _is_dir(item))


def _is_dir(item: _Item) -> bool:
    return stat.S_ISDIR(item.st.st_mode)


def _mounts_in(path: str) -> bool:
    from pathlib import Path

    from pytest_layers._mounts import mounts_under

    return any(True for _ in mounts_under(Path(os.path.realpath(path))))


def _restore(
    copy: ReusableCopy,
    watcher: Watcher,
    copier: _Copier,
    changed: Iterable[str],
    *,
    by_events: bool,
) -> None:
    """Make every entry of ``changed`` (and what hangs on it) as the image has it. With
    ``by_events``, an image directory is kept only while its watch lives: a directory removed
    and made again may get the old inode number, and nothing watched what went into it."""
    index = copy.index
    base = copy.path
    rebuild: list[str] = []  # image directories made again whole
    files: set[str] = set()
    metas: set[str] = set()

    def path_of(rel: str) -> str:
        return os.path.join(base, rel) if rel else base

    for rel in sorted(set(changed), key=_depth):
        if any(_under(rel, top) for top in rebuild):
            continue
        if rel:
            metas.add(_parent(rel))
        item = index.items.get(rel)
        st = _lstat(path_of(rel))
        if item is None:
            if st is not None:
                _remove(path_of(rel))
            continue
        if _is_dir(item):
            same = st is not None and copy.inodes.get(rel) == st.st_ino
            if same and by_events and rel not in copy.wds:
                same = False
            if st is not None and same and stat.S_ISDIR(st.st_mode):
                metas.add(rel)
                if copier.root or st.st_uid == copier.uid:
                    # Its children may be restored below: make sure this process can.
                    os.chmod(path_of(rel), stat.S_IMODE(st.st_mode) | 0o700)
                continue
            _remove(path_of(rel))
            watcher.unwatch(copy, rel)
            rebuild.append(rel)
        else:
            if st is not None:
                _remove(path_of(rel))
            files.add(rel)
    # Hard link groups come back whole: a write through one name changed them all.
    for rel in list(files):
        for member in index.groups.get(rel, ()):
            if member not in files and not any(_under(member, top) for top in rebuild):
                _remove(path_of(member))
                files.add(member)
                metas.add(_parent(member))
    made_dirs: list[str] = []
    for top in rebuild:
        for rel in index.order:
            if _under(rel, top):
                item = index.items[rel]
                if _is_dir(item):
                    os.mkdir(path_of(rel), 0o700)
                    made_dirs.append(rel)
                else:
                    files.add(rel)
    for rel in sorted(files, key=lambda r: r.split("/")):
        old = copy.inodes.get(rel)
        if old is not None and copy.by_inode.get(old) == rel:
            del copy.by_inode[old]
        copier.other(index.items[rel], path_of(rel))
        st = os.lstat(path_of(rel))
        copy.inodes[rel] = st.st_ino
        copy.by_inode[st.st_ino] = rel
    for rel in made_dirs:
        copy.inodes[rel] = os.lstat(path_of(rel)).st_ino
        watcher.watch(copy, rel)
    for rel in sorted({*metas, *made_dirs}, key=_depth, reverse=True):
        item = index.items.get(rel)
        if item is None or not _is_dir(item):
            continue
        _drop_extra_xattrs(path_of(rel), item)
        copier.meta(path_of(rel), item, fd=None)


def _drop_extra_xattrs(path: str, item: _Item) -> None:
    keep = {name for name, _value in item.xattrs}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if name not in keep and _keep_xattr(name):
            try:
                os.removexattr(path, name, follow_symlinks=False)
            except OSError as exc:
                # A label the filesystem gives every new entry (security.selinux) is not the
                # test's; a user.* one the test set and that cannot go is a failed reset.
                if name.startswith("user.") or exc.errno not in (errno.EPERM, errno.ENOTSUP):
                    raise
