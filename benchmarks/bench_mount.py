"""Per-test rootfs cycle (make scratch, open view, close view) for each backend that works here.

Bases of 10, 10,000 and 100,000 files (1 KiB each, 1,000 per directory), plus a
``shutil.copytree`` baseline. Kernel overlay is measured twice: with its scratch (upper/work) on
the base's filesystem and on a tmpfs of our own (``namespaces.mount_scratch_tmpfs``).

Mounts happen inside a private mount namespace (root) or a user namespace (ordinary user)
entered at start, so nothing can outlive the benchmark. Writes ``benchmarks/results/mount.json``
(or ``--out``) and prints a table. ``--quick``: fewer iterations, 10 and 10,000 files only.

Targets (benchmarks/README.md): overlay median <= 1 ms and flat in base size (100k within 1.2x of
10); copy at least 2x faster than ``shutil.copytree``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_layers import _linux, namespaces
from pytest_layers.backends import detect
from pytest_layers.backends.base import Backend

RESULTS = Path(__file__).resolve().parent / "results"


def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4]
            sep = fields.index("-")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(
                best
            ):
                best, fstype = point, fields[sep + 1]
    return fstype


def _machine(base_dir: Path) -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "fs": _fs_type(base_dir),
        "python": platform.python_version(),
        "uid": os.getuid(),
        "load_avg_1m": os.getloadavg()[0],
    }


def _make_base(root: Path, files: int) -> None:
    payload = b"x" * 1024
    for i in range(files):
        d = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}").write_bytes(payload)


def _stats(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p99_ms": p99 * 1e3,
        "runs": len(ordered),
    }


def _time(cycle: Callable[[int], None], runs: int, warmup: int) -> dict[str, Any]:
    for i in range(warmup):
        cycle(-1 - i)
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        cycle(i)
        samples.append(time.perf_counter() - start)
    return _stats(samples)


def _backend_cycle(backend: Backend, base: Path, scratch_root: Path) -> Callable[[int], None]:
    def cycle(i: int) -> None:
        scratch = scratch_root / f"v{i}"
        scratch.mkdir()
        view = backend.open([base], scratch)
        view.close()
        if scratch.exists():  # the contract says close() removes it; don't let a bug skew
            raise RuntimeError(f"{backend.name}: close() left {scratch}")

    return cycle


def _copytree_cycle(base: Path, scratch_root: Path) -> Callable[[int], None]:
    def cycle(i: int) -> None:
        dest = scratch_root / f"c{i}"
        shutil.copytree(base, dest, symlinks=True)
        shutil.rmtree(dest)

    return cycle


def _runs(kind: str, files: int, quick: bool) -> tuple[int, int]:
    if kind.startswith("overlay"):
        return (100, 10) if quick else (500, 20)
    if kind == "fuse":
        return (20, 3) if quick else (100, 5)
    # copy-like: proportional to the base size
    if files <= 10:
        return (20, 2) if quick else (100, 5)
    return (3, 0) if quick or files > 10_000 else (5, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer runs, 10 and 10k files")
    parser.add_argument("--out", type=Path, help="Results file (default: results/mount.json)")
    parser.add_argument("--dir", type=Path, help="Where to build the bases (default: $TMPDIR)")
    args = parser.parse_args(argv)
    sizes = [10, 10_000] if args.quick else [10, 10_000, 100_000]
    out = args.out or RESULTS / ("mount-quick.json" if args.quick else "mount.json")

    # SIGTERM (timeout, CI cancel) must still run the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Before anything else: no thread may exist when the namespace is entered.
    if os.geteuid() == 0:
        namespaces.enter_private_mount_namespace()
    else:
        namespaces.enter_user_namespace()

    work = Path(tempfile.mkdtemp(prefix="bench-mount-", dir=args.dir))
    results: dict[str, Any] = {
        "benchmark": "mount",
        "cycle": "mkdir scratch + open view + close view (unmount, remove scratch)",
        "machine": _machine(work),
        "backends": {},
        "skipped": {},
    }
    try:
        backends: dict[str, Backend] = {}
        for name in detect.BACKEND_NAMES:
            try:
                backend, _ = detect.choose_backend(name, work / "trial")
            except Exception as exc:
                results["skipped"][name] = str(exc)
                continue
            backends[name] = backend
        tmpfs = work / "tmpfs-scratch"
        tmpfs.mkdir()
        if "overlay" in backends:
            namespaces.mount_scratch_tmpfs(tmpfs)
        for files in sizes:
            base = work / f"base-{files}"
            started = time.perf_counter()
            _make_base(base, files)
            print(f"base of {files} files built in {time.perf_counter() - started:.1f} s")
            cycles: dict[str, Callable[[int], None]] = {}
            scratch = work / f"scratch-{files}"
            scratch.mkdir()
            for name, backend in backends.items():
                cycles[name] = _backend_cycle(backend, base, scratch)
                if name == "overlay":
                    cycles["overlay (tmpfs scratch)"] = _backend_cycle(backend, base, tmpfs)
            cycles["copytree"] = _copytree_cycle(base, scratch)
            for kind, cycle in cycles.items():
                runs, warmup = _runs(kind, files, args.quick)
                stats = _time(cycle, runs, warmup)
                results["backends"].setdefault(kind, {})[str(files)] = stats
                print(
                    f"  {kind:26s} {files:>7} files: median {stats['median_ms']:9.3f} ms"
                    f"  p99 {stats['p99_ms']:9.3f} ms  ({runs} runs)"
                )
            namespaces.remove_tree(base)
            namespaces.remove_tree(scratch)
    finally:
        for point in namespaces.mounts_under(work):
            _linux.umount2(point, _linux.MNT_DETACH)
        namespaces.remove_tree(work)

    results["targets"] = _targets(results["backends"], sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results, sizes)
    print(f"written to {out}")
    return 0


def _targets(data: dict[str, dict[str, dict[str, Any]]], sizes: list[int]) -> dict[str, Any]:
    big, small = str(sizes[-1]), str(sizes[0])
    targets: dict[str, Any] = {}
    for kind in ("overlay", "overlay (tmpfs scratch)"):
        if kind in data:
            medians = [data[kind][str(s)]["median_ms"] for s in sizes]
            ratio = data[kind][big]["median_ms"] / data[kind][small]["median_ms"]
            targets[kind] = {
                "median_le_1ms": max(medians) <= 1.0,
                f"flat_{big}_vs_{small}": ratio,
                "flat_within_1.2x": ratio <= 1.2,
            }
    if "copy" in data:
        speedups = {
            s: data["copytree"][s]["median_ms"] / data["copy"][s]["median_ms"] for s in data["copy"]
        }
        targets["copy"] = {
            "speedup_vs_copytree": speedups,
            "at_least_2x": all(v >= 2 for k, v in speedups.items() if int(k) >= 10_000),
        }
    return targets


def _print_table(results: dict[str, Any], sizes: list[int]) -> None:
    head = f"{'backend':26s}" + "".join(f"{f'{s} files (med/p99 ms)':>26s}" for s in sizes)
    print()
    print(head)
    print("-" * len(head))
    for kind, per_size in results["backends"].items():
        cells = ""
        for s in sizes:
            st = per_size.get(str(s))
            cells += (
                f"{'-':>26s}" if st is None else f"{st['median_ms']:>14.3f} /{st['p99_ms']:>9.3f}"
            )
        print(f"{kind:26s}{cells}")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    print("targets:", json.dumps(results["targets"]))


if __name__ == "__main__":
    sys.exit(main())
