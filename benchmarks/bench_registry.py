"""Registries: ``pytest-layers pull`` against ``skopeo copy`` + ``umoci unpack``, a CI session
that pulls its layers from a remote cache against one that builds them, and the memory of
pushing and pulling a 1 GiB layer.

Usage::

    python benchmarks/bench_registry.py [--quick] [--runs N] [--out FILE]

Starts Debian's ``docker-registry`` on 127.0.0.1 (a config of its own, storage in a temporary
directory) and measures, each as the median of ``--runs`` runs:

- **pull + unpack** of a one-layer image of 10,000 and 100,000 files of 1 KiB (pushed by
  ``pytest-layers push``): ``pytest-layers pull`` into an empty store, where the blob streams
  through the verifier straight into the store, against ``skopeo copy docker://... oci:DIR``
  followed by ``umoci unpack``. Target: we are faster.
- **warm CI session**: a pytest session whose ``@layer`` chain (three layers, 100,000 files in
  all) is built from an empty store, against the same session with an empty store and
  ``--layers-cache-from`` a registry that a first session filled (``--layers-cache-to``).
  Target: the pulled start at least 3x faster than building. Beside it, GNU tar extracting
  the layer blobs a pulled store kept, each into an empty directory: the floor of writing the
  same files in C, to set against the time the target leaves the pulled session.
- **memory**: the peak RSS of ``pytest-layers push`` and ``pytest-layers pull`` of a layer that
  holds one 1 GiB sparse file (1 GiB of zeros through gzip both ways).

``--quick`` (the CI smoke run) uses 1,000 files, one run and a 64 MiB file. Writes
``benchmarks/results/registry.json`` (``registry-quick.json`` with ``--quick``) and prints a
summary.
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
sys.path.insert(0, str(REPO / "tests"))

from registry_util import running  # noqa: E402 (needs tests/ on sys.path)
from treeutil import build_layer  # noqa: E402

from pytest_layers.store import Store  # noqa: E402

ROOT = [] if os.geteuid() == 0 else ["--rootless"]
SETTLE_S = 65.0  # see remove_after_measuring


def build_tree(root: Path, files: int, size: int = 1024) -> None:
    per_dir = 100
    root.mkdir(parents=True)
    for i in range(0, files, per_dir):
        d = root / f"d{i // per_dir:05d}"
        d.mkdir()
        for j in range(min(per_dir, files - i)):
            (d / f"f{j:03d}").write_bytes(os.urandom(size))


def run(cmd: list[str], cwd: Path | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, output) of one command; fails loudly."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read() if proc.stdout else ""
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, int(usage.ru_maxrss), out


def cli(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest_layers.cli", "--store", str(store), *args]


def remove_after_measuring(paths: list[Path]) -> None:
    """Delete a section's trees only once all its timings are taken.

    On an ext4 without a journal (the root filesystem of some CI VMs) every inode created in the
    minutes after a mass delete scans past the recently freed ones: a create went from 30 us to
    200-700 us here after 60,000 deletes. Deleting the built store just before the pulled session
    made that session pay for it (51 s against 14 s for the same 100,000 files), so no tree is
    removed between two timed runs, and after a section's deletes the next section waits out
    the kernel's window (60 s once the inode tables are written back; ``--quick`` does not wait).
    """
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE_S)


def bench_pull(host: str, work: Path, files: int, runs: int) -> dict[str, Any]:
    src = work / f"src-{files}"
    build_tree(src, files)
    store = Store(work / f"store-{files}")
    build_layer(store, None, src, "img")
    url = f"docker://{host}/bench/files:{files}"
    run(cli(work / f"store-{files}", "push", "img", url, "-q"))
    ours, theirs = [], []
    done: list[Path] = []
    for i in range(runs):
        target = work / f"pull-{files}-{i}"
        ours.append(run(cli(target, "pull", url, "-q"))[0])
        layout, bundle = work / f"oci-{files}-{i}", work / f"bundle-{files}-{i}"
        t1 = run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", url,
                  f"oci:{layout}:v1"])[0]  # fmt: skip
        t2 = run(["umoci", "unpack", *ROOT, "--image", f"{layout}:v1", str(bundle)])[0]
        theirs.append(t1 + t2)
        done += [target, layout, bundle]
    remove_after_measuring([*done, src])
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"files": files, "pytest_layers_pull_s": a, "skopeo_umoci_s": b, "speedup": b / a}


CONFTEST = """
import os
from pytest_layers import layer

N = {files}

def fill(root, name, count):
    for i in range(0, count, 100):
        d = root / name / f"d{{i // 100:05d}}"
        d.mkdir(parents=True)
        for j in range(min(100, count - i)):
            (d / f"f{{j:03d}}").write_bytes(os.urandom(1024))

@layer
def base(root):
    fill(root, "base", N // 2)

@layer(parent=base)
def deps(root):
    fill(root, "deps", N // 4)

@layer(parent=deps)
def app(root):
    fill(root, "app", N - N // 2 - N // 4)
"""

TESTS = """
import pytest

@pytest.mark.layer("app")
def test_it(rootfs):
    assert (rootfs / "app").is_dir()
"""


def bench_session(host: str, work: Path, files: int, runs: int) -> dict[str, Any]:
    project = work / "project"
    project.mkdir()
    (project / "conftest.py").write_text(CONFTEST.format(files=files))
    (project / "test_it.py").write_text(TESTS)
    cache = f"docker://{host}/bench/cache"
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    # The first session builds and fills the cache (its pushes are awaited at session end).
    run([*base, "--layers-store", str(work / "filler"), f"--layers-cache-to={cache}"], project)
    built: list[float] = []
    pulled: list[float] = []
    native: list[float] = []
    stores: list[Path] = []
    for i in range(runs):
        # Alternate which goes first, so that neither always meets the other's page cache.
        for kind in ("built", "pulled") if i % 2 == 0 else ("pulled", "built"):
            store = work / f"{kind}-{i}"
            stores.append(store)
            extra = [f"--layers-cache-from={cache}"] if kind == "pulled" else []
            wall, _rss, out = run([*base, "--layers-store", str(store), *extra], project)
            assert out.count(f"layers: {kind}") == 3, out
            (built if kind == "built" else pulled).append(wall)
            if kind == "pulled" and (took := native_extract(store, work / f"native-{i}")):
                native.append(took)
                stores.append(work / f"native-{i}")
    remove_after_measuring(stores)
    a, b = statistics.median(built), statistics.median(pulled)
    return {
        "files": files,
        "built_session_s": a,
        "pulled_session_s": b,
        "speedup": a / b,
        # What the target leaves the pulled session, and what GNU tar takes to write the same
        # layers' files (nothing else: no pytest, no transfer, no hashing, no index).
        "target_allows_s": a / 3,
        "gnu_tar_extract_s": statistics.median(native) if native else None,
    }


def native_extract(store: Path, dest: Path) -> float | None:
    """Seconds for GNU tar to extract the layer blobs the pulled ``store`` kept, each into an
    empty directory of its own on the same filesystem (as the pull applies each layer): the
    floor of writing those files, in C. None without ``tar``."""
    tar = shutil.which("tar")
    blobs = sorted(store.glob("layers/*/blob.tar"))
    if tar is None or not blobs:
        return None
    started = time.perf_counter()
    for n, blob in enumerate(blobs):
        into = dest / str(n)
        into.mkdir(parents=True)
        run([tar, "-xf", str(blob), "-C", str(into)])
    return time.perf_counter() - started


# The peak RSS of the command itself: VmHWM belongs to the process's own address space, which
# exec replaces (ru_maxrss would also count the parent's memory at fork time).
_HWM = (
    "import sys\n"
    "from pytest_layers.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]\n"
    "print('VMHWM', hwm)\n"
    "sys.exit(code)\n"
)


def hwm_kib(out: str) -> int:
    return int(out.split("VMHWM")[1].split()[0])


def bench_memory(host: str, work: Path, size: int) -> dict[str, Any]:
    src = work / "sparse"
    src.mkdir()
    with open(src / "big", "wb") as f:
        f.truncate(size)
    store = work / "store-sparse"
    build_layer(Store(store), None, src, "big")
    url = f"docker://{host}/bench/sparse:v1"
    # A sparse file's zeros compress past the import's default ratio limit (a bomb's shape);
    # this image is ours, so the pull raises the limit, as its error message says to.
    os.environ["PYTEST_LAYERS_MAX_RATIO"] = "100000"
    wrap = [sys.executable, "-c", _HWM]
    push_s, _, out = run([*wrap, "--store", str(store), "push", "big", url, "-q"])
    push_rss = hwm_kib(out)
    pull_s, _, out = run([*wrap, "--store", str(work / "pulled-sparse"), "pull", url, "-q"])
    pull_rss = hwm_kib(out)
    _, _, out = run([*wrap, "--store", str(store), "ls"])
    base_rss = hwm_kib(out)
    shutil.rmtree(work / "pulled-sparse")
    shutil.rmtree(store)
    return {
        "file_bytes": size,
        "push_s": push_s,
        "push_peak_rss_mib": push_rss / 1024,
        "pull_s": pull_s,
        "pull_peak_rss_mib": pull_rss / 1024,
        "cli_ls_rss_mib": base_rss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--only",
        choices=("pull", "session", "memory"),
        help="Measure one part and update it in the results file",
    )
    args = parser.parse_args()
    sizes = [1000] if args.quick else [10_000, 100_000]
    runs = 1 if args.quick else args.runs
    if args.quick:
        global SETTLE_S
        SETTLE_S = 0.0
    out = args.out or REPO / "benchmarks/results" / (
        "registry-quick.json" if args.quick else "registry.json"
    )
    results: dict[str, Any] = json.loads(out.read_text()) if args.only and out.exists() else {}
    results |= {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "uid": os.geteuid(),
        },
    }
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    try:
        with running(work / "registry") as server:
            if args.only in (None, "pull"):
                results["pull"] = [bench_pull(server.host, work, n, runs) for n in sizes]
            if args.only in (None, "session"):
                results["session"] = bench_session(server.host, work, sizes[-1], runs)
            if args.only in (None, "memory"):
                results["memory"] = bench_memory(
                    server.host, work, (64 << 20) if args.quick else (1 << 30)
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    # With --only and a results file that does not hold the other parts yet, print what there is.
    for row in results.get("pull", []):
        print(
            f"pull+unpack {row['files']:>7} files: pytest-layers {row['pytest_layers_pull_s']:.2f}s"
            f", skopeo+umoci {row['skopeo_umoci_s']:.2f}s ({row['speedup']:.1f}x)"
        )
    if s := results.get("session"):
        print(
            f"session, {s['files']} files in 3 layers: built {s['built_session_s']:.2f}s, pulled "
            f"{s['pulled_session_s']:.2f}s ({s['speedup']:.1f}x); the 3x target leaves the "
            f"pulled session {s['target_allows_s']:.2f}s, GNU tar extracts its layers in "
            + ("-" if s.get("gnu_tar_extract_s") is None else f"{s['gnu_tar_extract_s']:.2f}s")
        )
    if m := results.get("memory"):
        print(
            f"{m['file_bytes'] >> 20} MiB sparse layer: push peak RSS "
            f"{m['push_peak_rss_mib']:.0f} MiB ({m['push_s']:.1f}s), pull peak RSS "
            f"{m['pull_peak_rss_mib']:.0f} MiB ({m['pull_s']:.1f}s); `pytest-layers ls` "
            f"{m['cli_ls_rss_mib']:.0f} MiB"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
