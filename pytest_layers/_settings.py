"""Where the default layer store lives, for the plugin and the CLI alike.

The plugin knows the rootdir and the ini values from pytest; the CLI runs without pytest, so it
finds the ini file the way pytest does (the nearest directory upward holding a pytest config)
and reads it with :mod:`configparser` or :mod:`tomllib`. Both then ask :func:`store_path`, so a
store a session wrote is the store ``pytest-layers`` opens.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import pwd
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CACHE_DIR", "IniFile", "find_ini", "store_path", "personal_store"]

#: pytest's own default for the ini option ``cache_dir``.
DEFAULT_CACHE_DIR = ".pytest_cache"

# As pytest searches them (pytest 9's order; older pytest knows a subset, all INI/TOML alike).
_CONFIG_NAMES = (
    "pytest.toml",
    ".pytest.toml",
    "pytest.ini",
    ".pytest.ini",
    "pyproject.toml",
    "tox.ini",
    "setup.cfg",
)


def store_path(rootdir: Path, *, layers_store: str | None, cache_dir: str | None) -> Path:
    """The store a session uses when ``--layers-store`` is not given.

    ``layers_store`` (ini), relative to the rootdir, when set; otherwise ``<cache_dir>/layers``
    with ``cache_dir`` resolved as pytest resolves it (``~`` and ``$VARS`` expanded, relative to
    the rootdir), ``.pytest_cache`` when unset. So ``-o cache_dir=/tmp/c`` puts the store in
    ``/tmp/c/layers``, next to pytest's own cache.

    Every uid gets a store of its own by default (docs/concepts/security.md): ``<cache_dir>/
    layers`` when it is yours or yours to create; when it belongs to another user (a ``sudo
    pytest`` in your checkout), ``<cache_dir>/layers-uid<N>``; when the cache directory itself
    is another user's (root running in a user's checkout, a user in root's), a store in your
    own cache, :func:`personal_store`, so that nobody leaves entries the other cannot remove.
    ``layers_store`` is used as given.
    """
    if layers_store:
        chosen = Path(layers_store)
        return chosen if chosen.is_absolute() else rootdir / chosen
    cache = os.path.expandvars(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    base = Path(cache)
    base = base if base.is_absolute() else rootdir / base
    for candidate in (base / "layers", base / f"layers-uid{os.geteuid()}"):
        if _yours_or_yours_to_create(candidate):
            return candidate
    return personal_store(base)


def _yours_or_yours_to_create(path: Path) -> bool:
    """Whether ``path`` is a directory of this uid, or absent with its nearest existing
    ancestor this uid's (or a sticky directory such as ``/tmp``, where entries are their
    creator's)."""
    me = os.geteuid()
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        if p == path:
            return st.st_uid == me
        return st.st_uid == me or bool(st.st_mode & stat.S_ISVTX)
    return False


def personal_store(cache: Path) -> Path:
    """This uid's own store for the cache directory ``cache``: under ``$XDG_CACHE_HOME`` (when
    it is yours) or ``~/.cache`` of the passwd entry (``sudo`` may keep the caller's HOME),
    one per cache directory."""
    home = pwd.getpwuid(os.geteuid()).pw_dir
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(home) / ".cache"
    if os.path.isabs(xdg):
        try:
            if os.stat(xdg).st_uid == os.geteuid():
                root = Path(xdg)
        except OSError:
            pass
    digest = hashlib.sha256(os.fsencode(os.path.abspath(cache))).hexdigest()[:16]
    return root / "pytest-layers" / "stores" / f"{cache.parent.name or 'root'}-{digest}"


@dataclass(frozen=True)
class IniFile:
    """The pytest configuration found for a directory: its rootdir, the file (None when there
    is none) and the ini values as strings."""

    rootdir: Path
    path: Path | None
    values: dict[str, str] = field(default_factory=dict)


def _ini_section(path: Path, section: str) -> dict[str, str] | None:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return None
    if not parser.has_section(section):
        return None
    return {k: v.strip() for k, v in parser.items(section)}


def _toml(path: Path) -> dict[str, Any] | None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        # pytest depends on tomli below 3.11; not installed where mypy runs (3.11)
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    try:
        with open(path, "rb") as f:
            doc: Any = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _as_strings(table: Any) -> dict[str, str]:
    if not isinstance(table, dict):
        return {}
    return {str(k): str(v) for k, v in table.items() if not isinstance(v, (dict, list))}


def _load(path: Path) -> dict[str, str] | None:
    """The pytest values of one config file, or None when it holds no pytest configuration."""
    name = path.name
    if name in ("pytest.ini", ".pytest.ini"):
        return _ini_section(path, "pytest") or {}  # always the config file, even if empty
    if name == "tox.ini":
        return _ini_section(path, "pytest")
    if name == "setup.cfg":
        return _ini_section(path, "tool:pytest")
    doc = _toml(path)
    if doc is None:
        return None
    if name in ("pytest.toml", ".pytest.toml"):
        return _as_strings(doc.get("pytest", {}))
    tool = doc.get("tool", {})
    pytest_table = tool.get("pytest") if isinstance(tool, dict) else None
    if not isinstance(pytest_table, dict):
        return None
    values = _as_strings({k: v for k, v in pytest_table.items() if k != "ini_options"})
    values.update(_as_strings(pytest_table.get("ini_options", {})))
    return values


def find_ini(start: Path) -> IniFile:
    """The pytest configuration that applies to a run started in ``start`` with no arguments.

    Like pytest: the nearest directory upward with a config file holding pytest settings; else
    the nearest ``pyproject.toml``; else the nearest directory with ``setup.py``; else
    ``start`` itself.
    """
    start = start.resolve()
    first_pyproject: Path | None = None
    for d in (start, *start.parents):
        for name in _CONFIG_NAMES:
            path = d / name
            if not path.is_file():
                continue
            if name == "pyproject.toml" and first_pyproject is None:
                first_pyproject = path
            values = _load(path)
            if values is not None:
                return IniFile(d, path, values)
    if first_pyproject is not None:
        return IniFile(first_pyproject.parent, first_pyproject, {})
    for d in (start, *start.parents):
        if (d / "setup.py").is_file():
            return IniFile(d, None, {})
    return IniFile(start, None, {})
