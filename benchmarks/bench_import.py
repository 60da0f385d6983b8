"""Import of an image with many tiny files: wall time, CPU time and peak memory.

Usage::

    python benchmarks/bench_import.py [--quick] [--files N] [--out FILE]

Builds an OCI layout whose one layer holds N files of 2 bytes in directories of 1,000 (100,000
by default; 2,000 with ``--quick``), then runs ``pytest-layers import`` on it into an empty store
in a subprocess, as a user would, and records the subprocess's wall time, user and system CPU
time and peak RSS. Writes ``benchmarks/results/import.json`` (``import-quick.json`` with
``--quick``) with a machine description next to the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = (sys.executable, "-m", "pytest_layers.cli")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(files):
            if i % 1000 == 0:
                ti = tarfile.TarInfo(f"d{i // 1000}")
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            ti = tarfile.TarInfo(f"d{i // 1000}/f{i % 1000}")
            ti.size = 2
            tf.addfile(ti, io.BytesIO(b"x\n"))
    return buf.getvalue()


def write_layout(dest: Path, layer: bytes) -> None:
    blobs = dest / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media: str) -> dict[str, object]:
        (blobs / sha(data)[7:]).write_bytes(data)
        return {"mediaType": media, "digest": sha(data), "size": len(data)}

    config = {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [put(layer, "application/vnd.oci.image.layer.v1.tar")],
    }
    mdesc = put(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 files, a smoke test")
    parser.add_argument("--files", type=int, help="number of files (default 100,000)")
    parser.add_argument("--out", type=Path, help="result file")
    args = parser.parse_args()
    files = args.files or (2_000 if args.quick else 100_000)
    out = args.out or REPO / "benchmarks/results" / (
        "import-quick.json" if args.quick else "import.json"
    )
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        work = Path(tmp)
        write_layout(work / "image", layer_tar(files))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        subprocess.run(
            [*CLI, "--store", str(work / "store"), "import", str(work / "image"), "-q"],
            check=True,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "machine": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "euid": os.geteuid(),
        },
        "files": files,
        "wall_s": round(wall, 2),
        "user_s": round(after.ru_utime - before.ru_utime, 2),
        "sys_s": round(after.ru_stime - before.ru_stime, 2),
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
