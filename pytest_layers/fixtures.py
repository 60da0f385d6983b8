"""The pytest fixtures that ``@layer``, ``oci_image`` and ``layer_from_path`` make, the
per-process state they share with the plugin, and how a test finds a layer by name.

Glue: imports pytest and the engine (:mod:`pytest_layers.build`), never the other glue modules
(``definitions`` and ``plugin`` import this one). Names resolve as pytest resolves fixtures:
a layer defined in ``a/conftest.py`` is visible to the tests under ``a/``, a deeper conftest
overrides it for its own tests, a test module's layer is visible in that module. A layer's
``parent=`` name resolves where the layer is defined, and a test that would see another
layer under that name is an error (a session fixture has one value; it cannot follow the
override).
"""

from __future__ import annotations

import inspect
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# pytest.fail.Exception's class, importable for subclassing (pytest exposes only the attribute).
from _pytest.outcomes import Failed

from pytest_layers import build
from pytest_layers.backends.base import MountPolicy
from pytest_layers.build import Layer, LayerDef, LayerSession, qualified_name
from pytest_layers.errors import (
    LayerDefinitionError,
    LayerNotFoundError,
    LayersError,
    NoSpaceError,
)
from pytest_layers.runtime import Choice, Runtime

__all__ = [
    "State",
    "STATE",
    "state",
    "session_or_fail",
    "layer_fixture",
    "image_fixture",
    "path_fixture",
    "layer_value",
    "LayerBuildFailed",
    "made",
    "resolve",
    "chain",
    "visible_layers",
]

# The fixture functions this module made, by the definition's name, oldest first: the
# one record of every layer defined in this process (``definitions.registry`` reads it).
_MADE: dict[str, list[LayerDef]] = {}
_DEF_ATTR = "_pytest_layers_definition"


def _made(defn: LayerDef, func: Any) -> Any:
    setattr(func, _DEF_ATTR, defn)
    _MADE.setdefault(defn.name, []).append(defn)
    return pytest.fixture(scope="session", name=defn.name)(func)


def made() -> dict[str, list[LayerDef]]:
    """Every layer definition wrapped into a fixture so far, by name, oldest first."""
    return _MADE


# ---- session state -------------------------------------------------------------------------


@dataclass
class State:
    """Everything the plugin decided for this process, in ``config.stash``: the settings read
    from options and ini, and the :class:`~pytest_layers.runtime.Runtime` opened from them."""

    store_path: Path
    rootdir: Path
    keep: str
    keep_count: int
    verify: bool
    rebuild_token: str | None
    store_shared: str | None = None
    #: The backend chosen, why faster ones were skipped, the namespace (the controller's in a
    #: worker, even when its setup failed: the report still names them).
    choice: Choice = field(default_factory=Choice)
    runtime: Runtime | None = None
    error: BaseException | None = None
    session: LayerSession | None = None
    policy: MountPolicy = field(default_factory=MountPolicy)
    seen_progress: dict[tuple[str, str], str] = field(default_factory=dict)
    snapshots: list[tuple[str, str]] = field(default_factory=list)
    snapshot_errors: list[tuple[str, str]] = field(default_factory=list)
    remote_lines: list[str] = field(default_factory=list)
    #: Views prepared ahead per image (ini ``layers_view_pool``, set at configure); 0: none.
    pool_depth: int = 0
    #: The image of each marker's layers (by qualified names), looked up once per session.
    images: dict[tuple[str, ...], list[Layer]] = field(default_factory=dict)
    #: The pool key of every collected item, in run order (None: no rootfs or not pooled).
    plan: list[Any] = field(default_factory=list)

    def worker_info(self) -> dict[str, Any]:
        return {
            "store": str(self.store_path),
            "store_shared": self.store_shared,
            **self.choice.to_dict(),
            "rebuild": self.rebuild_token,
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


STATE = pytest.StashKey[State]()


def state(config: pytest.Config) -> State:
    try:
        return config.stash[STATE]
    except KeyError:
        raise LayersError("the pytest-layers plugin is not configured (-p no:layers?)") from None


# ---- the fixtures ----------------------------------------------------------------------------


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
        return layer_value(request, defn, kwargs)

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
    return _made(defn, func)


def session_or_fail(state: State) -> LayerSession:
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
        session = session_or_fail(state(request.config))
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
    return _made(defn, func)


def layer_value(request: pytest.FixtureRequest, defn: LayerDef, kwargs: dict[str, Any]) -> Layer:
    __tracebackhide__ = True
    session = session_or_fail(state(request.config))
    message = ""
    item = getattr(request, "_pyfuncitem", request.node)
    fixturedef = getattr(request, "_fixturedef", None)
    try:
        chain(defn, fixturedef, item)
    except LayersError as exc:
        message = f"layer {defn.name!r}: {exc}"
    if message:  # outside the except block: one line, no chained traceback
        pytest.fail(message, pytrace=False)
    parent: Layer | None = None
    if defn.parent is not None:
        # chain() checked that the test sees the parent the definition's scope names.
        parent = request.getfixturevalue(defn.parent)
        if not isinstance(parent, Layer):
            pytest.fail(
                f"layer {defn.name!r}: parent fixture {defn.parent!r} is not a @layer "
                f"(it gave {type(parent).__name__})",
                pytrace=False,
            )
    try:
        return session.get(defn, parent, kwargs)
    except LayersError as exc:
        # Ours name the layer and the fix (a missing inputs= path, a full disk, a whiteout
        # name left by the builder): one line, no plugin traceback.
        message = str(exc)
    except Exception as exc:
        message = builder_failure(defn, exc)
    # Outside the except block, so the report is this message, without chained tracebacks.
    raise LayerBuildFailed(defn.name, message)


class LayerBuildFailed(Failed):
    """A layer fixture's failure. pytest keeps a session fixture's error and raises it again
    for every test that asks for the layer; ``rootfs`` reports it in full for the first of
    them and as one line naming the layer for the rest (docs/reference/errors.md)."""

    # As pytest's own Failed: the short test summary says "Failed: <message>".
    __module__ = "builtins"
    __qualname__ = "Failed"

    def __init__(self, layer: str, message: str) -> None:
        super().__init__(message, pytrace=False)
        self.layer = layer
        self.first: str | None = None


def builder_failure(defn: LayerDef, exc: Exception) -> str:
    """What a builder's exception says: the layer, then the builder's own frames only (the
    plugin's and the store's frames above it are of no help to the builder's author)."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = build.__file__
    starts = [i for i, f in enumerate(frames) if f.filename == here and f.name == "_run_builder"]
    own = frames[starts[-1] + 1 :] if starts else frames
    lines = [f"layer {defn.name!r} ({defn.where}) failed to build: {type(exc).__name__}: {exc}"]
    if own:
        lines.append("Traceback (the builder's frames):")
        lines.extend(x.rstrip("\n") for x in traceback.format_list(own))
    lines.extend(x.rstrip("\n") for x in traceback.format_exception_only(type(exc), exc))
    return "\n".join(lines)


def path_fixture(defn: LayerDef) -> Any:
    """Wrap a :func:`~pytest_layers.layer_from_path` definition into a session fixture."""

    def layer_from_path_fixture(request: pytest.FixtureRequest) -> Layer:
        __tracebackhide__ = True
        return layer_value(request, defn, {})

    func: Any = layer_from_path_fixture
    func.__name__ = defn.name
    func.__qualname__ = defn.name
    func.__module__ = defn.defined_at[1] if defn.defined_at else __name__
    func.__doc__ = f"Layer {defn.name!r}: a copy of the directory {defn.source_dir}."
    return _made(defn, func)


# ---- names, scoped as fixtures ---------------------------------------------------------------


def _definition(fixturedef: Any) -> LayerDef | None:
    """The layer definition behind a pytest ``FixtureDef``, or None for another fixture."""
    return getattr(getattr(fixturedef, "func", None), _DEF_ATTR, None)


def _visible(name: str, node: pytest.Item | pytest.Collector) -> Any:
    """The ``FixtureDef`` that ``name`` means at ``node`` (pytest's own choice), or None.

    Two layers of that name registered at the same place (a module that defines one and
    imports another under any alias) are a :class:`LayerDefinitionError` naming both: pytest
    would silently take the later."""
    # pytest has no public handle on its fixture manager; getfixturedefs(name, node) is the
    # lookup pytest itself makes for a test (pytest >= 8.1).
    defs = node.session._fixturemanager.getfixturedefs(name, node)
    if not defs:
        return None
    if len(defs) > 1:
        last, before = defs[-1], defs[-2]
        same_place = (last.baseid, getattr(last, "node", None)) == (
            before.baseid,
            getattr(before, "node", None),
        )
        a, b = _definition(before), _definition(last)
        if same_place and a is not None and b is not None and a is not b:
            raise LayerDefinitionError(
                f"layer {name!r} is defined twice in one scope: {a.where} and {b.where}; "
                "rename one (a module's fixtures, imported ones included, have one name each)"
            )
    return defs[-1]


def _home(fixturedef: Any, item: pytest.Item) -> Any:
    """The node that defines ``fixturedef`` (its conftest's directory, its module, the
    session for a plugin): where its ``parent=`` name is looked up."""
    node = getattr(fixturedef, "node", None)
    if node is not None:
        return node
    found: Any = item.session
    for candidate in item.listchain():
        if candidate.nodeid == getattr(fixturedef, "baseid", None):
            found = candidate
    return found


def _relative(path: str, rootdir: Path) -> str:
    try:
        return os.path.relpath(path, rootdir) if os.path.isabs(path) else path
    except ValueError:
        return path


def _label(defn: LayerDef, rootdir: Path) -> str:
    return qualified_name(defn, rootdir) or defn.name


def visible_layers(item: pytest.Item) -> list[str]:
    """The layer names a test can use (each name's definition visible from it), sorted."""
    return sorted(name for name in _MADE if _definition(_visible(name, item)) is not None)


def resolve(name: str, item: pytest.Item, *, where: str = "") -> tuple[LayerDef, Any]:
    """The layer definition (and its ``FixtureDef``) that ``name`` means for ``item``.

    An unknown name raises :class:`~pytest_layers.errors.LayerNotFoundError` (a
    ``LookupError``) naming the layers the test can see and, when the name is defined
    elsewhere, where; a fixture that is not a layer raises
    :class:`~pytest_layers.errors.LayerDefinitionError`.
    """
    fixturedef = _visible(name, item)
    if fixturedef is None:
        rootdir = item.config.rootpath
        elsewhere = [_relative(d.file, rootdir) for d in _MADE.get(name, ())]
        test = _relative(str(item.path), rootdir)
        hint = (
            f"it is defined in {', '.join(sorted(set(elsewhere)))}, which is not visible "
            f"from {test}: a conftest.py's layers serve the tests in its directory and below, "
            "a test module's only that module"
            if elsewhere
            else "define it with @layer in a conftest.py or in the test module"
        )
        raise LayerNotFoundError(name, known=visible_layers(item), hint=hint, where=where)
    defn = _definition(fixturedef)
    if defn is None:
        raise LayerDefinitionError(
            f"{where}{name!r} is a fixture, not a layer (define it with @layer, oci_image or "
            "layer_from_path)"
        )
    return defn, fixturedef


def chain(defn: LayerDef, fixturedef: Any, item: pytest.Item) -> list[LayerDef]:
    """``defn`` and its ancestors, bottom first, as the test ``item`` gets them.

    Each ``parent=`` name, and each builder argument that names a layer, is resolved where
    the layer is defined; the test must see the same layer under that name (else a
    :class:`LayerDefinitionError` says how to fix it). Raises for an unknown parent and for a
    parent cycle.
    """
    rootdir = item.config.rootpath
    out: list[LayerDef] = []
    seen: list[LayerDef] = []
    while True:
        if defn in seen:
            cycle = " -> ".join(d.name for d in [*seen[seen.index(defn) :], defn])
            raise LayerDefinitionError(
                f"layer parent cycle: {cycle}; a layer cannot be its own ancestor "
                f"(check parent= of {defn.name!r} at {defn.where})"
            )
        seen.append(defn)
        out.append(defn)
        home = _home(fixturedef, item) if fixturedef is not None else item
        for arg in defn.extra_args:
            there = _definition(_visible(arg, home))
            if there is not None:
                _same(defn, arg, there, item, "uses")
        if defn.parent is None:
            break
        parent_fd = _visible(defn.parent, home)
        parent = _definition(parent_fd)
        if parent is None:
            raise LayerDefinitionError(
                f"layer {defn.name!r} ({defn.where}) has unknown parent {defn.parent!r}; "
                f"known layers: {', '.join(visible_layers(item)) or '(none)'}"
            )
        if defn.parent_def is not None and parent is not defn.parent_def:
            raise LayerDefinitionError(
                f"layer {defn.name!r} ({defn.where}) names its parent by the object "
                f"{_label(defn.parent_def, rootdir)}, but where it is defined "
                f"{defn.parent!r} is {_label(parent, rootdir)}; import the parent under its own "
                'name there, or name it parent="NAME"'
            )
        _same(defn, defn.parent, parent, item, "is built on")
        defn, fixturedef = parent, parent_fd
    out.reverse()
    return out


def _same(defn: LayerDef, name: str, there: LayerDef, item: pytest.Item, verb: str) -> None:
    """The test sees ``there`` under ``name``, as ``defn``'s own scope does; else an error."""
    here = _definition(_visible(name, item))
    if here is None or here is there:
        return
    rootdir = item.config.rootpath
    raise LayerDefinitionError(
        f"layer {defn.name!r} ({defn.where}) {verb} {_label(there, rootdir)}, but from "
        f"{item.nodeid} {name!r} names {_label(here, rootdir)}: a layer has one value per "
        f"session, so it cannot follow that override; define {defn.name!r} in "
        f"{_relative(here.file, rootdir)} too, or give the two {name!r} layers different names"
    )
