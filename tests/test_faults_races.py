"""Faults, group 2: concurrent sessions on one store, and prune racing a session.

Four pytest sessions start at once on one store, each with ``-n 2`` (so eight workers race for
the build locks), over six images of which some are shared by every session and some by only
one. Builders append their name to a log: each must appear exactly once, every session must
pass and the store must verify. Then ``prune`` runs while a test holds a layer nobody refers to
any more: the session's lease must keep it, and the next prune (with no session) removes it.
"""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
from faults_util import (
    assert_store_consistent,
    builder_runs,
    child_env,
    cli,
    no_mounts_left,
    our_mounts_under,
    out,
    pytest_command,
    run_session,
    wait_for,
    write_project,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.requires_overlay]

CONFTEST = """
import os, time
from pathlib import Path
from pytest_layers import layer

HERE = Path(__file__).parent

def log(name):
    # One write(2) with O_APPEND: lines from racing processes never interleave.
    fd = os.open(HERE / "runs.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, (name + "\\n").encode())
    os.close(fd)
    time.sleep(0.3)  # widen the window in which a second builder could start

def fill(root, name, n=20):
    d = root / name
    d.mkdir()
    for i in range(n):
        (d / f"f{i}").write_text(f"{name}{i}")

@layer
def base(root):
    log("base"); fill(root, "base")

@layer(parent=base)
def a1(root):
    log("a1"); fill(root, "a1")

@layer(parent=a1)
def a2(root):
    log("a2"); fill(root, "a2"); (root / "base/f0").unlink()

@layer(parent=base)
def b(root):
    log("b"); fill(root, "b")

@layer
def c(root):
    log("c"); fill(root, "c")

@layer(parent=c)
def d(root):
    log("d"); fill(root, "d")
"""

TESTS = """
import pytest

EXPECT = {
    "base": ["base"], "a1": ["a1", "base"], "a2": ["a1", "a2", "base"], "b": ["b", "base"],
    "c": ["c"], "d": ["c", "d"],
}

@pytest.mark.parametrize("i", range(4))
@pytest.mark.parametrize("image", [pytest.param(x, marks=pytest.mark.layer(x)) for x in EXPECT])
def test_image(rootfs, image, i):
    assert sorted(p.name for p in rootfs.path.iterdir()) == EXPECT[image]
    assert (rootfs / "base/f0").exists() == (image in ("base", "a1", "b"))
    (rootfs / "scratch").write_text(str(i))
    assert [str(c) for c in rootfs.diff()] == ["A /scratch"]
"""

#: Which images each of the four sessions uses (``-k``): base is everywhere, c and d in one.
SELECTIONS = [
    "base or a1 or a2",
    "a2 or b",
    "b or c or d",
    "base or a1 or a2 or b or c or d",
]


@pytest.mark.slow
def test_four_sessions_with_two_workers_each_build_every_key_once(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("xdist")
    path = pytester.path
    with no_mounts_left(path):
        store = write_project(path, CONFTEST, TESTS)
        procs = [
            subprocess.Popen(
                pytest_command("-n", "2", "-k", sel),
                cwd=path,
                env=child_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for sel in SELECTIONS
        ]
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=240)
            results.append((proc.returncode, stdout, stderr))
        for sel, (code, stdout, stderr) in zip(SELECTIONS, results, strict=True):
            assert code == 0, f"session -k {sel!r}: exit {code}\n{stdout}\n{stderr}"
        counts = Counter(builder_runs(path))
        assert counts == dict.fromkeys(["base", "a1", "a2", "b", "c", "d"], 1), counts
        assert our_mounts_under(path) == []
        assert_store_consistent(store)
        # And a fifth session, afterwards, builds nothing.
        again = run_session(path, "-n", "2")
        assert again.returncode == 0, out(again)
        assert Counter(builder_runs(path)) == counts


HOLD_CONFTEST = """
import os, time
from pathlib import Path
from pytest_layers import layer

HERE = Path(__file__).parent

@layer
def base(root):
    (root / "data").mkdir()
    for i in range(20):
        (root / "data" / f"f{i}").write_text("x" * 1000)
"""

HOLD_TESTS = """
import os, time
from pathlib import Path
import pytest

HERE = Path(__file__).parent

@pytest.mark.layer("base")
def test_holds_base(rootfs):
    assert len(list((rootfs / "data").iterdir())) == 20
    (HERE / "ready").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not (HERE / "go").exists():
        assert time.monotonic() < deadline, "never told to go on"
        time.sleep(0.02)
    # The lower layer is still there: every file reads back.
    for i in range(20):
        assert (rootfs / "data" / f"f{i}").read_text() == "x" * 1000
"""


@pytest.mark.parametrize("namespace", ["private", "host"])
def test_prune_spares_a_layer_a_running_session_uses(
    pytester: pytest.Pytester, namespace: str
) -> None:
    path = pytester.path
    with no_mounts_left(path):
        store = write_project(
            path, HOLD_CONFTEST, HOLD_TESTS, ini=[f"layers_mount_namespace = {namespace}"]
        )
        proc = subprocess.Popen(
            pytest_command(),
            cwd=path,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for((path / "ready").exists, "the test to hold its rootfs", proc)
            (layer_dir,) = (store / "layers").iterdir()
            # Nothing refers to the layer any more (as after its builder changed): only the
            # running session's lease keeps it.
            for ref in (store / "refs").rglob("*"):
                if ref.is_file():
                    ref.unlink()
            pruned = cli(store, "prune", "--keep-snapshots", "0")
            assert pruned.returncode == 0, out(pruned)
            assert "removed 0 layer(s)" in pruned.stdout, pruned.stdout
            assert (layer_dir / "layer.json").is_file(), "prune removed a layer in use"
            (path / "go").touch()
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, f"{stdout}\n{stderr}"
        assert "1 passed" in stdout
        # Without the lease, the same prune removes it: the test above is not vacuous.
        for ref in (store / "refs").rglob("*"):
            if ref.is_file():
                ref.unlink()
        pruned = cli(store, "prune", "--keep-snapshots", "0")
        assert pruned.returncode == 0, out(pruned)
        assert "removed 1 layer(s)" in pruned.stdout, pruned.stdout
        assert not layer_dir.exists()
        assert our_mounts_under(path) == []
