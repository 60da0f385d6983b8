"""``/bin/true`` inside an image: the sandbox behind ``rootfs.run()`` against the floors.

Measured on a busybox-static tree (the image the fast tests use): ``Sandbox.run`` (what
``rootfs.run`` adds on top is argument checks and a pipe or two), and in the same run
``subprocess.run`` on the host, ``chroot DIR /bin/true`` (root only), ``bwrap --bind DIR /
/bin/true`` and ``unshare --root DIR`` (root only: ``-r`` for an ordinary user). Prints
median and p99 per call in ms (and the CPU time per call: user + system, of this process and
every process it started) and writes ``benchmarks/results/run-root.json`` or ``run-user.json``
(``run-WHO-quick.json`` with ``--quick``; or ``--out``).
Run it as root and as an ordinary user (``runuser -u layersci -- ...``).

Targets (issue 14): median <= 5 ms, within 1.5x of bwrap, p99 <= 15 ms.
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

from pytest_layers.sandbox import Sandbox

RESULTS = Path(__file__).resolve().parent / "results"


def busybox_image(root: Path) -> Path:
    for name in ("bin", "etc", "tmp", "proc", "dev"):
        (root / name).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "true"):
        os.symlink("busybox", root / "bin" / applet)
    return root


def cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (every sandbox process)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


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
        "--quick", action="store_true", help="30 calls per case, results to run-WHO-quick.json (CI)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 30)
    root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        image = busybox_image(Path(tmp) / "image")
        box = Sandbox(image)
        null = subprocess.DEVNULL

        def sandbox() -> None:
            assert box.run(["/bin/true"]) == 0

        cases: dict[str, Callable[[], Any]] = {
            "sandbox (rootfs.run)": sandbox,
            "subprocess.run host": lambda: subprocess.run(["/bin/true"], check=True),
        }
        if root:
            cases["chroot"] = lambda: subprocess.run(
                ["chroot", str(image), "/bin/true"], check=True
            )
        if shutil.which("bwrap"):
            cases["bwrap --bind DIR /"] = lambda: subprocess.run(
                ["bwrap", "--bind", str(image), "/", "/bin/true"], check=True, stderr=null
            )
        if shutil.which("unshare"):
            extra = [] if root else ["-r"]
            cases["unshare --root"] = lambda: subprocess.run(
                ["unshare", *extra, "--root", str(image), "/bin/true"], check=True
            )
        results = {name: measure(fn, args.n) for name, fn in cases.items()}
    who = "root" if root else "user"
    print(f"/bin/true per call as {who} (n={args.n}), ms:")
    for name, r in results.items():
        print(
            f"  {name:24} median {r['median_ms']:7.2f}  p99 {r['p99_ms']:7.2f}"
            f"  cpu {r['cpu_ms']:6.2f}"
        )
    out = args.out or RESULTS / f"run-{who}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"who": who, "cpus": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
