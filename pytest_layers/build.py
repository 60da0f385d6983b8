"""The engine side of a layer: what a definition records (:class:`LayerDef`), the
:class:`Layer` value, build-cache keys and build orchestration (:class:`LayerSession`).

This module imports no pytest and nothing of the glue: ``definitions`` (the ``@layer``
decorators) and ``fixtures`` (the pytest fixtures they make) sit on top of it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import itertools
import os
import stat
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pytest_layers import _ocirules, changeset, layertar, sourcedir
from pytest_layers._fmt import human_size, plural, short_digest
from pytest_layers._removal import remove_tree
from pytest_layers.errors import (
    InvalidImageError,
    InvalidLayerError,
    LayerBuildError,
    LayerDefinitionError,
    NoSpaceError,
    StoreError,
    UnsafeEntryError,
)
from pytest_layers.names import QUALIFIER

if TYPE_CHECKING:
    from pytest_layers.backends.base import Backend
    from pytest_layers.changeset import Change, Entry
    from pytest_layers.imageref import ImageRef
    from pytest_layers.registry import Options as RegistryOptions
    from pytest_layers.registry import RemoteCache
    from pytest_layers.store import LayerInfo, Store

__all__ = [
    "Layer",
    "LayerDef",
    "ImageSource",
    "Progress",
    "LayerSession",
    "compose",
    "build_key",
    "plural",
    "qualified_name",
]

# ---- definitions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """Where an :func:`oci_image` comes from."""

    #: As given: absolute, or relative to the rootdir.
    path: str
    #: The tag to pick when the layout holds several images.
    ref: str | None
    #: ``file:line`` of the ``oci_image()`` call, for error messages.
    where: str
    #: The module that called ``oci_image()``.
    module: str


@dataclass(eq=False)
class LayerDef:
    """What ``@layer`` recorded: the builder and the inputs of its build-cache key; or, for an
    :func:`oci_image`, where the image comes from (``image``; then ``builder`` is None)."""

    name: str
    builder: Callable[..., Any] | None
    parent: str | None
    inputs: tuple[str, ...]
    version: str | None
    #: Names of the session fixtures the builder requests after ``root``.
    extra_args: tuple[str, ...]
    #: The object ``@layer`` returned (the pytest fixture), set by the plugin.
    fixture: Any = None
    image: ImageSource | None = None
    #: For a :func:`layer_from_path`: the directory whose content the layer is (as given:
    #: relative to the rootdir, or absolute); ``inputs`` is then that one path.
    source_dir: str | None = None
    #: ``file:line`` and module of a :func:`layer_from_path` call.
    defined_at: tuple[str, str] | None = None
    #: The parent's definition when ``parent=`` was given as an object (a ``@layer``
    #: function), not a name: the name must then resolve to it where this layer is defined.
    parent_def: LayerDef | None = None

    @property
    def qualname(self) -> str:
        if self.defined_at is not None:
            return f"{self.defined_at[1]}.{self.name}"
        if self.builder is None:
            return f"{self.image.module if self.image else '?'}.{self.name}"
        return f"{self.builder.__module__}.{self.builder.__qualname__}"

    @property
    def where(self) -> str:
        """``file:line`` of the builder (or of the ``oci_image()`` call), for error messages."""
        if self.defined_at is not None:
            return self.defined_at[0]
        if self.builder is None:
            return self.image.where if self.image else self.name
        try:
            return f"{inspect.getsourcefile(self.builder)}:{self.builder.__code__.co_firstlineno}"
        except (TypeError, AttributeError):
            return self.qualname

    @property
    def file(self) -> str:
        """The file that defines the layer (``where`` without its line number)."""
        head, sep, line = self.where.rpartition(":")
        return head if sep and line.isdigit() else self.where

    def source(self) -> str:
        if self.source_dir is not None:
            # The directory's content is hashed as the key's input; this names the recipe.
            return "layer_from_path 1"
        if self.builder is None:
            return f"oci_image({self.name!r}, {self.image!r})"
        try:
            return textwrap.dedent(inspect.getsource(self.builder))
        except (OSError, TypeError):
            # No source (built in a REPL or from exec): the bytecode is the next best identity.
            code = self.builder.__code__
            return repr((code.co_code, code.co_consts, code.co_names))


def qualified_name(defn: LayerDef, rootdir: Path) -> str | None:
    """``PATH::NAME``: the layer's name qualified by the file that defines it (relative to the
    rootdir when inside it). Two directories may each define ``base``; the store records each
    under this name too, and the CLI takes it where the bare name is ambiguous. None for the
    unnamed layers of the datadir fixtures."""
    if not defn.name.isidentifier():
        return None
    path = defn.file
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(path, rootdir)
        if not rel.startswith(".."):
            path = rel
    return f"{path}{QUALIFIER}{defn.name}"


# ---- the Layer value ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Layer:
    """A stored layer and, through ``parent``, its image.

    ``name`` is the ``@layer`` name (None for an unnamed commit), ``diff_id`` the digest of the
    layer's canonical tar, ``chain_id`` the OCI ChainID of the image it tops. ``size`` is the
    bytes of file content the layer stores, ``files`` how many non-directory entries it adds or
    changes (whiteouts and directories are not counted).
    """

    name: str | None
    diff_id: str
    chain_id: str
    parent: Layer | None
    size: int
    files: int
    directory: Path = field(repr=False)
    flavor: str = field(repr=False, default="overlay")
    #: For a layer placed in a union on another parent: the chain_id it was stored under.
    origin: str | None = field(repr=False, default=None)

    @property
    def chain(self) -> list[Layer]:
        """This layer and its ancestors, bottom first."""
        out: list[Layer] = []
        node: Layer | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def changes(self) -> list[Change]:
        """This layer's own changeset, in ``docker diff`` form."""
        below = self.parent.chain if self.parent is not None else []
        view = changeset.ImageView([x.directory for x in reversed(below)], self.flavor)  # type: ignore[arg-type]
        return changeset.layer_changes(self.directory, view, flavor=self.flavor)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layer) and other.chain_id == self.chain_id

    def __hash__(self) -> int:
        return hash(self.chain_id)

    def __str__(self) -> str:
        return f"{self.name or '(unnamed)'}@{self.chain_id[:19]}"

    def __repr__(self) -> str:
        return f"<Layer {self.name or '(unnamed)'} {self.chain_id[:19]} ({len(self.chain)} deep)>"


def compose(tops: Sequence[Layer]) -> list[Layer]:
    """The union image of ``tops`` (leftmost on top), as a chain of layers, bottom first.

    Layers the chains share appear once, at their lowest position. A layer that lands on a
    different parent than its own gets a new ``chain_id`` (its position in the union), while
    keeping its ``diff_id`` and directory, so the union is an image like any other.
    """
    if len(tops) == 1:
        return tops[0].chain
    flat: list[Layer] = []
    seen: set[str] = set()
    for top in reversed(tops):
        for lay in top.chain:
            if lay.chain_id not in seen:
                seen.add(lay.chain_id)
                flat.append(lay)
    out: list[Layer] = []
    cids = layertar.chain_ids([x.diff_id for x in flat])
    parent: Layer | None = None
    for lay, cid in zip(flat, cids, strict=True):
        if cid == lay.chain_id and (lay.parent is parent or lay.parent == parent):
            node = lay
        else:
            node = Layer(
                name=lay.name,
                diff_id=lay.diff_id,
                chain_id=cid,
                parent=parent,
                size=lay.size,
                files=lay.files,
                directory=lay.directory,
                flavor=lay.flavor,
                origin=lay.origin or lay.chain_id,
            )
        out.append(node)
        parent = node
    return out


# ---- build-cache keys -----------------------------------------------------------------------


def _hash_path(h: Any, path: Path, rel: str, *, mtimes: bool = False) -> None:
    st = os.lstat(path)
    h.update(
        f"\0{rel}\0{stat.S_IFMT(st.st_mode):o}\0{stat.S_IMODE(st.st_mode):o}\0".encode(
            "utf-8", "surrogateescape"
        )
    )
    if mtimes:
        h.update(f"{st.st_mtime_ns}\0".encode())
    if stat.S_ISLNK(st.st_mode):
        h.update(os.fsencode(os.readlink(path)))
    elif stat.S_ISREG(st.st_mode):
        h.update(f"{st.st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    elif stat.S_ISDIR(st.st_mode):
        for child in sorted(os.listdir(path)):
            _hash_path(h, path / child, f"{rel}/{child}", mtimes=mtimes)


def build_key(defn: LayerDef, parent_chain_id: str | None, rootdir: Path) -> str:
    """The build-cache key of ``defn`` on top of ``parent_chain_id`` (hex sha256).

    It holds the defining file (``PATH::NAME``) besides the builder's source: two directories
    may each define ``base`` with the same text whose result depends on where it is (a builder
    that copies ``Path(__file__).parent / "data"``); they must not share a build."""
    h = hashlib.sha256()
    h.update(b"pytest-layers build key 2\0")
    defined = qualified_name(defn, rootdir) or ""
    h.update(f"parent={parent_chain_id or ''}\0name={defn.qualname}\0defined={defined}\0".encode())
    h.update(defn.source().encode("utf-8", "surrogateescape"))
    for inp in defn.inputs:
        path = rootdir / inp
        if defn.source_dir is not None:
            # A path layer keeps its files' mtimes (as a copy would), so they are content too.
            sourcedir.check_dir(defn.name, defn.where, path, rootdir)
            _hash_path(h, path.resolve(), inp, mtimes=True)
            continue
        if not os.path.lexists(path):
            raise LayerDefinitionError(
                f"layer {defn.name!r} ({defn.where}): input {inp!r} does not exist "
                f"(inputs are relative to the rootdir {rootdir})"
            )
        _hash_path(h, path, inp)
    h.update(f"\0version={defn.version if defn.version is not None else ''}".encode())
    return h.hexdigest()


# ---- building -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One layer built or found in the cache during this session."""

    name: str
    status: str  # "built" | "imported" | "cached" | "pulled"
    seconds: float
    files: int
    size: int
    chain_id: str  # the image's identity: what every CLI REF takes, unlike the diff_id
    #: Where a pulled layer came from; for a built one, why the remote cache did not serve it.
    origin: str = ""

    def line(self) -> str:
        # ``sha256:`` + 12 hex digits: a chain id prefix that `pytest-layers` accepts as a REF.
        short = "sha256:" + short_digest(self.chain_id)
        source = f" from {self.origin}" if self.status == "pulled" and self.origin else ""
        note = f"; remote cache: {self.origin}" if self.status != "pulled" and self.origin else ""
        return (
            f"layers: {self.status} {self.name}{source} in {self.seconds:.2f}s "
            f"({plural(self.files, 'file')}, {human_size(self.size)}{note}) {short}"
        )


class LayerSession:
    """The per-process state of a pytest session: store, backend, built layers, leases.

    ``rebuild_token`` is set when ``--layers-rebuild`` is given: the controller's token, the
    same in every xdist worker, so each key is rebuilt once per store per run, not once per
    process.
    """

    def __init__(
        self,
        store: Store,
        backend: Backend,
        rootdir: Path,
        *,
        rebuild_token: str | None = None,
        verify: bool = False,
        scratch_root: Path | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.rootdir = rootdir
        self.rebuild_token = rebuild_token
        self.verify = verify
        # Not under STORE/tmp: the store sweeps names there it does not own.
        self.scratch_root = scratch_root or (store.root / "scratch" / "views" / str(os.getpid()))
        self.progress: list[Progress] = []
        #: How to reach registries (``oci_image("x", "docker://...")``, the remote cache).
        self.registry_options: RegistryOptions | None = None
        #: ``--layers-cache-from/--layers-cache-to``, set by the plugin.
        self.remote: RemoteCache | None = None
        self._verified: set[str] = set()
        self._exit = contextlib.ExitStack()
        # next() on a count is atomic: the view pool's thread takes scratch dirs too.
        self._counter = itertools.count(1)
        self._pid = os.getpid()

    def close(self) -> None:
        """Release leases held by this session."""
        self._exit.close()

    def scratch(self) -> Path:
        """A fresh, empty directory for one view (under the session's scratch root)."""
        n = next(self._counter)
        # The view pool's helpers are forks of this process, counting from the same number.
        name = str(n) if os.getpid() == self._pid else f"{os.getpid()}.{n}"
        path = self.scratch_root / name
        path.mkdir(parents=True)
        return path

    # -- layers from the store

    def layer_from_store(self, chain_id: str, parent: Layer | None, name: str | None) -> Layer:
        """A :class:`Layer` for a stored chain_id whose parent is ``parent``."""
        info: LayerInfo = self.store.layer_info(chain_id)
        return Layer(
            name=name if name is not None else info.name,
            diff_id=info.diff_id,
            chain_id=info.chain_id,
            parent=parent,
            size=info.size,
            files=info.files,
            directory=self.store.layer_dir(chain_id),
            flavor=self.store.flavor,
        )

    def use(self, image: Sequence[Layer]) -> None:
        """Lease ``image`` for the session and, with ``--layers-verify``, re-hash it once."""
        todo = [x.chain_id for x in image if x.chain_id not in self._verified]
        if not todo:
            return
        stored = [c for c in todo if self.store.has_layer(c)]
        if stored:
            self._exit.enter_context(self.store.lease(stored))
        if self.verify and stored:
            problems = self.store.verify(stored)
            if problems:
                lines = "\n  ".join(str(p) for p in problems)
                raise StoreError(
                    f"--layers-verify: {len(problems)} problem(s) in the store "
                    f"{self.store.root}:\n  {lines}\nrun `pytest-layers verify` for details and "
                    "`pytest --layers-rebuild` (or delete the damaged layers) to fix it"
                )
        self._verified.update(todo)

    # -- building

    def _must_rebuild(self, key: str) -> bool:
        if self.rebuild_token is None:
            return False
        return not self.store.rebuild_marked(key, self.rebuild_token)

    def get(self, defn: LayerDef, parent: Layer | None, kwargs: Mapping[str, Any]) -> Layer:
        """The layer of ``defn`` on ``parent``: from the build cache, or built now.

        Holds the store's build lock for the key, so concurrent processes build it once.
        """
        key = build_key(defn, parent.chain_id if parent else None, self.rootdir)
        start = time.perf_counter()
        with self.store.build_lock(key):
            rebuild = self._must_rebuild(key)
            cached = None if rebuild else self.store.cache_get(key)
            origin = ""
            pulled = None
            if cached is None and not rebuild and self.remote is not None:
                pulled, origin, _secs = self.remote.lookup(key, parent.chain_id if parent else None)
            if cached is not None and self.store.has_layer(cached):
                lay = self.layer_from_store(cached, parent, defn.name)
                status = "cached"
            elif pulled is not None:
                lay = self.layer_from_store(pulled, parent, defn.name)
                self.store.cache_set(key, lay.chain_id)
                status = "pulled"
            else:
                lay = self._build(defn, parent, kwargs)
                self.store.cache_set(key, lay.chain_id)
                if self.remote is not None:
                    self.remote.schedule(lay.chain_id, key)
                if self.rebuild_token is not None:
                    self.store.mark_rebuilt(key, self.rebuild_token)
                status = "built"
            self._name(defn, lay.chain_id)
        self.progress.append(
            Progress(
                defn.name,
                status,
                time.perf_counter() - start,
                lay.files,
                lay.size,
                lay.chain_id,
                origin[:300],
            )
        )
        return lay

    def _name(self, defn: LayerDef, chain_id: str) -> None:
        """Point the layer's name, and its qualified name, at ``chain_id``."""
        self.store.set_name(defn.name, chain_id)
        qualified = qualified_name(defn, self.rootdir)
        if qualified is not None:
            self.store.set_name(qualified, chain_id)

    def image_path(self, defn: LayerDef) -> Path:
        """The file or directory of an :func:`oci_image`; a clear error when it is missing."""
        if defn.image is None:
            raise LayerDefinitionError(f"layer {defn.name!r} ({defn.where}) is not an oci_image")
        from pytest_layers import imageref

        path = Path(os.path.expanduser(imageref.parse(defn.image.path).path))
        full = path if path.is_absolute() else self.rootdir / path
        if not full.exists():
            raise LayerDefinitionError(
                f"oci_image {defn.name!r} ({defn.where}): {defn.image.path!r} does not exist "
                f"(looked for {full}; a relative path is relative to the rootdir "
                f"{self.rootdir}); give the path of an OCI layout (directory or tar) or of a "
                "docker-archive (`docker save -o FILE IMAGE`)"
            )
        return full

    def get_image(self, defn: LayerDef) -> Layer:
        """The top layer of an :func:`oci_image`, imported into the store now or found there.

        The import runs under the store's build lock for the image's identity (manifest digest
        and ref), so concurrent sessions and xdist workers import it once; a later session only
        reads the image's metadata to find it in the build cache.
        """
        from pytest_layers import imageref, oci

        start = time.perf_counter()
        source = imageref.parse(defn.image.path) if defn.image else None
        if source is not None and source.transport == "docker":
            return self._image_layer(defn, *self._pull_image(defn, source), start)
        path = self.image_path(defn)
        ref = (defn.image.ref if defn.image else None) or (source.tag if source else None)
        try:
            ident = oci.image_id(path, ref=ref)
        except (InvalidImageError, UnsafeEntryError) as exc:
            raise LayerDefinitionError(
                f"oci_image {defn.name!r} ({defn.where}): cannot read the image: {exc}"
            ) from exc
        key = hashlib.sha256(
            f"pytest-layers oci_image 1\0{ident}\0{ref or ''}".encode()
        ).hexdigest()
        with self.store.build_lock(key):
            top = self.store.cache_get(key)
            if top is not None and self.store.has_layer(top):
                status = "cached"
            else:
                try:
                    result = oci.import_image(self.store, path, ref=ref, backend=self.backend)
                except (InvalidImageError, UnsafeEntryError) as exc:
                    raise LayerDefinitionError(
                        f"oci_image {defn.name!r} ({defn.where}): cannot import {path}: {exc}"
                    ) from exc
                top = result.chain_id
                self.store.cache_set(key, top)
                # Another image (or tag) with the same layers may have brought them already.
                status = "imported" if result.imported else "cached"
            self._name(defn, top)
        return self._image_layer(defn, top, status, start)

    def _pull_image(self, defn: LayerDef, source: ImageRef) -> tuple[str, str]:
        """(top chain id, status) of an ``oci_image`` from a registry: pulled once per store
        per manifest digest; with ``--layers-offline`` (or the registry unreachable) the last
        pull of the same reference serves, when the store has it."""
        from pytest_layers import registry
        from pytest_layers.errors import RegistryError, RegistryUnreachableError

        opts = self.registry_options or registry.Options()
        by_ref = hashlib.sha256(f"pytest-layers oci_image ref 1\0{source}".encode()).hexdigest()
        where = f"oci_image {defn.name!r} ({defn.where})"
        try:
            ident = registry.image_digest(source, opts)
        except RegistryUnreachableError as exc:
            top = self.store.cache_get(by_ref)
            if top is None:
                raise LayerDefinitionError(f"{where}: {exc}") from exc
            self._name(defn, top)
            return top, "cached"
        except (RegistryError, InvalidImageError) as exc:
            raise LayerDefinitionError(f"{where}: {exc}") from exc
        key = hashlib.sha256(f"pytest-layers oci_image 1\0{ident}\0".encode()).hexdigest()
        with self.store.build_lock(key):
            top = self.store.cache_get(key)
            status = "cached"
            if top is None:
                try:
                    pulled = registry.pull(self.store, source, opts=opts, backend=self.backend)
                except (RegistryError, InvalidImageError, UnsafeEntryError) as exc:
                    raise LayerDefinitionError(f"{where}: cannot pull {source}: {exc}") from exc
                top = pulled.result.chain_id
                self.store.cache_set(key, top)
                status = "pulled" if pulled.result.imported else "cached"
            self.store.cache_set(by_ref, top)
            self._name(defn, top)
        return top, status

    def _image_layer(self, defn: LayerDef, top: str, status: str, start: float) -> Layer:
        parent: Layer | None = None
        infos = self.store.chain(top)
        for i, info in enumerate(infos):
            name = defn.name if i == len(infos) - 1 else info.name
            parent = self.layer_from_store(info.chain_id, parent, name)
        if parent is None:
            raise StoreError(f"stored chain {top} is empty")
        self.progress.append(
            Progress(
                defn.name,
                status,
                time.perf_counter() - start,
                sum(x.files for x in infos),
                sum(x.size for x in infos),
                parent.chain_id,
            )
        )
        return parent

    def _build(self, defn: LayerDef, parent: Layer | None, kwargs: Mapping[str, Any]) -> Layer:
        try:
            return self._build_staged(defn, parent, kwargs)
        except OSError as exc:
            # The staging dirs are gone already (the ExitStack closed them on the way out), so
            # a rerun after freeing space starts clean.
            if not self._out_of_space(exc):
                raise
            raise NoSpaceError(f"layer {defn.name!r}", str(self.store.root)) from exc

    def _out_of_space(self, exc: OSError) -> bool:
        """Whether ``exc`` is the store's (or the session scratch's) filesystem filling up
        while a layer is built: not one already converted, nor a builder's write elsewhere."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(exc, NoSpaceError):
            return False
        if exc.filename is None:
            return True  # write(2) and close(2) name no file
        try:
            where = os.path.abspath(os.fsdecode(exc.filename))
        except TypeError:
            return True  # a file descriptor number
        return any(
            where == str(root) or where.startswith(str(root).rstrip("/") + "/")
            for root in (self.store.root.absolute(), self.scratch_root.absolute())
        )

    def _build_staged(
        self, defn: LayerDef, parent: Layer | None, kwargs: Mapping[str, Any]
    ) -> Layer:
        flavor = self.store.flavor
        with contextlib.ExitStack() as stack:
            tree: Path | None = None
            entries: list[Entry] = []
            if parent is None:
                # The builder fills a staging dir of the store, which becomes the layer as it
                # is: no change list, no copy.
                tree = stack.enter_context(self.store.staging())
                self._run_builder(defn, tree, kwargs)
            else:
                lowers = [x.directory for x in reversed(parent.chain)]
                image = changeset.ImageView(lowers, flavor)
                scratch = self.scratch()
                stack.callback(remove_tree, scratch)
                view = self.backend.open(lowers, scratch, readonly=False, flavor=flavor)
                stack.callback(view.close)
                self._run_builder(defn, view.path, kwargs)
                entries = self.backend.changes(view, image)
                for entry in entries:
                    if entry.kind != "D" and _is_whiteout_path(entry.path):
                        raise _left_whiteout(defn, entry.path)
            source_dir = defn.source_dir
            try:
                info = self.store.write_layer(
                    entries,
                    parent=parent.chain_id if parent else None,
                    name=defn.name,
                    source="build",
                    # write_layer clamps mtimes, as a built layer needs; a path layer is a copy
                    # of the directory and keeps its mtimes (docs/reference/layer.md).
                    before_add=None
                    if source_dir is None
                    else functools.partial(sourcedir.restore_mtimes, self.rootdir / source_dir),
                    tree=tree,
                )
            except InvalidLayerError as exc:
                # Settling the tree met the name (in the order it walks): said as the builder's.
                bad = exc.path
                if bad is None or not _is_whiteout_path(bad):
                    raise
            else:
                return self.layer_from_store(info.chain_id, parent, defn.name)
        raise _left_whiteout(defn, bad)

    def _run_builder(self, defn: LayerDef, root: Path, kwargs: Mapping[str, Any]) -> None:
        if defn.source_dir is not None:
            sourcedir.copy_tree(defn.name, self.rootdir / defn.source_dir, root)
            return
        if defn.builder is None:
            raise LayerDefinitionError(
                f"layer {defn.name!r} ({defn.where}) is an imported image; it has no builder"
            )
        result = defn.builder(root, **kwargs)
        if inspect.isgenerator(result) or inspect.iscoroutine(result):
            if inspect.iscoroutine(result):
                result.close()
            raise LayerDefinitionError(
                f"layer builder {defn.qualname} ({defn.where}) must be a plain function that "
                "fills `root` and returns; generators and coroutines are not supported"
            )


def _is_whiteout_path(path: str) -> bool:
    return _ocirules.is_whiteout_name(PurePosixPath(path).name)


def _left_whiteout(defn: LayerDef, path: str) -> LayerBuildError:
    return LayerBuildError(
        f"layer {defn.name!r}: builder {defn.qualname} ({defn.where}) left /{path}; "
        "names starting with '.wh.' are OCI whiteout markers and cannot be stored in a "
        "layer: rename or remove it (to delete a file of the parent, just unlink it)"
    )
