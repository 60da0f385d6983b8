"""Layers for the configtool example: an /etc-like base, an app on top, and a 10k-file tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_layers import layer

TOOL = Path(__file__).resolve().parent.parent / "configtool.py"


@layer
def etc_base(root: Path) -> None:
    """A minimal /etc: os-release, passwd, hosts and the configtool defaults."""
    etc = root / "etc"
    (etc / "configtool.d").mkdir(parents=True)
    (etc / "os-release").write_text('ID=demo\nVERSION_ID="1.0"\n')
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "configtool.d/00-defaults.conf").write_text(
        "# shipped defaults\nlog.level = info\napp.debug = false\napp.port = 8080\n"
    )


@layer(parent=etc_base, inputs=["configtool/tests/data/app.conf"], version="1")
def etc_app(root: Path) -> None:
    """The app package: its own settings file from tests/data, and a retired file removed."""
    src = Path(__file__).resolve().parent / "data" / "app.conf"
    (root / "etc/configtool.d/50-app.conf").write_text(src.read_text())
    (root / "etc/hosts").unlink()


@layer(parent=etc_base)
def zoneinfo(root: Path) -> None:
    """A large fixture tree: 10,000 small files in 100 directories (like /usr/share/zoneinfo)."""
    base = root / "usr/share/zoneinfo"
    for d in range(100):
        region = base / f"region{d:02d}"
        region.mkdir(parents=True)
        for f in range(100):
            (region / f"city{f:02d}").write_text(f"TZ{d}-{f}\n")


@pytest.fixture
def configtool(rootfs):
    """Run configtool against the test's rootfs; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        proc = subprocess.run(
            [sys.executable, str(TOOL), "--root", str(rootfs.path), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode, proc.stdout, proc.stderr

    return run
