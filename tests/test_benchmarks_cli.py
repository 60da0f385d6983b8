"""The benchmark scripts' command lines: bad arguments get one line, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_compare.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, check=False
    )


def test_workdir_is_created_when_missing(tmp_path: Path) -> None:
    workdir = tmp_path / "not" / "yet"
    # An argument error that comes after the work dir is prepared stops the run before any
    # benchmark starts.
    proc = _run("--workdir", str(workdir), "--as-user", "no-such-user-for-bench")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert workdir.is_dir()


def test_workdir_that_cannot_be_a_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run("--workdir", str(blocker / "sub"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"bench_compare.py: error: --workdir {blocker}/sub: cannot create it: Not a directory"
    )


def test_commit_benchmark_creates_its_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "not" / "yet"
    # --baseline-src is checked after the work dir is prepared: the run stops before any session.
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH.parent / "bench_commit.py"),
            "--workdir",
            str(workdir),
            "--baseline-src",
            str(tmp_path / "no-checkout"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no pytest_layers package in it" in proc.stderr
    assert workdir.is_dir()


def test_commit_benchmark_prints_the_create_floor_beside_the_commit(tmp_path: Path) -> None:
    out = tmp_path / "commit.json"
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH.parent / "bench_commit.py"),
            "--quick",
            "--workdir",
            str(workdir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commit = json.loads(out.read_text())["sides"]["current"]["commit"]
    assert len(commit["floor_all_ms"]) == 1
    assert commit["floor_median_ms"] > 0
    assert "(floor: 50 creates in" in proc.stdout
    assert list(workdir.iterdir()) == []  # everything it made goes at the end


@pytest.mark.parametrize(
    "script", sorted(p.name for p in BENCH.parent.glob("bench_*.py")), ids=lambda name: name
)
def test_every_benchmark_has_the_quick_mode_ci_runs(script: str) -> None:
    # .ci/run runs `python benchmarks/bench_X.py --quick` for every script.
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / script), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


def test_registry_benchmark_one_part_into_a_new_results_file(tmp_path: Path) -> None:
    # `--only PART` into a results file that holds no other part yet prints the part it measured
    # (it used to stop on the parts it had not measured, after the run, with a KeyError).
    from conftest import require

    require("tool:docker-registry")
    out = tmp_path / "registry.json"
    script = str(BENCH.parent / "bench_registry.py")
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--only", "memory", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MiB sparse layer: push peak RSS" in proc.stdout
    assert "session," not in proc.stdout
    assert set(json.loads(out.read_text())) == {"machine", "memory"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--only", "per-test,nope"), "--only 'per-test,nope': unknown 'nope'; choose from"),
        (("--sizes", "10,x"), "--sizes '10,x': give positive whole numbers"),
        (("--sizes", "0"), "--sizes '0': give positive whole numbers"),
        (("--tools", "bare,tmp"), "--tools 'bare,tmp': unknown 'tmp'; choose from"),
        (("--tests", "-3"), "--tests '-3': give positive whole numbers"),
    ],
)
def test_section_filters_refuse_bad_values_in_one_line(args: tuple[str, ...], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.splitlines()[-1], proc.stderr


def test_src_must_be_a_checkout(tmp_path: Path) -> None:
    proc = _run("--src", str(tmp_path), "--only", "per-test")
    assert proc.returncode == 2
    assert f"--src {tmp_path}: no pytest_layers package there" in proc.stderr, proc.stderr


def test_tools_names_every_row_id(tmp_path: Path) -> None:
    """--tools offers exactly the ids of the rows the benchmark has."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_compare
    finally:
        sys.path.remove(str(BENCH.parent))
    bench = bench_compare.Bench(bench_compare.QUICK, tmp_path, "someone")
    assert sorted(t.id for t in bench.tools()) == sorted(bench_compare.TOOL_IDS)
