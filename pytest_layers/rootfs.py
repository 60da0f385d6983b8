"""``Rootfs``: one test's private, writable view of an image.

Stacked top to bottom: the rw layer (the test's writes), the init layer (per-test generated
files, never in a diff or a commit), then the image's read-only layers. No pytest here: the
plugin's ``rootfs`` fixture is a thin wrapper that opens one and closes it after the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, overload

from pytest_layers import _chroot, _dirfd, changeset, diffdata, layertar
from pytest_layers._removal import remove_tree
from pytest_layers.backends.base import View
from pytest_layers.build import Layer, LayerSession
from pytest_layers.errors import LayerDefinitionError, LayersError

__all__ = [
    "Rootfs",
    "Prepared",
    "prepare",
    "portable",
    "from_portable",
    "discard",
    "check_init_path",
    "MAX_SYMLINKS",
]

MAX_SYMLINKS = _chroot.MAX_SYMLINKS


def check_init_path(rel: object, *, where: str = "") -> str:
    """Validate an init-layer path: relative, no ``..``, not empty. Returns it normalised."""
    if not isinstance(rel, str):
        raise LayerDefinitionError(
            f"{where}init path {rel!r} must be a str (a path relative to the rootfs)"
        )
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise LayerDefinitionError(
            f"{where}init path {rel!r} is absolute; init paths are relative to the rootfs "
            f"(write {rel.lstrip('/')!r})"
        )
    if ".." in pure.parts:
        raise LayerDefinitionError(
            f"{where}init path {rel!r} contains '..'; init files must stay inside the rootfs"
        )
    norm = str(pure)
    if norm in ("", "."):
        raise LayerDefinitionError(f"{where}init path {rel!r} names the root, not a file")
    return norm


class Rootfs(os.PathLike[str]):
    """A test's mounted rootfs. ``os.fspath(rootfs)`` is the merged directory.

    ``rootfs / "etc/app.conf"`` gives a :class:`pathlib.Path` inside it (a leading ``/`` is
    taken as the rootfs's root, never the host's).
    """

    def __init__(
        self,
        session: LayerSession,
        image: Sequence[Layer],
        *,
        init: Mapping[str, str | bytes] | None = None,
        readonly: bool = False,
        prepared: Prepared | None = None,
    ) -> None:
        """``prepared`` is a view made ahead by :func:`prepare` with the same arguments (the
        plugin's view pool); without it the view is made here."""
        self._session = session
        self._image = list(image)
        self._readonly = readonly
        self._lowers = [x.directory for x in reversed(self._image)]
        self._closed = False
        if prepared is None:
            prepared = prepare(session, image, init=init, readonly=readonly)
        # Read through, not copied: a view from the pool's helper makes its paths only when
        # they are first used (see _Loaded).
        self._prepared = prepared
        self._processes: list[Any] = []  # container.Process, imported when a program runs

    @property
    def _scratch(self) -> Path:
        return self._prepared.scratch

    @property
    def _view(self) -> View:
        return self._prepared.view

    @property
    def _exclude(self) -> set[str]:
        return self._prepared.exclude

    @property
    def _init_dirs(self) -> set[str]:
        return self._prepared.init_dirs

    @property
    def _init_dir(self) -> Path | None:
        return self._prepared.init_dir

    # -- the init layer

    def _image_view(self) -> changeset.ImageView:
        return changeset.ImageView(self._lowers, self._session.store.flavor)

    # -- the public surface

    def __fspath__(self) -> str:
        return self._prepared.path_text()

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        """``rootfs / "etc/app.conf"``: a path inside the rootfs, always.

        A leading ``/`` is the rootfs's root, and ``..`` is resolved lexically against it, as
        a chroot treats ``/..``: ``rootfs / "../../etc/passwd"`` is the image's
        ``/etc/passwd``, never the host's. Symlinks are not resolved (the result is a plain
        :class:`pathlib.Path`); :meth:`resolve` also follows them inside the rootfs.
        """
        parts: list[str] = []
        for part in os.fspath(other).split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        return self._view.path.joinpath(*parts)

    def __repr__(self) -> str:
        names = "+".join(x.name or x.chain_id[:19] for x in self._image[-1:]) or "(empty)"
        return f"<Rootfs {names} at {self._view.path}>"

    @property
    def path(self) -> Path:
        """The merged directory."""
        return self._view.path

    @property
    def layers(self) -> list[Layer]:
        """The image's layers, bottom first."""
        return list(self._image)

    @property
    def readonly(self) -> bool:
        return self._readonly

    @contextlib.contextmanager
    def _readable(self) -> Iterator[dict[str, _Opened]]:
        """Read the rw layer even where the test took the owner's own access away.

        An ordinary user cannot list a directory the test made mode 000 (root reads through
        it), so the first :meth:`_entries` would fail with ``PermissionError``. On that failure
        such directories of the user's own are opened up (``u+rwx``) while the changes are
        read and the layer written; yields ``{rel: original mode}`` (empty when nothing had to
        be opened) and restores the modes on exit, so the test's view is unchanged. The layer
        keeps the opened-up mode: a store must be able to read, hash, verify and copy its own
        layers, which an ordinary user cannot do through a mode-000 directory
        (docs/reference/rootfs.md).
        """
        opened: dict[str, _Opened] = {}
        try:
            yield opened
        finally:
            upper = self._view.upper
            for rel in sorted(opened, key=lambda r: r.count("/"), reverse=True):
                if upper is not None:
                    with contextlib.suppress(OSError):
                        _restore_mode(upper / rel if rel else upper, opened[rel])

    def _read_entries(self, opened: dict[str, _Opened]) -> list[changeset.Entry]:
        try:
            return self._entries()
        except PermissionError:
            upper = self._view.upper
            if upper is None or os.geteuid() == 0:
                raise
            opened.update(_open_up(upper))
            if not opened:
                raise
        entries = self._entries()
        have = {e.path for e in entries}
        # A directory whose opened-up mode happens to equal the image's still changed.
        for rel in opened:
            while rel and rel not in have:
                entries.append(changeset.Entry(rel, "C", root=self._view.upper))
                have.add(rel)
                rel = rel.rpartition("/")[0]
        return sorted(entries, key=lambda e: e.path.replace("/", "\0"))

    def _entries(self) -> list[changeset.Entry]:
        if self._view.upper is None:
            return []
        entries = self._session.backend.changes(
            self._view, self._image_view(), exclude=self._exclude
        )
        if not self._init_dirs:
            return entries
        # A directory only the init layer made shows up in a full copy (the copy backend) even
        # when the test never touched it: drop it unless something below it changed.
        below = {e.path.rsplit("/", 1)[0] for e in entries if "/" in e.path}
        parents = set()
        for p in below:
            while p and p not in parents:
                parents.add(p)
                p = p.rpartition("/")[0]
        return [e for e in entries if e.path not in self._init_dirs or e.path in parents]

    @overload
    def diff(self, *, details: Literal[False] = False) -> list[changeset.Change]: ...

    @overload
    def diff(self, *, details: Literal[True]) -> diffdata.Diff: ...

    def diff(self, *, details: bool = False) -> list[changeset.Change] | diffdata.Diff:
        """What the test changed, as ``docker diff`` would list it (sorted by path).

        With ``details=True``: a :class:`~pytest_layers.diffdata.Diff` whose entries also carry
        type, mode, size, content digest and link target, convertible to plain data
        (``.to_data()``) and text (``.to_text()``) for snapshot tools.
        """
        with self._readable() as opened:
            entries = self._read_entries(opened)
            if details:
                return diffdata.details(entries)
            return changeset.to_changes(entries)

    def unified_diff(self, *, max_files: int = 5, max_lines: int = 40) -> str:
        """The changed text files as a unified diff against the image, bounded: at most
        ``max_files`` files of ``max_lines`` lines; binary files and deletions named only."""
        with self._readable() as opened, self._image_view() as image:
            return diffdata.unified(
                self._read_entries(opened), image, max_files=max_files, max_lines=max_lines
            )

    def commit(self, name: str | None = None) -> Layer:
        """Commit the rw layer now, as a layer whose parent is the image; return it."""
        if self._view.upper is None:
            raise LayersError("a readonly rootfs has no writable layer to commit")
        store = self._session.store
        parent = self._image[-1] if self._image else None
        # Copying the rw layer into staging fills the store's filesystem (the rw layer itself
        # may live on the scratch tmpfs): the store's full-disk policy names what was written.
        with store.full_disk(self._commit_label(name)):
            self._ensure_stored(self._image)
            with self._readable() as opened:
                info = store.write_layer(
                    self._read_entries(opened),
                    parent=parent.chain_id if parent else None,
                    name=name,
                    source="commit",
                    what=self._commit_label(name),
                )
        return self._session.layer_from_store(info.chain_id, parent, name)

    def commit_with_init(self, committed: Layer) -> str | None:
        """Store the init layer under ``committed`` (a :meth:`commit` of this rootfs), so that
        a snapshot can show what the test saw; returns the chain id of image + init layer +
        rw layer, or None when the test had no init files.

        ``committed`` itself stays the rw layer on the image (its chain id and what ``export``
        writes do not change); the rw layer above the init layer is an alias of it, no copy.
        """
        if self._init_dir is None:
            return None
        store = self._session.store
        parent = self._image[-1].chain_id if self._image else None
        what = "the init layer of a snapshot"
        with store.full_disk(what):
            entries = changeset.changes_from_upper(self._init_dir, self._image_view())
            init = store.write_layer(entries, parent=parent, name=None, source="init", what=what)
            diff_ids = [x.diff_id for x in self._image]
            top = layertar.chain_id([*diff_ids, init.diff_id, committed.diff_id])
            store.add_alias(top, committed.chain_id, parent=init.chain_id)
        return top

    def _commit_label(self, name: str | None) -> str:
        if name is not None:
            return f"layer {name!r}"
        if not self._image:
            return "the rw layer on an empty image"
        top = self._image[-1]
        return f"the rw layer on {top.name or top.chain_id[:19]!r}"

    def _ensure_stored(self, image: Sequence[Layer]) -> None:
        # A union's layers sit at chain positions the store has never seen; a commit's parent
        # must be a stored chain, so record each such position as an alias of the stored layer
        # (no copy: a snapshot of a union costs what its rw layer holds).
        store = self._session.store
        for lay in image:
            if store.has_layer(lay.chain_id):
                continue
            if lay.origin is None:
                raise LayersError(
                    f"layer {lay.name or lay.chain_id} is not in the store {store.root} "
                    "(pruned while the session used it?); rerun the tests to rebuild it"
                )
            store.add_alias(
                lay.chain_id, lay.origin, parent=lay.parent.chain_id if lay.parent else None
            )

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """Resolve ``path`` inside the rootfs as a chroot would.

        Absolute symlinks and ``..`` are taken relative to the rootfs's root, so the result
        never leaves it. Missing components are kept as they are (like ``realpath``).
        Raises ``OSError(ELOOP)`` on a symlink loop.
        """
        return _chroot.resolve(self._view.path, path)

    # -- running programs inside

    def run(
        self,
        args: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        user: str | int | None = None,
        timeout: float | None = None,
        check: bool = False,
        network: str = "none",
        binds: Sequence[Any] = (),
        capture_output: bool = True,
        text: bool = False,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a program with this rootfs as its ``/``, as ``subprocess.run`` does on the host.

        The program's writes land in the rw layer (:meth:`diff` shows them); ``binds``
        (``Bind`` or ``(host_path, target)``, read-only unless ``Bind(readonly=False)``) never
        do. ``timeout`` kills every process inside, then raises ``subprocess.TimeoutExpired``;
        ``check=True`` raises ``subprocess.CalledProcessError`` on a non-zero status (with a
        note, for an ordinary user without subordinate ids, when the program said "Invalid
        argument": chown to an unmapped id). stdin is ``/dev/null`` unless ``input`` is given.
        What the program sees: docs/reference/rootfs.md.
        """
        out = subprocess.PIPE if capture_output else None
        proc = self.spawn(
            args,
            env=env,
            cwd=cwd,
            user=user,
            network=network,
            binds=binds,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            text=text,
        )
        with proc:
            try:
                stdout, stderr = proc.communicate(input, timeout)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(
                    proc.args, exc.timeout, exc.output, exc.stderr
                ) from None
        code = proc.returncode
        assert code is not None
        if check and code:
            error = subprocess.CalledProcessError(code, proc.args, stdout, stderr)
            note = _chown_note(stderr)
            if note is not None and hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(note)
            raise error
        return subprocess.CompletedProcess(proc.args, code, stdout, stderr)

    def spawn(
        self,
        args: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        user: str | int | None = None,
        network: str = "none",
        binds: Sequence[Any] = (),
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = False,
    ) -> Any:
        """Start a program inside (a server under test) and return a ``subprocess.Popen``-like
        :class:`~pytest_layers.container.Process`; ``stdin``... take ``subprocess.PIPE``,
        ``DEVNULL``, an fd or a file (default: ours). Whatever still runs when the rootfs
        closes (the end of the test) is killed then."""
        from pytest_layers import container
        from pytest_layers.errors import SandboxError
        from pytest_layers.sandbox import DEFAULT_PATH, Bind, Sandbox

        if self._closed:
            raise LayersError(f"{self!r} is closed: run programs while its test runs")
        argv = container.normalize_args(args)
        if not cwd.startswith("/"):
            raise ValueError(f"cwd={cwd!r}: give a path inside the image starting with '/'")
        mounts = [b if isinstance(b, Bind) else Bind(Path(b[0]), str(b[1])) for b in binds]
        for bind in mounts:
            source = os.path.abspath(bind.source)
            if os.path.realpath(source) != source:
                raise SandboxError(
                    errno.ELOOP,
                    f"bind source {os.fspath(bind.source)!r} is or passes through a symlink; "
                    f"bind its real path ({os.path.realpath(source)!r}) instead",
                )
            if not os.path.exists(source):
                raise SandboxError(errno.ENOENT, f"bind source {source!r} does not exist")
        environ = {"PATH": DEFAULT_PATH, "HOME": "/root"}
        ids = None
        if user is not None:
            uid, gid, home = container.parse_user(self.resolve("/etc/passwd"), user)
            ids = (uid, gid)
            if home:
                environ["HOME"] = home
        environ.update(env or {})
        box = Sandbox(self.path, network=network, hostname=self._hostname(), binds=mounts)
        made = self._missing(["proc", "dev", *(b.target for b in mounts)])
        fds = [
            container.stdio_fd(spec, reading=i == 0)
            for i, spec in enumerate((stdin, stdout, stderr))
        ]
        try:
            proc = box.spawn(
                argv,
                env=environ,
                cwd=cwd,
                stdin=fds[0][0],
                stdout=fds[1][0],
                stderr=fds[2][0],
                user=ids,
                close=[ours for _, ours in fds if ours is not None],
            )
        except BaseException:
            for (child, ours), spec in zip(fds, (stdin, stdout, stderr), strict=True):
                if spec in (subprocess.PIPE, subprocess.DEVNULL) and child is not None:
                    os.close(child)
                if ours is not None:
                    os.close(ours)
            self._remove_made(made)
            raise
        for (child, _), spec in zip(fds, (stdin, stdout, stderr), strict=True):
            if spec in (subprocess.PIPE, subprocess.DEVNULL) and child is not None:
                os.close(child)
        handle = container.Process(
            proc,
            (fds[0][1], fds[1][1], fds[2][1]),
            text=text,
            on_exit=lambda: self._remove_made(made),
        )
        self._processes = [p for p in self._processes if p.returncode is None]
        self._processes.append(handle)
        return handle

    def _hostname(self) -> str:
        if self._init_dir is not None:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                lines = (self._init_dir / "etc/hostname").read_text().split()
                if lines:
                    return lines[0]
        return "pytest-layers"

    def _missing(self, targets: Sequence[str]) -> list[Path]:
        """The mount points the sandbox will make (it makes what the image lacks), top first
        per target: removed again when the program ends, so that no ``A /proc`` or bind target
        shows in :meth:`diff`."""
        made: list[Path] = []
        for target in targets:
            path = self.resolve("/" + target.strip("/"))
            rel = path.relative_to(self.path)
            for i in range(1, len(rel.parts) + 1):
                p = self.path.joinpath(*rel.parts[:i])
                if not os.path.lexists(p):
                    made.extend(
                        self.path.joinpath(*rel.parts[:j]) for j in range(i, len(rel.parts) + 1)
                    )
                    break
        return made

    def _remove_made(self, made: list[Path]) -> None:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(p)
                elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(p)

    def close(self) -> None:
        """Kill the programs still running inside, unmount, remove the scratch; idempotent."""
        self.release()()

    def release(self) -> Callable[[], None]:
        """Close the rootfs for the test (programs still running inside are killed) and return
        what unmounts and removes it, for a caller that runs it later (the view pool's
        worker). The view is never handed out again."""
        if self._closed:
            return _nothing
        self._closed = True
        for proc in self._processes:
            with contextlib.suppress(OSError):
                proc.close()
        self._processes = []
        return functools.partial(discard, self._prepared)


def _nothing() -> None:
    pass


@dataclasses.dataclass
class Prepared:
    """A view made ahead of the test that takes it: its scratch, the mounted view and what the
    init layer holds (files to leave out of a diff, directories the image lacks)."""

    scratch: Path
    view: View
    exclude: set[str]
    init_dirs: set[str]
    init_dir: Path | None

    def path_text(self) -> str:
        """The merged directory, as text (what ``os.fspath(rootfs)`` gives)."""
        return os.fspath(self.view.path)


class _Loaded(Prepared):
    """A :class:`Prepared` read back from :func:`portable`'s plain values, made into paths and
    a view when first used. A test often only asks for its rootfs's path as text, and each
    :class:`~pathlib.Path` costs a few microseconds to make: on the view pool's hot path, in
    every test, that was a tenth of the cost of a rootfs."""

    def __init__(self, data: tuple[Any, ...]) -> None:  # no dataclass __init__: loaded later
        self._data = data
        self._path_text: str = next(v for n, _, v in data[2] if n == "path")

    def path_text(self) -> str:
        return self._path_text

    def __getattr__(self, name: str) -> Any:
        # Only called for what is not set yet: the dataclass fields, before the first use.
        if name not in _PREPARED_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        data = self.__dict__.get("_data")
        if data is None:  # another thread set every field since this lookup missed
            return self.__dict__[name]
        # Everything made first, then set in one step, and only then the data dropped: two
        # threads meeting here both find every field (the later one sets equal values), and a
        # failure leaves the data for the next attempt to fail the same way.
        scratch, cls_name, fields, exclude, init_dirs, init_dir = data
        values: dict[str, Any] = {n: Path(v) if is_path else v for n, is_path, v in fields}
        loaded = {
            "scratch": Path(scratch),
            "view": _view_class(cls_name)(**values),
            "exclude": set(exclude),
            "init_dirs": set(init_dirs),
            "init_dir": None if init_dir is None else Path(init_dir),
        }
        self.__dict__.update(loaded)
        self.__dict__.pop("_data", None)  # another thread may have dropped it already
        return loaded[name]


_PREPARED_FIELDS = frozenset(f.name for f in dataclasses.fields(Prepared))


def prepare(
    session: LayerSession,
    image: Sequence[Layer],
    *,
    init: Mapping[str, str | bytes] | None = None,
    readonly: bool = False,
) -> Prepared:
    """Make a view of ``image`` for :class:`Rootfs`: scratch, init layer, mount."""
    return prepare_begin(session, image, init=init, readonly=readonly)()


def prepare_begin(
    session: LayerSession,
    image: Sequence[Layer],
    *,
    init: Mapping[str, str | bytes] | None = None,
    readonly: bool = False,
) -> Callable[[], Prepared]:
    """Start :func:`prepare` and return what finishes it. A backend with ``begin_open`` (fuse:
    the daemon started, its mount not yet waited for) lets a caller making several views (the
    view pool's helper) have their daemons start together; with any other the view is made
    here and the returned callable only hands it over."""
    lowers = [x.directory for x in reversed(image)]
    scratch = session.scratch()
    try:
        exclude: set[str] = set()
        init_dirs: set[str] = set()
        init_dir: Path | None = None
        if init:
            init_dir = scratch / "init"
            exclude, init_dirs = _write_init(
                changeset.ImageView(list(lowers), session.store.flavor), init_dir, init
            )
            lowers.insert(0, init_dir)
        view_scratch = scratch / "view"
        view_scratch.mkdir()
        begin = getattr(session.backend, "begin_open", None)
        if begin is None:
            view = session.backend.open(
                lowers, view_scratch, readonly=readonly, flavor=session.store.flavor
            )
            made = Prepared(scratch, view, exclude, init_dirs, init_dir)
            return lambda: made
        finish_open = begin(lowers, view_scratch, readonly=readonly, flavor=session.store.flavor)
    except BaseException:
        remove_tree(scratch)
        raise

    def finish() -> Prepared:
        try:
            view = finish_open()
        except BaseException:
            remove_tree(scratch)
            raise
        return Prepared(scratch, view, exclude, init_dirs, init_dir)

    return finish


def portable(prepared: Prepared) -> tuple[Any, ...]:
    """``prepared`` as it crosses to another process (the view pool's helper makes it, the
    session uses it), in plain values (:func:`from_portable` reads them back): without the
    closer, which only its maker can run. The view's class is named, and its fields are
    listed with whether each is a path (a backend's view may add fields: ``CopyView``)."""
    view = prepared.view
    fields = tuple(
        (f.name, isinstance(v, Path), os.fspath(v) if isinstance(v, Path) else v)
        for f in dataclasses.fields(view)
        if f.name != "_closer"
        for v in (getattr(view, f.name),)
    )
    return (
        os.fspath(prepared.scratch),
        f"{type(view).__module__}:{type(view).__qualname__}",
        fields,
        tuple(prepared.exclude),
        tuple(prepared.init_dirs),
        None if prepared.init_dir is None else os.fspath(prepared.init_dir),
    )


def from_portable(data: tuple[Any, ...]) -> Prepared:
    """The :class:`Prepared` that :func:`portable` wrote (its view has no closer); its paths
    and view are made when first used."""
    return _Loaded(data)


@functools.cache
def _view_class(name: str) -> type[View]:
    import importlib

    module, _, qualname = name.partition(":")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, View)):
        raise TypeError(f"{name} is not a View class")
    return cls


def discard(prepared: Prepared) -> None:
    """Unmount a prepared or used view and remove its scratch."""
    try:
        prepared.view.close()
    finally:
        try:
            # Usually empty by now (the backend removed its part): one rmdir, which never
            # removes a mount point (EBUSY), instead of remove_tree's read of the mount table.
            os.rmdir(prepared.scratch)
        except OSError:
            remove_tree(prepared.scratch)


def _write_init(
    image: changeset.ImageView, init_dir: Path, files: Mapping[str, str | bytes]
) -> tuple[set[str], set[str]]:
    """Write the init layer; returns (its files, the directories the image lacks)."""
    written: set[str] = set()
    new_dirs: set[str] = set()
    init_dir.mkdir()
    for rel, content in sorted(files.items()):
        rel = check_init_path(rel)
        if not isinstance(content, (str, bytes)):
            raise LayerDefinitionError(
                f"init file {rel!r}: content must be str or bytes, got {type(content).__name__}"
            )
        parts = PurePosixPath(rel).parts
        for i in range(1, len(parts)):
            drel = "/".join(parts[:i])
            dpath = init_dir / drel
            if dpath.is_dir():
                continue
            dpath.mkdir()
            # The topmost lower wins a directory's metadata in an overlay: copy the image's
            # so that the init layer does not change how /etc looks.
            st = image.lstat(drel)
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.chmod(dpath, stat.S_IMODE(st.st_mode))
                if os.geteuid() == 0 or st.st_uid == os.geteuid():
                    os.lchown(dpath, st.st_uid, st.st_gid)
                os.utime(dpath, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                new_dirs.add(drel)
        data = content.encode() if isinstance(content, str) else content
        (init_dir / rel).write_bytes(data)
        written.add(rel)
    return written, new_dirs


#: A directory opened up for reading: its original mode, and its device and inode.
_Opened = tuple[int, int, int]


def _restore_mode(path: Path, was: _Opened) -> None:
    """Give the directory opened up at ``path`` its mode back, only if ``path`` is still that
    very directory: a process left running in the rootfs may have put a symlink (to a file of
    the user's) or another directory there meanwhile, which keeps its mode."""
    mode, dev, ino = was
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
            os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _open_up(tree: Path) -> dict[str, _Opened]:
    """Give the owner ``rwx`` on every directory of ``tree`` it owns but cannot list or
    search; returns ``{rel: (original mode, device, inode)}`` (``""`` for ``tree`` itself)."""
    uid = os.geteuid()
    opened: dict[str, _Opened] = {}

    def open_up(rel: str, name: str, dir_fd: int | None) -> None:
        # chmod through an O_PATH fd of what lstat saw: never a symlink's target.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and st.st_mode & 0o500 != 0o500:
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | 0o700)
                opened[rel] = (stat.S_IMODE(st.st_mode), st.st_dev, st.st_ino)
        finally:
            os.close(fd)

    open_up("", os.fspath(tree), None)

    def visit(rel_dir: str, fd: int, _state: None) -> list[tuple[str, _dirfd.Ident, None]]:
        subdirs: list[tuple[str, _dirfd.Ident, None]] = []
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                open_up(rel, name, fd)
                subdirs.append((name, (st.st_dev, st.st_ino), None))
        return subdirs

    _dirfd.walk(tree, None, visit)
    return opened


def _chown_note(stderr: bytes | str | None) -> str | None:
    """Why a program that failed with EINVAL may have failed: an ordinary user's sandbox has
    one id only (its stderr names EINVAL as libc words it)."""
    if stderr is None:
        return None
    text = stderr if isinstance(stderr, str) else stderr.decode(errors="replace")
    if "Invalid argument" not in text:
        return None
    from pytest_layers import _subids

    return _subids.chown_note()
