"""Images for the pkginstall example, each built by installing packages with pkginstall itself.

    minimal ──┬── with_python   (python3 3.11.2)
              └── with_docs     (manpages 6.03)

``minimal`` (base-files and libc) is built once and shared by both children; a test can stack
the two children (``@pytest.mark.layer("with_python", "with_docs")``) into one system whose
package database lists all four packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pkginstall
import pytest

from pytest_layers import Rootfs, layer

HERE = Path(__file__).resolve().parent
TOOL = HERE.parent / "pkginstall.py"
PACKAGES = HERE / "packages"

# Build-cache inputs are relative to the rootdir (examples/). The installer is an input of every
# image: change pkginstall.py and the images are rebuilt with the new code.
_SRC = "pkginstall/tests/packages"
_TOOL = "pkginstall/pkginstall.py"


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every package under tests/packages built into a tar, by directory name."""
    out = tmp_path_factory.mktemp("packages")
    built = {}
    for src in sorted(PACKAGES.iterdir()):
        pkginstall.build(src, out / f"{src.name}.tar")
        built[src.name] = out / f"{src.name}.tar"
    return built


def _install(root: Path, packages: dict[str, Path], *names: str) -> None:
    for name in names:
        notes = pkginstall.install(root, packages[name])
        # A builder that silently did less than asked would cache a wrong image.
        assert notes == [], f"installing {name} into the image: {notes}"


@layer(inputs=[_TOOL, f"{_SRC}/base-files-12.4", f"{_SRC}/libc-2.36"])
def minimal(root: Path, packages: dict[str, Path]) -> None:
    """The smallest installable system: base-files (the directory skeleton) and libc."""
    _install(root, packages, "base-files-12.4", "libc-2.36")


@layer(parent=minimal, inputs=[_TOOL, f"{_SRC}/python3-3.11.2"])
def with_python(root: Path, packages: dict[str, Path]) -> None:
    """minimal plus python3 3.11.2."""
    _install(root, packages, "python3-3.11.2")


@layer(parent=minimal, inputs=[_TOOL, f"{_SRC}/manpages-6.03"])
def with_docs(root: Path, packages: dict[str, Path]) -> None:
    """minimal plus the manual pages."""
    _install(root, packages, "manpages-6.03")


@pytest.fixture
def pkg(rootfs: Rootfs, packages: dict[str, Path]) -> Callable[..., tuple[int, str, str]]:
    """Run the pkginstall CLI against the test's rootfs: ``pkg("install", "hello-2.12")``.

    A package's directory name stands for its built archive. Returns (exit code, stdout,
    stderr).
    """

    def run(*args: str) -> tuple[int, str, str]:
        argv = [str(packages.get(a, a)) for a in args]
        proc = subprocess.run(
            [sys.executable, str(TOOL), "--root", os.fspath(rootfs), *argv],
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode, proc.stdout, proc.stderr

    return run
