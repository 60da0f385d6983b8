"""Griffe extension: render the reST roles used in our docstrings as Markdown code.

The package's docstrings follow the Python convention of ``:class:`X``` and ``double backticks``
(readable in ``help()``), while mkdocstrings renders Markdown. Rewriting the roles here keeps the
source docstrings idiomatic and the rendered reference free of stray ``:class:`` prefixes.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|mod|data|obj|const):`~?([^`]+)`")
_DOUBLE = re.compile(r"``([^`]+)``")


def _clean(text: str) -> str:
    def role(m: re.Match[str]) -> str:
        target = m.group(1)
        if m.group(0).split("`", 1)[1].startswith("~"):
            target = target.rsplit(".", 1)[-1]
        return f"`{target}`"

    return _DOUBLE.sub(r"`\1`", _ROLE.sub(role, text))


class RstRoles(griffe.Extension):
    """Rewrite reST roles and double backticks in every docstring to Markdown code spans."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _clean(obj.docstring.value)
