"""The example suite builds its images once and reuses them in the next session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.requires_overlay, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "configtool"


def test_configtool_example_builds_once(pytester: pytest.Pytester) -> None:
    dest = pytester.path / "configtool"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns(".pytest_cache", "__pycache__"))
    pytester.chdir()
    result = pytester.runpytest_subprocess(
        "--rootdir", str(dest), "-c", str(dest / "pytest.ini"), str(dest / "tests")
    )
    result.assert_outcomes(passed=29)
    result.stdout.fnmatch_lines_random(
        [
            "layers: built etc_base in *",
            "layers: built etc_app in *",
            "layers: built zoneinfo in * (10000 files, *",
        ]
    )
    result = pytester.runpytest_subprocess(
        "--rootdir", str(dest), "-c", str(dest / "pytest.ini"), str(dest / "tests")
    )
    result.assert_outcomes(passed=29)
    result.stdout.fnmatch_lines_random(
        [
            "layers: cached etc_base in *",
            "layers: cached etc_app in *",
            "layers: cached zoneinfo in *",
        ]
    )
    result.stdout.no_fnmatch_line("layers: built *")
