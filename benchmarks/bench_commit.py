"""Writing a layer: a build of a 10,000-file layer and a commit of 1,000 changed files.

Usage::

    python benchmarks/bench_commit.py [--quick] [--runs N] [--baseline-src DIR] [--out FILE]

Both figures come from real pytest sessions in subprocesses, against a temporary store:

- **build**: a session whose one ``@layer`` builder writes 10,000 files of 1 KiB (100
  directories) into ``root`` and records its own time; the first test's setup, which builds
  the layer from an empty store and mounts it, is timed by a small plugin. Reported: the
  setup time, the builder's own time, their ratio (target: at most 1.3x) and what the store
  added (setup minus builder).
- **commit**: on an image of 100,000 files of 1 KiB (built once per store, not timed), each
  test rewrites 1,000 of them with content of its own (so no commit finds its layer stored
  already) and times ``rootfs.commit()`` (target: at least 2x faster than 200 ms, i.e. at
  most 100 ms, median).

- **read floor**: right after each build, GNU tar (C) reads the stored layer's tree once, in
  the order the store does, into a sha256 of its stream: the least any store can do to name
  a layer, without clamping mtimes or writing an index. Printed beside the build with what
  the target leaves the store (0.3x the builder); missing ``tar`` leaves it out.
- **floor**: right after each commit session, the same number of files as a commit changes
  is created, written, chmod-ed and utime-d in the side's work dir on the store's filesystem:
  what a commit cannot do without, in that minute. Printed beside the commit figure; the
  targets stay absolute. On an ext4 without a journal the kernel skips inodes freed in the last
  minute or more when it allocates one, so every create costs more for a while after a large
  tree is deleted on that filesystem (by anyone): the floor shows such minutes. The benchmark
  itself deletes nothing until it ends (the build stores and floor trees stay until then).

``--baseline-src DIR`` measures the package at ``DIR`` (a checkout, e.g. ``git worktree add``
of an older commit) as well, alternating the two run by run, so that both are measured in the
same minutes of a noisy machine. ``--quick``: 500 files, a 2,000-file image with 50 changes,
one run.

Writes ``benchmarks/results/commit.json`` (``commit-quick.json`` with ``--quick``) with a
machine description, every figure, and the targets met or missed.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

BUILD_TARGET_RATIO = 1.3
COMMIT_TARGET_MS = 100.0  # 2x faster than the 200 ms measured before the one-pass writer


@dataclass(frozen=True)
class Plan:
    build_files: int
    image_files: int
    changes: int
    runs: int
    commits_per_run: int


FULL = Plan(build_files=10_000, image_files=100_000, changes=1_000, runs=5, commits_per_run=5)
QUICK = Plan(build_files=500, image_files=2_000, changes=50, runs=1, commits_per_run=2)

_CONFTEST = """
import json, os, time
import pytest

OUT = os.environ["BENCH_COMMIT_OUT"]

@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    t0 = time.perf_counter()
    try:
        return (yield)
    finally:
        with open(OUT, "a") as f:
            f.write(json.dumps({"setup_s": time.perf_counter() - t0}) + "\\n")
"""

_FILL = """
def fill(root, n, tag=b""):
    for i in range(0, n, 100):
        d = os.path.join(root, "d%04d" % (i // 100))
        os.makedirs(d, exist_ok=True)
        for j in range(min(100, n - i)):
            with open(os.path.join(d, "f%03d" % j), "wb") as f:
                f.write(tag + bytes(1024 - len(tag)))
"""

_BUILD_SUITE = (
    "import json, os, time\n"
    "import pytest\n"
    "from pytest_layers import layer\n"
    + _FILL
    + """
@layer
def base(root):
    t0 = time.perf_counter()
    fill(str(root), {files}, b"build " + os.environ["BENCH_COMMIT_TAG"].encode())
    with open(os.environ["BENCH_COMMIT_OUT"], "a") as f:
        f.write(json.dumps({{"builder_s": time.perf_counter() - t0}}) + "\\n")

@pytest.mark.layer("base")
def test_build(rootfs):
    pass
"""
)

_COMMIT_SUITE = (
    "import json, os, time\n"
    "import pytest\n"
    "from pytest_layers import layer\n"
    + _FILL
    + """
@layer
def image(root):
    fill(str(root), {files})

@pytest.mark.parametrize("rep", range({reps}))
@pytest.mark.layer("image")
def test_commit(rootfs, rep):
    tag = f"{{os.environ['BENCH_COMMIT_TAG']}} {{rep}} ".encode()
    fill(str(rootfs.path), {changes}, tag)
    t0 = time.perf_counter()
    rootfs.commit()
    took = time.perf_counter() - t0
    with open(os.environ["BENCH_COMMIT_OUT"], "a") as f:
        f.write(json.dumps({{"commit_s": took}}) + "\\n")
"""
)


class Side:
    """One version of the package under test: its source dir goes first on PYTHONPATH."""

    def __init__(self, label: str, src: Path, work: Path) -> None:
        self.label = label
        self.src = src
        self.work = work / label
        self.work.mkdir()
        self.image_store = self.work / "image-store"

    def session(self, suite: str, store: Path, tag: str) -> list[dict[str, Any]]:
        run_dir = Path(tempfile.mkdtemp(dir=self.work, prefix="run-"))
        try:
            (run_dir / "conftest.py").write_text(_CONFTEST)
            (run_dir / "test_bench.py").write_text(suite)
            out = run_dir / "times.jsonl"
            env = {
                **os.environ,
                "PYTHONPATH": str(self.src),
                "BENCH_COMMIT_OUT": str(out),
                "BENCH_COMMIT_TAG": tag,
            }
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    f"--layers-store={store}",
                    str(run_dir),
                ],
                cwd=run_dir,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(
                    f"bench_commit: the {self.label} session failed:\n{proc.stdout[-3000:]}"
                    f"{proc.stderr[-2000:]}"
                )
            return [json.loads(line) for line in out.read_text().splitlines()]
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def build(self, plan: Plan, n: int) -> dict[str, float]:
        # The store stays until the end: deleting 10,000 files would slow the creates that
        # follow (see the floor).
        store = self.work / f"build-store-{n}"
        rows = self.session(_BUILD_SUITE.format(files=plan.build_files), store, f"{self.label}-{n}")
        builder = next(r["builder_s"] for r in rows if "builder_s" in r)
        setup = next(r["setup_s"] for r in rows if "setup_s" in r)
        timed = {"builder_s": builder, "setup_s": setup}
        read = read_floor(store)
        if read is not None:
            timed["read_floor_s"] = read
        return timed

    def commits(self, plan: Plan, n: int) -> list[float]:
        suite = _COMMIT_SUITE.format(
            files=plan.image_files, reps=plan.commits_per_run, changes=plan.changes
        )
        rows = self.session(suite, self.image_store, f"{self.label}-{n}")
        return [r["commit_s"] for r in rows if "commit_s" in r]

    def floor(self, plan: Plan, n: int) -> float:
        """Seconds to create ``plan.changes`` files of 1 KiB as a commit writes them (100 to a
        directory; written, chmod-ed, utime-d), on the stores' filesystem. Kept until the end."""
        root = self.work / f"floor-{n}"
        root.mkdir()
        data = bytes(1024)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        t0 = time.perf_counter()
        for i in range(0, plan.changes, 100):
            d = root / f"d{i // 100:04d}"
            d.mkdir()
            for j in range(min(100, plan.changes - i)):
                fd = os.open(d / f"f{j:03d}", flags, 0o600)
                try:
                    os.pwrite(fd, data, 0)
                    os.fchmod(fd, 0o644)
                    os.utime(fd, ns=(0, 0))
                finally:
                    os.close(fd)
        return time.perf_counter() - t0


def read_floor(store: Path) -> float | None:
    """Seconds for GNU tar to stream the one layer of ``store`` in name order into a sha256
    (read in 1 MiB pieces here): every file opened, read and closed once by C. None without
    ``tar``."""
    tar = shutil.which("tar")
    (tree,) = glob.glob(os.path.join(store, "layers", "*", "diff"))
    if tar is None:
        return None
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    with subprocess.Popen(
        [tar, "--sort=name", "--format=pax", "-C", tree, "-cf", "-", "."],
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_commit: tar of {tree} failed (exit {proc.returncode})")
    return took


def machine(work: Path) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "euid": os.geteuid(),
        "git_commit": commit or None,
        "workdir": str(work),
    }


def summary(
    builds: list[dict[str, float]], commits: list[float], floors: list[float]
) -> dict[str, Any]:
    setup = statistics.median(b["setup_s"] for b in builds)
    builder = statistics.median(b["builder_s"] for b in builds)
    ratios = [b["setup_s"] / b["builder_s"] for b in builds]
    reads = [b["read_floor_s"] for b in builds if "read_floor_s" in b]
    commit_ms = statistics.median(commits) * 1000
    return {
        "build": {
            "setup_s_median": setup,
            "builder_s_median": builder,
            "ratio_median": statistics.median(ratios),
            "store_added_s_median": statistics.median(
                b["setup_s"] - b["builder_s"] for b in builds
            ),
            # What the target leaves the store, against what GNU tar needs to read the tree.
            "target_allows_s_median": statistics.median(
                b["builder_s"] * (BUILD_TARGET_RATIO - 1) for b in builds
            ),
            "read_floor_s_median": statistics.median(reads) if reads else None,
            "runs": builds,
        },
        "commit": {
            "median_ms": commit_ms,
            "all_ms": [c * 1000 for c in commits],
            # The same number of creates on the same filesystem, one per run, after the commits.
            "floor_median_ms": statistics.median(floors) * 1000,
            "floor_all_ms": [f * 1000 for f in floors],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small trees, one run (CI)")
    parser.add_argument("--runs", type=int, default=None, help="Alternating runs per side")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="Also measure the package in this checkout, alternating with this one",
    )
    parser.add_argument("--out", type=Path, default=None, help="Results file")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where stores are made (created if missing)"
    )
    args = parser.parse_args(argv)
    if args.workdir is not None:
        # As in bench_compare: created if missing; a path that cannot be a directory is one line.
        try:
            args.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--workdir {args.workdir}: cannot create it: {exc.strerror}")
    if args.baseline_src is not None and not (args.baseline_src / "pytest_layers").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no pytest_layers package in it")
    plan = QUICK if args.quick else FULL
    runs = args.runs or plan.runs
    out = args.out or REPO / "benchmarks" / "results" / (
        "commit-quick.json" if args.quick else "commit.json"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-commit-", dir=args.workdir))
    try:
        sides = [Side("current", REPO, work)]
        if args.baseline_src is not None:
            sides.append(Side("baseline", args.baseline_src.resolve(), work))
        builds: dict[str, list[dict[str, float]]] = {s.label: [] for s in sides}
        commits: dict[str, list[float]] = {s.label: [] for s in sides}
        floors: dict[str, list[float]] = {s.label: [] for s in sides}
        for side in sides:  # the image of each side's store, built once and not timed
            side.commits(Plan(plan.build_files, plan.image_files, 1, 1, 1), -1)
        for n in range(runs):
            order = sides if n % 2 == 0 else sides[::-1]
            for side in order:
                builds[side.label].append(side.build(plan, n))
                commits[side.label].extend(side.commits(plan, n))
                floors[side.label].append(side.floor(plan, n))
                b = builds[side.label][-1]
                read = b.get("read_floor_s")
                print(
                    f"run {n + 1}/{runs} {side.label:8}: build {b['setup_s'] * 1000:7.0f} ms "
                    f"(builder {b['builder_s'] * 1000:6.0f} ms, "
                    f"{b['setup_s'] / b['builder_s']:.2f}x; store "
                    f"{(b['setup_s'] - b['builder_s']) * 1000:.0f} ms, tar reads it in "
                    + ("-" if read is None else f"{read * 1000:.0f}")
                    + " ms), commit median "
                    f"{statistics.median(commits[side.label][-plan.commits_per_run :]) * 1000:6.1f}"
                    f" ms (floor {floors[side.label][-1] * 1000:6.1f} ms, load "
                    f"{os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        result: dict[str, Any] = {
            "benchmark": "commit",
            "plan": plan.__dict__,
            "machine": machine(work),
            "sides": {
                s.label: summary(builds[s.label], commits[s.label], floors[s.label]) for s in sides
            },
        }
        cur = result["sides"]["current"]
        result["targets"] = {
            "build_ratio": {
                "target": BUILD_TARGET_RATIO,
                "value": cur["build"]["ratio_median"],
                "met": cur["build"]["ratio_median"] <= BUILD_TARGET_RATIO,
            },
            "commit_ms": {
                "target": COMMIT_TARGET_MS,
                "value": cur["commit"]["median_ms"],
                "met": cur["commit"]["median_ms"] <= COMMIT_TARGET_MS,
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        textwrap.dedent(f"""\
        build of a {plan.build_files:,}-file layer / commit of {plan.changes:,} changed files on
        a {plan.image_files:,}-file image (medians over {runs} runs):""")
    )
    for label, s in result["sides"].items():
        print(
            f"  {label:8}: build {s['build']['setup_s_median'] * 1000:7.0f} ms = "
            f"{s['build']['ratio_median']:.2f}x the builder "
            f"({s['build']['builder_s_median'] * 1000:.0f} ms; the target leaves the store "
            f"{s['build']['target_allows_s_median'] * 1000:.0f} ms, GNU tar reads the tree in "
            + (
                "-"
                if s["build"]["read_floor_s_median"] is None
                else f"{s['build']['read_floor_s_median'] * 1000:.0f}"
            )
            + " ms); "
            f"commit {s['commit']['median_ms']:.1f} ms "
            f"(floor: {plan.changes:,} creates in {s['commit']['floor_median_ms']:.1f} ms)"
        )
    for name, t in result["targets"].items():
        print(
            f"  target {name}: {t['value']:.2f} vs {t['target']} -> "
            + ("met" if t["met"] else "MISSED")
        )
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
