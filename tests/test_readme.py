"""What the README promises about the project's own test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = '.venv/bin/pytest -m "not slow"'
PYTEST = [sys.executable, "-m", "pytest"]


def test_quick_part_of_the_suite_leaves_out_every_fault_test() -> None:
    assert QUICK in (ROOT / "README.md").read_text()
    proc = subprocess.run(
        [*PYTEST, "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "faults and not slow"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit code 5: nothing collected, so `-m "not slow"` runs no fault-injection test.
    assert proc.returncode == 5, proc.stdout
