"""One test's rootfs from setup to teardown, in the order it happens.

The plugin's ``rootfs`` fixture and its ``pytest_runtest_makereport`` wrapper forward to a
:class:`TestRootfs`; nothing of a test's view lives anywhere else. Its methods, in order:

1. :meth:`TestRootfs.open`: the view of the image with the init files under the rw layer,
   taken from the view pool when one serves this image (made ahead by a helper process), or
   made now (:class:`~pytest_layers.rootfs.Rootfs`).
2. The test runs.
3. :meth:`TestRootfs.ended`: the outcome decides, with the keep policy (``failed``,
   ``always``, ``never``), whether the rw layer becomes a snapshot: commit it, store the init
   layer under it, name it ``snapshot:<test>``, and tell whoever asked (the
   ``pytest_layers_snapshot_committed`` hook). Called when the call phase is reported, so that
   the snapshot shows on that report; for a test without a call phase (setup failed, skipped)
   at teardown. Once per test. A failure here never changes the test's outcome: it becomes
   :attr:`TestRootfs.error`, a line on the test's report.
4. :meth:`TestRootfs.section`: what the report says about the snapshot, once.
5. :meth:`TestRootfs.close`: programs still running inside are killed, the view unmounted
   and removed (or handed back to the pool's helper, which removes it).

No pytest here: the unit tests drive it on the copy backend without a pytest session.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_layers._fmt import human_size, plural
from pytest_layers.build import Layer, LayerSession
from pytest_layers.errors import LayersError
from pytest_layers.rootfs import Rootfs

__all__ = ["KEEP_CHOICES", "TestRootfs", "pool_key", "describe"]

KEEP_CHOICES = ("failed", "always", "never")


def pool_key(
    keys: Sequence[str], readonly: bool, init: Mapping[str, str | bytes]
) -> tuple[Any, ...] | None:
    """Views with the same key are interchangeable before a test touches them: the image (by
    its layers' qualified names), readonly, the init files. None: no image, not pooled."""
    if not keys:
        return None
    return (tuple(keys), readonly, tuple(sorted(init.items())))


class TestRootfs:
    """One test's rootfs and its snapshot (see the module's docstring for the order).

    ``caught``: what a failure to keep the snapshot may raise and still be reported on the
    test (the plugin adds pytest's outcome exceptions, which a hook may raise); never
    KeyboardInterrupt or SystemExit.
    """

    __test__ = False  # a class named Test*: not for pytest to collect

    def __init__(
        self,
        session: LayerSession,
        image: Sequence[Layer],
        *,
        test: str,
        keep: str = "failed",
        keep_count: int = 3,
        init: Mapping[str, str | bytes] | None = None,
        readonly: bool = False,
        pool: Any = None,
        key: tuple[Any, ...] | None = None,
        caught: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        self.session = session
        self.image = image
        self.test = test
        self.keep = keep
        self.keep_count = keep_count
        self.init = init or {}
        self.readonly = readonly
        self._pool = pool if key is not None else None
        self._key = key
        self._caught = caught
        self._prepared: Any = None
        self.rootfs: Rootfs | None = None
        #: Whether :meth:`ended` ran (it runs once).
        self.decided = False
        #: The snapshot kept: its ref and layer; None when none was (or it was reported).
        self.snapshot: tuple[str, Layer] | None = None
        #: Whether the snapshot also holds the init layer (``--with-init``).
        self.init_kept = False
        #: The rw layer's text changes as a short unified diff, for the failure's report.
        self.written = ""
        #: Why the snapshot could not be kept (or its hook failed), for the report.
        self.error: str | None = None

    # -- 1. setup

    def open(self, expect: Callable[[Any], None] | None = None) -> Rootfs:
        """The test's view. ``expect(pool)``, after a view was taken from the pool, tells it
        what the next tests will ask for (the plugin's lookahead over the collection)."""
        pool, key = self._pool, self._key
        if pool is not None and key is not None:
            if not pool.known(key):
                pool.register(key, self._maker())
            try:
                # A preparation's error is this test's error, raised as if made here.
                self._prepared = pool.take(key)
            finally:
                if expect is not None:
                    expect(pool)
        self.rootfs = Rootfs(
            self.session,
            self.image,
            init=self.init,
            readonly=self.readonly,
            prepared=self._prepared,
        )
        return self.rootfs

    def _maker(self) -> Any:
        from pytest_layers import rootfs as rootfs_mod
        from pytest_layers.backends.pool import Maker

        make = functools.partial(
            rootfs_mod.prepare, self.session, self.image, init=self.init, readonly=self.readonly
        )
        backend = self.session.backend
        reset = getattr(backend, "reset_view", None)
        return Maker(
            make,
            rootfs_mod.discard,
            rootfs_mod.portable,
            reset=(lambda p: bool(reset(p.view))) if callable(reset) else None,
            load=rootfs_mod.from_portable,
            started=getattr(backend, "helper_started", None),
            ending=getattr(backend, "helper_ending", None),
            reset_counts=getattr(backend, "add_reset_counts", None),
            begin=functools.partial(
                rootfs_mod.prepare_begin,
                self.session,
                self.image,
                init=self.init,
                readonly=self.readonly,
            )
            if hasattr(backend, "begin_open")
            else None,
        )

    # -- 3. the outcome decides

    def wants_snapshot(self, failed: bool) -> bool:
        """Whether the keep policy keeps this test's rw layer, given its outcome."""
        if self.readonly:
            return False
        return self.keep == "always" or (self.keep == "failed" and failed)

    def ended(self, *, failed: bool, committed: Callable[[str, Layer], None] | None = None) -> None:
        """Keep the rw layer as a snapshot if the outcome and the policy say so (once)."""
        if self.decided:
            return
        self.decided = True
        fs = self.rootfs
        if fs is None or not self.wants_snapshot(failed):
            return
        # Keeping a snapshot is a service on top of the test: whatever goes wrong becomes a
        # line on the test's report, and the test keeps its own outcome.
        try:
            lay = fs.commit()
            with_init = fs.commit_with_init(lay)
            ref = self.session.store.add_snapshot(
                self.test, lay.chain_id, keep=self.keep_count, with_init=with_init
            )
            self.init_kept = with_init is not None
        except self._caught as exc:
            self.error = f"could not keep the rw layer as a snapshot: {describe(exc)}"
            return
        self.snapshot = (ref, lay)
        with contextlib.suppress(*self._caught):
            # "What did it write?" answered in the report; a file that cannot be read is left out.
            self.written = fs.unified_diff()
        if committed is None:
            return
        try:
            committed(ref, lay)
        except self._caught as exc:
            self.error = (
                f"kept as {ref}, but a pytest_layers_snapshot_committed hook failed: "
                f"{describe(exc)}"
            )

    # -- 4. the report

    def section(self, store_path: Path) -> tuple[str | None, str | None]:
        """(the report's snapshot section, its ref) for a snapshot kept and not yet reported;
        (None, None) otherwise. :attr:`error` is reported by the caller (and cleared)."""
        if self.snapshot is None:
            return None, None
        ref, lay = self.snapshot
        self.snapshot = None
        store = shlex.quote(str(store_path))
        q = shlex.quote(ref)
        text = (
            f"{ref} ({lay.chain_id[:19]}, {plural(lay.files, 'file')}, {human_size(lay.size)})\n"
            f"inspect it with:\n"
            f"  pytest-layers --store {store} diff {q}\n"
            f"  pytest-layers --store {store} shell {q}\n"
        )
        if self.init_kept:
            text += "init layer kept: shell/mount show it; export leaves it out (--with-init)\n"
        if self.written:
            text += f"changed text files (against the image):\n{self.written}"
        return text, ref

    # -- 5. teardown

    def close(self) -> None:
        """Close the view. The snapshot (if any) was taken from this view's own upper; the
        view is never handed out again, so a pooled one's unmount and removal can wait for
        the pool's helper."""
        fs, self.rootfs = self.rootfs, None
        if fs is None:
            return
        prepared, self._prepared = self._prepared, None
        if prepared is not None and self._pool is not None and self._pool.retire(prepared):
            fs.release()
        else:
            fs.close()


def describe(exc: BaseException) -> str:
    """One line for ``exc``: our errors and OSErrors say enough; anything else (a bug, a
    hook's own error) gets its type and the line that raised it."""
    if isinstance(exc, (LayersError, OSError)):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text
