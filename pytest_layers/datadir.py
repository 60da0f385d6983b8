"""pytest glue for data directories as layers: the fixture of :func:`layer_from_path` and, with
ini ``layers_datadir = true``, pytest-datadir's fixtures served from layers.

pytest-datadir's contract (its version 1.9, read from its source) is kept exactly: for a test
module ``tests/test_x.py``, ``original_datadir`` is ``tests/test_x`` (module scope);
``datadir`` is a writable copy of it at ``tmp_path / "test_x"`` (an empty directory when the
module has none); ``shared_datadir`` is a writable copy of ``tests/data`` at
``tmp_path / "data"`` (a missing ``tests/data`` is an error); ``lazy_datadir`` and
``lazy_shared_datadir`` copy single entries into ``tmp_path`` (and ``tmp_path / "data"``) when
first asked for. The difference: ``datadir`` and ``shared_datadir`` are private overlay views
of a layer made once per directory (and cached across sessions), bind-mounted at the same
paths, so a test costs a mount instead of a copy of the whole directory. See
docs/how-to/coming-from-pytest-datadir.md.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_layers import _linux, definitions, fixtures, namespaces
from pytest_layers.build import Layer
from pytest_layers.errors import LayerDefinitionError, NoSpaceError

__all__ = ["addini", "configure", "LazyDataDir", "FIXTURES"]

INI = "layers_datadir"
FIXTURES = ("datadir", "shared_datadir", "original_datadir", "lazy_datadir", "lazy_shared_datadir")
_PYTEST_DATADIR = "pytest_datadir.plugin"
_LAYERS = pytest.StashKey[dict[Path, Layer]]()


# ---- wiring ----------------------------------------------------------------------------------


def addini(parser: pytest.Parser) -> None:
    parser.addini(
        INI,
        "Serve pytest-datadir's fixtures (datadir, shared_datadir, original_datadir, lazy_*) "
        "from layers",
        type="bool",
        default=False,
    )


def configure(config: pytest.Config) -> None:
    """Register the fixtures when the ini asks for them.

    Registered after every plugin loaded from an entry point (pytest-datadir's included), so
    for fixtures defined at the same level ours are the ones pytest uses; a pytest-datadir
    registered later (``pytest_plugins`` in a conftest) would win silently, so it is refused.
    """
    if not config.getini(INI):
        return
    pm = config.pluginmanager
    earlier = {id(p) for p in pm.get_plugins()}
    pm.register(_DatadirPlugin(earlier), "pytest-layers-datadir")
    pm.register(sys.modules[__name__], "pytest-layers-datadir-fixtures")


class _DatadirPlugin:
    def __init__(self, earlier: set[int]) -> None:
        self._earlier = earlier
        self._overridden = False

    def pytest_plugin_registered(self, plugin: object) -> None:
        if getattr(plugin, "__name__", None) != _PYTEST_DATADIR:
            return
        if id(plugin) in self._earlier:
            self._overridden = True
            return
        raise pytest.UsageError(
            f"{INI} = true serves pytest-datadir's fixtures from pytest-layers, but "
            "pytest-datadir's plugin was loaded after it (pytest_plugins or -p), so it is "
            "undecidable which one a test gets: drop that pytest_plugins/-p entry, or set "
            f"{INI} = false to use pytest-datadir itself"
        )

    def pytest_report_header(self, config: pytest.Config) -> str:
        also = " (pytest-datadir's own are overridden)" if self._overridden else ""
        return f"layers: {INI} = true: datadir fixtures served from layers{also}"


@dataclass(frozen=True)
class LazyDataDir:
    """pytest-datadir's lazy data directory: ``lazy / "x"`` copies ``x`` (a file or a whole
    directory) from ``original_datadir`` into ``tmp_path`` the first time it is asked for.

    Copying single entries on demand is already cheap, so this one copies as pytest-datadir
    does; it exists so that suites using ``lazy_datadir`` run without pytest-datadir.
    """

    original_datadir: Path
    tmp_path: Path

    def joinpath(self, other: Path | str) -> Path:
        original = self.original_datadir / other
        target = self.tmp_path / other
        if original.exists() and not target.exists():
            if original.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(original, target)
            elif original.is_dir():
                shutil.copytree(original, target)
        return target

    def __truediv__(self, other: Path | str) -> Path:
        return self.joinpath(other)


# ---- the fixtures (this module is registered as a plugin for them) ----------------------


@pytest.fixture(scope="module")
def original_datadir(request: pytest.FixtureRequest) -> Path:
    """The test module's own data directory (``tests/test_x.py`` -> ``tests/test_x``)."""
    return Path(request.path).with_suffix("")


@pytest.fixture
def datadir(
    request: pytest.FixtureRequest, original_datadir: Path, tmp_path: Path
) -> Iterator[Path]:
    """A private writable view of ``original_datadir`` at ``tmp_path / <module name>``."""
    target = tmp_path / original_datadir.stem
    if not original_datadir.is_dir():
        target.mkdir()
        yield target
        return
    yield from _serve(request, original_datadir, target)


@pytest.fixture
def shared_datadir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A private writable view of the test directory's ``data`` at ``tmp_path / "data"``."""
    original = Path(request.path).parent / "data"
    if not original.is_dir():
        raise FileNotFoundError(
            2,
            f"shared_datadir: no shared data directory {original} for {request.node.nodeid}"
            " (create it, or use datadir for the module's own data)",
            str(original),
        )
    yield from _serve(request, original, tmp_path / "data")


@pytest.fixture
def lazy_datadir(original_datadir: Path, tmp_path: Path) -> LazyDataDir:
    """``tmp_path``, filled from ``original_datadir`` one entry at a time, on first use."""
    return LazyDataDir(original_datadir, tmp_path)


@pytest.fixture
def lazy_shared_datadir(request: pytest.FixtureRequest, tmp_path: Path) -> LazyDataDir:
    """``tmp_path / "data"``, filled from the shared ``data`` directory on first use."""
    temp = tmp_path / "data"
    temp.mkdir(parents=True, exist_ok=False)
    return LazyDataDir(Path(request.path).parent / "data", temp)


# ---- serving a directory ---------------------------------------------------------------------


def _data_layer(request: pytest.FixtureRequest, directory: Path) -> Layer:
    """The layer of ``directory``, built (or found in the build cache) once per session."""
    __tracebackhide__ = True
    config = request.config
    cache = config.stash.setdefault(_LAYERS, {})
    key = directory.resolve()
    lay = cache.get(key)
    if lay is not None:
        return lay
    state = fixtures.state(config)
    session = fixtures.session_or_fail(state)
    try:
        rel = str(key.relative_to(state.rootdir.resolve()))
    except ValueError:
        rel = str(key)
    defn = definitions.source_def(f"datadir:{rel}", rel, where=str(directory), module=__name__)
    try:
        lay = session.get(defn, None, {})
    except (LayerDefinitionError, NoSpaceError) as exc:
        message = str(exc)
    else:
        cache[key] = lay
        return lay
    pytest.fail(message, pytrace=False)


def _serve(request: pytest.FixtureRequest, directory: Path, target: Path) -> Iterator[Path]:
    """Make ``target`` a private writable view of ``directory``'s layer for one test."""
    from pytest_layers.rootfs import Rootfs

    lay = _data_layer(request, directory)
    session = fixtures.session_or_fail(fixtures.state(request.config))
    target.mkdir()
    if namespaces.inside_our_namespace() is None:
        # Mounting in the host's namespace would leave a mount inside tmp_path behind if the
        # session were killed; there, a plain copy of the layer, as pytest-datadir makes.
        _copy(lay, target)
        yield target
        return
    session.use(lay.chain)
    fs = Rootfs(session, lay.chain)
    attached = False
    try:
        try:
            _attach(fs.path, target, move=session.backend.name == "overlay")
            attached = True
        except OSError:
            _copy(lay, target)  # no right to mount there after all: the same, copied
        yield target
    finally:
        if attached:
            _linux.umount2(target, _linux.MNT_DETACH)
        fs.close()  # its own unmount finds nothing there after a move, and says nothing


def _copy(lay: Layer, target: Path) -> None:
    # A layer made from a directory has no parent, so its directory is the whole tree.
    shutil.copytree(lay.directory, target, symlinks=True, dirs_exist_ok=True)


def _attach(source: Path, target: Path, *, move: bool) -> None:
    """Make the view at ``source`` appear at ``target``.

    A kernel overlay view is moved there (one mount and one unmount per test: an unmount
    waits for an RCU grace period, the biggest cost of a view); other views are bind-mounted.
    """
    if move:
        try:
            _linux.mount(source, target, None, _linux.MS_MOVE)
            return
        except OSError:
            pass  # not a mount point of its own, or shared propagation: bind instead
    _linux.mount(source, target, None, _linux.MS_BIND)
    try:
        # A bind mount takes no flags of its own: set nosuid,nodev as every view has them.
        _linux.mount(
            None,
            target,
            None,
            _linux.MS_REMOUNT | _linux.MS_BIND | _linux.MS_NOSUID | _linux.MS_NODEV,
        )
    except OSError:
        _linux.umount2(target, _linux.MNT_DETACH)
        raise
