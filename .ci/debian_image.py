#!/usr/bin/env python3
"""Build, once, the real Debian image of the end-to-end tests (tests/test_debian_image.py).

usage: .ci/debian_image.py CACHE_DIR   (as root)

``debootstrap --variant=minbase`` of this machine's Debian release into a directory, one layer
of it into an OCI layout with umoci (``CACHE_DIR/debian-SUITE/image``, tag SUITE), and the .deb
of a small package (``apt-get download hello``) into ``CACHE_DIR/debian-SUITE/debs``. The mirror
is the one apt uses here (its sources, one-line or deb822), never a host name of ours. A cache
that is complete is reused as it is. Prints the environment the tests read, as shell
assignments: PYTEST_LAYERS_DEBIAN_IMAGE (``oci:DIR:TAG``) and PYTEST_LAYERS_DEBIAN_DEBS.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = "hello"


def os_release() -> dict[str, str]:
    out = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        out[key] = value.strip().strip('"')
    return out


def mirror(suite: str) -> str:
    """The first apt source here that serves ``suite`` (deb822 ``URIs:`` or a ``deb`` line)."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes") == "no" or "deb" not in fields.get("types", ""):
                    continue
                if suite in fields.get("suites", "").split() and fields.get("uris"):
                    return fields["uris"].split()[0]
        elif name.endswith(".list"):
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    sys.exit(f"debian_image: no apt source here serves {suite!r} (/etc/apt/sources.list*)")


def run(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def build(cache: Path) -> tuple[str, Path]:
    release = os_release()
    if release.get("ID") != "debian" or not release.get("VERSION_CODENAME"):
        sys.exit("debian_image: this machine is not a Debian release with a codename")
    suite = release["VERSION_CODENAME"]
    home = cache / f"debian-{suite}"
    image, debs = home / "image", home / "debs"
    if (image / "index.json").is_file() and list(debs.glob("*.deb")):
        return f"oci:{image}:{suite}", debs
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    started = time.monotonic()
    rootfs, layer = home / "rootfs", home / "layer.tar"
    source = mirror(suite)
    print(f"debian_image: debootstrap --variant=minbase {suite} from {source}", file=sys.stderr)
    run("debootstrap", "--variant=minbase", suite, str(rootfs), source)
    # apt's cache of .debs is not part of an image.
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # debootstrap makes device nodes in /dev: an image has none (a runtime provides /dev), and
    # an ordinary user could not import them.
    run("tar", "--numeric-owner", "--xattrs", "--exclude=./dev/*", "-C", str(rootfs), "-cf",
        str(layer), ".")
    shutil.rmtree(rootfs)
    staging = home / "image.tmp"
    run("umoci", "init", "--layout", str(staging))
    run("umoci", "new", "--image", f"{staging}:{suite}")
    run("umoci", "raw", "add-layer", "--image", f"{staging}:{suite}", str(layer))
    run("umoci", "config", "--image", f"{staging}:{suite}", "--config.cmd=/bin/bash")
    layer.unlink()
    debs.mkdir()
    run("apt-get", "download", "-q", PACKAGE, cwd=debs)
    staging.rename(image)
    for path in [home, *home.rglob("*")]:
        mode = path.lstat().st_mode
        if not path.is_symlink():
            path.chmod(mode | (0o555 if path.is_dir() else 0o444))
    took = time.monotonic() - started
    print(f"debian_image: built {image} and {debs} in {took:.0f} s", file=sys.stderr)
    return f"oci:{image}:{suite}", debs


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ref, debs = build(Path(sys.argv[1]).absolute())
    print(f"PYTEST_LAYERS_DEBIAN_IMAGE={ref}")
    print(f"PYTEST_LAYERS_DEBIAN_DEBS={debs}")


if __name__ == "__main__":
    main()
