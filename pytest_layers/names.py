"""Layer names in the store: a bare name (``base``) and the qualified name of each definition
(``a/conftest.py::base``, the defining file relative to the rootdir). Two directories may each
define ``base``; then the bare name is ambiguous and only the qualified names name a layer.

Engine: reads a :class:`~pytest_layers.store.Store`, imports no pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_layers import errors

if TYPE_CHECKING:
    from pytest_layers.store import Store

__all__ = ["QUALIFIER", "definitions", "listed", "resolve"]

#: Between the defining file and the name: ``a/conftest.py::base``.
QUALIFIER = "::"


def definitions(names: dict[str, str], name: str) -> dict[str, str]:
    """The qualified names (-> chain id) recorded for the bare ``name``."""
    tail = QUALIFIER + name
    return {q: c for q, c in names.items() if q.endswith(tail) and q != tail}


def _ambiguous(names: dict[str, str], name: str) -> dict[str, str]:
    found = definitions(names, name)
    return found if len(set(found.values())) > 1 else {}


def listed(names: dict[str, str]) -> dict[str, str]:
    """The names ``ls`` shows: each bare name that names one layer, and the qualified names of
    the definitions whose bare name is ambiguous."""
    out: dict[str, str] = {}
    for ref, chain_id in names.items():
        bare = QUALIFIER not in ref
        name = ref if bare else ref.rpartition(QUALIFIER)[2]
        if bare != bool(_ambiguous(names, name)):
            out[ref] = chain_id
    return out


def resolve(store: Store, ref: str) -> str:
    """The chain id of ``ref`` as :meth:`Store.resolve` finds it, except that a bare layer name
    that several definitions built differently raises
    :class:`~pytest_layers.errors.AmbiguousRefError` listing their qualified names."""
    if QUALIFIER not in ref and ref.isidentifier():
        found = _ambiguous(store.names(), ref)
        if found:
            raise errors.AmbiguousRefError(
                ref,
                [f"{q} ({c[:19]})" for q, c in found.items()],
                hint="the name is defined in several files: give one as PATH::NAME, the "
                "defining file relative to the rootdir, as listed",
            )
    return store.resolve(ref)
