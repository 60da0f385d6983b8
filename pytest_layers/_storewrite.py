"""Writing a layer into the store: from a change list (:meth:`write_layer`, the one entry
point of builds, commits and imports) or a staged tree (:meth:`add_layer`), read once to
name, index and measure it, assembled in ``tmp/`` and renamed into place; aliases; the
one full-disk policy."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pytest_layers import (
    _faultpoints,
    changeset,
    errors,
    layertar,
)
from pytest_layers._fmt import short_digest
from pytest_layers._layerindex import (
    _container_use,
    _LayerIndex,
    count_files,
    manifest_json,
)
from pytest_layers._storecore import _SOURCES, _blob_digest, _rmtree
from pytest_layers._storerecords import (
    LayerInfo,
    _hex,
    _write_new,
)
from pytest_layers._storerefs import _StoreRefs


class _StoreWriter(_StoreRefs):
    """Adding layers (see :class:`pytest_layers.store.Store`)."""

    _ctime_is_fine: bool | None = None

    def _fine_ctime(self) -> bool:
        """Whether this store's filesystem gives a file a new ctime on every change, however
        close together (what lets a commit trust the files it just wrote: see
        ``layertar.WrittenFiles``). Linux 6.13 and later do on ext4, xfs, btrfs and tmpfs once
        a file's times were read; older kernels and some filesystems (ramfs) keep the ctime of
        a clock tick. Probed once per store object: three rewrites, each must move it."""
        if self._ctime_is_fine is None:
            fine = True
            try:
                with tempfile.TemporaryFile(dir=self._tmp) as f:
                    fd = f.fileno()
                    os.pwrite(fd, b"0", 0)
                    last = os.fstat(fd).st_ctime_ns
                    for _ in range(3):
                        os.pwrite(fd, b"0", 0)
                        now = os.fstat(fd).st_ctime_ns
                        fine = fine and now != last
                        last = now
            except OSError:
                fine = False
            self._ctime_is_fine = fine
        return self._ctime_is_fine

    def add_layer(
        self,
        staged: Path,
        *,
        parent: str | None,
        name: str | None,
        source: str,
        diff_id: str | None = None,
        blob: Path | None = None,
        blob_verified: bool = False,
        what: str | None = None,
        written: layertar.WrittenFiles | None = None,
        settle: changeset.TreeSettler | None = None,
    ) -> LayerInfo:
        """Store the layer tree ``staged`` (best made with :meth:`staging`) on top of ``parent``.

        The tree is moved, not copied. If the store already holds the same chain id, ``staged``
        is discarded and the existing layer returned: a stored layer is never overwritten.
        Imports pass the image's ``diff_id`` and the original ``blob`` (kept as ``blob.tar``;
        moved, not copied, when it lies in the store's own staging area). ``blob_verified``
        says the caller hashed ``blob`` to ``diff_id`` as it wrote it (the importer does), so
        it is not read again. When ``name`` is given, ``refs/names/<name>`` points to the result.
        A full disk raises :class:`errors.NoSpaceError` naming ``what`` (default: the layer's
        name, or its chain id and source). ``written`` is what :func:`changeset.write_layer`
        kept of the small files it just wrote into ``staged`` (see :class:`layertar.Written`).
        ``settle``: ``staged`` is settled by the same read (see :class:`changeset.TreeSettler`).
        """
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {', '.join(_SOURCES)}, not {source!r}")
        self._writable()
        staged = Path(os.path.abspath(staged))
        # The tree is known by its inode from here to the rename that stores it: a process
        # the builder left running (or, in a shared store, another member) that swaps it for
        # a symlink or another directory meanwhile gets the layer refused, not stored.
        # (A tree that is not a real directory now is refused by the stream itself.)
        tree_ident = _tree_ident(staged)
        parent_diff_ids = [info.diff_id for info in self.chain(parent)] if parent else []
        # The one read of the new tree: its diff_id, its files.json and its disk use together.
        index = _LayerIndex(clamp_ns=settle.epoch_ns if settle is not None else None)
        try:
            tree_digest = layertar.stream_layer(
                staged, flavor=self.flavor, visit=index, written=written, settle=settle
            )
        except Exception:
            if settle is not None:
                settle.refuse(staged)  # a name or device a layer cannot hold comes first
            raise
        if settle is not None:
            if settle.root_ident != tree_ident:
                raise _tree_changed(staged)
            settle.finish(staged)
            index.ungroup(settle.made_single)
            index.disk_use.total += settle.disk_use_change
        if blob is not None and not (blob_verified and diff_id is not None):
            blob_digest = _blob_digest(blob)
            if diff_id is None:
                diff_id = blob_digest
            elif blob_digest != diff_id:
                raise errors.InvalidLayerError(
                    f"layer blob {blob} has digest {blob_digest}, not the DiffID {diff_id} it "
                    "was imported with: the image is damaged"
                )
        imported = diff_id is not None
        if diff_id is None:
            diff_id = tree_digest
        chain_id = layertar.chain_id([*parent_diff_ids, diff_id])
        target = self._layers / _hex(chain_id)

        with self._gc.hold(exclusive=False):
            if (target / "layer.json").is_file():
                self._keep_alive(chain_id)
                existing = True
            else:
                existing = False
        if existing:
            self._discard(staged)
            return self._named(self.layer_info(chain_id), name)

        container = self._adopt(staged)
        if what is None:
            what = f"layer {name!r}" if name else f"layer {short_digest(chain_id)} ({source})"
        with self.full_disk(what):
            info, existing = self._assemble(
                container,
                target,
                chain_id,
                diff_id,
                tree_digest,
                parent=parent,
                name=name,
                source=source,
                blob=blob,
                imported=imported,
                index=index,
                tree_ident=tree_ident,
            )
        if existing:
            info = self.layer_info(chain_id)
        return self._named(info, name)

    def write_layer(
        self,
        entries: Sequence[changeset.Entry],
        *,
        parent: str | None,
        name: str | None,
        source: str,
        what: str | None = None,
        clamp_mtimes: bool = True,
        before_add: Callable[[Path], None] | None = None,
        in_place: bool = False,
        tree: Path | None = None,
        diff_id: str | None = None,
        blob: Path | None = None,
        blob_verified: bool = False,
    ) -> LayerInfo:
        """Store the layer that the change list ``entries`` describes, on top of ``parent``.

        The one way a change list becomes a stored layer (a build, a commit, an init layer, an
        import applied on a view): the entries are written into a staging directory
        (:func:`changeset.write_layer`; ``clamp_mtimes=False`` keeps the sources' mtimes),
        ``before_add`` may adjust the staged tree, and :meth:`add_layer` reads the tree once
        to name it (diff_id), index it (``files.json``) and measure it, then moves it into
        place. A full disk anywhere on the way removes the staging and raises
        :class:`errors.NoSpaceError` naming ``what`` (default: the layer's name or source) and
        the store (see :meth:`full_disk`).

        ``diff_id``, ``blob`` and ``blob_verified`` are an import's, as in :meth:`add_layer`.

        ``in_place=True`` says the entries are every entry of one tree made with
        :meth:`staging` that nothing else uses (a build with no parent): that tree is settled
        where it is (:func:`changeset.settle_tree`) and becomes the layer, with no copy.
        ``tree=`` such a tree itself, with no ``entries``: the same without a change list (a
        build reads its tree once more to name it, not to list it first).
        """
        label = what or (f"layer {name!r}" if name else f"a {source} layer")
        if tree is not None:
            if entries or in_place:
                raise ValueError("write_layer(tree=...) takes no entries and no in_place")
            tree = Path(tree)
            where = "write_layer(tree=...) takes"
        elif in_place and entries:
            roots = {e.root for e in entries}
            one = roots.pop() if len(roots) == 1 else None
            tree = Path(one) if one is not None and all(e.kind == "A" for e in entries) else None
            where = "write_layer(in_place=True) takes the added entries of"
            if tree is None:
                raise ValueError(f"{where} one tree made with Store.staging()")
        # The staged tree, if any, becomes the layer where it is.
        if tree is not None and (tree.name != "diff" or tree.parent.parent != self._tmp):
            raise ValueError(f"{where} one tree made with Store.staging()")
        # What the writer kept of the small files it wrote: the stream that names the layer
        # takes them from there (unless before_add gets to change the tree in between).
        written: layertar.WrittenFiles | None = None
        settle: changeset.TreeSettler | None = None
        with self.full_disk(label), contextlib.ExitStack() as stack:
            if tree is not None:
                staged = tree
                # Settled by the walk that names and indexes it: the tree is read once. What
                # before_add sees must be settled already.
                if before_add is None:
                    settle = changeset.TreeSettler(clamp_mtimes=clamp_mtimes)
                else:
                    changeset.settle_tree(staged, clamp_mtimes=clamp_mtimes)
            else:
                staged = stack.enter_context(self.staging())
                # Only where a rewrite always moves a file's ctime: with a coarse ctime, a
                # same-size rewrite within one tick would look unchanged to the stream.
                written = {} if before_add is None and self._fine_ctime() else None
                changeset.write_layer(
                    entries,
                    staged,
                    flavor=self.flavor,
                    clamp_mtimes=clamp_mtimes,
                    written=written,
                )
            if before_add is not None:
                before_add(staged)
            return self.add_layer(
                staged,
                parent=parent,
                name=name,
                source=source,
                what=label,
                diff_id=diff_id,
                blob=blob,
                blob_verified=blob_verified,
                written=written,
                settle=settle,
            )

    @contextlib.contextmanager
    def full_disk(self, what: str) -> Iterator[None]:
        """The store's one full-disk policy: an ``ENOSPC``/``EDQUOT`` inside the block becomes
        :class:`errors.NoSpaceError` naming ``what`` and the store, which says how to make room.

        Whatever the block staged is removed by then (staging directories clean up on the way
        out), so a rerun after freeing space starts clean; an error already converted (by an
        inner block naming something more precise) passes through unchanged.
        """
        try:
            yield
        except errors.NoSpaceError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise errors.NoSpaceError(what, str(self.root)) from exc

    def add_alias(self, chain_id: str, target_chain_id: str, parent: str | None) -> LayerInfo:
        """Record the stored layer ``target_chain_id`` at another chain position, on ``parent``,
        without copying its tree.

        A union image (several marker names) puts a stored layer on another parent: same
        diff_id, new chain id. A commit on a union needs that position stored, so the store
        records an alias: a ``layer.json`` of its own (chain id, parent) whose tree, blob and
        manifest are the target's. :meth:`layer_dir` follows it, :meth:`chain` walks through
        it, ``prune`` keeps the target while an alias is reachable, ``verify`` hashes the
        target once. Returns the layer already stored at ``chain_id``, if any.

        Raises :class:`errors.LayerNotFoundError` when the target or ``parent`` is not stored,
        and ``ValueError`` when ``chain_id`` is not the ChainID of the target's diff_id on
        ``parent``.
        """
        self._writable()
        if self.has_layer(chain_id):
            with self._gc.hold(exclusive=False):
                self._keep_alive(chain_id)
            return self.layer_info(chain_id)
        target = self.layer_info(target_chain_id)
        real = target.alias_of or target.chain_id
        parent_diff_ids = [info.diff_id for info in self.chain(parent)] if parent else []
        expected = layertar.chain_id([*parent_diff_ids, target.diff_id])
        if expected != chain_id:
            raise ValueError(
                f"alias {chain_id} of layer {short_digest(target_chain_id)} on parent "
                f"{short_digest(parent) if parent else '(none)'}: that position's chain id is "
                f"{expected}"
            )
        info = LayerInfo(
            chain_id=chain_id,
            diff_id=target.diff_id,
            parent=parent,
            name=target.name,
            created=time.time(),
            size=target.size,
            files=target.files,
            source=target.source,
            blob=target.blob,
            tree_digest=target.tree_digest,
            alias_of=real,
        )
        container = self._new_tmp_dir("alias")
        try:
            _write_new(
                container / "layer.json",
                json.dumps(info.to_json(), indent=1) + "\n",
                self._file_mode,
            )
            with self._gc.hold(exclusive=False):
                # Under the shared gc lock: prune cannot take the target between this check
                # and the lease that _keep_alive takes on the alias (which reaches the target).
                if not (self._layers / _hex(real) / "layer.json").is_file():
                    raise errors.LayerNotFoundError(
                        real, hint=f"the target of alias {chain_id} is no longer stored"
                    )
                try:
                    os.rename(container, self._layers / _hex(chain_id))
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                self._keep_alive(chain_id)
        finally:
            _rmtree(container)  # gone after a successful rename; a loser's copy otherwise
        return self.layer_info(chain_id)

    def _assemble(
        self,
        container: Path,
        target: Path,
        chain_id: str,
        diff_id: str,
        tree_digest: str,
        *,
        parent: str | None,
        name: str | None,
        source: str,
        blob: Path | None,
        imported: bool,
        index: _LayerIndex,
        tree_ident: tuple[int, int],
    ) -> tuple[LayerInfo, bool]:
        """Complete ``container`` (manifest, metadata, blob) and rename it to ``target``;
        returns the info and whether another process stored the layer first."""
        existing = False
        try:
            manifest = index.finish()
            size = sum(r.get("size", 0) for r in manifest.values())
            kept_blob = None
            if blob is not None:
                kept_blob = container / "blob.tar"
                if os.path.abspath(blob).startswith(str(self._tmp) + os.sep):
                    # Staged by us in the store's own tmp (same filesystem, private): move
                    # it; copying a 100,000-file layer's tar costs as much as writing it.
                    os.rename(blob, kept_blob)
                else:
                    shutil.copyfile(blob, kept_blob)
                os.chmod(kept_blob, self._file_mode)
                size += kept_blob.stat().st_size
            info = LayerInfo(
                chain_id=chain_id,
                diff_id=diff_id,
                parent=parent,
                name=name,
                created=time.time(),
                size=size,
                files=count_files(manifest, self.flavor),
                source=source,
                blob=target / "blob.tar" if kept_blob else None,
                tree_digest=tree_digest if imported else None,
                # Measured before the records are written: they are a few KiB at most. The
                # entries' blocks were counted as the tree was read; here the rest of what
                # disk_use([container]) would count: the container, the tree's root, the blob.
                disk_use=_container_use(index.disk_use, container, kept_blob),
            )
            _write_new(
                container / "files.json",
                manifest_json(manifest),
                self._file_mode,
            )
            # layer.json last: a directory is a layer only once it has one.
            _write_new(
                container / "layer.json",
                json.dumps(info.to_json(), indent=1) + "\n",
                self._file_mode,
            )
            # Fault-injection tests kill the process here, just before the rename.
            _faultpoints.reached("add_layer", str(container))
            with self._gc.hold(exclusive=False):
                if _tree_ident(container / "diff") != tree_ident:
                    raise _tree_changed(container / "diff")
                try:
                    os.rename(container, target)
                except OSError as exc:
                    # Renaming onto a non-empty directory fails: someone else stored it first.
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    existing = True
                self._keep_alive(chain_id)
        except BaseException:
            _rmtree(container)
            raise
        if existing:
            _rmtree(container)
        return info, existing

    def _adopt(self, staged: Path) -> Path:
        """A tmp container holding ``staged`` as its ``diff``: the staging dir's own parent
        when ``staged`` came from :meth:`staging`, else a new one it is moved into."""
        if staged.name == "diff" and staged.parent.parent == self._tmp:
            return staged.parent
        container = self._new_tmp_dir("add")
        try:
            os.rename(staged, container / "diff")
        except OSError as exc:
            _rmtree(container)
            if exc.errno == errno.EXDEV:
                raise errors.StoreError(
                    errno.EXDEV,
                    f"cannot move {staged} into the store {self.root}: it is on another "
                    "filesystem; stage layers with Store.staging()",
                    str(staged),
                ) from exc
            raise
        return container

    def _discard(self, staged: Path) -> None:
        if staged.name == "diff" and staged.parent.parent == self._tmp:
            _rmtree(staged.parent)
        else:
            _rmtree(staged)

    def _named(self, info: LayerInfo, name: str | None) -> LayerInfo:
        if name is not None:
            self.set_name(name, info.chain_id)
        return info


def _tree_ident(tree: Path) -> tuple[int, int]:
    """The device and inode of the layer tree ``tree``, which must be a real directory (not a
    symlink to one); (0, 0) when it is not, which no tree has."""
    try:
        st = os.lstat(tree)
    except FileNotFoundError:
        return (0, 0)
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else (0, 0)


def _tree_changed(tree: Path) -> errors.InvalidLayerError:
    return errors.InvalidLayerError(
        f"the layer tree {tree} changed while the layer was read (it was replaced by another "
        "directory or a symlink); a stored layer must not change: stop every process the "
        "builder started before it returns",
        path=str(tree),
    )
