"""The runtime: one process's layer machinery, opened once by a front end and closed at its end.

Both front ends need the same things in the same order: a mount namespace entered before any
thread starts, a store opened and checked, a backend chosen by a trial mount, a scratch
directory that dies with the process. The pytest plugin opens a :class:`Runtime` per session
(``pytest_configure``) and closes it in ``pytest_unconfigure``; the ``pytest-layers`` command
opens its store with :func:`open_store`, enters its namespace with :func:`enter_for_command`
and, for ``shell`` and ``run``, takes its backend and view from :meth:`Runtime.for_command`.
No pytest here: the front ends decide *what* (options, ini, the
``pytest_layers_choose_backend`` hook, argv), this module does it.

Order of :meth:`Runtime.enter` then :meth:`Runtime.start`:

1. ``preflight``: who owns the store is visible only outside a user namespace.
2. sweep the scratch of dead sessions (before entering: inside one, only copies of host
   mounts could be detached), then enter a fresh namespace (``unshare`` moves only the
   calling thread).
3. open the store and check it is writable.
4. choose the backend (the caller's ``choose``, else :meth:`Runtime.choose`), compose the
   reasons the report header prints (:class:`Choice`).
5. make the session's scratch dir (a tmpfs inside our own namespace for overlay and fuse),
   give the copy backend its home for reused copies, make the
   :class:`~pytest_layers.build.LayerSession`.

An xdist worker opens with :meth:`Runtime.join` instead (its controller's namespace, which it
inherited, and its controller's choice): steps 1, 2 and 4 are the controller's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_layers import _linux, namespaces
from pytest_layers._removal import remove_tree
from pytest_layers.backends.base import MountPolicy
from pytest_layers.errors import BackendUnavailableError, LayersError

if TYPE_CHECKING:
    from pytest_layers.backends.base import Backend, View
    from pytest_layers.build import LayerSession
    from pytest_layers.store import Store

__all__ = [
    "NAMESPACE_MODES",
    "Choice",
    "Runtime",
    "open_store",
    "enter_for_command",
]

NAMESPACE_MODES = ("private", "host")

#: A backend choice as a front end's hook makes it: the backend and why faster ones were
#: skipped (a ``detect.Reason`` or plain text), or None to say no candidate works.
Chooser = Callable[[list[str]], "tuple[Backend, Any] | None"]


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a session decided about mounting, as the report header and the workers see it."""

    #: The backend's name (``overlay``, ``fuse``, ``copy``); None before one is chosen.
    name: str | None = None
    #: ``overlay (user namespace)`` where that matters.
    label: str | None = None
    #: Why faster backends were skipped, in full (``-v``, diagnostics).
    reason: str = ""
    #: The same in a few words, for the report header.
    why: str = ""
    #: What would make them work, and the most decisive of those in a few words.
    fixes: tuple[str, ...] = ()
    fix: str = ""
    #: Where mounts live: ``host``, ``private`` (root) or ``user``.
    namespace: str = "host"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "label": self.label,
            "reason": self.reason,
            "why": self.why,
            "namespace": self.namespace,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Choice:
        return cls(
            name=data["backend"],
            label=data["label"],
            reason=data["reason"],
            why=data["why"],
            namespace=data["namespace"],
        )


# ---- the store -------------------------------------------------------------------------------


def open_store(path: Path, *, shared_group: str | None = None, missing: str | None = None) -> Store:
    """The store at ``path``; a path that is no directory is an error naming what it is.

    ``missing``: the message of the :class:`FileNotFoundError` raised when there is no store
    yet (the CLI's read-only verbs); None creates it."""
    from pytest_layers import _access
    from pytest_layers.store import Store

    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise _access.not_a_directory(path, st.st_mode)
    if missing is not None and st is None:
        raise FileNotFoundError(missing)
    return Store(path, shared_group=shared_group)


# ---- the namespace ---------------------------------------------------------------------------


#: (pid, mount namespace) this process entered for a session: an in-process nested session
#: (``pytester.runpytest()``) shares the process's fate, so it may share the namespace too.
_entered_here: tuple[int, str] | None = None


def _enter_fresh() -> namespaces.NamespaceInfo:
    """A fresh private mount namespace (root) or user + mount namespace (anyone else).

    Any namespace inherited with its environment variable belongs to a parent (a session
    whose test runs pytest or this command in a subprocess; a root session's, passed on by
    ``runuser``, where an ordinary user cannot even mount). Sharing it would leave our mounts
    in the parent's namespace until that one ends (its exec'd children keep only the
    capabilities it made ambient, no CAP_SYS_CHROOT); a fresh one dies with this process.
    Unsharing again is cheap, and an ordinary user may nest user namespaces 32 deep."""
    os.environ.pop(namespaces.ENV_VAR, None)
    if os.geteuid() == 0:
        return namespaces.enter_private_mount_namespace()
    return namespaces.enter_user_namespace()


def enter_for_command() -> BackendUnavailableError | None:
    """Enter a fresh namespace for one command, so that every mount it makes vanishes with
    it whatever happens to it; the error when none is possible here (then only the copy
    backend works, and there is no chroot)."""
    try:
        _enter_fresh()
    except BackendUnavailableError as exc:
        return exc
    return None


def sweep_dead_sessions(store_path: Path, shared_group: str | None) -> None:
    """Remove the view scratch of sessions that died without cleaning up (SIGKILL).

    In a private or user namespace their mounts died with them, but their scratch dirs (upper
    dirs when no scratch tmpfs could be mounted, the copy backend's trees) stay on disk; in
    host mode their mounts stay too. Only dirs of dead processes are touched, so it runs in
    every mode, *before* entering a namespace (inside one it could only detach private copies
    of host mounts). Cheap when nothing died: one directory listing and a ``/proc`` read per
    live session; mountinfo is read only for a dead session's dir.
    """
    from pytest_layers.store import preflight

    # Best effort: a mount we may not unmount (another user's, as an ordinary user) must not
    # stop this session, whose own scratch is a fresh dir.
    with contextlib.suppress(OSError):
        # Only in a store this user may trust (a planted scratch/views symlink would make the
        # sweep unmount and delete elsewhere); opening the store then says what is wrong.
        preflight(store_path, shared_group=shared_group)
        namespaces.sweep_stale_mounts(store_path / "scratch")


def enter_for_session(
    store_path: Path, mode: str, backend: str, shared_group: str | None = None
) -> tuple[str, str]:
    """Enter a session's namespace; returns (where mounts live, why overlay is out or "").

    Called in the process that owns the session, never in an xdist worker, which shares its
    controller's namespace.
    """
    global _entered_here
    sweep_dead_sessions(store_path, shared_group)
    inherited = namespaces.inside_our_namespace()
    if inherited is not None and _entered_here == (os.getpid(), inherited.mnt_ns):
        return inherited.kind, ""
    root = os.geteuid() == 0
    if not root and backend == "copy":
        # The copy needs no mount, and a user namespace would change what tests observe: its
        # capabilities let the test process read and write its own mode-000 files. Mounts an
        # ordinary user's test can make live in a namespace of its own, invisible here. Root's
        # copy sessions do enter a private namespace: a bind mount a test leaves in its rootfs
        # then dies with the session instead of staying in the host.
        os.environ.pop(namespaces.ENV_VAR, None)
        return "host", ""
    if mode == "host" or (not root and backend == "fuse"):
        os.environ.pop(namespaces.ENV_VAR, None)
        return "host", ""
    try:
        info = _enter_fresh()
    except BackendUnavailableError as exc:
        if root:
            return "host", _reason(
                f"no private mount namespace ({exc.reason}), mounting in the host's",
                f"no private mount namespace: {exc.reason}",
            )
        detail = exc.reason.removeprefix("cannot enter a user namespace: ")
        return "host", _reason(f"no user namespace: {exc.reason}", f"no user namespace: {detail}")
    _entered_here = (os.getpid(), info.mnt_ns)
    return info.kind, ""


def _reason(text: str, short_of: str) -> str:
    from pytest_layers.backends import detect

    return detect.Reason(text, detect.shorten(short_of, 72))


# ---- the runtime -----------------------------------------------------------------------------


class Runtime:
    """One process's namespace, store, backend and scratch (see the module's docstring).

    ``session`` is the :class:`~pytest_layers.build.LayerSession` that builds layers and
    makes views, once :meth:`start` ran; ``pool`` the view pool, made at the first view."""

    def __init__(self, store: Store, choice: Choice, *, policy: MountPolicy | None = None) -> None:
        self.store = store
        self.choice = choice
        self.policy = policy or MountPolicy()
        self.backend: Backend | None = None
        self.session: LayerSession | None = None
        self.scratch: Path | None = None
        self._scratch_tmpfs = False
        self._pool: Any = None
        self._pool_depth = 0

    @classmethod
    def enter(
        cls,
        store_path: Path,
        *,
        shared_group: str | None = None,
        namespace: str = "private",
        backend: str = "auto",
        policy: MountPolicy | None = None,
    ) -> Runtime:
        """Steps 1 to 3 in the process that owns a session: preflight, namespace, store."""
        from pytest_layers.store import Store, preflight

        preflight(store_path, shared_group=shared_group)
        kind, reason = enter_for_session(store_path, namespace, backend, shared_group)
        store = Store(store_path, shared_group=shared_group)
        store.check_writable()  # a session builds and commits: say so now if it cannot
        choice = Choice(reason=reason, why=getattr(reason, "short", ""), namespace=kind)
        return cls(store, choice, policy=policy)

    @classmethod
    def join(
        cls,
        store_path: Path,
        choice: Choice,
        *,
        shared_group: str | None = None,
        policy: MountPolicy | None = None,
    ) -> Runtime:
        """An xdist worker's runtime: the controller's namespace (inherited) and choice."""
        from pytest_layers.store import Store

        store = Store(store_path, shared_group=shared_group)
        store.check_writable()
        return cls(store, choice, policy=policy)

    @classmethod
    def for_command(
        cls,
        store: Store,
        scratch: Path,
        *,
        backend: str = "auto",
        policy: MountPolicy | None = None,
    ) -> Runtime:
        """A command's runtime (``shell``, ``run``): its namespace entered already
        (:func:`enter_for_command`), ``scratch`` a directory the command owns and removes (a
        store staging dir), the backend chosen by a trial mount there. Nothing to close:
        the command closes its view and its scratch goes with the staging dir."""
        from pytest_layers.backends import detect

        runtime = cls(store, Choice(), policy=policy)
        chosen, _skipped = detect.choose_backend(
            backend, scratch / "probe", flavor=store.flavor, policy=policy
        )
        runtime.backend = chosen
        runtime.choice = Choice(name=chosen.name, label=detect.backend_label(chosen))
        runtime.scratch = scratch
        return runtime

    def open_view(self, lowers_top_first: Sequence[Path], *, readonly: bool = False) -> View:
        """A view of ``lowers_top_first`` in a fresh directory of the scratch (the caller
        closes it; the scratch's removal removes the directory)."""
        if self.backend is None or self.scratch is None:
            raise LayersError("this runtime has no backend yet: start() it first")
        where = Path(tempfile.mkdtemp(prefix="view-", dir=self.scratch))
        return self.backend.open(
            lowers_top_first, where, readonly=readonly, flavor=self.store.flavor
        )

    def choose(self, candidates: Sequence[str]) -> tuple[Backend, Any] | None:
        """The default choice: the first candidate whose trial mount works, and why the
        ones before it did not; None when none does (several candidates)."""
        from pytest_layers.backends import detect

        scratch = self.store.root / "scratch"
        flavor = self.store.flavor
        if tuple(candidates) == tuple(detect.BACKEND_NAMES):
            backend, skipped = detect.choose_backend(
                "auto", scratch, flavor=flavor, policy=self.policy
            )
            return backend, detect.join_reasons(skipped)
        reasons = []
        for name in candidates:
            try:
                backend, _ = detect.choose_backend(name, scratch, flavor=flavor, policy=self.policy)
            except BackendUnavailableError as exc:
                if len(candidates) == 1:
                    raise
                reasons.append(
                    detect.Reason(f"{exc.backend}: {exc.reason}", detect.skipped_short(exc))
                )
                continue
            return backend, detect.join_reasons(reasons)
        return None

    def start(
        self,
        rootdir: Path,
        *,
        backend: str = "auto",
        choose: Chooser | None = None,
        rebuild_token: str | None = None,
        verify: bool = False,
        pool_depth: int = 0,
    ) -> LayerSession:
        """Steps 4 and 5: the backend (a joined runtime takes its controller's), the
        session's scratch, the :class:`~pytest_layers.build.LayerSession`."""
        from pytest_layers.backends import detect
        from pytest_layers.build import LayerSession

        if self.choice.name is not None:
            chosen = detect.get_backend(self.choice.name, self.policy)
        else:
            candidates = list(detect.BACKEND_NAMES) if backend == "auto" else [backend]
            made = (choose or self.choose)(candidates)
            if made is None:
                raise BackendUnavailableError(
                    backend, f"no backend among {', '.join(candidates)} was chosen"
                )
            chosen, reason = made
            self.choice = _compose(self.choice, chosen, reason)
        self.backend = chosen
        scratch = self.store.root / "scratch" / "views" / namespaces.session_dir_name()
        scratch.mkdir(parents=True)
        self.scratch = scratch
        if chosen.name in ("overlay", "fuse") and namespaces.inside_our_namespace() is not None:
            # Upper and work dirs on tmpfs make the per-test mount cycle several times cheaper
            # (on ext4 a fuse view's half dozen mkdirs went to scanning the inode bitmap for
            # recently deleted inodes); inside our own namespace the tmpfs is private and dies
            # with the session.
            try:
                namespaces.mount_scratch_tmpfs(scratch)
                self._scratch_tmpfs = True
            except OSError:
                self._scratch_tmpfs = False
        keep = getattr(chosen, "keep_copies_in", None)
        if callable(keep):
            # The copy backend resets a test's copy and hands it to the next test of its image.
            keep(scratch / "copies")
        self._pool_depth = pool_depth
        self.session = LayerSession(
            self.store,
            chosen,
            rootdir,
            rebuild_token=rebuild_token,
            verify=verify,
            scratch_root=scratch,
        )
        return self.session

    def pool(self, plan: Sequence[Any] = (), window: int = 0) -> Any:
        """The session's view pool, or None where views are made in the test's setup.

        Made at the first view: long after :meth:`enter` entered the namespace. Its helpers
        are processes forked later still; no thread is started. ``plan`` (each test's pool key
        in run order) and ``window`` are what the new pool follows (``ViewPool.follow``)."""
        if self._pool is None:
            backend = self.backend
            # Overlay and fuse views are cheap to make ahead; a backend whose views are costly
            # copies joins when it can reset a used one in place (``reset_view``).
            served = backend is not None and (
                backend.name in ("overlay", "fuse")
                or callable(getattr(backend, "reset_view", None))
            )
            if self._pool_depth < 1 or not served:
                self._pool = False
            elif getattr(backend, "api", None) == "legacy":
                # The legacy overlay mount chdirs the whole process (backends/overlay.py): never
                # from a second thread while a test runs.
                self._pool = False
            else:
                from pytest_layers.backends.pool import ViewPool

                self._pool = ViewPool(depth=self._pool_depth)
                self._pool.follow(plan, window)
        return self._pool or None

    def close_pool(self) -> Any:
        """Drain the view pool (tests are over); returns it, for its counts, or None."""
        pool, self._pool = self._pool, False
        if not pool:
            return None
        pool.close()
        return pool

    def close(self) -> None:
        """Drain the pool, release the session's leases, close the backend, remove the
        scratch, close the store."""
        self.close_pool()
        if self.session is not None:
            self.session.close()
        close_backend = getattr(self.backend, "close", None)
        if callable(close_backend):
            close_backend()
        if self.scratch is not None:
            if self._scratch_tmpfs:
                with contextlib.suppress(OSError):
                    _linux.umount2(self.scratch, _linux.MNT_DETACH)
            remove_tree(self.scratch)
        self.store.close()


def _compose(before: Choice, backend: Backend, reason: object) -> Choice:
    """``before`` (the namespace's reason) with the chosen backend and its own reasons."""
    from pytest_layers.backends import detect

    reason = reason if isinstance(reason, detect.Reason) else detect.Reason(str(reason or ""))
    full = "; ".join(x for x in (before.reason, reason) if x)
    if before.why:
        # The namespace failure is the cause; overlay's own line only repeats it.
        shorts = [p for p in reason.short.split("; ") if p and not p.startswith("overlay")]
        why = "; ".join([before.why, *shorts])
    else:
        why = reason.short if reason.short else ""
    fixes: tuple[str, ...] = ()
    fix = ""
    if backend.name != "overlay":
        fixes = tuple(detect.fixes_for(full))
        fix = next(iter(detect.fixes_for(full, short=True)), "")
    return dataclasses.replace(
        before,
        name=backend.name,
        label=detect.backend_label(backend),
        reason=full,
        why=why,
        fixes=fixes,
        fix=fix,
    )
