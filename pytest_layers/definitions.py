"""``@layer``, ``oci_image`` and ``layer_from_path``: the definitions of a session's layers.

Glue: a definition is recorded as a :class:`~pytest_layers.build.LayerDef` (engine) and wrapped
into a session-scoped pytest fixture by :mod:`pytest_layers.fixtures`. Names are scoped as
pytest scopes fixtures (a conftest's layer is visible below its directory, a test module's in
that module); :mod:`pytest_layers.fixtures` resolves them for a test. This module only keeps
what a definition needs without a test at hand: the definition behind an object (``parent=``
given as a ``@layer`` function) and the check that one scope defines a name once.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, TypeVar, overload

from pytest_layers import fixtures
from pytest_layers.build import (  # noqa: F401  (re-exported: the names this module had)
    ImageSource,
    Layer,
    LayerDef,
    LayerSession,
    Progress,
    build_key,
    compose,
)
from pytest_layers.errors import LayerDefinitionError, LayerNotFoundError

__all__ = [
    "layer",
    "oci_image",
    "layer_from_path",
    "source_def",
    "registry",
    "definitions_named",
    "lookup",
    "definition_of",
]

F = TypeVar("F", bound=Callable[..., Any])


# Objects that stand for a definition (the builder, the fixture the decorator returned),
# keyed by id; the definition keeps them alive, so an id is never reused while registered.
_BY_OBJECT: dict[int, LayerDef] = {}
# (id of the defining module's globals, enclosing class path, name) -> the definition and
# those globals, kept alive so that the id is not reused: one scope defines a name once.
_SCOPES: dict[tuple[int, str, str], tuple[LayerDef, dict[str, Any]]] = {}


def registry() -> Mapping[str, LayerDef]:
    """Every layer name defined so far, each with its latest definition. A name may have
    several definitions (one per directory); :func:`definitions_named` gives them all, and a
    test gets the one pytest's fixture scoping gives it."""
    return {name: defs[-1] for name, defs in fixtures.made().items()}


def definitions_named(name: str) -> list[LayerDef]:
    """Every definition of ``name`` so far, oldest first."""
    return list(fixtures.made().get(name, ()))


def definition_of(obj: object) -> LayerDef | None:
    """The definition behind a ``@layer`` function, fixture or ``LayerDef``, else None."""
    if isinstance(obj, LayerDef):
        return obj
    return _BY_OBJECT.get(id(obj))


def lookup(ref: object, *, where: str = "") -> LayerDef:
    """The definition named by ``ref`` (a ``@layer`` function, a ``LayerDef``, or a name:
    then its latest definition; a test resolves names by scope instead, see
    :func:`pytest_layers.fixtures.resolve`). An unknown name raises
    :class:`~pytest_layers.errors.LayerNotFoundError` (a ``LookupError``)."""
    defn = definition_of(ref)
    if defn is not None:
        return defn
    if isinstance(ref, str):
        defs = fixtures.made().get(ref)
        if defs:
            return defs[-1]
        raise LayerNotFoundError(
            ref,
            known=list(fixtures.made()),
            hint="define it with @layer in a conftest.py or in the test module",
            where=where,
        )
    raise LayerDefinitionError(
        f"{where}expected a layer name or a @layer function, got {type(ref).__name__} {ref!r}"
    )


@overload
def layer(func: F, /) -> F: ...


@overload
def layer(
    func: None = None,
    /,
    *,
    name: str | None = None,
    parent: object = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    version: object = None,
) -> Callable[[F], F]: ...


def layer(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    parent: object = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    version: object = None,
) -> Any:
    """Turn a builder function into a session-scoped fixture whose value is a :class:`Layer`.

    The builder gets ``root``, a writable view of the parent image (an empty directory for a
    base layer), as its first argument; further arguments are session-scoped fixtures. It runs
    once per build-cache key (parent chain_id, the builder's source, name and defining file,
    the content of ``inputs`` relative to the rootdir, ``version``), across sessions and xdist
    workers. ``parent`` is a ``@layer`` function or a layer name, resolved where this layer is
    defined, as pytest resolves fixture names; the name is scoped the same way.
    """
    if isinstance(inputs, (str, os.PathLike)):
        raise LayerDefinitionError(
            f"@layer(inputs=...) takes a list of paths, not the single path {inputs!r}; "
            f"write inputs=[{os.fspath(inputs)!r}]"
        )

    def decorate(builder: Callable[..., Any]) -> Any:
        if not callable(builder) or inspect.isclass(builder):
            raise LayerDefinitionError(f"@layer decorates a function, not {builder!r}")
        defn = _make_def(builder, name, parent, inputs, version)
        outer = builder.__qualname__.rpartition(".")[0]
        # A builder defined inside a function is in no fixture scope: nothing to clash with.
        scope = None if "<locals>" in outer else (builder.__globals__, outer)
        return _register(defn, fixtures.layer_fixture, scope, builder)

    if func is not None:
        return decorate(func)
    return decorate


def _make_def(
    builder: Callable[..., Any],
    name: str | None,
    parent: object,
    inputs: Sequence[str | os.PathLike[str]],
    version: object,
) -> LayerDef:
    fname = name if name is not None else builder.__name__
    if not isinstance(fname, str) or not fname.isidentifier():
        raise LayerDefinitionError(
            f"@layer(name={fname!r}) for {builder.__qualname__}: a layer name must be a Python "
            "identifier (it is also the fixture's name)"
        )
    params = list(inspect.signature(builder).parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise LayerDefinitionError(
            f"layer builder {builder.__qualname__} must take the layer's root directory as "
            f"its first argument: def {builder.__name__}(root): ..."
        )
    extra: list[str] = []
    for p in params[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise LayerDefinitionError(
                f"layer builder {builder.__qualname__}: *args/**kwargs cannot name fixtures"
            )
        extra.append(p.name)
    parent_name: str | None
    pdef: LayerDef | None = None
    if parent is None:
        parent_name = None
    elif isinstance(parent, str):
        parent_name = parent
    else:
        pdef = definition_of(parent)
        if pdef is None:
            raise LayerDefinitionError(
                f"@layer(parent={parent!r}) for {fname!r}: parent must be a @layer function "
                "or a layer name"
            )
        parent_name = pdef.name
    if parent_name == fname:
        raise LayerDefinitionError(f"layer parent cycle: {fname} -> {fname}")
    clean_inputs: list[str] = []
    for inp in inputs:
        if not isinstance(inp, (str, os.PathLike)):
            raise LayerDefinitionError(f"@layer(inputs=...) for {fname!r}: {inp!r} is not a path")
        text = os.fspath(inp)
        if os.path.isabs(text) or ".." in PurePosixPath(text).parts:
            raise LayerDefinitionError(
                f"@layer(inputs=...) for {fname!r}: {text!r} must be relative to the rootdir "
                "and stay inside it"
            )
        clean_inputs.append(text)
    if version is not None and not isinstance(version, (str, int)):
        raise LayerDefinitionError(
            f"@layer(version=...) for {fname!r}: expected a str or int, got {version!r}"
        )
    return LayerDef(
        name=fname,
        builder=builder,
        parent=parent_name,
        inputs=tuple(clean_inputs),
        version=None if version is None else str(version),
        extra_args=tuple(extra),
        parent_def=pdef,
    )


def oci_image(name: str, path: str | os.PathLike[str], ref: str | None = None) -> Any:
    """Define a session-scoped fixture ``name`` whose value is the :class:`Layer` on top of a
    real image: an OCI image layout (a directory or a tar), a ``docker save`` archive, or an
    image in a registry.

    ``path`` is an image reference: ``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` (pulled
    once per store by manifest digest; needs ``pytest-layers[registry]``), ``oci:DIR[:TAG]``,
    ``docker-archive:PATH``, or a bare path; a path is absolute or relative to the rootdir.
    ``ref`` picks an image by tag when the file holds several. Use it like a ``@layer``: as
    the ``parent=`` of a ``@layer`` (the returned object or its name) and in
    ``@pytest.mark.layer(name)``. The image is imported into the store once (every DiffID
    checked, layers applied with the secure applier), keyed by its manifest digest and
    ``ref``; later sessions and other xdist workers reuse it.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise LayerDefinitionError(
            f"oci_image({name!r}, ...): the name must be a Python identifier (it is also the "
            "fixture's name)"
        )
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise LayerDefinitionError(
            f"oci_image({name!r}, {path!r}): path must be the path of an OCI layout (directory "
            "or tar) or of a docker-archive tar, or a reference such as docker://HOST/REPO:TAG"
        )
    from pytest_layers import imageref

    imageref.parse(os.fspath(path))  # a malformed reference fails here, at definition time
    if ref is not None and not isinstance(ref, str):
        raise LayerDefinitionError(f"oci_image({name!r}, ...): ref must be a str tag, not {ref!r}")
    caller = sys._getframe(1)
    source = ImageSource(
        path=os.fspath(path),
        ref=ref,
        where=f"{caller.f_code.co_filename}:{caller.f_lineno}",
        module=str(caller.f_globals.get("__name__", "?")),
    )
    defn = LayerDef(
        name=name,
        builder=None,
        parent=None,
        inputs=(),
        version=None,
        extra_args=(),
        image=source,
    )
    return _register(defn, fixtures.image_fixture, _caller_scope(caller))


def _caller_scope(frame: Any) -> tuple[dict[str, Any], str] | None:
    """The scope an ``oci_image()``/``layer_from_path()`` call defines its name in: the
    calling module, and the class whose body makes the call (``""`` at module level); None
    inside a function, which is no fixture scope."""
    code = frame.f_code
    if code.co_flags & inspect.CO_OPTIMIZED:
        return None
    return frame.f_globals, "" if code.co_name == "<module>" else code.co_name


def _register(
    defn: LayerDef,
    make: Callable[[LayerDef], Any],
    scope: tuple[dict[str, Any], str] | None,
    *also: object,
) -> Any:
    """Make the session fixture of ``defn`` with ``make``, findable by the fixture object and
    by ``also`` (the builder of an ``@layer``); returns the fixture.

    ``scope`` is the defining module's globals and class path. pytest would let the later of
    two same-named fixtures of one module win silently; for layers that is an error naming
    both places, raised while the module is imported (at collection). A module imported
    again (new globals) defines its names afresh.
    """
    key = (id(scope[0]), scope[1], defn.name) if scope is not None else None
    earlier = _SCOPES.get(key) if key is not None else None
    if earlier is not None and earlier[0].where != defn.where:
        raise LayerDefinitionError(
            f"layer {defn.name!r} is defined twice in one scope: {earlier[0].where} and "
            f"{defn.where}; rename one (names are fixture names: one per module, as pytest "
            "would silently keep the last)"
        )
    fixture = make(defn)
    if key is not None and scope is not None:
        _SCOPES[key] = (defn, scope[0])
    defn.fixture = fixture
    for obj in (*also, fixture):
        _BY_OBJECT[id(obj)] = defn
    return fixture


def layer_from_path(
    name: str,
    path: str | os.PathLike[str],
    *,
    parent: object = None,
    version: object = None,
) -> Any:
    """Define a session-scoped fixture ``name`` whose value is a :class:`Layer` holding a copy
    of the directory ``path`` (relative to the rootdir): test data kept in the repository.

    The directory's content (names, types, modes, bytes, symlink targets and mtimes) is the
    layer's build-cache key, so the layer is rebuilt only when the directory changes. Files keep
    their mtimes, as ``shutil.copy2`` would. With ``parent`` (a ``@layer`` function or a layer
    name) the directory is copied on top of the parent's tree. Use it like a ``@layer``: as a
    ``parent=`` and in ``@pytest.mark.layer(name)``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise LayerDefinitionError(
            f"layer_from_path({name!r}, ...): the name must be a Python identifier (it is also "
            "the fixture's name)"
        )
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise LayerDefinitionError(
            f"layer_from_path({name!r}, {path!r}): path must be a directory relative to the rootdir"
        )
    text = os.fspath(path)
    if os.path.isabs(text) or ".." in PurePosixPath(text).parts:
        raise LayerDefinitionError(
            f"layer_from_path({name!r}, {text!r}): the path must be relative to the rootdir and "
            "stay inside it (the layer's content belongs to the repository)"
        )
    caller = sys._getframe(1)
    defn = source_def(
        name,
        text,
        parent=parent,
        version=version,
        where=f"{caller.f_code.co_filename}:{caller.f_lineno}",
        module=str(caller.f_globals.get("__name__", "?")),
    )
    return _register(defn, fixtures.path_fixture, _caller_scope(caller))


def source_def(
    name: str,
    path: str,
    *,
    parent: object = None,
    version: object = None,
    where: str,
    module: str,
) -> LayerDef:
    """The definition of a layer copied from the directory ``path`` (see
    :func:`layer_from_path`), not registered: the datadir fixtures make such layers per
    directory without naming them in ``@pytest.mark.layer``."""
    parent_name: str | None = None
    pdef: LayerDef | None = None
    if isinstance(parent, str):
        parent_name = parent
    elif parent is not None:
        pdef = definition_of(parent)
        if pdef is None:
            raise LayerDefinitionError(
                f"layer_from_path({name!r}, parent={parent!r}): parent must be a @layer "
                "function or a layer name"
            )
        parent_name = pdef.name
    if parent_name == name:
        raise LayerDefinitionError(f"layer parent cycle: {name} -> {name}")
    if version is not None and not isinstance(version, (str, int)):
        raise LayerDefinitionError(
            f"layer_from_path({name!r}, version=...): expected a str or int, got {version!r}"
        )
    return LayerDef(
        name=name,
        builder=None,
        parent=parent_name,
        inputs=(path,),
        version=None if version is None else str(version),
        extra_args=(),
        source_dir=path,
        defined_at=(where, module),
        parent_def=pdef,
    )
