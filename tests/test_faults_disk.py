"""Faults, group 3: the store's filesystem fills up.

The store sits on a small tmpfs that the test mounts (and always unmounts). A filler file takes
most of it, so that a builder, or the commit of a test's rw layer, runs out of space. Each must
fail with a clear "no space" error naming the layer (or the test), leave the store consistent
(no partial layer, nothing left in ``tmp/``, ``verify`` clean), and succeed once the filler is
gone and the same session is run again.

The rw layer's upper dir lives on the session's scratch tmpfs, not on the store's filesystem: a
test can write more than the store holds, and only the commit's staging lands on the small fs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_util import (
    assert_store_consistent,
    builder_runs,
    child_env,
    our_mounts_under,
    out,
    run_session,
    unmount_all_under,
    write_project,
)

from pytest_layers import _linux

pytestmark = [
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.requires_root,
    pytest.mark.requires_overlay,
]

SIZE = 8 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted whatever happens."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    _linux.mount("tmpfs", mnt, "tmpfs", 0, f"size={SIZE},mode=0755")
    try:
        yield mnt
    finally:
        unmount_all_under(mnt)
        assert our_mounts_under(mnt) == []


def _fill(fs: Path, leave: int) -> Path:
    """A filler file leaving about ``leave`` bytes free on ``fs``."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


CONFTEST = """
import os
from pathlib import Path
from pytest_layers import layer

HERE = Path(__file__).parent

def log(name):
    with open(HERE / "runs.log", "a") as f:
        f.write(name + "\\n")

@layer
def base(root):
    log("base")
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
    (root / "blob").write_bytes(b"b" * int(os.environ.get("BASE_BYTES", "1000")))

@layer(parent=base)
def app(root):
    log("app")
    (root / "app").write_bytes(b"a" * int(os.environ.get("APP_BYTES", "1000")))
"""

TESTS = """
import os
import pytest

@pytest.mark.layer("base")
def test_uses_base(rootfs):
    assert (rootfs / "etc/os-release").read_text() == "ID=demo\\n"

@pytest.mark.layer("app")
def test_uses_app(rootfs):
    assert (rootfs / "app").stat().st_size > 0
"""

COMMIT_TESTS = """
import os
import pytest
from pytest_layers.errors import NoSpaceError

@pytest.mark.layer("app")
def test_commit_overflows(rootfs):
    # The write itself fits: the rw layer is on the scratch tmpfs, not on the store's fs.
    (rootfs / "big").write_bytes(b"x" * (3 << 20))
    if os.environ.get("EXPECT_FULL") == "1":
        with pytest.raises(NoSpaceError) as info:
            rootfs.commit("mine")
        assert "no space" in str(info.value).lower()
        assert "mine" in str(info.value), str(info.value)
    else:
        assert rootfs.commit("mine").size >= 3 << 20

@pytest.mark.layer("app")
def test_fails_and_is_kept(rootfs):
    (rootfs / "evidence").write_bytes(b"e" * (3 << 20))
    assert False, "fails on purpose: its rw layer is committed on failure"
"""


@pytest.mark.parametrize("layer", ["base", "app"])
def test_builder_overflowing_the_store(
    pytester: pytest.Pytester, small_fs: Path, layer: str
) -> None:
    path = pytester.path
    store = write_project(path, CONFTEST, TESTS, store=small_fs / "store")
    other = "app" if layer == "base" else "base"
    # Build the small layers first; then the big one overflows what the filler leaves.
    env_big = {f"{layer.upper()}_BYTES": str(3 << 20)}
    if layer == "app":
        first = run_session(path, "-k", "base")  # builds base only
        assert first.returncode == 0, out(first)
    filler = _fill(small_fs, leave=1 << 20)

    proc = run_session(path, env=child_env(**env_big))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, out(proc)
    assert "no space" in text.lower(), out(proc)
    assert f"layer {layer!r}" in text or f"layer {layer}" in text, out(proc)
    assert "INTERNALERROR" not in text, out(proc)
    assert_store_consistent(store)
    assert os.listdir(store / "tmp") == [], "a failed build left its staging behind"
    assert not (store / "refs" / "names" / layer).exists()

    filler.unlink()
    again = run_session(path, env=child_env(**env_big))
    assert again.returncode == 0, out(again)
    assert "2 passed" in again.stdout, out(again)
    assert builder_runs(path).count(layer) == 2, "the failed build was not retried"
    assert builder_runs(path).count(other) == 1, "a complete layer was built twice"
    assert_store_consistent(store)


def test_rw_layer_overflowing_at_commit(pytester: pytest.Pytester, small_fs: Path) -> None:
    path = pytester.path
    store = write_project(path, CONFTEST, COMMIT_TESTS, store=small_fs / "store")
    # The image is built while there is room.
    prime = run_session(path, "--layers-keep=never", "-k", "kept", env=child_env())
    assert prime.returncode == 1, out(prime)  # builds base and app; the test fails, not kept
    filler = _fill(small_fs, leave=1 << 20)

    proc = run_session(path, env=child_env(EXPECT_FULL="1"))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, out(proc)
    assert "1 failed, 1 passed" in proc.stdout, out(proc)
    assert "could not keep the rw layer as a snapshot" in text, out(proc)
    assert "no space" in text.lower(), out(proc)
    assert "INTERNALERROR" not in text, out(proc)
    assert_store_consistent(store)
    assert os.listdir(store / "tmp") == [], "a failed commit left its staging behind"
    assert not (store / "refs" / "snapshots").exists() or not any(
        (store / "refs" / "snapshots").iterdir()
    )

    filler.unlink()
    again = run_session(path)
    assert again.returncode == 1, out(again)
    assert "1 failed, 1 passed" in again.stdout, out(again)
    assert "snapshot:test_project.py::test_fails_and_is_kept" in again.stdout, out(again)
    assert_store_consistent(store)
