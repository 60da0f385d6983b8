"""Fetching a pinned package from the package index for a test, cached between runs.

Used for what the project must not vendor or install next to its own test tools: pytest-datadir's
own test suite (its sdist) and pytest-snapshot (whose ``--snapshot-update`` option collides with
syrupy's, so the two cannot be installed in one environment). Offline, the test is skipped with
the reason, unless ``PYTEST_LAYERS_REQUIRE`` says ``all`` or ``network`` (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

#: Downloads land here (one directory per package spec); override with PYTEST_LAYERS_PYPI_CACHE.
CACHE = Path(
    os.environ.get("PYTEST_LAYERS_PYPI_CACHE")
    or Path(tempfile.gettempdir()) / f"pytest-layers-pypi-{os.getuid()}"
)


def _unavailable(why: str) -> None:
    required = {p.strip() for p in os.environ.get("PYTEST_LAYERS_REQUIRE", "").split(",")}
    if "all" in required or "network" in required:
        pytest.fail(f"required capability 'network' is missing: {why}", pytrace=False)
    pytest.skip(f"network: {why}")


def fetch(spec: str, *, sdist: bool) -> Path:
    """The unpacked sdist (``sdist=True``) or wheel of ``spec`` (``name==version``): a
    directory. Downloaded once per cache; concurrent callers each unpack, the first rename wins.
    """
    final = CACHE / (spec.replace("==", "-") + ("-sdist" if sdist else "-wheel"))
    if final.is_dir():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=CACHE, prefix=".dl-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(stage)]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(
            [*cmd, spec], capture_output=True, text=True, timeout=300, check=False
        )
        files = [p for p in stage.iterdir() if p.is_file()]
        if proc.returncode != 0 or len(files) != 1:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            _unavailable(f"cannot download {spec} from the package index: {lines[-1:]}")
        unpacked = stage / "unpacked"
        if sdist:
            with tarfile.open(files[0]) as tar:
                for member in tar.getmembers():
                    # Python 3.11.2 has no extraction filters: refuse what could leave the dir.
                    if not (member.isfile() or member.isdir()) or ".." in member.name.split("/"):
                        pytest.fail(f"{spec}: unexpected sdist entry {member.name!r}")
                tar.extractall(unpacked)
            (top,) = unpacked.iterdir()
            unpacked = top
        else:
            with zipfile.ZipFile(files[0]) as whl:
                whl.extractall(unpacked)
        try:
            unpacked.rename(final)
        except OSError:
            if not final.is_dir():
                raise
        return final
    finally:
        shutil.rmtree(stage, ignore_errors=True)
