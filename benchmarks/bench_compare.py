#!/usr/bin/env python3
"""Per-test filesystem fixture overhead: pytest-layers against the tools suites use today.

Usage::

    python benchmarks/bench_compare.py [--quick] [--out DIR] [--as-user USER] [--workdir DIR]
        [--only SECTIONS] [--sizes N,N] [--tools ID,ID] [--tests N] [--src DIR]

Everything is measured in one run, on one machine, through real pytest sessions in
subprocesses: for each base-tree size a suite directory is generated holding the base tree,
one test module per tool (N trivial tests requesting the tool's fixture) and a tiny timing
plugin that records every test's setup and teardown time. Per-test overhead is setup +
teardown; the first test of a session is left out (it pays for session-scoped work, measured
separately) and the rest are summarised as median, p10 and p90.

The restricted environment is a row of its own: ``pytest-layers (copy, reused; restricted)``
runs its sessions under ``.ci/restricted.py`` (mounting and unsharing refused by a seccomp
filter, no /dev/fuse, the store on an overlayfs: a default Docker container), where ``auto``
picks the copy backend and each test gets the previous test's copy, reset. It needs root and
Debian's python3-seccomp; elsewhere it is listed as unavailable.

Also measured: cold build vs warm cache session start for a 10-layer chain, ``Rootfs.diff()``
and ``Rootfs.commit()`` cost against the number of changed files, and pytest-xdist wall time
(with the number of builder runs from an empty store).

``--only per-test --sizes 10,10000 --tools bare,tmp_path,layers-overlay-pool`` measures a part
alone (an A/B comparison of one row); ``--src DIR`` measures the package in another checkout.
A partial run writes to ``benchmarks/results/compare-partial`` unless ``--out`` says otherwise.

Writes ``benchmarks.json`` (with a machine description) and ``benchmarks.png`` to ``--out``:
``docs/assets`` for a full run, a scratch directory under ``benchmarks/results/`` for
``--quick`` so that a CI smoke run never overwrites the committed results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import inspect
import json
import os
import platform
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESTRICTED = REPO / ".ci" / "restricted.py"
FILE_SIZE = 1024
BACKENDS = ("overlay", "fuse", "copy")


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run, or the quick smoke run for CI."""

    mode: str
    sizes: tuple[int, ...]
    tests: int  # tests per session for tools whose cost does not grow with the tree
    copy_tests: dict[int, int]  # tests per session for tools that copy the tree, by size
    diff_base: int
    diff_changes: tuple[int, ...]
    diff_reps: int
    chain_files: int
    chain_layers: int
    warm_starts: int
    xdist_files: int
    xdist_tests: int
    xdist_workers: tuple[int, ...]


FULL = Plan(
    mode="full",
    sizes=(10, 1_000, 10_000, 100_000),
    tests=200,
    copy_tests={10: 200, 1_000: 100, 10_000: 12, 100_000: 4},
    diff_base=100_000,
    diff_changes=(1, 10, 100, 1_000),
    diff_reps=7,
    chain_files=100_000,
    chain_layers=10,
    warm_starts=3,
    xdist_files=10_000,
    xdist_tests=200,
    xdist_workers=(0, 2, 4),
)
QUICK = Plan(
    mode="quick",
    sizes=(10, 1_000),
    tests=30,
    copy_tests={10: 30, 1_000: 15},
    diff_base=1_000,
    diff_changes=(1, 10, 100),
    diff_reps=3,
    chain_files=1_000,
    chain_layers=10,
    warm_starts=2,
    xdist_files=1_000,
    xdist_tests=30,
    xdist_workers=(0, 2),
)


# -- the base tree ------------------------------------------------------------------------------
# make_tree is copied verbatim into the generated suites (inspect.getsource), so the real tree
# that pytest-datadir and copytree copy and the tree a @layer builder writes are the same.


def make_tree(root: str | os.PathLike[str], n: int, start: int = 0, size: int = 1024) -> None:
    """Write files start..start+n-1 under root: 100 files of `size` bytes per directory."""
    pad = b"x" * size
    made = set()
    for i in range(start, start + n):
        d = os.path.join(os.fspath(root), f"a{i // 10000:02d}", f"b{i // 100 % 100:02d}")
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        head = f"file {i}\n".encode()
        with open(os.path.join(d, f"f{i % 100:02d}.txt"), "wb") as f:
            f.write(head + pad[len(head) :])


def tree_path(i: int) -> str:
    """Relative path of file i in make_tree's layout."""
    return f"a{i // 10000:02d}/b{i // 100 % 100:02d}/f{i % 100:02d}.txt"


# -- generated suite ----------------------------------------------------------------------------

TIMING_PLUGIN = '''
"""Records each test's setup and teardown time; written as JSON at session end."""
import json
import os
import time

import pytest

_times = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    t0 = time.perf_counter_ns()
    try:
        return (yield)
    finally:
        _times.setdefault(item.nodeid, [0, 0])[0] = time.perf_counter_ns() - t0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    t0 = time.perf_counter_ns()
    try:
        return (yield)
    finally:
        _times.setdefault(item.nodeid, [0, 0])[1] = time.perf_counter_ns() - t0


def pytest_sessionfinish(session):
    out = os.environ.get("BENCH_TIMING_OUT")
    if out:
        with open(out, "w") as f:
            json.dump([[k, v[0], v[1]] for k, v in _times.items()], f)
'''

COMMON = """
import os
from pathlib import Path

import pytest

N = int(os.environ.get("BENCH_N", "1"))
BASE = Path(__file__).resolve().parent / "test_datadir"
"""

MODULES = {
    "test_bare.py": COMMON
    + """
@pytest.mark.parametrize("i", range(N))
def test_it(i):
    pass
""",
    "test_tmp_path.py": COMMON
    + """
@pytest.mark.parametrize("i", range(N))
def test_it(i, tmp_path):
    pass
""",
    "test_datadir.py": COMMON
    + """
@pytest.mark.parametrize("i", range(N))
def test_it(i, datadir):
    pass
""",
    # The drop-in for pytest-datadir (ini layers_datadir = true): the same test over the same
    # tree (test_layers_datadir/ is a symlink to test_datadir/, followed as copytree does).
    "test_layers_datadir.py": COMMON
    + """
@pytest.mark.parametrize("i", range(N))
def test_it(i, datadir):
    pass
""",
    "test_copytree.py": COMMON
    + """
import shutil


@pytest.fixture
def tree(tmp_path):
    dst = tmp_path / "tree"
    shutil.copytree(BASE, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("i", range(N))
def test_it(i, tree):
    pass
""",
    "test_pyfakefs.py": COMMON
    + """
@pytest.fixture
def tree(fs):
    fs.add_real_directory(str(BASE))
    return BASE


@pytest.mark.parametrize("i", range(N))
def test_it(i, tree):
    pass
""",
    "test_layers.py": COMMON
    + """
from layerdefs import base  # noqa: F401  (the layer fixture)

pytestmark = pytest.mark.layer("base")


@pytest.mark.parametrize("i", range(N))
def test_it(i, rootfs):
    pass
""",
    "test_layers_diff.py": COMMON
    + """
import json
import time

from benchtree import tree_path
from layerdefs import base  # noqa: F401  (the layer fixture)

pytestmark = pytest.mark.layer("base")
CHANGES = [int(x) for x in os.environ.get("BENCH_CHANGES", "1").split(",")]
REPS = int(os.environ.get("BENCH_REPS", "1"))
FILES = int(os.environ["BENCH_FILES"])


@pytest.mark.parametrize("rep", range(REPS))
@pytest.mark.parametrize("k", CHANGES)
def test_diff(k, rep, rootfs):
    step = max(1, FILES // k)
    for j in range(k):
        (rootfs / tree_path(j * step)).write_bytes(b"changed %d by rep %d\\n" % (j, rep))
    t0 = time.perf_counter_ns()
    changes = rootfs.diff()
    t1 = time.perf_counter_ns()
    changed_files = [c for c in changes if c.kind == "C" and c.path.endswith(".txt")]
    assert len(changed_files) == k, changes[:20]
    t2 = time.perf_counter_ns()
    rootfs.commit()
    t3 = time.perf_counter_ns()
    with open(os.environ["BENCH_DIFF_OUT"], "a") as f:
        f.write(json.dumps({"k": k, "diff_ns": t1 - t0, "commit_ns": t3 - t2}) + "\\n")
""",
    "test_chain.py": COMMON
    + """
from chaindefs import *  # noqa: F403  (the layer fixtures)

pytestmark = pytest.mark.layer("top")


@pytest.mark.parametrize("i", range(N))
def test_it(i, rootfs):
    pass
""",
}

LAYER_IMPORT = """
import os

try:
    from pytest_layers import layer
except ImportError:  # the package re-exports it; older trees only have the module
    from pytest_layers.definitions import layer

from benchtree import make_tree


def _count_build():
    log = os.environ.get("BENCH_BUILD_LOG")
    if log:
        with open(log, "a") as f:
            f.write("%d\\n" % os.getpid())
"""


def layer_defs(files: int) -> str:
    # The file count is written as a literal: it is part of the builder's source and so of its
    # build-cache key, which keeps the layers of different sizes apart in one store.
    return LAYER_IMPORT + textwrap.dedent(
        f"""

        @layer
        def base(root):
            _count_build()
            make_tree(root, {files})
        """
    )


def chain_defs(files: int, layers: int) -> str:
    per = files // layers
    out = [LAYER_IMPORT]
    for j in range(layers):
        name = "top" if j == layers - 1 else f"c{j}"
        parent = "" if j == 0 else f"(parent={f'c{j - 1}'!r})"
        out.append(
            f"\n\n@layer{parent}\ndef {name}(root):\n"
            f"    _count_build()\n    make_tree(root, {per}, start={j * per})\n"
        )
    return "".join(out)


def write_suite(suite: Path, files: int, plan: Plan) -> None:
    """Generate the suite directory for one base size (the base tree is made once)."""
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "pytest.ini").write_text("[pytest]\ntmp_path_retention_policy = failed\n")
    (suite / "benchtiming.py").write_text(TIMING_PLUGIN)
    (suite / "benchtree.py").write_text(
        "from __future__ import annotations\n\nimport os\n\n\n"
        + inspect.getsource(make_tree)
        + "\n\n"
        + inspect.getsource(tree_path)
    )
    (suite / "layerdefs.py").write_text(layer_defs(files))
    (suite / "chaindefs.py").write_text(chain_defs(plan.chain_files, plan.chain_layers))
    for name, text in MODULES.items():
        (suite / name).write_text(text)
    base = suite / "test_datadir"
    if not base.exists():
        staging = suite / "test_datadir.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        make_tree(staging, files, size=FILE_SIZE)
        staging.rename(base)
    link = suite / "test_layers_datadir"
    if not link.is_symlink():
        link.symlink_to("test_datadir")


# -- running pytest -----------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    wall_ms: float
    output: str
    times: list[tuple[str, int, int]] = field(default_factory=list)


# How long ext4 without a journal keeps freed inodes from reuse once they are written back.
DELETE_WINDOW_S = 65.0


class Runner:
    """Runs pytest sessions over a generated suite, as this user or as another one."""

    def __init__(self, scratch: Path, user: str | None = None, src: Path | None = None) -> None:
        self.scratch = scratch
        self.user = user
        #: A checkout whose pytest_layers the sessions import instead of the installed one.
        self.src = src
        self._n = 0

    def _tmp(self, suffix: str) -> Path:
        self._n += 1
        p = self.scratch / f"run{self._n}{suffix}"
        return p

    def pytest(
        self,
        suite: Path,
        module: str,
        *,
        n: int,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        layers: bool = False,
        timing: bool = True,
        quiet: bool = True,
        wrap: Sequence[str] = (),
    ) -> Run:
        basetemp = self._tmp(".bt")
        timing_out = self._tmp(".json")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            module,
            *(["-q"] if quiet else []),
            "-p",
            "benchtiming",
            "-c",
            str(suite / "pytest.ini"),
            "--rootdir",
            str(suite),
            f"--basetemp={basetemp}",
            "-o",
            f"cache_dir={self._tmp('.cache')}",
            *([] if layers else ["-p", "no:layers"]),
            *args,
        ]
        if wrap:
            cmd = [*wrap, *cmd]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "BENCH_"))}
        full_env.update(
            PYTHONPATH=os.pathsep.join([*([str(self.src)] if self.src else []), str(suite)]),
            PYTHONDONTWRITEBYTECODE="1",
            BENCH_N=str(n),
            **(env or {}),
        )
        if timing:
            full_env["BENCH_TIMING_OUT"] = str(timing_out)
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            full_env.update(HOME=pw.pw_dir, USER=self.user, LOGNAME=self.user)
            envargs = [f"{k}={v}" for k, v in full_env.items()]
            cmd = ["runuser", "-u", self.user, "--", "env", "-i", *envargs, *cmd]
        t0 = time.perf_counter_ns()
        proc = subprocess.run(
            cmd, cwd=suite, env=full_env, capture_output=True, text=True, check=False
        )
        wall = (time.perf_counter_ns() - t0) / 1e6
        run = Run(proc.returncode, wall, proc.stdout + proc.stderr)
        if timing and timing_out.exists():
            run.times = [(k, s, t) for k, s, t in json.loads(timing_out.read_text())]
            timing_out.unlink()
        shutil.rmtree(basetemp, ignore_errors=True)
        return run


def why_failed(run: Run) -> str:
    """The most telling line of a failed session's output, for the report."""
    lines = [ln.rstrip() for ln in run.output.splitlines()]
    exc = [ln[1:].strip() for ln in lines if ln.startswith("E   ")]
    if exc:
        return exc[0][:300]
    # pytest's error sections end with the error's message just before the summary header.
    for i, ln in enumerate(lines):
        if "short test summary info" in ln:
            before = [x.strip() for x in lines[:i] if x.strip()]
            if before:
                return before[-1][:300]
    errs = [ln.strip() for ln in lines if "error" in ln.lower()]
    if errs:
        return errs[0][:300]
    rest = [ln.strip() for ln in lines if ln.strip()]
    return (rest[-1] if rest else f"exit code {run.rc}")[:300]


def header_lines(run: Run) -> list[str]:
    """pytest-layers' lines of the report header (backend, why, store)."""
    out = []
    for ln in run.output.splitlines():
        if ln.startswith("collect"):
            break
        if "layers" in ln.lower() and not ln.startswith(("rootdir", "configfile", "plugins")):
            out.append(ln.strip())
    return out


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no samples")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(times: list[tuple[str, int, int]]) -> dict[str, Any]:
    per = [(s + t) / 1e6 for _, s, t in times[1:]]
    setup = [s / 1e6 for _, s, _ in times[1:]]
    teardown = [t / 1e6 for _, _, t in times[1:]]
    first = (times[0][1] + times[0][2]) / 1e6 if times else None
    if not per:
        raise ValueError("a session needs at least two tests to measure per-test overhead")
    return {
        "samples": len(per),
        "median_ms": percentile(per, 50),
        "p10_ms": percentile(per, 10),
        "p90_ms": percentile(per, 90),
        "setup_median_ms": percentile(setup, 50),
        "teardown_median_ms": percentile(teardown, 50),
        "first_test_ms": first,
    }


# -- the measurements ---------------------------------------------------------------------------


@dataclass
class Tool:
    id: str
    label: str
    module: str
    copies: bool  # cost grows with the tree: run fewer tests on big trees
    backend: str | None = None  # pytest-layers backend, None for the other tools
    user: str | None = None
    args: tuple[str, ...] = ()  # more pytest arguments for this tool's sessions
    restricted: bool = False  # run under .ci/restricted.py, the store on an overlayfs


def copy_tests(plan: Plan, files: int) -> int:
    """Tests per session for a copying tool: the plan's figure for the next size up (a size
    given with --sizes may be one the plan has no figure for)."""
    known = sorted(plan.copy_tests)
    return plan.copy_tests[next((k for k in known if k >= files), known[-1])]


SECTIONS = ("per-test", "session-start", "diff", "xdist")


def say(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    def __init__(self, plan: Plan, work: Path, user: str | None, src: Path | None = None) -> None:
        self.plan = plan
        self.work = work
        self.user = user
        self.result: dict[str, Any] = {
            "schema": 1,
            "mode": plan.mode,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(work),
            "plan": {
                "sizes": list(plan.sizes),
                "file_size": FILE_SIZE,
                "tests": plan.tests,
                "copy_tests": {str(k): v for k, v in plan.copy_tests.items()},
            },
            "per_test": [],
            "unavailable": [],
            "headers": {},
            "session_start": [],
            "diff": [],
            "xdist": [],
            "targets": [],
        }
        scratch = work / "runs"
        scratch.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(scratch, src=src)
        self.user_runner = Runner(scratch, user, src) if user else None
        if user:
            # The other user runs the generated suites and writes timings and stores here.
            for p in (work, scratch):
                p.chmod(0o777)

    def suite(self, files: int) -> Path:
        suite = self.work / f"s{files}"
        if not (suite / "test_datadir").exists():
            say(f"  generating a base tree of {files:,} files")
        write_suite(suite, files, self.plan)
        if self.user:
            subprocess.run(["chmod", "-R", "a+rX", str(suite)], check=True)
        return suite

    def store(self, label: str, fresh: bool = False) -> Path:
        path = self.work / "stores" / label
        if fresh and path.exists():
            self._rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.user:
            path.parent.chmod(0o777)
        return path

    def _rmtree(self, path: Path) -> None:
        # Stores hold read-only directories and may belong to the other user.
        subprocess.run(["rm", "-rf", str(path)], check=False)

    def tools(self) -> list[Tool]:
        out = [
            Tool("bare", "bare test (no fixture)", "test_bare.py", copies=False),
            Tool("tmp_path", "tmp_path (empty)", "test_tmp_path.py", copies=False),
            Tool("datadir", "pytest-datadir", "test_datadir.py", copies=True),
            Tool("copytree", "shutil.copytree fixture", "test_copytree.py", copies=True),
            Tool("pyfakefs", "pyfakefs fs", "test_pyfakefs.py", copies=False),
        ]
        for b in BACKENDS:
            # Without the view pool (on by default): every view made and removed in its test.
            out.append(
                Tool(
                    f"layers-{b}",
                    f"pytest-layers ({b})",
                    "test_layers.py",
                    b == "copy",
                    b,
                    args=("-o", "layers_view_pool=0"),
                )
            )
        for b in ("overlay", "fuse"):
            # The view pool (ini layers_view_pool): views prepared ahead by a helper process,
            # retired behind the test (docs/concepts/backends.md, "The view pool").
            out.append(
                Tool(
                    f"layers-{b}-pool",
                    f"pytest-layers ({b}, view pool)",
                    "test_layers.py",
                    copies=False,
                    backend=b,
                    args=("-o", "layers_view_pool=2"),
                )
            )
        out.append(
            Tool(
                "layers-copy-reuse",
                "pytest-layers (copy, reused; restricted)",
                "test_layers.py",
                copies=False,
                backend="auto",
                # Copies reset in the test's own teardown, as this row has always measured.
                args=("-o", "layers_view_pool=0"),
                restricted=True,
            )
        )
        out.append(
            Tool(
                "layers-datadir",
                "pytest-layers datadir drop-in (overlay)",
                "test_layers_datadir.py",
                copies=False,
                backend="overlay",
                args=("-o", "layers_datadir=true", "-p", "no:pytest-datadir"),
            )
        )
        if self.user:
            out.append(
                Tool(
                    "layers-overlay-user",
                    f"pytest-layers (overlay, as {self.user})",
                    "test_layers.py",
                    False,
                    "overlay",
                    self.user,
                )
            )
        return out

    def runner_for(self, tool: Tool) -> Runner:
        if tool.user is not None:
            assert self.user_runner is not None
            return self.user_runner
        return self.runner

    def layers_args(self, tool: Tool, store: Path) -> list[str]:
        assert tool.backend is not None
        return [f"--layers-backend={tool.backend}", f"--layers-store={store}", *tool.args]

    def wrap(self, tool: Tool, files: int) -> tuple[list[str], Path | None]:
        """The command prefix of a restricted tool's sessions and the overlayfs its store is
        on (a fresh empty one per session, as a new container's filesystem is)."""
        if not tool.restricted:
            return [], None
        ovl = self.work / f"ovl-{files}"
        return ["/usr/bin/python3", str(RESTRICTED), "--overlay", str(ovl), "--"], ovl

    def probe(self, tools: list[Tool]) -> list[Tool]:
        """Keep the tools that work here; record why the others do not."""
        suite = self.suite(self.plan.sizes[0])
        ok = []
        for tool in tools:
            args: list[str] = []
            wrap, ovl = self.wrap(tool, 0)
            if tool.backend:
                store = ovl / "store" if ovl else self.store(self.store_label(tool, 0))
                args = self.layers_args(tool, store)
            run = self.runner_for(tool).pytest(
                suite,
                tool.module,
                n=2,
                args=args,
                layers=tool.backend is not None,
                quiet=False,
                wrap=wrap,
            )
            if run.rc == 0 and len(run.times) == 2:
                ok.append(tool)
                if tool.backend:
                    self.result["headers"][tool.label] = header_lines(run)
            else:
                reason = why_failed(run)
                say(f"  {tool.label}: not available ({reason})")
                self.result["unavailable"].append({"tool": tool.label, "reason": reason})
        return ok

    def store_label(self, tool: Tool, files: int) -> str:
        # One store per size and user, shared by the backends: a layer's content does not
        # depend on the backend that mounts it.
        return f"{tool.user or 'self'}-{files}"

    def per_test(self, tools: list[Tool]) -> None:
        # The copying rows delete a whole tree per test. Where the disk is an ext4 without a
        # journal, every file or directory created in the next minute scans past those freed
        # inodes (benchmarks/README.md, "A disk that remembers deletes"), which would slow the
        # rows measured after them: they go last at each size, and the next size waits.
        ordered = sorted(tools, key=lambda t: t.copies)
        copied_at: float | None = None
        for files in self.plan.sizes:
            suite = self.suite(files)
            if copied_at is not None and self.plan.mode != "quick":
                os.sync()
                time.sleep(max(0.0, copied_at + DELETE_WINDOW_S - time.monotonic()))
            copied = False
            for tool in ordered:
                copied = copied or tool.copies
                n = copy_tests(self.plan, files) if tool.copies else self.plan.tests
                args: list[str] = []
                wrap, ovl = self.wrap(tool, files)
                if ovl is not None:
                    # The store starts empty on the container's overlayfs: the first test
                    # (left out of the figures) builds the layer and makes the first copy.
                    args = self.layers_args(tool, ovl / "store")
                elif tool.backend:
                    args = self.layers_args(tool, self.store(self.store_label(tool, files)))
                    # Build (or find) the layer first so that the measured session is warm.
                    warm = self.runner_for(tool).pytest(
                        suite, tool.module, n=1, args=args, layers=True, timing=False
                    )
                    if warm.rc != 0:
                        reason = why_failed(warm)
                        say(f"  {tool.label} at {files:,} files failed: {reason}")
                        self.result["unavailable"].append(
                            {"tool": f"{tool.label} at {files:,} files", "reason": reason}
                        )
                        continue
                run = self.runner_for(tool).pytest(
                    suite, tool.module, n=n, args=args, layers=tool.backend is not None, wrap=wrap
                )
                if run.rc != 0 or len(run.times) < 2:
                    reason = why_failed(run)
                    say(f"  {tool.label} at {files:,} files failed: {reason}")
                    self.result["unavailable"].append(
                        {"tool": f"{tool.label} at {files:,} files", "reason": reason}
                    )
                    continue
                row = {"tool": tool.label, "id": tool.id, "files": files, "tests": n}
                row.update(summarise(run.times))
                row["session_wall_ms"] = run.wall_ms
                self.result["per_test"].append(row)
                say(
                    f"  {tool.label:<40} {files:>7,} files  median {row['median_ms']:9.3f} ms"
                    f"  p10 {row['p10_ms']:9.3f}  p90 {row['p90_ms']:9.3f}  (n={row['samples']})"
                )
            # The copying rows ran last: this is when their deletes ended.
            copied_at = time.monotonic() if copied else None

    def session_start(self, tool: Tool) -> None:
        plan = self.plan
        suite = self.suite(plan.sizes[0])
        label = f"chain-{tool.user or 'self'}-{tool.backend}"
        store = self.store(label, fresh=True)
        args = self.layers_args(tool, store)
        runner = self.runner_for(tool)
        log = self.work / "runs" / f"{label}.builds"
        log.unlink(missing_ok=True)
        env = {"BENCH_BUILD_LOG": str(log)}
        bare = [runner.pytest(suite, "test_bare.py", n=1) for _ in range(plan.warm_starts)]
        cold = runner.pytest(suite, "test_chain.py", n=1, args=args, env=env, layers=True)
        if cold.rc != 0 or not cold.times:
            reason = why_failed(cold)
            say(f"  session start with {tool.label} failed: {reason}")
            self.result["unavailable"].append(
                {"tool": f"session start, {tool.label}", "reason": reason}
            )
            return
        warm = [
            runner.pytest(suite, "test_chain.py", n=1, args=args, env=env, layers=True)
            for _ in range(plan.warm_starts)
        ]
        builds = len(log.read_text().split()) if log.exists() else 0
        common = {"layers": plan.chain_layers, "files": plan.chain_files, "backend": tool.backend}
        rows = [
            {
                "what": "bare pytest session (one test, no fixture)",
                "first_setup_ms": percentile([r.times[0][1] / 1e6 for r in bare], 50),
                "wall_ms": percentile([r.wall_ms for r in bare], 50),
                **common,
                "layers": 0,
                "files": 0,
            },
            {
                "what": f"cold: empty store, every layer built ({tool.label})",
                "first_setup_ms": cold.times[0][1] / 1e6,
                "wall_ms": cold.wall_ms,
                **common,
            },
            {
                "what": f"warm: every layer cached ({tool.label}), median of {len(warm)}",
                "first_setup_ms": percentile([r.times[0][1] / 1e6 for r in warm], 50),
                "wall_ms": percentile([r.wall_ms for r in warm], 50),
                **common,
            },
        ]
        rows[1]["builds"] = builds
        self.result["session_start"] += rows
        for r in rows:
            say(
                f"  {r['what']:<60} first setup {r['first_setup_ms']:10.1f} ms"
                f"  wall {r['wall_ms']:10.1f} ms"
            )
        say(
            f"  builder runs over cold + {len(warm)} warm sessions: {builds}"
            f" (expected {plan.chain_layers})"
        )

    def diff_cost(self, tool: Tool) -> None:
        plan = self.plan
        suite = self.suite(plan.diff_base)
        store = self.store(self.store_label(tool, plan.diff_base))
        out = self.work / "runs" / f"diff-{tool.id}.jsonl"
        out.unlink(missing_ok=True)
        if self.user:
            out.touch()
            out.chmod(0o666)
        # A copying backend copies the whole base per test (where root may mount, its copies
        # are bound nosuid,nodev and not reused): one repetition, or 28 copies of 100,000 files
        # (about 25 minutes here) for four medians.
        reps = 1 if tool.copies else plan.diff_reps
        env = {
            "BENCH_CHANGES": ",".join(map(str, plan.diff_changes)),
            "BENCH_REPS": str(reps),
            "BENCH_FILES": str(plan.diff_base),
            "BENCH_DIFF_OUT": str(out),
        }
        run = self.runner_for(tool).pytest(
            suite,
            "test_layers_diff.py",
            n=1,
            args=[*self.layers_args(tool, store), "--layers-keep=never"],
            env=env,
            layers=True,
            timing=False,
        )
        if run.rc != 0:
            reason = why_failed(run)
            say(f"  diff() with {tool.label} failed: {reason}")
            self.result["unavailable"].append({"tool": f"diff(), {tool.label}", "reason": reason})
            return
        samples = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
        for k in plan.diff_changes:
            mine = [s for s in samples if s["k"] == k]
            row = {
                "backend": tool.label,
                "base_files": plan.diff_base,
                "changes": k,
                "samples": len(mine),
                "diff_median_ms": percentile([s["diff_ns"] / 1e6 for s in mine], 50),
                "diff_p90_ms": percentile([s["diff_ns"] / 1e6 for s in mine], 90),
                "commit_median_ms": percentile([s["commit_ns"] / 1e6 for s in mine], 50),
            }
            self.result["diff"].append(row)
            say(
                f"  {tool.label:<40} {k:>5} changes  diff {row['diff_median_ms']:9.2f} ms"
                f"  commit {row['commit_median_ms']:9.2f} ms"
            )

    def xdist(self, layer_tool: Tool | None) -> None:
        plan = self.plan
        suite = self.suite(plan.xdist_files)
        tmp_tool = Tool("tmp_path", "tmp_path (empty)", "test_tmp_path.py", copies=False)
        for tool in [tmp_tool] + ([layer_tool] if layer_tool else []):
            runner = self.runner_for(tool)
            for workers in plan.xdist_workers:
                xargs = ["-n", str(workers)] if workers else ["-p", "no:xdist"]
                row: dict[str, Any] = {
                    "tool": tool.label,
                    "tests": plan.xdist_tests,
                    "files": plan.xdist_files,
                    "workers": workers,
                }
                if tool.backend:
                    store = self.store(f"xdist-{tool.user or 'self'}-{workers}", fresh=True)
                    log = self.work / "runs" / f"xdist-{workers}.builds"
                    log.unlink(missing_ok=True)
                    env = {"BENCH_BUILD_LOG": str(log)}
                    args = [*xargs, *self.layers_args(tool, store)]
                    cold = runner.pytest(
                        suite,
                        "test_layers.py",
                        n=plan.xdist_tests,
                        args=args,
                        env=env,
                        layers=True,
                        timing=False,
                    )
                    warm = runner.pytest(
                        suite,
                        "test_layers.py",
                        n=plan.xdist_tests,
                        args=args,
                        env=env,
                        layers=True,
                        timing=False,
                    )
                    if cold.rc != 0 or warm.rc != 0:
                        reason = why_failed(cold if cold.rc else warm)
                        say(f"  xdist -n {workers} with {tool.label} failed: {reason}")
                        self.result["unavailable"].append(
                            {"tool": f"xdist -n {workers}, {tool.label}", "reason": reason}
                        )
                        continue
                    row["cold_wall_ms"] = cold.wall_ms
                    row["wall_ms"] = warm.wall_ms
                    row["builds"] = len(log.read_text().split()) if log.exists() else 0
                else:
                    run = runner.pytest(
                        suite, tool.module, n=plan.xdist_tests, args=xargs, timing=False
                    )
                    if run.rc != 0:
                        self.result["unavailable"].append(
                            {"tool": f"xdist -n {workers}, {tool.label}", "reason": why_failed(run)}
                        )
                        continue
                    row["wall_ms"] = run.wall_ms
                self.result["xdist"].append(row)
                extra = (
                    f", cold {row['cold_wall_ms']:.0f} ms, builds {row['builds']}"
                    if "builds" in row
                    else ""
                )
                say(f"  {tool.label:<40} -n {workers}: {row['wall_ms']:.0f} ms{extra}")


# -- targets (benchmarks/README.md) ------------------------------------------------------------


def targets(result: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    per = result["per_test"]

    def rows(tool_id: str) -> dict[int, dict[str, Any]]:
        return {r["files"]: r for r in per if r["id"] == tool_id}

    ov = rows("layers-overlay")
    tmp = rows("tmp_path")
    full_sizes = plan.sizes[-1] == 100_000
    if ov:
        worst = max(r["median_ms"] for r in ov.values())
        span = ", ".join(f"{_fmt(r['median_ms'])} ms at {n:,}" for n, r in sorted(ov.items()))
        out.append(
            {
                "target": "overlay per-test setup + teardown, no changes: median <= 1 ms",
                "measured": span,
                "met": worst <= 1.0,
            }
        )
        lo, hi = min(ov), max(ov)
        ratio = ov[hi]["median_ms"] / ov[lo]["median_ms"]
        out.append(
            {
                "target": "flat in base size: 100,000-file base within 1.2x of a 10-file base",
                "measured": f"{ratio:.2f}x ({hi:,} vs {lo:,} files)",
                "met": ratio <= 1.2 if full_sizes else None,
            }
        )
        if tmp:
            both = sorted(set(ov) & set(tmp))
            rel = max(ov[n]["median_ms"] / tmp[n]["median_ms"] for n in both)
            out.append(
                {
                    "target": "stretch: median <= 0.6 ms and within 2x of an empty tmp_path",
                    "measured": f"worst median {_fmt(worst)} ms, {rel:.2f}x tmp_path",
                    "met": worst <= 0.6 and rel <= 2.0,
                }
            )
    pool, bare, fuse_pool = rows("layers-overlay-pool"), rows("bare"), rows("layers-fuse-pool")
    if pool and tmp and bare:
        both = sorted(set(pool) & set(tmp) & set(bare))
        vs_tmp = {n: pool[n]["median_ms"] / tmp[n]["median_ms"] for n in both}
        vs_bare = {n: pool[n]["median_ms"] / bare[n]["median_ms"] for n in both}
        spread = {n: pool[n]["p90_ms"] / pool[n]["median_ms"] for n in both}
        out.append(
            {
                "target": "view pool (overlay): median <= 0.5x an empty tmp_path and <= 3x a bare "
                "test at every size, p90 <= 2x its median",
                "measured": "; ".join(
                    f"{n:,}: {_fmt(pool[n]['median_ms'])} ms = {vs_tmp[n]:.2f}x tmp_path, "
                    f"{vs_bare[n]:.1f}x bare, p90 {spread[n]:.1f}x median"
                    for n in both
                ),
                "met": all(vs_tmp[n] <= 0.5 and vs_bare[n] <= 3 and spread[n] <= 2 for n in both),
            }
        )
    if fuse_pool:
        worst = max(r["median_ms"] for r in fuse_pool.values())
        out.append(
            {
                "target": "view pool (fuse): median <= 3 ms at every size",
                "measured": ", ".join(
                    f"{_fmt(r['median_ms'])} ms at {n:,}" for n, r in sorted(fuse_pool.items())
                ),
                "met": worst <= 3.0,
            }
        )
    reuse = rows("layers-copy-reuse")
    for n, limit in ((10_000, 10.0), (100_000, 50.0)):
        out.append(
            {
                "target": f"copy backend, reused copies (restricted environment), {n:,} files: "
                f"median <= {limit:g} ms",
                "measured": f"{_fmt(reuse[n]['median_ms'])} ms" if n in reuse else "not run",
                "met": reuse[n]["median_ms"] <= limit if n in reuse else None,
            }
        )
    dd, drop_in = rows("datadir"), rows("layers-datadir")
    if dd and drop_in:
        both = sorted(set(dd) & set(drop_in))
        speedups = {n: dd[n]["median_ms"] / drop_in[n]["median_ms"] for n in both}
        out.append(
            {
                "target": "datadir drop-in >= 1,000x faster than pytest-datadir at 10,000 files",
                "measured": ", ".join(f"{speedups[n]:,.0f}x at {n:,}" for n in both),
                "met": speedups[10_000] >= 1000 if 10_000 in speedups else None,
            }
        )
    diff10 = [d for d in result["diff"] if d["changes"] == 10 and "overlay" in d["backend"]]
    if diff10:
        d = diff10[0]
        out.append(
            {
                "target": "diff() of 10 changed files on a 100,000-file base <= 5 ms (overlay)",
                "measured": f"{_fmt(d['diff_median_ms'])} ms on a {d['base_files']:,}-file base"
                f" (commit {_fmt(d['commit_median_ms'])} ms)",
                "met": d["diff_median_ms"] <= 5.0 if d["base_files"] == 100_000 else None,
            }
        )
    warm = [s for s in result["session_start"] if s["what"].startswith("warm")]
    if warm:
        w = warm[0]
        out.append(
            {
                "target": "warm session start, 10-layer chain of 100,000 files: <= 50 ms",
                "measured": f"{_fmt(w['first_setup_ms'])} ms to resolve and mount "
                f"{w['layers']} layers of {w['files']:,} files",
                "met": w["first_setup_ms"] <= 50.0 if w["files"] == 100_000 else None,
            }
        )
    xd = [x for x in result["xdist"] if x.get("builds") is not None and x["workers"]]
    if xd:
        top = max(xd, key=lambda x: x["workers"])
        out.append(
            {
                "target": "pytest-xdist -n 4: each layer built exactly once per store",
                "measured": f"-n {top['workers']}: builder ran {top['builds']} time(s)",
                "met": top["builds"] == 1 if top["workers"] == 4 else None,
            }
        )
    return out


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


# -- machine description ------------------------------------------------------------------------


def machine(work: Path) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    packages = {}
    for dist in (
        "pytest",
        "pytest-layers",
        "pytest-datadir",
        "pyfakefs",
        "pytest-xdist",
        "pluggy",
    ):
        try:
            packages[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            packages[dist] = None
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "os": _os_name(),
        "filesystem": filesystem_of(work),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uid": os.getuid(),
        "packages": packages,
        "commit": commit or None,
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def filesystem_of(path: Path) -> str:
    """Filesystem type of the mount holding path (longest mount point prefix in mountinfo)."""
    best, fstype = "", "unknown"
    real = str(path.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return fstype
    for line in lines:
        left, _, right = line.partition(" - ")
        mnt = left.split()[4].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, right.split()[0]
    return fstype


# -- chart --------------------------------------------------------------------------------------


def chart(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_diff = bool(result["diff"])
    fig, axes = plt.subplots(
        1, 2 if with_diff else 1, figsize=(13 if with_diff else 8, 5.2), squeeze=False
    )
    ax = axes[0][0]
    tools: list[str] = []
    for r in result["per_test"]:
        if r["tool"] not in tools:
            tools.append(r["tool"])
    for tool in tools:
        rows = sorted(
            (r for r in result["per_test"] if r["tool"] == tool), key=lambda r: r["files"]
        )
        xs = [r["files"] for r in rows]
        style = "-" if tool.startswith("pytest-layers") else "--"
        width = 2.4 if tool.startswith("pytest-layers") else 1.4
        (line,) = ax.plot(
            xs, [r["median_ms"] for r in rows], style, marker="o", lw=width, label=tool
        )
        ax.fill_between(
            xs,
            [r["p10_ms"] for r in rows],
            [r["p90_ms"] for r in rows],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("files in the base tree")
    ax.set_ylabel("setup + teardown per test (ms, median; band p10-p90)")
    ax.set_title("Per-test overhead")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if with_diff:
        ax2 = axes[0][1]
        for backend in dict.fromkeys(d["backend"] for d in result["diff"]):
            rows = [d for d in result["diff"] if d["backend"] == backend]
            xs = [d["changes"] for d in rows]
            (line,) = ax2.plot(
                xs, [d["diff_median_ms"] for d in rows], "-o", label=f"{backend} diff()"
            )
            ax2.plot(
                xs,
                [d["commit_median_ms"] for d in rows],
                ":s",
                color=line.get_color(),
                label=f"{backend} commit()",
            )
        base = result["diff"][0]["base_files"]
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel(f"files changed by the test ({base:,}-file base)")
        ax2.set_ylabel("ms (median)")
        ax2.set_title("diff() and commit() cost")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, {m['filesystem']}, "
        f"{m['python']} ({result['mode']} run, {result['created']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------


def _int_list(flag: str) -> Any:
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: give positive whole numbers separated by commas, e.g. 10,10000"
            )
        return values

    return parse


def _choices(flag: str, known: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in values if x not in known]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                f"choose from {', '.join(known)}"
            )
        return values

    return parse


#: Every row's id, for --tools (the --as-user row exists only with --as-user).
TOOL_IDS = (
    "bare",
    "tmp_path",
    "datadir",
    "copytree",
    "pyfakefs",
    *(f"layers-{b}" for b in BACKENDS),
    "layers-overlay-pool",
    "layers-fuse-pool",
    "layers-copy-reuse",
    "layers-datadir",
    "layers-overlay-user",
)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="10 and 1,000 files, few tests (CI)")
    ap.add_argument(
        "--out",
        type=Path,
        help="Directory for benchmarks.json and benchmarks.png "
        "(default: docs/assets, benchmarks/results/compare-quick with --quick, "
        "benchmarks/results/compare-partial with --only, --sizes, --tools, --tests or --src)",
    )
    ap.add_argument(
        "--as-user",
        metavar="USER",
        help="Also measure pytest-layers' overlay backend as this ordinary user (needs root)",
    )
    ap.add_argument(
        "--workdir", type=Path, help="Where to generate suites and stores (created if missing)"
    )
    ap.add_argument("--keep", action="store_true", help="Keep the work directory")
    ap.add_argument(
        "--only",
        type=_choices("--only", SECTIONS),
        metavar="SECTIONS",
        help=f"Run only these sections, comma-separated: {', '.join(SECTIONS)} (default: all)",
    )
    ap.add_argument(
        "--sizes",
        type=_int_list("--sizes"),
        metavar="N,N",
        help="Base-tree sizes of the per-test rows, in files (default: the plan's)",
    )
    ap.add_argument(
        "--tools",
        type=_choices("--tools", TOOL_IDS),
        metavar="ID,ID",
        help=f"Per-test rows to measure, by id: {', '.join(TOOL_IDS)} (default: every row "
        "that works here)",
    )
    ap.add_argument(
        "--tests",
        type=lambda text: _int_list("--tests")(text)[0],
        metavar="N",
        help="Tests per session for the rows that do not copy the tree (default: 200, 30 with "
        "--quick)",
    )
    ap.add_argument(
        "--src",
        type=Path,
        metavar="DIR",
        help="Measure the pytest_layers package of this checkout (put first on the sessions' "
        "PYTHONPATH) instead of the installed one: for A/B runs against another branch",
    )
    args = ap.parse_args(argv)
    if args.workdir is not None:
        # Created like --out; only a path that cannot be a directory is refused, in one line.
        try:
            args.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            ap.error(f"--workdir {args.workdir}: cannot create it: {exc.strerror}")
    if args.src is not None:
        args.src = args.src.resolve()
        if not (args.src / "pytest_layers" / "__init__.py").is_file():
            ap.error(f"--src {args.src}: no pytest_layers package there (give a checkout's root)")
    plan = QUICK if args.quick else FULL
    if args.sizes:
        plan = dataclasses.replace(plan, sizes=args.sizes)
    if args.tests:
        plan = dataclasses.replace(plan, tests=args.tests)
    sections = set(args.only or SECTIONS)
    partial = bool(args.only or args.sizes or args.tools or args.tests or args.src)
    out = args.out or (
        REPO / "benchmarks" / "results" / "compare-quick"
        if args.quick
        else REPO / "benchmarks" / "results" / "compare-partial"
        if partial
        else REPO / "docs" / "assets"
    )
    if args.as_user and os.getuid() != 0:
        ap.error("--as-user needs root (it runs sessions through runuser)")
    if args.as_user:
        try:
            pwd.getpwnam(args.as_user)
        except KeyError:
            ap.error(f"--as-user: no user named {args.as_user!r}")
    # SIGTERM becomes SystemExit so that the work directory is removed and subprocess.run kills
    # the pytest session it is waiting for.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix="bench-compare-", dir=args.workdir))
    say(f"{plan.mode} run in {work}" + (f" (package from {args.src})" if args.src else ""))
    try:
        bench = Bench(plan, work, args.as_user, args.src)
        tools = bench.tools()
        if args.tools:
            tools = [t for t in tools if t.id in args.tools]
        say("checking which tools work here")
        tools = bench.probe(tools)
        if "per-test" in sections:
            say("per-test overhead")
            bench.per_test(tools)
        # rootfs tools only (the datadir drop-in has its own row in per_test).
        layer_tools = [t for t in tools if t.backend and not t.args and not t.restricted]
        fastest = layer_tools[0] if layer_tools else None
        if fastest:
            if "session-start" in sections:
                say(
                    f"session start ({plan.chain_layers}-layer chain of {plan.chain_files:,} files)"
                )
                bench.session_start(fastest)
            if "diff" in sections:
                say(f"diff() and commit() on a {plan.diff_base:,}-file base")
                for tool in layer_tools:
                    bench.diff_cost(tool)
        elif sections - {"per-test"}:
            say("pytest-layers is not usable here: session start, diff() and xdist rows skipped")
        if "xdist" in sections:
            say("pytest-xdist")
            bench.xdist(fastest)
        bench.result["targets"] = targets(bench.result, plan)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmarks.json").write_text(json.dumps(bench.result, indent=2) + "\n")
        chart(bench.result, out / "benchmarks.png")
        say(f"wrote {out / 'benchmarks.json'} and {out / 'benchmarks.png'}")
        for t in bench.result["targets"]:
            verdict = {True: "met", False: "MISSED", None: "n/a in this mode"}[t["met"]]
            say(f"  [{verdict}] {t['target']}: {t['measured']}")
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
