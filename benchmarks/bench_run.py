"""``/bin/true`` inside an image: the sandbox behind ``rootfs.run()`` against the floors.

Measured on a busybox-static tree (the image the fast tests use): ``Sandbox.run`` (what
``rootfs.run`` adds on top is argument checks and a pipe or two) with the init in use (the
compiled one where it builds: its line says which), the same with the Python init (started by
the fork helper, ``_zygote``), the Python init without the helper (forked from this process),
and in the same run ``subprocess.run`` on the host, ``chroot DIR /bin/true`` (root only),
``bwrap --bind DIR / /bin/true`` (the target's floor), bwrap with the isolation ``run()`` gives
(all namespaces, /proc, /dev, a hostname, a /tmp; for context) and ``unshare --root DIR`` (root
only: ``-r`` for an ordinary user). ``--no-debian`` leaves out the Debian suite. Prints
median and p99 per call in ms (and the CPU time per call: user + system, of this process and
every process it started) and writes ``benchmarks/results/run-root.json`` or ``run-user.json``
(``run-WHO-quick.json`` with ``--quick``; or ``--out``).
Run it as root and as an ordinary user (``runuser -u layersci -- ...``).

Targets (issue 14): median <= 5 ms, within 1.5x of bwrap, p99 <= 15 ms.

With the real Debian image of the end-to-end tests (PYTEST_LAYERS_DEBIAN_IMAGE and
PYTEST_LAYERS_DEBIAN_DEBS, from `.ci/debian_image.py`), also the Debian suite: a pytest session
of K tests that each ``dpkg -i`` a real .deb through ``rootfs.run`` and check the diff, timed
per test (setup, call and teardown, from the JUnit report), and the whole session cold (a fresh
store: the image is imported) against warm (the same store again).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_layers import _linux, namespaces, sandbox
from pytest_layers.sandbox import Sandbox

try:
    from pytest_layers import _zygote
except ImportError:  # an earlier checkout, measured with PYTHONPATH for an A/B: no helper
    _zygote = None  # type: ignore[assignment]
try:  # the compiled init (absent from checkouts before it)
    from pytest_layers import _cinit
except ImportError:
    _cinit = None  # type: ignore[assignment]

RESULTS = Path(__file__).resolve().parent / "results"


def busybox_image(root: Path) -> Path:
    for name in ("bin", "etc", "tmp", "proc", "dev"):
        (root / name).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "true"):
        os.symlink("busybox", root / "bin" / applet)
    return root


def cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (every sandbox process
    it started), plus the sandbox's fork helper and the children it reaped (init and the
    program of every sandbox it started)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    helper = _zygote.running() if _zygote is not None else None
    if helper is not None:
        with open(f"/proc/{helper}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime (fields 14-17 of proc(5), counted after the name)
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def grow_heap(megabytes: int) -> list[Any]:
    """Live Python objects until this process holds ``megabytes`` of anonymous memory: a
    caller the size of a pytest session (this project's own suite holds about 50 MB once
    collected), whose fork is what the sandbox's fork helper avoids."""
    ballast: list[Any] = []
    while _anon_mb() < megabytes:
        ballast.extend({"k": [i, str(i)]} for i in range(10_000))
    return ballast


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(fn: Callable[[], Any], n: int) -> dict[str, float]:
    for _ in range(max(n // 20, 3)):  # warm the page cache and the allocator
        fn()
    times = []
    cpu = cpu_seconds()
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    cpu = cpu_seconds() - cpu
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
        # CPU per call moves far less than wall time when other work shares the machine (kernel
        # work in worker threads, as a network namespace's cleanup, is not in it).
        "cpu_ms": round(cpu * 1000 / n, 3),
        "n": n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="calls per case (default 300)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--no-debian", action="store_true", help="skip the Debian suite (only the per-call rows)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="30 calls per case, results to run-WHO-quick.json (CI)"
    )
    parser.add_argument(
        "--caller-mb",
        type=int,
        default=0,
        help="grow this process to that many MB of live objects first (a pytest session's size)",
    )
    parser.add_argument(
        "--session-userns",
        action="store_true",
        help="as an ordinary user, enter the user namespace a pytest session enters first "
        "(subordinate ids mapped there when the user has a range): what rootfs.run sees",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 30)
    root = os.geteuid() == 0
    if args.session_userns and not root:
        namespaces.enter_user_namespace()
    ballast = grow_heap(args.caller_mb)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        image = busybox_image(Path(tmp) / "image")
        box = Sandbox(image)
        null = subprocess.DEVNULL
        helper = _zygote.get(sandbox._identity, wait=30) if _zygote is not None else None
        if helper is None:
            print("no fork helper (an earlier checkout, or it cannot run here)")
        if args.session_userns and not root:
            # The session's ambient capabilities (the helper has them: it started above) would
            # follow bwrap and unshare across exec, and bwrap refuses to run with any.
            _linux.ambient_clear_all()

        def run_in(which: Sandbox) -> Callable[[], None]:
            def run() -> None:
                assert which.run(["/bin/true"]) == 0

            return run

        def python_init(which: Sandbox) -> Callable[[], None]:
            run = run_in(which)

            def under_python_init() -> None:
                os.environ["PYTEST_LAYERS_INIT"] = "python"
                try:
                    run()
                finally:
                    os.environ.pop("PYTEST_LAYERS_INIT")

            return under_python_init

        init = _cinit.describe() if _cinit is not None else "init: python (an earlier checkout)"
        print(init)
        cases: dict[str, Callable[[], Any]] = {"sandbox (rootfs.run)": run_in(box)}
        if _cinit is not None and _cinit.choose().binary is not None:
            cases["sandbox, python init"] = python_init(box)
        if helper is not None:
            no_helper = Sandbox(image, helper=False)
            cases["sandbox, no helper"] = (
                python_init(no_helper) if _cinit is not None else run_in(no_helper)
            )

        cases["subprocess.run host"] = lambda: subprocess.run(["/bin/true"], check=True)
        if root:
            cases["chroot"] = lambda: subprocess.run(
                ["chroot", str(image), "/bin/true"], check=True
            )
        if shutil.which("bwrap"):
            cases["bwrap --bind DIR /"] = lambda: subprocess.run(
                ["bwrap", "--bind", str(image), "/", "/bin/true"], check=True, stderr=null
            )
            # What run() does besides the root, for context (the target's floor stays the
            # plain bind above, as the issue names it).
            same = ["--unshare-all", "--unshare-user", "--proc", "/proc", "--dev", "/dev"]
            same += ["--die-with-parent", "--hostname", "x", "--tmpfs", "/tmp"]
            cases["bwrap, same isolation"] = lambda: subprocess.run(
                ["bwrap", "--bind", str(image), "/", *same, "/bin/true"], check=True, stderr=null
            )
        if shutil.which("unshare"):
            extra = [] if root else ["-r"]
            cases["unshare --root"] = lambda: subprocess.run(
                ["unshare", *extra, "--root", str(image), "/bin/true"], check=True
            )
        results = {name: measure(fn, args.n) for name, fn in cases.items()}
    who = "root" if root else "user"
    where = " in the session's user namespace" if args.session_userns and not root else ""
    print(f"/bin/true per call as {who}{where}, caller {_anon_mb():.0f} MB (n={args.n}), ms:")
    del ballast
    floor = results.get("bwrap --bind DIR /")
    for name, r in results.items():
        ratio = f"  {r['median_ms'] / floor['median_ms']:5.2f}x bwrap" if floor else ""
        print(
            f"  {name:24} median {r['median_ms']:7.2f}  p99 {r['p99_ms']:7.2f}"
            f"  cpu {r['cpu_ms']:6.2f}{ratio}"
        )
    report: dict[str, Any] = {
        "who": who,
        "cpus": os.cpu_count(),
        "caller_mb": args.caller_mb,
        "session_userns": args.session_userns,
        "init": init,
        "results": results,
    }
    if args.no_debian:
        report["debian"] = {"skipped": "--no-debian"}
    else:
        report["debian"] = debian_suite(
            tests=3 if args.quick else 20, warm_runs=1 if args.quick else 3
        )
    out = args.out or RESULTS / f"run-{who}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return 0


DEBIAN_CONFTEST = """
import os
from pytest_layers import oci_image

debian = oci_image("debian", os.environ["PYTEST_LAYERS_DEBIAN_IMAGE"])
"""

DEBIAN_TESTS = """
import os, pytest

DEBS = os.environ["PYTEST_LAYERS_DEBIAN_DEBS"]
DEB = sorted(f for f in os.listdir(DEBS) if f.endswith(".deb"))[0]
PKG = DEB.split("_")[0]

@pytest.mark.layer("debian")
@pytest.mark.parametrize("i", range(int(os.environ["BENCH_TESTS"])))
def test_dpkg_install(rootfs, i):
    rootfs.run(["dpkg", "-i", "/debs/" + DEB], binds=[(DEBS, "/debs")], check=True)
    assert "C /var/lib/dpkg/status" in [str(c) for c in rootfs.diff()]
"""


def debian_suite(tests: int, warm_runs: int) -> dict[str, Any]:
    """The Debian suite's costs (see the module's docstring); ``{"skipped": why}`` without
    the image."""
    import xml.etree.ElementTree as ET

    if not (
        os.environ.get("PYTEST_LAYERS_DEBIAN_IMAGE") and os.environ.get("PYTEST_LAYERS_DEBIAN_DEBS")
    ):
        why = "PYTEST_LAYERS_DEBIAN_IMAGE/_DEBS are not set (.ci/debian_image.py builds them)"
        print(f"Debian suite: skipped: {why}")
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="bench-debian-") as tmp:
        project = Path(tmp)
        (project / "conftest.py").write_text(DEBIAN_CONFTEST)
        (project / "test_dpkg.py").write_text(DEBIAN_TESTS)
        store = project / "store"

        def session(n: int) -> tuple[float, list[float]]:
            junit = project / f"junit-{n}.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            cmd += [f"--layers-store={store}", f"--junitxml={junit}", f"--basetemp={project}/bt"]
            env = {**os.environ, "BENCH_TESTS": str(tests)}
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
            took = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"Debian suite failed:\n{proc.stdout}\n{proc.stderr}")
            per_test = [
                float(case.get("time", 0)) * 1000 for case in ET.parse(junit).iter("testcase")
            ]
            return took, per_test

        cold, cold_tests = session(0)
        warm = []
        per_test: list[float] = []
        for i in range(warm_runs):
            took, times = session(i + 1)
            warm.append(took)
            per_test += times
    per_test.sort()
    result = {
        "tests": tests,
        "cold_session_s": round(cold, 2),
        "warm_session_s": round(statistics.median(warm), 2),
        "per_test_median_ms": round(statistics.median(per_test), 1),
        "per_test_p99_ms": round(per_test[min(len(per_test) - 1, int(len(per_test) * 0.99))], 1),
        "first_test_cold_ms": round(cold_tests[0], 1) if cold_tests else None,
    }
    print(
        f"Debian suite ({tests} tests of dpkg -i + diff): "
        f"session cold {result['cold_session_s']} s, "
        f"warm {result['warm_session_s']} s; per test median {result['per_test_median_ms']} ms, "
        f"p99 {result['per_test_p99_ms']} ms"
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
