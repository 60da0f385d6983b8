"""End to end on a real Debian image (issue 14): ``dpkg -i`` of a real ``.deb`` inside a
debootstrap'ed minbase image through ``rootfs.run()``, as root and as an ordinary user; the
diff shows dpkg's database and the package's files; a failing test's snapshot exports to an
image in which ``dpkg -s`` says the package is installed.

The image and the .deb come from `.ci/debian_image.py` (CI builds them once and caches them)
through PYTEST_LAYERS_DEBIAN_IMAGE and PYTEST_LAYERS_DEBIAN_DEBS; without them these tests skip
(or fail under PYTEST_LAYERS_REQUIRE=all|debian). Every inner session of one user shares a store,
so the image is imported once per user per session, as in a real suite."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEST_USER, require, run_pytest_as_ordinary_user

CONFTEST = """
import os
from pytest_layers import oci_image

debian = oci_image("debian", os.environ["PYTEST_LAYERS_DEBIAN_IMAGE"])
"""

INSTALL = """
import os, pytest

DEBS = os.environ["PYTEST_LAYERS_DEBIAN_DEBS"]
DEB = sorted(f for f in os.listdir(DEBS) if f.endswith(".deb"))[0]
PKG = DEB.split("_")[0]

@pytest.mark.layer("debian")
def test_dpkg_installs(rootfs):
    r = rootfs.run(["dpkg", "-i", "/debs/" + DEB], binds=[(DEBS, "/debs")], text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    changes = [str(c) for c in rootfs.diff()]
    assert "C /var/lib/dpkg/status" in changes
    assert f"A /usr/bin/{PKG}" in changes
    assert f"A /var/lib/dpkg/info/{PKG}.list" in changes
    assert not any(c.endswith("/debs") for c in changes)  # the bind is not a change
    status = (rootfs / "var/lib/dpkg/status").read_text()
    assert f"Package: {PKG}\\nStatus: install ok installed\\n" in status
    # root inside: root outside when root runs the tests, the user otherwise
    assert (rootfs / f"usr/bin/{PKG}").stat().st_uid == os.getuid()
    r = rootfs.run([PKG], text=True, check=True)
    assert r.stdout == "Hello, world!\\n" or PKG != "hello", r.stdout
"""

FAILING = """
import os, pytest

DEBS = os.environ["PYTEST_LAYERS_DEBIAN_DEBS"]
DEB = sorted(f for f in os.listdir(DEBS) if f.endswith(".deb"))[0]

@pytest.mark.layer("debian")
def test_install_then_fail(rootfs):
    rootfs.run(["dpkg", "-i", "/debs/" + DEB], binds=[(DEBS, "/debs")], check=True)
    assert False, "deliberately, for its snapshot"
"""


def _package() -> str:
    debs = os.environ["PYTEST_LAYERS_DEBIAN_DEBS"]
    return sorted(f for f in os.listdir(debs) if f.endswith(".deb"))[0].split("_")[0]


@pytest.fixture(autouse=True)
def _image() -> None:
    require("debian")


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[bool], Path]]:
    """The store of each kind of inner session (root's, the ordinary user's), shared by all the
    tests of this session: the image is imported into each once."""
    made: dict[bool, Path] = {}

    def store(as_user: bool) -> Path:
        as_user = as_user and os.geteuid() == 0  # an ordinary user's sessions share one
        if as_user not in made:
            if as_user and os.geteuid() == 0:
                # Where the test user reaches (root's basetemp is private), as user_tmp_path.
                path = Path(tempfile.mkdtemp(prefix="pytest-layers-debian-store-", dir="/tmp"))
                os.chmod(path, 0o755)
                os.chown(path, pwd.getpwnam(TEST_USER).pw_uid, -1)
            else:
                path = tmp_path_factory.mktemp("debian-store-user" if as_user else "debian-store")
            made[as_user] = path / "store"
        return made[as_user]

    yield store
    if True in made and os.geteuid() == 0:
        shutil.rmtree(made[True].parent, ignore_errors=True)


def _write(project: Path, tests: str) -> None:
    (project / "conftest.py").write_text(CONFTEST)
    (project / "test_deb.py").write_text(tests)
    if os.geteuid() == 0 and project.stat().st_uid != 0:
        for f in project.iterdir():
            os.chown(f, project.stat().st_uid, -1)


def _args(project: Path, store: Path) -> list[str]:
    return [
        "-p",
        "no:cacheprovider",
        "-q",
        "-rf",
        f"--layers-store={store}",
        f"--basetemp={project / 'bt'}",
        "-o",
        "faulthandler_timeout=120",
    ]


def test_dpkg_install_as_root(tmp_path: Path, stores: Callable[[bool], Path]) -> None:
    require("root")
    _write(tmp_path, INSTALL)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *_args(tmp_path, stores(False))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_dpkg_install_as_an_ordinary_user(
    ordinary_tmp_path: Path, stores: Callable[[bool], Path]
) -> None:
    _write(ordinary_tmp_path, INSTALL)
    proc = run_pytest_as_ordinary_user(ordinary_tmp_path, _args(ordinary_tmp_path, stores(True)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert "backend=overlay (user namespace)" in proc.stdout or os.geteuid() != 0


def test_failed_tests_snapshot_exports_an_image_with_the_package(
    tmp_path: Path, stores: Callable[[bool], Path]
) -> None:
    # As whoever runs this suite: root in the root run, the user in the user run.
    if os.geteuid() != 0:
        require("userns")
    store = stores(False)
    _write(tmp_path, FAILING)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *_args(tmp_path, store)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "1 failed" in proc.stdout, proc.stdout + proc.stderr
    cli = [sys.executable, "-m", "pytest_layers.cli"]
    image = tmp_path / "snapshot.tar"
    ref = "snapshot:test_deb.py::test_install_then_fail"
    done = subprocess.run(
        [*cli, "--store", str(store), "export", ref, "-o", str(image), "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # A store that never saw the test: only the exported image is there.
    fresh = tmp_path / "fresh-store"
    done = subprocess.run(
        [*cli, "--store", str(fresh), "import", str(image), "--name", "exported", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    pkg = _package()
    done = subprocess.run(
        [*cli, "--store", str(fresh), "run", "exported", "--", "dpkg", "-s", pkg],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Package: {pkg}\nStatus: install ok installed\n" in done.stdout
