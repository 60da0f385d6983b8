"""pytest glue for pytest-layers: options, markers, fixtures, report hooks, xdist wiring.

The glue decides and forwards; plain modules do the work. :class:`~pytest_layers.runtime.Runtime`
is the session's namespace, store, backend and scratch (opened in ``pytest_configure``, closed
in ``pytest_unconfigure``); :class:`~pytest_layers.lifecycle.TestRootfs` is one test's rootfs
from setup to teardown (the ``rootfs`` fixture and the report hook forward to it); the layer
fixtures (:mod:`pytest_layers.fixtures`) build through the session's
:class:`~pytest_layers.build.LayerSession`.
"""

from __future__ import annotations

import functools
import os
import shlex
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_layers import _cinit, _settings, build, definitions, fixtures, hookspecs
from pytest_layers._fmt import human_size
from pytest_layers.backends.base import MountPolicy
from pytest_layers.backends.pool import DEFAULT_DEPTH
from pytest_layers.build import Layer, LayerDef, LayerSession, compose
from pytest_layers.errors import (
    LayerDefinitionError,
    LayersError,
)
from pytest_layers.fixtures import STATE as _STATE
from pytest_layers.fixtures import LayerBuildFailed as _LayerBuildFailed
from pytest_layers.fixtures import State as _State
from pytest_layers.fixtures import session_or_fail as _session_or_fail
from pytest_layers.fixtures import state as _state
from pytest_layers.lifecycle import KEEP_CHOICES, TestRootfs, pool_key
from pytest_layers.rootfs import Rootfs, check_init_path
from pytest_layers.runtime import Choice

__all__ = [
    "BACKEND_CHOICES",
    "KEEP_CHOICES",
    "LayerMarkerWarning",
]

BACKEND_CHOICES = ("auto", "overlay", "fuse", "copy")
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


def _mount_policy(flag: str) -> Callable[[str], MountPolicy]:
    def validate(value: str) -> MountPolicy:
        try:
            return MountPolicy.parse(value)
        except ValueError as exc:
            raise pytest.UsageError(
                f"{flag}: invalid value {value!r}: {exc} (default: nosuid,nodev)"
            ) from None

    return validate


def _keep_count(flag: str, value: object) -> int:
    try:
        count = int(str(value))
    except ValueError:
        count = 0
    if count < 1:
        raise pytest.UsageError(
            f"{flag}: invalid value {str(value)!r}; give a whole number of snapshots to keep per "
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
        "--layers-store-shared",
        default=None,
        metavar="GROUP",
        help="Share the layer store with the members of GROUP (setgid, group-writable); by "
        "default a store is its owner's alone (ini: layers_store_shared)",
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
    group.addoption(
        "--layers-mount-options",
        type=_mount_policy("--layers-mount-options"),
        default=None,
        metavar="OPTS",
        help="Mount views nosuid,nodev (default) or honour setuid bits and devices of images "
        "with suid,dev (only for images you trust)",
    )
    parser.addini("layers_backend", "Mount backend: auto, overlay, fuse or copy", default="auto")
    parser.addini(
        "layers_mount_options",
        "nosuid,nodev (default), or suid and/or dev to honour setuid bits and device nodes",
        default="nosuid,nodev",
    )
    parser.addini("layers_keep", "Snapshot policy: failed, always or never", default="failed")
    parser.addini(
        "layers_store",
        "Layer store directory, relative to the rootdir (default: <cache_dir>/layers)",
        default="",
    )
    parser.addini(
        "layers_store_shared",
        "Group whose members share the layer store (default: none, the store is yours alone)",
        default="",
    )
    parser.addini("layers_keep_count", "Snapshots kept per test", type="int", default=3)
    parser.addini("layers_verify", "Re-hash layers before use", type="bool", default=False)
    parser.addini(
        "layers_view_pool",
        "Views prepared ahead per image by a helper process and cleaned behind the test "
        "(default 2; 0: every view is made and removed in its test)",
        type="int",
        default=DEFAULT_DEPTH,
    )
    parser.addini(
        "layers_mount_namespace",
        "Where root mounts views: private (own mount namespace, default) or host",
        default="private",
    )
    parser.addini("layers_default", "Image of tests that use rootfs without a layer marker")
    group.addoption(
        "--layers-cache-from",
        action="append",
        default=None,
        metavar="docker://HOST/REPO",
        help="Remote build cache to pull layers from before building them (repeatable; the "
        "first hit wins)",
    )
    group.addoption(
        "--layers-cache-to",
        default=None,
        metavar="docker://HOST/REPO",
        help="Remote build cache to push the layers this session builds to",
    )
    group.addoption(
        "--layers-offline",
        action="store_true",
        default=False,
        help="Never use the network: no remote cache; registry images only from the store",
    )
    group.addoption(
        "--layers-registry-ca",
        default=None,
        metavar="PATH",
        help="Also trust this CA certificate file (PEM) for registries",
    )
    parser.addini(
        "layers_cache_from", "Remote build caches to pull from (docker://HOST/REPO)", "linelist"
    )
    parser.addini("layers_cache_to", "Remote build cache to push to (docker://HOST/REPO)")
    parser.addini(
        "layers_insecure_registries",
        "Registry hosts (HOST[:PORT]) reached over plain HTTP (loopback hosts always are)",
        "linelist",
    )
    from pytest_layers import datadir  # the datadir glue has its own module

    datadir.addini(parser)


# ---- session state -------------------------------------------------------------------------


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_ROOTFS = pytest.StashKey[TestRootfs]()
#: The parsed marker and the marker it was parsed from (``request.applymarker`` may add another).
_SPEC = pytest.StashKey[tuple[Any, "_Spec"]]()
_INDEX = pytest.StashKey[int]()
#: How many of the next tests the pool looks at to know which images are needed.
_WINDOW = 16


def _ini_choice(config: pytest.Config, name: str, choices: Sequence[str]) -> str:
    value = str(config.getini(name)).strip()
    if value not in choices:
        raise pytest.UsageError(
            f"ini option {name}: invalid value {value!r}; choose one of {', '.join(choices)}"
        )
    return value


def _raw_ini(config: pytest.Config, name: str) -> object:
    """The text of ini option ``name`` as written (``-o`` first), for an error message."""
    for override in config.getoption("override_ini", None) or ():
        key, _, value = str(override).partition("=")
        if key.strip() == name:
            return value
    return config.inicfg.get(name, "?") if hasattr(config, "inicfg") else "?"


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
    try:
        keep_count_value: object = config.getini("layers_keep_count")
    except (ValueError, TypeError, pytest.UsageError):  # let our message name option and fix
        keep_count_value = _raw_ini(config, "layers_keep_count")
    keep_count = _keep_count("ini option layers_keep_count", keep_count_value)
    try:
        pool_depth = int(config.getini("layers_view_pool"))
    except (ValueError, TypeError, pytest.UsageError):
        pool_depth = -1
    if not 0 <= pool_depth <= 16:
        raise pytest.UsageError(
            f"ini option layers_view_pool: {_raw_ini(config, 'layers_view_pool')!r} is not a "
            "number of views from 0 (off) to 16 (the default is 2)"
        )
    ns_mode = _ini_choice(config, "layers_mount_namespace", NAMESPACE_CHOICES)
    policy = config.getoption("layers_mount_options") or _mount_policy(
        "ini option layers_mount_options"
    )(str(config.getini("layers_mount_options")))
    verify = config.getoption("layers_verify")
    if verify is None:
        verify = bool(config.getini("layers_verify"))
    rootdir = Path(str(config.rootpath))
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    winfo = workerinput.get(_WORKER_KEY) if workerinput else None
    if winfo is not None:
        state = _State(
            store_path=Path(winfo["store"]),
            store_shared=winfo.get("store_shared"),
            rootdir=rootdir,
            keep=keep,
            keep_count=keep_count,
            pool_depth=pool_depth,
            verify=verify,
            rebuild_token=winfo["rebuild"],
            choice=Choice.from_dict(winfo),
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
            pool_depth=pool_depth,
            verify=verify,
            rebuild_token=uuid.uuid4().hex if config.getoption("layers_rebuild") else None,
            store_shared=config.getoption("layers_store_shared")
            or str(config.getini("layers_store_shared")).strip()
            or None,
        )
    state.policy = policy
    config.stash[_STATE] = state
    remote = _remote_settings(config)
    if winfo is not None and winfo.get("error"):
        state.error = LayersError(winfo["error"])
    else:
        try:
            _setup(config, state, backend_opt, ns_mode, worker=winfo is not None)
            _attach_remote(state, remote, probe=winfo is None)
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
    """Open the session's runtime: namespace, store, backend (the hook chooses), scratch."""
    from pytest_layers.runtime import Runtime

    if worker:
        # Workers inherit the controller's namespace and stay in it, with its choice.
        runtime = Runtime.join(
            state.store_path, state.choice, shared_group=state.store_shared, policy=state.policy
        )
    else:
        runtime = Runtime.enter(
            state.store_path,
            shared_group=state.store_shared,
            namespace=ns_mode,
            backend=backend_opt,
            policy=state.policy,
        )
    # Before the backend is chosen: the default choice (a hook implementation) tries it there.
    state.runtime = runtime
    state.session = runtime.start(
        state.rootdir,
        backend=backend_opt,
        choose=lambda candidates: config.hook.pytest_layers_choose_backend(
            config=config, candidates=candidates
        ),
        rebuild_token=state.rebuild_token,
        verify=state.verify,
        pool_depth=state.pool_depth,
    )
    state.choice = runtime.choice


def _remote_settings(config: pytest.Config) -> tuple[Any, list[Any], Any]:
    """(registry options, cache-from refs, cache-to ref), each value checked here so that a
    bad one is a usage error naming the option."""
    from pytest_layers import imageref
    from pytest_layers.registry import Options

    def parse(flag: str, value: str) -> Any:
        try:
            return imageref.parse_registry(value.strip(), tag_allowed=False)
        except LayersError as exc:
            raise pytest.UsageError(f"{flag}: {exc}") from None

    froms = config.getoption("layers_cache_from") or [
        str(x) for x in config.getini("layers_cache_from")
    ]
    sources = [parse("--layers-cache-from", v) for v in froms if v.strip()]
    to = config.getoption("layers_cache_to") or str(config.getini("layers_cache_to") or "")
    dest = parse("--layers-cache-to", to) if to.strip() else None
    ca = config.getoption("layers_registry_ca")
    if ca and not os.path.isfile(ca):
        raise pytest.UsageError(
            f"--layers-registry-ca: {ca!r} is not a file; give the PEM file of the CA that "
            "signed the registry's certificate"
        )
    opts = Options(
        ca_file=ca,
        insecure=tuple(str(x) for x in config.getini("layers_insecure_registries")),
        offline=bool(config.getoption("layers_offline")),
    )
    return opts, sources, dest


def _attach_remote(state: _State, remote: tuple[Any, list[Any], Any], *, probe: bool) -> None:
    from pytest_layers.registry import Options, RemoteCache

    opts, sources, dest = remote
    session = state.get_session()
    session.registry_options = opts
    if opts.offline or not (sources or dest):
        return
    # Shorter timeouts than a pull the user asked for: a slow cache must not hold a build up.
    cache_opts = Options(ca_file=opts.ca_file, insecure=opts.insecure, timeout=15.0)
    session.remote = RemoteCache(session.store, sources, dest, cache_opts, backend=session.backend)
    if probe:
        state.remote_lines = session.remote.probe()


@pytest.hookimpl(trylast=True)
def pytest_layers_choose_backend(config: pytest.Config, candidates: Sequence[str]) -> Any:
    """The default choice: the first candidate whose trial mount works."""
    runtime = _state(config).runtime
    assert runtime is not None  # called from Runtime.start, which the plugin set up
    return runtime.choose(candidates)


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
    if state is None or state.runtime is None:
        return
    runtime, state.runtime = state.runtime, None
    runtime.close()


def _why(state: _State, *, fix: bool) -> str:
    """`` (why faster backends were skipped[; fix: the most decisive fix])`` or ``""``."""
    why = state.choice.why
    if why and fix and state.choice.fix:
        # A fallback names its most decisive fix; `-v` and `pytest-layers doctor` give all.
        why += f"; fix: {state.choice.fix}"
    return f" ({why})" if why else ""


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(_STATE, None)
    if state is None:
        return []
    if state.error is not None:
        return [f"layers: unavailable: {state.error}"]
    store = state.get_session().store
    why = _why(state, fix=config.get_verbosity() <= 0)
    lines = [
        f"layers: backend={state.choice.label or state.choice.name}{why}, "
        f"store={state.store_path} ({store.access.describe()}, "
        f"{human_size(store.recorded_disk_use())} disk use)",
        *state.remote_lines,
        # Which init rootfs.run() uses (built here at first use), and why not the compiled one.
        f"layers: {_cinit.describe()}",
    ]
    if state.choice.reason and config.get_verbosity() > 0:
        lines.append(f"layers: why: {state.choice.reason}")
        lines.extend(f"layers: fix: {fix}" for fix in state.choice.fixes)
    return lines


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Wait for the remote cache's background pushes (tests are over: nothing waits on them
    but the exit) and say what they did."""
    state = session.config.stash.get(_STATE, None)
    # Tests are over (or interrupted): no view is needed any more.
    verbose = session.config.get_verbosity() > 0
    lines = _close_pool(state, verbose=verbose) if state is not None else []
    backend = state.session.backend if state is not None and state.session is not None else None
    reused = getattr(backend, "reused", None)
    discarded = getattr(backend, "discarded", 0)
    # With the view pool, the helpers reset the copies: the pool added their counts here (the
    # reset views tests took, and the resets each helper refused, sent when it ended).
    if verbose and isinstance(reused, int) and (reused or discarded):
        lines.append(f"layers: copy: {reused} copies reset and reused, {discarded} thrown away")
    remote = state.session.remote if state is not None and state.session is not None else None
    if remote is not None:
        lines += remote.finish()
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and lines and session.config.get_verbosity() >= 0:
        for line in lines:
            tr.write_line(line)


# ---- the marker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    names: tuple[str, ...]
    init: Mapping[str, str | bytes]
    keep: str | None
    readonly: bool
    #: The definitions the names mean for this test (scoped as fixtures), top of each image.
    defs: tuple[LayerDef, ...] = ()
    #: Their qualified names (``a/conftest.py::base``): the image's identity across processes.
    keys: tuple[str, ...] = ()
    #: The view pool's key (``lifecycle.pool_key``), made once with the spec: each test's setup
    #: and the collection's plan both use it.
    pool_key: tuple[Any, ...] | None = None


class LayerMarkerWarning(pytest.PytestWarning):
    """A ``layer`` marker that has no effect: the test never asks for a ``rootfs``."""


def _default_source(config: pytest.Config) -> str:
    """Where ``layers_default`` was set, for messages: ``-o`` or the ini file's name."""
    for override in config.getoption("override_ini", None) or ():
        if str(override).split("=", 1)[0].strip() == "layers_default":
            return "-o layers_default"
    return config.inipath.name if config.inipath else "the ini file"


def _resolve(item: pytest.Item, arg: object, where: str) -> LayerDef:
    """The definition a marker argument (a name, or a ``@layer`` object) means for ``item``,
    its parents checked; raises a LayersError (about the marker: its message starts with
    ``where``)."""
    if isinstance(arg, str):
        defn, fixturedef = fixtures.resolve(arg, item, where=where)
    else:
        defn = definitions.lookup(arg, where=where)
        seen, fixturedef = fixtures.resolve(defn.name, item, where=where)
        if seen is not defn:
            raise LayerDefinitionError(
                f"{where}the layer object {defn.name} ({defn.where}) is not the {defn.name!r} "
                f"this test sees ({seen.where}); name it by its name, or define it where "
                "this test can see it"
            )
    fixtures.chain(defn, fixturedef, item)  # its errors name the layer, not the marker
    return defn


def _spec(names: Sequence[str], defs: Sequence[LayerDef], item: pytest.Item, **kw: Any) -> _Spec:
    root = item.config.rootpath
    keys = tuple(build.qualified_name(d, root) or d.name for d in defs)
    key = pool_key(keys, kw["readonly"], kw["init"])
    return _Spec(tuple(names), defs=tuple(defs), keys=keys, pool_key=key, **kw)


def _marker_spec(item: pytest.Item) -> _Spec:
    """The validated ``layer`` marker of ``item`` (closest wins); raises a LayersError
    (LayerDefinitionError, or LayerNotFoundError for an unknown name)."""
    marker = item.get_closest_marker("layer")
    where = "@pytest.mark.layer: "
    if marker is None:
        default = str(item.config.getini("layers_default") or "").strip()
        defaults = tuple(default.split()) if default else ()
        source = f"layers_default = {default} in {_default_source(item.config)}: "
        found = [_resolve(item, name, source) for name in defaults]
        return _spec(defaults, found, item, init={}, keep=None, readonly=False)
    unknown = sorted(set(marker.kwargs) - set(_MARKER_KWARGS))
    if unknown:
        raise LayerDefinitionError(
            f"{where}unknown argument(s) {', '.join(unknown)}; it takes layer names and "
            f"{', '.join(_MARKER_KWARGS)}"
        )
    if not marker.args:
        raise LayerDefinitionError(f"{where}give at least one layer name")
    defs = [_resolve(item, arg, where) for arg in marker.args]
    names = [defn.name for defn in defs]
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
    return _spec(names, defs, item, init=dict(init), keep=keep, readonly=readonly)


_MARKER_ERROR = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Collector, name: str, obj: object
) -> Generator[None, Any, Any]:
    """Check every test's ``layer`` marker (and ``layers_default``) as it is collected.

    A problem is kept on the item and reported as that test's error at setup (see
    :func:`pytest_runtest_setup`), so a test that ``-k`` or ``-m`` deselects costs nothing and
    one bad marker does not stop the other tests. A marker on a test that never asks for a
    ``rootfs`` has no effect: it is still checked (a typo is an error) and warned about.
    """
    result = yield
    items: list[object] = result if isinstance(result, list) else [result]
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        uses_rootfs = "rootfs" in item.fixturenames
        own = any(m.name == "layer" for m in item.own_markers)
        if not uses_rootfs and item.get_closest_marker("layer") is None:
            continue
        try:
            # Parsed once per item: the rootfs fixture and the view pool's plan reuse it.
            item.stash[_SPEC] = (item.get_closest_marker("layer"), _marker_spec(item))
        except LayersError as exc:
            item.stash[_MARKER_ERROR] = str(exc)
        if own and not uses_rootfs:
            item.warn(
                LayerMarkerWarning(
                    f"{item.nodeid}: @pytest.mark.layer has no effect: the test does not use "
                    "the rootfs fixture (add a `rootfs` argument, or remove the marker)"
                )
            )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    """After every other plugin reordered or deselected (``-p randomly``, ``-k``): the pool
    key of each item in run order, so the pool prepares what the next tests use. Under xdist
    each worker sees the whole collection and runs its share of it in this order."""
    result = yield
    state = config.stash.get(_STATE, None)
    if state is None:
        return result
    hooked = bool(config.hook.pytest_layers_init.get_hookimpls())
    state.plan = []
    for i, item in enumerate(items):
        item.stash[_INDEX] = i
        spec = item.stash.get(_SPEC, (None, None))[1]
        uses = spec is not None and "rootfs" in getattr(item, "fixturenames", ())
        state.plan.append(spec.pool_key if uses and not hooked and spec else None)
    return result


def _pool(state: _State) -> Any:
    """The session's view pool, or None where views are made in the test's setup."""
    return state.runtime.pool(state.plan, _WINDOW) if state.runtime is not None else None


def _expect(state: _State, pool: Any, item: pytest.Item) -> None:
    # The pool follows state.plan itself (ViewPool.follow): one step per test, not a scan.
    index = item.stash.get(_INDEX, None)
    if index is not None:
        pool.at(index)


def _close_pool(state: _State, *, verbose: bool = False) -> list[str]:
    """Drain the pool; with ``-v``, how many views were ready when a test asked."""
    pool = state.runtime.close_pool() if state.runtime is not None else None
    if pool is None or not verbose:
        return []
    served = pool.hits + pool.misses
    return [
        f"layers: view pool: {served} views served by helpers, {pool.hits} of them ready "
        f"when the test asked, {pool.declined} made in the test"
    ]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A bad ``layer`` marker found at collection: this test errors, the others run."""
    problem = item.stash.get(_MARKER_ERROR, None)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


# ---- the rootfs fixture and snapshots ------------------------------------------------------

#: The items whose run protocol is under way, innermost last. The ``rootfs`` fixture takes its
#: test from here instead of asking for ``request``: pytest builds a request argument for every
#: fixture that names it, a cost paid by every test. A stack, not one slot: an in-process
#: session (pytester's ``runpytest``) runs its items inside the outer test's protocol.
_RUNNING: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    _RUNNING.append(item)
    try:
        return (yield)
    finally:
        _RUNNING.pop()


def _running_item() -> pytest.Item:
    __tracebackhide__ = True
    if not _RUNNING:
        pytest.fail(
            "the rootfs fixture was set up outside a test's run (no pytest_runtest_protocol "
            "is under way): request it from a test or a function-scoped fixture, and run "
            "tests through pytest's pytest_runtest_protocol hook",
            pytrace=False,
        )
    return _RUNNING[-1]


@pytest.fixture
def rootfs() -> Iterator[Rootfs]:
    """A private, writable view of the test's image (``@pytest.mark.layer``).

    Writes go to a throw-away layer; ``rootfs.diff()`` lists them, ``rootfs.commit()`` keeps
    them. With ``--layers-keep=failed`` (the default) a failing test's writes are kept as a
    snapshot (``pytest-layers diff snapshot:<nodeid>``).
    """
    item = _running_item()
    state = _state(item.config)
    spec = _item_spec(item)
    session = _session_or_fail(state)
    image = _image(item, state, session, spec)
    hooked = bool(item.config.hook.pytest_layers_init.get_hookimpls())
    init = _init_files(item, spec) if hooked else dict(spec.init)
    pool = _pool(state)
    life = TestRootfs(
        session,
        image,
        test=item.nodeid,
        keep=spec.keep or state.keep,
        keep_count=state.keep_count,
        init=init,
        readonly=spec.readonly,
        pool=pool,
        # The key from the spec in hand: the plan only predicts (a test may applymarker).
        key=spec.pool_key if pool is not None and not hooked else None,
        caught=_CAUGHT,
    )
    fs = life.open(expect=lambda pool: _expect(state, pool, item))
    item.stash[_ROOTFS] = life
    try:
        yield fs
        if not life.decided:
            # No call phase (setup failed after this fixture, or the test was skipped).
            reports = item.stash.get(_REPORTS, {})
            _ended(item, life, failed=any(r.failed for r in reports.values()))
    finally:
        life.close()


def _item_spec(item: pytest.Item) -> _Spec:
    """The test's parsed marker: from collection, parsed again only when the closest marker
    changed since (``request.applymarker``)."""
    __tracebackhide__ = True
    message = ""
    marker, spec = item.stash.get(_SPEC, (None, None))
    if spec is None or item.get_closest_marker("layer") is not marker:
        try:
            spec = _marker_spec(item)
        except LayersError as exc:
            message = str(exc)
    if message:  # outside the except block: one line, no chained traceback
        pytest.fail(message, pytrace=False)
    assert spec is not None
    return spec


def _image(item: pytest.Item, state: _State, session: LayerSession, spec: _Spec) -> list[Layer]:
    """The layers of the marker's names, stacked (the leftmost on top): looked up once per
    image and session (the layer fixtures are session-scoped), leased and, with
    ``--layers-verify``, re-hashed then."""
    __tracebackhide__ = True
    if not spec.names:
        pytest.fail(
            "the test uses the rootfs fixture but names no image: add "
            '@pytest.mark.layer("<layer name>") to the test (or its class or module), or set '
            f"layers_default in the ini file; known layers: "
            f"{', '.join(fixtures.visible_layers(item)) or '(none)'}",
            pytrace=False,
        )
    image = state.images.get(spec.keys)
    if image is not None:
        return image
    failed: _LayerBuildFailed | None = None
    try:
        request = _request(item)
        tops = [request.getfixturevalue(name) for name in spec.names]
    except _LayerBuildFailed as exc:
        failed = exc
    if failed is not None:
        if failed.first is None:
            failed.first = item.nodeid
            raise failed
        pytest.fail(
            f"layer {failed.layer!r} failed to build (see the first error, at {failed.first})",
            pytrace=False,
        )
    image = compose(tops)
    session.use(image)
    state.images[spec.keys] = image
    return image


def _request(item: pytest.Item) -> pytest.FixtureRequest:
    """The item's own fixture request, for the layer fixtures (once per image and session).
    pytest keeps it on the item: ``_request`` on a test function, ``fixture_request`` on a
    doctest."""
    __tracebackhide__ = True
    for name in ("_request", "fixture_request"):
        request = getattr(item, name, None)
        if isinstance(request, pytest.FixtureRequest):
            return request
    pytest.fail(
        f"{item.nodeid}: the rootfs fixture needs a pytest test function (or doctest) to look "
        f"up its layers; {type(item).__name__} items have no fixture request",
        pytrace=False,
    )


def _init_files(item: pytest.Item, spec: _Spec) -> dict[str, str | bytes]:
    """The init layer's files: every ``pytest_layers_init`` hook's, then the marker's."""
    init: dict[str, str | bytes] = {}
    for extra in item.config.hook.pytest_layers_init(item=item):
        if extra:
            init.update(extra)
    init.update(spec.init)
    return init


def _ended(item: pytest.Item, life: TestRootfs, *, failed: bool) -> None:
    """The test's outcome is known: its lifecycle keeps the snapshot (runs inside
    pytest_runtest_makereport, where anything escaping would end the session with
    INTERNALERROR: the lifecycle turns every failure into a line on the report)."""
    life.ended(failed=failed, committed=functools.partial(_committed, item))


def _committed(item: pytest.Item, ref: str, lay: Layer) -> None:
    item.config.hook.pytest_layers_snapshot_committed(item=item, ref=ref, layer=lay)


#: What a snapshot failure may raise and still be reported on the test: any error, and
#: pytest.fail()/skip() called from a hook (BaseExceptions); never KeyboardInterrupt or exit.
_CAUGHT = (Exception, pytest.fail.Exception, pytest.skip.Exception)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    state = item.config.stash.get(_STATE, None)
    if state is None:
        return report
    life = item.stash.get(_ROOTFS, None)
    if life is not None and report.when == "call":
        _ended(item, life, failed=report.failed)
    if life is not None and report.when in ("call", "teardown"):
        section, ref = life.section(state.store_path)
        if section is not None:
            report.sections.append(("layers snapshot", section))
            report.layers_snapshot = ref  # type: ignore[attr-defined]  # travels through xdist
        if life.error is not None:
            report.sections.append(("layers snapshot", life.error))
            # Also for the terminal summary: a passing test's sections are not shown.
            report.layers_snapshot_error = life.error  # type: ignore[attr-defined]
            life.error = None
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
    """Collects progress lines and snapshot refs in the process that owns the terminal (the
    controller under xdist, whose workers send both along with their reports) and prints them
    in the terminal summary: written while tests run, they would break pytest's rows of
    result letters."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.state = _state(config)
        self.progress: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        ref = getattr(report, "layers_snapshot", None)
        if ref:
            self.state.snapshots.append((report.nodeid, ref))
        error = getattr(report, "layers_snapshot_error", None)
        if error:
            self.state.snapshot_errors.append((report.nodeid, error))
        for line in getattr(report, "layers_progress", ()):
            words = line.split()
            status, key = words[1], (words[2], words[-1])
            # Under xdist a worker that waited for another's build reports "cached" and may be
            # heard first; the build itself is still worth its line.
            seen = self.state.seen_progress.get(key)
            if seen is None:
                self.progress.append(line)
            elif seen == "cached" and status != "cached":
                self.progress[self.progress.index(_find(self.progress, key))] = line
            else:
                continue
            self.state.seen_progress[key] = status

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        state = self.state
        if self.config.get_verbosity() < 0:
            # Quiet CI logs still say which backend ran (the header is not shown with -q).
            if state.error is not None:
                tr.write_line(f"layers: unavailable: {state.error}")
            elif state.choice.name is not None:
                why = _why(state, fix=True)
                counts = [
                    f"{sum(1 for s in state.seen_progress.values() if s == st)} {st}"
                    for st in ("built", "imported", "cached")
                    if any(s == st for s in state.seen_progress.values())
                ]
                tail = f"; {', '.join(counts)}" if counts else ""
                tr.write_line(f"layers: backend={state.choice.label}{why}{tail}")
        elif self.progress:
            tr.write_sep("-", "layers")
            for line in self.progress:
                tr.write_line(line)
        if not state.snapshots and not state.snapshot_errors:
            return
        tr.write_sep("-", "layers snapshots")
        store = shlex.quote(str(state.store_path))
        for nodeid, ref in state.snapshots:
            # As pytest's -rA lines: what, which test, then a command to paste.
            tr.write_line(
                f"SNAPSHOT {nodeid} -> pytest-layers --store {store} diff {shlex.quote(ref)}"
            )
        for nodeid, error in state.snapshot_errors:
            tr.write_line(f"{nodeid}: {error}", red=True)


def _find(lines: list[str], key: tuple[str, str]) -> str:
    """The progress line of layer ``key`` (name, short chain id) among ``lines``."""
    return next(x for x in lines if (x.split()[2], x.split()[-1]) == key)
