"""pytest glue for pytest-layers: options, markers, fixtures, report hooks, xdist wiring.

The work happens in plain modules: :mod:`pytest_layers.definitions` builds layers,
:mod:`pytest_layers.rootfs` gives a test its view, the store and backends do the rest.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shlex
import traceback
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_layers import _linux, _settings, definitions, hookspecs, namespaces
from pytest_layers.definitions import Layer, LayerDef, LayerSession, human_size
from pytest_layers.errors import (
    BackendUnavailableError,
    LayerDefinitionError,
    LayersError,
    NoSpaceError,
)
from pytest_layers.rootfs import Rootfs, check_init_path

__all__ = ["layer_fixture", "image_fixture", "BACKEND_CHOICES", "KEEP_CHOICES"]

BACKEND_CHOICES = ("auto", "overlay", "fuse", "copy")
KEEP_CHOICES = ("failed", "always", "never")
NAMESPACE_CHOICES = ("private", "host")
_WORKER_KEY = "pytest_layers"
_MARKER_KWARGS = ("init", "keep", "readonly")


# ---- options -------------------------------------------------------------------------------


def _choice(flag: str, choices: Sequence[str]) -> Callable[[str], str]:
    def validate(value: str) -> str:
        if value not in choices:
            raise pytest.UsageError(
                f"{flag}: invalid value {value!r}; choose one of {', '.join(choices)}"
            )
        return value

    return validate


def _keep_count(flag: str, value: object) -> int:
    try:
        count = int(str(value))
    except ValueError:
        count = 0
    if count < 1:
        raise pytest.UsageError(
            f"{flag}: invalid value {value!r}; give a whole number of snapshots to keep per "
            "test, at least 1 (use --layers-keep=never to keep none)"
        )
    return count


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("layers", "layered filesystems (pytest-layers)")
    group.addoption(
        "--layers-backend",
        type=_choice("--layers-backend", BACKEND_CHOICES),
        default=None,
        help="How to mount test rootfs views: auto (default), overlay, fuse or copy",
    )
    group.addoption(
        "--layers-keep",
        type=_choice("--layers-keep", KEEP_CHOICES),
        default=None,
        help="Commit a test's writable layer as a snapshot: failed (default), always or never",
    )
    group.addoption(
        "--layers-store",
        default=None,
        metavar="PATH",
        help="Layer store directory (default: ini layers_store, else <cache_dir>/layers, "
        ".pytest_cache/layers under the rootdir unless cache_dir is set)",
    )
    group.addoption(
        "--layers-rebuild",
        action="store_true",
        default=False,
        help="Ignore the build cache for this run: rebuild every layer used (once)",
    )
    group.addoption(
        "--layers-verify",
        action="store_true",
        default=None,
        help="Re-hash every layer a session uses before using it",
    )
    parser.addini("layers_backend", "Mount backend: auto, overlay, fuse or copy", default="auto")
    parser.addini("layers_keep", "Snapshot policy: failed, always or never", default="failed")
    parser.addini(
        "layers_store",
        "Layer store directory, relative to the rootdir (default: <cache_dir>/layers)",
        default="",
    )
    parser.addini("layers_keep_count", "Snapshots kept per test", default="3")
    parser.addini("layers_verify", "Re-hash layers before use", type="bool", default=False)
    parser.addini(
        "layers_mount_namespace",
        "Where root mounts views: private (own mount namespace, default) or host",
        default="private",
    )
    parser.addini("layers_default", "Image of tests that use rootfs without a layer marker")
    from pytest_layers import datadir  # the datadir glue has its own module

    datadir.addini(parser)


# ---- session state -------------------------------------------------------------------------


@dataclass
class _State:
    """Everything the plugin decided for this process, in ``config.stash``."""

    store_path: Path
    rootdir: Path
    keep: str
    keep_count: int
    verify: bool
    rebuild_token: str | None
    backend_name: str | None = None
    backend_label: str | None = None
    store: Any = None
    scratch_tmpfs: bool = False
    backend_reason: str = ""
    namespace: str = "host"
    error: BaseException | None = None
    session: LayerSession | None = None
    backend: Any = None
    seen_progress: dict[tuple[str, str], str] = field(default_factory=dict)
    snapshots: list[tuple[str, str]] = field(default_factory=list)
    snapshot_errors: list[tuple[str, str]] = field(default_factory=list)

    def worker_info(self) -> dict[str, Any]:
        return {
            "store": str(self.store_path),
            "backend": self.backend_name,
            "label": self.backend_label,
            "reason": self.backend_reason,
            "rebuild": self.rebuild_token,
            "namespace": self.namespace,
            # Workers never set up on their own: without the controller's reason they would
            # only know that no backend was chosen.
            "error": None if self.error is None else str(self.error),
        }

    def get_session(self) -> LayerSession:
        if self.error is not None:
            raise self.error
        if self.session is None:
            raise LayersError("pytest-layers was not set up for this session")
        return self.session


_STATE = pytest.StashKey[_State]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_ROOTFS = pytest.StashKey["_TestView"]()


def _state(config: pytest.Config) -> _State:
    try:
        return config.stash[_STATE]
    except KeyError:
        raise LayersError("the pytest-layers plugin is not configured (-p no:layers?)") from None


def _ini_choice(config: pytest.Config, name: str, choices: Sequence[str]) -> str:
    value = str(config.getini(name)).strip()
    if value not in choices:
        raise pytest.UsageError(
            f"ini option {name}: invalid value {value!r}; choose one of {', '.join(choices)}"
        )
    return value


def _cache_dir(config: pytest.Config) -> str | None:
    """pytest's ``cache_dir`` ini value (``-o cache_dir=`` included), or None when the cache
    provider is disabled (``-p no:cacheprovider``) and the option does not exist."""
    try:
        return str(config.getini("cache_dir")) or None
    except ValueError:
        return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "layer(*names, init=None, keep=None, readonly=False): the image of the test's rootfs "
        "(several names are stacked, the leftmost on top); init: {path: content} for the init "
        "layer; keep: failed|always|never; readonly: mount without a writable layer",
    )
    if config.getoption("help", False):
        return
    backend_opt = config.getoption("layers_backend") or _ini_choice(
        config, "layers_backend", BACKEND_CHOICES
    )
    keep = config.getoption("layers_keep") or _ini_choice(config, "layers_keep", KEEP_CHOICES)
    keep_count = _keep_count("ini option layers_keep_count", config.getini("layers_keep_count"))
    ns_mode = _ini_choice(config, "layers_mount_namespace", NAMESPACE_CHOICES)
    verify = config.getoption("layers_verify")
    if verify is None:
        verify = bool(config.getini("layers_verify"))
    rootdir = Path(str(config.rootpath))
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    winfo = workerinput.get(_WORKER_KEY) if workerinput else None
    if winfo is not None:
        state = _State(
            store_path=Path(winfo["store"]),
            rootdir=rootdir,
            keep=keep,
            keep_count=keep_count,
            verify=verify,
            rebuild_token=winfo["rebuild"],
            backend_name=winfo["backend"],
            backend_label=winfo["label"],
            backend_reason=winfo["reason"],
            namespace=winfo["namespace"],
        )
    else:
        store_opt = config.getoption("layers_store")
        if store_opt:
            store_path = Path.cwd() / store_opt
        else:
            store_path = _settings.store_path(
                rootdir,
                layers_store=str(config.getini("layers_store")),
                cache_dir=_cache_dir(config),
            )
        state = _State(
            store_path=store_path,
            rootdir=rootdir,
            keep=keep,
            keep_count=keep_count,
            verify=verify,
            rebuild_token=uuid.uuid4().hex if config.getoption("layers_rebuild") else None,
        )
    config.stash[_STATE] = state
    if winfo is not None and winfo.get("error"):
        state.error = LayersError(winfo["error"])
    else:
        try:
            _setup(config, state, backend_opt, ns_mode, worker=winfo is not None)
        except (LayersError, OSError) as exc:
            # Deferred: a session that never uses a layer must not fail because of the store.
            state.error = exc
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(state), "pytest-layers-xdist")
    from pytest_layers import datadir

    datadir.configure(config)


def _setup(
    config: pytest.Config, state: _State, backend_opt: str, ns_mode: str, *, worker: bool
) -> None:
    from pytest_layers.backends import detect  # keeps `pytest --help` light
    from pytest_layers.store import Store

    if not worker:
        # Namespaces first: unshare(2) moves only the calling thread, so before anything that
        # could start one. Workers inherit the controller's namespace and stay in it.
        state.namespace, state.backend_reason = _enter_namespace(
            state.store_path, ns_mode, backend_opt
        )
    state.store = Store(state.store_path)
    if worker:
        backend = detect.get_backend(str(state.backend_name))
    else:
        candidates = list(detect.BACKEND_NAMES) if backend_opt == "auto" else [backend_opt]
        chosen = config.hook.pytest_layers_choose_backend(config=config, candidates=candidates)
        if chosen is None:
            raise BackendUnavailableError(
                backend_opt, f"no backend among {', '.join(candidates)} was chosen"
            )
        backend, reason = chosen
        state.backend_name = backend.name
        state.backend_label = detect.backend_label(backend)
        state.backend_reason = "; ".join(x for x in (state.backend_reason, reason) if x)
    state.backend = backend
    scratch = state.store_path / "scratch" / "views" / namespaces.session_dir_name()
    scratch.mkdir(parents=True)
    if backend.name == "overlay" and namespaces.inside_our_namespace() is not None:
        # Upper and work dirs on tmpfs make the per-test mount cycle several times cheaper;
        # inside our own namespace the tmpfs is private and dies with the session.
        try:
            namespaces.mount_scratch_tmpfs(scratch)
            state.scratch_tmpfs = True
        except OSError:
            state.scratch_tmpfs = False
    state.session = LayerSession(
        state.store,
        backend,
        state.rootdir,
        rebuild_token=state.rebuild_token,
        verify=state.verify,
        scratch_root=scratch,
    )


def _sweep_dead_sessions(store_path: Path) -> None:
    """Remove the view scratch of sessions that died without cleaning up (SIGKILL).

    In a private or user namespace their mounts died with them, but their scratch dirs (upper
    dirs when no scratch tmpfs could be mounted, the copy backend's trees) stay on disk; in
    host mode their mounts stay too. Only dirs of dead processes are touched, so it runs in
    every mode, *before* entering a namespace (inside one it could only detach private copies
    of host mounts). Cheap when nothing died: one directory listing and a ``/proc`` read per
    live session; mountinfo is read only for a dead session's dir.
    """
    # Best effort: a mount we may not unmount (another user's, as an ordinary user) must not
    # stop this session, whose own scratch is a fresh dir.
    with contextlib.suppress(OSError):
        namespaces.sweep_stale_mounts(store_path / "scratch")


#: (pid, mount namespace) this process entered for a session: an in-process nested session
#: (``pytester.runpytest()``) shares the process's fate, so it may share the namespace too.
_entered_here: tuple[int, str] | None = None


def _enter_namespace(store_path: Path, ns_mode: str, backend_opt: str) -> tuple[str, str]:
    """Enter the session's namespace; returns (where mounts live, why overlay is out or "").

    Called in the process that owns the session, never in an xdist worker (``workerinput``
    says which), which shares its controller's namespace.
    """
    global _entered_here
    _sweep_dead_sessions(store_path)
    inherited = namespaces.inside_our_namespace()
    if inherited is not None and _entered_here == (os.getpid(), inherited.mnt_ns):
        return inherited.kind, ""
    # Any other namespace inherited with its environment variable belongs to a parent session
    # (a test that runs pytest in a subprocess; a root session's, passed on by `runuser`, where
    # an ordinary user cannot even mount). Sharing it would leave a SIGKILLed session's mounts
    # in the parent's namespace until that one ends; a fresh one dies with this process.
    # Unsharing again is cheap, and an ordinary user may nest user namespaces 32 deep.
    os.environ.pop(namespaces.ENV_VAR, None)
    if backend_opt == "copy":
        return "host", ""
    if os.geteuid() == 0:
        if ns_mode == "host":
            return "host", ""
        try:
            info = namespaces.enter_private_mount_namespace()
        except BackendUnavailableError as exc:
            return "host", f"no private mount namespace ({exc.reason}), mounting in the host's"
    else:
        if backend_opt == "fuse" or ns_mode == "host":
            return "host", ""
        try:
            info = namespaces.enter_user_namespace()
        except BackendUnavailableError as exc:
            return "host", f"no user namespace: {exc.reason}"
    _entered_here = (os.getpid(), info.mnt_ns)
    return info.kind, ""


@pytest.hookimpl(trylast=True)
def pytest_layers_choose_backend(config: pytest.Config, candidates: Sequence[str]) -> Any:
    """The default choice: the first candidate whose trial mount works."""
    from pytest_layers.backends import detect

    state = _state(config)
    scratch = state.store_path / "scratch"
    flavor = state.store.flavor
    if tuple(candidates) == tuple(detect.BACKEND_NAMES):
        backend, skipped = detect.choose_backend("auto", scratch, flavor=flavor)
        return backend, "; ".join(skipped)
    skipped = []
    for name in candidates:
        try:
            backend, _ = detect.choose_backend(name, scratch, flavor=flavor)
        except BackendUnavailableError as exc:
            if len(candidates) == 1:
                raise
            skipped.append(f"{exc.backend}: {exc.reason}")
            continue
        return backend, "; ".join(skipped)
    return None


class _XdistHooks:
    """Registered only when pytest-xdist is installed (its hooks are unknown otherwise)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[_WORKER_KEY] = self.state.worker_info()


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Two ``rootfs.diff(details=True)`` results: show the entries that differ, not both lists."""
    from pytest_layers import diffdata

    return diffdata.explain(left, right) if op == "==" else None


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or state.session is None:
        return
    state.session.close()
    if state.scratch_tmpfs:
        with contextlib.suppress(OSError):
            _linux.umount2(state.session.scratch_root, _linux.MNT_DETACH)
    namespaces.remove_tree(state.session.scratch_root)
    if state.store is not None:
        state.store.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(_STATE, None)
    if state is None:
        return []
    if state.error is not None:
        return [f"layers: unavailable: {state.error}"]
    store = state.get_session().store
    why = f" ({state.backend_reason})" if state.backend_reason else ""
    return [
        f"layers: backend={state.backend_label or state.backend_name}{why}, "
        f"store={state.store_path} ({human_size(store.size())})"
    ]


# ---- @layer fixtures -----------------------------------------------------------------------


def layer_fixture(defn: LayerDef) -> Any:
    """Wrap a layer definition into a session-scoped pytest fixture named ``defn.name``."""
    if defn.builder is None:
        raise LayerDefinitionError(f"layer {defn.name!r} has no builder; use image_fixture")
    builder = defn.builder
    asked = [n for n in defn.extra_args if n != "request"]

    def layer_fixture_function(request: pytest.FixtureRequest, **kwargs: Any) -> Layer:
        __tracebackhide__ = True
        if "request" in defn.extra_args:
            kwargs["request"] = request
        return _layer_value(request, defn, kwargs)

    params = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in asked]
    func: Any = layer_fixture_function
    func.__signature__ = inspect.Signature(params)
    func.__name__ = defn.name
    func.__qualname__ = builder.__qualname__
    func.__module__ = builder.__module__
    parent = f" on {defn.parent!r}" if defn.parent else ""
    func.__doc__ = builder.__doc__ or f"Layer {defn.name!r}{parent}, built by {defn.qualname}."
    # Lets `pytest --fixtures` point at the builder; pytest calls this wrapper, not the builder
    # (it stops unwrapping at __signature__).
    func.__wrapped__ = builder
    return pytest.fixture(scope="session", name=defn.name)(func)


def _session_or_fail(state: _State) -> LayerSession:
    """The session's layer machinery, or a one-line failure saying why the store or backend
    set up at configure time is unusable (no traceback from deep inside the store)."""
    __tracebackhide__ = True
    if state.error is not None:
        pytest.fail(f"pytest-layers cannot run in this session: {state.error}", pytrace=False)
    return state.get_session()


def image_fixture(defn: LayerDef) -> Any:
    """Wrap an ``oci_image`` definition into a session-scoped pytest fixture named ``defn.name``."""

    def oci_image_fixture_function(request: pytest.FixtureRequest) -> Layer:
        __tracebackhide__ = True
        session = _session_or_fail(_state(request.config))
        try:
            return session.get_image(defn)
        except (LayerDefinitionError, NoSpaceError) as exc:
            message = str(exc)
        # Outside the except block: the failure is the one line, without the chained errors.
        pytest.fail(message, pytrace=False)

    func: Any = oci_image_fixture_function
    func.__name__ = defn.name
    func.__qualname__ = defn.name
    func.__module__ = defn.image.module if defn.image else __name__
    image = defn.image
    ref = f" (ref {image.ref!r})" if image and image.ref else ""
    func.__doc__ = f"Image {defn.name!r} imported from {image.path if image else '?'}{ref}."
    return pytest.fixture(scope="session", name=defn.name)(func)


def _layer_value(request: pytest.FixtureRequest, defn: LayerDef, kwargs: dict[str, Any]) -> Layer:
    __tracebackhide__ = True
    state = _state(request.config)
    session = _session_or_fail(state)
    try:
        definitions.chain_of_names(defn.name)
    except LayerDefinitionError as exc:
        pytest.fail(f"layer {defn.name!r}: {exc}", pytrace=False)
    parent: Layer | None = None
    if defn.parent is not None:
        parent = request.getfixturevalue(defn.parent)
        if not isinstance(parent, Layer):
            pytest.fail(
                f"layer {defn.name!r}: parent fixture {defn.parent!r} is not a @layer "
                f"(it gave {type(parent).__name__})",
                pytrace=False,
            )
    try:
        return session.get(defn, parent, kwargs)
    except NoSpaceError as exc:
        message = str(exc)  # names the layer, the store and what to do; no store traceback
    pytest.fail(message, pytrace=False)


# ---- the marker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    names: tuple[str, ...]
    init: Mapping[str, str | bytes]
    keep: str | None
    readonly: bool


def _marker_spec(item: pytest.Item) -> _Spec:
    """The validated ``layer`` marker of ``item`` (closest wins); raises LayerDefinitionError."""
    marker = item.get_closest_marker("layer")
    where = "@pytest.mark.layer: "
    if marker is None:
        default = str(item.config.getini("layers_default") or "").strip()
        defaults = tuple(default.split()) if default else ()
        for name in defaults:
            definitions.chain_of_names(name)
        return _Spec(defaults, {}, None, False)
    unknown = sorted(set(marker.kwargs) - set(_MARKER_KWARGS))
    if unknown:
        raise LayerDefinitionError(
            f"{where}unknown argument(s) {', '.join(unknown)}; it takes layer names and "
            f"{', '.join(_MARKER_KWARGS)}"
        )
    if not marker.args:
        raise LayerDefinitionError(f"{where}give at least one layer name")
    names: list[str] = []
    for arg in marker.args:
        defn = definitions.lookup(arg, where=where)
        definitions.chain_of_names(defn.name)
        names.append(defn.name)
    init = marker.kwargs.get("init")
    if init is None:
        init = {}
    if not isinstance(init, Mapping):
        raise LayerDefinitionError(
            f"{where}init= must be a dict of relative path -> str or bytes, "
            f"not {type(init).__name__}"
        )
    for path, content in init.items():
        check_init_path(path, where=where)
        if not isinstance(content, (str, bytes)):
            raise LayerDefinitionError(
                f"{where}init[{path!r}] must be str or bytes, not {type(content).__name__}"
            )
    keep = marker.kwargs.get("keep")
    if keep is not None and keep not in KEEP_CHOICES:
        raise LayerDefinitionError(
            f"{where}keep={keep!r} is invalid; choose one of {', '.join(KEEP_CHOICES)} (or None)"
        )
    readonly = marker.kwargs.get("readonly", False)
    if not isinstance(readonly, bool):
        raise LayerDefinitionError(f"{where}readonly= must be True or False, not {readonly!r}")
    return _Spec(tuple(names), dict(init), keep, readonly)


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Collector, name: str, obj: object
) -> Generator[None, Any, Any]:
    result = yield
    items: list[object] = result if isinstance(result, list) else [result]
    problems: list[str] = []
    for item in items:
        if not isinstance(item, pytest.Function) or "rootfs" not in item.fixturenames:
            continue
        try:
            _marker_spec(item)
        except LayerDefinitionError as exc:
            problems.append(f"{item.nodeid}: {exc}")
    if problems:
        raise pytest.Collector.CollectError("\n".join(problems))
    return result


# ---- the rootfs fixture and snapshots ------------------------------------------------------


@dataclass
class _TestView:
    rootfs: Rootfs
    keep: str
    decided: bool = False
    snapshot: tuple[str, Layer] | None = None
    error: str | None = None
    #: The rw layer's text changes as a short unified diff, for the failure's report section.
    written: str = ""


@pytest.fixture
def rootfs(request: pytest.FixtureRequest) -> Iterator[Rootfs]:
    """A private, writable view of the test's image (``@pytest.mark.layer``).

    Writes go to a throw-away layer; ``rootfs.diff()`` lists them, ``rootfs.commit()`` keeps
    them. With ``--layers-keep=failed`` (the default) a failing test's writes are kept as a
    snapshot (``pytest-layers diff snapshot:<nodeid>``).
    """
    item = request.node
    state = _state(request.config)
    try:
        spec = _marker_spec(item)
    except LayerDefinitionError as exc:
        pytest.fail(f"{item.nodeid}: {exc}", pytrace=False)
    session = _session_or_fail(state)
    if not spec.names:
        pytest.fail(
            f"{item.nodeid} uses the rootfs fixture but names no image: add "
            '@pytest.mark.layer("<layer name>") to the test (or its class or module), or set '
            f"layers_default in the ini file; known layers: "
            f"{', '.join(sorted(definitions.registry())) or '(none)'}",
            pytrace=False,
        )
    tops = [request.getfixturevalue(name) for name in spec.names]
    image = definitions.compose(tops)
    session.use(image)
    init: dict[str, str | bytes] = {}
    for extra in request.config.hook.pytest_layers_init(item=item):
        if extra:
            init.update(extra)
    init.update(spec.init)
    fs = Rootfs(session, image, init=init, readonly=spec.readonly)
    view = _TestView(fs, spec.keep or state.keep)
    item.stash[_ROOTFS] = view
    try:
        yield fs
        if not view.decided:
            # No call phase (setup failed after this fixture, or the test was skipped).
            reports = item.stash.get(_REPORTS, {})
            _decide(item, view, failed=any(r.failed for r in reports.values()))
    finally:
        fs.close()


def _decide(item: pytest.Item, view: _TestView, *, failed: bool) -> None:
    view.decided = True
    if view.rootfs.readonly or not (view.keep == "always" or (view.keep == "failed" and failed)):
        return
    state = _state(item.config)
    # Runs inside pytest_runtest_makereport: anything escaping would end the whole session with
    # INTERNALERROR. Keeping a snapshot is a service on top of the test, so a failure becomes a
    # line on that test's report and the test keeps its own outcome.
    try:
        session = state.get_session()
        lay = view.rootfs.commit()
        ref = session.store.add_snapshot(item.nodeid, lay.chain_id, keep=state.keep_count)
    except _CAUGHT as exc:
        view.error = f"could not keep the rw layer as a snapshot: {_describe(exc)}"
        return
    view.snapshot = (ref, lay)
    with contextlib.suppress(*_CAUGHT):
        # "What did it write?" answered in the report; a file that cannot be read is left out.
        view.written = view.rootfs.unified_diff()
    try:
        item.config.hook.pytest_layers_snapshot_committed(item=item, ref=ref, layer=lay)
    except _CAUGHT as exc:
        view.error = (
            f"kept as {ref}, but a pytest_layers_snapshot_committed hook failed: {_describe(exc)}"
        )


#: What a snapshot failure may raise and still be reported on the test: any error, and
#: pytest.fail()/skip() called from a hook (BaseExceptions); never KeyboardInterrupt or exit.
_CAUGHT = (Exception, pytest.fail.Exception, pytest.skip.Exception)


def _describe(exc: BaseException) -> str:
    """One line for ``exc``: our errors and OSErrors say enough; anything else (a bug, a
    hook's own error) gets its type and the line that raised it."""
    if isinstance(exc, (LayersError, OSError)):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _snapshot_section(state: _State, ref: str, lay: Layer) -> str:
    store = shlex.quote(str(state.store_path))
    q = shlex.quote(ref)
    return (
        f"{ref} ({lay.chain_id[:19]}, {_plural(lay.files, 'file')}, {human_size(lay.size)})\n"
        f"inspect it with:\n"
        f"  pytest-layers --store {store} diff {q}\n"
        f"  pytest-layers --store {store} shell {q}\n"
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    state = item.config.stash.get(_STATE, None)
    if state is None:
        return report
    view = item.stash.get(_ROOTFS, None)
    if view is not None and report.when == "call" and not view.decided:
        _decide(item, view, failed=report.failed)
    if view is not None and report.when in ("call", "teardown"):
        if view.snapshot is not None:
            ref, lay = view.snapshot
            section = _snapshot_section(state, ref, lay)
            if view.written:
                section += f"changed text files (against the image):\n{view.written}"
            report.sections.append(("layers snapshot", section))
            report.layers_snapshot = ref  # type: ignore[attr-defined]  # travels through xdist
            view.snapshot = None
        if view.error is not None:
            report.sections.append(("layers snapshot", view.error))
            # Also for the terminal summary: a passing test's sections are not shown.
            report.layers_snapshot_error = view.error  # type: ignore[attr-defined]
            view.error = None
    if state.session is not None and state.session.progress:
        report.layers_progress = [p.line() for p in state.session.progress]  # type: ignore[attr-defined]
        state.session.progress.clear()
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput"):
        return
    config.pluginmanager.register(_Reporter(config), "pytest-layers-reporter")


class _Reporter:
    """Prints progress lines and collects snapshot refs, in the process that owns the terminal
    (the controller under xdist, whose workers send both along with their reports)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.state = _state(config)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        ref = getattr(report, "layers_snapshot", None)
        if ref:
            self.state.snapshots.append((report.nodeid, ref))
        error = getattr(report, "layers_snapshot_error", None)
        if error:
            self.state.snapshot_errors.append((report.nodeid, error))
        lines = []
        for line in getattr(report, "layers_progress", ()):
            words = line.split()
            status, key = words[1], (words[2], words[-1])
            # Under xdist a worker that waited for another's build reports "cached" and may be
            # heard first; the build itself is still worth its line.
            seen = self.state.seen_progress.get(key)
            if seen is None or (seen == "cached" and status != "cached"):
                self.state.seen_progress[key] = status
                lines.append(line)
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if not lines or tr is None or self.config.get_verbosity() < 0:
            return
        xdist = self.config.pluginmanager.hasplugin("dsession")
        if xdist and tr._tw.width_of_current_line:
            tr._tw.line()  # xdist writes result letters without tracking the line
        for line in lines:
            tr.write_line(line)
        if self.config.get_verbosity() == 0 and not xdist:
            # Put the file name back so the test's result letter does not dangle.
            tr.write_fspath_result(report.nodeid, "")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.state.snapshots and not self.state.snapshot_errors:
            return
        terminalreporter.write_sep("-", "layers snapshots")
        for nodeid, ref in self.state.snapshots:
            terminalreporter.write_line(f"{ref}  ({nodeid})")
        if self.state.snapshots:
            store = shlex.quote(str(self.state.store_path))
            terminalreporter.write_line(
                f"inspect with: pytest-layers --store {store} diff|shell|export 'snapshot:NODEID'"
            )
        for nodeid, error in self.state.snapshot_errors:
            terminalreporter.write_line(f"{nodeid}: {error}", red=True)
