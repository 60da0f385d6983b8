"""Digest throughput: ``layertar.layer_diff_id`` against ``tar -c | sha256sum`` on one tree.

Usage::

    python benchmarks/bench_digest.py [TREE] [--quick] [--files N] [--runs N] [--out FILE]

Builds a tree of 10,000 files of 1 KiB in 100 directories (in a temporary directory, or in TREE
when it is given and does not exist yet; an existing TREE is measured as it is), warms the page
cache, then times both digests alternately and reports the median of the runs. The target
(benchmarks/README.md) is ``layer_diff_id`` within 2x of GNU tar piped into sha256sum. Both sides
read every file and hash a tar stream; GNU tar reads no xattrs by default while
``layer_diff_id`` does (one ``flistxattr`` per entry), so the comparison is, if anything,
unfavourable to us.

Writes ``benchmarks/results/digest.json`` (``digest-quick.json`` with ``--quick``, so a smoke
run never overwrites the committed figures) with a machine description, the figures and the
ratio, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_layers.layertar import layer_diff_id  # noqa: E402 (needs the repo on sys.path)

TARGET_RATIO = 2.0


def build_tree(root: Path, files: int, size: int = 1024) -> None:
    per_dir = 100
    root.mkdir(parents=True)
    for i in range(0, files, per_dir):
        d = root / f"d{i // per_dir:04d}"
        d.mkdir()
        for j in range(min(per_dir, files - i)):
            (d / f"f{j:03d}").write_bytes(os.urandom(size))


def fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best
            ):
                best, kind = mnt, parts[2]
    return kind


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(tree: Path) -> dict[str, Any]:
    tar_version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "fs": fs_type(tree),
        "python": platform.python_version(),
        "tar": tar_version.splitlines()[0] if tar_version else "unknown",
        "load_avg_1m": os.getloadavg()[0],
    }


def time_ours(tree: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    digest = layer_diff_id(tree, flavor="overlay")
    return time.perf_counter() - t0, digest


def time_tar(tree: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"tar -C '{tree}' -cf - . | sha256sum > /dev/null", shell=True, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", nargs="?", type=Path, help="Tree to measure (built if missing)")
    parser.add_argument("--quick", action="store_true", help="Fewer runs, for a smoke test")
    parser.add_argument("--files", type=int, default=10_000, help="Files in a built tree")
    parser.add_argument("--runs", type=int, default=None, help="Timed runs per tool")
    parser.add_argument("--out", type=Path, default=None, help="Results file")
    args = parser.parse_args(argv)
    if shutil.which("tar") is None or shutil.which("sha256sum") is None:
        print("bench_digest: needs GNU tar and sha256sum on PATH", file=sys.stderr)
        return 2
    runs = args.runs or (3 if args.quick else 9)
    out = args.out or REPO / "benchmarks" / "results" / (
        "digest-quick.json" if args.quick else "digest.json"
    )
    scratch = None
    if args.tree is None:
        scratch = Path(tempfile.mkdtemp(prefix="bench-digest-"))
        tree = scratch / "tree"
    else:
        tree = args.tree
    try:
        built = not tree.exists()
        if built:
            build_tree(tree, args.files)
        files = sum(len(f) for _, _, f in os.walk(tree))
        # Warm the page cache and the dentry cache for both sides.
        time_tar(tree)
        time_ours(tree)
        ours: list[float] = []
        theirs: list[float] = []
        digest = ""
        for _ in range(runs):
            t, digest = time_ours(tree)
            ours.append(t)
            theirs.append(time_tar(tree))
        med_ours, med_tar = statistics.median(ours), statistics.median(theirs)
        result: dict[str, Any] = {
            "benchmark": "digest",
            "tree": {"files": files, "file_size": 1024 if built else None, "built": built},
            "machine": machine(tree),
            "runs": runs,
            "layer_diff_id_s": {"median": med_ours, "all": ours},
            "tar_sha256sum_s": {"median": med_tar, "all": theirs},
            "ratio": med_ours / med_tar,
            "target_ratio": TARGET_RATIO,
            "meets_target": med_ours / med_tar <= TARGET_RATIO,
            "diff_id": digest,
        }
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m: dict[str, Any] = result["machine"]
    print(f"digest of {files} files ({m['fs']}, {m['cpu']}, kernel {m['kernel']})")
    print(f"  layer_diff_id        median {med_ours * 1000:8.1f} ms over {runs} runs")
    print(f"  tar -c | sha256sum   median {med_tar * 1000:8.1f} ms over {runs} runs")
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(f"  ratio {result['ratio']:.2f}x ({verdict} the {TARGET_RATIO:.0f}x target)")
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
