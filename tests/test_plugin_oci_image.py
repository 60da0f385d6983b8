"""oci_image(): a real image (OCI layout tar or docker-archive) as a session layer fixture, the
parent of @layer builds and a marker image; imported once per store, across sessions and
xdist workers; a bad path or a broken file is a clear error naming the image."""

from __future__ import annotations

import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from pytest_layers import oci
from pytest_layers.store import Store
from tests.conftest import run_as_user

pytestmark = [pytest.mark.requires_overlay]

CONFTEST = """
import os
from pytest_layers import layer, oci, oci_image

# Count real imports in every process (xdist workers included).
LOG = os.path.join(os.path.dirname(__file__), "imports.log")
_real_import = oci.import_image

def _counting_import(*args, **kwargs):
    result = _real_import(*args, **kwargs)
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {len(result.imported)}\\n")
    return result

oci.import_image = _counting_import

debian = oci_image("debian", "images/debian.tar")

@layer(parent=debian)
def app(root):
    (root / "etc/app.conf").write_text("debug=false\\n")
    (root / "etc/os-release").unlink()

@layer(parent="debian")
def srv(root):
    (root / "srv").mkdir()
"""

TESTS = """
import json, os, pathlib
import pytest
from pytest_layers import Layer, oci_image

# Defined in a test module (not the conftest), used by name in a marker below.
legacy = oci_image("legacy", "images/debian-legacy.tar")
modern = oci_image("modern", "images/debian-docker.tar")
EXPECTED = json.loads(pathlib.Path(__file__).with_name("expected.json").read_text())

@pytest.mark.layer("debian")
@pytest.mark.parametrize("i", range(4))
def test_image_files(rootfs, i):
    assert (rootfs / "etc/os-release").read_text() == "ID=debian\\n"
    assert (rootfs / "etc/debian_version").read_text() == "12.5\\n"
    assert not (rootfs / "etc/motd").exists()            # deleted by the image's 2nd layer
    assert os.readlink(rootfs / "bin") == "usr/bin"
    assert os.stat(rootfs / "bin/tool").st_mode & 0o7777 == 0o755
    assert [x.diff_id for x in rootfs.layers] == EXPECTED["diff_ids"]
    assert [x.chain_id for x in rootfs.layers] == EXPECTED["chain_ids"]
    assert rootfs.layers[-1].name == "debian"
    (rootfs / "etc/os-release").write_text(str(i))       # the next test sees the image again

@pytest.mark.layer("app")
def test_layer_on_image(rootfs, app, debian):
    assert isinstance(debian, Layer)
    assert app.parent == debian and debian.chain_id == EXPECTED["chain_ids"][-1]
    assert [str(c) for c in app.changes()] == ["C /etc", "A /etc/app.conf", "D /etc/os-release"]
    assert (rootfs / "etc/debian_version").read_text() == "12.5\\n"
    assert not (rootfs / "etc/os-release").exists()

@pytest.mark.layer("srv", "app")
def test_union_on_image(rootfs):
    assert (rootfs / "srv").is_dir() and (rootfs / "etc/app.conf").exists()

@pytest.mark.layer("legacy")
def test_docker_archive(rootfs, legacy, modern, debian):
    assert legacy.chain_id == modern.chain_id == debian.chain_id
    assert (rootfs / "etc/debian_version").read_text() == "12.5\\n"
"""


def _make_images(dest: Path, scratch: Path) -> dict[str, list[str]]:
    """A two-layer image made with our own store and exporter, as an OCI layout tar and as a
    docker-archive: a base with a file, a tool, a symlink; a layer deleting one file."""
    store = Store(scratch)
    with store.staging() as staged:
        (staged / "etc").mkdir()
        (staged / "etc/os-release").write_text("ID=debian\n")
        (staged / "etc/motd").write_text("hello\n")
        (staged / "usr/bin").mkdir(parents=True)
        (staged / "usr/bin/tool").write_text("#!/bin/sh\n")
        (staged / "usr/bin/tool").chmod(0o755)
        os.symlink("usr/bin", staged / "bin")
        base = store.add_layer(staged, parent=None, name=None, source="build")
    with store.staging() as staged:
        (staged / "etc").mkdir()
        (staged / "etc/debian_version").write_text("12.5\n")
        if store.flavor == "overlay":
            os.mknod(staged / "etc/motd", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        else:
            (staged / "etc/.wh.motd").touch()
        top = store.add_layer(staged, parent=base.chain_id, name="debian", source="build")
    dest.mkdir()
    result = oci.export_image(store, top.chain_id, dest / "debian.tar", format="oci", tar=True)
    oci.export_image(store, top.chain_id, dest / "debian-docker.tar", format="docker-archive")
    # What older `docker save` wrote: manifest.json only, no OCI index; known by its config.
    with (
        tarfile.open(dest / "debian-docker.tar") as src,
        tarfile.open(dest / "debian-legacy.tar", "w", format=tarfile.PAX_FORMAT) as out,
    ):
        names = []
        for member in src:
            names.append(member.name)
            if member.name not in ("oci-layout", "index.json"):
                out.addfile(member, src.extractfile(member) if member.isfile() else None)
        assert {"index.json", "manifest.json"} <= set(names)
    return {"diff_ids": result.diff_ids, "chain_ids": result.chain_ids}


def _imports(path: Path) -> list[int]:
    """New layers per import call logged by the suite's conftest (then forget them)."""
    log = path / "imports.log"
    if not log.exists():
        return []
    counts = sorted(int(line.split()[1]) for line in log.read_text().splitlines())
    log.unlink()
    return counts


@pytest.mark.slow
def test_oci_image_as_parent_and_marker_imported_once(pytester: pytest.Pytester) -> None:
    expected = _make_images(pytester.path / "images", pytester.path / "build-store")
    (pytester.path / "expected.json").write_text(json.dumps(expected))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_img=TESTS)

    result = pytester.runpytest_subprocess("--strict-markers", "-W", "error")
    result.assert_outcomes(passed=7)
    # 2 layers, 5 files: os-release, motd, tool, the bin link; debian_version (not the whiteout)
    result.stdout.re_match_lines(
        [r"layers: imported debian in \d+\.\d\ds \(5 files, .*\) sha256:[0-9a-f]{12}"]
    )
    result.stdout.fnmatch_lines(["layers: built app in *"])
    # The docker-archive carries the same OCI manifest (as `docker save` does since Docker 25):
    # the same image, found in the build cache without an import. The legacy archive is known
    # by its config digest: imported, but its layers are all in the store already.
    result.stdout.fnmatch_lines_random(
        ["layers: cached modern in *", "layers: cached legacy in * (5 files, *"]
    )
    assert _imports(pytester.path) == [0, 2]
    store = Store(pytester.path / ".pytest_cache/layers")
    assert store.get_name("debian") == expected["chain_ids"][-1]
    assert store.layer_info(expected["chain_ids"][0]).source == "import"

    # A second session imports nothing: the build cache knows the image by its manifest digest.
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["layers: cached debian in *", "layers: cached app in *"])
    assert _imports(pytester.path) == []

    # Two xdist workers that both need both images, on a fresh store: each image once.
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "--layers-store=store2")
    result.assert_outcomes(passed=14)
    assert _imports(pytester.path) == [0, 2]
    result.stdout.fnmatch_lines(["layers: imported debian in *"])


def test_bad_image_paths_are_clear_errors(pytester: pytest.Pytester) -> None:
    (pytester.path / "images").mkdir()
    (pytester.path / "images/garbage.tar").write_bytes(b"not a tar at all\n" * 100)
    pytester.makeconftest(
        """
        from pytest_layers import layer, oci_image

        ghost = oci_image("ghost", "images/missing.tar")
        garbage = oci_image("garbage", "images/garbage.tar")

        @layer(parent=ghost)
        def child(root):
            (root / "x").write_text("x")
        """
    )
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.layer("ghost")
        def test_missing(rootfs): pass

        @pytest.mark.layer("child")
        def test_child_of_missing(rootfs): pass

        @pytest.mark.layer("garbage")
        def test_garbage(rootfs): pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            f"*oci_image 'ghost' (*conftest.py:3): 'images/missing.tar' does not exist (looked "
            f"for {pytester.path}/images/missing.tar; a relative path is relative to the "
            "rootdir*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            f"*oci_image 'garbage' (*conftest.py:4): cannot read the image: "
            f"{pytester.path}/images/garbage.tar: not an OCI layout directory or a readable tar*"
        ]
    )
    # Both tests of the missing image fail with its message, not a traceback from the store.
    # Count the error reports' own lines (the short summary repeats them, truncated or not
    # depending on the terminal and on $CI).
    reports = [
        line
        for line in result.stdout.lines
        if line.startswith("oci_image 'ghost'") and "'images/missing.tar' does not exist" in line
    ]
    assert len(reports) == 2, result.stdout.str()
    result.stdout.no_fnmatch_line("*Traceback*")


def test_oci_image_definition_errors() -> None:
    from pytest_layers import oci_image
    from pytest_layers.errors import LayerDefinitionError

    with pytest.raises(LayerDefinitionError, match="must be a Python identifier"):
        oci_image("my-image", "images/x.tar")
    with pytest.raises(LayerDefinitionError, match="path must be the path of an OCI layout"):
        oci_image("x", 42)  # type: ignore[arg-type]
    with pytest.raises(LayerDefinitionError, match="ref must be a str tag"):
        oci_image("x", "images/x.tar", ref=1)  # type: ignore[arg-type]
    from pytest_layers.definitions import registry

    assert "my-image" not in registry()  # nothing was registered by a refused definition
    assert "x" not in registry()


@pytest.mark.slow
@pytest.mark.requires_user
def test_oci_image_as_ordinary_user(user_tmp_path: Path, tmp_path: Path) -> None:
    # Imported in the session's user namespace (no root): same files, imported once under -n 2.
    expected = _make_images(user_tmp_path / "images", tmp_path / "build-store")
    (user_tmp_path / "expected.json").write_text(json.dumps(expected))
    (user_tmp_path / "conftest.py").write_text(CONFTEST)
    (user_tmp_path / "test_img.py").write_text(TESTS)
    (user_tmp_path / "pytest.ini").write_text("[pytest]\n")
    owner = user_tmp_path.stat().st_uid
    for dirpath, dirnames, filenames in os.walk(user_tmp_path):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), owner, owner)
    proc = run_as_user(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "each", str(user_tmp_path)],
        cwd=user_tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert "14 passed" in out, out[-3000:]
    assert "layers: backend=overlay (user namespace)" in out, out
    assert _imports(user_tmp_path) == [0, 2]
